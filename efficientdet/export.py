"""Export EfficientDet for a deploy target (``efficientdet.runtimes``: one module per target).

    python -m efficientdet.export onnx -o d0_shape.onnx          # the shipped shapes model (-p shape -c 0)
    python -m efficientdet.export onnx -c 0 -w efficientdet-d0.pth -p coco --image_size 512 -o d0.onnx
    python -m efficientdet.export onnx -c 0 --num_classes 90 -w random --with_nms -o d0_nms.onnx
    python -m efficientdet.export openvino -c 0 -w efficientdet-d0.pth -p coco -o d0.xml
    python -m efficientdet.export torchscript -c 0 -w efficientdet-d0.pth -p coco -o d0.pt

Every export is the BN-folded inference model (``efficientdet.fuse``) at one H x W (onnx, openvino,
torchscript: any batch size unless ``--static_batch``; tflite: one fixed ``--batch_size``, run in
pieces for larger batches), checked against the eager PyTorch model on a random batch (ONNX
also with ``onnx.checker``): outputs must match within ``--atol`` (1e-4). Outputs, input
``images`` [B, 3, H, W] normalised RGB:

- ``--head best`` (default): ``regression`` [B, A, 4] (ty, tx, th, tw), ``scores`` [B, A] (each
  anchor's best-class probability), ``labels`` [B, A] int64, ``anchors`` [1, A, 4] (y1, x1, y2, x2)
  input pixels — the best class taken in the graph, the fastest for every post-processing here;
- ``--head full``: ``regression``, ``classification`` [B, A, C] after sigmoid, ``anchors``;
- onnx ``--with_nms``: ``boxes`` [B, max_det, 4] (x1, y1, x2, y2) network-input pixels,
  ``scores``, ``labels`` (-1 padding), ``num_detections`` [B] (see ``runtimes.onnx_graph``).

Files carry metadata (variant, classes, input size, mean/std, head) that ``--backend`` in the
scripts (``-w FILE``), ``benchmark.py`` and ``Detector.from_exported`` read.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from .cli import (ScriptParser, add_model_args, add_project_args, add_weights_arg, check_size, model_from_args,
                  project_name)
from .errors import UserError, run_cli
from .runtimes import export_formats, target_for_format
from .runtimes.base import RAW_OUTPUTS, ExportWrapper
from .runtimes.onnx_graph import NMS_OUTPUTS, NMSExportWrapper, compare_detections
from .onnx_ops import onnx_nms

__all__ = ['export_model', 'export_onnx', 'export_openvino', 'export_torchscript', 'ExportWrapper', 'NMSExportWrapper',
           'onnx_nms', 'compare_detections', 'RAW_OUTPUTS', 'NMS_OUTPUTS', 'main']


def export_model(fmt: str, model: nn.Module, path: str, image_size=None, **options) -> Dict[str, float]:
    """Export ``model`` (an EfficientDetBackbone) as ``fmt`` ('onnx', 'openvino', 'torchscript') to
    ``path``; options are the target's (``runtimes.<target>.TARGET.export``). Returns {output: max
    |diff| against the eager model} (empty with ``verify=False``)."""
    return target_for_format(fmt).export(model, path, image_size, **options)


def export_onnx(model: nn.Module, path: str, image_size=None, **options) -> Dict[str, float]:
    """``export_model('onnx', ...)``: options head, with_nms, opset, fuse, score_threshold,
    iou_threshold, max_det, pre_nms_topk, dynamic_batch, verify, atol, obj_list, mean, std."""
    return export_model('onnx', model, path, image_size, **options)


def export_openvino(model: nn.Module, path: str, image_size=None, **options) -> Dict[str, float]:
    """``export_model('openvino', ...)``: an IR ``.xml`` (+ ``.bin``); options as ONNX's, without NMS."""
    return export_model('openvino', model, path, image_size, **options)


def export_torchscript(model: nn.Module, path: str, image_size=None, **options) -> Dict[str, float]:
    """``export_model('torchscript', ...)``: options head, fuse, channels_last, freeze, verify, atol."""
    return export_model('torchscript', model, path, image_size, **options)


def build_parser() -> ScriptParser:
    parser = ScriptParser(prog='python -m efficientdet.export', description=__doc__)
    sub = parser.add_subparsers(dest='format', required=True)
    for fmt in export_formats():
        target = target_for_format(fmt)
        p = sub.add_parser(fmt, help=f'export for --backend {target.name} ({target.suffix})',
                           formatter_class=parser.formatter_class)
        add_project_args(p)
        add_model_args(p)
        add_weights_arg(p)
        p.add_argument('--num_classes', type=int, default=None,
                       help='class count of a model without a project (classes named by index; not with -p)')
        p.add_argument('--no_fuse', '--no-fuse', dest='fuse', action='store_false', help='export the unfused model')
        p.add_argument('--no_verify', '--no-verify', dest='verify', action='store_false',
                       help='skip the check against the eager model')
        p.add_argument('--atol', type=float, default=1e-4, help='tolerance of the check against the eager model')
        p.add_argument('-o', '--output', required=True, help=f'output file ({target.suffix})')
        target.add_export_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    target = target_for_format(args.format)
    check_size(args)
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise UserError(f'--num_classes {args.num_classes}: must be at least 1')
        if args.weights is None:
            raise UserError('--num_classes: pass the weights with -w FILE (or -w random for the official '
                            'initialisation)')
    model = model_from_args(args, allow_random=True)
    project = None
    if args.num_classes is None:
        from .project import load_project
        project = load_project(project_name(args), args.projects_dir)
    # the project's classes and normalisation; the target resolves the latter with what the weights
    # expect (runtimes.base.export_metadata: e.g. 0.5 / 0.5 for AdvProp weights)
    options = dict(target.export_options(args), fuse=args.fuse, verify=args.verify, atol=args.atol,
                   obj_list=list(project.obj_list) if project else None, mean=project.mean if project else None,
                   std=project.std if project else None)
    diffs = target.export(model, args.output, model.image_size, **options)
    hw = model.image_size
    print(f'wrote {args.output}: {model.config.name}, {model.num_classes} classes, input {hw[0]}x{hw[1]}, '
          f'{args.format} (--backend {target.name})')
    if diffs:
        print('verified against the eager model: ' + ', '.join(f'{k} max|diff| {v:.2g}' for k, v in diffs.items()))
    return 0


if __name__ == '__main__':
    run_cli(main)
