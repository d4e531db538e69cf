"""The backbone seam: what an EfficientDet needs from its feature extractor, and the extractors.

A backbone is any ``nn.Module`` that follows :class:`FeatureBackbone`: ``forward(x)`` takes the
normalised input [B, 3, H, W] and returns the P3, P4, P5 feature maps (NCHW, strides 8, 16, 32:
``ceil(H / 8)`` … for any size the network accepts), and ``out_channels`` gives their channel
counts. The BiFPN makes P6 and P7 (P8) from P5 itself. Optional: ``checkpoint_modules()`` (the
modules ``--grad_checkpoint`` may recompute), ``fuse_opaque`` (``efficientdet.fuse`` then calls
the backbone as it is instead of folding its BatchNorms).

Implementations:
- ``efficientnet`` (the default): the variant's EfficientNet-B or EfficientNet-Lite
  (:class:`efficientdet.efficientnet.EfficientNetBackbone`), as the official model; unchanged.
- ``timm:NAME``: a timm ``features_only`` model (:class:`TimmBackbone`; ``pip install timm``).

A backbone other than the default records its spec in the weights (a ``uint8`` buffer
``backbone_net.spec``), so ``factory.build_model`` rebuilds it from a checkpoint alone.
"""
from __future__ import annotations

import os
from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import nn

from .errors import UserError

__all__ = ['FeatureBackbone', 'TimmBackbone', 'DEFAULT_BACKBONE', 'SPEC_KEY', 'parse_backbone', 'build_backbone',
           'spec_of_state_dict', 'backbone_spec', 'load_timm_weights', 'require_timm']

DEFAULT_BACKBONE = 'efficientnet'
SPEC_KEY = 'backbone_net.spec'  # state_dict key of a recorded backbone spec
_STRIDES = (8, 16, 32)


@runtime_checkable
class FeatureBackbone(Protocol):
    """The contract of a backbone (see the module docstring)."""
    out_channels: Tuple[int, int, int]

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]: ...


def parse_backbone(spec: Optional[str], flag: str = '--backbone') -> Optional[str]:
    """None for the default EfficientNet (None, '', 'efficientnet'); 'timm:NAME' for a timm model;
    UserError otherwise."""
    if spec is None:
        return None
    text = str(spec).strip()
    if text in ('', DEFAULT_BACKBONE):
        return None
    if text.startswith('timm:') and len(text) > len('timm:'):
        return text
    raise UserError(f'{flag} {spec!r}: use efficientnet (the default) or timm:NAME, e.g. timm:resnet18')


def require_timm():
    """The timm module, or UserError saying what to install."""
    try:
        import timm
    except ImportError as e:
        raise UserError(f'--backbone timm:...: timm cannot be imported ({e}); pip install timm') from None
    return timm


def _encode(spec: str) -> torch.Tensor:
    return torch.tensor(list(spec.encode('utf-8')), dtype=torch.uint8)


def spec_of_state_dict(sd) -> Optional[str]:
    """The backbone spec recorded in a state_dict (``backbone_net.spec``), or None (EfficientNet)."""
    t = sd.get(SPEC_KEY) if hasattr(sd, 'get') else None
    if t is None:
        return None
    return bytes(torch.as_tensor(t).to(torch.uint8).tolist()).decode('utf-8')


def backbone_spec(model: nn.Module) -> Optional[str]:
    """The spec of a model's backbone (None: the default EfficientNet)."""
    net = getattr(model, 'backbone_net', model)
    return getattr(net, 'spec_name', None)


class TimmBackbone(nn.Module):
    """A timm model as the backbone: ``timm.create_model(name, features_only=True, out_indices=…)``
    keeping the feature maps of strides 8, 16 and 32. ``pretrained``: None (random, the default),
    ``'imagenet'`` (timm's own pretrained weights, downloaded by timm) or a local file of that
    timm model's weights (``.pth`` / ``.safetensors``, read by timm). The parameters live under
    ``body``; the spec (``timm:NAME``) is recorded as the buffer ``spec``."""

    fuse_opaque = True  # efficientdet.fuse leaves timm's layers (e.g. BN + activation modules) as they are

    def __init__(self, name: str, pretrained: Optional[str] = None):
        super().__init__()
        self.name = name
        self.spec_name = f'timm:{name}'
        self.body = _create_timm(name, pretrained)
        info = self.body.feature_info
        self.out_channels: Tuple[int, int, int] = tuple(int(c) for c in info.channels())  # type: ignore[assignment]
        self.register_buffer('spec', _encode(self.spec_name))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.body(x))

    def checkpoint_modules(self) -> List[nn.Module]:
        """The body's stages (its direct children that hold other modules with parameters)."""
        return [m for m in self.body.children() if any(True for _ in m.children()) and
                any(True for _ in m.parameters())]


def _create_timm(name: str, pretrained: Optional[str]) -> nn.Module:
    timm = require_timm()
    kw = {}
    if pretrained not in (None, 'imagenet'):
        if not os.path.isfile(pretrained):
            raise UserError(f'--backbone_weights {pretrained}: no such file')
        kw['pretrained_cfg_overlay'] = dict(file=os.path.abspath(pretrained))
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception as e:  # unknown name, or a model without features_only
        raise UserError(f'--backbone timm:{name}: timm cannot build it as a feature extractor ({e}); see '
                        'timm.list_models()') from None
    reductions = [int(r) for r in probe.feature_info.reduction()]
    missing = [s for s in _STRIDES if s not in reductions]
    if missing:
        raise UserError(f'--backbone timm:{name}: its feature maps have strides {reductions}, not 8, 16 and 32 '
                        '(EfficientDet needs P3-P5); pick another model')
    positions = tuple(reductions.index(s) for s in _STRIDES)
    try:
        return timm.create_model(name, pretrained=pretrained is not None, features_only=True,
                                 out_indices=positions, **kw)
    except Exception as e:  # e.g. no network for 'imagenet', a file of another model
        raise UserError(f'--backbone_weights {pretrained}: timm could not load the weights of {name} ({e})') from None


def build_backbone(spec: Optional[str], config) -> nn.Module:
    """The backbone module of ``spec`` (:func:`parse_backbone`) for an EfficientDet ``config``."""
    spec = parse_backbone(spec)
    if spec is None:
        from .efficientnet import EfficientNetBackbone
        return EfficientNetBackbone(config.backbone, config.act)
    return TimmBackbone(spec[len('timm:'):])


def load_timm_weights(model: nn.Module, pretrained: str) -> str:
    """Load ``pretrained`` ('imagenet' or a file, see :class:`TimmBackbone`) into the timm backbone
    of ``model`` (every tensor of the body); returns a line saying what was loaded."""
    net = model.backbone_net
    if not isinstance(net, TimmBackbone):
        raise UserError('load_timm_weights needs a model built with --backbone timm:NAME')
    fresh = _create_timm(net.name, pretrained)
    net.body.load_state_dict(fresh.state_dict())
    n = sum(v.numel() for v in fresh.state_dict().values())
    return f'[info] --backbone_weights {pretrained}: {len(fresh.state_dict())} tensors ({n:,} values) of timm {net.name}'


def check_feature_channels(channels: Sequence[int]) -> Tuple[int, int, int]:
    """``out_channels`` of a backbone as three positive ints, else ValueError."""
    ch = tuple(int(c) for c in channels)
    if len(ch) != 3 or min(ch) <= 0:
        raise ValueError(f'a backbone must give three feature maps (P3, P4, P5) with known channels, got {channels}')
    return ch  # type: ignore[return-value]
