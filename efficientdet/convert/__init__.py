"""Weight conversion commands and ImageNet backbone weights.

CLI: ``python -m efficientdet.convert {tf,effdet,inspect} …`` (see ``__main__``). The conversions
themselves are the layout adapters of :mod:`efficientdet.ckpt.layouts`; their public functions
are re-exported here.
"""
from ..ckpt.layouts import ConversionError
from ..ckpt.layouts.effdet import effdet_to_state_dict, state_dict_to_effdet
from ..ckpt.layouts.tf import export_tf_names, read_tf_input, tf_to_state_dict

__all__ = ['ConversionError', 'tf_to_state_dict', 'read_tf_input', 'export_tf_names',
           'effdet_to_state_dict', 'state_dict_to_effdet']
