"""The ONNX graph of the fused model: written once, run by onnxruntime and read by OpenVINO.

The exported graph is the BN-folded inference model (``efficientdet.fuse``) at one H x W and any
batch size (``dynamic_batch``), input ``images`` [B, 3, H, W] normalised RGB. Outputs:

- head 'best' (default): ``regression`` [B, A, 4] (ty, tx, th, tw), ``scores`` [B, A] (best-class
  probability), ``labels`` [B, A] int64 (0-based), ``anchors`` [1, A, 4] (y1, x1, y2, x2) input
  pixels;
- head 'full': ``regression``, ``classification`` [B, A, C] after sigmoid, ``anchors``;
- ``with_nms``: ``boxes`` [B, max_det, 4] (x1, y1, x2, y2) network-input pixels, ``scores``
  [B, max_det], ``labels`` [B, max_det] int64 0-based, ``num_detections`` [B] int64; rows past
  ``num_detections`` are padding (boxes 0, scores 0, labels -1). The post-processing is
  ``efficientdet.postprocess.detect(nms='hard')``: best class per anchor, score > threshold, at
  most ``pre_nms_topk`` candidates, boxes decoded and clipped to [0, W] x [0, H], greedy NMS per
  class (ONNX ``NonMaxSuppression``, opset >= 11), top ``max_det`` by score.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..ckpt.files import atomic_write
from ..config import as_hw
from ..errors import UserError
from ..onnx_ops import onnx_nms
from ..postprocess import PRE_NMS_TOPK, candidates
from .base import (INPUT_NAME, ExportWrapper, SizeLike, add_head_argument, best_real_class, check_export_size,
                   export_metadata, head_outputs, real_classes)

__all__ = ['export_graph', 'NMSExportWrapper', 'NMS_OUTPUTS', 'DEFAULT_OPSET', 'compare_detections']

DEFAULT_OPSET = 17
NMS_OUTPUTS = ('boxes', 'scores', 'labels', 'num_detections')


class NMSExportWrapper(nn.Module):
    """Model + post-processing with fixed-size outputs (see the module docstring for the format).
    Same detections as ``postprocess.detect(nms='hard', class_agnostic=False)`` at the same
    ``score_threshold``, ``iou_threshold``, ``max_det``, ``pre_nms_topk``."""

    def __init__(self, model: nn.Module, image_size: SizeLike, num_classes: int, score_threshold: float = 0.05,
                 iou_threshold: float = 0.5, max_det: int = 100, pre_nms_topk: int = PRE_NMS_TOPK,
                 obj_list: Optional[Sequence[str]] = None):
        super().__init__()
        self.model = model
        self.real: Optional[torch.Tensor]  # the real classes of obj_list ('' placeholders are never a best class)
        self.register_buffer('real', real_classes(obj_list, num_classes))
        self.image_size = as_hw(image_size)
        self.num_classes = int(num_classes)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_det = int(max_det)
        self.pre_nms_topk = int(pre_nms_topk)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _, regression, logits, anchors = self.model(x, return_logits=True)
        best, labels = best_real_class(logits, self.real)  # [B, A]
        k = min(self.pre_nms_topk, best.shape[1])
        top_scores, boxes, cand_labels = candidates(best, labels, regression, anchors, self.image_size,
                                                    self.score_threshold, k)  # boxes xyxy, anchor order
        classes = torch.arange(self.num_classes, device=x.device).view(1, -1, 1)
        per_class = torch.where(cand_labels.unsqueeze(1) == classes, top_scores.unsqueeze(1),
                                torch.full_like(top_scores.unsqueeze(1), float('-inf')))  # [B, C, K]
        sel = onnx_nms(boxes, per_class, self.max_det, self.iou_threshold, self.score_threshold)
        kept = torch.zeros_like(top_scores, dtype=torch.bool)
        kept[sel[:, 0], sel[:, 2]] = True
        final = torch.where(kept, top_scores, torch.full_like(top_scores, float('-inf')))
        m = min(self.max_det, k)
        out_scores, pos = final.topk(m, dim=1)
        valid = torch.isfinite(out_scores)
        out_boxes = boxes.gather(1, pos.unsqueeze(-1).expand(-1, -1, 4))
        out_boxes = torch.where(valid.unsqueeze(-1), out_boxes, torch.zeros_like(out_boxes))
        out_labels = torch.where(valid, cand_labels.gather(1, pos), torch.full_like(pos, -1))
        out_scores = torch.where(valid, out_scores, torch.zeros_like(out_scores))
        if m < self.max_det:  # fewer candidates than max_det (tiny inputs): pad to the fixed size
            pad = self.max_det - m
            out_boxes = torch.cat([out_boxes, out_boxes.new_zeros(out_boxes.shape[0], pad, 4)], 1)
            out_scores = torch.cat([out_scores, out_scores.new_zeros(out_scores.shape[0], pad)], 1)
            out_labels = torch.cat([out_labels, out_labels.new_full((out_labels.shape[0], pad), -1)], 1)
        return out_boxes, out_scores, out_labels, valid.sum(1)


@contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the tracer's warnings about shape-derived Python values (an export is for one
    fixed H x W by design)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def export_graph(model: nn.Module, path: str, image_size: Optional[SizeLike] = None, with_nms: bool = False,
                 head: str = 'best', opset: int = DEFAULT_OPSET, fuse: bool = True, score_threshold: float = 0.05,
                 iou_threshold: float = 0.5, max_det: int = 100, pre_nms_topk: int = PRE_NMS_TOPK,
                 dynamic_batch: bool = True, obj_list: Optional[Sequence[str]] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
                 ) -> Tuple[nn.Module, Tuple[str, ...], Tuple[int, int]]:
    """Write the ONNX graph of ``model`` (an EfficientDetBackbone) to ``path`` (see the module
    docstring), with metadata. Returns (the eager reference the file must match, its output
    names, (H, W)). TorchScript-based exporter (``dynamo=False``): no onnxscript needed."""
    import onnx
    from ..fuse import fuse_model
    size = check_export_size(model, image_size)
    if with_nms and opset < 11:
        raise UserError(f'--opset {opset}: --with-nms needs opset 11 or newer (NonMaxSuppression)')
    model = model.eval()
    net = fuse_model(model, channels_last=False, image_size=size, fast=False) if fuse else model
    wrapper: nn.Module
    extra: Dict[str, object] = {}
    if with_nms:
        wrapper = NMSExportWrapper(net, size, model.num_classes, score_threshold, iou_threshold, max_det, pre_nms_topk,
                                   obj_list)
        reference: nn.Module = NMSExportWrapper(model, size, model.num_classes, score_threshold, iou_threshold,
                                                max_det, pre_nms_topk, obj_list).eval()
        names: Tuple[str, ...] = NMS_OUTPUTS
        extra = {'with_nms': 'true', 'box_format': 'xyxy', 'score_threshold': score_threshold,
                 'iou_threshold': iou_threshold, 'max_det': max_det, 'pre_nms_topk': pre_nms_topk}
    else:
        wrapper, reference, names = ExportWrapper(net, size, head, obj_list), model, head_outputs(head)
    wrapper.eval()
    p = next(model.parameters())
    x = torch.randn(1, 3, *size, device=p.device, dtype=p.dtype)
    dyn = {INPUT_NAME: {0: 'batch'}}
    dyn.update({n: {0: 'batch'} for n in names if n != 'anchors'})
    buf = io.BytesIO()
    with quiet_export(), torch.no_grad():
        torch.onnx.export(wrapper, (x,), buf, input_names=[INPUT_NAME], output_names=list(names),
                          opset_version=opset, dynamic_axes=dyn if dynamic_batch else None, do_constant_folding=True,
                          dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in export_metadata(model, size, head, obj_list, mean, std, extra).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return reference, names, size


def compare_detections(path: str, got: Sequence, ref: Sequence, atol: float, min_match: float = 0.9
                       ) -> Dict[str, float]:
    """NMS outputs of a runtime vs torch. Greedy NMS is discontinuous: a pair of boxes whose IoU
    sits within float rounding of the threshold, or two near-equal scores, can flip a choice, so
    detections are matched instead of compared position by position: every detection must have
    one of the same label within ``atol`` (relative) in the other output, for at least
    ``min_match`` of them. Returns {'matched': fraction, 'count_diff': total count difference}."""
    boxes_a, scores_a, labels_a, n_a = (torch.as_tensor(np.asarray(v)) for v in got)
    boxes_b, scores_b, labels_b, n_b = (v.detach().cpu() for v in ref)
    total, matched = 0, 0
    for i in range(boxes_b.shape[0]):
        ka, kb = int(n_a[i]), int(n_b[i])
        ba, bb = boxes_a[i, :ka].float(), boxes_b[i, :kb].float()
        close = ((ba[:, None] - bb[None]).abs() <= atol * (1 + bb[None].abs())).all(-1)
        close &= labels_a[i, :ka][:, None] == labels_b[i, :kb][None]
        close &= (scores_a[i, :ka][:, None].float() - scores_b[i, :kb][None].float()).abs() <= atol
        total += max(ka, kb)
        matched += min(int(close.any(1).sum()), int(close.any(0).sum()))
    frac = matched / total if total else 1.0
    diff = float((n_a.long() - n_b.long()).abs().sum())
    if frac < min_match:
        raise UserError(f'{path}: only {frac:.0%} of the detections match the torch model\'s')
    return {'matched': frac, 'count_diff': diff}


def verify(path: str, runtime, reference: nn.Module, names: Sequence[str], size: Tuple[int, int], atol: float,
           batch: int = 2) -> Dict[str, float]:
    """``runtime`` (a loaded export of ``path``) vs the eager ``reference`` on a fixed random batch
    (``base.verify_export``; a --with-nms graph by its detections)."""
    from .base import random_batch, verify_export
    if 'num_detections' not in names:
        return verify_export(path, runtime, reference, size, atol, batch)
    x = random_batch(size, batch)
    out = runtime.run(x)
    p = next(reference.parameters())
    with torch.inference_mode():
        ref = reference(x.to(device=p.device, dtype=p.dtype))
    return compare_detections(path, [out[n] for n in names], ref, atol)


def add_graph_arguments(p) -> None:
    """ONNX graph options shared by the onnx and openvino export targets."""
    add_head_argument(p)
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET, help='ONNX opset version')
    p.add_argument('--static_batch', '--static-batch', dest='dynamic_batch', action='store_false',
                   help='fix the batch size to 1 (default: any batch size)')
