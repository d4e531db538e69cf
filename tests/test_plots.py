"""Pictures: each figure is written as a PNG and carries the numbers COCOeval (or the dataset and
the anchor generator) computed; the confusion matrix on a hand-made case; TensorBoard gets the
precision-recall figure at validation; the package imports without matplotlib."""
import contextlib
import copy
import io
import json
import os
import struct
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from conftest import need_shared, pycocotools_coco
from efficientdet.errors import UserError
from efficientdet.evaluation import COCOEvaluator, _greedy_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # coco_eval.py
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
NAMES = ['cat', 'dog', 'bird']


# ----------------------------------------------------------------------------- helpers
def _mpl():
    return pytest.importorskip('matplotlib')


def _is_png(path):
    with open(path, 'rb') as f:
        head = f.read(8)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return head == PNG_MAGIC and img is not None and img.shape[0] > 50 and img.shape[1] > 50


def _by_gid(artists, gid):
    return [a for a in artists if a.get_gid() == gid]


def _synthetic(seed=0, images=30, size=200):
    """Ground truth of 3 classes with small, medium and large boxes, and detections: jittered
    copies (some with the wrong class), misses and false positives."""
    rng = np.random.default_rng(seed)
    gt = {'images': [], 'annotations': [], 'categories': [{'id': i + 1, 'name': n} for i, n in enumerate(NAMES)]}
    dets = []
    for i in range(1, images + 1):
        gt['images'].append({'id': i, 'file_name': f'{i}.jpg', 'height': size, 'width': size})
        for _ in range(rng.integers(1, 6)):
            side = float(rng.choice([rng.uniform(10, 28), rng.uniform(40, 90), rng.uniform(100, 150)]))
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            c = int(rng.integers(0, 3))
            gt['annotations'].append({'id': len(gt['annotations']) + 1, 'image_id': i, 'category_id': c + 1,
                                      'bbox': [x, y, w, h], 'area': w * h, 'iscrowd': 0})
            if rng.random() < 0.85:
                j = rng.normal(0, 0.08 * side, 4)
                label = c if rng.random() < 0.9 else (c + 1) % 3
                dets.append((i, [x + j[0], y + j[1], x + w + j[2], y + h + j[3]], rng.uniform(0.1, 1), label))
        for _ in range(rng.integers(30, 45)):  # > 10 per class and image: COCOeval's cap of 100 differs from 10
            x, y = rng.uniform(0, size - 30, 2)
            dets.append((i, [x, y, x + 30, y + 30], rng.uniform(0.05, 0.4), int(rng.integers(0, 3))))
    return gt, dets


def _evaluator(gt, dets):
    ev = COCOEvaluator(pycocotools_coco(gt), class_names=NAMES)
    ids = sorted({im['id'] for im in gt['images']})
    by = {i: [d for d in dets if d[0] == i] for i in ids}
    ev.update(ids, [{'boxes': np.array([d[1] for d in by[i]]).reshape(-1, 4),
                     'scores': np.array([d[2] for d in by[i]]), 'labels': np.array([d[3] for d in by[i]], int)}
                    for i in ids])
    return ev


def _reference_cocoeval(gt, results):
    """pycocotools called the documented way, on copies."""
    coco = pycocotools_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture(scope='module')
def evaluated():
    gt, dets = _synthetic()
    ev = _evaluator(gt, dets)
    metrics = ev.compute()
    ref = _reference_cocoeval(gt, ev.results)
    return gt, ev, metrics, ref


# ----------------------------------------------------------------------------- metrics
def test_metrics_hold_cocoeval_curves_and_areas(evaluated):
    _, _, m, ref = evaluated
    p = ref.eval['precision']  # [T, R, K, A, M], K in category id order == NAMES order here
    np.testing.assert_allclose(m['curves']['precision'], p[:, :, :, 0, -1])
    np.testing.assert_allclose(m['curves']['recall_thresholds'], ref.params.recThrs)
    np.testing.assert_allclose(m['curves']['iou_thresholds'], ref.params.iouThrs)
    assert m['curves']['names'] == NAMES
    np.testing.assert_allclose([m[k] for k in ('AP', 'AP50', 'APs', 'APm', 'APl')],
                               [ref.stats[0], ref.stats[1], ref.stats[3], ref.stats[4], ref.stats[5]])
    for k, row in enumerate(m['per_class']):
        for a, key in enumerate(('APs', 'APm', 'APl'), start=1):
            v = p[:, :, k, a, -1]
            assert row[key] == pytest.approx(v[v > -1].mean() if (v > -1).any() else -1.0), (row['name'], key)
    assert all(r[k] > 0 for r in m['per_class'] for k in ('APs', 'APm', 'APl'))  # every size is present


# ----------------------------------------------------------------------------- evaluation figures
def test_pr_figure_lines_are_cocoeval_precision(evaluated):
    _mpl()
    from efficientdet.plots import pr_figure
    _, _, m, ref = evaluated
    p = ref.eval['precision'][:, :, :, 0, -1]
    ax = pr_figure(m).axes[0]
    (at50,), (avg,) = _by_gid(ax.get_lines(), 'pr/0.5'), _by_gid(ax.get_lines(), 'pr/0.5:0.95')
    np.testing.assert_allclose(at50.get_xdata(), ref.params.recThrs)
    np.testing.assert_allclose(at50.get_ydata(), p[0].mean(1))
    np.testing.assert_allclose(avg.get_ydata(), p.mean(axis=(0, 2)))
    assert np.mean(at50.get_ydata()) == pytest.approx(ref.stats[1])  # the area under it is AP50
    assert np.mean(avg.get_ydata()) == pytest.approx(ref.stats[0])   # and AP


def test_pr_per_class_panels(evaluated):
    _mpl()
    from efficientdet.plots import pr_per_class_figure
    _, _, m, ref = evaluated
    p = ref.eval['precision'][:, :, :, 0, -1]
    panels = [ax for ax in pr_per_class_figure(m).axes if ax.get_visible()]
    assert [ax.title.get_gid() for ax in panels] == NAMES
    for k, ax in enumerate(panels):
        np.testing.assert_allclose(_by_gid(ax.get_lines(), 'pr/0.5')[0].get_ydata(), p[0, :, k])
        np.testing.assert_allclose(_by_gid(ax.get_lines(), 'pr/0.5:0.95')[0].get_ydata(), p[:, :, k].mean(0))
        assert f'AP {m["per_class"][k]["AP"]:.3f}' in ax.get_title()


def test_ap_per_class_bars_equal_the_table(evaluated):
    _mpl()
    from efficientdet.plots import ap_per_class_figure
    _, _, m, ref = evaluated
    ax = ap_per_class_figure(m).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(labels) == sorted(NAMES)
    ap = dict(zip(labels, [b.get_width() for b in _by_gid(ax.patches, 'AP')]))
    ap50 = dict(zip(labels, [b.get_width() for b in _by_gid(ax.patches, 'AP50')]))
    p = ref.eval['precision'][:, :, :, 0, -1]
    for k, row in enumerate(m['per_class']):
        assert ap[row['name']] == pytest.approx(row['AP']) == pytest.approx(p[:, :, k].mean())
        assert ap50[row['name']] == pytest.approx(row['AP50']) == pytest.approx(p[0, :, k].mean())
    assert [ap[n] for n in labels] == sorted(ap.values(), reverse=True)  # best first
    assert _by_gid(ax.get_lines(), 'mAP')[0].get_xdata()[0] == pytest.approx(ref.stats[0])


def test_ap_by_size_bars_and_table(evaluated):
    _mpl()
    from efficientdet.plots import ap_by_size_figure
    _, _, m, ref = evaluated
    fig = ap_by_size_figure(m)
    bars = [a for ax in fig.axes for a in _by_gid(ax.patches, 'AP_by_size')]
    np.testing.assert_allclose([b.get_height() for b in bars], ref.stats[3:6])
    (im,) = [a for ax in fig.axes for a in _by_gid(ax.images, 'AP_by_size/class')]
    table = [[r['APs'], r['APm'], r['APl']] for r in m['per_class']]
    np.testing.assert_allclose(np.asarray(im.get_array()), table)


def test_ap_by_size_marks_a_size_without_objects():
    _mpl()
    from efficientdet.plots import ap_by_size_figure
    gt, dets = _synthetic(seed=1)
    gt['annotations'] = [a for a in gt['annotations'] if a['area'] >= 32 ** 2]  # no small objects
    m = _evaluator(gt, dets).compute()
    assert m['APs'] == -1
    fig = ap_by_size_figure(m)
    bars = [a for ax in fig.axes for a in _by_gid(ax.patches, 'AP_by_size')]
    assert [b.get_height() for b in bars] == pytest.approx([0.0, m['APm'], m['APl']])
    assert 'none' in [t.get_text() for t in fig.axes[0].texts]
    (im,) = [a for ax in fig.axes for a in _by_gid(ax.images, 'AP_by_size/class')]
    assert np.isnan(np.asarray(im.get_array())[:, 0]).all()


def test_write_eval_plots_from_an_evaluator_or_its_metrics(tmp_path, evaluated):
    _mpl()
    from efficientdet.plots import write_eval_plots
    gt, dets = _synthetic()
    names = {'pr_curve.png', 'pr_curves_per_class.png', 'ap_per_class.png', 'ap_by_size.png', 'confusion_matrix.png'}
    said = []
    paths = write_eval_plots(_evaluator(gt, dets), str(tmp_path / 'a'), log=said.append)  # computed on demand
    assert {os.path.basename(p) for p in paths} == names and all(_is_png(p) for p in paths)
    assert 'replaced' not in said[0]
    paths = write_eval_plots(evaluated[2], str(tmp_path / 'a'), log=said.append)
    assert {os.path.basename(p) for p in paths} == names and all(_is_png(p) for p in paths)
    assert 'replaced' in said[1]  # never silently


# ----------------------------------------------------------------------------- confusion matrix
def _box(x, y, w=10.0, h=10.0):
    return [x, y, w, h]


def test_confusion_matrix_hand_made():
    gt = {'images': [{'id': i, 'file_name': f'{i}.jpg', 'height': 100, 'width': 100} for i in (1, 2, 3)],
          'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}, {'id': 3, 'name': 'c'}],
          'annotations': []}

    def ann(img, cat, bbox, crowd=0):
        gt['annotations'].append({'id': len(gt['annotations']) + 1, 'image_id': img, 'category_id': cat,
                                  'bbox': bbox, 'area': bbox[2] * bbox[3], 'iscrowd': crowd})
    ann(1, 1, _box(0, 0))      # A1: found as a, plus a duplicate detection
    ann(1, 2, _box(20, 20))    # B1: an 'a' detection on it (IoU 1) and a 'b' one (IoU .68): b wins
    ann(1, 3, _box(40, 40))    # C1: only found as b
    ann(1, 1, [60, 60, 30, 30], crowd=1)  # a crowd region: a detection inside it is ignored
    ann(2, 1, _box(0, 0))      # A2: missed (its only detection scores below the threshold)
    ann(2, 1, _box(50, 50))    # A3: missed (its detection overlaps it with IoU < .5)
    results = [
        (1, 'a', _box(0, 0), .9), (1, 'a', _box(1, 1), .8),
        (1, 'a', _box(20, 20), .9), (1, 'b', _box(22, 21), .6),
        (1, 'b', _box(40, 40), .7),
        (1, 'a', _box(70, 70), .9),
        (1, 'c', _box(80, 0), .5),                       # nothing there
        (2, 'a', _box(0, 0), .1),                        # below the score threshold
        (2, 'a', _box(56, 56), .9),                      # IoU 16 / 184 with A3
        (3, 'c', _box(5, 5), .95),                       # an image without ground truth
    ]
    cat = {'a': 1, 'b': 2, 'c': 3}
    ev = COCOEvaluator(pycocotools_coco(gt))
    ev.add_results([{'image_id': i, 'category_id': cat[c], 'bbox': b, 'score': s} for i, c, b, s in results])
    conf = ev.confusion_matrix(iou_threshold=0.5, score_threshold=0.25)
    expected = np.array([
        # a  b  c  background (missed)
        [1, 0, 0, 2],   # true a: A1 found; A2, A3 missed (the crowd region is not counted)
        [0, 1, 0, 0],   # true b
        [0, 1, 0, 0],   # true c, detected as b
        [3, 0, 2, 0],   # detections matching no box: a on B1, duplicate on A1, a near A3; c twice
    ])
    assert conf['names'] == ['a', 'b', 'c']
    np.testing.assert_array_equal(conf['matrix'], expected)
    m = ev.compute()
    np.testing.assert_array_equal(m['confusion']['matrix'], expected)
    lower = ev.confusion_matrix(score_threshold=0.05)['matrix']
    assert lower[0, 0] == 2 and lower[0, 3] == 1  # A2's low-scoring detection now finds it


def test_confusion_figure_cells(tmp_path):
    _mpl()
    from efficientdet.plots import confusion_figure
    m = np.array([[5, 1, 0], [2, 3, 4], [1, 0, 0]])
    fig = confusion_figure({'names': ['x', 'y'], 'matrix': m, 'iou_threshold': 0.5, 'score_threshold': 0.25})
    ax = fig.axes[0]
    (im,) = _by_gid(ax.images, 'confusion')
    np.testing.assert_allclose(np.asarray(im.get_array()), m / m.sum(1, keepdims=True))
    cells = {(int(round(t.get_position()[1])), int(round(t.get_position()[0]))): int(t.get_text())
             for t in _by_gid(ax.texts, 'count')}
    assert cells == {(i, j): int(v) for (i, j), v in np.ndenumerate(m) if v}
    assert [t.get_text() for t in ax.get_xticklabels()] == ['x', 'y', 'background']


def test_greedy_match_equals_sequential_greedy():
    rng = np.random.default_rng(3)
    for _ in range(20):
        nd, ng, p = int(rng.integers(1, 30)), int(rng.integers(1, 30)), int(rng.integers(0, 200))
        pairs = np.unique(np.stack([rng.integers(0, nd, p), rng.integers(0, ng, p)], 1), axis=0).reshape(-1, 2)
        w = rng.random(len(pairs))
        det_m, gt_m = _greedy_match(pairs[:, 0], pairs[:, 1], w, nd, ng)
        ref_d, ref_g = np.full(nd, -1), np.full(ng, -1)
        for j in np.argsort(-w):  # the sequential definition
            d, g = pairs[j]
            if ref_d[d] < 0 and ref_g[g] < 0:
                ref_d[d], ref_g[g] = g, d
        np.testing.assert_array_equal(det_m, ref_d)
        np.testing.assert_array_equal(gt_m, ref_g)


# ----------------------------------------------------------------------------- data check
SIZE, INPUT = 96, 128


@pytest.fixture(scope='module')
def shapes_project(tmp_path_factory):
    from efficientdet.data.shapes import CLASSES, generate_split
    base = tmp_path_factory.mktemp('plots_data')
    root = base / 'toy'
    generate_split(str(root), 'train', 12, SIZE, 0)
    generate_split(str(root), 'val', 3, SIZE, 0)
    ann = root / 'annotations' / 'instances_train.json'
    data = json.loads(ann.read_text())
    data['annotations'].append({'id': 10 ** 6, 'image_id': data['images'][0]['id'], 'category_id': 1,
                                'bbox': [2.0, 2.0, 30.0, 30.0], 'area': 900.0, 'iscrowd': 1})
    for k, (w, h) in enumerate(((20.0, 14.0), (16.0, 16.0))):  # best anchor IoU .486 and .444 at 128 px
        data['annotations'].append({'id': 10 ** 6 + 1 + k, 'image_id': data['images'][1]['id'], 'category_id': 2,
                                    'bbox': [40.0, 40.0, w, h], 'area': w * h, 'iscrowd': 0})
    ann.write_text(json.dumps(data))
    (base / 'projects').mkdir()
    (base / 'projects' / 'toy.yml').write_text(
        f'project_name: toy\ntrain_set: train\nval_set: val\nobj_list: {list(CLASSES)}\n')
    return base, root


def _indices(project, base):
    from efficientdet.data.formats import project_split
    return {s: project_split(project, s, str(base)) for s in dict.fromkeys((project.train_set, project.val_set))}


def test_data_check_figures_carry_the_data_and_the_anchors(shapes_project):
    _mpl()
    from efficientdet.anchors import generate_anchors
    from efficientdet.config import get_config
    from efficientdet.data.check import anchor_report, check_figures
    from efficientdet.project import load_project
    base, root = shapes_project
    project = load_project('toy', str(base / 'projects'))
    indices = _indices(project, base)
    figs = check_figures(indices, project, 0, (INPUT, INPUT))
    assert set(figs) == {'samples_train.png', 'samples_val.png', 'box_shapes.png', 'boxes_per_class.png'}
    jsons = {s: json.loads((root / 'annotations' / f'instances_{s}.json').read_text()) for s in ('train', 'val')}

    # samples: every box of the shown images, crowd dashed, with its class name
    train = jsons['train']
    by_file = {im['file_name']: im['id'] for im in train['images']}
    name_of = {c['id']: c['name'] for c in train['categories']}
    shown = [ax for ax in figs['samples_train.png'].axes if ax.images]
    assert len(shown) == 12
    for ax in shown:
        image_id = by_file[ax.get_title().split(' ')[0]]
        anns = [a for a in train['annotations'] if a['image_id'] == image_id]
        drawn = sorted((p.get_x(), p.get_y(), p.get_width(), p.get_height(), p.get_gid()) for p in ax.patches)
        want = sorted((*a['bbox'], 'crowd' if a.get('iscrowd') else 'gt') for a in anns)
        np.testing.assert_allclose([d[:4] for d in drawn], [w[:4] for w in want], atol=1e-3)
        assert [d[4] for d in drawn] == [w[4] for w in want]
        assert sorted(t.get_text() for t in _by_gid(ax.texts, 'name')) == sorted(
            'crowd' if a.get('iscrowd') else name_of[a['category_id']] for a in anns)

    # box shapes: letterboxed training boxes against the anchors of anchors.py at this input size
    cfg = get_config(0)
    real = [a for a in train['annotations'] if not a.get('iscrowd')]
    img_hw = {im['id']: (im['height'], im['width']) for im in train['images']}
    scale = np.array([min(INPUT / img_hw[a['image_id']][0], INPUT / img_hw[a['image_id']][1]) for a in real])
    w = np.array([a['bbox'][2] for a in real]) * scale
    h = np.array([a['bbox'][3] for a in real]) * scale
    anchors = generate_anchors((INPUT, INPUT), cfg.levels, cfg.anchor_scale, project.anchors_scales,
                               project.anchors_ratios)
    aw, ah = anchors[:, 3] - anchors[:, 1], anchors[:, 2] - anchors[:, 0]
    size_ax, ratio_ax = figs['box_shapes.png'].axes
    for ax, values, marks in ((size_ax, np.sqrt(w * h), np.sqrt(aw * ah)), (ratio_ax, w / h, aw / ah)):
        lines = sorted(l.get_xdata()[0] for l in _by_gid(ax.get_lines(), 'anchor'))
        np.testing.assert_allclose(lines, np.unique(np.round(marks, 6)), rtol=1e-9)
        cov, unc = _by_gid(ax.patches, 'boxes/covered'), _by_gid(ax.patches, 'boxes/uncovered')
        edges = [p.get_x() for p in cov] + [cov[-1].get_x() + cov[-1].get_width()]
        counts = np.array([p.get_height() for p in cov]) + np.array([p.get_height() for p in unc])
        np.testing.assert_array_equal(counts, np.histogram(values, edges)[0])
    # green = best IoU over all anchors >= 0.5 (brute force here), as the text report counts it
    x1 = np.array([a['bbox'][0] for a in real]) * scale
    y1 = np.array([a['bbox'][1] for a in real]) * scale
    iw = (np.minimum((x1 + w)[:, None], anchors[None, :, 3]) - np.maximum(x1[:, None], anchors[None, :, 1])).clip(0)
    ih = (np.minimum((y1 + h)[:, None], anchors[None, :, 2]) - np.maximum(y1[:, None], anchors[None, :, 0])).clip(0)
    inter = iw * ih
    best = (inter / ((w * h)[:, None] + (aw * ah)[None] - inter)).max(1)
    covered = best >= 0.5
    assert 0 < covered.sum() < len(real) and ((best > 0.48) & ~covered).any() and ((best > 0.44) & ~covered).sum() >= 2
    for ax, values in ((size_ax, np.sqrt(w * h)), (ratio_ax, w / h)):
        cov = _by_gid(ax.patches, 'boxes/covered')
        edges = [p.get_x() for p in cov] + [cov[-1].get_x() + cov[-1].get_width()]
        np.testing.assert_array_equal([p.get_height() for p in cov], np.histogram(values[covered], edges)[0])
    fit = anchor_report(indices['train'], project, 0, (INPUT, INPUT))
    assert fit.coverage == pytest.approx(covered.mean())

    # boxes per class, per split, crowd left out
    ax = figs['boxes_per_class.png'].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    for split, data in jsons.items():
        widths = [p.get_width() for p in _by_gid(ax.patches, split)]
        want = [sum(1 for a in data['annotations'] if not a.get('iscrowd') and name_of[a['category_id']] == n)
                for n in labels]
        assert widths == want and sum(want) > 0


def test_data_check_cli_writes_pngs(shapes_project, tmp_path, capsys):
    _mpl()
    from efficientdet.data.check import main
    base, _ = shapes_project
    out = tmp_path / 'pics'
    main(['-p', 'toy', '--data_path', str(base), '--projects_dir', str(base / 'projects'), '--image_size',
          str(INPUT), '--plots', str(out)])
    names = sorted(os.listdir(out))
    assert names == ['box_shapes.png', 'boxes_per_class.png', 'samples_train.png', 'samples_val.png']
    assert all(_is_png(out / n) for n in names)
    assert 'plots: wrote' in capsys.readouterr().out


def test_data_check_figures_on_coco_tiny_leave_out_placeholders(tmp_path):
    _mpl()
    from efficientdet.data.check import check_figures
    from efficientdet.project import load_project
    tiny = need_shared('data', 'coco_tiny')
    os.symlink(tiny, tmp_path / 'coco')
    project = load_project('coco', os.path.join(ROOT, 'projects'))
    assert '' in project.obj_list  # the 90-slot label map
    indices = _indices(project, tmp_path)
    figs = check_figures(indices, project, 0, (256, 256), samples=2)
    ax = figs['boxes_per_class.png'].axes[0]
    with open(os.path.join(tiny, 'annotations', 'instances_val2017.json')) as f:
        val = json.load(f)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [n for n in project.obj_list if n]
    name_of = {c['id']: c['name'] for c in val['categories']}
    want = [sum(1 for a in val['annotations'] if not a.get('iscrowd') and name_of[a['category_id']] == n)
            for n in labels]
    assert [p.get_width() for p in _by_gid(ax.patches, 'val2017')] == want


# ----------------------------------------------------------------------------- TensorBoard
def _events(folder):
    """Every Event of the tensorboardX files in ``folder`` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), 'rb') as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack('<Q', data[pos:pos + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            out.append(ev)
            pos += 12 + n + 4
    return out


def test_tensorboard_gets_the_pr_figure_of_the_chosen_weights(tmp_path, evaluated):
    _mpl()
    from efficientdet.plots import pr_rgb
    from efficientdet.training.hooks import TensorBoardHook
    gt, dets = _synthetic(seed=5)
    raw = {'loss': 1.0, **{k: v for k, v in _evaluator(gt, dets).compute().items() if k in ('AP', 'AP50', 'curves')}}
    ema = {'loss': 0.5, **{k: v for k, v in evaluated[2].items() if k in ('AP', 'AP50', 'curves')}}
    hook = TensorBoardHook(str(tmp_path))
    trainer = types.SimpleNamespace(step=7)
    hook.on_fit_start(trainer)
    hook.on_validation(trainer, {'epoch': 0, 'step': 7, 'value': ema['AP'], 'source': 'ema',
                                 'results': {'raw': raw, 'ema': ema}, 'state_dict': None})
    hook.close(trainer)
    values = {v.tag: (e.step, v) for e in _events(tmp_path) for v in e.summary.value}
    assert values['AP/val'][1].simple_value == pytest.approx(ema['AP'])
    assert values['AP/val_raw'][1].simple_value == pytest.approx(raw['AP'])
    step, image = values['precision_recall/val']
    assert step == 7
    png = np.frombuffer(image.image.encoded_image_string, np.uint8)
    drawn = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(drawn, pr_rgb(ema))      # the chosen (EMA) weights' curves
    assert not np.array_equal(drawn, pr_rgb(raw))


def test_tensorboard_without_matplotlib_says_so_once_and_keeps_the_scalars(tmp_path, monkeypatch, evaluated):
    from efficientdet.training.hooks import TensorBoardHook
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    said = []
    hook = TensorBoardHook(str(tmp_path), log=said.append)
    trainer = types.SimpleNamespace(step=3)
    hook.on_fit_start(trainer)
    metrics = {'loss': 1.0, 'AP': evaluated[2]['AP'], 'curves': evaluated[2]['curves']}
    for step in (3, 4):
        trainer.step = step
        hook.on_validation(trainer, {'source': 'raw', 'results': {'raw': metrics}, 'value': metrics['AP']})
    hook.close(trainer)
    assert len(said) == 1 and said[0].endswith('pip install matplotlib')
    tags = [(v.tag, e.step) for e in _events(tmp_path) for v in e.summary.value]
    assert ('AP/val', 3) in tags and ('AP/val', 4) in tags
    assert not any(t == 'precision_recall/val' for t, _ in tags)


def test_validation_metrics_carry_the_curves(monkeypatch):
    import efficientdet.evaluation as evaluation
    from efficientdet.training.validation import evaluate
    curves = {'precision': np.zeros((10, 101, 1))}
    monkeypatch.setattr(evaluation, 'run_coco_eval',
                        lambda *a, **k: ({'AP': 0.5, 'AP50': 0.7, 'AP75': 0.4, 'curves': curves}, []))
    out = evaluate(torch.nn.Identity(), None, [], None, 'cpu', 1)
    assert out['AP'] == 0.5 and out['curves'] is curves


# ----------------------------------------------------------------------------- without matplotlib
def test_without_matplotlib_one_line_says_what_to_install(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"  # import matplotlib now raises ImportError
        "import efficientdet, efficientdet.plots, efficientdet.evaluation, efficientdet.training.hooks\n"
        "import efficientdet.data.check\n"
        "from efficientdet.errors import UserError\n"
        "from efficientdet.data.check import main\n"
        "import coco_eval\n"
        "for run in (main, coco_eval.main):\n"
        "    try:\n"
        "        run(['-p', 'nope', '--plots', 'x'])\n"
        "    except UserError as e:\n"
        "        print('USER', e)\n")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': ROOT})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().split('\n')
    assert len(lines) == 2  # both scripts stop before any work, with one line each
    assert all(s.startswith('USER --plots') and s.endswith(': pip install matplotlib') for s in lines)


def test_plots_dir_that_is_a_file_is_refused_before_work(tmp_path):
    _mpl()
    import coco_eval
    from efficientdet.data.check import main
    taken = tmp_path / 'taken.png'
    taken.write_bytes(b'x')
    for run in (main, coco_eval.main):
        with pytest.raises(UserError, match='exists and is not a folder'):
            run(['-p', 'nope', '--plots', str(taken)])


def test_figures_with_nothing_to_show(tmp_path):
    _mpl()
    from efficientdet import plots
    gt = {'images': [{'id': 1, 'file_name': '1.jpg', 'height': 50, 'width': 50}], 'annotations': [],
          'categories': [{'id': 1, 'name': 'a'}]}
    ev = COCOEvaluator(pycocotools_coco(gt))
    ev.update([1], [{'boxes': np.zeros((0, 4)), 'scores': np.zeros(0), 'labels': np.zeros(0, int)}])
    m = ev.compute()  # no ground truth: every AP -1
    assert m['AP'] == -1 and (m['curves']['precision'] == -1).all()
    assert len(plots.write_eval_plots(m, str(tmp_path / 'eval'), log=lambda s: None)) == 5
    empty = np.zeros(0)
    figs = {'samples.png': plots.samples_figure([], ['a']),
            'shapes.png': plots.box_shapes_figure(empty, empty, empty.astype(bool), np.array([32.0]), np.array([1.0]),
                                                  (64, 64)),
            'counts.png': plots.class_counts_figure(['a'], {'train': np.zeros(1, int)})}
    paths = plots.write_figures(figs, str(tmp_path / 'data'), log=lambda s: None)
    assert all(_is_png(p) for p in paths)
