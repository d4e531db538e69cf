"""Weight conversion: official TF variables, rwightman effdet checkpoints, inspection.

CLI: ``python -m efficientdet.convert {tf,effdet,inspect} …`` (see ``__main__``).
"""
from .effdet import effdet_to_state_dict, state_dict_to_effdet
from .tf import ConversionError, export_tf_names, read_tf_input, tf_to_state_dict

__all__ = ['ConversionError', 'tf_to_state_dict', 'read_tf_input', 'export_tf_names',
           'effdet_to_state_dict', 'state_dict_to_effdet']
