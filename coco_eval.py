"""COCO-style evaluation (Yet-Another-EfficientDet-Pytorch conventions).

    put images here        {data_path}/{project_name}/{val_set}/*.jpg
    put annotations here   {data_path}/{project_name}/annotations/instances_{val_set}.json
    (or a Pascal VOC / YOLO folder: ``dataset_format: voc | yolo`` in the project file; results then
    use the ids of ``python -m efficientdet.data.convert``)

    python coco_eval.py -p coco -c 0 -w weights/efficientdet-d0.pth
    python coco_eval.py -p coco --results results/val2017_bbox_results.json     # no model: score a file

Weights may be any released layout: this project / Yet-Another-EfficientDet-Pytorch ``.pth``,
effdet ``.pth``, official TF variables ``.npz``. Runs the model over the project's validation set,
writes ``{output_dir}/{val_set}_bbox_results.json`` (COCO results format: bbox x, y, w, h in
original-image pixels) with a ``.meta.json`` beside it saying which weights, input size and
thresholds made it, then prints the 12 pycocotools numbers and a per-class AP table. An existing
results file is reused only when those all match (and it says so); ``--override`` recomputes.
Validation inside ``train.py`` computes mAP through the same function
(``efficientdet.evaluation.run_coco_eval``).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

from efficientdet.cli import add_backend_args, add_model_args, image_size_arg, str2bool
from efficientdet.errors import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description='COCO mAP of an EfficientDet model on a project\'s val set',
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('-p', '--project', default='coco', help='project name (projects/NAME.yml) or path')
    add_model_args(ap)
    ap.add_argument('-w', '--weights', default=None,
                    help='weights file (.pth of this project / Yet-Another / effdet, or official TF .npz); '
                         'default weights/efficientdet-d{c}.pth')
    ap.add_argument('--data_path', default='datasets/', help='folder holding {project_name}/')
    ap.add_argument('--projects_dir', default='projects', help='folder of project yml files')
    ap.add_argument('--batch_size', type=int, default=1)
    ap.add_argument('--num_workers', type=int, default=0, help='DataLoader workers')
    ap.add_argument('--nms_threshold', type=float, default=0.5, help='NMS IoU threshold')
    ap.add_argument('--score_threshold', type=float, default=0.05, help='drop detections below this score')
    ap.add_argument('--nms', choices=('hard', 'gaussian', 'official'), default='hard', help='NMS flavour')
    ap.add_argument('--max_det', type=int, default=100, help='detections kept per image')
    ap.add_argument('--device', default=None,
                    help='cpu, cuda, cuda:N or a GPU index; default cuda:0 when available, else cpu')
    ap.add_argument('--cuda', type=str2bool, default=None, help='Yet-Another compatibility: False = cpu')
    ap.add_argument('--float16', type=str2bool, nargs='?', const=True, default=False,
                    help='reduced precision: autocast float16 on CUDA / bfloat16 on CPU (torch), bfloat16 or '
                         'float16 inference (openvino); anchors and decoding stay float32')
    add_backend_args(ap)
    ap.add_argument('--override', type=str2bool, nargs='?', const=True, default=False,
                    help='recompute even if a results file made with the same settings exists')
    ap.add_argument('--max_images', type=int, default=None,
                    help='evaluate only the first K images of the annotation file')
    ap.add_argument('--output_dir', default='results', help='where {val_set}_bbox_results.json is written')
    ap.add_argument('--results', default=None, help='evaluate this COCO results json; no model is run')
    ap.add_argument('--no_progress', action='store_true', help='no tqdm bar')
    ap.add_argument('--verbose', action='store_true', help='show pycocotools\' own output')
    ap.add_argument('--plots', default=None, metavar='DIR',
                    help='also write figures to DIR (needs matplotlib): precision-recall curves, AP per class and '
                         'by object size, confusion matrix at IoU 0.5')
    return ap


def _device(args: argparse.Namespace):
    import torch
    from efficientdet.cli import parse_device
    if args.cuda is False:
        return torch.device('cpu')
    return parse_device(args.device)


def _file_digest(path: str) -> str:
    """sha256 of the weights a results file was made with: a file, or every file of a TF checkpoint
    directory (names and contents, in name order)."""
    h = hashlib.sha256()
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path)
             else [path] if os.path.isfile(path) else sorted(glob.glob(glob.escape(path) + '.*')))
    for name in files:
        if os.path.isfile(name):
            h.update(os.path.basename(name).encode())
            with open(name, 'rb') as f:
                for chunk in iter(lambda: f.read(1 << 20), b''):
                    h.update(chunk)
    return h.hexdigest()


def run_settings(args: argparse.Namespace, weights: str, size, project) -> Dict[str, Any]:
    """What decides a results file's content: weights (sha256), variant, input size (H, W), compat,
    thresholds, NMS, max_det, max_images, precision, the class list and the backend. Stored beside
    the results."""
    return {'weights_sha256': _file_digest(weights), 'weights': os.path.abspath(weights),
            'variant': args.compound_coef, 'image_size': list(size), 'compat': args.compat,
            'score_threshold': args.score_threshold, 'nms_threshold': args.nms_threshold, 'nms': args.nms,
            'max_det': args.max_det, 'max_images': args.max_images, 'float16': bool(args.float16),
            'obj_list': list(project.obj_list), 'backend': args.backend}


def _settings_differ(meta_path: str, settings: Dict[str, Any]) -> Optional[str]:
    """None when the stored settings equal ``settings``; else why they do not (one phrase)."""
    if not os.path.isfile(meta_path):
        return f'{meta_path} (which says how the results were made) is missing'
    try:
        with open(meta_path, encoding='utf-8') as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return f'{meta_path} is unreadable'
    diff = [k for k in settings if k != 'weights' and stored.get(k) != settings[k]]
    if not diff:
        return None
    k = diff[0]
    if k == 'weights_sha256':
        return f'they were made with other weights ({stored.get("weights")})'
    return f'they were made with {k}={stored.get(k)!r}, not {settings[k]!r}'


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plots:
        from efficientdet.plots import require_matplotlib
        require_matplotlib('--plots', args.plots)
    from efficientdet.config import get_config, resolve_normalization, variant_tag
    from efficientdet.data import build_dataset
    from efficientdet.evaluation import (COCOEvaluator, format_summary, format_table, load_results_file,
                                         run_coco_eval, write_results_json)
    from efficientdet.factory import build_model, resolve_image_size
    from efficientdet.project import load_project

    if args.max_images is not None and args.max_images <= 0:
        raise UserError(f'--max_images {args.max_images}: must be a positive number of images')
    size = resolve_image_size(args.compound_coef, image_size_arg(args.image_size))
    project = load_project(args.project, args.projects_dir)
    results_path = args.results or os.path.join(args.output_dir, f'{project.val_set}_bbox_results.json')
    meta_path = results_path + '.meta.json'
    weights = args.weights or os.path.join('weights', f'efficientdet-{variant_tag(args.compound_coef)}.pth')
    settings: Optional[Dict[str, Any]] = None
    run_model = args.results is None
    if run_model:
        if not (os.path.exists(weights) or os.path.isfile(weights + '.index')):  # file, TF dir or TF prefix
            raise UserError(f'{weights}: weights file not found; pass -w /path/to/weights.pth')
        settings = run_settings(args, weights, size, project)
        if not args.override and os.path.exists(results_path):
            why = _settings_differ(meta_path, settings)
            if why is None:
                run_model = False
                print(f'reusing {results_path}: made with the same weights, input size and thresholds '
                      '(pass --override to recompute it)')
            else:
                print(f'not reusing {results_path}: {why}; recomputing')
    # One ground truth for both modes, whatever the dataset_format: the dataset's cleaned annotations
    # (the images that exist, the entries training uses), so re-scoring a results file gives the model
    # run's mAP. Scoring a results file works without the images too (every listed image counts).
    mean, std = resolve_normalization(args.compound_coef, project.mean, project.std)
    dataset = build_dataset(project, project.val_set, size, args.data_path, mean=mean, std=std,
                            require_images=run_model)
    print(dataset.summary())
    if not dataset.images_found:
        print(f'note: {dataset.image_dir} not found: scoring against every image listed in {dataset.ann_file}')
    coco, names, ids = dataset.coco, dataset.obj_list, dataset.cat_ids
    image_ids = dataset.image_ids[:args.max_images]

    if run_model:
        if args.batch_size <= 0:
            raise UserError(f'--batch_size {args.batch_size}: must be at least 1')
        device = _device(args)
        print(f'running coco-style evaluation on project {project.project_name}, weights {weights}, '
              f'{get_config(args.compound_coef).name} at {size[0]}x{size[1]} (HxW) on {device}')
        if args.backend == 'torch':
            model = build_model(args.compound_coef, project=project, weights=weights, image_size=size,
                                compat=args.compat, device=device, verbose=True)
            model.requires_grad_(False)
        else:  # an exported file; its runtime has the model's calling contract
            from efficientdet.backends import load_backend
            if args.weights is None:
                raise UserError(f'--backend {args.backend} evaluates an exported file: pass it with -w')
            model = load_backend(args.backend, weights, threads=args.threads, device=str(device),
                                 providers=args.providers, half=bool(args.float16))
        metrics, results = run_coco_eval(model, dataset, batch_size=args.batch_size, device=device,
                                         score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
                                         nms=args.nms, max_det=args.max_det, half=args.float16,
                                         max_images=args.max_images, progress=not args.no_progress,
                                         num_workers=args.num_workers, verbose=args.verbose)
        write_results_json(results, results_path)
        from efficientdet.ckpt.files import atomic_write
        atomic_write(meta_path, lambda f: json.dump(settings, f, indent=1), binary=False)
        print(f'wrote {len(results)} detections to {results_path}')
    else:
        results = load_results_file(results_path)
        evaluator = COCOEvaluator(coco, cat_ids=[c if c >= 0 else None for c in ids], class_names=names,
                                  verbose=args.verbose)
        evaluator.add_results(results, source=results_path)
        metrics = evaluator.compute(image_ids=image_ids)
        if not results:
            print(f'note: {results_path} holds no detections')

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
