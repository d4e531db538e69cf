"""What a checkpoint holds: its key layout, the variant and class count its tensor shapes imply,
and :func:`read_checkpoint`, which reads a file (through :mod:`.files`) into a :class:`Checkpoint`.

The layouts themselves (which keys, how to convert) are adapters in :mod:`.layouts`, asked through
their registry: ``'ours'`` (this project = Yet-Another-EfficientDet-Pytorch's keys), ``'yet_another'``
(its D6+ files, recognisable by unused fusion weights), ``'effdet'`` (rwightman efficientdet-pytorch
``tf_efficientdet_*``) and ``'tf'`` (official TF variable names).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..config import Variant, get_config
from ..errors import UserError
from .files import (WRAPPER_KEYS, StateDict, drop_bench_buffers, read_file, strip_prefixes, training_info,
                    unwrap)
from .layouts import LAYOUTS, detect_layout, get_layout, layout_names
from .layouts.yet_another import FUSION_INPUTS as YET_ANOTHER_FUSION
from .layouts.yet_another import fusion_keys as yet_another_fusion_keys
from .signature import classes_from_bias
from .signature import describe_variants as describe_coef
from .signature import expected_signature, matching_variants
from .signature import shape_signature as _shape_signature

Source = Union[str, 'os.PathLike[str]', Mapping[str, Any]]

_BN_STATS = ('running_mean', 'running_var', 'num_batches_tracked', 'moving_mean', 'moving_variance')

__all__ = ['Checkpoint', 'read_checkpoint', 'check_variant', 'detect_layout', 'shape_signature', 'expected_signature',
           'compound_coef_candidates', 'infer_compound_coef', 'describe_coef', 'coef_flags', 'infer_num_classes',
           'num_parameters', 'yet_another_fusion_keys', 'YET_ANOTHER_FUSION', 'LAYOUT_NAMES', 'Source']


def _spec(sd: Mapping[str, Any], layout: Optional[str]):
    found = get_layout(layout or detect_layout(sd))
    return found.signature if found is not None else None


def shape_signature(sd: Mapping[str, Any], layout: Optional[str] = None) -> Dict[str, Optional[int]]:
    """Architecture features read from tensor shapes (None where the state_dict lacks them):
    fpn_channels, cells, head_repeats, levels, stem, blocks, backbone_out, and se (1 when the
    backbone blocks have squeeze-excitation: EfficientNet-B; 0 without: Lite)."""
    return _shape_signature(sd, _spec(sd, layout))


def compound_coef_candidates(sd: Mapping[str, Any], layout: Optional[str] = None) -> List[Variant]:
    """Every variant (0–8, 8 = D7x, then the Lite names) whose tensor shapes agree with ``sd``.
    D6 and D7 have identical shapes, so a D6/D7 file gives ``[6, 7]``; ``[]`` = no variant fits."""
    return matching_variants(sd, _spec(sd, layout))


def infer_compound_coef(sd: Mapping[str, Any], layout: Optional[str] = None) -> Optional[Variant]:
    """The compound coefficient implied by tensor shapes; None when no variant fits or several do
    (D6 and D7 are indistinguishable: use ``compound_coef_candidates``)."""
    cands = compound_coef_candidates(sd, layout)
    return cands[0] if len(cands) == 1 else None


def coef_flags(candidates: Sequence[Variant]) -> str:
    """``[6, 7]`` → '-c 6 or -c 7'."""
    return ' or '.join(f'-c {c}' for c in candidates)


def infer_num_classes(sd: Mapping[str, Any], num_anchors: int = 9, layout: Optional[str] = None) -> Optional[int]:
    """Class count from the classifier's last bias (num_anchors × num_classes channels); None if
    the state_dict has no classifier or its channel count is not a multiple of num_anchors."""
    found = get_layout(layout or detect_layout(sd))
    return classes_from_bias(sd, found.class_bias, num_anchors) if found is not None else None


def num_parameters(sd: Mapping[str, torch.Tensor]) -> int:
    """Learnable values in a state_dict (BN running statistics and counters excluded)."""
    return sum(int(v.numel()) for k, v in sd.items() if not k.rsplit('/', 1)[-1].rsplit('.', 1)[-1] in _BN_STATS)


@dataclass
class Checkpoint:
    """What a checkpoint file holds. ``state_dict`` is in the file's own ``layout``."""
    name: str
    state_dict: StateDict
    layout: str
    wrapper: List[str] = field(default_factory=list)   # keys unwrapped to reach the weights
    dropped: Dict[str, str] = field(default_factory=dict)  # key → why it was left out
    training: Optional[Dict[str, Any]] = None          # epoch/step/keys of a full training checkpoint

    @property
    def candidates(self) -> List[Variant]:
        return compound_coef_candidates(self.state_dict, self.layout)


def read_checkpoint(src: Source, name: Optional[str] = None) -> Checkpoint:
    """Read a ``.pth``/``.ckpt`` (weights_only), ``.npz`` (no pickles), ``.safetensors`` or an official
    TF checkpoint folder (with TensorFlow), or take an in-memory dict; unwrap it, drop effdet's
    bench anchor buffer (named in ``dropped``), strip prefixes, detect the layout."""
    if isinstance(src, (str, os.PathLike)):
        name = name or os.fspath(src)
        obj: Any = _read_path(os.fspath(src))
    else:
        obj, name = src, name or '<state_dict>'
    training = training_info(obj)
    got = unwrap(obj)
    if got is None:
        what = 'a training checkpoint without model weights' if training else 'no state_dict'
        raise UserError(f'{name}: holds {what} (expected a mapping of names to tensors, possibly under '
                        f'one of {", ".join(WRAPPER_KEYS)})')
    sd, wrapper = got
    sd, dropped = drop_bench_buffers(sd)
    sd = strip_prefixes(sd)
    layout = detect_layout(sd)
    if layout in LAYOUTS:
        sd = LAYOUTS[layout].clean(sd)
    return Checkpoint(name, sd, layout, wrapper, dropped, training)


def _read_path(path: str) -> Any:
    """What a checkpoint path holds: a folder or prefix only a layout can read (a TF checkpoint
    folder), else the one file through :func:`.files.read_file` (weights_only, no pickles)."""
    for layout in LAYOUTS.values():
        got = layout.read_path(path)
        if got is not None:
            return got
    return read_file(path)


def check_variant(ck: Checkpoint, variant) -> None:
    """UserError unless the file's tensor shapes fit ``variant``: 'FILE: this file is
    efficientdet-d0 (from its tensor shapes) but -c 1 (efficientdet-d1) was asked; pass -c 0'."""
    cands = ck.candidates
    if not cands:
        raise UserError(f'{ck.name}: its tensor shapes match no EfficientDet variant (D0-D7x, Lite0-Lite4); '
                        'is this an EfficientDet checkpoint? (python -m efficientdet.convert inspect FILE says more)')
    if variant not in cands:
        raise UserError(f'{ck.name}: this file is {describe_coef(cands)} (from its tensor shapes) but -c {variant} '
                        f'({get_config(variant).name}) was asked; pass {coef_flags(cands)}')


def __getattr__(name: str):  # LAYOUT_NAMES for code that read the constant: the registry as it stands now
    if name == 'LAYOUT_NAMES':
        return layout_names()
    raise AttributeError(name)
