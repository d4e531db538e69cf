"""Box and class prediction nets (official ``box_net`` / ``class_net``).

Convs are shared across levels, BatchNorms are per level: for each repeat
separable conv → BN(level) → activation (swish; ReLU6 for Lite), then a separable ``header`` conv.
Outputs are anchor-major per location, flattened level by level (P3 first), row-major:
regression [B, A, 4] as (ty, tx, th, tw); class logits [B, A, num_classes].
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from .layers import SeparableConvBlock, batch_norm, make_activation

MASKED_LOGIT = -1e4  # added to the logits of left-out (placeholder) classes: sigmoid exactly 0 in float32


class _HeadNet(nn.Module):
    def __init__(self, in_channels: int, num_anchors: int, num_outputs: int, num_layers: int,
                 pyramid_levels: int = 5, act: str = 'swish'):
        super().__init__()
        self.num_outputs = num_outputs
        self.conv_list = nn.ModuleList(
            [SeparableConvBlock(in_channels, in_channels, norm=False) for _ in range(num_layers)])
        self.bn_list = nn.ModuleList(
            [nn.ModuleList([batch_norm(in_channels) for _ in range(num_layers)]) for _ in range(pyramid_levels)])
        self.header = SeparableConvBlock(in_channels, num_anchors * num_outputs, norm=False)
        self.act = make_activation(act)

    def forward_raw(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        outs: List[torch.Tensor] = []
        for feat, bns in zip(features, self.bn_list):
            x = feat
            for conv, bn in zip(self.conv_list, bns):
                x = self.act(bn(conv(x)))
            x = self.header(x)  # [B, anchors*outputs, H, W]
            outs.append(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.num_outputs))
        return torch.cat(outs, dim=1)


class Regressor(_HeadNet):
    """Box regression head: features → [B, A, 4] (ty, tx, th, tw)."""

    def __init__(self, in_channels: int, num_anchors: int, num_layers: int, pyramid_levels: int = 5,
                 act: str = 'swish'):
        super().__init__(in_channels, num_anchors, 4, num_layers, pyramid_levels, act)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_raw(features)


class Classifier(_HeadNet):
    """Classification head: features → [B, A, num_classes] probabilities (sigmoid).
    ``forward_raw`` gives the logits (used by the loss)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_layers: int,
                 pyramid_levels: int = 5, act: str = 'swish'):
        super().__init__(in_channels, num_anchors, num_classes, num_layers, pyramid_levels, act)
        self.num_classes = num_classes

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.forward_raw(features))

    @torch.no_grad()
    def leave_out_(self, allowed: torch.Tensor) -> None:
        """In place, for an inference copy (``fuse.fuse_model``): the logits of the classes not in
        ``allowed`` (bool [C], ``postprocess.class_mask``) lowered by :data:`MASKED_LOGIT` through the
        header's bias (channel = anchor * C + class), so they are never an anchor's best class and
        their sigmoid is 0; no work per call."""
        bias = self.header.pointwise_conv.conv.bias
        bias.view(-1, self.num_classes)[:, ~allowed.to(bias.device)] += MASKED_LOGIT


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """TF ``VarianceScaling(scale, 'fan_in', 'truncated_normal')`` for a conv weight OIHW."""
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    std = math.sqrt(scale / max(1, fan_in)) / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def init_head_(head: _HeadNet, prior: float | None = None) -> None:
    """Official initialisation: variance-scaling (fan-in, truncated normal) separable kernels,
    zero biases; the classifier's last bias set to -log((1 - prior) / prior) so initial scores
    equal ``prior``."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            variance_scaling_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if prior is not None:
        nn.init.constant_(head.header.pointwise_conv.conv.bias, -math.log((1 - prior) / prior))
