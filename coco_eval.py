"""COCO-style evaluation (Yet-Another-EfficientDet-Pytorch conventions).

    put images here        {data_path}/{project_name}/{val_set}/*.jpg
    put annotations here   {data_path}/{project_name}/annotations/instances_{val_set}.json
    (or a Pascal VOC / YOLO folder: ``dataset_format: voc | yolo`` in the project file; results then
    use the ids of ``python -m efficientdet.data.convert``)

    python coco_eval.py -p shape -c 0                                    # the shipped shapes model
    python coco_eval.py -p coco -c 0 -w efficientdet-d0.pth
    python coco_eval.py -p coco --results results/coco_val2017_bbox_results.json  # no model: score a file

Weights may be any released layout: this project / Yet-Another-EfficientDet-Pytorch ``.pth``,
effdet ``.pth``, official TF variables ``.npz``, or an exported file with ``--backend``. Runs the
model over the project's validation set through the same detector as ``efficientdet_test.py``,
writes ``{output_dir}/{project_name}_{val_set}_bbox_results.json`` (COCO results format: bbox x,
y, w, h in original-image pixels) with a ``.meta.json`` beside it holding everything that made it,
then prints the 12 pycocotools numbers and a per-class AP table. The detections are recomputed on
every run; ``--reuse`` scores an existing results file instead, only when everything that made it
(project, ground truth, data path, weights, runtime, precision, size, normalisation, anchors,
thresholds) is the same, and says so. Validation inside ``train.py`` computes mAP through the same
function (``efficientdet.evaluation.run_coco_eval``).
"""
from __future__ import annotations

import os
from typing import List, Optional

from efficientdet.cli import (ScriptParser, add_data_args, add_inference_args, add_model_args, add_project_args,
                              add_runtime_args, add_weights_arg, detector_from_args, project_name, str2bool)
from efficientdet.errors import run_cli


def build_parser() -> ScriptParser:
    ap = ScriptParser(description="COCO mAP of an EfficientDet model on a project's validation set")
    add_project_args(ap)
    add_model_args(ap)
    add_weights_arg(ap)
    add_data_args(ap, batch_size=1, num_workers=0)
    add_inference_args(ap, threshold=0.05, iou=0.5)
    add_runtime_args(ap)
    ap.add_argument('--reuse', action='store_true',
                    help='score the existing results file instead of recomputing, when everything that made it is '
                         'the same (else it says what differs and recomputes)')
    ap.add_argument('--override', type=str2bool, nargs='?', const=True, default=None, metavar='BOOL',
                    help="Yet-Another's flag: recompute the detections (what this script does unless --reuse)")
    ap.add_argument('--max_images', type=int, default=None,
                    help='evaluate only the first K images of the validation set')
    ap.add_argument('--output_dir', default='results',
                    help='where {project_name}_{val_set}_bbox_results.json is written')
    ap.add_argument('--results', default=None, help='score this COCO results json; no model is run')
    ap.add_argument('--no_progress', action='store_true', help='no progress bar')
    ap.add_argument('--verbose', action='store_true', help="show pycocotools' own output")
    ap.add_argument('--plots', default=None, metavar='DIR',
                    help='also write figures to DIR (needs matplotlib): precision-recall curves, AP per class and '
                         'by object size, confusion matrix at IoU 0.5')
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plots:
        from efficientdet.plots import require_matplotlib
        require_matplotlib('--plots', args.plots)
    from efficientdet.evaluation import evaluate_project, format_summary, format_table, score_results_file
    from efficientdet.project import load_project

    project = load_project(project_name(args), args.projects_dir)
    if args.results:
        metrics = score_results_file(project, args.results, args.data_path, args.max_images, verbose=args.verbose)
    else:
        detector = detector_from_args(args, batch_size=args.batch_size)
        weights = detector.source
        hw = detector.image_size
        print(f'evaluating {weights} ({args.backend}, {hw[0]}x{hw[1]} HxW, {detector.device}) on project '
              f'{project.project_name}, set {project.val_set}')
        results_path = os.path.join(args.output_dir, f'{project.project_name}_{project.val_set}_bbox_results.json')
        metrics = evaluate_project(detector, project, args.data_path, weights=weights, results_path=results_path,
                                   reuse=args.reuse and not args.override, batch_size=args.batch_size,
                                   num_workers=args.num_workers, max_images=args.max_images,
                                   progress=not args.no_progress, verbose=args.verbose)
    print(f'\nBBox ({metrics["num_images"]} images, {metrics["num_detections"]} detections)')
    print(format_summary(metrics))
    print()
    print(format_table(metrics))
    if args.plots:
        from efficientdet.plots import write_eval_plots
        write_eval_plots(metrics, args.plots)
    return 0


if __name__ == '__main__':
    run_cli(main)
