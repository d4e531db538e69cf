"""COCOEvaluator against pycocotools on the real coco_tiny val2017 subset."""
import copy
import io
import json
import os
import contextlib

import numpy as np
import pytest
import torch

from pycocotools.cocoeval import COCOeval

from conftest import need_shared, pycocotools_coco
from efficientdet.errors import UserError
from efficientdet.evaluation import (STAT_NAMES, COCOEvaluator, coco_from_dict, format_summary, load_coco,
                                     resolve_category_ids, run_coco_eval)


def _ann_path():
    return need_shared('data', 'coco_tiny', 'annotations', 'instances_val2017.json')


@pytest.fixture(scope='module')
def gt_json():
    with open(_ann_path()) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def coco(gt_json):
    return pycocotools_coco(gt_json)


def _gt_detections(coco, cat_ids, image_ids, jitter=0.0, seed=0, torch_out=False):
    """Non-crowd ground truth of each image as detections (xyxy, original pixels)."""
    rng = np.random.default_rng(seed)
    label_of = {c: i for i, c in enumerate(cat_ids)}
    dets = []
    for i in image_ids:
        anns = [a for a in coco.imgToAnns[i] if not a['iscrowd']]
        b = np.array([a['bbox'] for a in anns], dtype=np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        b += rng.normal(0, jitter, b.shape) if jitter else 0
        s = rng.uniform(0.05, 1.0, len(b)) if jitter else np.ones(len(b))
        lab = np.array([label_of[a['category_id']] for a in anns], dtype=np.int64)
        if torch_out:
            dets.append({'boxes': torch.from_numpy(b).float(), 'scores': torch.from_numpy(s).float(),
                         'labels': torch.from_numpy(lab)})
        else:
            dets.append({'boxes': b, 'scores': s, 'labels': lab})
    return dets


def _pycoco(coco, results, image_ids):
    """pycocotools called directly, the documented way."""
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, 'bbox')
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_ground_truth_as_detections_scores_one(coco):
    ev = COCOEvaluator(_ann_path())
    ids = coco.getImgIds()
    ev.update(ids, _gt_detections(coco, ev.cat_ids, ids, torch_out=True))
    m = ev.compute()
    for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100', 'ARs', 'ARm', 'ARl'):
        assert m[k] == pytest.approx(1.0), k
    assert m['AR1'] < 1.0  # many images hold more than one object
    assert all(r['AP'] == pytest.approx(1.0) and r['AP50'] == pytest.approx(1.0)
               for r in m['per_class'] if r['num_gt'] > 0)
    assert m['num_images'] == len(ids)
    assert m['stats'] == [m[k] for k in STAT_NAMES]


def test_jittered_matches_pycocotools_and_per_class(coco, gt_json):
    ev = COCOEvaluator(coco)
    ids = coco.getImgIds()
    for start in range(0, len(ids), 16):  # several batches
        chunk = ids[start:start + 16]
        ev.update(chunk, _gt_detections(coco, ev.cat_ids, chunk, jitter=4.0, seed=start))
    m = ev.compute()
    res = ev.results
    assert len(res) == m['num_detections'] > 700
    assert all(set(r) == {'image_id', 'category_id', 'bbox', 'score'} for r in res)
    direct = _pycoco(coco, res, ids)
    np.testing.assert_array_equal(np.array(m['stats']), np.asarray(direct.stats))
    assert 0.2 < m['AP'] < 0.95  # the jitter really moved the numbers

    # per-class numbers from the precision array [T, R, K, A, M]
    prec = direct.eval['precision']
    kid = {c: k for k, c in enumerate(direct.params.catIds)}
    crowd_free = {}
    for a in gt_json['annotations']:
        if not a['iscrowd']:
            crowd_free[a['category_id']] = crowd_free.get(a['category_id'], 0) + 1
    valid = []
    for r in m['per_class']:
        p = prec[:, :, kid[r['category_id']], 0, 2]
        exp_ap = p[p > -1].mean() if (p > -1).any() else -1
        exp_ap50 = p[0][p[0] > -1].mean() if (p[0] > -1).any() else -1
        assert r['AP'] == pytest.approx(exp_ap, abs=1e-12)
        assert r['AP50'] == pytest.approx(exp_ap50, abs=1e-12)
        assert r['num_gt'] == crowd_free.get(r['category_id'], 0)
        if r['AP'] > -1:
            valid.append(r['AP'])
    assert np.mean(valid) == pytest.approx(m['AP'], abs=1e-12)
    names = {c['id']: c['name'] for c in gt_json['categories']}
    assert [r['name'] for r in m['per_class']] == [names[c] for c in sorted(names)]

    table = ev.format_table()
    person = next(r for r in m['per_class'] if r['name'] == 'person')
    line = next(ln for ln in table.splitlines() if ln.startswith('person '))
    assert line.split()[1:] == [f'{person["AP"]:.3f}', f'{person["AP50"]:.3f}', str(person['num_gt'])]
    assert table.splitlines()[-1].split()[1] == f'{m["AP"]:.3f}'
    summary = format_summary(m).splitlines()
    assert len(summary) == 12 and summary[1].endswith(f'= {m["AP50"]:.3f}') and 'IoU=0.50 ' in summary[1]


def test_category_id_gaps_and_result_format(coco):
    ev = COCOEvaluator(coco)
    assert ev.cat_ids[-1] == 90 and len(ev.cat_ids) == 80  # ids 1..90 with gaps -> labels 0..79
    img = coco.getImgIds()[0]
    ev.update(torch.tensor([img]), [{'boxes': torch.tensor([[10.0, 20.0, 50.0, 80.0], [0, 0, 5, 5]]),
                                     'scores': torch.tensor([0.123456789, 0.5]),
                                     'labels': torch.tensor([79, 11])}])
    r = ev.results
    assert [x['category_id'] for x in r] == [90, 13]
    assert r[0]['bbox'] == [10.0, 20.0, 40.0, 60.0] and r[0]['image_id'] == img
    assert r[0]['score'] == pytest.approx(0.12346, abs=1e-9)
    with pytest.raises(ValueError, match='0-based'):
        ev.update([img], [{'boxes': np.zeros((1, 4)), 'scores': [0.5], 'labels': [80]}])


def test_crowd_boxes_are_ignored(coco):
    ids = coco.getImgIds()
    crowd = [a for a in coco.dataset['annotations'] if a['iscrowd']]
    assert crowd, 'coco_tiny val is expected to contain crowd boxes'
    ev = COCOEvaluator(coco)
    dets = _gt_detections(coco, ev.cat_ids, ids)
    pos = {i: k for k, i in enumerate(ids)}
    label_of = {c: i for i, c in enumerate(ev.cat_ids)}
    for a in crowd:  # a detection on a crowd region is neither TP nor FP
        d = dets[pos[a['image_id']]]
        x, y, w, h = a['bbox']
        d['boxes'] = np.concatenate([d['boxes'], [[x, y, x + w, y + h]]])
        d['scores'] = np.concatenate([d['scores'], [0.99]])
        d['labels'] = np.concatenate([d['labels'], [label_of[a['category_id']]]])
    ev.update(ids, dets)
    m = ev.compute()
    assert m['AP'] == pytest.approx(1.0)
    assert m['num_detections'] == sum(len(d['scores']) for d in dets)


def test_images_without_annotations_and_without_results(tmp_path, gt_json, coco):
    data = copy.deepcopy(gt_json)
    data['images'].append({'id': 999999001, 'file_name': 'empty.jpg', 'height': 100, 'width': 100})
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps(data))
    ids = coco.getImgIds()
    half = ids[:40]

    # images passed with zero detections still count (their objects become misses)
    ev = COCOEvaluator(str(path))
    dets = _gt_detections(coco, ev.cat_ids, half)
    ev.update(ids, dets + [{'boxes': np.zeros((0, 4)), 'scores': [], 'labels': []}] * (len(ids) - 40))
    m = ev.compute()
    assert m['num_images'] == len(ids)
    direct = _pycoco(ev.coco, ev.results, ids)
    np.testing.assert_array_equal(m['stats'], direct.stats)
    assert m['AR100'] < 0.9
    # ...unlike evaluating only the images that have results
    only = COCOEvaluator(str(path))
    only.update(half, dets)
    assert only.compute()['AR100'] == pytest.approx(1.0)
    assert only.compute(image_ids=ids)['stats'] == m['stats']

    # an image without annotations: zero detections there change nothing, false positives do
    ev2 = COCOEvaluator(str(path))
    ev2.update(half + [999999001], dets + [{'boxes': np.zeros((0, 4)), 'scores': [], 'labels': []}])
    assert ev2.compute()['AP'] == pytest.approx(1.0)
    ev3 = COCOEvaluator(str(path))
    person = ev3.cat_ids.index(1)
    fp = {'boxes': np.array([[1.0, 1.0, 60.0, 60.0]]), 'scores': [1.5], 'labels': [person]}
    ev3.update(half + [999999001], dets + [fp])
    m3 = ev3.compute()
    assert m3['AP'] < 1.0
    np.testing.assert_array_equal(m3['stats'], _pycoco(ev3.coco, ev3.results, half + [999999001]).stats)


def test_zero_detections_and_empty(coco):
    ev = COCOEvaluator(coco)
    ids = coco.getImgIds()[:5]
    ev.update(ids, [{'boxes': torch.zeros(0, 4), 'scores': torch.zeros(0), 'labels': torch.zeros(0)}] * 5)
    m = ev.compute()
    assert m['num_detections'] == 0 and m['num_images'] == 5
    assert all(v in (0.0, -1.0) for v in m['stats']) and m['AP'] == 0.0
    assert any(r['num_gt'] > 0 and r['AP'] == 0.0 for r in m['per_class'])
    assert ev.results == []
    ev.reset()
    m = ev.compute()
    assert m['num_images'] == 0 and m['stats'] == [0.0] * 12
    assert 'all' in ev.format_table()


def test_duplicate_images_reset_and_objects(coco):
    class Det:  # attribute access, like a Detections object
        def __init__(self, d):
            self.boxes, self.scores, self.labels = d['boxes'], d['scores'], d['labels']

    ids = coco.getImgIds()[:6]
    ev = COCOEvaluator(coco)
    dets = _gt_detections(coco, ev.cat_ids, ids)
    ev.update(ids, [Det(d) for d in dets])
    n = len(ev.results)
    ev.update(ids[:2], dets[:2])  # a distributed sampler's padding repeats: ignored
    assert len(ev.results) == n and ev.image_ids == ids
    ev.reset()
    assert ev.results == [] and ev.image_ids == []
    ev.update([ids[0], ids[0]], dets[:1] * 2)  # repeated within one batch: first copy kept
    assert len(ev.results) == len(dets[0]['scores']) and ev.image_ids == ids[:1]
    ev.reset()
    ev.update(ids[:1], [{'rois': dets[0]['boxes'], 'scores': dets[0]['scores'],  # Yet-Another keys
                         'class_ids': dets[0]['labels']}])
    assert len(ev.results) == len(dets[0]['scores'])
    with pytest.raises(UserError, match='not in the annotations'):
        ev.update([123], [dets[0]])


def test_write_json_is_loadable(tmp_path, coco):
    ev = COCOEvaluator(coco)
    ids = coco.getImgIds()[:10]
    ev.update(ids, _gt_detections(coco, ev.cat_ids, ids, jitter=2.0))
    out = tmp_path / 'sub' / 'val_bbox_results.json'
    ev.write_json(str(out))
    assert os.listdir(out.parent) == ['val_bbox_results.json']
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco.loadRes(str(out))
    assert len(loaded.getAnnIds()) == len(ev.results)
    re = COCOEvaluator(coco)
    re.add_results(json.loads(out.read_text()))
    assert re.compute(image_ids=ids)['stats'] == ev.compute()['stats']


def test_class_names_and_cat_ids(coco, gt_json):
    names = [c['name'] for c in sorted(gt_json['categories'], key=lambda c: c['id'])]
    ids = sorted(c['id'] for c in gt_json['categories'])
    # Yet-Another's 90-entry COCO list with '' gaps -> label i is category id i + 1
    ya = [''] * 90
    for c in gt_json['categories']:
        ya[c['id'] - 1] = c['name']
    cat_ids, _ = resolve_category_ids(coco, ya)
    assert cat_ids == [i + 1 if ya[i] else None for i in range(90)]
    ev = COCOEvaluator(coco, class_names=ya)
    img = coco.getImgIds()[0]
    ev.update([img], [{'boxes': np.array([[0, 0, 9, 9], [0, 0, 9, 9]]), 'scores': [0.5, 0.4],
                       'labels': [89, 11]}])  # 89 = toothbrush (id 90); 11 is a '' gap: dropped
    assert [r['category_id'] for r in ev.results] == [90]
    assert len(ev.compute()['per_class']) == 80
    # same names, other order -> matched by name
    rev = list(reversed(names))
    assert resolve_category_ids(coco, rev)[0] == list(reversed(ids))
    # one rule, by name only: names that are not categories are an error, never matched by position
    with pytest.raises(UserError, match=r"only in obj_list: \['c0', 'c1', 'c10'.*\(\+70 more\)"):
        resolve_category_ids(coco, [f'c{i}' for i in range(80)])
    with pytest.raises(UserError, match=f"only in the annotation file: \\['{names[-1]}'\\]"):
        COCOEvaluator(coco, class_names=names[:-1])
    with pytest.raises(UserError, match='do not cover'):
        COCOEvaluator(coco, cat_ids=ids[:-1])
    with pytest.raises(UserError, match='class names but'):
        COCOEvaluator(coco, cat_ids=ids, class_names=names[:3])


@pytest.mark.parametrize('content,match', [
    (None, 'annotation file not found'),
    ('{not json', 'not a JSON file'),
    ('[1, 2]', 'not a COCO instances'),
    ('{"images": [], "annotations": []}', 'categories'),
    ('{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], '
     '"annotations": [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]}]}', 'category_id 7'),
    ('{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], '
     '"annotations": [{"image_id": 1, "category_id": 1}]}', 'bbox'),
])
def test_bad_annotation_files(tmp_path, content, match):
    path = tmp_path / 'instances_val.json'
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=match) as e:
        COCOEvaluator(str(path))
    assert str(path) in str(e.value)


def test_minimal_annotations_get_defaults(tmp_path):
    path = tmp_path / 'a.json'
    path.write_text(json.dumps({'images': [{'id': 5}], 'categories': [{'id': 3, 'name': 'x'}],
                                'annotations': [{'image_id': 5, 'category_id': 3, 'bbox': [0, 0, 10, 10]}]}))
    coco = load_coco(str(path))
    assert coco.dataset['annotations'][0]['area'] == 100 and coco.dataset['annotations'][0]['iscrowd'] == 0
    ev = COCOEvaluator(coco)
    ev.update([5], [{'boxes': [[0, 0, 10, 10]], 'scores': [0.9], 'labels': [0]}])
    assert ev.compute()['AP'] == pytest.approx(1.0)


def test_silent_unless_verbose(coco, capsys):
    ev = COCOEvaluator(coco)
    ids = coco.getImgIds()[:3]
    ev.update(ids, _gt_detections(coco, ev.cat_ids, ids))
    ev.compute()
    assert capsys.readouterr().out == ''
    COCOEvaluator(coco, verbose=True).compute(image_ids=ids)
    assert 'Accumulating' in capsys.readouterr().out


class _GTModel(torch.nn.Module):
    """Anchors placed on the ground truth of every image (network pixels, yxyx), zero regression,
    one-hot scores only on the image's own anchors: a perfect detector as long as the mapping back
    to original pixels (divide by scale, clip) is right. Images arrive in dataset order."""

    def __init__(self, anchors, cls):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.anchors, self.cls = anchors, cls
        self.seen = 0
        self.shapes = []

    def forward(self, x):
        b = x.shape[0]
        self.shapes.append(tuple(x.shape))
        cls = self.cls[self.seen:self.seen + b]
        self.seen += b
        return None, torch.zeros(b, self.anchors.shape[1], 4), cls, self.anchors


class _FakeDataset(torch.utils.data.Dataset):
    def __init__(self, coco, ids, size=256):
        self.coco, self.ids, self.size = coco, ids, size
        self.cat_ids = sorted(coco.getCatIds())
        self.obj_list = [c['name'] for c in coco.loadCats(self.cat_ids)]
        self.image_size = (size, size)
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        info = self.coco.loadImgs(self.ids[i])[0]
        scale = self.size / max(info['height'], info['width'])
        return {'img': torch.zeros(3, self.size, self.size), 'annot': torch.zeros(0, 5),
                'image_id': self.ids[i], 'scale': scale, 'orig_size': (info['height'], info['width'])}


def test_run_coco_eval_maps_boxes_back(coco):
    ids = coco.getImgIds()[:7]
    ds = _FakeDataset(coco, ids)
    label_of = {c: i for i, c in enumerate(ds.cat_ids)}
    boxes, owner, labels = [], [], []
    for k, i in enumerate(ids):
        s = ds[k]['scale']
        for a in coco.imgToAnns[i]:
            if not a['iscrowd']:
                x, y, w, h = a['bbox']
                boxes.append([y * s, x * s, (y + h) * s, (x + w) * s])
                owner.append(k)
                labels.append(label_of[a['category_id']])
    n = len(boxes)
    cls = torch.zeros(len(ids), n, 80)
    cls[torch.tensor(owner), torch.arange(n), torch.tensor(labels)] = 0.9
    model = _GTModel(torch.tensor(boxes).unsqueeze(0), cls)
    model.train()
    m, results = run_coco_eval(model, ds, batch_size=3, device='cpu', score_threshold=0.05,
                               nms_threshold=0.5, max_det=100, progress=False)
    assert model.training  # train/eval state restored
    assert model.shapes == [(3, 3, 256, 256), (3, 3, 256, 256), (1, 3, 256, 256)]
    assert m['num_images'] == len(ids) and m['num_detections'] == n
    assert m['AP'] == pytest.approx(1.0, abs=1e-6), m['stats']
    with contextlib.redirect_stdout(io.StringIO()):
        coco.loadRes(copy.deepcopy(results))
    # max_images: only the first K images are run and evaluated
    model.seen, model.shapes = 0, []
    m2, _ = run_coco_eval(model, ds, batch_size=2, max_images=3, progress=False)
    assert m2['num_images'] == 3 and model.shapes == [(2, 3, 256, 256), (1, 3, 256, 256)]
    assert m2['AP'] == pytest.approx(1.0, abs=1e-6)


def test_run_coco_eval_errors(coco):
    model = _GTModel(torch.zeros(1, 1, 4), torch.zeros(1, 1, 80))
    with pytest.raises(UserError, match='no images'):
        run_coco_eval(model, _FakeDataset(coco, []), progress=False)
    with pytest.raises(UserError, match='float16 needs --device cuda'):
        from efficientdet.runtimes.eager import half_dtype
        half_dtype('cpu', 'float16')


def test_run_coco_eval_half_on_cpu_is_bfloat16_autocast(coco):
    """--float16 / --half on a CPU: the forward runs under bfloat16 autocast, decoding in float32."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None)
            a = x.shape[0]
            return None, torch.zeros(a, 1, 4), torch.zeros(a, 1, 80), torch.tensor([[[0., 0., 10., 10.]]])

    m, _ = run_coco_eval(Probe(), _FakeDataset(coco, coco.getImgIds()[:1]), half=True, device='cpu', progress=False)
    assert seen == [torch.bfloat16] and m['num_images'] == 1
    run_coco_eval(Probe(), _FakeDataset(coco, coco.getImgIds()[:1]), device='cpu', progress=False)
    assert seen[-1] is None


def test_cleaned_training_annotations_evaluate_without_a_second_validator():
    """The dataset's cleaned json (float ids normalised, defaults filled) is what evaluation scores:
    an id written as 1.0 trains and evaluates, an unknown category is skipped and counted."""
    from efficientdet.data.dataset import index_coco
    data = {'images': [{'id': 1.0, 'file_name': 'a.jpg', 'height': 100, 'width': 100}],
            'categories': [{'id': 3, 'name': 'x'}],
            'annotations': [{'id': 1.0, 'image_id': 1.0, 'category_id': 3.0, 'bbox': [10, 10, 20, 20]},
                            {'id': 2, 'image_id': 1, 'category_id': 9, 'bbox': [0, 0, 5, 5]}]}
    index = index_coco(data, 'a.json', '', None, check_files=False)
    assert index.issues.counts['unknown_category'] == 1
    coco = coco_from_dict(index.coco_dataset, 'a.json', validate=False)
    ann = coco.dataset['annotations']
    assert len(ann) == 1 and type(ann[0]['image_id']) is int and ann[0]['area'] == 400
    ev = COCOEvaluator(coco)
    ev.update([1], [{'boxes': [[10, 10, 30, 30]], 'scores': [0.9], 'labels': [0]}])
    assert ev.compute()['AP'] == pytest.approx(1.0)
    # the same validator, strict for ground truth: an unknown category is an error there
    with pytest.raises(UserError, match='a.json: not usable as ground truth: annotations whose category'):
        coco_from_dict(data, 'a.json')
