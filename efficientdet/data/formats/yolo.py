"""YOLO (ultralytics layout).

``{root}/images/{split}/*`` and ``{root}/labels/{split}/<stem>.txt``, one line per box:
``class cx cy w h`` with the centre and size normalised to [0, 1] and class the index in obj_list.
An image without a label file is a negative image. Image ids are 1..N in sorted file-name order,
category ids obj_list position + 1.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

from ...errors import UserError
from ..annotations import Issues, categories_for
from ..images import IMAGE_EXTENSIONS, read_image_size
from . import DatasetFormat, SplitData, register_format


class YoloFormat(DatasetFormat):
    name = 'yolo'
    layout = '{root}/images/{split}/*.jpg and {root}/labels/{split}/<stem>.txt'

    def read(self, root_dir: str, split: str, obj_list: Optional[Sequence[str]], issues: Issues,
             require_images: bool = True) -> SplitData:
        if obj_list is None:
            raise UserError('the yolo format needs obj_list (the class names) in the project file')
        self.check_root(root_dir, split)
        image_dir = os.path.join(root_dir, 'images', split)
        label_dir = os.path.join(root_dir, 'labels', split)
        self.need(image_dir, root_dir, split, folder=True)  # YOLO boxes are relative: images always needed
        self.need(label_dir, root_dir, split, folder=True)
        files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        labels = {os.path.splitext(f)[0]: f for f in os.listdir(label_dir) if f.endswith('.txt')}
        stems = set()
        categories = categories_for(obj_list)
        images: List[Dict[str, Any]] = []
        anns: List[Dict[str, Any]] = []
        where: Dict[int, str] = {}
        for image_id, fname in enumerate(files, 1):
            path = os.path.join(image_dir, fname)
            stem = os.path.splitext(fname)[0]
            stems.add(stem)
            hw = read_image_size(path)
            if hw is None:
                issues.add('corrupt_image', f'{path}: not a readable image')
                continue
            h, w = hw
            images.append({'id': image_id, 'file_name': fname, 'height': h, 'width': w})
            if stem in labels:
                _read_labels(os.path.join(label_dir, labels[stem]), image_id, h, w, obj_list, anns, where, issues)
        for stem in sorted(set(labels) - stems):
            issues.add('label_without_image', f'{os.path.join(label_dir, labels[stem])}: no image {stem}.* in '
                                              f'{image_dir}')
        data = {'images': images, 'annotations': anns, 'categories': categories}
        return SplitData(data, image_dir, root_dir, issues, where)


def _read_labels(path: str, image_id: int, h: int, w: int, obj_list: Sequence[str], anns: List[Dict[str, Any]],
                 where: Dict[int, str], issues: Issues) -> None:
    """Append the boxes of one label file (pixels, COCO x/y/w/h) to ``anns``."""
    try:
        with open(path, 'r', encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        issues.add('malformed_file', f'{path}: cannot read ({e})')
        return
    for ln, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        loc = f'{path}:{ln}'
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(parts) != 5 or len(values) != 5 or not all(math.isfinite(v) for v in values) \
                or not values[0].is_integer():
            issues.add('malformed_label', f'{loc}: {line.strip()[:60]!r} is not "class cx cy w h" '
                                          '(an integer class and 4 numbers)')
            continue
        cls, cx, cy, bw, bh = int(values[0]), *values[1:]
        if not (0 <= cls < len(obj_list)) or not obj_list[cls]:
            issues.add('unknown_category', f'{loc}: class {cls} is not a class of obj_list '
                                           f'({len(obj_list)} entries, \'\' ones are placeholders)')
            continue
        aid = len(anns) + 1
        box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
        anns.append({'id': aid, 'image_id': image_id, 'category_id': cls + 1, 'bbox': box,
                     'area': box[2] * box[3], 'iscrowd': 0})
        where[aid] = loc
register_format(YoloFormat())
