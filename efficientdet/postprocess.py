"""Post-processing: NMS, gaussian soft-NMS, the official post-processing and a fast ``detect``.

Coordinate conventions:
- ``nms`` / ``batched_nms`` take any corner boxes; torchvision uses (x1, y1, x2, y2).
- ``official_postprocess`` works on the official side: anchors and boxes are (y1, x1, y2, x2)
  input pixels, classes are 1-based (the official ``CLASS_OFFSET``).
- ``detect`` returns the user side: (x1, y1, x2, y2) network-input pixels, labels 0-based.

All greedy selections are exact: candidates are visited in (score descending, index ascending)
order, the order of torchvision's stable sort and of TensorFlow's NMS priority queue. The loops
run once per *kept* box (never per candidate), each step a handful of tensor ops over all
candidates of all images at once.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from .anchors import decode_boxes

__all__ = ['nms', 'batched_nms', 'soft_nms', 'official_postprocess', 'detect', 'candidates', 'to_xyxy_clipped',
           'BestClass', 'Scores', 'class_mask', 'NMS_METHODS', 'OFFICIAL_SOFT_SIGMA', 'OFFICIAL_SOFT_SCORE_THRESHOLD',
           'PRE_NMS_TOPK']

NMS_METHODS = ('hard', 'gaussian', 'official')  # ``detect(nms=...)``, ``--nms`` in every script

OFFICIAL_SOFT_SIGMA = 0.5             # official nms_configs sigma for method='gaussian'
OFFICIAL_SOFT_SCORE_THRESHOLD = 0.001  # official score_thresh default for method='gaussian'
PRE_NMS_TOPK = 5000                   # candidates per image kept by ``detect`` before NMS
_BLOCK = 1024                         # boxes per block in the exact blocked NMS

try:  # torchvision's compiled kernels when they load and work; never required.
    import torchvision.ops as _tv_ops  # type: ignore

    _tv_ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
except Exception:  # ImportError, missing compiled ops, ABI mismatch …
    _tv_ops = None


# --------------------------------------------------------------------------- class scores
class BestClass:
    """Each anchor's best class: scores [B, A] (its probability, after sigmoid) and labels [B, A]
    long (0-based; the first maximum on ties). Every post-processing here keeps only the best
    class of an anchor, so this is all it needs of the [B, A, C] classification; runtimes that
    take the best class in the graph return it instead (``efficientdet.runtimes``).

    Made from [B, A, C] values (:meth:`from_logits`, :meth:`of`) or from the per-level
    [B, A_l, C] pieces they are concatenated from (:meth:`from_level_logits`), the labels are
    computed when first asked for, and :meth:`labels_at` takes them for a few anchors only: on a
    CPU the arg-max over all A x C values costs about four times the maximum itself, and
    post-processing needs the labels of its NMS candidates only. Unpacks as ``scores, labels``.

    ``allowed`` (bool [C], see :func:`class_mask`): the classes that may be an anchor's best class;
    the others (placeholder slots such as COCO's ten unused ids) are left out *before* the maximum,
    so an anchor whose top slot is a placeholder keeps its best real class."""

    __slots__ = ('scores', '_labels', '_values', '_allowed')

    def __init__(self, scores: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 values: Union[None, torch.Tensor, List[torch.Tensor]] = None,
                 allowed: Optional[torch.Tensor] = None):
        if labels is None and values is None:
            raise ValueError('BestClass needs the labels or the [B, A, C] values they come from')
        self.scores = scores
        self._labels = labels
        # [B, A, C] logits or probabilities (same arg-max), or its per-level pieces [B, A_l, C]
        self._values = [values] if isinstance(values, torch.Tensor) else values
        self._allowed = allowed

    def _masked(self, v: torch.Tensor) -> torch.Tensor:
        return v if self._allowed is None else v.masked_fill(~self._allowed.to(v.device), float('-inf'))

    @property
    def labels(self) -> torch.Tensor:
        """[B, A] long, the first maximum on ties."""
        if self._labels is None:
            self._labels = torch.cat([self._masked(v).argmax(-1) for v in self._values], 1)
        return self._labels

    def labels_at(self, index: torch.Tensor) -> torch.Tensor:
        """Labels of the anchors ``index`` [B, K] (long [B, K]), as ``labels.gather(1, index)``."""
        if self._labels is not None:
            return self._labels.gather(1, index).long()
        labels = torch.zeros_like(index)
        image = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        start = 0
        for v in self._values:  # each level reads the [C] values of its own anchors only
            inside = (index >= start) & (index < start + v.shape[1])
            labels[inside] = self._masked(v[image[inside], index[inside] - start]).argmax(-1)
            start += v.shape[1]
        return labels

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.scores, self.labels))

    def __repr__(self) -> str:
        return f'BestClass(scores {tuple(self.scores.shape)}, labels {"lazy" if self._labels is None else "given"})'

    @classmethod
    def of(cls, classification: 'Scores', allowed: Optional[torch.Tensor] = None) -> 'BestClass':
        """From a [B, A, C] classification (after sigmoid), or a BestClass (returned as float32;
        its classes were chosen when it was made, so ``allowed`` does not apply)."""
        if isinstance(classification, BestClass):
            return classification.float()
        made = cls(torch.zeros(0), values=classification, allowed=allowed)
        made.scores = made._masked(classification.float()).amax(-1)
        return made

    @classmethod
    def from_logits(cls, logits: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> 'BestClass':
        """From [B, A, C] logits: the maximum first, then the sigmoid of [B, A] values only."""
        return cls.from_level_logits([logits], allowed)

    @classmethod
    def from_level_logits(cls, levels: List[torch.Tensor], allowed: Optional[torch.Tensor] = None) -> 'BestClass':
        """From the per-level [B, A_l, C] logits (P3 first) that concatenate to [B, A, C]: the same
        result as :meth:`from_logits` on the concatenation, without making it."""
        made = cls(torch.zeros(0), values=list(levels), allowed=allowed)
        best = torch.cat([made._masked(v).amax(-1) for v in levels], 1)
        made.scores = torch.sigmoid(best.float())
        return made

    def float(self) -> 'BestClass':
        labels = self._labels.long() if self._labels is not None else None
        return BestClass(self.scores.float(), labels, self._values, self._allowed)


def class_mask(obj_list: Optional[List[str]], num_classes: Optional[int] = None) -> Optional[torch.Tensor]:
    """bool [C]: True for the real classes of ``obj_list``, False for its '' placeholder slots (and
    for slots past its end when the model has ``num_classes`` > len(obj_list)); None when every
    class is real (nothing to leave out)."""
    if obj_list is None:
        return None
    n = len(obj_list) if num_classes is None else int(num_classes)
    mask = torch.tensor([i < len(obj_list) and obj_list[i] != '' for i in range(n)], dtype=torch.bool)
    return None if bool(mask.all()) else mask


Scores = Union[torch.Tensor, BestClass]  # [B, A, C] after sigmoid, or each anchor's best class


# --------------------------------------------------------------------------- IoU
def _prepare_boxes(boxes: torch.Tensor, tf_style: bool) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Contiguous coordinate planes [a1, b1, a2, b2] (each [..., M]) and areas for repeated
    one-to-many IoU. ``tf_style``: TensorFlow's NMS kernel — corners re-ordered with min/max, and a
    box of area <= 0 overlaps nothing (its area is set to NaN, giving NaN IoUs the callers zero)."""
    c = [boxes[..., i].contiguous() for i in range(4)]
    if tf_style:
        c = [torch.minimum(c[0], c[2]), torch.minimum(c[1], c[3]), torch.maximum(c[0], c[2]),
             torch.maximum(c[1], c[3])]
    area = (c[2] - c[0]) * (c[3] - c[1])
    if tf_style:
        area = torch.where(area > 0, area, torch.full_like(area, float('nan')))
    return c, area


def _iou_one_to_many(sel: torch.Tensor, planes: List[torch.Tensor], areas: torch.Tensor) -> torch.Tensor:
    """IoU of one box per group with all boxes of its group: ``sel`` [G] positions into the planes
    ([G, M] each, from ``_prepare_boxes``) -> [G, M]. NaN (zero union / NaN area) is returned as 0."""
    rows = torch.arange(sel.shape[0], device=sel.device)
    s = [p[rows, sel][:, None] for p in planes]
    ih = (torch.minimum(s[2], planes[2]) - torch.maximum(s[0], planes[0])).clamp_(min=0)
    iw = (torch.minimum(s[3], planes[3]) - torch.maximum(s[1], planes[1])).clamp_(min=0)
    inter = ih * iw
    iou = inter / (areas[rows, sel][:, None] + areas - inter)
    return torch.nan_to_num_(iou, nan=0.0)


# --------------------------------------------------------------------------- exact hard NMS
def _sort_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices by score descending, ties by index ascending (stable)."""
    return torch.sort(scores, descending=True, stable=True).indices


def _planes(boxes: torch.Tensor) -> List[torch.Tensor]:
    """[N, 4] corner boxes -> contiguous [a1, b1, a2, b2, area] vectors."""
    c, area = _prepare_boxes(boxes, tf_style=False)
    return c + [area]


def _iou_planes(p: List[torch.Tensor], q: List[torch.Tensor]) -> torch.Tensor:
    """IoU matrix [K, M] of boxes given as planes (``_planes``); torchvision's formula."""
    ih = (torch.minimum(p[2][:, None], q[2][None]) - torch.maximum(p[0][:, None], q[0][None])).clamp_(min=0)
    iw = (torch.minimum(p[3][:, None], q[3][None]) - torch.maximum(p[1][:, None], q[1][None])).clamp_(min=0)
    inter = ih.mul_(iw)
    return inter / (p[4][:, None] + q[4][None] - inter)


def _greedy_blocked(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                    idxs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact greedy NMS, per group of ``idxs`` when given. Boxes are sorted group-major, score
    descending inside a group (ties: lower index first), and visited in blocks of ``_BLOCK``: a
    block is first suppressed by the kept boxes of its groups (one IoU matrix), then resolved
    inside itself with its upper-triangular suppression matrix — one step per kept box.
    Returns kept indices, score descending (ties: lower index first)."""
    n = boxes.shape[0]
    dev = boxes.device
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=dev)
    by_score = _sort_desc(scores)
    order, lab = by_score, None
    if idxs is not None:
        order = by_score[torch.sort(idxs[by_score], stable=True).indices]  # group-major, score order inside
        lab = idxs[order]
    pl = _planes(boxes[order].float())
    kept = torch.empty(n, dtype=torch.long, device=dev)  # positions in the sorted order
    n_kept = 0
    for start in range(0, n, _BLOCK):
        end = min(n, start + _BLOCK)
        blk = [p[start:end] for p in pl]
        lb = lab[start:end] if lab is not None else None
        alive = torch.ones(end - start, dtype=torch.bool, device=dev)
        first = 0  # kept boxes that can touch this block: those of its groups (a suffix of ``kept``)
        if lab is not None and n_kept:
            p0 = torch.searchsorted(lab, lb[:1])  # first position of the block's first group
            first = int(torch.searchsorted(kept[:n_kept], p0))
        if n_kept > first:
            prev = kept[first:n_kept]
            over = _iou_planes([p[prev] for p in pl], blk) > iou_threshold
            if lab is not None:
                over &= lab[prev][:, None] == lb[None, :]
            alive = ~over.any(0)
        sup = _iou_planes(blk, blk) > iou_threshold
        if lb is not None:
            sup &= lb[:, None] == lb[None, :]
        local = _resolve_block(torch.triu(sup, diagonal=1).cpu().numpy(), alive.cpu().numpy())
        if local.size:
            kept[n_kept:n_kept + local.size] = torch.from_numpy(local).to(dev) + start
            n_kept += local.size
    kept = order[kept[:n_kept]]
    if lab is None:
        return kept
    is_kept = torch.zeros(n, dtype=torch.bool, device=dev)  # back to score order (ties: lower index)
    is_kept[kept] = True
    return by_score[is_kept[by_score]]


def _resolve_block(sup: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Greedy inside one block: ``sup[i, j]`` (i < j) says box i suppresses box j. Steps once per
    kept box: take the first alive box, drop what it suppresses."""
    alive = alive.copy()
    keep = []
    pos, n = 0, alive.shape[0]
    while pos < n:
        rest = alive[pos:]
        j = int(rest.argmax())
        if not rest[j]:
            break
        j += pos
        keep.append(j)
        alive &= ~sup[j]
        pos = j + 1
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS (torchvision's signature and results). boxes [N, 4] (x1, y1, x2, y2), scores [N]
    -> indices of kept boxes [K] long, score descending (ties: lower index first)."""
    if _tv_ops is not None:
        return _tv_ops.nms(boxes, scores, float(iou_threshold))
    return _greedy_blocked(boxes, scores, float(iou_threshold))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS independently per value of ``idxs`` (e.g. class): boxes [N, 4] xyxy, scores [N],
    idxs [N] -> kept indices [K] long, score descending (torchvision's ``batched_nms``)."""
    if _tv_ops is not None:
        return _tv_ops.batched_nms(boxes, scores, idxs, float(iou_threshold))
    return _greedy_blocked(boxes, scores, float(iou_threshold), idxs)


# --------------------------------------------------------------------------- padded greedy / soft
def _select_padded(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                   labels: Optional[torch.Tensor], iou_threshold: float, sigma: float,
                   score_threshold: float, max_output: int, tf_style: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy hard NMS (``sigma == 0``) or gaussian soft-NMS on G independent groups at once.

    boxes [G, M, 4] (any corner order), scores [G, M], valid [G, M] bool, labels [G, M] or None
    (boxes only affect boxes with the same label). Soft-NMS follows TF ``NonMaxSuppressionV5``:
    weight = exp(-iou^2 / sigma) (TF's ``soft_nms_sigma`` = sigma / 2), candidates dropped once
    their score <= score_threshold. Hard NMS: drop when iou > iou_threshold.

    Returns (index [G, K] long with -1 padding, score [G, K] with 0 padding, count [G]), K =
    max_output, entries in selection order (score descending; ties: lower position first).
    """
    g, m = scores.shape
    dev = scores.device
    out_idx = torch.full((g, max_output), -1, dtype=torch.long, device=dev)
    out_sc = torch.zeros((g, max_output), dtype=torch.float32, device=dev)
    if g == 0 or m == 0 or max_output == 0:
        return out_idx, out_sc, torch.zeros(g, dtype=torch.long, device=dev)
    scores = scores.float().clone()
    boxes = boxes.float()
    alive = valid & (scores > score_threshold)
    soft = sigma > 0
    scale = -1.0 / sigma if soft else 0.0  # TF: -0.5 / soft_nms_sigma with soft_nms_sigma = sigma / 2
    rows = torch.arange(g, device=dev)
    neg_inf = torch.tensor(float('-inf'), device=dev)
    planes, areas = _prepare_boxes(boxes, tf_style)
    for k in range(max_output):
        cur = torch.where(alive, scores, neg_inf)
        best = cur.argmax(1)  # first maximum: ties go to the lower position
        has = alive[rows, best]
        if not bool(has.any()):
            break
        out_idx[:, k] = torch.where(has, best, out_idx[:, k])
        out_sc[:, k] = torch.where(has, scores[rows, best], out_sc[:, k])
        alive[rows, best] = False
        iou = _iou_one_to_many(best, planes, areas)  # [G, M]; TF: zero-area boxes overlap nothing
        if labels is not None:
            iou = iou.masked_fill(labels != labels[rows, best][:, None], 0.0)
        if soft:
            scores = scores * (iou * scale).mul_(iou).exp_()  # TF order: (scale * iou) * iou
            alive &= scores > score_threshold
        else:
            alive &= ~(iou > iou_threshold)
    count = (out_idx >= 0).sum(1)
    return out_idx, out_sc, count


def _compact(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of True entries per row, left-aligned: mask [G, A] -> (index [G, M], valid [G, M]),
    M = max count (at least 1); original order kept; padding index 0."""
    counts = mask.sum(1)
    m = max(1, int(counts.max())) if counts.numel() else 0  # >= 1 column so gathers stay valid
    m = min(m, mask.shape[1])
    # a stable sort on ~mask moves the True entries first, keeping their order
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, sigma: float = OFFICIAL_SOFT_SIGMA,
             score_threshold: float = OFFICIAL_SOFT_SCORE_THRESHOLD, max_output: int = 100,
             idxs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian soft-NMS as the official model runs it (TF NonMaxSuppressionV5, weight
    exp(-iou^2 / sigma)). boxes [N, 4] (corner boxes, any order), scores [N]; ``idxs`` [N] makes it
    per class. Returns (kept indices [K], their decayed scores [K]), score descending."""
    idx, sc, n = _select_padded(boxes[None], scores[None], torch.ones_like(scores, dtype=torch.bool)[None],
                                None if idxs is None else idxs[None], 1.0, float(sigma),
                                float(score_threshold), int(max_output), tf_style=True)
    k = int(n[0])
    return idx[0, :k], sc[0, :k]


# --------------------------------------------------------------------------- official
def official_postprocess(classification: Scores, regression: torch.Tensor, anchors: torch.Tensor,
                         image_size: Tuple[int, int], method: str = 'hard', mode: str = 'global',
                         max_output: int = 100, iou_threshold: float = 0.5,
                         score_threshold: Optional[float] = None, sigma: float = OFFICIAL_SOFT_SIGMA,
                         allowed: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``postprocess_global`` / ``postprocess_per_class``.

    classification [B, A, C] after sigmoid (or its :class:`BestClass`), regression [B, A, 4]
    (ty, tx, th, tw), anchors [1, A, 4] (y1, x1, y2, x2) pixels, image_size (H, W). Every anchor
    keeps only its best class.
    method 'hard': NMS at ``iou_threshold``, score threshold -inf unless given; 'gaussian':
    soft-NMS with ``sigma``, score threshold 0.001 unless given. mode 'global': one NMS over all
    anchors regardless of class, boxes clipped to [0, H] x [0, W]; 'per_class': NMS within each
    class, merged, top ``max_output`` by score, not clipped.

    Returns boxes [B, K, 4] (y1, x1, y2, x2) pixels, scores [B, K], classes [B, K] long (1-based),
    valid [B] long; K = max_output, rows after ``valid`` are zeros.
    """
    if method not in ('hard', 'gaussian'):
        raise ValueError(f"method must be 'hard' or 'gaussian', got {method!r}")
    if mode not in ('global', 'per_class'):
        raise ValueError(f"mode must be 'global' or 'per_class', got {mode!r}")
    if method == 'hard':
        sig, iou_thr = 0.0, float(iou_threshold)
        st = float('-inf') if score_threshold is None else float(score_threshold)
    else:
        sig, iou_thr = float(sigma), 1.0
        st = OFFICIAL_SOFT_SCORE_THRESHOLD if score_threshold is None else float(score_threshold)
    best = BestClass.of(classification, allowed)  # first maximum, as tf.math.argmax
    scores, classes = best.scores, best.labels  # [B, A]
    boxes = decode_boxes(regression.float(), anchors.float())  # [B, A, 4] yxyx
    # Only candidates above the score threshold can ever be selected: compact them (exact).
    index, valid = _compact(scores > st)
    b_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
    b_scores = scores.gather(1, index)
    b_classes = classes.gather(1, index)
    # per_class == class-masked global selection: classes never interact, and each class's
    # selections come out in descending score order, so the first K overall are the merged top K.
    sel, sel_scores, count = _select_padded(b_boxes, b_scores, valid, b_classes if mode == 'per_class' else None,
                                            iou_thr, sig, st, int(max_output), tf_style=True)
    ok = sel >= 0
    safe = sel.clamp(min=0)
    out_boxes = b_boxes.gather(1, safe[..., None].expand(-1, -1, 4))
    out_classes = b_classes.gather(1, safe) + 1
    if mode == 'global':
        h, w = float(image_size[0]), float(image_size[1])
        hi = torch.tensor([h, w, h, w], device=out_boxes.device)
        out_boxes = torch.minimum(out_boxes.clamp(min=0), hi)
    out_boxes = torch.where(ok[..., None], out_boxes, torch.zeros_like(out_boxes))
    out_classes = torch.where(ok, out_classes, torch.zeros_like(out_classes))
    return out_boxes, sel_scores, out_classes, count


# --------------------------------------------------------------------------- fast detect
def to_xyxy_clipped(boxes_yxyx: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """[..., 4] (y1, x1, y2, x2) pixels -> (x1, y1, x2, y2) clipped to [0, W] x [0, H]."""
    h, w = float(image_size[0]), float(image_size[1])
    y1, x1, y2, x2 = boxes_yxyx.unbind(-1)
    return torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], -1)


def candidates(best: torch.Tensor, labels: Union[torch.Tensor, BestClass], regression: torch.Tensor,
               anchors: torch.Tensor, image_size: Tuple[int, int], score_threshold: float, k: int
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The NMS candidates of ``detect`` and of the exported NMS graph.

    ``best, labels = classification.max(-1)``: each anchor keeps its best class (first maximum,
    [B, A] each; ``labels`` may be the :class:`BestClass`, whose labels are then computed for the
    candidates only), regression [B, A, 4], anchors [1, A, 4] yxyx pixels. The ``k`` best anchors above
    ``score_threshold`` are taken and put back in anchor order, so that NMS ties go to the lower
    anchor index. Returns scores [B, k] (-inf where fewer than k pass), boxes [B, k, 4]
    (x1, y1, x2, y2) decoded and clipped to the input, labels [B, k] (0-based). Traceable (``k``
    is a Python int).
    """
    masked = torch.where(best > score_threshold, best, torch.full_like(best, float('-inf')))
    top_idx = torch.sort(masked.topk(k, dim=1).indices, dim=1).values
    reg = regression.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, 4))
    boxes = to_xyxy_clipped(decode_boxes(reg, anchors[0][top_idx]), image_size)
    cand_labels = labels.labels_at(top_idx) if isinstance(labels, BestClass) else labels.gather(1, top_idx)
    return masked.gather(1, top_idx), boxes, cand_labels


def _hard_nms_padded(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, labels: Optional[torch.Tensor],
                     iou_threshold: float, max_output: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy hard NMS of every image of a padded batch at once, with ``_select_padded``'s inputs
    and results (index [G, max_output] with -1 padding, score [G, max_output]): the candidates of all
    images go through one exact blocked NMS (``_greedy_blocked``, groups = image x label), whose
    steps cost microseconds per kept box instead of a round of tensor ops."""
    g, m = scores.shape
    out_idx = torch.full((g, max_output), -1, dtype=torch.long, device=scores.device)
    out_sc = torch.zeros((g, max_output), dtype=torch.float32, device=scores.device)
    flat = valid.reshape(-1).nonzero().squeeze(1)  # image-major, position order inside an image
    if flat.numel() == 0 or max_output == 0:
        return out_idx, out_sc
    image = flat // m
    group = image if labels is None else image * (int(labels.max()) + 1) + labels.reshape(-1)[flat]
    kept = flat[_greedy_blocked(boxes.reshape(-1, 4)[flat].float(), scores.reshape(-1)[flat].float(),
                                iou_threshold, group)]  # score descending, ties: lower position
    img = kept // m
    # rank of each kept box inside its image (kept is in score order): keep the first max_output
    order = torch.sort(img, stable=True).indices
    img_sorted = img[order]
    start = torch.searchsorted(img_sorted, img_sorted, right=False)
    rank = torch.arange(img_sorted.numel(), device=img.device) - start
    take = rank < max_output
    rows, cols, pos = img_sorted[take], rank[take], (kept[order])[take] % m
    out_idx[rows, cols] = pos
    out_sc[rows, cols] = scores[rows, pos].float()
    return out_idx, out_sc


_SMALL_WORK = 1 << 18  # [B, A] sizes up to this run single-threaded in ``detect``


@contextmanager
def _small_work_threads(best: torch.Tensor) -> Iterator[None]:
    """One intra-op thread on the CPU for the [B, A]-sized steps of ``detect`` (B x A up to
    ``_SMALL_WORK``): the element-wise passes are tens of microseconds, so waking a second OpenMP
    thread — possibly just as another runtime's pool releases the cores — only adds latency (measured
    on a busy 2-core machine: 45 ms with 2 threads against 1.3 ms with one, after an onnxruntime
    call). Process-wide for the duration (``torch.set_num_threads``), restored after."""
    n = torch.get_num_threads()
    if best.device.type != 'cpu' or n == 1 or best.numel() > _SMALL_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def detect(classification: Scores, regression: torch.Tensor, anchors: torch.Tensor,
           image_size: Tuple[int, int], score_threshold: float = 0.05, iou_threshold: float = 0.5,
           max_det: int = 100, nms: str = 'hard', class_agnostic: bool = False,
           pre_nms_topk: int = PRE_NMS_TOPK, allowed: Optional[torch.Tensor] = None) -> List[Dict[str, torch.Tensor]]:
    """Detections for a batch, fast path.

    classification [B, A, C] after sigmoid (or its :class:`BestClass`), regression [B, A, 4]
    (ty, tx, th, tw), anchors [1, A, 4] (y1, x1, y2, x2) pixels, image_size (H, W) of the network
    input.

    Each anchor keeps its best class; anchors scoring > ``score_threshold`` are candidates, at most
    ``pre_nms_topk`` per image; boxes are decoded and clipped to [0, W] x [0, H]; then
    - 'hard': greedy NMS per class (or across classes with ``class_agnostic``) at ``iou_threshold``;
    - 'gaussian': soft-NMS (sigma 0.5) per class, candidates dropped at ``score_threshold``;
    - 'official': the official evaluation setting — per-class gaussian soft-NMS over all anchors
      (no top-k, soft threshold 0.001), then scores <= ``score_threshold`` dropped.
    At most ``max_det`` per image. ``allowed`` (bool [C], :func:`class_mask`): the classes an anchor's
    best class is taken among (placeholder slots left out first).

    Returns one dict per image: boxes [N, 4] (x1, y1, x2, y2) network-input pixels, scores [N],
    labels [N] long 0-based; score descending.
    """
    if nms not in NMS_METHODS:
        raise ValueError(f"nms must be one of {', '.join(NMS_METHODS)}, got {nms!r}")
    bsz = regression.shape[0]
    if nms == 'official':
        boxes, scores, classes, valid = official_postprocess(
            classification, regression, anchors, image_size, method='gaussian', mode='per_class',
            max_output=max_det, allowed=allowed)
        boxes = to_xyxy_clipped(boxes, image_size)
        labels = classes - 1
        keep = (torch.arange(boxes.shape[1], device=boxes.device)[None] < valid[:, None]) & (scores > score_threshold)
    else:
        best_class = BestClass.of(classification, allowed)  # [B, A]; the one large reduction if [B, A, C]
        best = best_class.scores
        with _small_work_threads(best):
            # no wider than the most candidates any image has (>= 1 column, so gathers stay valid): the
            # NMS below then works on a few columns, not pre_nms_topk, when a few dozen boxes pass
            most = int((best > score_threshold).sum(1).max()) if best.numel() else 0
            k = min(int(pre_nms_topk), best.shape[1], max(most, 1))
            top_scores, cand, cand_labels = candidates(best, best_class, regression.float(), anchors.float(),
                                                       image_size, score_threshold, k)
            valid = torch.isfinite(top_scores)
            if nms == 'hard':
                sel, scores = _hard_nms_padded(cand, top_scores, valid, None if class_agnostic else cand_labels,
                                               float(iou_threshold), int(max_det))
            else:
                sel, scores, _ = _select_padded(cand, top_scores, valid, None if class_agnostic else cand_labels,
                                                float(iou_threshold), OFFICIAL_SOFT_SIGMA, float(score_threshold),
                                                int(max_det), tf_style=False)
            keep = sel >= 0
            safe = sel.clamp(min=0)
            boxes = cand.gather(1, safe[..., None].expand(-1, -1, 4))
            labels = cand_labels.gather(1, safe)
    out = []
    for i in range(bsz):  # splitting into per-image outputs only; no per-box work
        m = keep[i]
        out.append({'boxes': boxes[i][m], 'scores': scores[i][m], 'labels': labels[i][m].long()})
    return out
