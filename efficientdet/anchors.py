"""Anchor generation and box coding (official ``anchors.py`` / Faster R-CNN box coder).

Coordinate conventions, used everywhere in this package unless a name says otherwise:
- anchors and decoded boxes are (y1, x1, y2, x2) in input-image pixels ("yxyx");
- regression codes are (ty, tx, th, tw);
- the Yet-Another-compatible ``BBoxTransform`` returns (x1, y1, x2, y2) ("xyxy").
Anchor order: level (P3 first), then row, column, then (scale, ratio) with ratio fastest —
the order of the heads' flattened outputs.
"""
from __future__ import annotations

import itertools
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_SCALES, OFFICIAL_RATIOS


def generate_anchors(image_size: Tuple[int, int], levels: Sequence[int], anchor_scale: float = 4.0,
                     scales: Sequence[float] = DEFAULT_SCALES,
                     ratios: Sequence[Tuple[float, float]] = OFFICIAL_RATIOS) -> np.ndarray:
    """Official anchors, float64 numpy [A, 4] (y1, x1, y2, x2) in pixels of an (H, W) image.

    ``ratios`` are (x, y) multipliers of the base size (official aspect 2.0 == (sqrt 2, 1/sqrt 2)).
    Feature-map sizes follow the official successive ceil-halving of the image size; a level's
    strides are image size / feature size per axis (320 px, 3x3 P7: 106.67 px), the base size is
    ``anchor_scale * stride * octave`` per axis and centres start at stride / 2 (official
    ``Anchors._generate_boxes``), so non-square inputs with unequal strides follow the official too.
    """
    h, w = int(image_size[0]), int(image_size[1])
    combos = np.array([(s, rx, ry) for s, (rx, ry) in itertools.product(scales, ratios)], dtype=np.float64)
    out = []
    fh, fw = h, w
    for level in range(1, max(levels) + 1):
        fh, fw = (fh + 1) // 2, (fw + 1) // 2  # ceil: the official feat_sizes
        if level not in levels:
            continue
        sy, sx = h / fh, w / fw  # official strides (image / feature size)
        y = np.arange(sy / 2, h, sy)[:fh]
        x = np.arange(sx / 2, w, sx)[:fw]
        xv, yv = np.meshgrid(x, y)  # [fh, fw]
        half_x = (anchor_scale * sx * combos[:, 0] * combos[:, 1] / 2.0)[None, :]
        half_y = (anchor_scale * sy * combos[:, 0] * combos[:, 2] / 2.0)[None, :]
        cy = yv.reshape(-1, 1)
        cx = xv.reshape(-1, 1)
        boxes = np.stack([cy - half_y, cx - half_x, cy + half_y, cx + half_x], axis=-1)  # [HW, K, 4]
        out.append(boxes.reshape(-1, 4))
    return np.concatenate(out, axis=0)


class Anchors(nn.Module):
    """Anchors for an input batch: ``forward(image [B,C,H,W]) -> [1, A, 4]`` (y1, x1, y2, x2) pixels.

    Cached per (H, W, device, dtype); they follow the real H and W of the input.
    """

    def __init__(self, anchor_scale: float = 4.0, pyramid_levels: Sequence[int] | None = None,
                 scales: Sequence[float] | None = None, ratios: Sequence[Tuple[float, float]] | None = None,
                 **kwargs):
        super().__init__()
        self.anchor_scale = float(anchor_scale)
        self.pyramid_levels = list(pyramid_levels) if pyramid_levels is not None else [3, 4, 5, 6, 7]
        self.scales = tuple(float(s) for s in (scales if scales is not None else DEFAULT_SCALES))
        self.ratios = tuple((float(a), float(b)) for a, b in (ratios if ratios is not None else OFFICIAL_RATIOS))
        self._cache: Dict[tuple, torch.Tensor] = {}

    @property
    def num_anchors(self) -> int:
        return len(self.scales) * len(self.ratios)

    def for_size(self, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
        key = (int(height), int(width), str(device), dtype)
        if key not in self._cache:
            a = generate_anchors((height, width), self.pyramid_levels, self.anchor_scale, self.scales, self.ratios)
            self._cache[key] = torch.from_numpy(a).to(device=device, dtype=dtype).unsqueeze(0)
        return self._cache[key]

    def forward(self, image: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.for_size(image.shape[-2], image.shape[-1], image.device, dtype or image.dtype)


def decode_boxes(rel_codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(ty, tx, th, tw) codes [..., A, 4] + anchors [..., A, 4] yxyx → boxes yxyx (official decode)."""
    ya = (anchors[..., 0] + anchors[..., 2]) / 2
    xa = (anchors[..., 1] + anchors[..., 3]) / 2
    ha = anchors[..., 2] - anchors[..., 0]
    wa = anchors[..., 3] - anchors[..., 1]
    ty, tx, th, tw = rel_codes.unbind(-1)
    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    yc = ty * ha + ya
    xc = tx * wa + xa
    return torch.stack([yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0], dim=-1)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Boxes yxyx + anchors yxyx (broadcastable) → (ty, tx, th, tw) (official Faster R-CNN coder)."""
    ya = (anchors[..., 0] + anchors[..., 2]) / 2
    xa = (anchors[..., 1] + anchors[..., 3]) / 2
    ha = anchors[..., 2] - anchors[..., 0] + eps
    wa = anchors[..., 3] - anchors[..., 1] + eps
    y = (boxes[..., 0] + boxes[..., 2]) / 2
    x = (boxes[..., 1] + boxes[..., 3]) / 2
    h = boxes[..., 2] - boxes[..., 0] + eps
    w = boxes[..., 3] - boxes[..., 1] + eps
    return torch.stack([(y - ya) / ha, (x - xa) / wa, torch.log(h / ha), torch.log(w / wa)], dim=-1)


class BBoxTransform(nn.Module):
    """Yet-Another-compatible decoder: ``forward(anchors yxyx, regression) -> boxes (x1, y1, x2, y2)``."""

    def forward(self, anchors: torch.Tensor, regression: torch.Tensor) -> torch.Tensor:
        y1, x1, y2, x2 = decode_boxes(regression, anchors).unbind(-1)
        return torch.stack([x1, y1, x2, y2], dim=-1)


class ClipBoxes(nn.Module):
    """Yet-Another-compatible clipping of xyxy boxes [B, A, 4] to the image [B, C, H, W]
    (x1, y1 >= 0; x2 <= W - 1; y2 <= H - 1), in place, as theirs does."""

    def forward(self, boxes: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[-2:]
        boxes[..., 0].clamp_(min=0)
        boxes[..., 1].clamp_(min=0)
        boxes[..., 2].clamp_(max=width - 1)
        boxes[..., 3].clamp_(max=height - 1)
        return boxes
