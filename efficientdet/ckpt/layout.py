"""What a checkpoint holds: its key layout, the variant and class count its tensor shapes imply,
and :func:`read_checkpoint`, which reads a file (through :mod:`.files`) into a :class:`Checkpoint`.

Layouts understood (:func:`detect_layout`):
- ``'ours'``: this project's keys, identical to Yet-Another-EfficientDet-Pytorch's
  (``backbone_net.model._blocks.0…``, ``bifpn.0.conv6_up…``, ``regressor…``, ``classifier…``);
- ``'effdet'``: rwightman efficientdet-pytorch ``tf_efficientdet_d*`` (``backbone.blocks.S.I…``,
  ``fpn.cell.C.fnode.N…``, ``class_net…``);
- ``'tf'``: official TF variable names in an ``.npz`` (``efficientnet-b0/stem/conv2d/kernel`` …).
Converting the last two to this project's keys is :mod:`efficientdet.convert`, one layer up.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..config import VARIANTS, Variant, get_config, stem_channels
from ..errors import UserError
from .files import (WRAPPER_KEYS, StateDict, drop_bench_buffers, read_file, strip_prefixes, training_info,
                    unwrap)

Source = Union[str, 'os.PathLike[str]', Mapping[str, Any]]

_BN_STATS = ('running_mean', 'running_var', 'num_batches_tracked', 'moving_mean', 'moving_variance')
YET_ANOTHER_FUSION = {'p6_w1': 2, 'p5_w1': 2, 'p4_w1': 2, 'p3_w1': 2,
                      'p4_w2': 3, 'p5_w2': 3, 'p6_w2': 3, 'p7_w2': 2}
LAYOUT_NAMES = {
    'ours': 'this project / Yet-Another-EfficientDet-Pytorch',
    'effdet': 'rwightman efficientdet-pytorch (effdet)',
    'tf': 'official TensorFlow variables (google/automl names)',
    'unknown': 'unknown',
}


def detect_layout(sd: Mapping[str, Any]) -> str:
    """``'ours'`` (this project = Yet-Another), ``'effdet'``, ``'tf'`` (official names) or ``'unknown'``."""
    keys = list(sd)
    if any('/' in k and k.split('/')[0].startswith(('efficientnet-', 'fpn_cells', 'class_net', 'box_net',
                                                      'resample_p6')) for k in keys):
        return 'tf'
    if any(k.startswith(('backbone_net.', 'bifpn.', 'regressor.', 'classifier.')) for k in keys):
        return 'ours'
    if any(k.startswith(('backbone.conv_stem', 'backbone.blocks.', 'fpn.cell.', 'fpn.resample.',
                         'class_net.', 'box_net.')) for k in keys):
        return 'effdet'
    return 'unknown'


# Per layout: where each shape feature lives. Counts are over distinct regex groups; a flag is 1
# when its second pattern matches a key, 0 when only the first does, None when neither.
_SIGNATURE_KEYS = {
    'ours': dict(
        fpn_channels=('shape0', r'regressor\.conv_list\.0\.pointwise_conv\.conv\.weight'),
        cells=('count', r'bifpn\.(\d+)\.'),
        head_repeats=('count', r'regressor\.conv_list\.(\d+)\.'),
        levels=('count', r'regressor\.bn_list\.(\d+)\.'),
        stem=('shape0', r'backbone_net\.model\._conv_stem\.conv\.weight'),
        blocks=('count', r'backbone_net\.model\._blocks\.(\d+)\.'),
        backbone_out=('last_shape0', r'backbone_net\.model\._blocks\.(\d+)\._project_conv\.conv\.weight'),
        se=('flag', r'backbone_net\.model\._blocks\.\d+\.', r'backbone_net\.model\._blocks\.\d+\._se_reduce\.'),
    ),
    'effdet': dict(
        fpn_channels=('shape0', r'box_net\.conv_rep\.0\.conv_pw\.weight'),
        cells=('count', r'fpn\.cell\.(\d+)\.'),
        head_repeats=('count', r'box_net\.conv_rep\.(\d+)\.'),
        levels=('count', r'box_net\.bn_rep\.0\.(\d+)\.'),
        stem=('shape0', r'backbone\.conv_stem\.weight'),
        blocks=('count', r'backbone\.blocks\.(\d+\.\d+)\.'),
        backbone_out=('last_shape0', r'backbone\.blocks\.(\d+\.\d+)\.conv_pwl?\.weight'),
        se=('flag', r'backbone\.blocks\.\d+\.\d+\.', r'backbone\.blocks\.\d+\.\d+\.se\.'),
    ),
    'tf': dict(
        fpn_channels=('shape-1', r'box_net/box-0/pointwise_kernel'),
        cells=('count', r'fpn_cells/cell_(\d+)/'),
        head_repeats=('count', r'box_net/box-(\d+)/'),
        levels=('count', r'box_net/box-0-bn-(\d+)/'),
        stem=('shape-1', r'efficientnet-[a-z]+\d/stem/conv2d/kernel'),
        blocks=('count', r'efficientnet-[a-z]+\d/blocks_(\d+)/'),
        backbone_out=('last_shape-1', r'efficientnet-[a-z]+\d/blocks_(\d+)/conv2d(?:_1)?/kernel'),
        se=('flag', r'efficientnet-[a-z]+\d/blocks_\d+/', r'efficientnet-[a-z]+\d/blocks_\d+/se/'),
    ),
}


def _sort_key(group: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in group.split('.'))


def shape_signature(sd: Mapping[str, Any], layout: Optional[str] = None) -> Dict[str, Optional[int]]:
    """Architecture features read from tensor shapes (None where the state_dict lacks them):
    fpn_channels, cells, head_repeats, levels, stem, blocks, backbone_out, and se (1 when the
    backbone blocks have squeeze-excitation: EfficientNet-B; 0 without: Lite)."""
    layout = layout or detect_layout(sd)
    spec = _SIGNATURE_KEYS.get(layout)
    out: Dict[str, Optional[int]] = {}
    if spec is None:
        return out
    keys = [k[:-2] if k.endswith(':0') else k for k in sd]
    shapes = {kk: tuple(sd[k].shape) for kk, k in zip(keys, sd)}
    for name, (how, pattern, *more) in spec.items():
        rx = re.compile(pattern)
        if how == 'flag':  # pattern: the keys that must exist; more[0]: the feature's keys
            feature = re.compile(more[0])
            present = any(rx.match(k) for k in keys)
            out[name] = int(any(feature.match(k) for k in keys)) if present else None
        elif how.startswith('shape'):
            hit = next((k for k in keys if rx.fullmatch(k)), None)
            out[name] = None if hit is None or not shapes[hit] else int(shapes[hit][0 if how == 'shape0' else -1])
        elif how == 'count':
            groups = {m.group(1) for m in (rx.match(k) for k in keys) if m}
            out[name] = len(groups) or None
        else:  # last_shape*: shape of the highest-numbered match
            hits = [(m.group(1), k) for m, k in ((rx.fullmatch(k), k) for k in keys) if m]
            if hits:
                # the project conv of a block is conv2d_1 when it expands; take the highest name
                last_idx = max(_sort_key(g) for g, _ in hits)
                cands = sorted(k for g, k in hits if _sort_key(g) == last_idx)
                shape = shapes[cands[-1]]
                out[name] = int(shape[0 if how == 'last_shape0' else -1])
            else:
                out[name] = None
    return out


def expected_signature(variant: Variant) -> Dict[str, int]:
    """The ``shape_signature`` every state_dict of ``variant`` (0-8 or a Lite name) has."""
    cfg = get_config(variant)
    stages = cfg.backbone_stages
    return dict(fpn_channels=cfg.fpn_num_filters, cells=cfg.fpn_cell_repeats, head_repeats=cfg.box_class_repeats,
                levels=len(cfg.levels), stem=stem_channels(cfg.backbone), blocks=sum(s.repeats for s in stages),
                backbone_out=stages[-1].out_ch, se=int(stages[0].se_ratio is not None))


def compound_coef_candidates(sd: Mapping[str, Any], layout: Optional[str] = None) -> List[Variant]:
    """Every variant (0–8, 8 = D7x, then the Lite names) whose tensor shapes agree with ``sd``.
    D6 and D7 have identical shapes, so a D6/D7 file gives ``[6, 7]``; ``[]`` = no variant fits."""
    sig = {k: v for k, v in shape_signature(sd, layout).items() if v is not None}
    if not sig:
        return []
    return [c for c in VARIANTS if all(expected_signature(c)[k] == v for k, v in sig.items())]


def infer_compound_coef(sd: Mapping[str, Any], layout: Optional[str] = None) -> Optional[Variant]:
    """The compound coefficient implied by tensor shapes; None when no variant fits or several do
    (D6 and D7 are indistinguishable: use ``compound_coef_candidates``)."""
    cands = compound_coef_candidates(sd, layout)
    return cands[0] if len(cands) == 1 else None


def describe_coef(candidates: Sequence[Variant]) -> str:
    """``[3]`` → 'efficientdet-d3'; ``[6, 7]`` → 'efficientdet-d6 or efficientdet-d7'."""
    if not candidates:
        return 'no known EfficientDet variant'
    return ' or '.join(get_config(c).name for c in candidates)


def coef_flags(candidates: Sequence[Variant]) -> str:
    """``[6, 7]`` → '-c 6 or -c 7'."""
    return ' or '.join(f'-c {c}' for c in candidates)


_HEADER_KEYS = {  # the classifier's last bias, per layout
    'ours': 'classifier.header.pointwise_conv.conv.bias',
    'effdet': 'class_net.predict.conv_pw.bias',
    'tf': 'class_net/class-predict/bias',
}
_CLS_BIAS = 'classifier.header.pointwise_conv.conv.bias'
_CLS_WEIGHT = 'classifier.header.pointwise_conv.conv.weight'
_BOX_BIAS = 'regressor.header.pointwise_conv.conv.bias'


def infer_num_classes(sd: Mapping[str, Any], num_anchors: int = 9, layout: Optional[str] = None) -> Optional[int]:
    """Class count from the classifier's last bias (num_anchors × num_classes channels); None if
    the state_dict has no classifier or its channel count is not a multiple of num_anchors."""
    layout = layout or detect_layout(sd)
    key = _HEADER_KEYS.get(layout)
    if key is None:
        return None
    t = sd.get(key, sd.get(key + ':0'))
    if t is None or t.dim() != 1 or t.shape[0] % num_anchors:
        return None
    return int(t.shape[0]) // num_anchors


def num_parameters(sd: Mapping[str, torch.Tensor]) -> int:
    """Learnable values in a state_dict (BN running statistics and counters excluded)."""
    return sum(int(v.numel()) for k, v in sd.items() if not k.rsplit('/', 1)[-1].rsplit('.', 1)[-1] in _BN_STATS)


def yet_another_fusion_keys(compound_coef: Variant) -> Dict[str, Tuple[int, ...]]:
    """The BiFPN fusion weights Yet-Another-EfficientDet-Pytorch stores for every cell even when
    the variant (D6, D7, D7x) uses plain sum fusion, which never reads them: name → shape
    (19 values per cell, 152 for 8 cells)."""
    cfg = get_config(compound_coef)
    return {f'bifpn.{c}.{n}': (s,) for c in range(cfg.fpn_cell_repeats) for n, s in YET_ANOTHER_FUSION.items()}


def drop_unused_fusion(sd: StateDict, compound_coef: Variant) -> Tuple[StateDict, Dict[str, str]]:
    if get_config(compound_coef).fusion != 'sum':
        return sd, {}
    unused = yet_another_fusion_keys(compound_coef)
    reason = (f'Yet-Another BiFPN fusion weight: {get_config(compound_coef).name} uses sum fusion, '
              'which never reads it')
    drop = {k: reason for k, v in sd.items() if k in unused and tuple(v.shape) == unused[k]}
    return {k: v for k, v in sd.items() if k not in drop}, drop


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
    """Read a ``.pth``/``.ckpt`` (weights_only) or ``.npz`` (no pickles), or take an in-memory
    dict; unwrap it, drop effdet's bench anchor buffer (named in ``dropped``), strip prefixes."""
    if isinstance(src, (str, os.PathLike)):
        name = name or os.fspath(src)
        obj: Any = read_file(src)
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
    if detect_layout(sd) == 'tf':
        sd = {k[:-2] if k.endswith(':0') else k: v for k, v in sd.items()}
    return Checkpoint(name, sd, detect_layout(sd), wrapper, dropped, training)


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
