"""NMS, soft-NMS, the official post-processing and ``detect`` against plain references and the
official TF / Yet-Another fixtures."""
import heapq
import math
from collections import Counter

import numpy as np
import pytest
import torch

from efficientdet import postprocess as pp
from efficientdet.anchors import BBoxTransform, ClipBoxes, decode_boxes
from efficientdet.postprocess import batched_nms, detect, nms, official_postprocess, soft_nms


pytestmark = pytest.mark.usefixtures('one_thread')


# ----------------------------------------------------------------------------- references
def ref_iou(a, b):
    """torchvision's IoU of two xyxy boxes (python floats)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_nms(boxes, scores, thr, idxs=None):
    """Textbook greedy NMS: visit by (score desc, index asc), keep unless overlapping a kept box."""
    b, s = boxes.tolist(), scores.tolist()
    g = idxs.tolist() if idxs is not None else [0] * len(s)
    keep = []
    for i in sorted(range(len(s)), key=lambda i: (-s[i], i)):
        if all(g[k] != g[i] or ref_iou(b[k], b[i]) <= thr for k in keep):
            keep.append(i)
    return keep


def ref_tf_soft_nms(boxes, scores, sigma, score_thr, max_out):
    """TF NonMaxSuppressionV5 (soft_nms_sigma = sigma / 2, iou_threshold 1): a priority queue of
    lazily updated candidates, float32 arithmetic, exactly as the kernel does it."""
    b = boxes.astype(np.float32)
    scale = np.float32(-0.5) / np.float32(sigma / 2)

    def iou(i, j):
        bi = np.array([min(b[i, 0], b[i, 2]), min(b[i, 1], b[i, 3]), max(b[i, 0], b[i, 2]), max(b[i, 1], b[i, 3])],
                      np.float32)
        bj = np.array([min(b[j, 0], b[j, 2]), min(b[j, 1], b[j, 3]), max(b[j, 0], b[j, 2]), max(b[j, 1], b[j, 3])],
                      np.float32)
        ai = (bi[2] - bi[0]) * (bi[3] - bi[1])
        aj = (bj[2] - bj[0]) * (bj[3] - bj[1])
        if ai <= 0 or aj <= 0:
            return np.float32(0)
        ih = max(np.float32(0), min(bi[2], bj[2]) - max(bi[0], bj[0]))
        iw = max(np.float32(0), min(bi[3], bj[3]) - max(bi[1], bj[1]))
        inter = np.float32(ih * iw)
        return np.float32(inter / (ai + aj - inter))

    heap = [(-np.float32(s), i, 0) for i, s in enumerate(scores) if np.float32(s) > score_thr]
    heapq.heapify(heap)
    sel, sel_sc = [], []
    while len(sel) < max_out and heap:
        neg, i, begin = heapq.heappop(heap)
        orig = -neg
        sc = orig
        for j in range(len(sel) - 1, begin - 1, -1):
            o = iou(i, sel[j])
            sc = np.float32(sc * np.exp(np.float32(scale * o * o)))
            if sc <= score_thr:
                break
        if sc == orig:
            sel.append(i)
            sel_sc.append(float(sc))
        elif sc > score_thr:
            heapq.heappush(heap, (-sc, i, len(sel)))
    return sel, sel_sc


def random_boxes(n, seed, size=100.0, dup=0.2):
    """xyxy boxes with duplicates (identical boxes and scores) mixed in."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    scores = torch.round(scores * 50) / 50  # many exact score ties
    k = int(n * dup)
    if k:
        src = torch.randint(0, n, (k,), generator=g)
        dst = torch.randint(0, n, (k,), generator=g)
        boxes[dst] = boxes[src]
    return boxes, scores


# ----------------------------------------------------------------------------- nms / batched_nms
@pytest.mark.parametrize('n,thr,seed', [(0, 0.5, 0), (1, 0.5, 0), (60, 0.5, 1), (300, 0.3, 2), (300, 0.7, 3)])
def test_nms_matches_greedy_reference(n, thr, seed):
    boxes, scores = random_boxes(n, seed)
    keep = nms(boxes, scores, thr)
    assert keep.dtype == torch.long
    assert keep.tolist() == ref_nms(boxes, scores, thr)


def test_nms_blocked_path_matches_reference(monkeypatch):
    """More boxes than one block: suppression must cross block boundaries."""
    monkeypatch.setattr(pp, '_BLOCK', 64)
    boxes, scores = random_boxes(500, 7, size=60.0)
    assert pp._greedy_blocked(boxes, scores, 0.4).tolist() == ref_nms(boxes, scores, 0.4)
    idxs = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(3))
    assert pp._greedy_blocked(boxes, scores, 0.4, idxs).tolist() == ref_nms(boxes, scores, 0.4, idxs)


@pytest.mark.parametrize('seed', [0, 1])
def test_batched_nms_matches_per_class_reference(seed):
    boxes, scores = random_boxes(400, seed)
    idxs = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(seed))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == ref_nms(boxes, scores, 0.5, idxs)
    # every class alone gives the same as plain nms on that class
    for c in range(5):
        sel = (idxs == c).nonzero()[:, 0]
        mine = keep[idxs[keep] == c]
        assert mine.tolist() == sel[nms(boxes[sel], scores[sel], 0.5)].tolist()
    assert batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5).numel() == 0


# ----------------------------------------------------------------------------- soft-NMS
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_soft_nms_matches_tf_kernel_reference(seed):
    boxes, scores = random_boxes(150, seed, dup=0.1)
    scores = torch.rand(150, generator=torch.Generator().manual_seed(seed + 10))  # soft ties are unstable
    yxyx = boxes[:, [1, 0, 3, 2]]
    idx, sc = soft_nms(yxyx, scores, sigma=0.5, score_threshold=0.001, max_output=40)
    ref_idx, ref_sc = ref_tf_soft_nms(yxyx.numpy(), scores.numpy(), 0.5, np.float32(0.001), 40)
    assert idx.tolist() == ref_idx
    np.testing.assert_allclose(sc.numpy(), ref_sc, rtol=1e-6, atol=1e-7)
    assert (sc[:-1] >= sc[1:]).all()  # selected scores never increase


def test_soft_nms_decays_overlapping_scores():
    boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.], [20., 20., 30., 30.]])
    idx, sc = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.5]), sigma=0.5, score_threshold=0.001)
    # identical box: iou 1 -> 0.8 * exp(-1 / 0.5); the disjoint box is untouched
    assert idx.tolist() == [0, 2, 1]
    assert sc.tolist() == pytest.approx([0.9, 0.5, 0.8 * math.exp(-2.0)], rel=1e-6)


# ----------------------------------------------------------------------------- official fixtures
def _tf_inputs(tf_d0):
    b = tf_d0['class_p3'].shape[0]
    cls = torch.cat([torch.sigmoid(torch.from_numpy(tf_d0[f'class_p{l}'])).reshape(b, -1, 90) for l in range(3, 8)], 1)
    reg = torch.cat([torch.from_numpy(tf_d0[f'box_p{l}']).reshape(b, -1, 4) for l in range(3, 8)], 1)
    anchors = torch.from_numpy(tf_d0['anchors_yxyx'])[None]
    return cls, reg, anchors


def assert_same_detections(boxes, scores, classes, ref_boxes, ref_scores, ref_classes, n, tie=1e-6, atol=1e-4):
    """Same entries in the same order, except that runs of scores within ``tie`` may be permuted."""
    np.testing.assert_allclose(scores[:n], ref_scores[:n], atol=atol)
    start = 0
    while start < n:
        end = start + 1
        while end < n and abs(ref_scores[end] - ref_scores[end - 1]) <= tie:
            end += 1
        a = np.concatenate([classes[start:end, None], boxes[start:end]], 1)
        r = np.concatenate([ref_classes[start:end, None], ref_boxes[start:end]], 1)
        a, r = a[np.lexsort(a.T[::-1])], r[np.lexsort(r.T[::-1])]
        np.testing.assert_allclose(a, r, atol=atol, err_msg=f'entries {start}:{end}')
        start = end


@pytest.mark.parametrize('mode', ['global', 'per_class'])
@pytest.mark.parametrize('method', ['hard', 'gaussian'])
def test_official_postprocess_matches_tf(tf_d0, mode, method):
    cls, reg, anchors = _tf_inputs(tf_d0)
    boxes, scores, classes, valid = official_postprocess(cls, reg, anchors, (256, 256), method=method, mode=mode)
    key = f'{mode}_{method}_'
    ref_valid = tf_d0[key + 'valid']
    assert valid.tolist() == ref_valid.tolist()
    assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and classes.shape == (2, 100)
    for i in range(2):
        n = int(ref_valid[i])
        assert_same_detections(boxes[i].numpy(), scores[i].numpy(), classes[i].numpy().astype(np.float32),
                               tf_d0[key + 'boxes_yxyx'][i], tf_d0[key + 'scores'][i], tf_d0[key + 'classes'][i], n)
        assert (boxes[i, n:] == 0).all() and (scores[i, n:] == 0).all() and (classes[i, n:] == 0).all()
    if mode == 'global':
        assert boxes.min() >= 0 and boxes.max() <= 256


def test_official_postprocess_padding_and_thresholds():
    """Few candidates: valid counts them, padding is zero; per_class keeps overlapping boxes of
    different classes that global suppresses."""
    anchors = torch.tensor([[[0., 0., 10., 10.], [0., 0., 10., 10.], [50., 50., 60., 60.]]])
    reg = torch.zeros(1, 3, 4)
    cls = torch.tensor([[[0.9, 0.0], [0.0, 0.8], [0.0005, 0.0]]])
    b, s, c, v = official_postprocess(cls, reg, anchors, (64, 64), method='hard', mode='global', max_output=5)
    assert v.tolist() == [2] and c[0].tolist() == [1, 1, 0, 0, 0]  # the 2nd box is suppressed
    b, s, c, v = official_postprocess(cls, reg, anchors, (64, 64), method='hard', mode='per_class', max_output=5)
    assert v.tolist() == [3] and c[0].tolist() == [1, 2, 1, 0, 0]
    b, s, c, v = official_postprocess(cls, reg, anchors, (64, 64), method='gaussian', mode='per_class', max_output=5)
    assert v.tolist() == [2]  # 0.0005 is under the soft-NMS score threshold 0.001
    assert (b[0, 2:] == 0).all() and (s[0, 2:] == 0).all()
    b, s, c, v = official_postprocess(cls * 0.001, reg, anchors, (64, 64), method='gaussian', mode='global')
    assert v.tolist() == [0] and b.shape == (1, 100, 4) and (b == 0).all() and (c == 0).all()


# ----------------------------------------------------------------------------- detect
def _random_head(b, a, c, seed):
    g = torch.Generator().manual_seed(seed)
    cls = torch.rand(b, a, c, generator=g) ** 3
    reg = torch.randn(b, a, 4, generator=g) * 0.3
    ctr = torch.rand(a, 2, generator=g) * 120
    half = torch.rand(a, 2, generator=g) * 30 + 4
    anchors = torch.cat([ctr - half, ctr + half], 1)[None]  # yxyx
    return cls, reg, anchors


def ref_detect(cls, reg, anchors, hw, thr, iou, max_det, agnostic=False):
    out = []
    for i in range(cls.shape[0]):
        s, lab = cls[i].max(-1)
        y1, x1, y2, x2 = decode_boxes(reg[i], anchors[0]).unbind(-1)
        h, w = hw
        boxes = torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], -1)
        m = (s > thr).nonzero()[:, 0]
        keep = ref_nms(boxes[m], s[m], iou, None if agnostic else lab[m])[:max_det]
        sel = m[torch.tensor(keep, dtype=torch.long)]
        out.append((boxes[sel], s[sel], lab[sel]))
    return out


@pytest.mark.parametrize('agnostic', [False, True])
def test_detect_hard_matches_reference(agnostic):
    cls, reg, anchors = _random_head(3, 400, 4, seed=5)
    got = detect(cls, reg, anchors, (128, 96), score_threshold=0.3, iou_threshold=0.45, max_det=25,
                 class_agnostic=agnostic)
    ref = ref_detect(cls, reg, anchors, (128, 96), 0.3, 0.45, 25, agnostic)
    assert len(got) == 3
    for g, (rb, rs, rl) in zip(got, ref):
        assert g['labels'].dtype == torch.long
        assert g['labels'].tolist() == rl.tolist()
        torch.testing.assert_close(g['scores'], rs)
        torch.testing.assert_close(g['boxes'], rb)
        assert (g['boxes'][:, 2] <= 96).all() and (g['boxes'][:, 3] <= 128).all() and (g['boxes'] >= 0).all()


def test_detect_gaussian_is_per_class_tf_soft_nms():
    cls, reg, anchors = _random_head(1, 200, 3, seed=11)
    got = detect(cls, reg, anchors, (128, 128), score_threshold=0.3, nms='gaussian', max_det=30)[0]
    s, lab = cls[0].max(-1)
    y1, x1, y2, x2 = decode_boxes(reg[0], anchors[0]).unbind(-1)
    boxes = torch.stack([x1.clamp(0, 128), y1.clamp(0, 128), x2.clamp(0, 128), y2.clamp(0, 128)], -1)
    ref = []
    for c in range(3):
        m = ((s > 0.3) & (lab == c)).nonzero()[:, 0]
        idx, sc = ref_tf_soft_nms(boxes[m].numpy(), s[m].numpy(), 0.5, np.float32(0.3), 30)
        ref += [(v, c, tuple(boxes[m[i]].tolist())) for i, v in zip(idx, sc)]
    ref = sorted(ref, key=lambda r: -r[0])[:30]
    assert len(got['scores']) == len(ref) == 30
    np.testing.assert_allclose(got['scores'].numpy(), [r[0] for r in ref], rtol=1e-6)
    assert got['labels'].tolist() == [r[1] for r in ref]
    np.testing.assert_allclose(got['boxes'].numpy(), [r[2] for r in ref], rtol=1e-6)


def test_detect_batch_equals_single_and_handles_empty():
    cls, reg, anchors = _random_head(2, 300, 3, seed=9)
    both = detect(cls, reg, anchors, (128, 128), score_threshold=0.2, iou_threshold=0.5, nms='gaussian')
    for i in range(2):
        one = detect(cls[i:i + 1], reg[i:i + 1], anchors, (128, 128), score_threshold=0.2, iou_threshold=0.5,
                     nms='gaussian')[0]
        for k in ('boxes', 'scores', 'labels'):
            torch.testing.assert_close(both[i][k], one[k])
        assert len(one['scores']) > 0 and (one['scores'] > 0.2).all()
    none = detect(cls, reg, anchors, (128, 128), score_threshold=1.0)
    assert [len(d['scores']) for d in none] == [0, 0] and none[0]['boxes'].shape == (0, 4)


def test_detect_topk_limits_candidates():
    cls, reg, anchors = _random_head(1, 300, 2, seed=4)
    full = detect(cls, reg, anchors, (128, 128), score_threshold=0.0, iou_threshold=0.5, max_det=300)[0]
    top = detect(cls, reg, anchors, (128, 128), score_threshold=0.0, iou_threshold=0.5, max_det=300,
                 pre_nms_topk=10)[0]
    assert 0 < len(top['scores']) <= 10 < len(full['scores'])
    assert top['scores'][0] == full['scores'][0]
    tenth = cls[0].max(-1).values.sort(descending=True).values[9]
    assert (top['scores'] >= tenth).all()


@pytest.mark.parametrize('thr', [0.0, 0.36])
def test_detect_official_matches_tf_per_class_soft_nms(tf_d0, thr):
    """detect(nms='official') against the official TF per-class gaussian soft-NMS outputs themselves:
    TF's boxes (y1, x1, y2, x2, not clipped in per_class mode) as x1, y1, x2, y2 clipped to the
    256x256 input, 1-based classes as 0-based labels; the score threshold cuts the TF list."""
    cls, reg, anchors = _tf_inputs(tf_d0)
    got = detect(cls, reg, anchors, (256, 256), score_threshold=thr, nms='official')
    key = 'per_class_gaussian_'
    assert len(got) == 2
    for i in range(2):
        ref_scores = tf_d0[key + 'scores'][i][:int(tf_d0[key + 'valid'][i])]
        assert not (np.abs(ref_scores - thr) < 1e-4).any()  # no entry on the edge of the threshold
        n = int((ref_scores > thr).sum())
        assert 0 < n and (thr == 0.0) == (n == len(ref_scores))
        ref_boxes = np.clip(tf_d0[key + 'boxes_yxyx'][i][:n][:, [1, 0, 3, 2]], 0, 256)
        ref_classes = tf_d0[key + 'classes'][i][:n] - 1
        d = got[i]
        assert len(d['scores']) == n and d['labels'].dtype == torch.long
        assert (d['boxes'] >= 0).all() and (d['boxes'] <= 256).all()
        assert_same_detections(d['boxes'].numpy(), d['scores'].numpy(), d['labels'].numpy().astype(np.float32),
                               ref_boxes, ref_scores[:n], ref_classes, n)


def test_detect_rejects_unknown_method():
    cls, reg, anchors = _random_head(1, 10, 2, seed=0)
    with pytest.raises(ValueError, match='nms'):
        detect(cls, reg, anchors, (64, 64), nms='fast')


# ----------------------------------------------------------------------------- Yet-Another fixture
@pytest.mark.parametrize('thr,iou', [(0.2, 0.2), (0.05, 0.5)])
def test_yet_another_postprocess_matches_fixture(zylo_d0, thr, iou):
    from utils.utils import postprocess
    x = torch.from_numpy(zylo_d0['input_nchw'])
    cls = torch.from_numpy(zylo_d0['classification'])
    out = postprocess(x, torch.from_numpy(zylo_d0['anchors']), torch.from_numpy(zylo_d0['regression']), cls,
                      BBoxTransform(), ClipBoxes(), thr, iou)
    assert len(out) == 2
    for i in range(2):
        key = f'post_{thr}_{iou}_img{i}_'
        rois, ids, scores = zylo_d0[key + 'rois'], zylo_d0[key + 'class_ids'], zylo_d0[key + 'scores']
        o = out[i]
        assert len(o['scores']) == len(scores)
        np.testing.assert_array_equal(o['scores'], scores)  # same scores in the same (descending) order
        a = np.concatenate([o['scores'][:, None], o['class_ids'][:, None], o['rois']], 1).astype(np.float64)
        r = np.concatenate([scores[:, None], ids[:, None], rois], 1).astype(np.float64)
        a, r = a[np.lexsort(a.T[::-1])], r[np.lexsort(r.T[::-1])]
        diff = np.abs(a - r).max(1) > 1e-3
        # Differences are allowed only where several candidates of one class share the exact score
        # (torchvision's unstable sort picks any of them).
        s, c = cls[i].max(-1)
        cand = s > thr
        counts = Counter(zip(s[cand].tolist(), c[cand].tolist()))
        tied = {p for p, k in counts.items() if k > 1}
        for row in np.concatenate([a[diff], r[diff]]):
            assert (float(np.float32(row[0])), int(row[1])) in tied, row
        assert diff.sum() <= 2


def test_yet_another_postprocess_empty():
    from utils.utils import postprocess
    x = torch.zeros(2, 3, 64, 64)
    anchors = torch.tensor([[[0., 0., 10., 10.]]])
    out = postprocess(x, anchors, torch.zeros(2, 1, 4), torch.tensor([[[0.1]], [[0.9]]]), BBoxTransform(),
                      ClipBoxes(), 0.5, 0.5)
    assert len(out[0]['rois']) == 0 and out[1]['class_ids'].tolist() == [0]
    assert out[1]['rois'].tolist() == [[0.0, 0.0, 10.0, 10.0]]


def test_exact_ties_keep_the_lower_index():
    """Equal scores: the lower anchor index wins (torchvision's stable sort, TF's queue order)."""
    anchors = torch.tensor([[[0., 0., 10., 10.], [0., 0., 11., 10.], [0., 0., 10., 11.]]])  # yxyx
    cls = torch.tensor([[[0.9], [0.9], [0.9]]])
    reg = torch.zeros(1, 3, 4)
    for perm in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        a = anchors[:, perm]
        d = detect(cls, reg, a, (32, 32), score_threshold=0.5, iou_threshold=0.5)[0]
        assert d['boxes'].tolist() == [a[0, 0, [1, 0, 3, 2]].tolist()]
        b, s, c, v = official_postprocess(cls, reg, a, (32, 32), method='hard', mode='per_class')
        assert v.tolist() == [1] and b[0, 0].tolist() == a[0, 0].tolist()
        xyxy = a[0][:, [1, 0, 3, 2]]
        assert nms(xyxy, cls[0, :, 0], 0.5).tolist() == [0]
        assert batched_nms(xyxy, cls[0, :, 0], torch.zeros(3, dtype=torch.long), 0.5).tolist() == [0]


@pytest.mark.parametrize('per_class', [True, False])
@pytest.mark.parametrize('iou', [0.3, 0.5, 0.7])
def test_hard_nms_padded_equals_greedy_loop(per_class, iou):
    """detect's hard NMS (one blocked NMS over every image's candidates) selects exactly what the
    padded greedy loop selects: same boxes, same order, ties (quantised scores) to the lower
    position, at most max_output per image, padding where an image has fewer candidates."""
    from efficientdet.postprocess import _hard_nms_padded, _select_padded
    g = torch.Generator().manual_seed(int(iou * 10) + per_class)
    b, m = 3, 300
    xy = torch.rand(b, m, 2, generator=g) * 100
    wh = torch.rand(b, m, 2, generator=g) * 30 + 1
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, 10:20] = boxes[:, :10]  # exact duplicates
    scores = (torch.rand(b, m, generator=g) * 20).round() / 20  # many exact ties
    valid = torch.rand(b, m, generator=g) > 0.2
    valid[2] = False
    valid[2, :3] = True  # an image with fewer candidates than max_output
    labels = torch.randint(0, 4, (b, m), generator=g)
    lab = labels if per_class else None
    for max_out in (5, 100):
        ref_idx, ref_sc, _ = _select_padded(boxes, scores, valid, lab, iou, 0.0, float('-inf'), max_out,
                                            tf_style=False)
        idx, sc = _hard_nms_padded(boxes, scores, valid, lab, iou, max_out)
        assert torch.equal(idx, ref_idx) and torch.equal(sc, ref_sc)
    assert (ref_idx[2] >= 0).sum() <= 3 and (ref_idx[0] >= 0).sum() == 100


def test_best_class_lazy_labels_equal_the_full_arg_max_with_ties():
    """BestClass made from [B, A, C] values computes labels for the asked anchors only; they equal
    the full arg-max (first maximum on ties) and what given labels return."""
    from efficientdet.postprocess import BestClass
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 3, (2, 50, 7), generator=g).float()  # many ties
    lazy = BestClass.from_logits(logits)
    ref_scores, ref_labels = logits.max(-1)
    first_max = (logits == ref_scores[..., None]).float().argmax(-1)  # first maximum
    idx = torch.randint(0, 50, (2, 9), generator=g)
    assert torch.equal(lazy.labels_at(idx), first_max.gather(1, idx))
    assert torch.allclose(lazy.scores, torch.sigmoid(ref_scores))
    given = BestClass(torch.sigmoid(ref_scores), first_max)
    assert torch.equal(given.labels_at(idx), lazy.labels_at(idx))
    scores, labels = BestClass.of(torch.sigmoid(logits))  # unpacks; labels computed in full on demand
    assert torch.equal(labels, first_max) and torch.equal(scores, torch.sigmoid(ref_scores))
    with pytest.raises(ValueError, match='labels or the'):
        BestClass(scores)
