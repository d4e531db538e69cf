"""COCO-style evaluation (Yet-Another-EfficientDet-Pytorch conventions).

    put images here        {data_path}/{project_name}/{val_set}/*.jpg
    put annotations here   {data_path}/{project_name}/annotations/instances_{val_set}.json

    python coco_eval.py -p coco -c 0 -w weights/efficientdet-d0.pth
    python coco_eval.py -p coco --results val2017_bbox_results.json     # no model: score a file

Runs the model over the project's validation set, writes ``{val_set}_bbox_results.json`` (COCO
results format: bbox x, y, w, h in original-image pixels), then prints the 12 pycocotools numbers
and a per-class AP table. An existing results file is reused unless ``--override``.
Validation inside ``train.py`` computes mAP through the same function
(``efficientdet.evaluation.run_coco_eval``).
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from efficientdet.cli import str2bool
from efficientdet.errors import UserError, run_cli



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description='COCO mAP of an EfficientDet model on a project\'s val set',
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('-p', '--project', default='coco', help='project name (projects/NAME.yml) or path')
    ap.add_argument('-c', '--compound_coef', type=int, default=0, help='EfficientDet D0-D7 (8 = D7x)')
    ap.add_argument('-w', '--weights', default=None, help='weights file; default weights/efficientdet-d{c}.pth')
    ap.add_argument('--data_path', default='datasets/', help='folder holding {project_name}/')
    ap.add_argument('--projects_dir', default='projects', help='folder of project yml files')
    ap.add_argument('--image_size', type=int, default=None,
                    help='network input size (multiple of 128); default: the variant\'s size')
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
                    help='run the network in float16 (CUDA only)')
    ap.add_argument('--override', type=str2bool, nargs='?', const=True, default=False,
                    help='recompute even if the results file exists')
    ap.add_argument('--max_images', type=int, default=None, help='evaluate only the first K images of the annotation file')
    ap.add_argument('--output_dir', default='.', help='where {val_set}_bbox_results.json is written')
    ap.add_argument('--results', default=None, help='evaluate this COCO results json; no model is run')
    ap.add_argument('--compat', choices=('official', 'zylo117'), default='official',
                    help='zylo117: Yet-Another max-pool padding (for its published weights)')
    ap.add_argument('--no_progress', action='store_true', help='no tqdm bar')
    ap.add_argument('--verbose', action='store_true', help='show pycocotools\' own output')
    return ap


def _device(args: argparse.Namespace):
    import torch
    from efficientdet.cli import parse_device
    if args.cuda is False:
        return torch.device('cpu')
    return parse_device(args.device)


def _load_model(args: argparse.Namespace, project, weights: str, device):
    from efficientdet.checkpoint import load_weights
    from efficientdet.model import EfficientDetBackbone

    if not os.path.isfile(weights):
        raise UserError(f'{weights}: weights file not found; pass -w /path/to/weights.pth')
    model = EfficientDetBackbone(num_classes=len(project.obj_list), compound_coef=args.compound_coef,
                                 ratios=project.anchors_ratios, scales=project.anchors_scales,
                                 compat=args.compat)
    load_weights(model, weights, strict=True, verbose=True)  # UserError when they do not fit
    model.requires_grad_(False)
    model.eval()
    return model.to(device)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from efficientdet.config import check_image_size, get_config
    from efficientdet.data.dataset import CocoDataset, category_mapping
    from efficientdet.evaluation import (COCOEvaluator, format_summary, format_table, load_coco,
                                         load_results_file, run_coco_eval, write_results_json)
    from efficientdet.project import load_project

    if not 0 <= args.compound_coef <= 8:
        raise UserError(f'-c {args.compound_coef}: compound_coef must be 0-8 (8 = D7x)')
    if args.max_images is not None and args.max_images <= 0:
        raise UserError(f'--max_images {args.max_images}: must be a positive number of images')
    size = args.image_size or get_config(args.compound_coef).input_size
    try:
        check_image_size(size, size, args.compound_coef)
    except ValueError as e:
        raise UserError(f'--image_size: {e}') from None
    project = load_project(args.project, args.projects_dir)
    root = os.path.join(args.data_path, project.project_name)
    results_path = args.results or os.path.join(args.output_dir, f'{project.val_set}_bbox_results.json')
    run_model = args.results is None and (args.override or not os.path.exists(results_path))
    img_dir = os.path.join(root, project.val_set)
    if not os.path.isdir(img_dir):
        if run_model:
            raise UserError(f'{img_dir}: validation image folder not found (put the {project.val_set} '
                            f'images there, or fix --data_path / val_set in {project.path})')
        # scoring a results file without the images: every image and annotation of the file counts
        ann_path = os.path.join(root, 'annotations', f'instances_{project.val_set}.json')
        coco = load_coco(ann_path, verbose=args.verbose)
        names, ids, _ = category_mapping(coco.dataset['categories'], project.obj_list, ann_path)
        print(f'note: {img_dir} not found: scoring against every image listed in {ann_path}')
        image_ids = coco.getImgIds()[:args.max_images]
        if not image_ids:
            raise UserError(f'{ann_path}: the validation set {project.val_set!r} lists no images')
    else:
        # One ground truth for both modes: the dataset's cleaned annotations (the images that exist,
        # the entries training uses), so re-scoring a results file gives the model run's mAP.
        dataset = CocoDataset(root, project.val_set, project.obj_list, size, project.mean, project.std,
                              augment=False)
        print(dataset.summary())
        coco, names, ids = dataset.coco, dataset.obj_list, dataset.cat_ids
        image_ids = dataset.image_ids[:args.max_images]

    if run_model:
        if args.batch_size <= 0:
            raise UserError(f'--batch_size {args.batch_size}: must be at least 1')
        device = _device(args)
        weights = args.weights or os.path.join('weights', f'efficientdet-d{args.compound_coef}.pth')
        print(f'running coco-style evaluation on project {project.project_name}, weights {weights}, '
              f'D{args.compound_coef} at {size}px on {device}')
        model = _load_model(args, project, weights, device)
        metrics, results = run_coco_eval(model, dataset, batch_size=args.batch_size, device=device,
                                         score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
                                         nms=args.nms, max_det=args.max_det, half=args.float16,
                                         max_images=args.max_images, progress=not args.no_progress,
                                         num_workers=args.num_workers, verbose=args.verbose)
        write_results_json(results, results_path)
        print(f'wrote {len(results)} detections to {results_path}')
    else:
        if args.results is None:
            print(f'reusing existing {results_path} (pass --override to recompute it)')
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
    return 0


if __name__ == '__main__':
    run_cli(main)
