"""How well a project's anchors fit its boxes, and a search for scales / ratios that fit better.

Training matches a box to the anchors whose IoU with it is >= 0.5; a box with no such anchor only
gets its single best anchor by force-matching, a weak training signal (custom data with mAP stuck
near 0 is often this). :func:`anchor_coverage` measures the share of boxes with a best IoU >= 0.5
at the network input size (boxes letterboxed as the validation transform does), using the model's
own anchors (:func:`efficientdet.anchors.generate_anchors`). :func:`suggest_anchors` searches
scale and ratio sets of the same sizes (so the head's anchor count, and pretrained heads, stay)
that maximise that share (an exhaustive search over the pools).

Exact and vectorised: for boxes and anchors of fixed shapes the intersection only shrinks as the
centres move apart along either axis, so a box's best anchor of each shape on a level is the one
at the grid centre nearest to the box centre. Per level that is one gather of [N, K] anchors.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..anchors import generate_anchors

IOU_THRESHOLD = 0.5
#: COCO's small / medium / large split, here on box area in network-input pixels.
SIZE_BUCKETS = (('small', 0.0, 32.0 ** 2), ('medium', 32.0 ** 2, 96.0 ** 2), ('large', 96.0 ** 2, float('inf')))
#: search pools: octave scales 2 ** (j / 3) and aspect ratios w / h = 2 ** (k / 2)
SCALE_STEPS = tuple(range(-3, 7))
RATIO_STEPS = tuple(range(-8, 9))
MAX_BOXES = 20000


def letterbox_boxes(boxes: np.ndarray, image_hw: np.ndarray, input_hw: Tuple[int, int]) -> np.ndarray:
    """Boxes [N, 4] xyxy original pixels of images [N, 2] (h, w) → xyxy network-input pixels
    (scale min(H / h, W / w), no offset: the validation letterbox)."""
    s = np.minimum(input_hw[0] / image_hw[:, 0], input_hw[1] / image_hw[:, 1])
    return boxes.astype(np.float64) * s[:, None]


def best_iou_per_shape(boxes: np.ndarray, input_hw: Tuple[int, int], levels: Sequence[int], anchor_scale: float,
                       scales: Sequence[float], ratios: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Best IoU over all positions and levels of each anchor shape: [N, S * R] (scale-major,
    ratio fastest, the generator's order) for boxes [N, 4] xyxy network-input pixels."""
    k = len(scales) * len(ratios)
    anchors = generate_anchors(input_hw, levels, anchor_scale, scales, ratios)  # [A, 4] yxyx
    best = np.zeros((len(boxes), k))
    if len(boxes) == 0:
        return best
    bcy, bcx = (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2
    b_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    start = 0
    fh, fw = int(input_hw[0]), int(input_hw[1])
    for level in range(1, max(levels) + 1):
        fh, fw = (fh + 1) // 2, (fw + 1) // 2
        if level not in levels:
            continue
        grid = anchors[start:start + fh * fw * k].reshape(fh, fw, k, 4)
        start += fh * fw * k
        iy = _nearest((grid[:, 0, 0, 0] + grid[:, 0, 0, 2]) / 2, bcy)
        ix = _nearest((grid[0, :, 0, 1] + grid[0, :, 0, 3]) / 2, bcx)
        a = grid[iy, ix]  # [N, K, 4] yxyx
        ih = np.minimum(a[..., 2], boxes[:, None, 3]) - np.maximum(a[..., 0], boxes[:, None, 1])
        iw = np.minimum(a[..., 3], boxes[:, None, 2]) - np.maximum(a[..., 1], boxes[:, None, 0])
        inter = np.clip(ih, 0, None) * np.clip(iw, 0, None)
        a_area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
        np.maximum(best, inter / (a_area + b_area[:, None] - inter), out=best)
    return best


def anchor_shapes(input_hw: Tuple[int, int], levels: Sequence[int], anchor_scale: float, scales: Sequence[float],
                  ratios: Sequence[Tuple[float, float]]) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct anchor shapes the model generates at ``input_hw``: (sizes sqrt(w * h),
    aspect ratios w / h), each sorted and unique (to 1e-6 px), in network-input pixels."""
    a = generate_anchors(input_hw, levels, anchor_scale, scales, ratios)  # [A, 4] yxyx
    w, h = a[:, 3] - a[:, 1], a[:, 2] - a[:, 0]
    return np.unique(np.round(np.sqrt(w * h), 6)), np.unique(np.round(w / h, 6))


def best_anchor_iou(boxes: np.ndarray, input_hw: Tuple[int, int], levels: Sequence[int], anchor_scale: float,
                    scales: Sequence[float], ratios: Sequence[Tuple[float, float]],
                    chunk: int = MAX_BOXES) -> np.ndarray:
    """Best IoU [N] of each box [N, 4] xyxy network-input pixels with any anchor (every box, in
    chunks of ``chunk`` to bound memory)."""
    out = [best_iou_per_shape(boxes[i:i + chunk], input_hw, levels, anchor_scale, scales, ratios).max(1, initial=0.0)
           for i in range(0, len(boxes), chunk)]
    return np.concatenate(out) if out else np.zeros(0)


def _nearest(centres: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest of the ascending ``centres`` for each value."""
    i = np.clip(np.searchsorted(centres, values), 1, len(centres) - 1)
    left = np.abs(values - centres[i - 1]) <= np.abs(centres[i] - values)
    return np.where(left, i - 1, i) if len(centres) > 1 else np.zeros(len(values), np.int64)


def coverage_by_size(covered: np.ndarray, area: np.ndarray) -> Dict[str, Dict[str, float]]:
    """{bucket: {boxes, coverage}} for the COCO size buckets (coverage -1 for an empty bucket)."""
    out = {}
    for name, lo, hi in SIZE_BUCKETS:
        m = (area >= lo) & (area < hi)
        out[name] = {'boxes': int(m.sum()), 'coverage': float(covered[m].mean()) if m.any() else -1.0}
    return out


@dataclass
class AnchorFit:
    """Result of :func:`fit_anchors` (coverage = share of boxes with best anchor IoU >= 0.5)."""
    input_hw: Tuple[int, int]
    num_boxes: int
    sampled: int
    coverage: float
    by_size: Dict[str, Dict[str, float]]
    suggested_scales: List[float]
    suggested_ratios: List[Tuple[float, float]]
    suggested_scales_text: str
    suggested_ratios_text: str
    suggested_coverage: float
    suggested_by_size: Dict[str, Dict[str, float]]

    def to_json(self) -> Dict[str, object]:
        return {'image_size': list(self.input_hw), 'num_boxes': self.num_boxes, 'boxes_measured': self.sampled,
                'iou_threshold': IOU_THRESHOLD, 'anchor_coverage': self.coverage, 'by_size': self.by_size,
                'suggested': {'anchors_scales': self.suggested_scales_text,
                              'anchors_ratios': self.suggested_ratios_text,
                              'anchor_coverage': self.suggested_coverage, 'by_size': self.suggested_by_size}}


def scale_text(steps: Sequence[int]) -> str:
    """Octave steps j → the project-file string of scales 2 ** (j / 3)."""
    parts = [f'2 ** {j // 3}' if j % 3 == 0 else f'2 ** ({j:.1f} / 3.0)' for j in steps]
    return '[' + ', '.join(parts) + ']'


def ratio_text(steps: Sequence[int]) -> str:
    """Aspect steps k (w / h = 2 ** (k / 2)) → the project-file string of (x, y) pairs
    (2 ** (k / 4), 2 ** (-k / 4))."""
    parts = ['(1.0, 1.0)' if k == 0 else f'(2 ** {k / 4:g}, 2 ** {-k / 4:g})' for k in steps]
    return '[' + ', '.join(parts) + ']'


def fit_anchors(boxes: np.ndarray, image_hw: np.ndarray, input_hw: Tuple[int, int], levels: Sequence[int],
                anchor_scale: float, scales: Sequence[float], ratios: Sequence[Tuple[float, float]],
                max_boxes: int = MAX_BOXES, seed: int = 0) -> AnchorFit:
    """Coverage of the given anchors and the best same-sized scale / ratio sets from the pools.

    boxes [N, 4] xyxy original pixels (crowd boxes left out by the caller), image_hw [N, 2] (h, w)
    of each box's image. More than ``max_boxes`` boxes: a seeded random sample is measured.
    """
    n = len(boxes)
    if n > max_boxes:
        pick = np.sort(np.random.default_rng(seed).choice(n, max_boxes, replace=False))
        boxes, image_hw = boxes[pick], image_hw[pick]
    net = letterbox_boxes(boxes, image_hw, input_hw)
    area = (net[:, 2] - net[:, 0]) * (net[:, 3] - net[:, 1])
    cur = best_iou_per_shape(net, input_hw, levels, anchor_scale, scales, ratios).max(1, initial=0.0) >= IOU_THRESHOLD
    pool_s = [2.0 ** (j / 3.0) for j in SCALE_STEPS]
    pool_r = [(2.0 ** (k / 4.0), 2.0 ** (-k / 4.0)) for k in RATIO_STEPS]
    hit = best_iou_per_shape(net, input_hw, levels, anchor_scale, pool_s, pool_r) >= IOU_THRESHOLD
    hit = hit.reshape(len(net), len(pool_s), len(pool_r))
    si = _start(scales, pool_s, lambda a, b: abs(np.log2(a) - np.log2(b)))
    ri = _start(ratios, pool_r, lambda a, b: abs(np.log2(a[0] / a[1]) - np.log2(b[0] / b[1])))
    si, ri, best = _search(hit, si, ri)
    s_steps = [SCALE_STEPS[i] for i in si]
    r_steps = [RATIO_STEPS[i] for i in ri]
    covered = hit[:, si][:, :, ri].any((1, 2))
    return AnchorFit(tuple(int(v) for v in input_hw), n, len(net), float(cur.mean()) if len(net) else 0.0,
                     coverage_by_size(cur, area), [pool_s[i] for i in si], [pool_r[i] for i in ri],
                     scale_text(s_steps), ratio_text(r_steps), float(best),
                     coverage_by_size(covered, area))


def _start(values: Sequence, pool: Sequence, dist) -> Tuple[int, ...]:
    """Distinct pool indices nearest to ``values`` (the search's starting point)."""
    chosen: List[int] = []
    for v in values:
        order = sorted(range(len(pool)), key=lambda i: dist(v, pool[i]))
        chosen.append(next(i for i in order if i not in chosen))
    return tuple(sorted(chosen))


def _search(hit: np.ndarray, si: Tuple[int, ...], ri: Tuple[int, ...]) -> Tuple[List[int], List[int], float]:
    """Exhaustive search over scale subsets and ratio subsets of the current sizes: the pair that
    covers the most boxes, among equals the one changing fewest of the current members.
    hit [N, S, R] bool (box n has IoU >= 0.5 with some anchor of shape (s, r)). One matrix product
    per scale subset: [N, R] x [R, ratio subsets]."""
    n = max(len(hit), 1)
    s_sets = list(itertools.combinations(range(hit.shape[1]), len(si)))
    r_sets = np.array(list(itertools.combinations(range(hit.shape[2]), len(ri))))
    r_onehot = np.zeros((len(r_sets), hit.shape[2]), np.float32)
    np.put_along_axis(r_onehot, r_sets, 1.0, 1)
    r_changes = len(ri) - r_onehot[:, list(ri)].sum(1)
    best_key, best = None, (list(si), list(ri), 0.0)
    for s in s_sets:
        per_ratio = hit[:, list(s), :].any(1).astype(np.float32)           # [N, R]
        covered = ((per_ratio @ r_onehot.T) > 0).sum(0)                     # [ratio subsets]
        changes = len(si) - len(set(s) & set(si)) + r_changes
        j = int(np.lexsort((changes, -covered))[0])                         # most covered, fewest changes
        key = (-int(covered[j]), float(changes[j]))
        if best_key is None or key < best_key:
            best_key, best = key, (list(s), [int(i) for i in r_sets[j]], float(covered[j]) / n)
    return best


def format_fit(fit: AnchorFit, current_scales: Optional[str] = None, current_ratios: Optional[str] = None) -> str:
    """Readable anchor report with the suggestion as project-file lines."""
    def sizes(d: Dict[str, Dict[str, float]]) -> str:
        return ', '.join(f'{k} {v["coverage"]:.1%} of {v["boxes"]}' if v['boxes'] else f'{k} -' for k, v in d.items())
    h, w = fit.input_hw
    sample = f' (a sample of {fit.sampled})' if fit.sampled < fit.num_boxes else ''
    lines = [f'anchor fit at {h}x{w} input, {fit.num_boxes} boxes{sample}: {fit.coverage:.1%} have an anchor with '
             f'IoU >= {IOU_THRESHOLD} (the rest only get a force-matched anchor)',
             f'  by size (area in input pixels): {sizes(fit.by_size)}',
             f'  suggested anchors: {fit.suggested_coverage:.1%} ({sizes(fit.suggested_by_size)})']
    if fit.suggested_coverage > fit.coverage:
        lines += ['  project file lines:', f"    anchors_scales: '{fit.suggested_scales_text}'",
                  f"    anchors_ratios: '{fit.suggested_ratios_text}'",
                  '  (same anchor count per location; a checkpoint trained with other anchors needs fine-tuning)']
    else:
        lines.append('  the project\'s anchors are already the best found; keep them')
    return '\n'.join(lines)
