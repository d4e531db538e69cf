"""List every problem in a project's train and val sets before training, and how well the anchors fit.

    python -m efficientdet.data.check -p shape [--data_path datasets/] [--projects_dir projects]
        [-c 0] [--image_size H [W]] [--json report.json] [--plots DIR]

Any ``dataset_format`` (coco, voc, yolo). Uses the very rules the dataset applies (the format's reader
and :func:`efficientdet.data.annotations.index_coco`), and additionally decodes every image; problems
in VOC / YOLO files are reported with file and line. The anchor fit (:mod:`.anchor_fit`) measures, at
the network input size (``--image_size``, default the variant's), the share of training boxes whose
best anchor IoU is >= 0.5, and suggests ``anchors_scales`` / ``anchors_ratios`` as project-file lines.
``--plots DIR`` also writes pictures (matplotlib): sample images of each set with their ground truth,
histograms of the training boxes' sizes and aspect ratios at the network input with the anchors'
drawn over them, and boxes per class (:func:`check_figures`).
Exit status: 0 when training would use everything, 1 when it would skip something, 2 for a mistake
that stops training altogether (missing folder, bad JSON, obj_list mismatch).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import run_cli
from ..project import Project, load_project
from .annotations import CROWD_CLASS, ISSUES, CocoIndex, Issues
from .formats import load_split, project_split
from .images import load_image_checked


def check_set(root_dir: str, set_name: str, obj_list: Optional[Sequence[str]], read_images: bool = True,
              max_examples: int = 3, workers: Optional[int] = None, dataset_format: str = 'coco') -> CocoIndex:
    """Validate one set; the returned index's ``issues`` also hold decode problems when
    ``read_images``."""
    index = load_split(root_dir, set_name, obj_list, dataset_format, max_examples=max_examples)
    return _decode_all(index, read_images, workers)


def _decode_all(index: CocoIndex, read_images: bool, workers: Optional[int] = None) -> CocoIndex:
    if read_images and len(index.paths):
        workers = workers or min(8, os.cpu_count() or 1)

        def one(k: int) -> List[str]:
            return load_image_checked(str(index.paths[k]), index.sizes[k])[1]

        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, range(len(index.paths))))
        for k, problems in enumerate(results):
            for p in problems:
                index.issues.add(p, f'image id {int(index.image_ids[k])}: {index.paths[k]}')
    return index


def format_report(set_name: str, index: CocoIndex) -> Tuple[str, int]:
    """Readable report of one set and the number of skipped items."""
    issues: Issues = index.issues
    usable = len(index.image_ids) - issues.counts['corrupt_image']
    lines = [f'{set_name}: {usable} usable images, {len(index.labels)} boxes '
             f'({index.num_crowd} crowd), {len(index.names)} classes  [{index.ann_file}]']
    found = [k for k in ISSUES if issues.counts[k]]
    if not found:
        lines.append('  no problems found')
    for k in found:
        what, skips = ISSUES[k]
        tag = 'SKIP' if skips else 'note'
        lines.append(f'  [{tag}] {k}: {issues.counts[k]} - {what}')
        lines += [f'           e.g. {e}' for e in issues.examples[k]]
    return '\n'.join(lines), issues.num_skipped


def _usable_boxes(index: CocoIndex) -> Tuple[np.ndarray, np.ndarray]:
    """Non-crowd boxes [N, 4] xyxy original pixels of ``index`` and their images' (h, w) [N, 2]."""
    keep = index.labels != CROWD_CLASS
    img_of = np.repeat(np.arange(len(index.ranges)), index.ranges[:, 1] - index.ranges[:, 0])
    return index.boxes[keep], index.sizes[img_of[keep]].astype(np.float64)


def anchor_report(index: CocoIndex, project: Project, variant: Any, image_size: Optional[Tuple[int, int]]):
    """Anchor fit of the non-crowd boxes of ``index`` at the variant's levels and anchor scale."""
    from ..config import get_config
    from ..factory import resolve_image_size
    from .anchor_fit import fit_anchors
    cfg = get_config(variant)
    hw = resolve_image_size(variant, image_size)
    boxes, image_hw = _usable_boxes(index)
    return fit_anchors(boxes, image_hw, hw, cfg.levels, cfg.anchor_scale, project.anchors_scales,
                       project.anchors_ratios)


SAMPLE_IMAGES = 16


def _samples(index: CocoIndex, count: int, seed: int = 0) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Up to ``count`` decodable images of ``index`` in a seeded random order, with their boxes
    (xyxy image pixels) and labels (class index, -2 crowd)."""
    out = []
    for k in np.random.default_rng(seed).permutation(len(index.paths)):
        if len(out) >= count:
            break
        img, _ = load_image_checked(str(index.paths[k]))
        if img is None:
            continue
        r0, r1 = index.ranges[k]
        out.append((img, index.boxes[r0:r1], index.labels[r0:r1],
                    f'{os.path.basename(str(index.paths[k]))} ({r1 - r0} boxes)'))
    return out


def check_figures(indices: Dict[str, CocoIndex], project: Project, variant: Any,
                  image_size: Optional[Tuple[int, int]], samples: int = SAMPLE_IMAGES) -> Dict[str, Any]:
    """The data-check pictures by file name: ``samples_{set}.png`` per set, ``box_shapes.png``
    (training boxes letterboxed to the network input, against the anchors of ``variant`` and the
    project at that size, :func:`.anchor_fit.anchor_shapes`) and ``boxes_per_class.png``."""
    from .. import plots
    from ..config import get_config
    from ..factory import resolve_image_size
    from .anchor_fit import IOU_THRESHOLD, anchor_shapes, best_anchor_iou, letterbox_boxes
    cfg = get_config(variant)
    hw = resolve_image_size(variant, image_size)
    figs: Dict[str, Any] = {}
    for set_name, index in indices.items():
        picked = _samples(index, samples)
        figs[f'samples_{set_name.replace(os.sep, "_")}.png'] = plots.samples_figure(
            picked, index.names, f'{set_name}: {len(picked)} of {len(index.paths)} images, ground truth')
    train = indices[project.train_set]
    boxes, image_hw = _usable_boxes(train)
    net = letterbox_boxes(boxes, image_hw, hw)
    w, h = net[:, 2] - net[:, 0], net[:, 3] - net[:, 1]
    anchors = (hw, cfg.levels, cfg.anchor_scale, project.anchors_scales, project.anchors_ratios)
    covered = best_anchor_iou(net, *anchors) >= IOU_THRESHOLD
    sizes, aspects = anchor_shapes(*anchors)
    figs['box_shapes.png'] = plots.box_shapes_figure(np.sqrt(w * h), w / h, covered, sizes, aspects, hw,
                                                     f'{project.train_set}, {cfg.name}')
    real = [i for i, c in enumerate(train.cat_ids) if c >= 0]  # '' placeholders hold no boxes
    counts = {s: np.bincount(ix.labels[ix.labels >= 0], minlength=len(ix.names))[real] for s, ix in indices.items()}
    figs['boxes_per_class.png'] = plots.class_counts_figure([train.names[i] for i in real], counts)
    return figs


def main(argv: Optional[List[str]] = None) -> int:
    from ..options import ScriptParser, add_options, add_project_args, image_size_arg, project_name
    from .anchor_fit import format_fit
    ap = ScriptParser(prog='python -m efficientdet.data.check',
                      description='Check a project\'s datasets for problems that training would skip, and how well '
                                  'its anchors fit the boxes (at the variant and input size of -c / --image_size).')
    add_project_args(ap)
    add_options(ap, 'data_path', 'compound_coef', 'image_size')
    ap.add_argument('--no_images', action='store_true', help='do not decode every image (faster)')
    ap.add_argument('--examples', type=int, default=3, help='examples listed per problem kind')
    ap.add_argument('--no_anchors', action='store_true', help='skip the anchor fit')
    ap.add_argument('--json', default=None, metavar='FILE',
                    help='also write the report (problem counts, anchor_coverage, suggested anchors) as JSON')
    ap.add_argument('--plots', default=None, metavar='DIR',
                    help='also write pictures to DIR (needs matplotlib): sample images with their boxes, box sizes '
                         'and aspect ratios against the anchors, boxes per class')
    args = ap.parse_args(argv)
    variant = args.compound_coef if args.compound_coef is not None else 0
    if args.plots:
        from ..plots import require_matplotlib
        require_matplotlib('--plots', args.plots)
    project = load_project(project_name(args), args.projects_dir)
    size = image_size_arg(args.image_size)
    total = 0
    report: Dict[str, Any] = {'project': project.project_name, 'dataset_format': project.dataset_format, 'sets': {}}
    indices = {}
    for set_name in dict.fromkeys((project.train_set, project.val_set)):
        index = _decode_all(project_split(project, set_name, args.data_path, max_examples=max(args.examples, 0)),
                            not args.no_images)
        indices[set_name] = index
        text, skipped = format_report(set_name, index)
        print(text)
        total += skipped
        report['sets'][set_name] = {'images': int(len(index.image_ids)), 'boxes': int(len(index.labels)),
                                    'skipped': skipped, 'issues': {k: v for k, v in index.issues.counts.items() if v},
                                    'examples': {k: v for k, v in index.issues.examples.items() if v}}
    if not args.no_anchors:
        fit = anchor_report(indices[project.train_set], project, variant, size)
        print(f'{project.train_set}: ' + format_fit(fit))
        report.update(fit.to_json())
    if args.plots:
        from ..plots import write_figures
        write_figures(check_figures(indices, project, variant, size), args.plots)
    report['result'] = 'skips' if total else 'clean'
    if args.json:
        from ..ckpt.files import atomic_write
        atomic_write(args.json, lambda f: json.dump(report, f, indent=1), binary=False)
        print(f'wrote {args.json}')
    if total:
        print(f'result: training would skip {total} item(s); fix them or accept that they are left out')
        return 1
    print('result: clean, training uses everything')
    return 0


if __name__ == '__main__':
    run_cli(main)
