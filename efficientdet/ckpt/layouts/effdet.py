"""rwightman efficientdet-pytorch (``effdet``) ``tf_efficientdet_d0 … d7x`` and
``tf_efficientdet_lite0 … lite4, lite3x`` state_dicts: recognising them and renaming their keys
to this project's (and back).

effdet's layout (facts read from effdet 0.4.x; tensors are already OIHW like ours, so conversion
only renames):
- backbone (timm EfficientNet, features only): ``conv_stem``, ``bn1``, ``blocks.S.I`` per stage S
  and block I; stage 0 blocks are depthwise-separable (``conv_dw, bn1, se, conv_pw, bn2``), the
  others inverted residuals (``conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3``); the Lite
  backbones (``tf_efficientnet_lite*``) have no ``se`` tensors, a 32-channel stem and unscaled
  first / last stage repeats; their act (ReLU6) and sum fusion hold no tensors;
- ``fpn.resample.3``: P5 → P6 1x1 conv + BN (P7/P8 are pure pooling: no tensors);
- ``fpn.cell.C.fnode.N``: N in the official node order (``tf.bifpn_nodes``);
  ``combine.edge_weights`` only for fast fusion (sum fusion, D6+, has none);
  ``combine.resample.K.conv.{conv,bn}`` where a backbone input K needs a channel change (cell 0);
  ``after_combine.conv.{conv_dw,conv_pw,bn}``;
- ``class_net`` / ``box_net``: ``conv_rep.R``, ``bn_rep.R.L.bn`` (repeat-major, ours is
  ``bn_list.L.R``), ``predict``.
Only the ``tf_efficientdet_*`` models (fast *normalised* fusion, 'SAME' padding, biased separable
convs) compute what ours computes. The one key left out on purpose is a DetBench's
``anchors.boxes`` buffer (anchors are rebuilt from the config), dropped when the file is read
(:func:`efficientdet.ckpt.files.drop_bench_buffers`).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ...config import Variant, get_config
from ...layers import Conv2dStaticSamePadding, SeparableConvBlock
from ...model import EfficientDetBackbone
from ..files import StateDict
from ..signature import classes_from_bias, describe_variants, matching_variants
from . import CheckpointView, ConversionError, Layout, register_layout
from .tf import bifpn_nodes

PREFIXES = ('backbone.conv_stem', 'backbone.blocks.', 'fpn.cell.', 'fpn.resample.', 'class_net.', 'box_net.')
SIGNATURE = dict(
    fpn_channels=('shape0', r'box_net\.conv_rep\.0\.conv_pw\.weight'),
    cells=('count', r'fpn\.cell\.(\d+)\.'),
    head_repeats=('count', r'box_net\.conv_rep\.(\d+)\.'),
    levels=('count', r'box_net\.bn_rep\.0\.(\d+)\.'),
    stem=('shape0', r'backbone\.conv_stem\.weight'),
    blocks=('count', r'backbone\.blocks\.(\d+\.\d+)\.'),
    backbone_out=('last_shape0', r'backbone\.blocks\.(\d+\.\d+)\.conv_pwl?\.weight'),
    se=('flag', r'backbone\.blocks\.\d+\.\d+\.', r'backbone\.blocks\.\d+\.\d+\.se\.'),
)
_PREDICT_BIAS = 'class_net.predict.conv_pw.bias'


def _leaf(out: Dict[str, str], ours: str, module: nn.Module, theirs: str) -> None:
    """Map every tensor of one of our conv wrappers / BatchNorms to effdet's name."""
    for k in module.state_dict():
        tail = k[len('conv.'):] if isinstance(module, Conv2dStaticSamePadding) else k
        out[f'{ours}.{k}'] = f'{theirs}.{tail}'


def _separable(out: Dict[str, str], ours: str, block: SeparableConvBlock, theirs: str) -> None:
    _leaf(out, f'{ours}.depthwise_conv', block.depthwise_conv, f'{theirs}.conv_dw')
    _leaf(out, f'{ours}.pointwise_conv', block.pointwise_conv, f'{theirs}.conv_pw')
    if getattr(block, 'norm', False):
        _leaf(out, f'{ours}.bn', block.bn, f'{theirs}.bn')


def map_backbone_keys(out: Dict[str, str], model: EfficientDetBackbone) -> None:
    """Our backbone keys → effdet's (timm EfficientNet) keys, added to ``out``."""
    net = model.backbone_net.model
    ours = 'backbone_net.model'
    _leaf(out, f'{ours}._conv_stem', net._conv_stem, 'backbone.conv_stem')
    _leaf(out, f'{ours}._bn0', net._bn0, 'backbone.bn1')
    start = 0
    for stage, end in enumerate(net.stage_ends):
        for i in range(start, end + 1):
            block, o, t = net._blocks[i], f'{ours}._blocks.{i}', f'backbone.blocks.{stage}.{i - start}'
            if block.expand:  # timm InvertedResidual
                pairs = (('_expand_conv', 'conv_pw'), ('_bn0', 'bn1'), ('_depthwise_conv', 'conv_dw'),
                         ('_bn1', 'bn2'), ('_project_conv', 'conv_pwl'), ('_bn2', 'bn3'))
            else:  # timm DepthwiseSeparableConv
                pairs = (('_depthwise_conv', 'conv_dw'), ('_bn1', 'bn1'), ('_project_conv', 'conv_pw'),
                         ('_bn2', 'bn2'))
            if block.has_se:  # timm's Lite blocks have none (se is an Identity)
                pairs += (('_se_reduce', 'se.conv_reduce'), ('_se_expand', 'se.conv_expand'))
            for mine, theirs in pairs:
                _leaf(out, f'{o}.{mine}', getattr(block, mine), f'{t}.{theirs}')
        start = end + 1


def _map_bifpn(out: Dict[str, str], model: EfficientDetBackbone) -> None:
    cfg = model.config
    levels = cfg.levels
    n_backbone = len(cfg.backbone_channels)  # P3-P5 come from the backbone; P6+ from fpn.resample
    cell0 = model.bifpn[0]
    # P5 -> P6 is effdet's fpn.resample.<first extra level offset>
    _leaf(out, 'bifpn.0.p5_to_p6.0', cell0.p5_to_p6[0], f'fpn.resample.{n_backbone}.conv.conv')
    _leaf(out, 'bifpn.0.p5_to_p6.1', cell0.p5_to_p6[1], f'fpn.resample.{n_backbone}.conv.bn')
    for c, cell in enumerate(model.bifpn):
        for n, (kind, lvl) in enumerate(bifpn_nodes(levels)):
            node = f'fpn.cell.{c}.fnode.{n}'
            _separable(out, f'bifpn.{c}.conv{lvl}_{kind}', getattr(cell, f'conv{lvl}_{kind}'),
                       f'{node}.after_combine.conv')
            weight = f'p{lvl}_w{1 if kind == "up" else 2}'
            if hasattr(cell, weight):
                out[f'bifpn.{c}.{weight}'] = f'{node}.combine.edge_weights'
            offset = lvl - levels[0]
            channel_conv = f'p{lvl}_down_channel' + ('' if kind == 'up' else '_2')
            if offset < n_backbone and hasattr(cell, channel_conv):
                seq = getattr(cell, channel_conv)
                res = f'{node}.combine.resample.{offset}.conv'
                _leaf(out, f'bifpn.{c}.{channel_conv}.0', seq[0], f'{res}.conv')
                _leaf(out, f'bifpn.{c}.{channel_conv}.1', seq[1], f'{res}.bn')


def _map_heads(out: Dict[str, str], model: EfficientDetBackbone) -> None:
    for ours, theirs in (('regressor', 'box_net'), ('classifier', 'class_net')):
        head = getattr(model, ours)
        for r, conv in enumerate(head.conv_list):
            _separable(out, f'{ours}.conv_list.{r}', conv, f'{theirs}.conv_rep.{r}')
        for lvl, bns in enumerate(head.bn_list):
            for r, bn in enumerate(bns):
                _leaf(out, f'{ours}.bn_list.{lvl}.{r}', bn, f'{theirs}.bn_rep.{r}.{lvl}.bn')
        _separable(out, f'{ours}.header', head.header, f'{theirs}.predict')


def effdet_key_map(model: EfficientDetBackbone) -> Dict[str, str]:
    """Our state_dict key → effdet key, for every tensor of ``model`` (built from its modules)."""
    out: Dict[str, str] = {}
    map_backbone_keys(out, model)
    _map_bifpn(out, model)
    _map_heads(out, model)
    own = model.state_dict()
    if set(out) != set(own) or len(set(out.values())) != len(out):
        raise ConversionError(f'internal: effdet mapping incomplete ({sorted(set(own) - set(out))[:5]})')
    return {k: out[k] for k in own}


def effdet_to_state_dict(theirs: Mapping[str, torch.Tensor], compound_coef: Union[int, str],
                         num_classes: Optional[int] = None,
                         model: Optional[EfficientDetBackbone] = None) -> StateDict:
    """Convert an effdet ``tf_efficientdet_d*`` / ``tf_efficientdet_lite*`` state_dict (prefixes already stripped) to one that
    ``EfficientDetBackbone(num_classes, compound_coef)`` loads with ``strict=True``. Raises
    ConversionError naming every missing, unused or mis-shaped key. ``model`` (optional, may live on
    the meta device) supplies the module structure; one is built when it is None."""
    cfg = get_config(compound_coef)
    found = classes_from_bias(theirs, _PREDICT_BIAS)
    if found is None:
        raise ConversionError(f'no usable {_PREDICT_BIAS} (its length must be 9 × num_classes): '
                              'is this an effdet tf_efficientdet_* checkpoint?')
    if num_classes is not None and num_classes != found:
        raise ConversionError(f'the checkpoint has {found} classes but --num_classes {num_classes} was asked; '
                              'convert with its own class count and fine-tune with load_pretrained()')
    cands = matching_variants(theirs, SIGNATURE)
    if compound_coef not in cands:
        raise ConversionError(f'this file is {describe_variants(cands)} (from its tensor shapes) but '
                              f'-c {compound_coef} ({cfg.name}) was asked')
    if model is None:
        model = EfficientDetBackbone(num_classes=found, compound_coef=compound_coef)
    elif model.compound_coef != compound_coef or model.num_classes != found:
        raise ConversionError(f'the structure model is {model.config.name} with '
                              f'{model.num_classes} classes, the file {cfg.name} with {found}')
    kmap = effdet_key_map(model)
    expected = model.state_dict()
    out: StateDict = {}
    missing = []
    for ours, key in kmap.items():
        if key in theirs:
            out[ours] = theirs[key].detach().to(expected[ours].dtype)  # no copy when already right
        else:
            missing.append(key)
    unused = sorted(set(theirs) - set(kmap.values()))
    bad = [f'{kmap[k]} {list(v.shape)} vs {list(expected[k].shape)}' for k, v in out.items()
           if v.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f'{len(missing)} keys missing from the input: ' + ', '.join(missing[:10])
                        + (' …' if len(missing) > 10 else ''))
    if unused:
        problems.append(f'{len(unused)} input keys not used: ' + ', '.join(unused[:10])
                        + (' …' if len(unused) > 10 else ''))
    if bad:
        problems.append('shape mismatches: ' + ', '.join(bad[:10]))
    if problems:
        raise ConversionError(f'cannot convert the effdet state_dict to {cfg.name} (only tf_efficientdet_* '
                              'models are supported): ' + '; '.join(problems))
    return out


def state_dict_to_effdet(state_dict: Mapping[str, torch.Tensor], model: EfficientDetBackbone) -> StateDict:
    """The inverse: our weights under effdet's names (what effdet's ``tf_efficientdet_*`` holds)."""
    return {theirs: state_dict[ours] for ours, theirs in effdet_key_map(model).items()}


class Effdet(Layout):
    name = 'effdet'
    title = 'rwightman efficientdet-pytorch (effdet)'
    loaded_as = 'converted from effdet keys'
    signature = SIGNATURE
    class_bias = _PREDICT_BIAS
    convert_command = 'effdet'
    order = 40

    def claims(self, sd: Mapping[str, Any]) -> bool:
        return any(k.startswith(PREFIXES) for k in sd)

    def to_ours(self, sd: StateDict, variant: Variant) -> Tuple[StateDict, Dict[str, str]]:
        return effdet_to_state_dict(sd, variant), {}

    def origin(self, ck: CheckpointView) -> str:
        bench = ' DetBench' if ck.dropped else ''
        return f'rwightman efficientdet-pytorch (effdet tf_efficientdet_*{bench} state_dict)'


EFFDET = register_layout(Effdet())
