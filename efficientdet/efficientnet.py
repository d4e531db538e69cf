"""EfficientNet B0–B7 and EfficientNet-Lite0–4 feature extractors, as the official EfficientDet
backbone uses them.

Module names follow Yet-Another-EfficientDet-Pytorch (``_conv_stem``, ``_bn0``, ``_blocks``;
inside a block ``_expand_conv``, ``_depthwise_conv``, ``_se_reduce`` …) so its checkpoints load.
The classification head (``_conv_head``, ``_fc``) is not built: EfficientDet never uses it.
Lite (official ``efficientnet_lite_builder``): no squeeze-excitation, ReLU6, stem fixed at 32
channels and the first / last stage repeats not depth-scaled (``config.backbone_stages``).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .config import BACKBONES, FEATURE_STAGES, backbone_stages, stem_channels
from .layers import Conv2dStaticSamePadding, batch_norm, make_activation


def drop_connect(x: torch.Tensor, drop_rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample (training only)."""
    if not training or drop_rate <= 0.0:
        return x
    keep = 1.0 - drop_rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: [expand 1x1 → BN → act] → depthwise → BN → act → [SE] →
    project 1x1 → BN, with identity skip when shapes allow. ``se_ratio`` None: no SE (Lite);
    ``act``: 'swish' or 'relu6'."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float | None, drop_rate: float = 0.0, act: str = 'swish'):
        super().__init__()
        mid = in_ch * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = Conv2dStaticSamePadding(in_ch, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = Conv2dStaticSamePadding(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = batch_norm(mid)
        self.has_se = se_ratio is not None
        if self.has_se:
            squeezed = max(1, int(in_ch * se_ratio))
            self._se_reduce = Conv2dStaticSamePadding(mid, squeezed, 1)
            self._se_expand = Conv2dStaticSamePadding(squeezed, mid, 1)
        self._project_conv = Conv2dStaticSamePadding(mid, out_ch, 1, bias=False)
        self._bn2 = batch_norm(out_ch)
        self._act = make_activation(act)
        self.id_skip = stride == 1 and in_ch == out_ch
        self.stride = stride
        self.drop_rate = drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = self._act(self._bn0(self._expand_conv(x)))
        x = self._act(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            s = x.mean((2, 3), keepdim=True)
            s = self._se_expand(self._act(self._se_reduce(s)))
            x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.id_skip:
            x = drop_connect(x, self.drop_rate, self.training) + inputs
        return x


class EfficientNet(nn.Module):
    """Stem + MBConv blocks of an official backbone (``'efficientnet-b3'``, ``'efficientnet-lite3'``;
    an int ``c`` means ``'efficientnet-b{c}'``); no classification head. ``act``: the activation
    EfficientDet gives it ('swish' for D0-D7x, 'relu6' for Lite)."""

    def __init__(self, backbone: int | str, act: str = 'swish'):
        super().__init__()
        name = f'efficientnet-b{backbone}' if isinstance(backbone, int) else backbone
        params = BACKBONES[name]
        stem = stem_channels(name)
        self._conv_stem = Conv2dStaticSamePadding(3, stem, 3, 2, bias=False)
        self._bn0 = batch_norm(stem)
        self._act = make_activation(act)
        stages = backbone_stages(name)
        total = sum(st.repeats for st in stages)
        blocks: List[MBConvBlock] = []
        self.stage_ends: List[int] = []
        for st in stages:
            for i in range(st.repeats):
                # official: drop rate grows linearly with the block index
                rate = params.drop_connect_rate * len(blocks) / total
                blocks.append(MBConvBlock(st.in_ch if i == 0 else st.out_ch, st.out_ch, st.kernel,
                                          st.stride if i == 0 else 1, st.expand_ratio, st.se_ratio, rate, act))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)

    def set_drop_connect_rate(self, rate: float) -> None:
        """Stochastic depth (training only): block i of n skips its residual branch with
        probability ``rate * i / n``, the official schedule (``rate`` = 1 - survival_prob)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f'drop connect rate must be in [0, 1), got {rate}')
        for i, block in enumerate(self._blocks):
            block.drop_rate = rate * i / len(self._blocks)


class EfficientNetBackbone(nn.Module):
    """Returns the P3, P4, P5 feature maps (strides 8, 16, 32; ``ceil(size / 8)`` … for any
    input size), NCHW; ``out_channels`` are their channel counts (the default implementation of
    ``efficientdet.backbones.FeatureBackbone``)."""

    def __init__(self, backbone: int | str, act: str = 'swish'):
        super().__init__()
        self.model = EfficientNet(backbone, act)
        self.feature_blocks = [self.model.stage_ends[s] for s in FEATURE_STAGES]
        self.out_channels = tuple(self.model._blocks[i]._project_conv.conv.out_channels for i in self.feature_blocks)

    def checkpoint_modules(self) -> List[nn.Module]:
        """The MBConv blocks (what ``--grad_checkpoint`` recomputes)."""
        return list(self.model._blocks)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        m = self.model
        x = m._act(m._bn0(m._conv_stem(x)))
        feats = []
        for idx, block in enumerate(m._blocks):
            x = block(x)
            if idx in self.feature_blocks:
                feats.append(x)
        return feats
