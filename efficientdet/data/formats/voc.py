"""Pascal VOC (VOCdevkit layout).

``{root}/ImageSets/Main/{split}.txt`` (one stem per line), ``{root}/Annotations/{stem}.xml`` and
``{root}/JPEGImages/{file}``. Object names match obj_list; ``<difficult>1</difficult>`` objects
become crowd boxes (``iscrowd`` 1: never positive or negative in training, ignored in evaluation).
VOC's 1-based pixel coordinates become COCO's: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax.
Image ids are 1..N in the list file's order, category ids obj_list position + 1.
"""
from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

from ...errors import UserError
from ..annotations import Issues, categories_for
from ..images import IMAGE_EXTENSIONS, read_image_size
from . import DatasetFormat, SplitData, register_format

_OBJECT_TAG = re.compile(rb'<object[\s>]')


class VocFormat(DatasetFormat):
    name = 'voc'
    layout = ('{root}/ImageSets/Main/{split}.txt, {root}/Annotations/<stem>.xml and '
              '{root}/JPEGImages/<stem>.jpg')

    def read(self, root_dir: str, split: str, obj_list: Optional[Sequence[str]], issues: Issues,
             require_images: bool = True) -> SplitData:
        if obj_list is None:
            raise UserError('the voc format needs obj_list (the class names) in the project file')
        self.check_root(root_dir, split)
        list_file = os.path.join(root_dir, 'ImageSets', 'Main', f'{split}.txt')
        ann_dir, image_dir = os.path.join(root_dir, 'Annotations'), os.path.join(root_dir, 'JPEGImages')
        self.need(list_file, root_dir, split)
        found = self.need(image_dir, root_dir, split, folder=True, required=require_images)
        with open(list_file, 'r', encoding='utf-8', errors='replace') as f:
            stems = [line.split()[0] for line in f if line.strip()]
        categories = categories_for(obj_list)
        cat_of = {c['name']: c['id'] for c in categories}
        images: List[Dict[str, Any]] = []
        anns: List[Dict[str, Any]] = []
        where: Dict[int, str] = {}
        for image_id, stem in enumerate(stems, 1):
            xml_path = os.path.join(ann_dir, f'{stem}.xml')
            parsed = _parse_xml(xml_path, issues)
            if parsed is None:
                continue
            root, lines = parsed
            fname = _image_name(root.findtext('filename'), stem, image_dir)
            size = root.find('size')
            w, h = (_number(size, 'width'), _number(size, 'height')) if size is not None else (None, None)
            if not (w and h and w > 0 and h > 0):
                hw = read_image_size(os.path.join(image_dir, fname))
                if hw is None:
                    issues.add('missing_image' if not os.path.isfile(os.path.join(image_dir, fname))
                               else 'corrupt_image', f'{xml_path}: no <size> and no readable image '
                               f'{os.path.join(image_dir, fname)}')
                    continue
                h, w = hw
            images.append({'id': image_id, 'file_name': fname, 'height': int(h), 'width': int(w)})
            for k, obj in enumerate(root.iter('object')):
                loc = f'{xml_path}:{lines[k] if k < len(lines) else "?"}'
                name = (obj.findtext('name') or '').strip()
                box = obj.find('bndbox')
                coords = [_number(box, t) for t in ('xmin', 'ymin', 'xmax', 'ymax')] if box is not None else [None]
                if not name or any(v is None for v in coords):
                    issues.add('malformed_label', f'{loc}: object without a name or a numeric bndbox '
                                                  '(xmin, ymin, xmax, ymax)')
                    continue
                if name not in cat_of:
                    issues.add('unknown_category', f'{loc}: name {name!r} is not in obj_list')
                    continue
                x1, y1 = coords[0] - 1.0, coords[1] - 1.0
                bw, bh = coords[2] - x1, coords[3] - y1
                difficult = (obj.findtext('difficult') or '0').strip() in ('1', 'true', 'True')
                aid = len(anns) + 1
                anns.append({'id': aid, 'image_id': image_id, 'category_id': cat_of[name],
                             'bbox': [x1, y1, bw, bh], 'area': bw * bh, 'iscrowd': int(difficult)})
                where[aid] = loc
        data = {'images': images, 'annotations': anns, 'categories': categories}
        return SplitData(data, image_dir, root_dir, issues, where, found)


def _parse_xml(path: str, issues: Issues):
    """(root element, line number of each <object>) or None (counted as malformed_file)."""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except FileNotFoundError:
        issues.add('malformed_file', f'{path}: annotation file not found')
        return None
    except OSError as e:
        issues.add('malformed_file', f'{path}: cannot read ({e})')
        return None
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        line, col = getattr(e, 'position', (0, 0))
        issues.add('malformed_file', f'{path}:{line}: bad XML ({str(e).split(":")[0]}, column {col})')
        return None
    lines = [raw.count(b'\n', 0, m.start()) + 1 for m in _OBJECT_TAG.finditer(raw)]
    return root, lines


def _number(node: Optional[ET.Element], tag: str) -> Optional[float]:
    text = node.findtext(tag) if node is not None else None
    try:
        v = float(text) if text is not None else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


def _image_name(filename: Optional[str], stem: str, image_dir: str) -> str:
    """The <filename> when that file exists, else <stem>.<ext> for the first extension found."""
    candidates = ([filename.strip()] if filename and filename.strip() else []) + [stem + e for e in IMAGE_EXTENSIONS]
    for c in candidates:
        if os.path.isfile(os.path.join(image_dir, c)):
            return c
    return candidates[0]


register_format(VocFormat())
