"""Synthetic shapes generator: tight boxes, determinism, COCO output readable by CocoDataset."""
import filecmp
import json
import os

import numpy as np
import pytest

from efficientdet.data import CocoDataset
from efficientdet.data.shapes import CLASSES, main, render_scene, render_scene_layers
from efficientdet.errors import UserError


def test_boxes_are_tight_around_visible_pixels():
    for seed in range(20):
        img, boxes, classes, cover = render_scene_layers(np.random.default_rng(seed), 128)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert len(boxes) == len(classes) == cover.max() + 1
        for j, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            m = cover == j
            assert not m[:y1].any() and not m[y2:].any() and not m[:, :x1].any() and not m[:, x2:].any()
            assert m[y1].any() and m[y2 - 1].any() and m[:, x1].any() and m[:, x2 - 1].any()
            colours = np.unique(img[m].reshape(-1, 3), axis=0)
            assert len(colours) == 1  # a flat-coloured shape
            inside = img[y1:y2, x1:x2][~m[y1:y2, x1:x2]].reshape(-1, 3).astype(int)
            if len(inside):  # it stands out from what surrounds it in its box
                assert np.abs(inside - colours[0].astype(int)).sum(1).mean() > 30


def test_scene_statistics():
    counts, sizes, seen = [], [], set()
    for seed in range(60):
        img, boxes, classes = render_scene(np.random.default_rng(seed), 200)
        counts.append(len(boxes))
        sizes += list(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 200)
        seen |= set(classes.tolist())
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 4
    assert seen == {0, 1, 2}
    sizes = np.array(sizes)
    assert sizes.max() <= 0.51 and np.median(sizes) > 0.12 and np.mean(sizes >= 0.05) > 0.95


def test_different_seeds_make_different_scenes():
    a = render_scene(np.random.default_rng(1), 96)[0]
    b = render_scene(np.random.default_rng(2), 96)[0]
    assert not np.array_equal(a, b)


def test_too_small_is_a_user_error():
    with pytest.raises(UserError):
        render_scene(np.random.default_rng(0), 16)
    with pytest.raises(UserError):
        main(['--root', 'x', '--image_size', '8'])


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_cli_deterministic_and_coco_valid(tmp_path):
    args = ['--num_train', '6', '--num_val', '3', '--image_size', '96']
    a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    assert main(['--root', str(a), '--seed', '7'] + args) == 0
    assert main(['--root', str(b), '--seed', '7'] + args) == 0
    assert main(['--root', str(c), '--seed', '8'] + args) == 0
    files = _tree(a)
    assert len(files) == 6 + 3 + 2 and files == _tree(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    _, mismatch_c, _ = filecmp.cmpfiles(a, c, files, shallow=False)
    assert len(mismatch_c) >= 6

    data = json.load(open(a / 'annotations' / 'instances_train.json'))
    assert [c['id'] for c in data['categories']] == [1, 2, 3]
    assert [c['name'] for c in data['categories']] == list(CLASSES)
    assert all(an['iscrowd'] == 0 and an['area'] == an['bbox'][2] * an['bbox'][3] for an in data['annotations'])
    # the written boxes are the ones render_scene drew for image i (seed, split 'train' = 0, i)
    for i, im in enumerate(data['images']):
        _, boxes, classes = render_scene(np.random.default_rng([7, 0, i]), 96)
        anns = [an for an in data['annotations'] if an['image_id'] == im['id']]
        got = np.array([[x, y, x + w, y + h] for x, y, w, h in (an['bbox'] for an in anns)])
        np.testing.assert_array_equal(got, boxes)
        assert [an['category_id'] for an in anns] == (classes + 1).tolist()
        assert (im['height'], im['width']) == (96, 96)

    ds = CocoDataset(str(a), 'train', list(CLASSES), 96)
    assert len(ds) == 6 and 'nothing skipped' in ds.summary()
    s = ds[0]
    ref, boxes, classes = render_scene(np.random.default_rng([7, 0, 0]), 96)
    np.testing.assert_allclose(s['annot'][:, :4].numpy(), boxes, atol=1e-4)  # 96 px → scale 1
    assert s['annot'][:, 4].tolist() == classes.tolist()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    decoded = (s['img'].numpy().transpose(1, 2, 0) * std + mean) * 255
    assert np.abs(decoded - ref).mean() < 6  # the JPEG is the rendered scene (RGB order kept)
