"""ONNX-specific pieces: eager ops that export as the ONNX node runtimes run fastest.

- :func:`padded_conv`: zero padding + conv in eager mode, ONE ``Conv`` node with asymmetric
  ``pads`` in ONNX (no ``Pad`` node: one copy of the feature map less per stride-2 conv);
- :func:`padded_max_pool`: a TF "SAME" max-pool as ONE ``MaxPool`` node with explicit ``pads``
  (padding never wins the max, TF's rule) rather than ``ceil_mode``, which OpenVINO rejects when
  the window is larger than a tiny map (P6 -> P7 at small sizes);
- :func:`onnx_nms`: per-class greedy NMS in eager mode, the standard ``NonMaxSuppression``
  operator (opset >= 11) in ONNX.

Only ``torch.onnx.export`` (the TorchScript-based exporter) sees the symbolic forms; eager
results are the same numbers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ['exporting', 'padded_conv', 'padded_max_pool', 'onnx_nms']


def exporting() -> bool:
    """True while ``torch.onnx.export`` traces the model (asked on every layer call: the cheap
    tracing check first)."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


def _ints(values: Sequence[int]) -> tuple:
    """Plain Python ints (sizes read from shapes while tracing are traced values)."""
    return tuple(int(v) for v in values)


class _PaddedConv(torch.autograd.Function):
    """Eager: zero-pad (left, right, top, bottom) then conv. ONNX: one Conv with asymmetric ``pads``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pad, groups):  # type: ignore[override]
        return F.conv2d(F.pad(x, pad), weight, bias, stride, 0, 1, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, stride, pad, groups):
        left, right, top, bottom = pad
        kernel = weight.type().sizes()[2:]
        args = [x, weight] if bias is None or bias.node().mustBeNone() else [x, weight, bias]
        return g.op('Conv', *args, kernel_shape_i=list(kernel), strides_i=list(stride),
                    pads_i=[top, left, bottom, right], group_i=groups, dilations_i=[1, 1])


def padded_conv(x: torch.Tensor, weight: torch.Tensor, bias, stride: Sequence[int], pad: Sequence[int],
                groups: int) -> torch.Tensor:
    """``conv2d(pad(x, pad), weight, bias, stride, groups=groups)``, pad = (left, right, top,
    bottom) zeros, dilation 1; exported as one ``Conv`` with ``pads``."""
    return _PaddedConv.apply(x, weight, bias, _ints(stride), _ints(pad), int(groups))


class _PaddedMaxPool(torch.autograd.Function):
    """Eager: -inf padding (left, right, top, bottom) then max-pool. ONNX: one MaxPool with ``pads``."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pad):  # type: ignore[override]
        return F.max_pool2d(F.pad(x, pad, value=float('-inf')), kernel, stride)

    @staticmethod
    def symbolic(g, x, kernel, stride, pad):
        left, right, top, bottom = pad
        return g.op('MaxPool', x, kernel_shape_i=list(kernel), strides_i=list(stride),
                    pads_i=[top, left, bottom, right])


def padded_max_pool(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int]
                    ) -> torch.Tensor:
    """``max_pool2d(pad(x, pad, -inf), kernel, stride)``, pad = (left, right, top, bottom);
    exported as one ``MaxPool`` with ``pads``."""
    return _PaddedMaxPool.apply(x, _ints(kernel), _ints(stride), _ints(pad))


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (center_point_box=0). boxes [B, K, 4] corners, scores [B, C, K]
    -> selected [N, 3] int64 (batch, class, box). The eager forward runs the same greedy NMS per
    (image, class) with ``efficientdet.postprocess.batched_nms`` (suppression when IoU >
    threshold, candidates with score > score_threshold); its row order is not ONNX's, and it does
    not cap each class at ``max_output`` — callers must depend on neither."""

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_output: torch.Tensor,
                iou_threshold: torch.Tensor, score_threshold: torch.Tensor) -> torch.Tensor:
        from .postprocess import batched_nms
        b, c, k = scores.shape
        sel = (scores > score_threshold).nonzero()  # [M, 3] (batch, class, box)
        if sel.shape[0] == 0:
            return torch.zeros((0, 3), dtype=torch.long, device=scores.device)
        cand_boxes = boxes[sel[:, 0], sel[:, 2]]
        cand_scores = scores[sel[:, 0], sel[:, 1], sel[:, 2]]
        keep = batched_nms(cand_boxes.float(), cand_scores.float(), sel[:, 0] * c + sel[:, 1],
                           float(iou_threshold))
        return sel[keep]

    @staticmethod
    def symbolic(g, boxes, scores, max_output, iou_threshold, score_threshold):
        return g.op('NonMaxSuppression', boxes, scores, max_output, iou_threshold, score_threshold,
                    center_point_box_i=0)


def onnx_nms(boxes: torch.Tensor, scores: torch.Tensor, max_output: int, iou_threshold: float,
             score_threshold: float) -> torch.Tensor:
    """Per-class greedy NMS that exports as ONNX ``NonMaxSuppression``: boxes [B, K, 4] corners,
    scores [B, C, K] -> selected (batch, class, box) rows [N, 3] int64."""
    return _NonMaxSuppression.apply(boxes, scores, torch.tensor([int(max_output)], dtype=torch.long),
                                    torch.tensor([float(iou_threshold)], dtype=torch.float32),
                                    torch.tensor([float(score_threshold)], dtype=torch.float32))
