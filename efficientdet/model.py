"""EfficientDetBackbone: EfficientNet (or another backbone, ``efficientdet.backbones``) → BiFPN →
box/class heads → anchors.

``forward(x)`` takes a normalised NCHW batch of any H and W the official model accepts
(``config.check_image_size``; the defaults are multiples of 128) and returns
``(features, regression, classification, anchors)``:
- features: BiFPN outputs, list of NCHW maps, P3 first;
- regression [B, A, 4] as (ty, tx, th, tw);
- classification [B, A, num_classes] after sigmoid (``return_logits=True``: before);
- anchors [1, A, 4] as (y1, x1, y2, x2) in input pixels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .anchors import Anchors
from .bifpn import BiFPN
from .config import (COMPAT_MODES, DEFAULT_SCALES, EfficientDetConfig, Variant, check_image_size, get_config,
                     parse_variant, ratios_for)
from .efficientnet import EfficientNetBackbone
from .head import Classifier, Regressor, init_head_


def _eager(x: torch.Tensor) -> bool:
    """True when ``x`` is a real tensor of an eager call (not a torch.jit / torch.compile / fx trace)."""
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or isinstance(x, torch.fx.Proxy))


class EfficientDetBackbone(nn.Module):
    """The EfficientDet D0–D7x network (compound_coef 0–8; 7 = D7, 8 = D7x) and EfficientDet-Lite0–4
    (compound_coef 'lite0' … 'lite4', 'lite3x'; any spelling ``config.parse_variant`` accepts).

    ``compat='official'`` (default) computes what the official TF model computes;
    ``compat='zylo117'`` reproduces Yet-Another-EfficientDet-Pytorch (zero-padded max-pools,
    anchor ratios 1.4/0.7). State-dict keys are Yet-Another's in both modes.

    ``backbone``: the feature extractor (``backbone_net``): None for the variant's EfficientNet
    (the official network), a spec string (``'timm:resnet18'``, see ``efficientdet.backbones``) or
    any module following ``backbones.FeatureBackbone`` (P3-P5 maps with known ``out_channels``);
    the BiFPN, heads and anchors are the variant's either way.
    """

    def __init__(self, num_classes: int = 80, compound_coef: Variant = 0, load_weights: bool = False,
                 ratios: Sequence[Tuple[float, float]] | None = None, scales: Sequence[float] | None = None,
                 compat: str = 'official', backbone: Union[str, nn.Module, None] = None, **kwargs):
        super().__init__()
        if compat not in COMPAT_MODES:
            raise ValueError(f'compat must be one of {COMPAT_MODES}, got {compat!r}')
        if load_weights:
            raise ValueError('load_weights=True would download weights, which this project never does; '
                             'build the model and call load_pretrained(path) with a local file instead')
        self.config: EfficientDetConfig = get_config(compound_coef)
        cfg = self.config
        self.compound_coef: Variant = parse_variant(compound_coef)
        self.num_classes = num_classes
        self.compat = compat
        self.input_size = cfg.input_size
        self.aspect_ratios = list(ratios_for(compat, ratios))
        self.scales = list(scales) if scales is not None else list(DEFAULT_SCALES)
        num_anchors = len(self.aspect_ratios) * len(self.scales)
        pool_pad = 0.0 if compat == 'zylo117' else float('-inf')

        if backbone is None:
            self.backbone_net = EfficientNetBackbone(cfg.backbone, cfg.act)
        elif isinstance(backbone, nn.Module):
            self.backbone_net = backbone
        else:
            from .backbones import build_backbone
            self.backbone_net = build_backbone(backbone, cfg)
        from .backbones import check_feature_channels
        channels = list(check_feature_channels(getattr(self.backbone_net, 'out_channels', ())))
        self.bifpn = nn.Sequential(*[
            BiFPN(cfg.fpn_num_filters, channels, first_time=(i == 0), levels=cfg.levels,
                  fusion=cfg.fusion, pool_pad_value=pool_pad, act=cfg.act)
            for i in range(cfg.fpn_cell_repeats)])
        n_levels = len(cfg.levels)
        self.regressor = Regressor(cfg.fpn_num_filters, num_anchors, cfg.box_class_repeats, n_levels, act=cfg.act)
        self.classifier = Classifier(cfg.fpn_num_filters, num_anchors, num_classes, cfg.box_class_repeats, n_levels,
                                     act=cfg.act)
        self.anchors = Anchors(cfg.anchor_scale, cfg.levels, scales=self.scales, ratios=self.aspect_ratios)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self, prior: float = 0.01) -> None:
        """Official-style initialisation (used when training from scratch); another backbone than
        the EfficientNet keeps its own initialisation."""
        for m in (self.backbone_net.modules() if isinstance(self.backbone_net, EfficientNetBackbone) else ()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')  # official conv_kernel_initializer
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.bifpn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)  # keras default (glorot uniform)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        init_head_(self.regressor)
        init_head_(self.classifier, prior=prior)

    # ------------------------------------------------------------------ forward
    def extract_features(self, inputs: torch.Tensor) -> List[torch.Tensor]:
        """Backbone P3–P5 → BiFPN outputs (P3 … P7, or P8 for D7x)."""
        return self.bifpn(self.backbone_net(inputs))

    def forward(self, inputs: torch.Tensor, return_logits: bool = False):
        if _eager(inputs):  # a size the official model cannot run: one clear ValueError, not a shape error
            check_image_size(int(inputs.shape[-2]), int(inputs.shape[-1]), self.compound_coef)
        features = self.extract_features(inputs)
        regression = self.regressor(features)
        logits = self.classifier.forward_raw(features)
        classification = logits if return_logits else torch.sigmoid(logits)
        anchors = self.anchors(inputs, inputs.dtype)
        return features, regression, classification, anchors

    # ------------------------------------------------------------------ utilities
    def freeze_bn(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    def fuse(self, channels_last: bool = True, image_size=None, fast: Optional[bool] = None,
             allowed: Optional[torch.Tensor] = None) -> nn.Module:
        """A new inference-only module: BN folded into convs, static paddings and anchors fixed,
        plain swish, optional channels_last and the CPU fast path. Same outputs (see ``fuse``);
        ``allowed``: classes left out of it never win an anchor's best class."""
        from .fuse import fuse_model
        return fuse_model(self, channels_last=channels_last, image_size=image_size, fast=fast, allowed=allowed)
