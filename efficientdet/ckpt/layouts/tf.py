"""Official TensorFlow (google/automl) variables: recognising them, reading them (``.npz`` without
pickles, or a checkpoint folder when TensorFlow is installed), and mapping them to this project's
state_dict (and back, :func:`export_tf_names`).

Input: a mapping of official variable name → array in TF layout (conv HWIO, depthwise HWC1,
separable conv as depthwise_kernel + pointwise_kernel, BN gamma/beta/moving_*, fusion ``WSM*``).
The mapping is built from our module structure, so every model variable must be found and every
input variable must be used: anything else is an error that lists the names.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ...config import Variant, get_config
from ...model import EfficientDetBackbone
from ...errors import UserError
from ..files import StateDict
from ..signature import classes_from_bias
from . import CheckpointView, ConversionError, Layout, register_layout

SCOPES = ('efficientnet-', 'fpn_cells', 'class_net', 'box_net', 'resample_p6')
SIGNATURE = dict(
    fpn_channels=('shape-1', r'box_net/box-0/pointwise_kernel'),
    cells=('count', r'fpn_cells/cell_(\d+)/'),
    head_repeats=('count', r'box_net/box-(\d+)/'),
    levels=('count', r'box_net/box-0-bn-(\d+)/'),
    stem=('shape-1', r'efficientnet-[a-z]+\d/stem/conv2d/kernel'),
    blocks=('count', r'efficientnet-[a-z]+\d/blocks_(\d+)/'),
    backbone_out=('last_shape-1', r'efficientnet-[a-z]+\d/blocks_(\d+)/conv2d(?:_1)?/kernel'),
    se=('flag', r'efficientnet-[a-z]+\d/blocks_\d+/', r'efficientnet-[a-z]+\d/blocks_\d+/se/'),
)

Array = np.ndarray
# TF training bookkeeping that is not part of the model (checkpoint directories only).
_NON_MODEL_SUFFIXES = ('/Momentum', '/RMSProp', '/RMSProp_1', '/Adam', '/Adam_1')
_NON_MODEL_NAMES = ('global_step',)


def _conv(k: Array) -> Array:  # HWIO -> OIHW (also pointwise 1x1xIxO)
    return np.transpose(k, (3, 2, 0, 1))


def _depthwise(k: Array) -> Array:  # HWC1 -> C1HW
    return np.transpose(k, (2, 3, 0, 1))


def _same(v: Array) -> Array:
    return v


def _strip(name: str) -> str:
    return name[:-2] if name.endswith(':0') else name


_INVERSE = {_conv: lambda k: np.transpose(k, (2, 3, 1, 0)), _depthwise: _depthwise, _same: _same}


class Mapper:
    """Walks the model's variables once; imports TF arrays, or (``export_from``) writes them."""

    def __init__(self, tf_vars: Mapping[str, Array], export_from: Dict[str, torch.Tensor] | None = None):
        self.tf = {_strip(k): np.asarray(v) for k, v in tf_vars.items()}
        self.used: set = set()
        self.missing: List[str] = []
        self.out: Dict[str, torch.Tensor] = {}
        self.export_from = export_from

    def take(self, key: str, names: Tuple[str, ...], fn: Callable[[Array], Array] = _same):
        if self.export_from is not None:
            self.tf[names[0]] = _INVERSE[fn](self.export_from[key].detach().float().numpy())
            return
        for n in names:
            if n in self.tf:
                self.used.add(n)
                self.out[key] = torch.from_numpy(np.ascontiguousarray(fn(self.tf[n]))).float()
                return
        self.missing.append(f'{names[0]} (for {key})')

    def bn(self, key: str, tf_prefix: str, alt_prefix: str | None = None):
        for ours, theirs in (('weight', 'gamma'), ('bias', 'beta'), ('running_mean', 'moving_mean'),
                             ('running_var', 'moving_variance')):
            names = (f'{tf_prefix}/{theirs}',) + ((f'{alt_prefix}/{theirs}',) if alt_prefix else ())
            self.take(f'{key}.{ours}', names)
        self.out[f'{key}.num_batches_tracked'] = torch.tensor(0, dtype=torch.long)

    def separable(self, key: str, tf_prefix: str):
        self.take(f'{key}.depthwise_conv.conv.weight', (f'{tf_prefix}/depthwise_kernel',), _depthwise)
        self.take(f'{key}.pointwise_conv.conv.weight', (f'{tf_prefix}/pointwise_kernel',), _conv)
        self.take(f'{key}.pointwise_conv.conv.bias', (f'{tf_prefix}/bias',))

    def conv_bias(self, key: str, tf_prefix: str):
        self.take(f'{key}.conv.weight', (f'{tf_prefix}/kernel',), _conv)
        self.take(f'{key}.conv.bias', (f'{tf_prefix}/bias',))


def _bn_names(prefix: str, idx: int) -> Tuple[str, str]:
    suffix = '' if idx == 0 else f'_{idx}'
    return f'{prefix}/tpu_batch_normalization{suffix}', f'{prefix}/batch_normalization{suffix}'


def map_backbone(m: Mapper, model: EfficientDetBackbone) -> None:
    name = model.config.backbone  # official scope: 'efficientnet-b0', 'efficientnet-lite0' …
    ours = 'backbone_net.model'
    m.take(f'{ours}._conv_stem.conv.weight', (f'{name}/stem/conv2d/kernel',), _conv)
    m.bn(f'{ours}._bn0', *_bn_names(f'{name}/stem', 0))
    for i, block in enumerate(model.backbone_net.model._blocks):
        tf_b, key = f'{name}/blocks_{i}', f'{ours}._blocks.{i}'
        bn_idx = 0
        if block.expand:
            m.take(f'{key}._expand_conv.conv.weight', (f'{tf_b}/conv2d/kernel',), _conv)
            m.bn(f'{key}._bn0', *_bn_names(tf_b, 0))
            bn_idx = 1
        m.take(f'{key}._depthwise_conv.conv.weight', (f'{tf_b}/depthwise_conv2d/depthwise_kernel',), _depthwise)
        m.bn(f'{key}._bn1', *_bn_names(tf_b, bn_idx))
        if block.has_se:  # Lite backbones have none
            m.conv_bias(f'{key}._se_reduce', f'{tf_b}/se/conv2d')
            m.conv_bias(f'{key}._se_expand', f'{tf_b}/se/conv2d_1')
        project = 'conv2d_1' if block.expand else 'conv2d'
        m.take(f'{key}._project_conv.conv.weight', (f'{tf_b}/{project}/kernel',), _conv)
        m.bn(f'{key}._bn2', *_bn_names(tf_b, bn_idx + 1))


def bifpn_nodes(levels: List[int]) -> List[Tuple[str, int]]:
    """Official node order: [('up', L) for L top-1 … min] + [('down', L) for L min+1 … top]."""
    return [('up', lvl) for lvl in reversed(levels[:-1])] + [('down', lvl) for lvl in levels[1:]]


def _map_bifpn(m: Mapper, model: EfficientDetBackbone) -> None:
    cfg = model.config
    levels = cfg.levels
    n_levels = len(levels)
    m.conv_bias('bifpn.0.p5_to_p6.0', 'resample_p6/conv2d')
    m.bn('bifpn.0.p5_to_p6.1', 'resample_p6/bn')
    for c in range(cfg.fpn_cell_repeats):
        for n, (kind, lvl) in enumerate(bifpn_nodes(levels)):
            tf_node = f'fpn_cells/cell_{c}/fnode{n}'
            op = f'{tf_node}/op_after_combine{n_levels + n}'
            key = f'bifpn.{c}.conv{lvl}_{kind}'
            m.separable(key, f'{op}/conv')
            m.bn(f'{key}.bn', f'{op}/bn')
            n_inputs = 2 if (kind == 'up' or lvl == levels[-1]) else 3
            if cfg.fusion == 'fast':
                names = [f'{tf_node}/WSM'] + [f'{tf_node}/WSM_{i}' for i in range(1, n_inputs)]
                if m.export_from is not None:
                    w = m.export_from[f'bifpn.{c}.p{lvl}_w{1 if kind == "up" else 2}']
                    m.tf.update({nm: w[i].detach().numpy().astype(np.float32).reshape(()) for i, nm in enumerate(names)})
                vals = []
                for nm in names:
                    if nm in m.tf:
                        m.used.add(nm)
                        vals.append(float(np.asarray(m.tf[nm]).reshape(())))
                    elif m.export_from is None:
                        m.missing.append(f'{nm} (for bifpn.{c}.p{lvl}_w{1 if kind == "up" else 2})')
                if m.export_from is None and len(vals) == n_inputs:
                    m.out[f'bifpn.{c}.p{lvl}_w{1 if kind == "up" else 2}'] = torch.tensor(vals, dtype=torch.float32)
            if c == 0 and lvl <= 5 and (kind == 'up' or lvl >= 4):
                # the raw backbone input of this node needs a channel-adjusting resample
                down = f'p{lvl}_down_channel' + ('' if kind == 'up' else '_2')
                res = f'{tf_node}/resample_0_{lvl - levels[0]}_{n_levels + n}'
                m.conv_bias(f'bifpn.0.{down}.0', f'{res}/conv2d')
                m.bn(f'bifpn.0.{down}.1', f'{res}/bn')


def _map_heads(m: Mapper, model: EfficientDetBackbone) -> None:
    cfg = model.config
    for ours, net, short in (('regressor', 'box_net', 'box'), ('classifier', 'class_net', 'class')):
        for i in range(cfg.box_class_repeats):
            m.separable(f'{ours}.conv_list.{i}', f'{net}/{short}-{i}')
            for j, lvl in enumerate(cfg.levels):
                m.bn(f'{ours}.bn_list.{j}.{i}', f'{net}/{short}-{i}-bn-{lvl}')
        m.separable(f'{ours}.header', f'{net}/{short}-predict')


def infer_num_classes(tf_vars: Mapping[str, Array], num_anchors: int = 9) -> int:
    found = classes_from_bias(tf_vars, TF.class_bias, num_anchors)
    if found is None:
        raise ConversionError(f'no usable {TF.class_bias} variable: is this an EfficientDet checkpoint?')
    return found


def tf_to_state_dict(tf_vars: Mapping[str, Array], compound_coef: Union[int, str],
                     num_classes: int | None = None) -> Dict[str, torch.Tensor]:
    """Convert official variables to a state_dict that ``EfficientDetBackbone(num_classes,
    compound_coef)`` loads with ``strict=True``. Raises ConversionError listing any variable that
    is missing, unused or of the wrong shape."""
    cfg = get_config(compound_coef)
    tf_vars = {_strip(k): v for k, v in tf_vars.items()
               if _strip(k) not in _NON_MODEL_NAMES and not _strip(k).endswith(_NON_MODEL_SUFFIXES)}
    found = infer_num_classes(tf_vars)
    if num_classes is not None and num_classes != found:
        raise ConversionError(f'the checkpoint has {found} classes but --num_classes {num_classes} was asked; '
                              'convert with its own class count and fine-tune with load_pretrained()')
    model = EfficientDetBackbone(num_classes=found, compound_coef=compound_coef)
    m = Mapper(tf_vars)
    map_backbone(m, model)
    _map_bifpn(m, model)
    _map_heads(m, model)
    problems = []
    if m.missing:
        problems.append(f'{len(m.missing)} model variables not found in the input (is -c {compound_coef} right?): '
                        + ', '.join(m.missing[:20]) + (' …' if len(m.missing) > 20 else ''))
    unused = sorted(set(m.tf) - m.used)
    if unused:
        problems.append(f'{len(unused)} input variables not used (is -c {compound_coef} right?): '
                        + ', '.join(unused[:20]) + (' …' if len(unused) > 20 else ''))
    expected = model.state_dict()
    bad = [f'{k}: {tuple(v.shape)} vs expected {tuple(expected[k].shape)}'
           for k, v in m.out.items() if k in expected and v.shape != expected[k].shape]
    if bad:
        problems.append('shape mismatches: ' + '; '.join(bad[:10]))
    extra = sorted(set(m.out) - set(expected))
    if extra or (not m.missing and set(expected) - set(m.out)):
        problems.append(f'internal key mismatch: {extra[:5]} / {sorted(set(expected) - set(m.out))[:5]}')
    if problems:
        raise ConversionError(f'cannot convert the TF variables to {cfg.name}:\n  ' + '\n  '.join(problems))
    return {k: m.out[k] for k in expected}


def read_tf_input(path: str) -> Dict[str, Array]:
    """Read official variables from an ``.npz`` (name → array) or, when TensorFlow is installed,
    from an official checkpoint directory/prefix (EMA values preferred when present)."""
    if path.endswith('.npz') and os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k].astype(np.float32) for k in z.files}
    try:
        import tensorflow as tf  # optional extra, never required
    except ImportError:
        raise ConversionError(f'{path}: not an .npz file, and reading a TF checkpoint needs TensorFlow '
                              '(pip install tensorflow), which is not installed') from None
    ckpt = tf.train.latest_checkpoint(path) if os.path.isdir(path) else path
    if not ckpt:
        raise ConversionError(f'{path}: no TF checkpoint found there')
    reader = tf.train.load_checkpoint(ckpt)
    names = reader.get_variable_to_shape_map()
    out: Dict[str, Array] = {}
    ema = '/ExponentialMovingAverage'
    for n in names:
        if n.endswith(ema):
            continue
        out[n] = reader.get_tensor(n + ema if n + ema in names else n).astype(np.float32)
    return out


def export_tf_names(model: EfficientDetBackbone) -> Dict[str, Array]:
    """The inverse mapping: this model's weights under official TF variable names and layouts."""
    m = Mapper({}, export_from=model.state_dict())
    map_backbone(m, model)
    _map_bifpn(m, model)
    _map_heads(m, model)
    return m.tf


def is_tf_checkpoint_path(path: str) -> bool:
    """A TF checkpoint folder or prefix (``model.ckpt`` next to ``model.ckpt.index``)."""
    return os.path.isdir(path) or os.path.isfile(path + '.index')


class TF(Layout):
    name = 'tf'
    title = 'official TensorFlow variables (google/automl names)'
    loaded_as = 'converted from official TF names'
    signature = SIGNATURE
    class_bias = 'class_net/class-predict/bias'
    convert_command = 'tf'
    order = 10

    def claims(self, sd: Mapping[str, Any]) -> bool:
        return any('/' in k and k.split('/')[0].startswith(SCOPES) for k in sd)

    def clean(self, sd: StateDict) -> StateDict:
        return {_strip(k): v for k, v in sd.items()}

    def read_path(self, path: str) -> Optional[Dict[str, Any]]:
        if not is_tf_checkpoint_path(path):
            return None
        try:
            return {k: torch.from_numpy(v) for k, v in read_tf_input(path).items()}
        except ConversionError as e:
            raise UserError(str(e)) from None

    def to_ours(self, sd: StateDict, variant: Variant) -> Tuple[StateDict, Dict[str, str]]:
        return tf_to_state_dict({k: v.float().numpy() for k, v in sd.items()}, variant), {}

    def origin(self, ck: CheckpointView) -> str:
        return 'official TensorFlow, google/automl (official variable names)'


TF_LAYOUT = register_layout(TF())
