"""COCO-style annotations: the one reader and validator, and the one category rule.

Every dataset format (COCO json, Pascal VOC, YOLO; see :mod:`efficientdet.data.formats`) is turned
into the same in-memory COCO instances dict, and this module is the only place that validates such a
dict (:func:`index_coco`) — for training (the dataset skips and counts bad entries), for
``python -m efficientdet.data.check`` (which lists them) and for evaluation ground truth
(:func:`load_ground_truth`, ``strict``: a structural problem is an error).

The category rule (:func:`resolve_categories`): model class index ``i`` is the dataset category whose
name is ``obj_list[i]``; ``''`` entries of obj_list are placeholders that match no category (the
90-slot COCO label map has them at the ten unused ids); no obj_list means the file's categories in id
order. Each problem kind is described once in :data:`ISSUES`.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError

CROWD_CLASS = -2
# Boxes whose width or height is at most this many image pixels after clipping are dropped.
MIN_BOX_PIXELS = 1.0
# Boxes reaching less than this far outside the image are clipped without being reported.
CLIP_TOLERANCE = 0.5
MAX_EXAMPLES = 3

# kind → (what it means, whether training skips something because of it)
ISSUES: Dict[str, Tuple[str, bool]] = {
    'malformed_file': ('annotation files missing or unreadable, e.g. bad XML (their image skipped)', True),
    'malformed_label': ('label entries that cannot be read: a YOLO line that is not "class cx cy w h", a VOC '
                        'object without name or bndbox (skipped)', True),
    'label_without_image': ('label files without an image of the same name (skipped)', True),
    'image_missing_fields': ('image entries without a valid id / file_name / height / width (skipped)', True),
    'duplicate_image_id': ('image entries repeating an earlier id (skipped)', True),
    'missing_image': ('image files that do not exist (skipped)', True),
    'corrupt_image': ('image files that cannot be decoded (skipped)', True),
    'annotation_missing_fields': ('annotations without a valid id / image_id / category_id / bbox (skipped)', True),
    'duplicate_annotation_id': ('annotations repeating an earlier id (skipped)', True),
    'unknown_image': ('annotations whose image_id is not in "images" (skipped)', True),
    'unknown_category': ('annotations whose category is not in obj_list / "categories" (skipped)', True),
    'bad_box': ('boxes with non-positive size, outside the image or at most 1 px after clipping (dropped)', True),
    'box_clipped': ('boxes partly outside the image (clipped to it)', False),
    'size_mismatch': ('image files whose size differs from the annotated height/width (boxes clipped to the file)',
                      False),
    'truncated_image': ('JPEG files without an end marker (decoded partly)', False),
    'image_without_annotations': ('images without any usable box (kept as negatives)', False),
}
SKIPPING = tuple(k for k, (_, skips) in ISSUES.items() if skips)
# Kinds that make evaluation ground truth unusable (load_ground_truth raises on them).
STRUCTURAL = ('image_missing_fields', 'duplicate_image_id', 'annotation_missing_fields', 'duplicate_annotation_id',
              'unknown_image', 'unknown_category')


@dataclass
class Issues:
    """Counters and a few examples per problem kind (keys of :data:`ISSUES`)."""
    max_examples: int = MAX_EXAMPLES
    counts: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in ISSUES})
    examples: Dict[str, List[str]] = field(default_factory=lambda: {k: [] for k in ISSUES})

    def add(self, kind: str, example: str = '', n: int = 1) -> None:
        self.counts[kind] += n
        if example and len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(example)

    @property
    def num_skipped(self) -> int:
        return sum(self.counts[k] for k in SKIPPING)


# ----------------------------------------------------------------------------- reading
def load_coco_json(ann_file: str) -> Dict[str, Any]:
    """Read a COCO annotation file (the one reader of annotation json: dataset, checker, converter
    and evaluator); UserError naming the file when it is missing, not JSON or not COCO-shaped."""
    what = 'not a COCO instances annotation file'
    try:
        with open(ann_file, 'rb') as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f'{ann_file}: annotation file not found (expected a COCO instances json, e.g. '
                        'datasets/<project>/annotations/instances_<set>.json)') from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'{ann_file}: cannot read annotation file ({e})') from None
    except json.JSONDecodeError as e:
        raise UserError(f'{ann_file}: not a JSON file ({e}); re-export it in COCO format') from None
    if not isinstance(data, dict):
        raise UserError(f'{ann_file}: {what}: expected a JSON object with "images", "annotations" and '
                        '"categories"')
    missing = [k for k in ('images', 'annotations', 'categories') if not isinstance(data.get(k), list)]
    if missing:
        raise UserError(f'{ann_file}: {what}: {", ".join(missing)} missing or not a list (needs "images", '
                        '"annotations" and "categories")')
    return data


def _as_int(v: Any) -> Optional[int]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _as_pos(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def _as_bbox(v: Any) -> Optional[List[float]]:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v):
        return None
    return [float(x) for x in v]


# ----------------------------------------------------------------------------- the category rule
@dataclass(frozen=True)
class CategoryMap:
    """Class index ↔ dataset category. ``names[i]`` and ``cat_ids[i]`` (-1 for a '' placeholder)
    describe class index i; ``label_of`` maps a category id to its class index."""
    names: List[str]
    cat_ids: List[int]

    @property
    def label_of(self) -> Dict[int, int]:
        return {cid: k for k, cid in enumerate(self.cat_ids) if cid >= 0}


def resolve_categories(categories: Sequence[Any], obj_list: Optional[Sequence[str]],
                       source: str) -> CategoryMap:
    """The one category rule: class index i ↔ the category named ``obj_list[i]``.

    ``categories``: COCO ``categories`` entries (integer ``id``, string ``name``, both unique).
    ``''`` entries of obj_list match no category; every other name must be a category and every
    category must be named (a typo would otherwise silently drop a class). ``obj_list=None`` → the
    categories in id order. UserError naming ``source`` when the two disagree.
    """
    cats: Dict[int, str] = {}
    for i, c in enumerate(categories):
        cid = _as_int(c.get('id')) if isinstance(c, dict) else None
        name = c.get('name') if isinstance(c, dict) else None
        if cid is None or not isinstance(name, str):
            raise UserError(f'{source}: categories[{i}] needs an integer "id" and a string "name", got {c!r}')
        if cid in cats:
            raise UserError(f'{source}: category id {cid} appears twice in "categories"')
        cats[cid] = name
    names_in_file = list(cats.values())
    dup = sorted({n for n in names_in_file if names_in_file.count(n) > 1})
    if dup:
        raise UserError(f'{source}: category name(s) {dup} appear twice in "categories"; names must be unique')
    if obj_list is None:
        ids = sorted(cats)
        return CategoryMap([cats[i] for i in ids], ids)
    names = [str(n) for n in obj_list]
    wanted = {n for n in names if n}
    have = set(names_in_file)
    if wanted != have:
        raise UserError(f'obj_list does not match the categories of {source}: only in obj_list: '
                        f'{_few(wanted - have)}; only in the annotation file: {_few(have - wanted)}. '
                        'Fix obj_list in the project file (names must match exactly; \'\' entries are '
                        'placeholders)')
    by_name = {n: i for i, n in cats.items()}
    return CategoryMap(names, [by_name[n] if n else -1 for n in names])


def categories_for(obj_list: Sequence[str]) -> List[Dict[str, Any]]:
    """COCO ``categories`` for a format without its own (VOC, YOLO): category id = position in
    obj_list + 1, '' placeholders get none — so the 90-slot COCO list gives the real COCO ids."""
    return [{'id': i + 1, 'name': n, 'supercategory': ''} for i, n in enumerate(obj_list) if n]


# ----------------------------------------------------------------------------- validation
@dataclass
class CocoIndex:
    """Validated contents of one split.

    Per usable image k: ``image_ids[k]``, ``paths[k]``, ``sizes[k] = (h, w)`` from the annotations and
    boxes ``boxes[ranges[k, 0]:ranges[k, 1]]`` (float32 xyxy image pixels, clipped) with ``labels``
    (class index, -2 crowd). ``coco_dataset`` is the cleaned COCO dict (usable images, structurally
    valid annotations, defaults for area/iscrowd) for pycocotools and the converter. ``ann_file``
    names the source (a json, or the VOC / YOLO folder).
    """
    ann_file: str
    image_dir: str
    names: List[str]
    cat_ids: List[int]
    image_ids: np.ndarray
    paths: np.ndarray
    sizes: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    ranges: np.ndarray
    coco_dataset: Dict[str, Any]
    issues: Issues
    num_crowd: int = 0
    images_checked: bool = True


def index_coco(data: Dict[str, Any], ann_file: str, image_dir: str, obj_list: Optional[Sequence[str]],
               check_files: bool = True, max_examples: int = MAX_EXAMPLES,
               where: Optional[Dict[int, str]] = None, issues: Optional[Issues] = None,
               need_files: bool = True) -> CocoIndex:
    """Validate a COCO dict (see :func:`load_coco_json`): skip and count bad entries.

    Structural problems (categories unusable, obj_list disagreeing) raise UserError; everything else
    is counted in the returned ``issues`` (pass ``issues`` to add to a format reader's own).
    ``check_files`` tests that each image file exists. ``need_files=False`` (evaluation ground
    truth) lets image entries omit file_name / height / width. ``where`` maps annotation ids to a
    source location ('labels/val/a.txt:3') used in the examples.
    """
    issues = issues if issues is not None else Issues(max_examples)
    where = where or {}
    cmap = resolve_categories(data['categories'], obj_list, ann_file)
    cat_to_label = cmap.label_of

    # Images: valid fields, unique ids, existing files.
    img_rows: List[Tuple[int, str, float, float]] = []
    all_image_ids = set()
    clean_images = []
    for i, im in enumerate(data['images']):
        iid = _as_int(im.get('id')) if isinstance(im, dict) else None
        fname = im.get('file_name') if isinstance(im, dict) else None
        h = _as_pos(im.get('height')) if isinstance(im, dict) else None
        w = _as_pos(im.get('width')) if isinstance(im, dict) else None
        has_file = isinstance(fname, str) and bool(fname)
        if iid is None or (need_files and (not has_file or h is None or w is None)):
            issues.add('image_missing_fields', f'images[{i}] = {_short(im)}')
            if iid is not None:
                all_image_ids.add(iid)
            continue
        if iid in all_image_ids:
            issues.add('duplicate_image_id', f'images[{i}]: id {iid} ({fname})')
            continue
        all_image_ids.add(iid)
        path = os.path.join(image_dir, fname) if has_file else ''
        if check_files and not os.path.isfile(path):
            issues.add('missing_image', f'image id {iid}: {path}')
            continue
        img_rows.append((iid, path, h or math.inf, w or math.inf))
        clean_images.append(im if type(im['id']) is int else dict(im, id=iid))  # 1.0 -> 1: pycocotools needs ints
    row_of = {r[0]: k for k, r in enumerate(img_rows)}

    # Annotations: field checks in Python (JSON objects), box checks vectorised below.
    seen_ann = set()
    raw_boxes: List[List[float]] = []
    ann_img: List[int] = []
    ann_label: List[int] = []
    ann_desc: List[str] = []
    clean_anns = []
    next_id = None  # ground truth without annotation ids (need_files=False) gets fresh ones
    for i, a in enumerate(data['annotations']):
        if not isinstance(a, dict):
            issues.add('annotation_missing_fields', f'annotations[{i}] = {_short(a)}')
            continue
        if not need_files and a.get('id') is None:
            if next_id is None:
                next_id = 1 + max([_as_int(b.get('id')) or 0 for b in data['annotations'] if isinstance(b, dict)]
                                  + [0])
            a = dict(a, id=next_id)
            next_id += 1
        aid, iid, cid, bbox = (_as_int(a.get('id')), _as_int(a.get('image_id')), _as_int(a.get('category_id')),
                               _as_bbox(a.get('bbox')))
        if aid is None or iid is None or cid is None or bbox is None:
            bad = [k for k, v in (('id', aid), ('image_id', iid), ('category_id', cid), ('bbox', bbox)) if v is None]
            issues.add('annotation_missing_fields', f'annotations[{i}] (id {a.get("id")!r}): bad {", ".join(bad)}')
            continue
        loc = where.get(aid, f'annotation id {aid}')
        if aid in seen_ann:
            issues.add('duplicate_annotation_id', f'annotations[{i}]: id {aid}')
            continue
        seen_ann.add(aid)
        if iid not in all_image_ids:
            issues.add('unknown_image', f'{loc}: image_id {iid}')
            continue
        if cid not in cat_to_label:
            issues.add('unknown_category', f'{loc}: category_id {cid}')
            continue
        if iid not in row_of:  # its image was skipped (and counted) already
            continue
        crowd = bool(a.get('iscrowd', 0))
        if not (all(type(a[k]) is int for k in ('id', 'image_id', 'category_id')) and 'area' in a
                and 'iscrowd' in a):  # copy only what needs ints or COCO's defaults
            a = dict(a, id=aid, image_id=iid, category_id=cid, area=a.get('area', bbox[2] * bbox[3]),
                     iscrowd=int(crowd))
        clean_anns.append(a)
        raw_boxes.append(bbox)
        ann_img.append(row_of[iid])
        ann_label.append(CROWD_CLASS if crowd else cat_to_label[cid])
        ann_desc.append(loc if aid in where else f'{loc} (image {iid})')

    n_img = len(img_rows)
    sizes = np.array([[r[2], r[3]] for r in img_rows], dtype=np.float64).reshape(-1, 2)
    xywh = np.array(raw_boxes, dtype=np.float64).reshape(-1, 4)
    img_idx = np.array(ann_img, dtype=np.int64)
    labels = np.array(ann_label, dtype=np.int64)
    keep, clipped_boxes, clipped, reason = check_boxes(xywh, sizes[img_idx] if len(img_idx) else sizes[:0])
    for kind, mask in (('bad_box', ~keep), ('box_clipped', clipped & keep)):
        idx = np.flatnonzero(mask)
        issues.add(kind, n=len(idx))
        for j in idx[:max(0, issues.max_examples - len(issues.examples[kind]))]:
            h, w = sizes[img_idx[j]]
            issues.examples[kind].append(f'{ann_desc[j]}: bbox {xywh[j].round(2).tolist()} in '
                                         f'{w:.0f}x{h:.0f} image: {reason[j]}')
    boxes, labels, img_idx = clipped_boxes[keep].astype(np.float32), labels[keep], img_idx[keep]
    order = np.argsort(img_idx, kind='stable')
    boxes, labels, img_idx = boxes[order], labels[order], img_idx[order]
    counts = np.bincount(img_idx, minlength=n_img)
    ends = np.cumsum(counts)
    ranges = np.stack([ends - counts, ends], 1).astype(np.int64).reshape(-1, 2)
    empty = np.flatnonzero(counts == 0)
    issues.add('image_without_annotations', n=len(empty))
    for k in empty[:max(0, issues.max_examples - len(issues.examples['image_without_annotations']))]:
        issues.examples['image_without_annotations'].append(f'image id {img_rows[k][0]}: {img_rows[k][1]}')

    coco_dataset = {k: v for k, v in data.items() if k not in ('images', 'annotations')}
    coco_dataset['images'] = clean_images
    coco_dataset['annotations'] = clean_anns
    return CocoIndex(ann_file, image_dir, cmap.names, cmap.cat_ids,
                     np.array([r[0] for r in img_rows], dtype=np.int64),
                     np.array([r[1] for r in img_rows], dtype=str), sizes.astype(np.float32), boxes,
                     labels, ranges, coco_dataset, issues, int((labels == CROWD_CLASS).sum()), check_files)


def check_boxes(xywh: np.ndarray, sizes_hw: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """Vectorised box rules. xywh [N, 4] COCO boxes in image pixels; sizes_hw [N, 2] image (h, w)
    (inf when unknown: only the size rules apply).

    Returns (keep [N] bool, boxes [N, 4] xyxy clipped to the image, clipped [N] bool (moved more
    than CLIP_TOLERANCE px), reason [N] text for dropped/clipped boxes).
    """
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    h, w = sizes_hw[:, 0:1].astype(np.float64), sizes_hw[:, 1:2].astype(np.float64)
    lim = np.concatenate([w, h, w, h], 1)
    clipped_xyxy = np.clip(xyxy, 0, lim)
    nonpos = (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)
    cw = clipped_xyxy[:, 2] - clipped_xyxy[:, 0]
    ch = clipped_xyxy[:, 3] - clipped_xyxy[:, 1]
    tiny = (cw <= MIN_BOX_PIXELS) | (ch <= MIN_BOX_PIXELS)
    outside = (xyxy[:, 0] >= w[:, 0]) | (xyxy[:, 1] >= h[:, 0]) | (xyxy[:, 2] <= 0) | (xyxy[:, 3] <= 0)
    keep = ~(nonpos | tiny)
    clipped = np.abs(clipped_xyxy - xyxy).max(1, initial=0.0) > CLIP_TOLERANCE
    reason = np.where(nonpos, 'non-positive width/height',
                      np.where(outside, 'outside the image',
                               np.where(tiny, f'at most {MIN_BOX_PIXELS:g} px after clipping',
                                        np.where(clipped, 'partly outside, clipped', ''))))
    return keep, clipped_xyxy, clipped, reason.tolist()


def _few(names: Any, limit: int = 10) -> str:
    """Sorted names, the first ``limit`` of them and how many more."""
    names = sorted(names)
    more = f' (+{len(names) - limit} more)' if len(names) > limit else ''
    return str(names[:limit]) + more


def _short(obj: Any, limit: int = 80) -> str:
    s = repr(obj)
    return s if len(s) <= limit else s[:limit - 3] + '...'


# ----------------------------------------------------------------------------- evaluation ground truth
def coco_from_dict(data: Dict[str, Any], path: str = '<annotations>', verbose: bool = False,
                   validate: bool = True):
    """A pycocotools ``COCO`` over a COCO instances dict. ``validate``: run it through
    :func:`index_coco` strictly (an entry that refers to an unknown image or category, or lacks
    an id or bbox, is a UserError naming ``path``) and use the cleaned copy; pass False for a dict
    :func:`index_coco` already cleaned (it is used as is, not copied)."""
    from pycocotools.coco import COCO
    if validate:
        data = strict_index(data, path).coco_dataset
    coco = COCO()
    coco.dataset = data
    with contextlib.ExitStack() as stack:
        if not verbose:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        coco.createIndex()
    return coco


def strict_index(data: Dict[str, Any], path: str) -> CocoIndex:
    """:func:`index_coco` for evaluation ground truth: images need only an id, files are not
    looked at, and a structural problem raises UserError (first example) instead of being skipped."""
    index = index_coco(data, path, '', None, check_files=False, max_examples=1, need_files=False)
    for kind in STRUCTURAL:
        if index.issues.counts[kind]:
            example = index.issues.examples[kind][0] if index.issues.examples[kind] else ''
            raise UserError(f'{path}: not usable as ground truth: {ISSUES[kind][0].split(" (")[0]}, e.g. {example}')
    return index


def load_ground_truth(path: str, verbose: bool = False):
    """Read and strictly validate a COCO instances json into a pycocotools ``COCO``."""
    return coco_from_dict(load_coco_json(path), path, verbose)
