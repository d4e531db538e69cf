"""Export EfficientDet to ONNX or TorchScript.

    python -m efficientdet.export onnx -c 0 -w weights/efficientdet-d0.pth -p coco --image_size 512 -o d0.onnx
    python -m efficientdet.export onnx -c 0 --num_classes 90 --with-nms -o d0_nms.onnx
    python -m efficientdet.export torchscript -c 0 -w weights/efficientdet-d0.pth -o d0.pt

The exported graph is the BN-folded inference model (``efficientdet.fuse``) with the plain swish,
for one fixed H x W (multiples of 2**max_level) and any batch size. Every export is checked: ONNX
files with ``onnx.checker`` and by running onnxruntime on a random input, TorchScript files by
reloading them; outputs must match the eager PyTorch model within ``--atol`` (1e-4).

ONNX outputs (input ``images`` [B, 3, H, W] normalised RGB):
- default: ``regression`` [B, A, 4] (ty, tx, th, tw), ``classification`` [B, A, C] (after
  sigmoid), ``anchors`` [1, A, 4] (y1, x1, y2, x2) input pixels;
- ``--with-nms``: ``boxes`` [B, max_det, 4] (x1, y1, x2, y2) network-input pixels, ``scores``
  [B, max_det], ``labels`` [B, max_det] int64 0-based, ``num_detections`` [B] int64; rows past
  ``num_detections`` are padding (boxes 0, scores 0, labels -1). The post-processing is the one
  of ``efficientdet.postprocess.detect(nms='hard')``: best class per anchor, score > threshold, at
  most ``pre_nms_topk`` candidates, boxes decoded and clipped to [0, W] x [0, H], greedy NMS per
  class (the standard ONNX ``NonMaxSuppression`` operator, opset >= 11), top ``max_det`` by score.
TorchScript files return ``(regression, classification, anchors)``, traced at the exported size.
"""
from __future__ import annotations

import argparse
import io
import json
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .postprocess import PRE_NMS_TOPK, candidates
from .checkpoint import atomic_write
from .config import CONFIGS, as_hw, check_image_size, get_config
from .errors import UserError, run_cli

__all__ = ['ExportWrapper', 'NMSExportWrapper', 'build_model', 'export_onnx', 'export_torchscript',
           'verify_onnx', 'onnx_nms', 'DEFAULT_OPSET', 'RAW_OUTPUTS', 'NMS_OUTPUTS']

DEFAULT_OPSET = 17
RAW_OUTPUTS = ('regression', 'classification', 'anchors')
NMS_OUTPUTS = ('boxes', 'scores', 'labels', 'num_detections')
INPUT_NAME = 'images'

SizeLike = Union[int, Sequence[int]]




# --------------------------------------------------------------------------- wrappers
class ExportWrapper(nn.Module):
    """``model(x) -> (features, regression, classification, anchors)`` → ``(regression,
    classification, anchors)``: the features are dropped (not needed for inference)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, regression, classification, anchors = self.model(x)
        return regression, classification, anchors


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (center_point_box=0). boxes [B, K, 4] corners, scores [B, C, K]
    -> selected [N, 3] int64 (batch, class, box). The eager forward runs the same greedy NMS per
    (image, class) with ``efficientdet.postprocess.batched_nms`` (suppression when IoU >
    threshold, candidates with score > score_threshold); its row order is not ONNX's, and it does
    not cap each class at ``max_output`` — the wrapper below depends on neither."""

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


class NMSExportWrapper(nn.Module):
    """Model + post-processing with fixed-size outputs (see the module docstring for the format).
    Same detections as ``postprocess.detect(nms='hard', class_agnostic=False)`` at the same
    ``score_threshold``, ``iou_threshold``, ``max_det``, ``pre_nms_topk``."""

    def __init__(self, model: nn.Module, image_size: SizeLike, num_classes: int, score_threshold: float = 0.05,
                 iou_threshold: float = 0.5, max_det: int = 100, pre_nms_topk: int = PRE_NMS_TOPK):
        super().__init__()
        self.model = model
        self.image_size = as_hw(image_size)
        self.num_classes = int(num_classes)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_det = int(max_det)
        self.pre_nms_topk = int(pre_nms_topk)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _, regression, classification, anchors = self.model(x)
        best, labels = classification.max(-1)  # [B, A]
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


# --------------------------------------------------------------------------- model building
def resolve_num_classes(num_classes: Optional[int], project: Optional[str], weights: Optional[str],
                        projects_dir: str = 'projects') -> Tuple[int, Dict[str, object]]:
    """Class count (and anchor settings) from --num_classes, -p PROJECT, or the weights file."""
    extra: Dict[str, object] = {}
    if project is not None:
        from .project import load_project
        proj = load_project(project, projects_dir)
        extra = {'ratios': proj.anchors_ratios, 'scales': proj.anchors_scales, 'obj_list': list(proj.obj_list),
                 'mean': list(proj.mean), 'std': list(proj.std)}
        if num_classes is not None and num_classes != proj.num_classes:
            raise UserError(f'--num_classes {num_classes} contradicts project {project!r}, whose obj_list has '
                            f'{proj.num_classes} classes; pass only one of them')
        return proj.num_classes, extra
    if num_classes is not None:
        if num_classes < 1:
            raise UserError(f'--num_classes {num_classes}: must be at least 1')
        return int(num_classes), extra
    if weights is not None:
        from .checkpoint import infer_num_classes, read_checkpoint
        ck = read_checkpoint(weights)
        n = infer_num_classes(ck.state_dict, 9, ck.layout)
        if n is None:
            raise UserError(f'{weights}: cannot tell how many classes the file holds; pass --num_classes N '
                            'or -p PROJECT')
        return n, extra
    return 90, extra


def load_model_weights(model: nn.Module, path: str) -> None:
    """Exact load through ``checkpoint.load_weights`` (coefficient / class-count checks)."""
    from .checkpoint import load_weights
    load_weights(model, path, strict=True, verbose=False)


def build_model(compound_coef: int, num_classes: Optional[int] = None, weights: Optional[str] = None,
                project: Optional[str] = None, projects_dir: str = 'projects', compat: str = 'official') -> nn.Module:
    """EfficientDetBackbone in eval mode with the plain swish, weights loaded exactly when given
    (random official initialisation otherwise)."""
    from .model import EfficientDetBackbone
    if compound_coef not in CONFIGS:
        raise UserError(f'-c {compound_coef}: compound coefficient must be 0-8 (8 = D7x)')
    n, extra = resolve_num_classes(num_classes, project, weights, projects_dir)
    model = EfficientDetBackbone(num_classes=n, compound_coef=compound_coef, ratios=extra.get('ratios'),
                                 scales=extra.get('scales'), compat=compat)
    if weights is not None:
        load_model_weights(model, weights)
    model.eval()
    model.export_extra = extra  # type: ignore[attr-defined]  # obj_list / mean / std for metadata
    return model


def _check_size(model: nn.Module, image_size: Optional[SizeLike]) -> Tuple[int, int]:
    size = as_hw(image_size if image_size is not None else get_config(model.compound_coef).input_size)
    try:
        check_image_size(size[0], size[1], model.compound_coef)
    except ValueError as e:
        raise UserError(f'--image_size: {e}') from None
    return size


@contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the tracer's warnings about shape-derived Python values (the export is for one
    fixed H x W by design)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def _metadata(model: nn.Module, size: Tuple[int, int], with_nms: bool, wrapper: Optional[nn.Module]) -> Dict[str, str]:
    extra = getattr(model, 'export_extra', {}) or {}
    meta = {'compound_coef': str(model.compound_coef), 'num_classes': str(model.num_classes),
            'image_size': json.dumps(list(size)), 'with_nms': str(bool(with_nms)).lower(),
            'box_format': 'xyxy' if with_nms else 'yxyx anchors, (ty, tx, th, tw) regression',
            'producer': 'efficientdet.export'}
    for key in ('obj_list', 'mean', 'std'):
        if key in extra:
            meta[key] = json.dumps(extra[key])
    if with_nms and wrapper is not None:
        meta.update({'score_threshold': str(wrapper.score_threshold), 'iou_threshold': str(wrapper.iou_threshold),
                     'max_det': str(wrapper.max_det), 'pre_nms_topk': str(wrapper.pre_nms_topk)})
    return meta


# --------------------------------------------------------------------------- ONNX
def export_onnx(model: nn.Module, path: str, image_size: Optional[SizeLike] = None, with_nms: bool = False,
                opset: int = DEFAULT_OPSET, fuse: bool = True, score_threshold: float = 0.05,
                iou_threshold: float = 0.5, max_det: int = 100, pre_nms_topk: int = PRE_NMS_TOPK,
                dynamic_batch: bool = True, verify: bool = True, atol: float = 1e-4) -> Dict[str, float]:
    """Export ``model`` (an EfficientDetBackbone) to ONNX at ``path``; see the module docstring.

    ``fuse``: export the BN-folded model (default; same outputs, smaller graph). ``verify``:
    check with onnx.checker and compare onnxruntime with the eager model on a random input;
    raises UserError beyond ``atol``. Returns {output name: max abs difference} (empty if not
    verified). Uses the TorchScript-based exporter (``dynamo=False``): no onnxscript needed.
    """
    import onnx
    from .fuse import fuse_model
    size = _check_size(model, image_size)
    if with_nms and opset < 11:
        raise UserError(f'--opset {opset}: --with-nms needs opset 11 or newer (NonMaxSuppression)')
    model = model.eval()
    net = fuse_model(model, channels_last=False, image_size=size, fast=False) if fuse else model
    wrapper: nn.Module
    if with_nms:
        wrapper = NMSExportWrapper(net, size, model.num_classes, score_threshold, iou_threshold, max_det, pre_nms_topk)
        names = list(NMS_OUTPUTS)
    else:
        wrapper = ExportWrapper(net)
        names = list(RAW_OUTPUTS)
    wrapper.eval()
    p = next(model.parameters())
    x = torch.randn(1, 3, *size, device=p.device, dtype=p.dtype)
    dyn = {INPUT_NAME: {0: 'batch'}}
    for n in names:
        if n != 'anchors':
            dyn[n] = {0: 'batch'}
    buf = io.BytesIO()
    with _quiet_export(), torch.no_grad():
        torch.onnx.export(wrapper, (x,), buf, input_names=[INPUT_NAME], output_names=names, opset_version=opset,
                          dynamic_axes=dyn if dynamic_batch else None, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in _metadata(model, size, with_nms, wrapper if with_nms else None).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    if not verify:
        return {}
    reference = model if not with_nms else NMSExportWrapper(model, size, model.num_classes, score_threshold,
                                                            iou_threshold, max_det, pre_nms_topk).eval()
    return verify_onnx(path, reference, size, atol=atol, with_nms=with_nms, batch=2 if dynamic_batch else 1)


def verify_onnx(path: str, model: nn.Module, image_size: SizeLike, atol: float = 1e-4, with_nms: bool = False,
                batch: int = 2, seed: int = 0) -> Dict[str, float]:
    """onnx.checker + onnxruntime vs the eager ``model`` on a random batch. ``model`` returns the
    4-tuple of EfficientDetBackbone (raw export) or the NMS wrapper's outputs. Raises UserError
    when an output differs by more than ``atol`` (NMS outputs: same count, labels, boxes/scores
    within atol)."""
    import onnx
    onnx.checker.check_model(path, full_check=True)
    h, w = as_hw(image_size)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, h, w, generator=g)
    from .backends import OnnxRuntimeModel
    out = OnnxRuntimeModel(path).run(x)
    p = next(model.parameters())
    with torch.inference_mode():
        ref = model(x.to(device=p.device, dtype=p.dtype))
    if with_nms:
        return _compare_detections(path, [out[n] for n in NMS_OUTPUTS], ref, atol)
    return _compare_outputs(path, RAW_OUTPUTS, [torch.from_numpy(out[n]) for n in RAW_OUTPUTS], ref[1:], atol)


def _compare_outputs(path: str, names: Sequence[str], got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor],
                     atol: float) -> Dict[str, float]:
    """Exported outputs vs the eager model's, by name: float outputs within ``atol`` absolute and
    relative (boxes are pixels), integer ones equal. UserError naming the file otherwise; returns
    {name: max abs difference}."""
    diffs: Dict[str, float] = {}
    for name, a, b in zip(names, got, ref):
        b = b.detach().float().cpu() if b.dtype.is_floating_point else b.detach().cpu()
        a = a.detach().cpu()
        if a.shape != b.shape:
            raise UserError(f'{path}: output {name} has shape {tuple(a.shape)}, the torch model {tuple(b.shape)}')
        if not a.dtype.is_floating_point:
            diffs[name] = float((a != b).sum())
            if diffs[name]:
                raise UserError(f'{path}: output {name} differs from the torch model in {int(diffs[name])} entries')
            continue
        d = float((a.float() - b).abs().max()) if a.numel() else 0.0
        diffs[name] = d
        if not torch.allclose(a.float(), b, rtol=atol, atol=atol):  # boxes are pixels: relative too
            raise UserError(f'{path}: output {name} differs from the torch model by {d:.3g} (> {atol:g} '
                            f'absolute and relative)')
    return diffs


def _compare_detections(path: str, got: Sequence, ref: Sequence, atol: float, min_match: float = 0.9
                        ) -> Dict[str, float]:
    """NMS outputs of onnxruntime vs torch. Greedy NMS is discontinuous: a pair of boxes whose IoU
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


# --------------------------------------------------------------------------- TorchScript
def export_torchscript(model: nn.Module, path: str, image_size: Optional[SizeLike] = None, fuse: bool = True,
                       channels_last: bool = True, freeze: bool = True, verify: bool = True,
                       atol: float = 1e-4) -> Dict[str, float]:
    """Trace the (fused) model at one H x W to a TorchScript file returning ``(regression,
    classification, anchors)``; ``freeze`` inlines the weights (torch.jit.freeze). Metadata goes
    to the archive's ``extra/meta.json``. Verified by reloading and comparing with the eager
    model. Returns {output name: max abs difference}."""
    from .fuse import fuse_model
    size = _check_size(model, image_size)
    model = model.eval()
    net = fuse_model(model, channels_last=channels_last, image_size=size, fast=False) if fuse else model
    wrapper = ExportWrapper(net).eval()
    p = next(model.parameters())
    x = torch.randn(1, 3, *size, device=p.device, dtype=p.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (x,), check_trace=False)
        if freeze:
            traced = torch.jit.freeze(traced)
    meta = _metadata(model, size, False, None)
    meta['channels_last'] = str(bool(channels_last)).lower()
    with _quiet_export():  # torch.jit.save's deprecation notice
        atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files={'meta.json': json.dumps(meta)}))
    if not verify:
        return {}
    from .backends import TorchScriptModel
    ts = TorchScriptModel(path, device=str(p.device))
    g = torch.Generator().manual_seed(0)
    xv = torch.randn(2, 3, *size, generator=g).to(device=p.device, dtype=p.dtype)
    with torch.inference_mode():
        ref = model(xv)[1:]
        got = ts(xv)[1:]
    return _compare_outputs(path, RAW_OUTPUTS, got, ref, atol)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m efficientdet.export', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='format', required=True)
    for fmt in ('onnx', 'torchscript'):
        p = sub.add_parser(fmt, help=f'export to {fmt}')
        p.add_argument('-c', '--compound_coef', type=int, default=0, help='0-8 (8 = D7x)')
        p.add_argument('-w', '--weights', default=None, help='checkpoint (.pth); random weights when omitted')
        group = p.add_mutually_exclusive_group()
        group.add_argument('--num_classes', type=int, default=None, help='class count (default: from -p, the '
                           'weights file, or 90)')
        group.add_argument('-p', '--project', default=None, help='projects/NAME.yml: classes, anchors, mean/std')
        p.add_argument('--projects_dir', default='projects')
        p.add_argument('--image_size', type=int, nargs='+', default=None,
                       help='network input: N (square) or H W; multiples of 128 (256 for D7x). Default: variant size')
        p.add_argument('--compat', default='official', choices=['official', 'zylo117'])
        p.add_argument('--no-fuse', dest='fuse', action='store_false', help='export the unfused model')
        p.add_argument('--no-verify', dest='verify', action='store_false', help='skip the equivalence check')
        p.add_argument('--atol', type=float, default=1e-4, help='tolerance of the equivalence check')
        p.add_argument('-o', '--output', required=True, help='output file')
        if fmt == 'onnx':
            p.add_argument('--opset', type=int, default=DEFAULT_OPSET)
            p.add_argument('--with-nms', dest='with_nms', action='store_true',
                           help='include decoding + per-class NMS (ONNX NonMaxSuppression); outputs boxes, '
                                'scores, labels, num_detections')
            p.add_argument('--score_threshold', type=float, default=0.05)
            p.add_argument('--iou_threshold', type=float, default=0.5)
            p.add_argument('--max_det', type=int, default=100)
            p.add_argument("--pre_nms_topk", type=int, default=PRE_NMS_TOPK)
            p.add_argument('--static-batch', dest='dynamic_batch', action='store_false',
                           help='fix the batch size to 1 (default: any batch size)')
        else:
            p.add_argument('--no-channels_last', dest='channels_last', action='store_false',
                           help='trace in NCHW-contiguous layout (default: channels_last, faster on CPU)')
            p.add_argument('--no-freeze', dest='freeze', action='store_false', help='do not torch.jit.freeze')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    size: Optional[SizeLike] = None
    if args.image_size is not None:
        if len(args.image_size) not in (1, 2):
            raise UserError('--image_size takes N or H W')
        size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    model = build_model(args.compound_coef, args.num_classes, args.weights, args.project, args.projects_dir,
                        args.compat)
    if args.format == 'onnx':
        if not 0 <= args.score_threshold <= 1 or not 0 <= args.iou_threshold <= 1:
            raise UserError('--score_threshold and --iou_threshold must be between 0 and 1')
        if args.max_det < 1 or args.pre_nms_topk < 1:
            raise UserError('--max_det and --pre_nms_topk must be at least 1')
        diffs = export_onnx(model, args.output, size, with_nms=args.with_nms, opset=args.opset, fuse=args.fuse,
                            score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                            max_det=args.max_det, pre_nms_topk=args.pre_nms_topk,
                            dynamic_batch=args.dynamic_batch, verify=args.verify, atol=args.atol)
    else:
        diffs = export_torchscript(model, args.output, size, fuse=args.fuse, channels_last=args.channels_last,
                                   freeze=args.freeze, verify=args.verify, atol=args.atol)
    hw = _check_size(model, size)
    print(f'wrote {args.output}: efficientdet-d{args.compound_coef}, {model.num_classes} classes, '
          f'input {hw[0]}x{hw[1]}, {args.format}')
    if diffs:
        print('verified against the eager model: ' + ', '.join(f'{k} max|diff| {v:.2g}' for k, v in diffs.items()))
    return 0


if __name__ == '__main__':
    run_cli(main)
