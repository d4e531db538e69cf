"""List every problem in a project's train and val sets before training.

    python -m efficientdet.data.check -p shape [--data_path datasets/] [--projects_dir projects]

Uses the very rules the dataset applies (:func:`efficientdet.data.dataset.index_coco` and
:func:`~efficientdet.data.dataset.load_image_checked`), and additionally decodes every image.
Exit status: 0 when training would use everything, 1 when it would skip something, 2 for a
mistake that stops training altogether (missing folder, bad JSON, obj_list mismatch).
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

from ..errors import run_cli
from ..project import load_project
from .dataset import ISSUES, CocoIndex, Issues, dataset_paths, index_coco, load_coco_json, load_image_checked


def check_set(root_dir: str, set_name: str, obj_list: Optional[Sequence[str]], read_images: bool = True,
              max_examples: int = 3, workers: Optional[int] = None) -> CocoIndex:
    """Validate one set; the returned index's ``issues`` also hold decode problems when
    ``read_images``."""
    ann_file, image_dir = dataset_paths(root_dir, set_name)
    index = index_coco(load_coco_json(ann_file), ann_file, image_dir, obj_list, max_examples=max_examples)
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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description='Check a project\'s datasets for problems that training would skip.')
    ap.add_argument('-p', '--project', default='coco', help='project name (projects/NAME.yml) or path to a yml')
    ap.add_argument('--data_path', default='datasets/', help='folder holding {project_name}/')
    ap.add_argument('--projects_dir', default='projects')
    ap.add_argument('--no_images', action='store_true', help='do not decode every image (faster)')
    ap.add_argument('--examples', type=int, default=3, help='examples listed per problem kind')
    args = ap.parse_args(argv)
    project = load_project(args.project, args.projects_dir)
    root = os.path.join(args.data_path, project.project_name)
    total = 0
    for set_name in dict.fromkeys((project.train_set, project.val_set)):
        index = check_set(root, set_name, project.obj_list, not args.no_images, max(args.examples, 0))
        text, skipped = format_report(set_name, index)
        print(text)
        total += skipped
    if total:
        print(f'result: training would skip {total} item(s); fix them or accept that they are left out')
        return 1
    print('result: clean, training uses everything')
    return 0


if __name__ == '__main__':
    run_cli(main)
