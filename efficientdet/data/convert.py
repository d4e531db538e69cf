"""Write the COCO json that training and evaluation use for a Pascal VOC or YOLO split.

    python -m efficientdet.data.convert voc  -p PROJECT --split val -o instances_val.json
    python -m efficientdet.data.convert yolo -p PROJECT --split train -o instances_train.json \
        [--data_path datasets/] [--projects_dir projects]

Image ids are 1..N in split order (the ImageSets list's order for voc, sorted file names for
yolo), category ids obj_list position + 1 ('' placeholders get none: with no placeholders that is
1..K), VOC difficult objects ``iscrowd`` 1, boxes x, y, w, h in image pixels. These are the ids
``coco_eval.py`` writes in its results for such a project, so ``--results`` files match them.
Entries the reader cannot use are left out and counted (``python -m efficientdet.data.check``
lists them); exit status 1 when anything was left out.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import numpy as np

from ..options import ScriptParser, add_options, add_project_args, project_name
from ..errors import run_cli
from ..project import load_project
from .annotations import SKIPPING, CocoIndex, check_boxes
from .formats import format_names, project_split


def to_coco_json(index: CocoIndex) -> Dict[str, Any]:
    """The cleaned COCO dict of a split, with image file names and no reader-private fields: exactly
    what training reads, so the boxes training leaves out (``bad_box``: no area, outside the image,
    at most 1 px after clipping) are left out here too."""
    data = dict(index.coco_dataset)
    anns = data.get('annotations', [])
    if anns:
        size = {int(im['id']): (float(im.get('height') or np.inf), float(im.get('width') or np.inf))
                for im in data.get('images', [])}
        xywh = np.array([a['bbox'] for a in anns], dtype=np.float64).reshape(-1, 4)
        hw = np.array([size[int(a['image_id'])] for a in anns], dtype=np.float64).reshape(-1, 2)
        keep = check_boxes(xywh, hw)[0]
        data['annotations'] = [a for a, k in zip(anns, keep.tolist()) if k]
    data.setdefault('info', {'description': f'converted from {index.ann_file}'})
    return data


def main(argv: Optional[List[str]] = None) -> int:
    ap = ScriptParser(prog='python -m efficientdet.data.convert',
                      description='Convert a Pascal VOC or YOLO split of a project to COCO json.')
    ap.add_argument('format', choices=[f for f in format_names() if f != 'coco'],
                    help='layout of the dataset folder (also the project\'s dataset_format)')
    add_project_args(ap)
    ap.add_argument('--split', default=None, help='set name, e.g. train or val (default: the project\'s val_set)')
    ap.add_argument('-o', '--output', required=True, help='COCO json to write')
    add_options(ap, 'data_path')
    args = ap.parse_args(argv)
    project = load_project(project_name(args), args.projects_dir)
    project.dataset_format = args.format  # the command line names the layout being converted
    split = args.split or project.val_set
    index = project_split(project, split, args.data_path, max_examples=1)
    data = to_coco_json(index)
    from ..ckpt.files import atomic_write
    atomic_write(args.output, lambda f: json.dump(data, f), binary=False)
    skipped = index.issues.num_skipped
    print(f'{args.output}: {len(data["images"])} images, {len(data["annotations"])} annotations '
          f'({sum(int(a.get("iscrowd", 0)) for a in data["annotations"])} crowd/difficult), '
          f'{len(data["categories"])} categories from {index.ann_file} ({args.format}, split {split})')
    if skipped:
        kinds = ', '.join(f'{k}={v}' for k, v in index.issues.counts.items() if v and k in SKIPPING)
        print(f'left out {skipped} item(s): {kinds} (python -m efficientdet.data.check -p {project_name(args)} lists them)')
        return 1
    return 0


if __name__ == '__main__':
    run_cli(main)
