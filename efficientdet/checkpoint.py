"""Checkpoints: safe reading (``weights_only``), atomic saving, unwrapping, recognising what a
file holds, exact loading (``load_weights``) and fine-tuning loads (``load_pretrained``).

Layouts understood (``detect_layout``):
- ``'ours'``: this project's keys, identical to Yet-Another-EfficientDet-Pytorch's
  (``backbone_net.model._blocks.0…``, ``bifpn.0.conv6_up…``, ``regressor…``, ``classifier…``);
- ``'effdet'``: rwightman efficientdet-pytorch ``tf_efficientdet_d*`` (``backbone.blocks.S.I…``,
  ``fpn.cell.C.fnode.N…``, ``class_net…``), converted on the fly by ``convert.effdet``;
- ``'tf'``: official TF variable names in an ``.npz`` (``efficientnet-b0/stem/conv2d/kernel`` …),
  converted on the fly by ``convert.tf``.
Nothing is ever unpickled beyond tensors: a file that needs arbitrary unpickling is refused.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .config import CONFIGS, EFFICIENTNET_PARAMS, EFFICIENTNET_STAGES, get_config, round_filters, round_repeats
from .errors import UserError

StateDict = Dict[str, torch.Tensor]
Source = Union[str, 'os.PathLike[str]', Mapping[str, Any]]

# Containers we unwrap, most preferred first (EMA weights are what the official evaluation uses).
_WRAPPER_KEYS = ('state_dict_ema', 'model_ema', 'ema', 'state_dict', 'model')
_PREFIXES = ('module.', 'model.')
# effdet's DetBenchTrain/DetBenchPredict keep the anchor boxes as a buffer next to ``model.*``.
_BENCH_BUFFERS = {'anchors.boxes': 'effdet DetBench anchor buffer: anchors are rebuilt from the config, '
                                   'never learned'}
_BN_STATS = ('running_mean', 'running_var', 'num_batches_tracked', 'moving_mean', 'moving_variance')
_YET_ANOTHER_FUSION = {'p6_w1': 2, 'p5_w1': 2, 'p4_w1': 2, 'p3_w1': 2,
                       'p4_w2': 3, 'p5_w2': 3, 'p6_w2': 3, 'p7_w2': 2}
LAYOUT_NAMES = {
    'ours': 'this project / Yet-Another-EfficientDet-Pytorch',
    'effdet': 'rwightman efficientdet-pytorch (effdet)',
    'tf': 'official TensorFlow variables (google/automl names)',
    'unknown': 'unknown',
}


# Inert classes allowed in weights_only loads: timm/effdet training checkpoints store their
# command-line ``args`` as an argparse.Namespace (rebuilt from a plain dict, runs no code).
_SAFE_GLOBALS = [argparse.Namespace]


# ---------------------------------------------------------------------------------------- raw I/O
def safe_load(path: str, map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)``; a file that would need arbitrary unpickling
    (it could run code) is refused with a UserError naming the file, never executed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint file')
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_GLOBALS):
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(str(e))
        if 'global' in detail:
            what = f'the file needs arbitrary unpickling, which could run code{detail}'
        else:
            what = (f'the file is not a tensors-only checkpoint{detail}: it may need arbitrary unpickling, '
                    'which could run code, or not be a checkpoint at all')
        raise UserError(f'{path}: refused to load: {what}. It was not executed. If you trust it, re-save it '
                        'as a plain state_dict of tensors.') from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{path}: not a readable PyTorch checkpoint ({msg})') from None


def _unpickling_detail(msg: str) -> str:
    """The useful part of torch's weights_only refusal, e.g. ' (Unsupported global: GLOBAL io.open)'."""
    msg = re.sub(r'\x1b\[[0-9;]*m', '', msg)
    m = re.search(r'(Unsupported [^\n]*?)(?: was not an allowed global|\n|$)', msg)
    return f' ({m.group(1).strip()[:160]})' if m else ''


def _read_npz(path: str) -> Dict[str, torch.Tensor]:
    """Arrays of an ``.npz`` (never unpickled: object arrays are refused) as tensors."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k], copy=True)) for k in z.files}  # keeps 0-d shapes
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f'{path}: not a readable .npz of arrays ({str(e).strip().splitlines()[0]})') from None


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temp file in the same folder (created with the usual
    0o666 & ~umask permissions), fsync, then rename over ``path``: a crash at any point leaves
    either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------- unwrapping
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, depth: int = 0) -> Optional[Tuple[StateDict, List[str]]]:
    """The flat name → tensor dict inside ``obj`` and the wrapper keys that led to it."""
    if _is_tensor_dict(obj):
        return dict(obj), []
    if not isinstance(obj, Mapping) or depth >= 3:
        return None
    for k in _WRAPPER_KEYS:
        inner = obj.get(k)
        if isinstance(inner, Mapping):
            got = _unwrap(inner, depth + 1)
            if got is not None:
                return got[0], [k] + got[1]
    return None


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove ``module.`` / ``model.`` prefixes shared by every key (repeatedly)."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _drop_bench_buffers(sd: StateDict) -> Tuple[StateDict, Dict[str, str]]:
    """effdet bench state_dicts: ``model.*`` plus ``anchors.boxes``; drop (and name) the buffer."""
    bare = {k: (k[len('module.'):] if k.startswith('module.') else k) for k in sd}
    bench = [k for k in sd if bare[k] in _BENCH_BUFFERS]
    rest = [k for k in sd if k not in bench]
    if not bench or not rest or not all(bare[k].startswith('model.') for k in rest):
        return sd, {}
    return {k: sd[k] for k in rest}, {k: _BENCH_BUFFERS[bare[k]] for k in bench}


def extract_state_dict(obj: Any, path: str = '<checkpoint>') -> StateDict:
    """Unwrap ``state_dict_ema`` / ``model_ema`` / ``ema`` / ``state_dict`` / ``model`` containers
    (EMA preferred) and strip ``module.`` / ``model.`` prefixes: a flat name → tensor dict."""
    got = _unwrap(obj)
    if got is None:
        raise UserError(f'{path}: does not hold a state_dict (a mapping of names to tensors)')
    return strip_prefixes(got[0])


# ---------------------------------------------------------------------------------------- recognising
def detect_layout(sd: Mapping[str, Any]) -> str:
    """``'ours'`` (this project = Yet-Another), ``'effdet'``, ``'tf'`` (official names) or ``'unknown'``."""
    keys = list(sd)
    if any('/' in k and k.split('/')[0].startswith(('efficientnet-b', 'fpn_cells', 'class_net', 'box_net',
                                                      'resample_p6')) for k in keys):
        return 'tf'
    if any(k.startswith(('backbone_net.', 'bifpn.', 'regressor.', 'classifier.')) for k in keys):
        return 'ours'
    if any(k.startswith(('backbone.conv_stem', 'backbone.blocks.', 'fpn.cell.', 'fpn.resample.',
                         'class_net.', 'box_net.')) for k in keys):
        return 'effdet'
    return 'unknown'


# Per layout: where each shape feature lives. Counts are over distinct regex groups.
_SIGNATURE_KEYS = {
    'ours': dict(
        fpn_channels=('shape0', r'regressor\.conv_list\.0\.pointwise_conv\.conv\.weight'),
        cells=('count', r'bifpn\.(\d+)\.'),
        head_repeats=('count', r'regressor\.conv_list\.(\d+)\.'),
        levels=('count', r'regressor\.bn_list\.(\d+)\.'),
        stem=('shape0', r'backbone_net\.model\._conv_stem\.conv\.weight'),
        blocks=('count', r'backbone_net\.model\._blocks\.(\d+)\.'),
        backbone_out=('last_shape0', r'backbone_net\.model\._blocks\.(\d+)\._project_conv\.conv\.weight'),
    ),
    'effdet': dict(
        fpn_channels=('shape0', r'box_net\.conv_rep\.0\.conv_pw\.weight'),
        cells=('count', r'fpn\.cell\.(\d+)\.'),
        head_repeats=('count', r'box_net\.conv_rep\.(\d+)\.'),
        levels=('count', r'box_net\.bn_rep\.0\.(\d+)\.'),
        stem=('shape0', r'backbone\.conv_stem\.weight'),
        blocks=('count', r'backbone\.blocks\.(\d+\.\d+)\.'),
        backbone_out=('last_shape0', r'backbone\.blocks\.(\d+\.\d+)\.conv_pwl?\.weight'),
    ),
    'tf': dict(
        fpn_channels=('shape-1', r'box_net/box-0/pointwise_kernel'),
        cells=('count', r'fpn_cells/cell_(\d+)/'),
        head_repeats=('count', r'box_net/box-(\d+)/'),
        levels=('count', r'box_net/box-0-bn-(\d+)/'),
        stem=('shape-1', r'efficientnet-b\d/stem/conv2d/kernel'),
        blocks=('count', r'efficientnet-b\d/blocks_(\d+)/'),
        backbone_out=('last_shape-1', r'efficientnet-b\d/blocks_(\d+)/conv2d(?:_1)?/kernel'),
    ),
}


def _sort_key(group: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in group.split('.'))


def shape_signature(sd: Mapping[str, Any], layout: Optional[str] = None) -> Dict[str, Optional[int]]:
    """Architecture features read from tensor shapes (None where the state_dict lacks them):
    fpn_channels, cells, head_repeats, levels, stem, blocks, backbone_out."""
    layout = layout or detect_layout(sd)
    spec = _SIGNATURE_KEYS.get(layout)
    out: Dict[str, Optional[int]] = {}
    if spec is None:
        return out
    keys = [k[:-2] if k.endswith(':0') else k for k in sd]
    shapes = {kk: tuple(sd[k].shape) for kk, k in zip(keys, sd)}
    for name, (how, pattern) in spec.items():
        rx = re.compile(pattern)
        if how.startswith('shape'):
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


def expected_signature(compound_coef: int) -> Dict[str, int]:
    """The ``shape_signature`` every state_dict of efficientdet-d{compound_coef} has."""
    cfg = get_config(compound_coef)
    p = EFFICIENTNET_PARAMS[cfg.backbone_coef]
    return dict(fpn_channels=cfg.fpn_num_filters, cells=cfg.fpn_cell_repeats, head_repeats=cfg.box_class_repeats,
                levels=len(cfg.levels), stem=round_filters(32, p.width),
                blocks=sum(round_repeats(s.repeats, p.depth) for s in EFFICIENTNET_STAGES),
                backbone_out=round_filters(EFFICIENTNET_STAGES[-1].out_ch, p.width))


def compound_coef_candidates(sd: Mapping[str, Any], layout: Optional[str] = None) -> List[int]:
    """Every compound coefficient (0–8, 8 = D7x) whose tensor shapes agree with ``sd``.
    D6 and D7 have identical shapes, so a D6/D7 file gives ``[6, 7]``; ``[]`` = no variant fits."""
    sig = {k: v for k, v in shape_signature(sd, layout).items() if v is not None}
    if not sig:
        return []
    return [c for c in sorted(CONFIGS) if all(expected_signature(c)[k] == v for k, v in sig.items())]


def infer_compound_coef(sd: Mapping[str, Any], layout: Optional[str] = None) -> Optional[int]:
    """The compound coefficient implied by tensor shapes; None when no variant fits or several do
    (D6 and D7 are indistinguishable: use ``compound_coef_candidates``)."""
    cands = compound_coef_candidates(sd, layout)
    return cands[0] if len(cands) == 1 else None


def describe_coef(candidates: Sequence[int]) -> str:
    """``[3]`` → 'efficientdet-d3'; ``[6, 7]`` → 'efficientdet-d6 or efficientdet-d7'."""
    if not candidates:
        return 'no known EfficientDet variant'
    return ' or '.join(CONFIGS[c].name for c in candidates)


def _coef_flags(candidates: Sequence[int]) -> str:
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


def yet_another_fusion_keys(compound_coef: int) -> Dict[str, Tuple[int, ...]]:
    """The BiFPN fusion weights Yet-Another-EfficientDet-Pytorch stores for every cell even when
    the variant (D6, D7, D7x) uses plain sum fusion, which never reads them: name → shape
    (19 values per cell, 152 for 8 cells)."""
    cfg = get_config(compound_coef)
    return {f'bifpn.{c}.{n}': (s,) for c in range(cfg.fpn_cell_repeats) for n, s in _YET_ANOTHER_FUSION.items()}


def _drop_unused_fusion(sd: StateDict, compound_coef: int) -> Tuple[StateDict, Dict[str, str]]:
    if get_config(compound_coef).fusion != 'sum':
        return sd, {}
    unused = yet_another_fusion_keys(compound_coef)
    reason = (f'Yet-Another BiFPN fusion weight: {CONFIGS[compound_coef].name} uses sum fusion, '
              'which never reads it')
    drop = {k: reason for k, v in sd.items() if k in unused and tuple(v.shape) == unused[k]}
    return {k: v for k, v in sd.items() if k not in drop}, drop


# ---------------------------------------------------------------------------------------- reading
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
    def candidates(self) -> List[int]:
        return compound_coef_candidates(self.state_dict, self.layout)


def _training_info(obj: Any) -> Optional[Dict[str, Any]]:
    if not isinstance(obj, Mapping) or not any(k in obj for k in ('model', 'state_dict')) \
            or not any(k in obj for k in ('optimizer', 'epoch', 'step')):
        return None  # ours: model, ema, optimizer, …; timm/effdet: state_dict, state_dict_ema, epoch, …

    def scalar(v):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.item()
        return v if isinstance(v, (int, float)) else None
    return {'epoch': scalar(obj.get('epoch')), 'step': scalar(obj.get('step')),
            'keys': [k for k in obj if isinstance(k, str)],
            'has_ema': any(isinstance(obj.get(k), Mapping) and _unwrap(obj.get(k)) is not None
                           for k in ('ema', 'state_dict_ema', 'model_ema'))}


def read_checkpoint(src: Source, name: Optional[str] = None) -> Checkpoint:
    """Read a ``.pth``/``.ckpt`` (weights_only) or ``.npz`` (no pickles), or take an in-memory
    dict; unwrap it, drop effdet's bench anchor buffer (named in ``dropped``), strip prefixes."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        name = name or path
        if not os.path.isfile(path):
            raise UserError(f'{path}: no such checkpoint file')
        obj: Any = _read_npz(path) if path.endswith('.npz') else safe_load(path)
    else:
        obj, name = src, name or '<state_dict>'
    training = _training_info(obj)
    got = _unwrap(obj)
    if got is None:
        what = 'a training checkpoint without model weights' if training else 'no state_dict'
        raise UserError(f'{name}: holds {what} (expected a mapping of names to tensors, possibly under '
                        f'one of {", ".join(_WRAPPER_KEYS)})')
    sd, wrapper = got
    sd, dropped = _drop_bench_buffers(sd)
    sd = strip_prefixes(sd)
    if detect_layout(sd) == 'tf':
        sd = {k[:-2] if k.endswith(':0') else k: v for k, v in sd.items()}
    return Checkpoint(name, sd, detect_layout(sd), wrapper, dropped, training)


def _as_checkpoint(src: Union[Source, Checkpoint]) -> Checkpoint:
    return src if isinstance(src, Checkpoint) else read_checkpoint(src)


def to_our_state_dict(ck: Checkpoint, compound_coef: int) -> Tuple[StateDict, Dict[str, str]]:
    """The checkpoint's weights under this project's keys for efficientdet-d{compound_coef}, and the
    keys that were left out on purpose (key → reason): effdet's anchor buffer, Yet-Another's unused
    sum-fusion weights. Conversions are strict: any other unmapped key is an error."""
    dropped = dict(ck.dropped)
    if ck.layout == 'ours':
        sd = dict(ck.state_dict)
    elif ck.layout in ('effdet', 'tf'):
        from .convert.tf import ConversionError
        try:
            if ck.layout == 'effdet':
                from .convert.effdet import effdet_to_state_dict
                sd = effdet_to_state_dict(ck.state_dict, compound_coef)
            else:
                from .convert.tf import tf_to_state_dict
                sd = tf_to_state_dict({k: v.float().numpy() for k, v in ck.state_dict.items()}, compound_coef)
        except ConversionError as e:
            raise UserError(f'{ck.name}: {" ".join(str(e).split())}') from None
    else:
        raise UserError(f'{ck.name}: not an EfficientDet checkpoint (keys such as '
                        f'{", ".join(list(ck.state_dict)[:3])} match no known layout)')
    sd, fusion = _drop_unused_fusion(sd, compound_coef)
    dropped.update(fusion)
    return sd, dropped


# ---------------------------------------------------------------------------------------- loading
def _compact(keys: Sequence[str], limit: int = 6) -> str:
    """``['a.b.weight', 'a.b.bias']`` → ``'a.b.{weight,bias}'``; long lists are cut with a count."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        head, _, tail = k.rpartition('.')
        groups.setdefault(head, []).append(tail)
    parts = [(f'{h}.{{{",".join(t)}}}' if len(t) > 1 else (f'{h}.{t[0]}' if h else t[0])) for h, t in groups.items()]
    if len(parts) > limit:
        parts = parts[:limit] + [f'… ({len(keys)} keys in all)']
    return ', '.join(parts)


def _summarise_dropped(dropped: Mapping[str, str]) -> str:
    by_reason: Dict[str, List[str]] = {}
    for k, r in dropped.items():
        by_reason.setdefault(r, []).append(k)
    out = []
    for reason, keys in by_reason.items():
        if reason.startswith('Yet-Another BiFPN fusion weight'):
            values = sum(_YET_ANOTHER_FUSION.get(k.rsplit('.', 1)[-1], 0) for k in keys)
            out.append(f'dropped {len(keys)} Yet-Another BiFPN fusion weights bifpn.*.p{{3..7}}_w{{1,2}} '
                       f'({values} values; {reason.split(": ", 1)[1]})')
        else:
            out.append(f'dropped {_compact(keys)} ({reason})')
    return '; '.join(out)


def _num_anchors(model: nn.Module) -> int:
    ratios, scales = getattr(model, 'aspect_ratios', None), getattr(model, 'scales', None)
    if ratios is not None and scales is not None:
        return len(ratios) * len(scales)
    return 9


def _check_coefficient(model: nn.Module, ck: Checkpoint, purpose: str) -> None:
    coef = int(getattr(model, 'compound_coef'))
    cands = ck.candidates
    if not cands:
        raise UserError(f'{ck.name}: its tensor shapes match no EfficientDet variant (D0-D7x); '
                        'is this an EfficientDet checkpoint?')
    if coef not in cands:
        raise UserError(f'{ck.name}: file holds {describe_coef(cands)} weights (inferred from tensor shapes) '
                        f'but -c {coef} ({CONFIGS[coef].name}) was asked; {purpose} needs the same compound '
                        f'coefficient: pass {_coef_flags(cands)}, or use {CONFIGS[coef].name} weights')


def _file_anchors(sd: Mapping[str, torch.Tensor], default: int) -> int:
    """Anchors per location of a state_dict (from the box head's last bias: anchors × 4)."""
    t = sd.get(_BOX_BIAS)
    return int(t.shape[0]) // 4 if t is not None and t.dim() == 1 and t.shape[0] % 4 == 0 else default


def _header_reason(key: str, file_shape: Sequence[int], model_shape: Sequence[int], file_anchors: int,
                   model_anchors: int) -> str:
    """Why a tensor of the file does not fit the model, in words (classes / anchors when it can)."""
    fo, mo = int(file_shape[0]), int(model_shape[0])
    if key.startswith('classifier.header.pointwise_conv') and fo % file_anchors == 0 and mo % model_anchors == 0:
        if file_anchors == model_anchors:
            return f'shape: {fo // file_anchors} classes in file, {mo // model_anchors} in model'
        return (f'shape: {fo // file_anchors} classes x {file_anchors} anchors in file, '
                f'{mo // model_anchors} classes x {model_anchors} anchors in model')
    if key.startswith('regressor.header.pointwise_conv') and fo % 4 == 0 and mo % 4 == 0:
        return f'shape: {fo // 4} anchors per location in file, {mo // 4} in model'
    return f'shape: {list(file_shape)} in file, {list(model_shape)} in model'


@dataclass
class LoadReport:
    """What a load did. ``str(report)`` is the one-line summary that is printed."""
    source: str
    mode: str                      # 'exact' (load_weights) or 'fine-tune' (load_pretrained)
    file_holds: str                # e.g. 'efficientdet-d0, 90 classes (effdet layout)'
    loaded: List[str] = field(default_factory=list)
    total: int = 0                 # tensors in the model's state_dict
    skipped: Dict[str, str] = field(default_factory=dict)   # key → reason (kept the model's init)
    dropped: Dict[str, str] = field(default_factory=dict)   # file key → reason (not used on purpose)
    reinitialized: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f'{self.mode} load: {len(self.loaded)}/{self.total} tensors from {self.source} ({self.file_holds})']
        if self.skipped:
            by_reason: Dict[str, List[str]] = {}
            for k, r in self.skipped.items():
                by_reason.setdefault(r, []).append(k)
            parts.append(f'skipped {len(self.skipped)} keys: '
                         + '; '.join(f'{_compact(ks)} ({r})' for r, ks in by_reason.items()))
        if self.dropped:
            parts.append(_summarise_dropped(self.dropped))
        if self.reinitialized:
            parts.append(f're-initialised {", ".join(self.reinitialized)}')
        return '; '.join(parts)


def _holds(ck: Checkpoint, sd: Mapping[str, torch.Tensor], file_anchors: int) -> str:
    """'efficientdet-d0, 90 classes, effdet layout' for the report line."""
    n = infer_num_classes(sd, file_anchors, 'ours')
    cls = f', {n} classes' if n is not None else ''
    how = {'ours': 'this project / Yet-Another keys', 'effdet': 'converted from effdet keys',
           'tf': 'converted from official TF names'}.get(ck.layout, ck.layout)
    return f'{describe_coef(ck.candidates)}{cls}, {how}'


def load_weights(model: nn.Module, path_or_state_dict: Union[Source, Checkpoint], strict: bool = True,
                 verbose: bool = True) -> LoadReport:
    """Exact loading (inference, evaluation, resuming): every model tensor must come from the file.

    Reads safely, unwraps, converts effdet / official-TF layouts, drops only Yet-Another's unused
    sum-fusion weights (and effdet's anchor buffer), then refuses with a UserError when the file's
    compound coefficient (from tensor shapes) or class count differs from the model's."""
    ck = _as_checkpoint(path_or_state_dict)
    coef = int(getattr(model, 'compound_coef'))
    anchors = _num_anchors(model)
    _check_coefficient(model, ck, 'exact loading')
    sd, dropped = to_our_state_dict(ck, coef)
    own = model.state_dict()
    file_anchors = _file_anchors(sd, anchors)
    report = LoadReport(ck.name, 'exact', _holds(ck, sd, file_anchors), total=len(own), dropped=dropped)
    if file_anchors != anchors:
        raise UserError(f'{ck.name}: file has {file_anchors} anchors per location but the model {anchors} '
                        '(len(ratios) x len(scales)); build the model with the ratios/scales the weights were '
                        'trained with (projects/*.yml anchors_ratios / anchors_scales), or fine-tune with '
                        'load_pretrained()')
    if _CLS_BIAS in sd and _CLS_BIAS in own and sd[_CLS_BIAS].shape != own[_CLS_BIAS].shape:
        n_file = sd[_CLS_BIAS].shape[0] // anchors
        n_model = own[_CLS_BIAS].shape[0] // anchors
        raise UserError(
            f'{ck.name}: file holds weights for {n_file} classes but the model has {n_model} '
            f'(num_classes={n_model}); to fine-tune these weights on {n_model} classes load them with '
            f'load_pretrained() (train.py -w {ck.name}), or build the model with num_classes={n_file}')
    bad = [f'{k} {list(v.shape)} vs {list(own[k].shape)}' for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise UserError(f'{ck.name}: {len(bad)} tensors have the wrong shape for {CONFIGS[coef].name}: '
                        + ', '.join(bad[:5]) + (' …' if len(bad) > 5 else ''))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        msg = []
        if missing:
            msg.append(f'{len(missing)} model tensors missing from the file: {_compact(missing)}')
        if unexpected:
            msg.append(f'{len(unexpected)} file tensors the model does not have: {_compact(unexpected)}')
        raise UserError(f'{ck.name}: cannot load exactly into {CONFIGS[coef].name}: ' + '; '.join(msg)
                        + ' (use load_pretrained() to load only what fits)')
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=strict)
    report.loaded = [k for k in own if k in sd]
    report.skipped = {k: 'not in file' for k in missing}
    report.skipped.update({k: 'not in model' for k in unexpected})
    if verbose and (report.dropped or report.skipped or ck.layout != 'ours'):
        print(report)
    return report


def reinit_classifier_header_(model: nn.Module, prior: float = 0.01) -> List[str]:
    """Official initialisation of the classifier's last (pointwise) conv: variance scaling weight,
    bias -log((1 - prior) / prior) so every initial score equals ``prior``. Returns its name."""
    from .head import variance_scaling_
    conv = model.classifier.header.pointwise_conv.conv
    variance_scaling_(conv.weight)
    with torch.no_grad():
        conv.bias.fill_(-math.log((1 - prior) / prior))
    return [f'classifier.header.pointwise_conv (focal-loss prior {prior:g})']


def load_pretrained(model: nn.Module, path: Union[Source, Checkpoint], verbose: bool = True,
                    prior: float = 0.01) -> LoadReport:
    """Fine-tuning load: every tensor whose name and shape fit is loaded; the rest keep the model's
    initialisation, and the classifier's last layer is re-initialised with the focal-loss prior when
    it did not fit (another class count). Prints ONE line saying what was loaded and what was
    skipped and why. A checkpoint of another compound coefficient is refused (UserError)."""
    ck = _as_checkpoint(path)
    coef = int(getattr(model, 'compound_coef'))
    anchors = _num_anchors(model)
    _check_coefficient(model, ck, 'fine-tuning')
    sd, dropped = to_our_state_dict(ck, coef)
    own = model.state_dict()
    file_anchors = _file_anchors(sd, anchors)
    report = LoadReport(ck.name, 'fine-tune', _holds(ck, sd, file_anchors), total=len(own), dropped=dropped)
    fit: StateDict = {}
    for k, v in sd.items():
        if k not in own:
            report.skipped[k] = 'not in model'
        elif v.shape != own[k].shape:
            report.skipped[k] = _header_reason(k, v.shape, own[k].shape, file_anchors, anchors)
        else:
            fit[k] = v
    for k in own:
        if k not in sd:
            report.skipped[k] = 'not in file'
    if not fit:
        raise UserError(f'{ck.name}: no tensor of the file fits {CONFIGS[coef].name}; nothing to fine-tune from')
    model.load_state_dict(fit, strict=False)
    report.loaded = [k for k in own if k in fit]
    if any(k in report.skipped for k in (_CLS_WEIGHT, _CLS_BIAS)) and hasattr(model, 'classifier'):
        report.reinitialized = reinit_classifier_header_(model, prior)
    if verbose:
        print(report)
    return report
