"""DetectionLoss: hand-computed cases, the official matching rules, crowd/padding/empty images,
and a loop-based reference implementation for random batches."""
import math

import numpy as np
import pytest
import torch

from efficientdet.loss import DetectionLoss, box_iou, focal_loss, huber_loss, match_anchors

ALPHA, GAMMA, DELTA = 0.25, 1.5, 0.1

# three anchors (y1, x1, y2, x2)
ANCHORS = torch.tensor([[[0., 0., 10., 10.], [0., 5., 10., 15.], [20., 20., 30., 30.]]])


def _ann(*rows):
    """annotations [1, N, 5] from (x1, y1, x2, y2, class) rows."""
    return torch.tensor([list(r) for r in rows], dtype=torch.float32).reshape(1, -1, 5)


def _focal_ref(x: float, y: float, ls: float = 0.0) -> float:
    p = 1 / (1 + math.exp(-x))
    pt = p if y else 1 - p
    a = ALPHA if y else 1 - ALPHA
    ys = y * (1 - ls) + 0.5 * ls
    ce = -(ys * math.log(p) + (1 - ys) * math.log(1 - p))
    return a * (1 - pt) ** GAMMA * ce


def test_iou_known_values():
    boxes = torch.tensor([[[0., 0., 10., 10.], [0., 1., 10., 11.]]])
    iou = box_iou(boxes, ANCHORS[0]).transpose(1, 2)
    assert iou.shape == (1, 3, 2)
    expected = [[1.0, 90 / 110], [50 / 150, 60 / 140], [0.0, 0.0]]
    assert torch.allclose(iou[0], torch.tensor(expected), atol=1e-6)


def test_hand_computed_single_image():
    # gt (x1,y1,x2,y2) = (1,0,11,10), class 1 -> yxyx (0,1,10,11): IoU 90/110 with anchor 0
    # (positive), 60/140 with anchor 1 (negative), 0 with anchor 2 (negative).
    ann = _ann((1, 0, 11, 10, 1))
    C = 2
    logits = torch.zeros(1, 3, C)
    logits[0, 0, 1] = 2.0
    logits[0, 2, 0] = -3.0
    reg = torch.zeros(1, 3, 4)
    reg[0, 0, 1] = 0.3   # tx prediction for anchor 0, target tx = (6 - 5) / 10 = 0.1
    reg[0, 0, 2] = 0.05  # th prediction; target th = 0 -> masked out (official box_targets != 0)
    reg[0, 1:, :] = 5.0  # negative anchors: no box loss whatever they predict
    out = DetectionLoss()(logits, reg, ANCHORS, ann)

    assert out['num_pos'].item() == 1
    n = 1 + 1
    cls_sum = (_focal_ref(2.0, 1) + _focal_ref(0.0, 0)          # anchor 0: class 1 positive
               + _focal_ref(0.0, 0) + _focal_ref(0.0, 0)        # anchor 1: negative
               + _focal_ref(-3.0, 0) + _focal_ref(0.0, 0))      # anchor 2: negative
    assert out['cls_loss'].item() == pytest.approx(cls_sum / n, rel=1e-5)
    # anchor 0: targets (0, 0.1, 0, 0): only tx counts; err 0.2 > delta -> 0.1 * (0.2 - 0.05)
    box_sum = 0.1 * (0.2 - 0.05)
    assert out['box_loss'].item() == pytest.approx(box_sum / (4 * n), rel=1e-5)
    assert out['loss'].item() == pytest.approx(cls_sum / n + 50 * box_sum / (4 * n), rel=1e-5)
    # quadratic zone: tx error 0.05 -> 0.5 * 0.05^2
    reg[0, 0, 1] = 0.15
    out = DetectionLoss(box_weight=10.0)(logits, reg, ANCHORS, ann)
    assert out['box_loss'].item() == pytest.approx(0.5 * 0.05 ** 2 / (4 * n), rel=1e-4)
    assert out['loss'].item() == pytest.approx(cls_sum / n + 10 * 0.5 * 0.05 ** 2 / (4 * n), rel=1e-5)


def test_huber_quadratic_and_linear():
    e = huber_loss(torch.tensor([0.05, -0.05, 0.3, -1.0]), torch.zeros(4), delta=0.1)
    assert torch.allclose(e, torch.tensor([0.5 * 0.0025, 0.5 * 0.0025, 0.1 * 0.25, 0.1 * 0.95]))


def test_focal_matches_formula_and_is_stable():
    x = torch.tensor([-120., -3., -0.5, 0., 0.7, 4., 120.], dtype=torch.float64, requires_grad=True)
    for y in (0.0, 1.0):
        t = torch.full_like(x, y)
        got = focal_loss(x, t, ALPHA, GAMMA)
        for xi, gi in zip(x.tolist()[1:-1], got.tolist()[1:-1]):
            assert gi == pytest.approx(_focal_ref(xi, int(y)), rel=1e-9)
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(x.grad).all()
        x.grad = None
    # confidently wrong: loss ~ alpha_t * |x|
    t = torch.zeros(1, dtype=torch.float64)
    assert focal_loss(torch.tensor([120.], dtype=torch.float64), t).item() == pytest.approx(0.75 * 120, rel=1e-6)


def test_label_smoothing_uses_unsmoothed_modulation():
    x = torch.tensor([[[1.0, -2.0]]])
    anchors = torch.tensor([[[0., 0., 10., 10.]]])
    ann = _ann((0, 0, 10, 10, 0))  # exact match: positive, class 0
    out = DetectionLoss(label_smoothing=0.1)(x, torch.zeros(1, 1, 4), anchors, ann)
    expected = (_focal_ref(1.0, 1, 0.1) + _focal_ref(-2.0, 0, 0.1)) / 2
    assert out['cls_loss'].item() == pytest.approx(expected, rel=2e-5)
    assert out['box_loss'].item() == 0.0  # exact match: all targets 0 -> masked (official)


def test_force_match_each_box_claims_best_anchor():
    # box yxyx (0,0,10,4): IoU 0.4 with anchor 0 (< 0.5) -> still positive through the force match
    ann = _ann((0, 0, 4, 10, 0))
    matched, pos, ign = match_anchors(ANCHORS, ann)
    assert pos.tolist() == [[True, False, False]]
    assert matched[0, 0].item() == 0
    # without the force match it would be negative
    assert box_iou(ann[..., [1, 0, 3, 2]], ANCHORS[0]).max().item() == pytest.approx(0.4)


def test_force_match_conflict_first_box_wins():
    # both boxes' best anchor is anchor 0 (IoU 0.4 and 0.3) -> the first box gets it
    ann = _ann((0, 0, 4, 10, 0), (0, 0, 3, 10, 1))
    matched, pos, _ = match_anchors(ANCHORS, ann)
    assert pos[0].tolist() == [True, False, False] and matched[0, 0].item() == 0
    # swapped order -> the other box
    matched, pos, _ = match_anchors(ANCHORS, _ann((0, 0, 3, 10, 1), (0, 0, 4, 10, 0)))
    assert pos[0].tolist() == [True, False, False] and matched[0, 0].item() == 0


def test_force_match_overrides_threshold_owner():
    anchors = torch.tensor([[[0., 0., 10., 10.], [0., 0., 10., 11.]]])
    # box A (yxyx 0,0,10,11): IoU 1 with anchor 1, 100/110 with anchor 0 (above 0.5);
    # box B (yxyx 0,0,10,4): best anchor 0 (IoU 0.4) -> B claims anchor 0 although A overlaps it more.
    ann = _ann((0, 0, 11, 10, 0), (0, 0, 4, 10, 1))
    matched, pos, _ = match_anchors(anchors, ann)
    assert pos.tolist() == [[True, True]]
    assert matched.tolist() == [[1, 0]]
    # without B, A owns both anchors
    matched, pos, _ = match_anchors(anchors, _ann((0, 0, 11, 10, 0)))
    assert matched.tolist() == [[0, 0]] and pos.tolist() == [[True, True]]


def test_iou_threshold_is_inclusive():
    anchors = torch.tensor([[[0., 0., 10., 10.], [0., 0., 10., 10.]]])
    # IoU exactly 0.5 with both anchors: anchor 0 force-matched, anchor 1 positive by threshold
    matched, pos, _ = match_anchors(anchors, _ann((0, 0, 5, 10, 0)))
    assert pos.tolist() == [[True, True]]


def test_empty_image_all_negative():
    C = 3
    logits = torch.randn(1, 3, C)
    reg = torch.randn(1, 3, 4, requires_grad=True)
    ann = torch.full((1, 4, 5), -1.0)
    out = DetectionLoss()(logits, reg, ANCHORS, ann)
    assert out['num_pos'].item() == 0
    assert out['box_loss'].item() == 0.0
    expected = sum(_focal_ref(v, 0) for v in logits.flatten().tolist())  # normaliser 0 + 1
    assert out['cls_loss'].item() == pytest.approx(expected, rel=1e-5)
    out['loss'].backward()
    assert torch.all(reg.grad == 0)
    # no annotation rows at all (N = 0) gives the same
    out0 = DetectionLoss()(logits, reg, ANCHORS, torch.zeros(1, 0, 5))
    assert out0['loss'].item() == pytest.approx(out['loss'].item(), rel=1e-6)


def test_padding_rows_do_not_change_anything():
    torch.manual_seed(0)
    logits, reg = torch.randn(1, 3, 2), torch.randn(1, 3, 4)
    base = DetectionLoss()(logits, reg, ANCHORS, _ann((1, 0, 11, 10, 1)))
    padded = DetectionLoss()(logits, reg, ANCHORS, _ann((-1, -1, -1, -1, -1), (1, 0, 11, 10, 1),
                                                         (-1, -1, -1, -1, -1)))
    for k in base:
        assert padded[k].item() == pytest.approx(base[k].item(), rel=1e-6)


def test_crowd_anchors_are_ignored_but_positives_kept():
    # crowd box covers anchors 0 and 1 (IoA 1 for both, IoU well below 0.5 for anchor 1);
    # a real box matches anchor 0, so anchor 0 stays positive and anchor 1 is ignored.
    ann = _ann((0, 0, 10, 10, 1), (0, 0, 40, 12, -2))
    _, pos, ign = match_anchors(ANCHORS, ann)
    assert pos.tolist() == [[True, False, False]]
    assert ign.tolist() == [[False, True, False]]
    loss = DetectionLoss()
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    out = loss(logits, torch.zeros(1, 3, 4), ANCHORS, ann)
    out['loss'].backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[0, 2] != 0)
    expected = (_focal_ref(0, 0) + _focal_ref(0, 1) + 2 * _focal_ref(0, 0)) / 2
    assert out['cls_loss'].item() == pytest.approx(expected, rel=1e-6)
    # IoA below 0.5 (anchor 1 only 3/10 inside the crowd) -> a plain negative
    _, _, ign = match_anchors(ANCHORS, _ann((0, 0, 10, 10, 1), (0, 0, 8, 12, -2)))
    assert ign.tolist() == [[False, False, False]]


# ---------------------------------------------------------------- loop reference on random batches
def _reference(logits, reg, anchors, ann, ls=0.0):
    """Direct per-image, per-anchor, per-box implementation of the documented rules (float64)."""
    logits, reg, anchors, ann = (t.double().numpy() for t in (logits, reg, anchors[0], ann))
    B, A, C = logits.shape
    cls_sum = box_sum = 0.0
    total_pos = 0
    for b in range(B):
        rows = [r for r in ann[b] if r[2] > r[0] and r[3] > r[1] and r[4] >= 0]
        crowd = [r for r in ann[b] if r[2] > r[0] and r[3] > r[1] and r[4] == -2]

        def iou(a, r):
            y1, x1, y2, x2 = max(a[0], r[1]), max(a[1], r[0]), min(a[2], r[3]), min(a[3], r[2])
            inter = max(y2 - y1, 0) * max(x2 - x1, 0)
            union = (a[2] - a[0]) * (a[3] - a[1]) + (r[2] - r[0]) * (r[3] - r[1]) - inter
            return inter / union if union > 0 else 0.0

        M = np.array([[iou(a, r) for r in rows] for a in anchors]).reshape(A, len(rows))
        match = [-1] * A
        for a in range(A):
            if rows and M[a].max() >= 0.5:
                match[a] = int(np.argmax(M[a]))
        for j in reversed(range(len(rows))):  # lowest index written last -> wins
            if M[:, j].max() > 0:
                match[int(np.argmax(M[:, j]))] = j
        for a in range(A):
            ignore = False
            if match[a] < 0:
                for r in crowd:
                    y1, x1 = max(anchors[a][0], r[1]), max(anchors[a][1], r[0])
                    y2, x2 = min(anchors[a][2], r[3]), min(anchors[a][3], r[2])
                    inter = max(y2 - y1, 0) * max(x2 - x1, 0)
                    ignore |= inter / ((anchors[a][2] - anchors[a][0]) * (anchors[a][3] - anchors[a][1])) >= 0.5
            if ignore:
                continue
            for c in range(C):
                y = 1 if match[a] >= 0 and int(rows[match[a]][4]) == c else 0
                cls_sum += _focal_ref(logits[b, a, c], y, ls)
            if match[a] >= 0:
                total_pos += 1
                r = rows[match[a]]
                t = encode_np(np.array([r[1], r[0], r[3], r[2]]), anchors[a])
                for k in range(4):
                    if t[k] != 0:
                        e = abs(reg[b, a, k] - t[k])
                        box_sum += 0.5 * e * e if e <= DELTA else DELTA * (e - 0.5 * DELTA)
    n = total_pos + 1
    return cls_sum / n, box_sum / (4 * n), total_pos


def encode_np(box, anchor, eps=1e-8):
    ya, xa = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    ha, wa = anchor[2] - anchor[0] + eps, anchor[3] - anchor[1] + eps
    y, x = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    h, w = box[2] - box[0] + eps, box[3] - box[1] + eps
    return [(y - ya) / ha, (x - xa) / wa, math.log(h / ha), math.log(w / wa)]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_batched_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    # a small grid of anchors of 3 sizes over a 64 px image
    ys, xs = torch.meshgrid(torch.arange(4, 64, 8.), torch.arange(4, 64, 8.), indexing='ij')
    cy, cx = ys.reshape(-1, 1), xs.reshape(-1, 1)
    half = torch.tensor([6., 10., 16.])
    anchors = torch.stack([cy - half, cx - half, cy + half, cx + half], -1).reshape(1, -1, 4)
    A, C, B, N = anchors.shape[1], 4, 3, 5
    xy = torch.rand(B, N, 2, generator=g) * 48
    wh = torch.rand(B, N, 2, generator=g) * 24 + 2
    cls = torch.randint(0, C, (B, N, 1), generator=g).float()
    ann = torch.cat([xy, xy + wh, cls], -1)
    ann[0, 3:] = -1           # padding
    ann[1, 1, 4] = -2         # a crowd box
    ann[2] = -1               # an empty image
    logits = torch.randn(B, A, C, generator=g) * 2
    reg = torch.randn(B, A, 4, generator=g) * 0.3
    out = DetectionLoss(label_smoothing=0.05)(logits, reg, anchors, ann)
    cls_ref, box_ref, npos = _reference(logits, reg, anchors, ann, ls=0.05)
    assert out['num_pos'].item() == npos > 0
    assert out['cls_loss'].item() == pytest.approx(cls_ref, rel=1e-4)
    assert out['box_loss'].item() == pytest.approx(box_ref, rel=1e-4)


def test_gradients_flow_and_shapes_checked():
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    reg = torch.zeros(1, 3, 4, requires_grad=True)
    out = DetectionLoss()(logits, reg, ANCHORS, _ann((1, 0, 11, 10, 1)))
    out['loss'].backward()
    assert reg.grad[0, 0, 1] != 0 and reg.grad[0, 0, 0] == 0 and torch.all(reg.grad[0, 2] == 0)
    with pytest.raises(ValueError):
        DetectionLoss()(logits, reg, ANCHORS[:, :2], _ann((1, 0, 11, 10, 1)))


@pytest.mark.parametrize('ls', [0.0, 0.1])
def test_fused_focal_gradients_equal_dense_formula(ls):
    """The fused negative sum + sparse positive correction == the element-wise formula, values and
    gradients (float64), including ignored anchors."""
    g = torch.Generator().manual_seed(3)
    anchors = torch.tensor([[[0., 0., 10., 10.], [0., 5., 10., 15.], [20., 20., 30., 30.], [0., 0., 20., 20.]]])
    ann = torch.tensor([[[1, 0, 11, 10, 1], [0, 0, 20, 20, 2], [19, 19, 40, 40, -2], [-1, -1, -1, -1, -1]],
                        [[-1, -1, -1, -1, -1]] * 4], dtype=torch.float64)
    logits = (torch.randn(2, 4, 3, generator=g, dtype=torch.float64) * 3).requires_grad_()
    reg = torch.randn(2, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
    loss = DetectionLoss(label_smoothing=ls)
    out = loss(logits.double(), reg, anchors.double(), ann)
    matched, pos, ign = match_anchors(anchors.double(), ann)
    assert ign.any() and pos.any()
    targets = torch.zeros_like(logits)
    for b, a in pos.nonzero().tolist():  # tiny test: a loop is fine here
        targets[b, a, int(ann[b, matched[b, a], 4])] = 1.0
    dense = focal_loss(logits, targets, 0.25, 1.5, ls).sum(-1).masked_fill(ign, 0).sum() / (pos.sum() + 1)
    assert out['cls_loss'].item() == pytest.approx(dense.item(), rel=1e-10)
    g1, = torch.autograd.grad(out['cls_loss'], logits)
    g2, = torch.autograd.grad(dense, logits)
    assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12)
    assert torch.all(g1[1] != 0) and torch.all(g1[ign] == 0)


# ----------------------------------------------------------------------------- the official loss
def _tf_loss_case():
    from conftest import load_npz
    z = load_npz('fixtures', 'tf_loss_d0', 'tf_loss.npz')
    levels = range(3, 8)
    batch = z['cls_logits_p3'].shape[0]
    cls = np.concatenate([z[f'cls_logits_p{l}'].reshape(batch, -1, 10) for l in levels], 1)  # [B, A, C]
    box = np.concatenate([z[f'box_outputs_p{l}'].reshape(batch, -1, 4) for l in levels], 1)  # [B, A, 4]
    n_max = max(len(z[f'gt_classes_img{b}']) for b in range(batch))
    ann = torch.full((batch, max(n_max, 1), 5), -1.0)
    for b in range(batch):
        yx = torch.from_numpy(z[f'gt_boxes_yxyx_img{b}'])
        n = yx.shape[0]
        if n:
            ann[b, :n, :4] = yx[:, [1, 0, 3, 2]]  # yxyx -> xyxy
            ann[b, :n, 4] = torch.from_numpy(z[f'gt_classes_img{b}']).float() - 1.0  # official classes are 1-based
    return z, torch.from_numpy(cls), torch.from_numpy(box), torch.from_numpy(z['anchors_yxyx']), ann


def test_official_tf_loss_values_gradients_and_anchor_labels():
    """google/automl's AnchorLabeler + detection loss on two real COCO images and an empty one
    (../shared/fixtures/tf_loss_d0): losses to 3e-5 relative, gradients to 1e-8, same anchor labels.

    The fixture's float32 sums over ~1e6 elements agree with another summation order to about 1e-5
    relative; ours depends on the thread count (cls_loss measured 1.4e-5 off at 1 thread, 5.4e-6 at 2).
    Any real change (alpha, gamma, delta, normaliser) moves the losses by far more than 3e-5."""
    z, cls, box, anchors, ann = _tf_loss_case()
    cls.requires_grad_(True)
    box.requires_grad_(True)
    out = DetectionLoss()(cls, box, anchors[None], ann)
    for ours, theirs in (('cls_loss', 'cls_loss'), ('box_loss', 'box_loss'), ('loss', 'total_loss')):
        assert float(out[ours].detach()) == pytest.approx(float(z[theirs]), rel=3e-5), ours
    assert float(out['num_pos']) == float(z['num_positives'].sum())
    out['loss'].backward()
    batch = cls.shape[0]
    want_cls = np.concatenate([z[f'grad_cls_logits_p{l}'].reshape(batch, -1, 10) for l in range(3, 8)], 1)
    want_box = np.concatenate([z[f'grad_box_outputs_p{l}'].reshape(batch, -1, 4) for l in range(3, 8)], 1)
    assert np.abs(want_cls).max() > 1e-4 and np.abs(want_box).max() > 1e-4  # a real comparison
    np.testing.assert_allclose(cls.grad.numpy(), want_cls, rtol=0, atol=1e-8)
    np.testing.assert_allclose(box.grad.numpy(), want_box, rtol=0, atol=1e-8)
    # anchor labels: class of the matched box on positives, -1 elsewhere; box targets on positives
    matched, positive, ignored = match_anchors(anchors, ann)
    assert not ignored.any()
    labels = torch.where(positive, ann[torch.arange(batch)[:, None], matched, 4].long(), torch.full_like(matched, -1))
    want_labels = np.concatenate([z[f'cls_targets_p{l}'].reshape(batch, -1) for l in range(3, 8)], 1)
    np.testing.assert_array_equal(labels.numpy(), want_labels)
    assert positive.sum(1).tolist() == z['num_positives'].tolist()
    from efficientdet.anchors import encode_boxes
    want_t = torch.from_numpy(np.concatenate([z[f'box_targets_p{l}'].reshape(batch, -1, 4) for l in range(3, 8)], 1))
    b, a = positive.nonzero(as_tuple=True)
    gt = ann[b, matched[b, a]]
    ours_t = encode_boxes(gt[:, [1, 0, 3, 2]], anchors[a])
    assert torch.allclose(ours_t, want_t[b, a], atol=1e-4)


def test_official_tf_loss_with_micro_batches_and_external_normaliser():
    """The fixture's batch split image by image with the normaliser of the whole batch sums to the
    official loss (what --accumulate does); count_positives gives the official counts."""
    z, cls, box, anchors, ann = _tf_loss_case()
    crit = DetectionLoss()
    counts = [float(crit.count_positives(anchors[None], ann[i:i + 1])) for i in range(cls.shape[0])]
    assert counts == z['num_positives'].tolist()
    norm = torch.tensor(sum(counts) + 1.0)
    total = sum(float(crit(cls[i:i + 1], box[i:i + 1], anchors[None], ann[i:i + 1], normalizer=norm)['loss'])
                for i in range(cls.shape[0]))
    assert total == pytest.approx(float(z['total_loss']), rel=1e-5)
