"""EfficientNet B0–B7 feature extractor, as the official EfficientDet backbone uses it.

Module names follow Yet-Another-EfficientDet-Pytorch (``_conv_stem``, ``_bn0``, ``_blocks``;
inside a block ``_expand_conv``, ``_depthwise_conv``, ``_se_reduce`` …) so its checkpoints load.
The classification head (``_conv_head``, ``_fc``) is not built: EfficientDet never uses it.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .config import EFFICIENTNET_PARAMS, EFFICIENTNET_STAGES, FEATURE_STAGES, round_filters, round_repeats
from .layers import Conv2dStaticSamePadding, MemoryEfficientSwish, batch_norm


def drop_connect(x: torch.Tensor, drop_rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample (training only)."""
    if not training or drop_rate <= 0.0:
        return x
    keep = 1.0 - drop_rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: [expand 1x1 → BN → swish] → depthwise → BN → swish → SE →
    project 1x1 → BN, with identity skip when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float, drop_rate: float = 0.0):
        super().__init__()
        mid = in_ch * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = Conv2dStaticSamePadding(in_ch, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = Conv2dStaticSamePadding(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = batch_norm(mid)
        squeezed = max(1, int(in_ch * se_ratio))
        self._se_reduce = Conv2dStaticSamePadding(mid, squeezed, 1)
        self._se_expand = Conv2dStaticSamePadding(squeezed, mid, 1)
        self._project_conv = Conv2dStaticSamePadding(mid, out_ch, 1, bias=False)
        self._bn2 = batch_norm(out_ch)
        self._swish = MemoryEfficientSwish()
        self.id_skip = stride == 1 and in_ch == out_ch
        self.stride = stride
        self.drop_rate = drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        s = x.mean((2, 3), keepdim=True)
        s = self._se_expand(self._swish(self._se_reduce(s)))
        x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.id_skip:
            x = drop_connect(x, self.drop_rate, self.training) + inputs
        return x


class EfficientNet(nn.Module):
    """Stem + MBConv blocks of EfficientNet-B{coef}; no classification head."""

    def __init__(self, coef: int):
        super().__init__()
        params = EFFICIENTNET_PARAMS[coef]
        stem = round_filters(32, params.width)
        self._conv_stem = Conv2dStaticSamePadding(3, stem, 3, 2, bias=False)
        self._bn0 = batch_norm(stem)
        self._swish = MemoryEfficientSwish()
        stage_specs = []
        for stage in EFFICIENTNET_STAGES:
            stage_specs.append((round_filters(stage.in_ch, params.width),
                                round_filters(stage.out_ch, params.width),
                                round_repeats(stage.repeats, params.depth), stage))
        total = sum(r for _, _, r, _ in stage_specs)
        blocks: List[MBConvBlock] = []
        self.stage_ends: List[int] = []
        for in_ch, out_ch, repeats, stage in stage_specs:
            for i in range(repeats):
                # official: drop rate grows linearly with the block index
                rate = params.drop_connect_rate * len(blocks) / total
                blocks.append(MBConvBlock(in_ch if i == 0 else out_ch, out_ch, stage.kernel,
                                          stage.stride if i == 0 else 1, stage.expand_ratio,
                                          stage.se_ratio, rate))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)


class EfficientNetBackbone(nn.Module):
    """Returns the P3, P4, P5 feature maps (strides 8, 16, 32), NCHW."""

    def __init__(self, coef: int):
        super().__init__()
        self.model = EfficientNet(coef)
        self.feature_blocks = [self.model.stage_ends[s] for s in FEATURE_STAGES]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        feats = []
        for idx, block in enumerate(m._blocks):
            x = block(x)
            if idx in self.feature_blocks:
                feats.append(x)
        return feats
