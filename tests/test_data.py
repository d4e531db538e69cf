"""CocoDataset on coco_tiny (mapping, the COCO label map, crowd, letterbox math, collate, loader), the
user-transform hook (albumentations when installed) and the transforms."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import need_shared
from efficientdet.data import CocoDataset, DetectionTransform, collate_fn, hflip, index_coco, resize_and_crop
from efficientdet.data.dataset import build_dataloader
from efficientdet.errors import UserError

SIZE = 256
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope='module')
def tiny():
    root = need_shared('data', 'coco_tiny')
    with open(os.path.join(root, 'annotations', 'instances_val2017.json')) as f:
        gt = json.load(f)
    return root, gt


@pytest.fixture(scope='module')
def val_ds(tiny):
    return CocoDataset(tiny[0], 'val2017', None, SIZE)


def gt_by_image(gt):
    out = {}
    for a in gt['annotations']:
        out.setdefault(a['image_id'], []).append(a)
    return out


def test_category_mapping_with_gaps(tiny, val_ds):
    _, gt = tiny
    ids = sorted(c['id'] for c in gt['categories'])
    assert val_ds.cat_ids == ids and ids[-1] == 90 and len(ids) == 80  # gaps: 80 categories up to id 90
    names = {c['id']: c['name'] for c in gt['categories']}
    assert val_ds.obj_list == [names[i] for i in ids]
    # obj_list given explicitly in another order: indices follow obj_list
    rev = list(reversed(val_ds.obj_list))
    ds = CocoDataset(tiny[0], 'val2017', rev, SIZE)
    assert ds.cat_ids == list(reversed(ids))


def test_every_box_letterboxed_and_labelled(tiny, val_ds):
    _, gt = tiny
    anns = gt_by_image(gt)
    label_of = {cid: k for k, cid in enumerate(val_ds.cat_ids)}
    sizes = {im['id']: (im['height'], im['width']) for im in gt['images']}
    n_crowd = 0
    for i in range(len(val_ds)):
        s = val_ds[i]
        h, w = sizes[s['image_id']]
        assert s['orig_size'] == (h, w)
        assert s['scale'] == pytest.approx(min(SIZE / h, SIZE / w))
        ref = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3],
                         -2 if a['iscrowd'] else label_of[a['category_id']]] for a in anns[s['image_id']]],
                       np.float64)
        ref[:, :4] *= s['scale']
        nh, nw = int(h * s['scale'] + 1e-6), int(w * s['scale'] + 1e-6)  # content (unpadded) size
        ref[:, [0, 2]] = ref[:, [0, 2]].clip(0, nw)  # the truncated last pixel row/column cuts edge boxes
        ref[:, [1, 3]] = ref[:, [1, 3]].clip(0, nh)
        got = s['annot'].numpy().astype(np.float64)
        key = lambda a: np.lexsort(a.T[::-1])  # noqa: E731
        np.testing.assert_allclose(got[key(got)], ref[key(ref)], atol=1e-3)
        n_crowd += int((got[:, 4] == -2).sum())
    assert n_crowd == sum(a['iscrowd'] for a in gt['annotations']) > 0
    assert val_ds.stats['crowd'] == n_crowd


def test_image_is_normalised_letterbox_padded(val_ds):
    s = val_ds[3]
    h, w = s['orig_size']
    nh, nw = int(h * s['scale'] + 1e-6), int(w * s['scale'] + 1e-6)
    assert max(nh, nw) == SIZE
    rgb = cv2.cvtColor(cv2.imread(str(val_ds.index.paths[3])), cv2.COLOR_BGR2RGB)
    ref = (cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255 - MEAN) / STD
    img = s['img'].numpy()
    assert img.shape == (3, SIZE, SIZE) and img.dtype == np.float32
    np.testing.assert_allclose(img[:, :nh, :nw], ref.transpose(2, 0, 1), atol=1e-5)
    assert np.all(img[:, nh:, :] == 0) and np.all(img[:, :, nw:] == 0)


def test_coco_object_and_ids(tiny, val_ds):
    _, gt = tiny
    assert val_ds.image_ids == [im['id'] for im in gt['images']]
    assert len(val_ds.coco.getAnnIds()) == len(gt['annotations'])
    assert sorted(val_ds.coco.getCatIds()) == val_ds.cat_ids
    assert 'nothing skipped' in val_ds.summary() and f'{len(gt["images"])} images' in val_ds.summary()


def test_yet_another_placeholder_obj_list(tiny):
    _, gt = tiny
    names = [''] * 90
    for c in gt['categories']:
        names[c['id'] - 1] = c['name']
    ds = CocoDataset(tiny[0], 'val2017', names, SIZE)
    s = ds[0]
    cats = {a['id']: a for a in gt['annotations'] if a['image_id'] == s['image_id'] and not a['iscrowd']}
    want = sorted(a['category_id'] - 1 for a in cats.values())
    got = sorted(int(c) for c in s['annot'][:, 4] if c >= 0)
    assert got == want and ds.cat_ids[12] == 13 and ds.cat_ids[11] == -1


def test_obj_list_mismatch_names_file_and_classes(tiny):
    _, gt = tiny
    names = [c['name'] for c in gt['categories']]
    bad = names[:-1] + ['unicorn']
    with pytest.raises(UserError) as e:
        CocoDataset(tiny[0], 'val2017', bad, SIZE)
    msg = str(e.value)
    assert 'instances_val2017.json' in msg and 'unicorn' in msg and names[-1] in msg


def test_missing_layout_errors(tmp_path, tiny):
    with pytest.raises(UserError, match='not found'):
        CocoDataset(str(tmp_path / 'nope'), 'val', None, SIZE)
    with pytest.raises(UserError, match='instances_val2099.json'):
        CocoDataset(tiny[0], 'val2099', None, SIZE)


def test_collate_pads_with_minus_one(val_ds):
    items = [val_ds[i] for i in range(4)]
    counts = [len(it['annot']) for it in items]
    b = collate_fn(items)
    assert b['img'].shape == (4, 3, SIZE, SIZE) and b['annot'].shape == (4, max(counts), 5)
    for k, n in enumerate(counts):
        assert torch.equal(b['annot'][k, :n], items[k]['annot'])
        assert torch.all(b['annot'][k, n:] == -1)
    assert b['scale'].dtype == torch.float32 and b['scale'].tolist() == pytest.approx([it['scale'] for it in items])
    assert b['image_id'] == [it['image_id'] for it in items]
    empty = [dict(items[0], annot=torch.zeros(0, 5)), dict(items[1], annot=torch.zeros(0, 5))]
    e = collate_fn(empty)
    assert e['annot'].shape == (2, 1, 5) and torch.all(e['annot'] == -1)


def test_loader_seeded_shuffle_and_augment(tiny):
    ds = CocoDataset(tiny[0], 'val2017', None, 128, augment=True)
    sub = torch.utils.data.Subset(ds, range(8))

    def first(seed, workers=0, global_seed=None):
        # augmentation draws from torch's RNG: the global one in the main process, in workers one
        # seeded from the loader's generator
        torch.manual_seed(seed if global_seed is None else global_seed)
        batch = next(iter(build_dataloader(sub, 4, shuffle=True, seed=seed, num_workers=workers)))
        return batch['image_id'], batch['img'], batch['annot']

    a, b, c = first(1), first(1), first(2)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert a[0] != c[0] or not torch.equal(a[1], c[1])
    w1 = first(3, workers=1, global_seed=123)
    w2 = first(3, workers=1, global_seed=456)  # with workers only the loader's seed matters
    assert w1[0] == w2[0] and torch.equal(w1[1], w2[1]) and torch.equal(w1[2], w2[2])
    halves = [list(build_dataloader(sub, 2, shuffle=True, distributed=True, seed=0, num_replicas=2, rank=r).sampler)
              for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(8)) and len(halves[0]) == 4


def test_augmented_items_stay_consistent(tiny):
    ds = CocoDataset(tiny[0], 'val2017', None, 128, augment=True)
    torch.manual_seed(0)
    scales = set()
    for i in range(6):
        s = ds[i]
        a = s['annot']
        assert s['img'].shape == (3, 128, 128)
        if len(a):
            assert torch.all(a[:, :4] >= 0) and torch.all(a[:, :4] <= 128)
            assert torch.all(a[:, 2] > a[:, 0]) and torch.all(a[:, 3] > a[:, 1])
        scales.add(round(s['scale'], 6))
    assert len(scales) > 1  # random factors differ


# ---------------------------------------------------------------- the category rule on real COCO data

def _tiny_project(obj_list):
    """The packaged coco project pointed at coco_tiny (same obj_list unless given)."""
    import dataclasses

    from efficientdet.project import load_project
    return dataclasses.replace(load_project('coco'), project_name='coco_tiny', train_set='train2017',
                               val_set='val2017', obj_list=list(obj_list) if obj_list is not None
                               else load_project('coco').obj_list)


def test_coco_label_map_class_index_is_category_id_minus_one(tiny):
    """projects/coco.yml (90 slots, '' at the unused ids) on real COCO annotations: every box's
    class index is its category id - 1, and detections with index i are written with id i + 1."""
    from efficientdet.data import build_dataset
    from efficientdet.evaluation import COCOEvaluator, resolve_category_ids
    root, gt = tiny
    proj = _tiny_project(None)
    assert len(proj.obj_list) == 90 and proj.obj_list.count('') == 10
    ds = build_dataset(proj, 'val2017', SIZE, os.path.dirname(root))
    assert ds.cat_ids == [i + 1 if n else -1 for i, n in enumerate(proj.obj_list)]
    anns = gt_by_image(gt)
    dets = []
    for k, iid in enumerate(ds.image_ids):
        boxes, labels = ds.annotations(k)
        src = anns.get(iid, [])
        want = sorted(-2 if a['iscrowd'] else a['category_id'] - 1 for a in src)
        assert sorted(labels.tolist()) == want
        real = [a for a in src if not a['iscrowd']]
        dets.append({'boxes': [[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                               for a in real], 'scores': [1.0] * len(real),
                     'labels': [a['category_id'] - 1 for a in real]})
    # the evaluator's rule is the dataset's: by name, '' matching nothing
    assert resolve_category_ids(ds.coco, proj.obj_list)[0] == [c if c > 0 else None for c in ds.cat_ids]
    ev = COCOEvaluator(ds.coco, class_names=proj.obj_list)
    ev.update(ds.image_ids, dets)
    assert sorted(r['category_id'] for r in ev.results) == sorted(
        a['category_id'] for a in gt['annotations'] if not a['iscrowd'])
    assert ev.compute()['AP'] == pytest.approx(1.0)
    # the 80 names alone: an 80-class head, indices in id order
    names80 = [n for n in proj.obj_list if n]
    ds80 = build_dataset(_tiny_project(names80), 'val2017', SIZE, os.path.dirname(root))
    assert ds80.num_classes == 80 and ds80.cat_ids == sorted(c['id'] for c in gt['categories'])


def test_check_accepts_the_placeholder_label_map(tiny, tmp_path, capsys):
    from efficientdet.data.check import main as check_main
    root, _ = tiny
    obj = _tiny_project(None).obj_list
    yml = tmp_path / 'tiny.yml'
    yml.write_text(f'project_name: coco_tiny\ntrain_set: train2017\nval_set: val2017\nobj_list: {json.dumps(obj)}\n')
    rc = check_main(['-p', str(yml), '--data_path', os.path.dirname(root), '--no_images', '--image_size', '256'])
    out = capsys.readouterr().out
    assert rc == 0 and 'result: clean' in out and '90 classes' in out and 'anchor fit at 256x256' in out


# ---------------------------------------------------------------- user transform hook

def _vflip(image, boxes, labels):
    """A user transform: upside down (image [H, W, 3], boxes xyxy pixels)."""
    h = image.shape[0]
    b = boxes.copy()
    b[:, 1], b[:, 3] = h - boxes[:, 3], h - boxes[:, 1]
    return image[::-1].copy(), b, labels


def test_user_transform_replaces_or_precedes_the_official_augmentation(tiny):
    root = tiny[0]
    plain = CocoDataset(root, 'val2017', None, SIZE)
    user = CocoDataset(root, 'val2017', None, SIZE, transform=_vflip)
    for i in (0, 5):
        a, b = plain[i], user[i]
        img = plain.load_image(i)
        boxes, labels = plain.annotations(i)
        fimg, fboxes, flabels = _vflip(img, boxes, labels)
        content, rb, rl, scale = plain.transform(fimg, fboxes, flabels)
        assert torch.equal(b['img'], plain.normalize_pad(content)) and b['scale'] == a['scale'] == scale
        np.testing.assert_allclose(b['annot'].numpy(), np.concatenate([rb, rl[:, None]], 1), atol=1e-5)
        assert (b['annot'][:, 4] == -2).sum() == (a['annot'][:, 4] == -2).sum()  # crowd labels carried
    seen = []

    def spy(image, boxes, labels):
        seen.append((image.shape, boxes.copy(), labels.copy()))
        return image, boxes, labels

    aug = CocoDataset(root, 'val2017', None, 128, augment=True, transform=spy)
    torch.manual_seed(0)
    item = aug[2]
    boxes, labels = aug.annotations(2)
    assert seen[0][0] == aug.load_image(2).shape and np.array_equal(seen[0][1], boxes)  # the original first
    assert item['img'].shape == (3, 128, 128) and 'transform=' in repr(aug)


def test_bad_user_transforms_are_named(tiny):
    def wrong(image, boxes, labels):
        return image, boxes

    def mismatched(image, boxes, labels):
        return image, boxes, labels[:0]

    for fn, match in ((wrong, 'wrong must return'), (mismatched, 'mismatched returned')):
        ds = CocoDataset(tiny[0], 'val2017', None, SIZE, transform=fn)
        with pytest.raises(TypeError, match=match):
            ds[0]
    with pytest.raises(TypeError, match='callable'):
        CocoDataset(tiny[0], 'val2017', None, SIZE, transform='flip')


def test_albumentations_compose_through_the_hook(tiny):
    A = pytest.importorskip('albumentations')
    from efficientdet.data import albumentations_transform
    compose = A.Compose([A.HorizontalFlip(p=1.0)],
                        bbox_params=A.BboxParams(format='pascal_voc', label_fields=['labels']))
    root = tiny[0]
    ds = CocoDataset(root, 'val2017', None, SIZE, transform=albumentations_transform(compose))
    plain = CocoDataset(root, 'val2017', None, SIZE)
    for i in (0, 3):
        img = plain.load_image(i)
        boxes, labels = plain.annotations(i)
        fimg, fboxes = hflip(img, boxes)
        content, rb, rl, _ = plain.transform(fimg, fboxes, labels)
        item = ds[i]
        assert torch.equal(item['img'], plain.normalize_pad(content))
        key = lambda t: t[np.lexsort(t.T[::-1])]  # noqa: E731
        np.testing.assert_allclose(key(item['annot'].numpy()), key(np.concatenate([rb, rl[:, None]], 1)),
                                   atol=1e-3)
    import pickle
    assert pickle.dumps(ds)  # data-loader workers started with spawn get the dataset and its transform pickled
    with pytest.raises(ValueError, match='pascal_voc'):
        albumentations_transform(A.Compose([A.HorizontalFlip(p=0.0)],
                                           bbox_params=A.BboxParams(format='coco', label_fields=['labels'])))


# ---------------------------------------------------------------- transforms

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], np.int32)


def colour_boxes_image(rng, h, w):
    """Black image with up to 6 filled, separated boxes of distinct colours (grid cells)."""
    img = np.zeros((h, w, 3), np.uint8)
    boxes = []
    cells = [(r, c) for r in range(2) for c in range(3)]
    for k, (r, c) in enumerate(cells):
        y0, y1 = r * h // 2, (r + 1) * h // 2
        x0, x1 = c * w // 3, (c + 1) * w // 3
        if y1 - y0 < 6 or x1 - x0 < 6:
            continue
        bx0 = int(rng.integers(x0, x1 - 4)) if c else 0  # first column touches the left edge
        by0 = int(rng.integers(y0, y1 - 4))
        bx1 = int(rng.integers(bx0 + 3, x1 - 1)) if c < 2 else w  # last column touches the right edge
        by1 = int(rng.integers(by0 + 3, y1 - 1))
        img[by0:by1, bx0:bx1] = COLOURS[k]
        boxes.append([bx0, by0, bx1, by1, k])
    b = np.array(boxes, np.float32).reshape(-1, 5)
    return img, b[:, :4], b[:, 4]


def assert_boxes_cover_colours(content, boxes, classes, tol=1.6):
    for k in range(len(COLOURS)):
        mask = np.abs(content.astype(np.int32) - COLOURS[k]).sum(-1) < 40
        rows = np.flatnonzero(classes == k)
        if not len(rows):
            assert not mask.any(), f'colour {k} visible but its box was dropped'
            continue
        x1, y1, x2, y2 = boxes[rows[0]]
        ys, xs = np.nonzero(mask)
        if (x2 - x1) >= 3 and (y2 - y1) >= 3:
            assert len(xs), f'box {k} {boxes[rows[0]]} has no pixels of its colour'
            got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            np.testing.assert_allclose(got, [x1, y1, x2, y2], atol=tol, err_msg=f'colour {k}')
        elif len(xs):  # tiny box: its colour must at least stay inside it
            assert xs.min() >= x1 - tol and xs.max() + 1 <= x2 + tol
            assert ys.min() >= y1 - tol and ys.max() + 1 <= y2 + tol


@pytest.mark.parametrize('seed', range(12))
def test_jitter_and_flip_keep_boxes_on_their_pixels(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(60, 300)), int(rng.integers(60, 300))
    img, boxes, classes = colour_boxes_image(rng, h, w)
    t = DetectionTransform(128, augment=True, scale_range=(0.3, 2.0), flip_prob=0.5)
    content, b, c, scale = t(img, boxes, classes, rng)
    assert content.shape[0] <= 128 and content.shape[1] <= 128 and content.dtype == np.uint8
    assert np.all(b[:, [0, 2]] <= content.shape[1]) and np.all(b[:, [1, 3]] <= content.shape[0]) and np.all(b >= 0)
    assert_boxes_cover_colours(content, b, c)


def test_flip_maps_pixels_and_boxes():
    rng = np.random.default_rng(5)
    img, boxes, classes = colour_boxes_image(rng, 90, 150)
    f, fb = hflip(img, boxes)
    assert_boxes_cover_colours(f, fb, classes, tol=0.0)
    ff, ffb = hflip(f, fb)
    assert np.array_equal(ff, img) and np.allclose(ffb, boxes)


def test_validation_is_pure_letterbox():
    rng = np.random.default_rng(0)
    img, boxes, classes = colour_boxes_image(rng, 120, 200)
    t = DetectionTransform((128, 160), augment=False)
    content, b, c, scale = t(img, boxes, classes, rng)
    assert scale == pytest.approx(min(128 / 120, 160 / 200)) and content.shape[:2] == (120 * 0.8, 160)
    np.testing.assert_allclose(b, boxes * scale, atol=1e-4)
    assert np.array_equal(c, classes)
    assert_boxes_cover_colours(content, b, c)


def test_official_crop_offset_and_box_cut():
    # 100x100 image scaled x2 (factor 2 on output 100) then the bottom-right 100x100 window
    img = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[10, 10, 30, 30], [40, 40, 70, 90], [90, 0, 100, 100]], np.float32)
    content, b, c, scale = resize_and_crop(img, boxes, np.arange(3), 100, scale_factor=2.0, offset=(1.0, 1.0))
    assert scale == 2.0 and content.shape == (100, 100, 3)
    assert c.tolist() == [1, 2]  # the first box falls outside the crop and is dropped
    np.testing.assert_allclose(b, [[0, 0, 40, 80], [80, 0, 100, 100]])


box_coord = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(1, 300), w=st.integers(1, 300), out=st.integers(8, 96), augment=st.booleans(),
       boxes=st.lists(st.tuples(box_coord, box_coord, box_coord, box_coord), max_size=12),
       seed=st.integers(0, 2 ** 32 - 1))
def test_transform_property(h, w, out, augment, boxes, seed):
    img = np.full((h, w, 3), 7, np.uint8)
    b = np.array(boxes, np.float32).reshape(-1, 4)
    cls = np.arange(len(b), dtype=np.float32)
    content, ob, oc, scale = DetectionTransform(out, augment=augment)(img, b, cls, np.random.default_rng(seed))
    ch, cw = content.shape[:2]
    assert 1 <= ch <= out and 1 <= cw <= out and content.shape[2] == 3 and scale > 0
    assert ob.shape == (len(oc), 4) and len(oc) <= len(b) and ob.dtype == np.float32
    assert np.all(ob[:, [0, 2]] >= 0) and np.all(ob[:, [0, 2]] <= cw)
    assert np.all(ob[:, [1, 3]] >= 0) and np.all(ob[:, [1, 3]] <= ch)
    assert np.all(ob[:, 2] > ob[:, 0]) and np.all(ob[:, 3] > ob[:, 1])
    assert len(set(oc.tolist())) == len(oc)  # classes travel with their boxes, none duplicated
    if not augment:
        assert max(ch, cw) == out and scale == pytest.approx(min(out / h, out / w))


# ---------------------------------------------------------------- annotation parsing

junk = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True),
                 st.integers(-5, 5), st.lists(st.integers(0, 3), max_size=5))
num = st.one_of(st.floats(min_value=-1e7, max_value=1e7), st.integers(-50, 300), st.just(float('nan')),
                st.just(float('inf')))
ann_st = st.one_of(junk, st.fixed_dictionaries(
    {'id': st.one_of(st.integers(1, 30), junk), 'image_id': st.one_of(st.integers(1, 4), st.integers(90, 99), junk),
     'category_id': st.one_of(st.sampled_from([1, 5, 90]), st.integers(0, 100), junk),
     'bbox': st.one_of(st.lists(num, min_size=4, max_size=4), st.lists(num, max_size=6), junk)},
    optional={'iscrowd': st.sampled_from([0, 1]), 'area': st.floats(0, 100)}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anns=st.lists(ann_st, max_size=25), sizes=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 400)),
                                                          min_size=4, max_size=4))
def test_annotation_parsing_property(anns, sizes):
    data = dict(images=[dict(id=i + 1, file_name=f'{i}.jpg', height=h, width=w) for i, (h, w) in enumerate(sizes)],
                annotations=anns, categories=[dict(id=1, name='a'), dict(id=5, name='b'), dict(id=90, name='c')])
    idx = index_coco(data, 'ann.json', '/nonexistent', ['c', 'a', 'b'], check_files=False)
    c = idx.issues.counts
    accounted = (len(idx.labels) + c['annotation_missing_fields'] + c['duplicate_annotation_id'] + c['unknown_image']
                 + c['unknown_category'] + c['bad_box'])
    assert accounted == len(anns)  # every annotation is either kept or counted exactly once
    assert idx.ranges[-1, 1] == len(idx.labels) and np.all(np.diff(idx.ranges.ravel()) >= 0)
    for k, (h, w) in enumerate(sizes):
        s, e = idx.ranges[k]
        b = idx.boxes[s:e]
        assert np.all(b >= 0) and np.all(b[:, [0, 2]] <= w) and np.all(b[:, [1, 3]] <= h)
        assert np.all(b[:, 2] - b[:, 0] > 1) and np.all(b[:, 3] - b[:, 1] > 1)
    assert set(idx.labels.tolist()) <= {0, 1, 2, -2}
    assert idx.cat_ids == [90, 1, 5]
    assert c['image_without_annotations'] == int(np.sum(idx.ranges[:, 1] == idx.ranges[:, 0]))


img_st = st.one_of(junk, st.fixed_dictionaries(
    {'id': st.one_of(st.integers(1, 6), junk), 'file_name': st.one_of(st.just('a.jpg'), junk),
     'height': st.one_of(st.integers(-2, 300), junk), 'width': st.one_of(st.integers(-2, 300), junk)}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=st.lists(img_st, max_size=8), anns=st.lists(ann_st, max_size=12))
def test_junk_images_never_crash(images, anns):
    data = dict(images=images, annotations=anns, categories=[dict(id=1, name='a'), dict(id=5, name='b')])
    idx = index_coco(data, 'ann.json', '/nonexistent', None, check_files=False)
    assert len(idx.image_ids) == len(set(idx.image_ids.tolist())) == len(idx.ranges)
    assert len(idx.image_ids) + idx.issues.counts['image_missing_fields'] + idx.issues.counts['duplicate_image_id'] \
        == len(images)
    assert len(idx.coco_dataset['annotations']) >= len(idx.labels)
