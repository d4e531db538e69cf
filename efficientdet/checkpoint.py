"""Checkpoints, one import away: re-exports of :mod:`efficientdet.ckpt` (``files``: safe reading and
atomic writing; ``layout``: what a file holds; ``load``: exact and fine-tuning loads), kept so
``from efficientdet.checkpoint import load_weights`` and the like keep working. Alias module, kept for
users' code: the package itself never imports it.
"""
from .ckpt.files import (StateDict, atomic_save, atomic_write, extract_state_dict, read_file, safe_load,
                         strip_prefixes)
from .ckpt.layout import (LAYOUT_NAMES, Checkpoint, compound_coef_candidates, describe_coef, detect_layout,
                          expected_signature, infer_compound_coef, infer_num_classes, num_parameters,
                          read_checkpoint, shape_signature, yet_another_fusion_keys)
from .ckpt.load import (LoadReport, check_variant, load_pretrained, load_weights, reinit_classifier_header_,
                        to_our_state_dict)

__all__ = ['StateDict', 'atomic_save', 'atomic_write', 'extract_state_dict', 'read_file', 'safe_load',
           'strip_prefixes', 'LAYOUT_NAMES', 'Checkpoint', 'compound_coef_candidates', 'describe_coef',
           'detect_layout', 'expected_signature', 'infer_compound_coef', 'infer_num_classes', 'num_parameters',
           'read_checkpoint', 'shape_signature', 'yet_another_fusion_keys', 'LoadReport', 'check_variant',
           'load_pretrained', 'load_weights', 'reinit_classifier_header_', 'to_our_state_dict']
