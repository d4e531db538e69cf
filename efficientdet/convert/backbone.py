"""ImageNet EfficientNet classification weights into an EfficientDet's backbone only
(``train.py --backbone_weights FILE``, the official recipe's ``--backbone_ckpt``).

Two layouts are read:
- timm ``tf_efficientnet_b0 … b7`` / ``tf_efficientnet_lite0 … lite4`` state_dicts (``.pth`` or
  ``.safetensors``; ``imagenet`` fetches timm's from the Hugging Face Hub): ``conv_stem``,
  ``bn1``, ``blocks.S.I.*`` (the layout of effdet's backbone, optionally under ``backbone.``),
  plus ``conv_head``, ``bn2`` and ``classifier``, which a detector does not use;
- official TF ``efficientnet-bN`` / ``efficientnet-liteN`` variables: an ``.npz`` of variable name → array,
  or a TF checkpoint folder / prefix when TensorFlow is installed (``head/*`` and the classifier
  are not used).

The network the file holds is recognised from its shapes (stem width, every block's output width),
so a file of another size is refused with the ``-c`` values that use its backbone. The BiFPN and
heads keep their initialisation.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..ckpt.files import checkpoint_path_exists
from ..ckpt.layouts import ConversionError
from ..ckpt.layouts.effdet import map_backbone_keys as _effdet_backbone_names
from ..ckpt.layouts.tf import Mapper as _Mapper
from ..ckpt.layouts.tf import map_backbone as _tf_map_backbone
from ..ckpt.layouts.tf import read_tf_input
from ..config import BACKBONES, VARIANTS, backbone_stages, get_config, stem_channels, variant_tag
from ..errors import UserError

IMAGENET = 'imagenet'  # --backbone_weights imagenet: the released ImageNet weights of the backbone
__all__ = ['load_backbone_weights', 'read_backbone_file', 'backbone_signature', 'identify_backbone']

Signature = Tuple[int, Tuple[int, ...]]  # (stem channels, output channels of every block in order)
_TIMM_BLOCK = re.compile(r'^blocks\.(\d+)\.(\d+)\.')
_TF_BLOCK = re.compile(r'/blocks_(\d+)/')


def backbone_signature(name: str) -> Signature:
    """(stem channels, every block's output channels) of the official backbone ``name``."""
    outs: List[int] = []
    for st in backbone_stages(name):
        outs += [st.out_ch] * st.repeats
    return stem_channels(name), tuple(outs)


def _variants_using(name: str) -> str:
    keys = [v for v in VARIANTS if get_config(v).backbone == name]
    return ' or '.join(f'-c {v} ({variant_tag(v).upper()})' for v in keys) or 'no EfficientDet variant'


def identify_backbone(sig: Signature) -> Optional[str]:
    """The official backbone name with signature ``sig``, or None."""
    return next((n for n in BACKBONES if backbone_signature(n) == sig), None)


def read_backbone_file(path: str) -> Tuple[str, Dict[str, torch.Tensor]]:
    """``('timm' | 'tf', tensors)`` of an ImageNet checkpoint. timm keys lose any ``backbone.`` /
    ``model.`` / ``module.`` prefix; TF names keep theirs (arrays as float32 tensors)."""
    if not checkpoint_path_exists(path):
        raise UserError(f'--backbone_weights {path}: no such file or folder')
    if path.endswith('.npz') or os.path.isdir(path) or os.path.exists(path + '.index'):
        try:
            arrays = read_tf_input(path)
        except ConversionError as e:
            raise UserError(f'--backbone_weights {e}') from None
        if any(_TF_BLOCK.search(k) for k in arrays):
            return 'tf', {k[:-2] if k.endswith(':0') else k: torch.from_numpy(np.asarray(v, np.float32))
                          for k, v in arrays.items()}
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
    else:
        from ..ckpt.files import read_file, unwrap
        got = unwrap(read_file(path))
        if got is None:
            raise UserError(f'--backbone_weights {path}: holds no state_dict (name -> tensor)')
        tensors = got[0]
    out: Dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        for prefix in ('module.', 'model.', 'backbone.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if 'conv_stem.weight' not in out:
        raise UserError(f'--backbone_weights {path}: not an EfficientNet classification checkpoint (no '
                        "'conv_stem.weight' of timm's layout, no 'efficientnet-*/blocks_N/' TF variables)")
    return 'timm', out


def _timm_signature(sd: Mapping[str, torch.Tensor]) -> Signature:
    blocks: Dict[Tuple[int, int], int] = {}
    for k, v in sd.items():
        m = _TIMM_BLOCK.match(k)
        if m and v.ndim == 4 and k.endswith(('conv_pwl.weight', 'conv_pw.weight')):
            key = (int(m.group(1)), int(m.group(2)))
            # inverted residuals: conv_pwl is the projection; depthwise-separable blocks: conv_pw
            if k.endswith('conv_pwl.weight') or key not in blocks:
                blocks[key] = int(v.shape[0])
    return int(sd['conv_stem.weight'].shape[0]), tuple(blocks[k] for k in sorted(blocks))


def _tf_scope(names: List[str]) -> str:
    scopes = sorted({n.split('/blocks_')[0] for n in names if '/blocks_' in n})
    if len(scopes) != 1:
        raise UserError(f'--backbone_weights: expected the variables of one efficientnet-* network, found scopes '
                        f'{scopes[:4]}')
    return scopes[0]


def _tf_signature(sd: Mapping[str, torch.Tensor], scope: str) -> Signature:
    outs: Dict[int, int] = {}
    for k, v in sd.items():
        m = _TF_BLOCK.search(k)
        if m and k.startswith(scope + '/') and k.endswith('/kernel') and '/se/' not in k and v.ndim == 4:
            i = int(m.group(1))
            # the projection is conv2d_1 with an expansion, conv2d without: the last 1x1 conv
            name = k.split('/')[-2]
            order = 1 if name == 'conv2d_1' else 0
            if i not in outs or order >= outs[i][0]:
                outs[i] = (order, int(v.shape[-1]))
    stem = sd.get(f'{scope}/stem/conv2d/kernel')
    if stem is None:
        raise UserError(f'--backbone_weights: {scope}/stem/conv2d/kernel is missing')
    return int(stem.shape[-1]), tuple(outs[i][1] for i in sorted(outs))


def load_backbone_weights(model: nn.Module, path: str) -> str:
    """Load an ImageNet EfficientNet checkpoint into ``model.backbone_net`` (in place) and return
    a one-line report. ``path``: a file or folder, or ``'imagenet'`` (when no such file exists):
    timm's port of the official ImageNet weights of the model's backbone, from the Hugging Face
    Hub (:func:`efficientdet.zoo.backbone_file`). Raises UserError when the file holds another
    network than the model's backbone (naming the ``-c`` to use) or lacks a backbone tensor."""
    want = model.config.backbone
    if path == IMAGENET and not os.path.exists(path):
        from ..zoo import backbone_file
        path = backbone_file(want)
    layout, sd = read_backbone_file(path)
    if layout == 'timm':
        sig = _timm_signature(sd)
    else:
        scope = _tf_scope(list(sd))
        sig = _tf_signature(sd, scope)
    found = identify_backbone(sig)
    if found != want:
        if found is None:
            raise UserError(f'--backbone_weights {path}: its blocks (stem {sig[0]} channels, {len(sig[1])} blocks) '
                            f'match no EfficientNet B0-B7 / Lite0-Lite4; {model.config.name} needs {want}')
        raise UserError(f'--backbone_weights {path} holds {found}, but {model.config.name} uses {want}; '
                        f'train with {_variants_using(found)} for this file, or give the {want} weights')
    own = model.state_dict()
    if layout == 'timm':
        names: Dict[str, str] = {}
        _effdet_backbone_names(names, model)
        loaded = {}
        missing = []
        for ours, theirs in names.items():
            t = theirs[len('backbone.'):]
            if t in sd:
                loaded[ours] = sd[t]
            elif not ours.endswith('num_batches_tracked'):
                missing.append(t)
        used = {names[k][len('backbone.'):] for k in loaded}
    else:
        m = _Mapper({k: v.numpy() for k, v in sd.items()})
        # the detector's scope is the official backbone name; an ImageNet file uses the same one
        if scope != want:
            m.tf = {k.replace(scope + '/', want + '/', 1): v for k, v in m.tf.items()}
        _tf_map_backbone(m, model)
        loaded, missing, used = dict(m.out), list(m.missing), set(m.used)
    if missing:
        raise UserError(f'--backbone_weights {path}: {len(missing)} backbone tensors are missing '
                        f'(e.g. {", ".join(missing[:3])}); is it a complete {want} checkpoint?')
    bad = [k for k, v in loaded.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f'--backbone_weights {path}: {bad[0]} has shape {tuple(loaded[bad[0]].shape)}, the model '
                        f'{tuple(own[bad[0]].shape)}')
    with torch.no_grad():
        for k, v in loaded.items():
            own[k].copy_(v.to(own[k].dtype))
    unused = len(sd) - len(used)
    return (f'[info] --backbone_weights: {len(loaded)} tensors of {want} ({layout} layout) loaded into the backbone '
            f'from {path}' + (f'; {unused} tensors of the file not used (its classification head)' if unused else ''))
