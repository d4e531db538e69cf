"""COCO-style box evaluation with pycocotools, usable from any training loop.

``COCOEvaluator`` collects per-image detections (boxes **xyxy in original-image pixels**, scores,
0-based contiguous labels), turns them into COCO results (``bbox`` = x, y, w, h; ``category_id`` in
the annotation file's id space; ``image_id`` as in the annotations) and computes the 12 pycocotools
numbers plus a per-class AP table, COCOeval's precision-recall curves and a class confusion matrix
(what :mod:`efficientdet.plots` draws). Only numpy, torch and pycocotools are needed here.

Annotation files are read and validated by :mod:`efficientdet.data.annotations` (the one reader,
validator and category rule, shared with the datasets); this module only scores.

``run_coco_eval`` runs a model over a validation dataset (any format) and evaluates it; ``train.py`` and
``coco_eval.py`` both call it, so validation mAP and offline mAP come from the same code.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from .data.annotations import coco_from_dict, load_ground_truth, resolve_categories
from .errors import UserError

__all__ = ['COCOEvaluator', 'STAT_NAMES', 'AREA_NAMES', 'CONFUSION_SCORE', 'load_coco', 'coco_from_dict',
           'resolve_category_ids', 'format_summary', 'load_results_file', 'write_results_json', 'format_table',
           'run_coco_eval', 'file_digest', 'data_digest', 'reuse_refusal', 'evaluation_key', 'evaluate_project',
           'score_results_file']

#: Names of pycocotools' 12 ``COCOeval.stats`` entries, in order.
STAT_NAMES: Tuple[str, ...] = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                               'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')

# (AP or AR, IoU label, area, maxDets) for each stat, to print the familiar summary lines.
_STAT_LAYOUT = (('AP', '0.50:0.95', 'all', 100), ('AP', '0.50', 'all', 100), ('AP', '0.75', 'all', 100),
                ('AP', '0.50:0.95', 'small', 100), ('AP', '0.50:0.95', 'medium', 100),
                ('AP', '0.50:0.95', 'large', 100), ('AR', '0.50:0.95', 'all', 1),
                ('AR', '0.50:0.95', 'all', 10), ('AR', '0.50:0.95', 'all', 100),
                ('AR', '0.50:0.95', 'small', 100), ('AR', '0.50:0.95', 'medium', 100),
                ('AR', '0.50:0.95', 'large', 100))

#: pycocotools' object-size ranges after 'all' (index 1, 2, 3 of the precision array's area axis).
AREA_NAMES: Tuple[str, ...] = ('small', 'medium', 'large')
#: Detections scoring at least this enter the confusion matrix (the AP curves use every detection).
CONFUSION_SCORE = 0.25

# A result row: image_id, x, y, w, h, score, category_id (float64 holds COCO ids exactly).
_ROW = 7
_BOX_DECIMALS = 2     # 0.01 px
_SCORE_DECIMALS = 5   # enough to keep the ranking of real detector scores


# ----------------------------------------------------------------------------- annotations
def load_coco(path: str, verbose: bool = False) -> COCO:
    """Read a COCO instances annotation file into a pycocotools ``COCO``, validated strictly by the
    one validator (:func:`efficientdet.data.annotations.strict_index`).

    Raises UserError naming the file when it is missing, not JSON, or not COCO instances format.
    Missing optional fields are filled the way COCO defines them (``iscrowd`` = 0, ``area`` = w*h).
    """
    return load_ground_truth(path, verbose)


def resolve_category_ids(coco: COCO, class_names: Optional[Sequence[str]] = None,
                         cat_ids: Optional[Sequence[Optional[int]]] = None,
                         source: str = 'class_names') -> Tuple[List[Optional[int]], List[str]]:
    """Dataset category id (or None: a class the annotations do not evaluate) for every 0-based
    label, and a display name per label.

    ``cat_ids`` given (e.g. a dataset's, already resolved): used as is, None/-1 = not evaluated.
    Otherwise the one category rule (:func:`efficientdet.data.annotations.resolve_categories`):
    label i is the category named ``class_names[i]``, '' placeholders match nothing, no names →
    the categories in id order. Disagreements raise UserError naming ``source``.
    """
    if cat_ids is None:
        cmap = resolve_categories(coco.dataset.get('categories', []), class_names, source)
        return [c if c >= 0 else None for c in cmap.cat_ids], cmap.names
    ids = [None if c is None or int(c) < 0 else int(c) for c in cat_ids]
    if class_names is not None and len(class_names) != len(ids):
        raise UserError(f'{source}: {len(class_names)} class names but {len(ids)} category ids')
    real = [c for c in ids if c is not None]
    if len(set(real)) != len(real):
        raise UserError(f'{source}: category ids {ids} contain duplicates')
    by_id = {int(c['id']): str(c.get('name', c['id'])) for c in coco.dataset.get('categories', [])}
    missing = sorted(set(by_id) - set(real))
    if missing:
        raise UserError(f'{source}: {len(ids)} classes do not cover the annotation categories '
                        f'{missing[:10]} ({len(by_id)} categories in the annotation file)')
    names = [str(s) for s in class_names] if class_names is not None else [by_id.get(c, '') if c is not None
                                                                           else '' for c in ids]
    return ids, names


# ----------------------------------------------------------------------------- evaluator
class COCOEvaluator:
    """Accumulate detections batch by batch and evaluate them with pycocotools.

    Args:
        coco_gt: a pycocotools ``COCO`` or the path of a COCO instances json.
        cat_ids: dataset category id for each contiguous 0-based label (None or -1 entries, e.g.
            '' placeholders of an obj_list: classes not evaluated, their detections are dropped). Default: sorted gt ids, or the
            ids matching ``class_names``.
        class_names: display name per label (e.g. a project's obj_list).
        verbose: let pycocotools print its progress (silenced by default).
    """

    def __init__(self, coco_gt: Union[COCO, str], cat_ids: Optional[Sequence[Optional[int]]] = None,
                 class_names: Optional[Sequence[str]] = None, verbose: bool = False):
        self.verbose = verbose
        if isinstance(coco_gt, (str, os.PathLike)):
            self.source = os.fspath(coco_gt)
            self.coco = load_coco(self.source, verbose=verbose)
        elif isinstance(coco_gt, COCO):
            self.source = '<COCO object>'
            self.coco = coco_gt
        else:
            raise TypeError(f'coco_gt must be a pycocotools COCO or a path, got {type(coco_gt).__name__}')
        self.cat_ids, self.class_names = resolve_category_ids(
            self.coco, class_names, cat_ids, source=f'classes for {self.source}')
        # label -> category id lookup (-1: not evaluated)
        self._label_to_cat = np.array([-1 if c is None else c for c in self.cat_ids], dtype=np.int64)
        self._gt_cat_ids = sorted(int(c['id']) for c in self.coco.dataset['categories'])
        self._gt_img_ids = set(int(i) for i in self.coco.getImgIds())
        anns = self.coco.dataset.get('annotations', [])
        self._ann_img = np.array([a['image_id'] for a in anns], dtype=np.int64)
        self._ann_cat = np.array([a['category_id'] for a in anns], dtype=np.int64)
        self._ann_crowd = np.array([bool(a.get('iscrowd', 0)) for a in anns], dtype=bool)
        self._ann_xywh = np.array([a['bbox'] for a in anns], dtype=np.float64).reshape(-1, 4)
        self.metrics: Optional[Dict[str, Any]] = None
        self.reset()

    # ------------------------------------------------------------------ accumulation
    def reset(self) -> None:
        """Forget all detections and evaluated images."""
        self._rows: List[np.ndarray] = []
        self._image_ids: List[int] = []
        self._seen: set = set()

    def update(self, image_ids: Sequence[int], detections: Sequence[Any]) -> None:
        """Add one batch: ``detections[i]`` belongs to ``image_ids[i]`` and has ``boxes`` [N,4] xyxy
        in original-image pixels, ``scores`` [N], ``labels`` [N] 0-based (dicts or objects; torch
        or numpy; Yet-Another's ``rois``/``class_ids`` keys work too). An image passed with no
        boxes counts as evaluated with zero detections. An image id seen before is ignored (e.g.
        padding repeats of a distributed sampler)."""
        ids = _int_list(image_ids)
        if len(ids) != len(detections):
            raise ValueError(f'{len(ids)} image ids but {len(detections)} detection entries')
        boxes, scores, labels, counts = [], [], [], []
        for det in detections:
            b = _to_numpy(_field(det, 'boxes', 'rois')).reshape(-1, 4)
            s = _to_numpy(_field(det, 'scores')).reshape(-1)
            lab = _to_numpy(_field(det, 'labels', 'class_ids')).reshape(-1)
            if not (len(b) == len(s) == len(lab)):
                raise ValueError(f'detections with {len(b)} boxes, {len(s)} scores, {len(lab)} labels')
            boxes.append(b)
            scores.append(s)
            labels.append(lab)
            counts.append(len(b))
        index = np.repeat(np.arange(len(ids)), counts)
        self.update_flat(ids, index, _cat(boxes, (0, 4)), _cat(scores, (0,)), _cat(labels, (0,)))

    def update_flat(self, image_ids: Sequence[int], batch_index: Any, boxes: Any, scores: Any,
                    labels: Any) -> None:
        """Vectorised ``update``: detection n belongs to ``image_ids[batch_index[n]]``; ``boxes``
        [N,4] xyxy original pixels, ``scores`` [N], ``labels`` [N] 0-based."""
        ids = np.array(_int_list(image_ids), dtype=np.int64)
        unknown = [int(i) for i in ids if int(i) not in self._gt_img_ids]
        if unknown:
            raise UserError(f'{self.source}: image ids {unknown[:5]} are not in the annotations; '
                            'evaluate against the annotation file the images came from')
        fresh = np.array([int(i) not in self._seen for i in ids], dtype=bool)
        # first occurrence within this batch only
        _, first = np.unique(ids, return_index=True)
        keep_img = np.zeros(len(ids), dtype=bool)
        keep_img[first] = True
        keep_img &= fresh
        for i in ids[keep_img]:
            self._seen.add(int(i))
            self._image_ids.append(int(i))
        bi = _to_numpy(batch_index).reshape(-1).astype(np.int64)
        b = _to_numpy(boxes).reshape(-1, 4).astype(np.float64)
        s = _to_numpy(scores).reshape(-1).astype(np.float64)
        lab = _to_numpy(labels).reshape(-1).astype(np.int64)
        if not (len(bi) == len(b) == len(s) == len(lab)):
            raise ValueError(f'{len(bi)} batch indices, {len(b)} boxes, {len(s)} scores, {len(lab)} labels')
        if len(lab) and (lab.min() < 0 or lab.max() >= len(self._label_to_cat)):
            raise ValueError(f'labels must be 0-based class indices < {len(self._label_to_cat)}, '
                             f'got range [{lab.min()}, {lab.max()}]')
        if len(bi) == 0:
            return
        cat = self._label_to_cat[lab]
        keep = keep_img[bi] & (cat >= 0) & np.isfinite(b).all(1) & np.isfinite(s)
        if not keep.any():
            return
        b, s, cat, img = b[keep], s[keep], cat[keep], ids[bi[keep]]
        x1, y1 = b[:, 0], b[:, 1]
        w, h = b[:, 2] - x1, b[:, 3] - y1
        xywh = np.round(np.stack([x1, y1, w, h], 1), _BOX_DECIMALS)
        rows = np.concatenate([img[:, None].astype(np.float64), xywh,
                               np.round(s, _SCORE_DECIMALS)[:, None], cat[:, None].astype(np.float64)], 1)
        self._rows.append(rows)

    def add_results(self, results: Iterable[Mapping[str, Any]], source: str = 'results') -> None:
        """Add COCO-format results (``image_id``, ``category_id`` in dataset ids, ``bbox`` x,y,w,h,
        ``score``), e.g. a ``*_bbox_results.json``. The images they mention count as evaluated;
        pass ``image_ids`` to ``compute`` to also count images without results."""
        rows = _results_to_rows(results, source)
        if len(rows) == 0:
            return
        unknown = sorted(set(rows[:, 0].astype(np.int64).tolist()) - self._gt_img_ids)
        if unknown:
            raise UserError(f'{source}: image ids {unknown[:5]} are not in {self.source}; '
                            'these results belong to another annotation file')
        for i in np.unique(rows[:, 0].astype(np.int64)):
            if int(i) not in self._seen:
                self._seen.add(int(i))
                self._image_ids.append(int(i))
        self._rows.append(rows)

    # ------------------------------------------------------------------ results
    def _all_rows(self) -> np.ndarray:
        return np.concatenate(self._rows, 0) if self._rows else np.zeros((0, _ROW))

    @property
    def image_ids(self) -> List[int]:
        """Image ids evaluated so far, in the order they were added."""
        return list(self._image_ids)

    @property
    def results(self) -> List[Dict[str, Any]]:
        """Detections as COCO results: ``{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}``
        (bbox in original-image pixels)."""
        return _rows_to_results(self._all_rows())

    def write_json(self, path: str) -> str:
        """Write ``results`` to ``path`` atomically (temp file + os.replace); returns the path."""
        write_results_json(self.results, path)
        return path

    # ------------------------------------------------------------------ evaluation
    def compute(self, image_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """Evaluate. ``image_ids`` defaults to the images that were updated (with or without
        detections). Returns ``{AP, AP50, …, ARl, stats, per_class, num_images, num_detections,
        curves, confusion}``:

        - ``per_class[i]`` = ``{name, category_id, AP, AP50, APs, APm, APl, num_gt}`` per evaluated
          class, AP -1 when the images hold no non-crowd box of that class (pycocotools'
          convention), and overall stats -1 likewise (e.g. APs when no small objects);
        - ``curves`` (numpy, for plots): ``iou_thresholds`` [T], ``recall_thresholds`` [R],
          ``precision`` [T, R, K] float64 (COCOeval's interpolated precision at area 'all' and
          100 detections per image, K = the ``per_class`` classes in that order, -1 for a class
          without ground truth) and ``names`` [K]; the mean over R of the classes' mean at IoU
          index 0 is AP50, over all T too it is AP;
        - ``confusion``: :meth:`confusion_matrix` of the same images at IoU 0.5.
        """
        if image_ids is None:
            ids = sorted(set(self._image_ids))
        else:
            ids = sorted(set(_int_list(image_ids)))
            unknown = [i for i in ids if i not in self._gt_img_ids]
            if unknown:
                raise UserError(f'{self.source}: image ids {unknown[:5]} are not in the annotations')
        rows = self._all_rows()
        rows = rows[np.isin(rows[:, 0].astype(np.int64), np.array(ids, dtype=np.int64))]
        stats = np.zeros(len(STAT_NAMES))
        precision = None
        params = Params(iouType='bbox')
        if ids:
            ev = COCOeval(self.coco, self._results_coco(rows), 'bbox')
            ev.params.imgIds = ids
            ev.params.catIds = list(self._gt_cat_ids)
            with _quiet(self.verbose):
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            stats = np.asarray(ev.stats, dtype=np.float64)
            precision = ev.eval['precision']
            params = ev.params
        metrics: Dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, stats)}
        metrics['stats'] = [float(v) for v in stats]
        metrics['per_class'] = self._per_class(precision, ids)
        metrics['num_images'] = len(ids)
        metrics['num_detections'] = int(len(rows))
        metrics['curves'] = self._curves(precision, params, metrics['per_class'])
        metrics['confusion'] = self.confusion_matrix(ids)
        self.metrics = metrics
        return metrics

    def _curves(self, precision: Optional[np.ndarray], params: Params,
                per_class: List[Dict[str, Any]]) -> Dict[str, Any]:
        """COCOeval's precision [T, R, K] at area 'all' and the largest maxDets for the classes of
        ``per_class``, in that order (-1 everywhere when nothing was evaluated)."""
        iou = np.asarray(params.iouThrs, dtype=np.float64)
        rec = np.asarray(params.recThrs, dtype=np.float64)
        k_of = {c: k for k, c in enumerate(self._gt_cat_ids)}
        ks = np.array([k_of[r['category_id']] for r in per_class], dtype=np.int64)
        if precision is None:
            p = -np.ones((len(iou), len(rec), len(ks)))
        else:
            p = np.asarray(precision[:, :, ks, 0, -1], dtype=np.float64)
        return {'iou_thresholds': iou, 'recall_thresholds': rec, 'precision': p,
                'names': [str(r['name']) for r in per_class]}

    def _results_coco(self, rows: np.ndarray) -> COCO:
        """A results ``COCO`` built the way ``COCO.loadRes`` builds it (area = w*h, iscrowd 0), but
        also valid with zero detections."""
        res = COCO()
        anns = _rows_to_results(rows)
        for k, a in enumerate(anns):
            a['area'] = a['bbox'][2] * a['bbox'][3]
            a['id'] = k + 1
            a['iscrowd'] = 0
        res.dataset = {'images': list(self.coco.dataset['images']),
                       'categories': list(self.coco.dataset['categories']), 'annotations': anns}
        with _quiet(self.verbose):
            res.createIndex()
        return res

    def _per_class(self, precision: Optional[np.ndarray], ids: List[int]) -> List[Dict[str, Any]]:
        """Per-class AP (mean over IoU 0.50:0.95 and recall), AP50 and AP per object size
        (APs, APm, APl) from COCOeval's precision array [T, R, K, A, M] at the largest maxDets."""
        mask = np.isin(self._ann_img, np.array(ids, dtype=np.int64)) & ~self._ann_crowd
        cats, counts = np.unique(self._ann_cat[mask], return_counts=True)
        num_gt = dict(zip(cats.tolist(), counts.tolist()))
        k_of = {c: k for k, c in enumerate(self._gt_cat_ids)}
        out = []
        for name, cat in zip(self.class_names, self.cat_ids):
            if cat is None or cat not in k_of:
                continue
            ap = ap50 = -1.0
            by_area = [-1.0] * len(AREA_NAMES)
            if precision is not None:
                p = precision[:, :, k_of[cat], :, -1]  # [T, R, A]
                ap = _mean_valid(p[..., 0])
                ap50 = _mean_valid(p[0, :, 0])  # iouThrs[0] == 0.5
                by_area = [_mean_valid(p[..., a]) for a in range(1, 1 + len(AREA_NAMES))]
            elif num_gt.get(cat, 0):
                ap = ap50 = 0.0
            row = {'name': name, 'category_id': int(cat), 'AP': ap, 'AP50': ap50}
            row.update({f'AP{a[0]}': v for a, v in zip(AREA_NAMES, by_area)})
            row['num_gt'] = int(num_gt.get(cat, 0))
            out.append(row)
        return out

    def confusion_matrix(self, image_ids: Optional[Sequence[int]] = None, iou_threshold: float = 0.5,
                         score_threshold: float = CONFUSION_SCORE) -> Dict[str, Any]:
        """Which class the detections scoring >= ``score_threshold`` give each ground-truth box,
        matching at IoU >= ``iou_threshold`` regardless of class.

        One-to-one greedy matching, same-class pairs first, then by IoU: a pair is taken when no
        other remaining pair of its detection or of its box has a higher (same class, IoU), then
        both leave (vectorised over all pairs, one round per chain of conflicts). Crowd boxes
        are not counted; a detection left unmatched that covers a crowd box (COCO's crowd IoU,
        intersection / detection area) is ignored, as COCOeval does.

        Returns ``{names, category_ids, matrix, iou_threshold, score_threshold}``: ``matrix``
        int64 [K + 1, K + 1], rows the true class, columns the detected class, in ``per_class``
        order; the last column counts missed boxes of each class, the last row detections that
        match no box (background). ``image_ids`` defaults to the images evaluated.
        """
        ids = np.array(sorted(set(self._image_ids)) if image_ids is None else sorted(set(_int_list(image_ids))),
                       dtype=np.int64)
        cls_cats = [c for c in self.cat_ids if c is not None]
        names = [n for n, c in zip(self.class_names, self.cat_ids) if c is not None]
        k = len(cls_cats)
        cats = np.array(cls_cats, dtype=np.int64)
        rank = np.argsort(cats)

        def index_of(c: np.ndarray) -> np.ndarray:  # category id -> matrix index (k: not a class)
            j = np.searchsorted(cats[rank], c).clip(0, max(k - 1, 0))
            return np.where(cats[rank][j] == c, rank[j], k) if k else np.full(len(c), k)
        matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
        out = {'names': names, 'category_ids': [int(c) for c in cls_cats], 'matrix': matrix,
               'iou_threshold': float(iou_threshold), 'score_threshold': float(score_threshold)}
        rows = self._all_rows()
        rows = rows[np.isin(rows[:, 0].astype(np.int64), ids) & (rows[:, 5] >= score_threshold)
                    & np.isin(rows[:, 6].astype(np.int64), np.array(cls_cats, dtype=np.int64))]
        in_set = np.isin(self._ann_img, ids)
        gt_img, gt_cat = self._ann_img[in_set], self._ann_cat[in_set]
        gt_xywh, gt_crowd = self._ann_xywh[in_set], self._ann_crowd[in_set]
        det_img, det_cat = rows[:, 0].astype(np.int64), rows[:, 6].astype(np.int64)
        det, gt = _pairs_by_image(det_img, gt_img)
        close = _pair_iou(rows[det, 1:5], gt_xywh[gt], gt_crowd[gt]) >= iou_threshold
        on_crowd = np.zeros(len(rows), dtype=bool)
        on_crowd[det[close & gt_crowd[gt]]] = True
        real = close & ~gt_crowd[gt]
        det, gt = det[real], gt[real]
        iou = _pair_iou(rows[det, 1:5], gt_xywh[gt], np.zeros(len(gt), dtype=bool))
        weight = iou + 2.0 * (det_cat[det] == gt_cat[gt])  # same class first, then IoU
        det_match, gt_match = _greedy_match(det, gt, weight, len(rows), len(gt_img))
        hit = det_match >= 0
        np.add.at(matrix, (index_of(gt_cat[det_match[hit]]), index_of(det_cat[hit])), 1)
        missed = (gt_match < 0) & ~gt_crowd
        np.add.at(matrix, (index_of(gt_cat[missed]), k), 1)
        false = ~hit & ~on_crowd
        np.add.at(matrix, (k, index_of(det_cat[false])), 1)
        return out

    def format_table(self, metrics: Optional[Mapping[str, Any]] = None) -> str:
        """Per-class AP table (class, AP, AP50, ground-truth boxes) of ``metrics`` (default: the
        last ``compute``); '-' where the class has no ground truth in the evaluated images."""
        metrics = metrics if metrics is not None else self.metrics
        if metrics is None:
            metrics = self.compute()
        return format_table(metrics)


# ----------------------------------------------------------------------------- formatting
def format_summary(metrics: Mapping[str, Any]) -> str:
    """The 12 pycocotools numbers as the familiar ``Average Precision (AP) @[ IoU=… ] = …`` lines."""
    lines = []
    for name, (kind, iou, area, max_det) in zip(STAT_NAMES, _STAT_LAYOUT):
        title = 'Average Precision  (AP)' if kind == 'AP' else 'Average Recall     (AR)'
        lines.append(f' {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_det:>3d} ] = '
                     f'{float(metrics[name]):0.3f}')
    return '\n'.join(lines)


def format_table(metrics: Mapping[str, Any]) -> str:
    """Per-class table of ``metrics['per_class']`` with an overall row."""
    rows = metrics.get('per_class', [])
    width = max([len('class'), len('all')] + [len(str(r['name']) or str(r['category_id'])) for r in rows])

    def num(v: float) -> str:
        return f'{v:7.3f}' if v >= 0 else f'{"-":>7}'

    lines = [f'{"class":<{width}}  {"AP":>7}  {"AP50":>7}  {"gt":>6}', '-' * (width + 27)]
    for r in rows:
        lines.append(f'{(str(r["name"]) or str(r["category_id"])):<{width}}  {num(r["AP"])}  '
                     f'{num(r["AP50"])}  {r["num_gt"]:>6d}')
    lines.append('-' * (width + 27))
    total = sum(int(r['num_gt']) for r in rows)
    lines.append(f'{"all":<{width}}  {num(float(metrics["AP"]))}  {num(float(metrics["AP50"]))}  {total:>6d}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- results files
def load_results_file(path: str) -> List[Dict[str, Any]]:
    """Read a COCO results json (list of ``{image_id, category_id, bbox, score}``); UserError
    naming the file if it is missing or malformed."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: results file not found')
    try:
        with open(path, 'r', encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f'{path}: not a JSON file ({e})') from None
    _results_to_rows(data, path)  # validates
    return data


def _results_to_rows(results: Any, source: str) -> np.ndarray:
    if not isinstance(results, list):
        raise UserError(f'{source}: COCO results must be a list of '
                        '{"image_id", "category_id", "bbox": [x, y, w, h], "score"} objects')
    rows = np.zeros((len(results), _ROW))
    for n, r in enumerate(results):
        try:
            bbox = r['bbox']
            if len(bbox) != 4:
                raise ValueError
            rows[n] = (int(r['image_id']), *[float(v) for v in bbox], float(r['score']), int(r['category_id']))
        except (KeyError, TypeError, ValueError):
            raise UserError(f'{source}: entry {n} is not a COCO box result (needs image_id, '
                            f'category_id, bbox [x, y, w, h], score): {str(r)[:120]}') from None
    return rows


def _rows_to_results(rows: np.ndarray) -> List[Dict[str, Any]]:
    img = rows[:, 0].astype(np.int64).tolist()
    cat = rows[:, 6].astype(np.int64).tolist()
    boxes = rows[:, 1:5].tolist()
    scores = rows[:, 5].tolist()
    return [{'image_id': i, 'category_id': c, 'bbox': b, 'score': s}
            for i, c, b, s in zip(img, cat, boxes, scores)]


def write_results_json(obj: Any, path: str) -> None:
    """json.dump ``obj`` to ``path`` atomically (temp file in the same folder, fsync, os.replace)."""
    from .ckpt.files import atomic_write
    atomic_write(path, lambda f: json.dump(obj, f), binary=False)


# ----------------------------------------------------------------------------- reusing a results file
def file_digest(path: str) -> str:
    """sha256 of what a path holds: a file (with the ``.bin`` of an OpenVINO ``.xml``), every file
    of a folder (names and contents, in name order), or every file of an official TF checkpoint
    prefix (``PREFIX.index``, ``PREFIX.data-*``)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))]
    elif os.path.isfile(path):
        files = [path] + ([path[:-4] + '.bin'] if path.lower().endswith('.xml') else [])
    else:
        files = sorted(glob.glob(glob.escape(path) + '.*'))
    for name in files:
        if os.path.isfile(name):
            h.update(os.path.basename(name).encode())
            with open(name, 'rb') as f:
                for chunk in iter(lambda: f.read(1 << 20), b''):
                    h.update(chunk)
    return h.hexdigest()


def data_digest(obj: Any) -> str:
    """sha256 of a JSON-able object (sorted keys): e.g. the ground truth a dataset built."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def reuse_refusal(meta_path: str, key: Mapping[str, Any]) -> Optional[str]:
    """None when the results file beside ``meta_path`` was made with exactly ``key`` (everything
    that decides its content); else why it may not be reused (one phrase naming the first field
    that differs)."""
    if not os.path.isfile(meta_path):
        return f'{meta_path} (which says how the results were made) is missing'
    try:
        with open(meta_path, encoding='utf-8') as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return f'{meta_path} is unreadable'
    stored = stored.get('key', stored) if isinstance(stored, dict) else {}
    for k in sorted(set(key) | set(stored)):
        if json.dumps(stored.get(k), sort_keys=True) != json.dumps(key.get(k), sort_keys=True):
            return f'they were made with {k}={_short(stored.get(k))}, not {_short(key.get(k))}'
    return None


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + '...'


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence pycocotools' prints unless ``verbose``."""
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _int_list(ids: Any) -> List[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return [int(i) for i in _to_numpy(ids).reshape(-1).tolist()]
    return [int(i) for i in ids]


def _mean_valid(a: np.ndarray) -> float:
    v = a[a > -1]
    return float(v.mean()) if v.size else -1.0


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _field(det: Any, *names: str) -> Any:
    for name in names:
        if isinstance(det, Mapping):
            if name in det:
                return det[name]
        elif hasattr(det, name):
            return getattr(det, name)
    raise TypeError(f'detections need a {names[0]!r} entry (got {type(det).__name__})')


def _cat(arrays: List[np.ndarray], empty_shape: Tuple[int, ...]) -> np.ndarray:
    return np.concatenate(arrays, 0) if arrays else np.zeros(empty_shape)


def _pairs_by_image(det_img: np.ndarray, gt_img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Every (detection, ground truth) index pair of the same image: two int64 arrays [P],
    grouped by detection; no Python loop over images or boxes."""
    order = np.argsort(gt_img, kind='stable')
    sorted_img = gt_img[order]
    start = np.searchsorted(sorted_img, det_img, 'left')
    count = np.searchsorted(sorted_img, det_img, 'right') - start
    det = np.repeat(np.arange(len(det_img)), count)
    first = np.repeat(np.cumsum(count) - count, count)
    gt = order[np.repeat(start, count) + np.arange(len(det)) - first]
    return det, gt


def _pair_iou(det_xywh: np.ndarray, gt_xywh: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of row-aligned boxes [P, 4] (x, y, w, h); where ``crowd``, COCO's crowd IoU
    (intersection / detection area)."""
    iw = (np.minimum(det_xywh[:, 0] + det_xywh[:, 2], gt_xywh[:, 0] + gt_xywh[:, 2])
          - np.maximum(det_xywh[:, 0], gt_xywh[:, 0])).clip(min=0)
    ih = (np.minimum(det_xywh[:, 1] + det_xywh[:, 3], gt_xywh[:, 1] + gt_xywh[:, 3])
          - np.maximum(det_xywh[:, 1], gt_xywh[:, 1])).clip(min=0)
    inter = iw * ih
    det_area = det_xywh[:, 2] * det_xywh[:, 3]
    union = np.where(crowd, det_area, det_area + gt_xywh[:, 2] * gt_xywh[:, 3] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy_match(det: np.ndarray, gt: np.ndarray, weight: np.ndarray, num_det: int,
                  num_gt: int) -> Tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of candidate pairs (``det[p]``, ``gt[p]``) by descending
    ``weight``: each round takes every pair that is the heaviest remaining pair of both its
    detection and its box (the pairs the sequential greedy takes first), then drops the pairs of
    the matched ones. Returns (gt index per detection, detection index per gt), -1 unmatched."""
    det_match = np.full(num_det, -1, dtype=np.int64)
    gt_match = np.full(num_gt, -1, dtype=np.int64)
    alive = np.ones(len(det), dtype=bool)
    while alive.any():
        det, gt, weight = det[alive], gt[alive], weight[alive]
        best_det = np.full(num_det, -np.inf)
        best_gt = np.full(num_gt, -np.inf)
        np.maximum.at(best_det, det, weight)
        np.maximum.at(best_gt, gt, weight)
        take = np.flatnonzero((weight == best_det[det]) & (weight == best_gt[gt]))
        take = take[np.unique(det[take], return_index=True)[1]]  # ties: one pair per detection
        take = take[np.unique(gt[take], return_index=True)[1]]   # and per box
        det_match[det[take]] = gt[take]
        gt_match[gt[take]] = det[take]
        alive = (det_match[det] < 0) & (gt_match[gt] < 0)
    return det_match, gt_match


# ----------------------------------------------------------------------------- model evaluation
def _eval_collate(items: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Stack images [B,3,H,W] (zero-padding bottom/right to the largest) and keep per-image meta."""
    imgs = []
    for it in items:
        img = torch.as_tensor(np.asarray(it['img']) if not isinstance(it['img'], torch.Tensor) else it['img'])
        if img.dim() == 3 and img.shape[0] not in (1, 3) and img.shape[-1] == 3:
            img = img.permute(2, 0, 1)  # HWC -> CHW
        imgs.append(img.float())
    h = max(int(i.shape[-2]) for i in imgs)
    w = max(int(i.shape[-1]) for i in imgs)
    batch = imgs[0].new_zeros((len(imgs), imgs[0].shape[0], h, w))
    for k, img in enumerate(imgs):
        batch[k, :, :img.shape[-2], :img.shape[-1]] = img
    scale = torch.tensor([float(np.asarray(it['scale']).reshape(-1)[0]) for it in items], dtype=torch.float32)
    orig = torch.tensor([[float(v) for v in np.asarray(it['orig_size']).reshape(-1)[:2]] for it in items],
                        dtype=torch.float32).reshape(-1, 2)
    ids = [int(np.asarray(it['image_id']).reshape(-1)[0]) for it in items]
    return {'img': batch, 'image_id': ids, 'scale': scale, 'orig_size': orig}


def _metas(batch: Mapping[str, Any], input_hw: Tuple[int, int]) -> List[Any]:
    """The ``preprocess.ImageMeta`` of each image of an evaluation batch (``scale``: network pixels
    per original pixel, ``orig_size`` (h, w)), for ``Detector.detect_prepared``."""
    from .preprocess import ImageMeta
    metas = []
    for s, (h, w) in zip(batch['scale'].tolist(), batch['orig_size'].tolist()):
        h, w = int(h), int(w)
        metas.append(ImageMeta(scale=float(s), orig_hw=(h, w), input_hw=tuple(input_hw),
                               resized_hw=(int(h * s), int(w * s))))
    return metas


def run_coco_eval(model: Any, dataset: Any, batch_size: int = 1,
                  device: Union[str, torch.device, None] = 'cpu', score_threshold: float = 0.05,
                  nms_threshold: float = 0.5, nms: str = 'hard', max_det: int = 100, half: bool = False,
                  max_images: Optional[int] = None, progress: bool = True, num_workers: int = 0,
                  verbose: bool = False) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Run a detector over a validation ``CocoDataset`` (augment off) and evaluate with pycocotools.

    ``model``: an ``efficientdet.detector.Detector`` (its thresholds, NMS, precision and classes
    are used as they are), or a model it wraps — an ``EfficientDetBackbone`` or an exported
    runtime — with the dataset's classes, input size and normalisation and ``score_threshold``,
    ``nms_threshold``, ``nms``, ``max_det``, ``half``, ``device``. Detections therefore come from
    the same path as ``efficientdet_test.py``'s (``Detector.detect_prepared``: one autocast rule,
    one mapping back to the original image, one placeholder-class rule). Items of ``dataset`` are
    dicts with ``img`` [3, H, W] normalised, ``image_id``, ``scale`` (network px per original px)
    and ``orig_size`` (h, w); the dataset also exposes ``coco``, ``cat_ids`` (category id per
    label), ``obj_list``, ``image_size``, ``mean``, ``std``. ``max_images`` evaluates the first K
    images only. A PyTorch model's train/eval state is restored after.

    Returns ``(metrics, results)``: ``COCOEvaluator.compute`` metrics and the COCO results list
    (bbox x, y, w, h in original-image pixels).
    """
    from .detector import Detector  # local: keeps COCOEvaluator free of the model code

    coco = getattr(dataset, 'coco', None)
    if coco is None:
        raise TypeError('dataset must expose the ground truth as .coco (a pycocotools COCO)')
    cat_ids = getattr(dataset, 'cat_ids', None)
    names = getattr(dataset, 'obj_list', None)
    if cat_ids is not None and names is not None and len(names) != len(cat_ids):
        names = None
    evaluator = COCOEvaluator(coco, cat_ids=cat_ids, class_names=names, verbose=verbose)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n <= 0:
        raise UserError('the validation set has no images to evaluate'
                        + (f' (max_images={max_images})' if max_images is not None else ''))
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if isinstance(model, Detector):
        detector = model
    else:
        detector = Detector(model, list(dataset.obj_list), dataset.image_size, mean=dataset.mean, std=dataset.std,
                            threshold=score_threshold, iou=nms_threshold, nms=nms, max_det=max_det,
                            device=device, half=half, batch_size=batch_size)
    subset = dataset if n == len(dataset) else torch.utils.data.Subset(dataset, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_eval_collate)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc='eval', unit='batch', dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for batch in loader:
                x = batch['img']
                dets = detector.detect_prepared(x, _metas(batch, (int(x.shape[-2]), int(x.shape[-1]))))
                counts = [len(d) for d in dets]
                index = np.repeat(np.arange(len(dets)), counts)
                boxes = _cat([d.boxes for d in dets], (0, 4))
                scores = _cat([d.scores for d in dets], (0,))
                labels = _cat([d.class_ids for d in dets], (0,)).astype(np.int64)
                evaluator.update_flat(batch['image_id'], index, boxes, scores, labels)
    finally:
        if module is not None:
            module.train(was_training)
    metrics = evaluator.compute()
    return metrics, evaluator.results


def evaluation_key(detector: Any, project: Any, dataset: Any, data_path: str, weights: str,
                   max_images: Optional[int]) -> Dict[str, Any]:
    """Everything that decides a results file's content, for :func:`reuse_refusal`: the project
    (name, file digest, classes, anchors, format), the ground truth (digest of what the dataset
    read) and data path, the weights (digest), the model (variant, compat), the runtime and its
    precision, the input size and normalisation, the thresholds, NMS and image count."""
    from . import __version__
    model = getattr(detector, 'model', None)
    path = getattr(project, 'path', '')
    return {
        'project': project.project_name, 'project_sha256': file_digest(path) if os.path.isfile(path) else None,
        'dataset_format': getattr(project, 'dataset_format', 'coco'), 'val_set': project.val_set,
        'data_path': os.path.abspath(data_path), 'annotations': os.path.abspath(str(dataset.ann_file)),
        'ground_truth_sha256': data_digest(dataset.index.coco_dataset),
        'obj_list': list(project.obj_list), 'anchors_scales': [float(v) for v in project.anchors_scales],
        'anchors_ratios': [[float(a) for a in r] for r in project.anchors_ratios],
        'weights_sha256': file_digest(weights), 'variant': getattr(model, 'compound_coef', None),
        'compat': getattr(model, 'compat', None), 'runtime': getattr(detector.runner, 'name', 'torch'),
        'half': bool(detector.half), 'image_size': list(detector.image_size),
        'mean': [float(v) for v in detector.mean], 'std': [float(v) for v in detector.std],
        'threshold': detector.threshold, 'iou': detector.iou, 'nms': detector.nms, 'max_det': detector.max_det,
        'max_images': max_images, 'efficientdet_version': __version__,
    }


def evaluate_project(detector: Any, project: Any, data_path: str = 'datasets/', *, weights: Optional[str] = None,
                     results_path: Optional[str] = None, reuse: bool = False, batch_size: int = 1,
                     num_workers: int = 0, max_images: Optional[int] = None, progress: bool = True,
                     verbose: bool = False, log: Any = print) -> Dict[str, Any]:
    """COCO mAP of ``detector`` (``efficientdet.detector.Detector``) on ``project``'s validation set
    under ``data_path``. Detections are written to ``results_path`` (COCO results json) with a
    ``.meta.json`` beside it holding :func:`evaluation_key`. By default they are recomputed; with
    ``reuse`` an existing file is scored instead, only when its key equals this run's in every
    field (and ``weights``, the file the detector was loaded from, is known); either way ``log``
    says which happened and why. Returns the ``COCOEvaluator.compute`` metrics."""
    from .data import build_dataset
    if max_images is not None and max_images <= 0:
        raise UserError(f'--max_images {max_images}: must be a positive number of images')
    if batch_size <= 0:
        raise UserError(f'--batch_size {batch_size}: must be at least 1')
    dataset = build_dataset(project, project.val_set, detector.image_size, data_path, mean=detector.mean,
                            std=detector.std)
    log(dataset.summary())
    key = evaluation_key(detector, project, dataset, data_path, weights, max_images) if weights else None
    meta_path = results_path + '.meta.json' if results_path else None
    if reuse and results_path and os.path.exists(results_path):
        why = reuse_refusal(meta_path, key) if key is not None else 'the weights file is not known'
        if why is None:
            log(f'reusing {results_path}: made with the same key (project, ground truth, weights, runtime, precision, '
                'size, normalisation, anchors, thresholds)')
            evaluator = COCOEvaluator(dataset.coco, cat_ids=dataset.cat_ids, class_names=dataset.obj_list,
                                      verbose=verbose)
            evaluator.add_results(load_results_file(results_path), source=results_path)
            return evaluator.compute(image_ids=dataset.image_ids[:max_images])
        log(f'not reusing {results_path}: {why}; recomputing')
    metrics, results = run_coco_eval(detector, dataset, batch_size=batch_size, max_images=max_images,
                                     progress=progress, num_workers=num_workers, verbose=verbose)
    if results_path:
        replaced = os.path.exists(results_path)
        write_results_json(results, results_path)
        from .ckpt.files import atomic_write
        atomic_write(meta_path, lambda f: json.dump({'key': key}, f, indent=1), binary=False)
        log(f'wrote {len(results)} detections to {results_path}' + (' (replacing the earlier file)' if replaced else ''))
    return metrics


def score_results_file(project: Any, results_path: str, data_path: str = 'datasets/',
                       max_images: Optional[int] = None, verbose: bool = False, log: Any = print) -> Dict[str, Any]:
    """COCO mAP of an existing COCO results json against ``project``'s validation ground truth (the
    images need not be present: every listed image counts then)."""
    from .data import build_dataset
    dataset = build_dataset(project, project.val_set, 512, data_path, require_images=False)
    log(dataset.summary())
    if not dataset.images_found:
        log(f'note: {dataset.image_dir} not found: scoring against every image listed in {dataset.ann_file}')
    results = load_results_file(results_path)
    evaluator = COCOEvaluator(dataset.coco, cat_ids=dataset.cat_ids,
                              class_names=dataset.obj_list, verbose=verbose)
    evaluator.add_results(results, source=results_path)
    if not results:
        log(f'note: {results_path} holds no detections')
    return evaluator.compute(image_ids=dataset.image_ids[:max_images])
