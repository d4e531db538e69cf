"""Anchor fit: exact best-anchor IoU (against a brute force over every anchor), the coverage report
and a suggestion that raises coverage on boxes the default anchors fit badly, through data.check."""
import itertools
import json

import cv2
import numpy as np
import pytest

from efficientdet.anchors import generate_anchors
from efficientdet.config import DEFAULT_SCALES, OFFICIAL_RATIOS, get_config
from efficientdet.data.anchor_fit import IOU_THRESHOLD, best_iou_per_shape, fit_anchors, ratio_text, scale_text
from efficientdet.data.check import main as check_main
from efficientdet.project import load_project, parse_arith


def brute_force_best_iou(boxes_xyxy, anchors_yxyx, k):
    """[N, K] best IoU of each anchor shape over every position, the slow way."""
    a = anchors_yxyx.reshape(-1, k, 4)[..., [1, 0, 3, 2]]  # xyxy
    out = np.zeros((len(boxes_xyxy), k))
    for n, b in enumerate(boxes_xyxy):
        iw = np.clip(np.minimum(a[..., 2], b[2]) - np.maximum(a[..., 0], b[0]), 0, None)
        ih = np.clip(np.minimum(a[..., 3], b[3]) - np.maximum(a[..., 1], b[1]), 0, None)
        inter = iw * ih
        union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        out[n] = (inter / union).max(0)
    return out


@pytest.mark.parametrize('hw', [(256, 256), (256, 384)])
def test_best_iou_is_exact(hw):
    rng = np.random.default_rng(0)
    n = 200
    c = rng.uniform(0, 1, (n, 2)) * np.array(hw[::-1])
    wh = rng.uniform(3, 250, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], 1)
    levels = get_config(0).levels
    got = best_iou_per_shape(boxes, hw, levels, 4.0, DEFAULT_SCALES, OFFICIAL_RATIOS)
    ref = brute_force_best_iou(boxes, generate_anchors(hw, levels, 4.0, DEFAULT_SCALES, OFFICIAL_RATIOS), 9)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert 0.2 < (got.max(1) >= IOU_THRESHOLD).mean() < 1.0  # the sample has fitting and non-fitting boxes


def test_suggestion_strings_parse_to_the_suggested_values():
    for steps in ([-3, 0, 4], [1, 2, 6]):
        np.testing.assert_allclose(parse_arith(scale_text(steps), 'anchors_scales'), [2 ** (j / 3) for j in steps])
    for steps in ([-6, 0, 5], [0, 1, -8]):
        got = parse_arith(ratio_text(steps), 'anchors_ratios')
        np.testing.assert_allclose(got, [(2 ** (k / 4), 2 ** (-k / 4)) for k in steps])


def elongated_set(root, n_images=12, size=256, seed=0):
    """COCO-format folder of blank images with wide 7:1 boxes: the default ratios (up to 2:1) fit
    almost none of them."""
    rng = np.random.default_rng(seed)
    (root / 'train').mkdir(parents=True)
    (root / 'annotations').mkdir()
    images, anns = [], []
    for i in range(1, n_images + 1):
        name = f'{i:03d}.png'
        cv2.imwrite(str(root / 'train' / name), np.zeros((size, size, 3), np.uint8))
        images.append({'id': i, 'file_name': name, 'height': size, 'width': size})
        for _ in range(4):
            w = float(rng.uniform(60, 200))
            h = w / 7
            x, y = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
            anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': 1, 'bbox': [x, y, w, h],
                         'area': w * h, 'iscrowd': 0})
    (root / 'annotations' / 'instances_train.json').write_text(json.dumps(
        {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'rod'}]}))
    return len(anns)


def test_check_reports_and_suggestion_raises_coverage(tmp_path, capsys):
    n = elongated_set(tmp_path / 'data' / 'rods')
    yml = tmp_path / 'rods.yml'
    yml.write_text('project_name: rods\ntrain_set: train\nval_set: train\nobj_list: [rod]\n')
    args = ['-p', str(yml), '--data_path', str(tmp_path / 'data'), '--image_size', '256', '--no_images']
    assert check_main(args + ['--json', str(tmp_path / 'a.json')]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / 'a.json').read_text())
    assert rep['num_boxes'] == n and rep['image_size'] == [256, 256]
    assert rep['anchor_coverage'] < 0.2 and f"{rep['anchor_coverage']:.1%} have an anchor with IoU >= 0.5" in out
    assert sum(v['boxes'] for v in rep['by_size'].values()) == n
    sug = rep['suggested']
    assert sug['anchor_coverage'] > 0.9 and f"    anchors_scales: '{sug['anchors_scales']}'" in out
    assert f"    anchors_ratios: '{sug['anchors_ratios']}'" in out
    # the printed lines are accepted by the project file, and re-running with them measures the
    # suggested coverage with the model's own anchors
    better = tmp_path / 'rods2.yml'
    better.write_text(yml.read_text() + f"anchors_scales: '{sug['anchors_scales']}'\n"
                                        f"anchors_ratios: '{sug['anchors_ratios']}'\n")
    proj = load_project(str(better))
    assert len(proj.anchors_scales) == 3 and len(proj.anchors_ratios) == 3  # same head size
    args[1] = str(better)
    assert check_main(args + ['--json', str(tmp_path / 'b.json')]) == 0
    rep2 = json.loads((tmp_path / 'b.json').read_text())
    assert rep2['anchor_coverage'] == pytest.approx(sug['anchor_coverage'])
    assert 'already the best found' in capsys.readouterr().out


def test_search_keeps_default_anchors_when_they_are_best():
    """Square-ish boxes of the default sizes: nothing better, the project's anchors are kept."""
    hw = (256, 256)
    levels = get_config(0).levels
    a = generate_anchors(hw, levels, 4.0, DEFAULT_SCALES, OFFICIAL_RATIOS)[::37][:, [1, 0, 3, 2]]
    fit = fit_anchors(a, np.full((len(a), 2), 256.0), hw, levels, 4.0, DEFAULT_SCALES, OFFICIAL_RATIOS)
    assert fit.coverage == 1.0 and fit.suggested_coverage == 1.0
    np.testing.assert_allclose(sorted(fit.suggested_scales), DEFAULT_SCALES)
    assert sorted(fit.suggested_ratios) == pytest.approx(sorted(OFFICIAL_RATIOS))


@pytest.mark.parametrize('seed', range(4))
def test_subset_search_is_the_exhaustive_optimum(seed):
    from efficientdet.data import anchor_fit as af
    rng = np.random.default_rng(seed)
    hit = rng.random((300, 5, 6)) < 0.08
    best = max(hit[:, list(s)][:, :, list(r)].any((1, 2)).sum()
               for s in itertools.combinations(range(5), 2) for r in itertools.combinations(range(6), 2))
    si, ri, got = af._search(hit, (0, 1), (0, 1))
    assert got == best / 300 == hit[:, si][:, :, ri].any((1, 2)).mean()
