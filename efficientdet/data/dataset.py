"""COCO-format detection dataset, its validation rules, collate function and loader builder.

Layout (Yet-Another-EfficientDet-Pytorch's): ``{root_dir}/{set_name}/*.jpg`` and
``{root_dir}/annotations/instances_{set_name}.json``, where ``root_dir = {data_path}/{project_name}``.

All checks on annotations and image files live here (:func:`index_coco`, :func:`load_image_checked`)
and are shared by :class:`CocoDataset` (which skips and counts) and ``python -m efficientdet.data.check``
(which lists them). Each problem kind is described once in :data:`ISSUES`.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from .transforms import DetectionTransform, Size, as_hw, normalize_pad

CROWD_CLASS = -2
PAD_VALUE = -1.0
# Boxes whose width or height is at most this many image pixels after clipping are dropped.
MIN_BOX_PIXELS = 1.0
# Boxes reaching less than this far outside the image are clipped without being reported.
CLIP_TOLERANCE = 0.5
MAX_EXAMPLES = 3

# kind → (what it means, whether training skips something because of it)
ISSUES: Dict[str, Tuple[str, bool]] = {
    'image_missing_fields': ('image entries without a valid id / file_name / height / width (skipped)', True),
    'duplicate_image_id': ('image entries repeating an earlier id (skipped)', True),
    'missing_image': ('image files that do not exist (skipped)', True),
    'corrupt_image': ('image files that cannot be decoded (skipped)', True),
    'annotation_missing_fields': ('annotations without a valid id / image_id / category_id / bbox (skipped)', True),
    'duplicate_annotation_id': ('annotations repeating an earlier id (skipped)', True),
    'unknown_image': ('annotations whose image_id is not in "images" (skipped)', True),
    'unknown_category': ('annotations whose category_id is not in "categories" (skipped)', True),
    'bad_box': ('boxes with non-positive size, outside the image or at most 1 px after clipping (dropped)', True),
    'box_clipped': ('boxes partly outside the image (clipped to it)', False),
    'size_mismatch': ('image files whose size differs from the json height/width (boxes clipped to the file)', False),
    'truncated_image': ('JPEG files without an end marker (decoded partly)', False),
    'image_without_annotations': ('images without any usable box (kept as negatives)', False),
}
SKIPPING = tuple(k for k, (_, skips) in ISSUES.items() if skips)
# Bits of the per-image flags that data-loader workers set in shared memory.
_FLAG_BITS = {'corrupt_image': 1, 'size_mismatch': 2, 'truncated_image': 4}


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


def dataset_paths(root_dir: str, set_name: str) -> Tuple[str, str]:
    """(annotation json, image folder) for a set; UserError naming what is missing and what to do."""
    layout = f'{root_dir}/{set_name}/*.jpg and {root_dir}/annotations/instances_{set_name}.json'
    if not os.path.isdir(root_dir):
        hint = (f' (to make the synthetic shapes set: python -m efficientdet.data.shapes --root {root_dir})'
                if os.path.basename(os.path.normpath(root_dir)) == 'shape' else '')
        raise UserError(f'dataset folder {root_dir} not found; expected {layout}. Put the dataset there or '
                        f'pass --data_path pointing at the folder that holds it{hint}')
    ann_file = os.path.join(root_dir, 'annotations', f'instances_{set_name}.json')
    image_dir = os.path.join(root_dir, set_name)
    if not os.path.isfile(ann_file):
        raise UserError(f'annotation file {ann_file} not found; expected {layout}. Check train_set / val_set '
                        'in the project file')
    if not os.path.isdir(image_dir):
        raise UserError(f'image folder {image_dir} not found; expected {layout}. Check train_set / val_set '
                        'in the project file')
    return ann_file, image_dir


def load_coco_json(ann_file: str) -> Dict[str, Any]:
    """Read a COCO annotation file (the one reader, used by the dataset, the checker and the
    evaluator); UserError naming the file when it is missing, not JSON or not COCO-shaped."""
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


def category_mapping(categories: List[Any], obj_list: Optional[Sequence[str]],
                     ann_file: str) -> Tuple[List[str], List[int], Dict[int, int]]:
    """Match annotation categories to class indices by name.

    Returns (names per class index, category id per class index (-1 for '' placeholders),
    {category id: class index}). ``obj_list=None`` → categories sorted by id.
    """
    cats: Dict[int, str] = {}
    for i, c in enumerate(categories):
        cid = _as_int(c.get('id')) if isinstance(c, dict) else None
        name = c.get('name') if isinstance(c, dict) else None
        if cid is None or not isinstance(name, str):
            raise UserError(f'{ann_file}: categories[{i}] needs an integer "id" and a string "name", got {c!r}')
        if cid in cats:
            raise UserError(f'{ann_file}: category id {cid} appears twice in "categories"')
        cats[cid] = name
    names_in_file = list(cats.values())
    dup = sorted({n for n in names_in_file if names_in_file.count(n) > 1})
    if dup:
        raise UserError(f'{ann_file}: category name(s) {dup} appear twice in "categories"; names must be unique')
    if obj_list is None:
        ids = sorted(cats)
        names = [cats[i] for i in ids]
    else:
        names = list(obj_list)
        wanted = {n for n in names if n}
        have = set(names_in_file)
        if wanted != have:
            only_list = sorted(wanted - have)
            only_file = sorted(have - wanted)
            raise UserError(f'obj_list does not match the categories of {ann_file}: only in obj_list: {only_list}; '
                            f'only in the annotation file: {only_file}. Fix obj_list in the project file '
                            '(names must match exactly)')
        by_name = {n: i for i, n in cats.items()}
        ids = [by_name[n] if n else -1 for n in names]
    cat_to_label = {cid: k for k, cid in enumerate(ids) if cid >= 0}
    return names, ids, cat_to_label


@dataclass
class CocoIndex:
    """Validated contents of one annotation file.

    Per usable image k: ``image_ids[k]``, ``paths[k]``, ``sizes[k] = (h, w)`` from the json and boxes
    ``boxes[ranges[k, 0]:ranges[k, 1]]`` (float32 xyxy image pixels, clipped) with ``labels`` (class
    index, -2 crowd). ``coco_dataset`` is the cleaned json (usable images, structurally valid
    annotations, defaults for area/iscrowd) for pycocotools.
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


def index_coco(data: Dict[str, Any], ann_file: str, image_dir: str, obj_list: Optional[Sequence[str]],
               check_files: bool = True, max_examples: int = MAX_EXAMPLES) -> CocoIndex:
    """Validate a loaded COCO dict (see :func:`load_coco_json`): skip and count bad entries.

    Structural problems (categories unusable, obj_list disagreeing) raise UserError; everything else
    is counted in the returned ``issues``. ``check_files`` also tests that each image file exists.
    """
    issues = Issues(max_examples)
    names, cat_ids, cat_to_label = category_mapping(data['categories'], obj_list, ann_file)

    # Images: valid fields, unique ids, existing files.
    img_rows: List[Tuple[int, str, float, float]] = []
    all_image_ids = set()
    clean_images = []
    for i, im in enumerate(data['images']):
        iid = _as_int(im.get('id')) if isinstance(im, dict) else None
        fname = im.get('file_name') if isinstance(im, dict) else None
        h = _as_pos(im.get('height')) if isinstance(im, dict) else None
        w = _as_pos(im.get('width')) if isinstance(im, dict) else None
        if iid is None or not isinstance(fname, str) or not fname or h is None or w is None:
            issues.add('image_missing_fields', f'images[{i}] = {_short(im)}')
            if iid is not None:
                all_image_ids.add(iid)
            continue
        if iid in all_image_ids:
            issues.add('duplicate_image_id', f'images[{i}]: id {iid} ({fname})')
            continue
        all_image_ids.add(iid)
        path = os.path.join(image_dir, fname)
        if check_files and not os.path.isfile(path):
            issues.add('missing_image', f'image id {iid}: {path}')
            continue
        img_rows.append((iid, path, h, w))
        clean_images.append(im if type(im['id']) is int else dict(im, id=iid))  # 1.0 -> 1: pycocotools needs ints
    row_of = {r[0]: k for k, r in enumerate(img_rows)}

    # Annotations: field checks in Python (JSON objects), box checks vectorised below.
    seen_ann = set()
    raw_boxes: List[List[float]] = []
    ann_img: List[int] = []
    ann_label: List[int] = []
    ann_desc: List[Tuple[int, Any]] = []
    clean_anns = []
    for i, a in enumerate(data['annotations']):
        if not isinstance(a, dict):
            issues.add('annotation_missing_fields', f'annotations[{i}] = {_short(a)}')
            continue
        aid, iid, cid, bbox = (_as_int(a.get('id')), _as_int(a.get('image_id')), _as_int(a.get('category_id')),
                               _as_bbox(a.get('bbox')))
        if aid is None or iid is None or cid is None or bbox is None:
            bad = [k for k, v in (('id', aid), ('image_id', iid), ('category_id', cid), ('bbox', bbox)) if v is None]
            issues.add('annotation_missing_fields', f'annotations[{i}] (id {a.get("id")!r}): bad {", ".join(bad)}')
            continue
        if aid in seen_ann:
            issues.add('duplicate_annotation_id', f'annotations[{i}]: id {aid}')
            continue
        seen_ann.add(aid)
        if iid not in all_image_ids:
            issues.add('unknown_image', f'annotation id {aid}: image_id {iid}')
            continue
        if cid not in cat_to_label:
            issues.add('unknown_category', f'annotation id {aid}: category_id {cid}')
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
        ann_desc.append((aid, iid))

    n_img = len(img_rows)
    sizes = np.array([[r[2], r[3]] for r in img_rows], dtype=np.float32).reshape(-1, 2)
    xywh = np.array(raw_boxes, dtype=np.float64).reshape(-1, 4)
    img_idx = np.array(ann_img, dtype=np.int64)
    labels = np.array(ann_label, dtype=np.int64)
    keep, clipped_boxes, clipped, reason = check_boxes(xywh, sizes[img_idx] if len(img_idx) else sizes[:0])
    for kind, mask in (('bad_box', ~keep), ('box_clipped', clipped & keep)):
        idx = np.flatnonzero(mask)
        issues.add(kind, n=len(idx))
        for j in idx[:max_examples]:
            aid, iid = ann_desc[j]
            issues.examples[kind].append(f'annotation id {aid} (image {iid}): bbox {xywh[j].round(2).tolist()} '
                                         f'in {int(sizes[img_idx[j], 1])}x{int(sizes[img_idx[j], 0])} image: '
                                         f'{reason[j]}')
    boxes, labels, img_idx = clipped_boxes[keep].astype(np.float32), labels[keep], img_idx[keep]
    order = np.argsort(img_idx, kind='stable')
    boxes, labels, img_idx = boxes[order], labels[order], img_idx[order]
    counts = np.bincount(img_idx, minlength=n_img)
    ends = np.cumsum(counts)
    ranges = np.stack([ends - counts, ends], 1).astype(np.int64).reshape(-1, 2)
    empty = np.flatnonzero(counts == 0)
    issues.add('image_without_annotations', n=len(empty))
    for k in empty[:max_examples]:
        issues.examples['image_without_annotations'].append(f'image id {img_rows[k][0]}: {img_rows[k][1]}')

    coco_dataset = {k: v for k, v in data.items() if k not in ('images', 'annotations')}
    coco_dataset['images'] = clean_images
    coco_dataset['annotations'] = clean_anns
    return CocoIndex(ann_file, image_dir, names, cat_ids,
                     np.array([r[0] for r in img_rows], dtype=np.int64),
                     np.array([r[1] for r in img_rows], dtype=str), sizes, boxes,
                     labels, ranges, coco_dataset, issues, int((labels == CROWD_CLASS).sum()))


def check_boxes(xywh: np.ndarray, sizes_hw: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """Vectorised box rules. xywh [N, 4] COCO boxes in image pixels; sizes_hw [N, 2] image (h, w).

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


def _short(obj: Any, limit: int = 80) -> str:
    s = repr(obj)
    return s if len(s) <= limit else s[:limit - 3] + '...'


def load_image_checked(path: str, expected_hw: Optional[Tuple[float, float]] = None
                       ) -> Tuple[Optional[np.ndarray], List[str]]:
    """Read an image as RGB uint8 [H, W, 3] (pixels as stored: EXIF orientation is ignored, as in the
    COCO annotations). Returns (image or None, problem kinds among 'corrupt_image', 'size_mismatch',
    'truncated_image')."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None, ['corrupt_image']
    img = None
    if buf.size:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None or img.ndim != 3 or img.size == 0:
        return None, ['corrupt_image']
    problems = []
    if buf[:2].tobytes() == b'\xff\xd8' and b'\xff\xd9' not in buf[-1024:].tobytes():
        problems.append('truncated_image')
    if expected_hw is not None and (img.shape[0], img.shape[1]) != (int(expected_hw[0]), int(expected_hw[1])):
        problems.append('size_mismatch')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), problems


class CocoDataset(Dataset):
    """COCO-format detection dataset with letterbox (and optional official augmentation).

    ``__getitem__`` → dict(img=float32 [3, H, W] normalised RGB, letterboxed and zero-padded
    bottom/right; annot=float32 [N, 5] (x1, y1, x2, y2, class) xyxy network-input pixels, class
    0-based in obj_list order, -2 for crowd; image_id=int (COCO id); scale=float (network px per
    original px); orig_size=(h, w) of the file). Unreadable images are skipped (the next readable
    one is returned) and counted; see :attr:`stats` and :meth:`summary`.
    """

    def __init__(self, root_dir: str, set_name: str, obj_list: Optional[Sequence[str]], image_size: Size,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: bool = False, scale_range: Tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5):
        self.root_dir, self.set_name = root_dir, set_name
        self.image_size = as_hw(image_size)
        if min(self.image_size) <= 0:
            raise UserError(f'image size must be positive, got {image_size}')
        self.ann_file, self.image_dir = dataset_paths(root_dir, set_name)
        index = index_coco(load_coco_json(self.ann_file), self.ann_file, self.image_dir, obj_list)
        if len(index.image_ids) == 0:
            raise UserError(f'{self.ann_file}: no usable images in {self.image_dir} '
                            f'(run python -m efficientdet.data.check to see why)')
        self.index = index
        self.obj_list: List[str] = index.names
        self.cat_ids: List[int] = index.cat_ids
        self.image_ids: List[int] = index.image_ids.tolist()
        self.transform = DetectionTransform(self.image_size, augment, scale_range, flip_prob)
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        # Per-image problem flags found while loading, shared with data-loader workers.
        self._flags = torch.zeros(len(self.image_ids), dtype=torch.uint8)
        try:
            self._flags.share_memory_()
        except (RuntimeError, OSError):  # no shared memory: counts from workers stay local
            pass
        self._coco = None

    @property
    def coco(self):
        """pycocotools ``COCO`` over the cleaned annotations (built on first use)."""
        if self._coco is None:
            from ..evaluation import coco_from_dict
            self._coco = coco_from_dict(self.index.coco_dataset, self.ann_file, validate=False)
        return self._coco

    @property
    def num_classes(self) -> int:
        return len(self.obj_list)

    def __getstate__(self) -> Dict[str, Any]:  # workers do not need the pycocotools index
        state = self.__dict__.copy()
        state['_coco'] = None
        return state

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Boxes [N, 4] float32 xyxy original pixels and classes [N] int64 of item ``i``."""
        s, e = self.index.ranges[i]
        return self.index.boxes[s:e], self.index.labels[s:e]

    def load_image(self, i: int) -> Optional[np.ndarray]:
        """RGB uint8 [H, W, 3] of item ``i``, or None (and flagged) when it cannot be decoded."""
        flags = self._flags.numpy()  # shares memory with the tensor (and with workers)
        if flags[i] & _FLAG_BITS['corrupt_image']:
            return None
        img, problems = load_image_checked(str(self.index.paths[i]), self.index.sizes[i])
        for p in problems:
            flags[i] |= _FLAG_BITS[p]
        return img

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        n = len(self)
        for k in range(n):
            i = (idx + k) % n
            img = self.load_image(i)
            if img is not None:
                break
        else:
            raise UserError(f'none of the {n} images in {self.image_dir} can be decoded')
        boxes, labels = self.annotations(i)
        h, w = img.shape[:2]
        if self._flags.numpy()[i] & _FLAG_BITS['size_mismatch']:  # json size was wrong: clip to the real file
            keep, boxes, _, _ = check_boxes(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1),
                                            np.tile(np.array([[h, w]], np.float32), (len(boxes), 1)))
            boxes, labels = boxes[keep].astype(np.float32), labels[keep]
        rng = None
        if self.augment:
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,)).item()))
        content, boxes, labels, scale = self.transform(img, boxes, labels, rng)
        annot = np.concatenate([boxes.reshape(-1, 4), labels.reshape(-1, 1).astype(np.float32)], 1)
        return dict(img=self.normalize_pad(content), annot=torch.from_numpy(annot.astype(np.float32)),
                    image_id=int(self.image_ids[i]), scale=float(scale), orig_size=(int(h), int(w)))

    def normalize_pad(self, content: np.ndarray) -> torch.Tensor:
        """uint8 RGB [h, w, 3] → normalised float32 [3, H, W] padded bottom/right (shared helper)."""
        return normalize_pad(content, self.image_size, self.mean, self.std)

    @property
    def stats(self) -> Dict[str, int]:
        """Counters: images, boxes, crowd and every problem kind of :data:`ISSUES`."""
        out = dict(images=len(self), boxes=int(len(self.index.labels)), crowd=self.index.num_crowd)
        out.update(self.index.issues.counts)
        flags = self._flags.numpy()
        for kind, bit in _FLAG_BITS.items():
            out[kind] = out[kind] + int(np.count_nonzero(flags & bit))
        return out

    def summary(self) -> str:
        """One line: what the set holds and what was skipped, dropped or clipped."""
        s = self.stats
        head = (f'{self.set_name}: {s["images"]} images ({s["image_without_annotations"]} without boxes), '
                f'{s["boxes"]} boxes ({s["crowd"]} crowd)')
        skipped = [f'{k}={s[k]}' for k in SKIPPING if s[k]]
        notes = [f'{k}={s[k]}' for k in ('box_clipped', 'size_mismatch', 'truncated_image') if s[k]]
        tail = '; skipped: ' + ', '.join(skipped) if skipped else '; nothing skipped'
        if notes:
            tail += '; fixed up: ' + ', '.join(notes)
        return head + tail + ('' if not skipped else ' (python -m efficientdet.data.check lists them)')

    def __repr__(self) -> str:
        return f'CocoDataset({self.ann_file!r}, {len(self)} images, {self.num_classes} classes, {self.transform})'


def collate_fn(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack samples: img [B, 3, H, W]; annot [B, Nmax, 5] padded with -1 rows (Nmax >= 1);
    image_id list[int]; scale float32 [B]; orig_size list[(h, w)]."""
    imgs = torch.stack([b['img'] for b in batch])
    annots = [b['annot'].reshape(-1, 5) for b in batch]
    annot = torch.nn.utils.rnn.pad_sequence(annots, batch_first=True, padding_value=PAD_VALUE)
    if annot.shape[1] == 0:
        annot = torch.full((len(batch), 1, 5), PAD_VALUE, dtype=torch.float32)
    return dict(img=imgs, annot=annot, image_id=[b['image_id'] for b in batch],
                scale=torch.tensor([b['scale'] for b in batch], dtype=torch.float32),
                orig_size=[b['orig_size'] for b in batch])


def seed_worker(worker_id: int) -> None:
    """Seed numpy / random in a data-loader worker from its torch seed (reproducible runs)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                     distributed: bool = False, seed: int = 0, drop_last: bool = False,
                     num_replicas: Optional[int] = None, rank: Optional[int] = None) -> DataLoader:
    """DataLoader with :func:`collate_fn`, a seeded generator, DistributedSampler when
    ``distributed`` (replicas/rank from the process group unless given; call
    ``loader.sampler.set_epoch(epoch)`` each epoch), pinned memory when CUDA is available and
    persistent workers when ``num_workers > 0``."""
    if batch_size < 1:
        raise UserError(f'batch size must be at least 1, got {batch_size}')
    if num_workers < 0:
        raise UserError(f'num_workers must be >= 0, got {num_workers}')
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=num_workers > 0, worker_init_fn=seed_worker if num_workers > 0 else None,
                      generator=generator)
