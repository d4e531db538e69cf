"""BiFPN cell (official ``fpn_cells`` with the ``bifpn`` node layout), for any level range.

Node order (official): top-down from max_level-1 to min_level, fusing (P_L, up(P_{L+1}')),
then bottom-up from min_level+1 to max_level, fusing (P_L, P_L' [not at the top], down(P_{L-1}'')).
Each node: fuse → activation (swish; ReLU6 for Lite) → depthwise-separable conv (one bias) → BN.
Resampling follows the official ``ResampleFeatureMap`` at any input size: up = nearest resize to
the target level's actual size (``resize_nearest_neighbor``, not a fixed x2: 3x3 → 5x5 at 320 px),
down = 3x3 stride-2 "SAME" max-pool (ceil(size / 2)).
Names match Yet-Another-EfficientDet-Pytorch: ``conv6_up``, ``conv4_down``, ``p6_w1``, ``p4_w2``,
``p5_down_channel``, ``p5_to_p6``, ``p4_down_channel_2`` …
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import FUSION_EPS
from .layers import Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, SeparableConvBlock, batch_norm, make_activation


@functools.lru_cache(maxsize=None)
def nearest_indices(src: int, dst: int) -> Tuple[int, ...]:
    """Source index of each of ``dst`` output positions of TF1's ``resize_nearest_neighbor``
    (align_corners=False, half_pixel_centers=False), computed as TF does: ``min(floor(i *
    float32(src / dst)), src - 1)`` in float32."""
    scale = np.float32(src) / np.float32(dst)
    idx = np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64)
    return tuple(np.minimum(idx, src - 1).tolist())


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest up-sampling of NCHW ``x`` to the spatial size of ``like``, as TF1's
    ``resize_nearest_neighbor`` (source index = floor(dst * in / out)). Sizes that double: the
    plain x2 resize. Any other ratio (3x3 -> 5x5 at 320 px): a gather of rows then columns with
    constant indices (:func:`nearest_indices`), which every exporter maps exactly (ONNX and LiteRT
    ``Gather``); LiteRT's converter would turn such a resize into a half-pixel-centre one."""
    h, w = int(like.shape[-2]), int(like.shape[-1])
    ih, iw = int(x.shape[-2]), int(x.shape[-1])
    if h == 2 * ih and w == 2 * iw:
        return F.interpolate(x, scale_factor=2.0, mode='nearest')
    if h != ih:
        x = x.index_select(2, torch.tensor(nearest_indices(ih, h), device=x.device))
    if w != iw:
        x = x.index_select(3, torch.tensor(nearest_indices(iw, w), device=x.device))
    return x if (h, w) != (ih, iw) else x.clone()


def _channel_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """1x1 conv (with bias) + BN: the official ``resample`` channel adjustment."""
    return nn.Sequential(Conv2dStaticSamePadding(in_ch, out_ch, 1), batch_norm(out_ch))


class BiFPN(nn.Module):
    """One BiFPN cell. Input: list of NCHW maps for ``levels`` (or P3–P5 backbone maps when
    ``first_time``); output: list of NCHW maps, one per level, ``num_channels`` each."""

    def __init__(self, num_channels: int, conv_channels: Sequence[int], first_time: bool = False,
                 levels: Sequence[int] = (3, 4, 5, 6, 7), fusion: str = 'fast',
                 pool_pad_value: float = float('-inf'), act: str = 'swish'):
        super().__init__()
        if fusion not in ('fast', 'sum'):
            raise ValueError(f"fusion must be 'fast' or 'sum', got {fusion!r}")
        self.levels = list(levels)
        self.fusion = fusion
        self.first_time = first_time
        self.act = make_activation(act)
        self.pool = MaxPool2dStaticSamePadding(3, 2, pad_value=pool_pad_value)
        top = self.levels[-1]
        for level in self.levels[:-1]:
            setattr(self, f'conv{level}_up', SeparableConvBlock(num_channels))
        for level in self.levels[1:]:
            setattr(self, f'conv{level}_down', SeparableConvBlock(num_channels))
        if first_time:
            c3, c4, c5 = conv_channels
            self.p3_down_channel = _channel_conv(c3, num_channels)
            self.p4_down_channel = _channel_conv(c4, num_channels)
            self.p5_down_channel = _channel_conv(c5, num_channels)
            self.p5_to_p6 = nn.Sequential(Conv2dStaticSamePadding(c5, num_channels, 1), batch_norm(num_channels),
                                          MaxPool2dStaticSamePadding(3, 2, pad_value=pool_pad_value))
            self.p4_down_channel_2 = _channel_conv(c4, num_channels)
            self.p5_down_channel_2 = _channel_conv(c5, num_channels)
        if fusion == 'fast':
            for level in self.levels[:-1]:
                setattr(self, f'p{level}_w1', nn.Parameter(torch.ones(2)))
            for level in self.levels[1:]:
                setattr(self, f'p{level}_w2', nn.Parameter(torch.ones(2 if level == top else 3)))

    def _fuse(self, weight_name: str, nodes: List[torch.Tensor]) -> torch.Tensor:
        if self.fusion == 'sum':
            out = nodes[0]
            for n in nodes[1:]:
                out = out + n
            return out
        w = F.relu(getattr(self, weight_name))
        w = w / (w.sum() + FUSION_EPS)
        out = nodes[0] * w[0]
        for i in range(1, len(nodes)):
            out = out + nodes[i] * w[i]
        return out

    def _inputs(self, inputs: Sequence[torch.Tensor]):
        """Maps level → input for the top-down and the bottom-up paths."""
        if not self.first_time:
            feats = dict(zip(self.levels, inputs))
            return feats, feats
        p3, p4, p5 = inputs
        extra = [self.p5_to_p6(p5)]
        while len(extra) < len(self.levels) - 3:
            extra.append(self.pool(extra[-1]))
        td: Dict[int, torch.Tensor] = {3: self.p3_down_channel(p3), 4: self.p4_down_channel(p4),
                                       5: self.p5_down_channel(p5)}
        bu: Dict[int, torch.Tensor] = {4: self.p4_down_channel_2(p4), 5: self.p5_down_channel_2(p5)}
        for level, f in zip(self.levels[3:], extra):
            td[level] = bu[level] = f
        return td, bu

    def forward(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        td_in, bu_in = self._inputs(inputs)
        top = self.levels[-1]
        # top-down path
        td = {top: td_in[top]}
        prev = td_in[top]
        for level in reversed(self.levels[:-1]):
            up = upsample_to(prev, td_in[level])
            fused = self._fuse(f'p{level}_w1', [td_in[level], up])
            prev = getattr(self, f'conv{level}_up')(self.act(fused))
            td[level] = prev
        # bottom-up path
        outs = [prev]
        for level in self.levels[1:]:
            nodes = [bu_in[level]] + ([td[level]] if level != top else []) + [self.pool(prev)]
            fused = self._fuse(f'p{level}_w2', nodes)
            prev = getattr(self, f'conv{level}_down')(self.act(fused))
            outs.append(prev)
        return outs
