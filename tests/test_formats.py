"""Pascal VOC and YOLO folders: coco_tiny rendered in both layouts converts back to its own
annotations, is checked (malformed files reported with file and line), trains and evaluates."""
import json
import os
import xml.sax.saxutils as su

import numpy as np
import pytest

from conftest import COCO_TINY, need_shared
from efficientdet.data import CocoDataset, build_dataset, load_split
from efficientdet.data.check import main as check_main
from efficientdet.data.convert import main as convert_main
from efficientdet.errors import UserError
from efficientdet.project import load_project

SIZE = 256


def coco90_obj_list():
    """The packaged 90-slot COCO label map ('' at the unused ids)."""
    return load_project('coco').obj_list


def tiny_gt(split='val2017'):
    with open(os.path.join(need_shared('data', 'coco_tiny'), 'annotations', f'instances_{split}.json')) as f:
        return json.load(f)


def _link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):  # VOC splits share JPEGImages
        return
    try:
        os.symlink(src, dst)
    except OSError:
        import shutil
        shutil.copy(src, dst)


def by_image(gt):
    out = {im['id']: [] for im in gt['images']}
    for a in gt['annotations']:
        out[a['image_id']].append(a)
    return out


def render_voc(gt, src_dir, root, split, images=None, order=None):
    """Write ``gt`` (COCO) as a VOCdevkit folder: float 1-based coordinates, crowd = difficult.
    ``order``: the ImageSets list order (default: json order)."""
    names = {c['id']: c['name'] for c in gt['categories']}
    anns = by_image(gt)
    imgs = images if images is not None else gt['images']
    for im in imgs:
        stem = os.path.splitext(im['file_name'])[0]
        _link(os.path.join(src_dir, im['file_name']), os.path.join(root, 'JPEGImages', im['file_name']))
        objs = []
        for a in anns[im['id']]:
            x, y, w, h = a['bbox']
            objs.append(f'  <object>\n    <name>{su.escape(names[a["category_id"]])}</name>\n'
                        f'    <difficult>{int(a["iscrowd"])}</difficult>\n    <bndbox>\n'
                        f'      <xmin>{x + 1!r}</xmin><ymin>{y + 1!r}</ymin><xmax>{x + w!r}</xmax>'
                        f'<ymax>{y + h!r}</ymax>\n    </bndbox>\n  </object>\n')
        xml = (f'<annotation>\n  <folder>VOC</folder>\n  <filename>{im["file_name"]}</filename>\n'
               f'  <size><width>{im["width"]}</width><height>{im["height"]}</height><depth>3</depth></size>\n'
               + ''.join(objs) + '</annotation>\n')
        os.makedirs(os.path.join(root, 'Annotations'), exist_ok=True)
        with open(os.path.join(root, 'Annotations', stem + '.xml'), 'w') as f:
            f.write(xml)
    os.makedirs(os.path.join(root, 'ImageSets', 'Main'), exist_ok=True)
    stems = [os.path.splitext(im['file_name'])[0] for im in (order if order is not None else imgs)]
    with open(os.path.join(root, 'ImageSets', 'Main', f'{split}.txt'), 'w') as f:
        f.write('\n'.join(stems) + '\n')


def render_yolo(gt, src_dir, root, split, obj_list, images=None):
    """Write ``gt`` as an ultralytics folder (crowd boxes have no YOLO form: left out; an image
    without boxes gets no label file)."""
    index_of = {n: i for i, n in enumerate(obj_list) if n}
    names = {c['id']: c['name'] for c in gt['categories']}
    anns = by_image(gt)
    os.makedirs(os.path.join(root, 'labels', split), exist_ok=True)
    for im in (images if images is not None else gt['images']):
        _link(os.path.join(src_dir, im['file_name']), os.path.join(root, 'images', split, im['file_name']))
        lines = []
        for a in anns[im['id']]:
            if a['iscrowd']:
                continue
            x, y, w, h = a['bbox']
            W, H = im['width'], im['height']
            lines.append(f'{index_of[names[a["category_id"]]]} {(x + w / 2) / W:.12f} {(y + h / 2) / H:.12f} '
                         f'{w / W:.12f} {h / H:.12f}')
        if lines:
            with open(os.path.join(root, 'labels', split, os.path.splitext(im['file_name'])[0] + '.txt'), 'w') as f:
                f.write('\n'.join(lines) + '\n')


def write_project(dirpath, name, fmt, obj_list, train='train', val='val'):
    path = os.path.join(dirpath, f'{name}.yml')
    with open(path, 'w') as f:
        f.write(f'project_name: {name}\ntrain_set: {train}\nval_set: {val}\ndataset_format: {fmt}\n'
                f'obj_list: {json.dumps(obj_list)}\n')
    return path


def ann_key(a, nd=4):
    return (a['category_id'], int(a.get('iscrowd', 0)), *[round(float(v), nd) for v in a['bbox']])


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
    """coco_tiny val2017 as VOC (ImageSets in reverse json order) and YOLO, 90-slot obj_list."""
    gt = tiny_gt()
    base = tmp_path_factory.mktemp('formats')
    src = os.path.join(COCO_TINY, 'val2017')
    obj = coco90_obj_list()
    render_voc(gt, src, str(base / 'data' / 'voctiny'), 'val', order=list(reversed(gt['images'])))
    render_yolo(gt, src, str(base / 'data' / 'yolotiny'), 'val', obj)
    (base / 'projects').mkdir()
    write_project(str(base / 'projects'), 'voctiny', 'voc', obj, train='val')
    write_project(str(base / 'projects'), 'yolotiny', 'yolo', obj, train='val')
    return base, gt


def _convert(base, fmt, name, out):
    rc = convert_main([fmt, '-p', name, '--split', 'val', '-o', str(out), '--data_path', str(base / 'data'),
                       '--projects_dir', str(base / 'projects')])
    return rc, json.loads(out.read_text())


def test_voc_convert_reproduces_the_source(rendered, tmp_path):
    base, gt = rendered
    rc, conv = _convert(base, 'voc', 'voctiny', tmp_path / 'voc.json')
    assert rc == 0
    # image ids 1..N in the ImageSets order (here the reverse of the json's)
    assert [im['file_name'] for im in conv['images']] == [im['file_name'] for im in reversed(gt['images'])]
    assert [im['id'] for im in conv['images']] == list(range(1, len(gt['images']) + 1))
    # the 90-slot obj_list gives the real COCO category ids and names
    assert sorted((c['id'], c['name']) for c in conv['categories']) == sorted(
        (c['id'], c['name']) for c in gt['categories'])
    src = {im['file_name']: im for im in gt['images']}
    src_anns, conv_anns = by_image(gt), by_image(conv)
    for im in conv['images']:
        s = src[im['file_name']]
        assert (im['height'], im['width']) == (s['height'], s['width'])
        assert sorted(ann_key(a) for a in conv_anns[im['id']]) == sorted(ann_key(a) for a in src_anns[s['id']])
    assert sum(a['iscrowd'] for a in conv['annotations']) == sum(a['iscrowd'] for a in gt['annotations']) > 0


def test_yolo_convert_reproduces_the_source(rendered, tmp_path):
    base, gt = rendered
    rc, conv = _convert(base, 'yolo', 'yolotiny', tmp_path / 'yolo.json')
    assert rc == 0
    files = sorted(im['file_name'] for im in gt['images'])
    assert [im['file_name'] for im in conv['images']] == files  # sorted names, ids 1..N
    assert [im['id'] for im in conv['images']] == list(range(1, len(files) + 1))
    src = {im['file_name']: im for im in gt['images']}
    src_anns, conv_anns = by_image(gt), by_image(conv)
    for im in conv['images']:
        want = sorted(ann_key(a, 3) for a in src_anns[src[im['file_name']]['id']] if not a['iscrowd'])
        assert sorted(ann_key(a, 3) for a in conv_anns[im['id']]) == want


def test_eighty_name_obj_list_gives_contiguous_ids(rendered, tmp_path):
    base, gt = rendered
    names = [c['name'] for c in sorted(gt['categories'], key=lambda c: c['id'])]
    write_project(str(tmp_path), 'voctiny', 'voc', names)
    rc = convert_main(['voc', '-p', str(tmp_path / 'voctiny.yml'), '-o', str(tmp_path / 'c.json'),
                       '--data_path', str(base / 'data')])
    conv = json.loads((tmp_path / 'c.json').read_text())
    assert rc == 0 and [c['id'] for c in conv['categories']] == list(range(1, 81))
    rank = {c['id']: k + 1 for k, c in enumerate(sorted(gt['categories'], key=lambda c: c['id']))}
    assert sorted(a['category_id'] for a in conv['annotations']) == sorted(
        rank[a['category_id']] for a in gt['annotations'])


@pytest.mark.parametrize('name', ['voctiny', 'yolotiny'])
def test_dataset_items_match_coco_format(rendered, name):
    """The same images through the VOC / YOLO readers give the same network inputs and targets as
    through the COCO json (YOLO: without the crowd boxes it cannot express)."""
    base, gt = rendered
    proj = load_project(name, str(base / 'projects'))
    ds = build_dataset(proj, 'val', SIZE, str(base / 'data'))
    ref = CocoDataset(COCO_TINY, 'val2017', proj.obj_list, SIZE)
    ref_of = {os.path.basename(p): k for k, p in enumerate(ref.index.paths)}
    assert len(ds) == len(ref) == len(gt['images'])
    for k in range(0, len(ds), 9):
        a = ds[k]
        b = ref[ref_of[os.path.basename(ds.index.paths[k])]]
        assert a['orig_size'] == b['orig_size'] and a['scale'] == b['scale']
        assert np.array_equal(a['img'].numpy(), b['img'].numpy())
        want = b['annot'].numpy()
        if name == 'yolotiny':
            want = want[want[:, 4] != -2]
        key = lambda t: t[np.lexsort(t.T[::-1])]  # noqa: E731
        np.testing.assert_allclose(key(a['annot'].numpy()), key(want), atol=1e-3)


def test_malformed_files_reported_with_file_and_line(tmp_path, capsys):
    """Bad XML, an object without bndbox, an unknown name, a box outside the image (VOC); a line
    with 4 numbers, a class outside obj_list, a box outside the image, a label without image (YOLO)."""
    gt = tiny_gt()
    src = os.path.join(COCO_TINY, 'val2017')
    imgs = gt['images'][:6]
    data = tmp_path / 'data'
    obj = coco90_obj_list()
    for split in ('train', 'val'):
        render_voc(gt, src, str(data / 'vocbad'), split, images=imgs)
        render_yolo(gt, src, str(data / 'yolobad'), split, obj, images=imgs)
    write_project(str(tmp_path), 'vocbad', 'voc', obj)
    write_project(str(tmp_path), 'yolobad', 'yolo', obj)
    stems = [os.path.splitext(im['file_name'])[0] for im in imgs]
    ann = data / 'vocbad' / 'Annotations'
    (ann / f'{stems[0]}.xml').write_text('<annotation><size><width>10</width></annotation>')
    x1 = (ann / f'{stems[1]}.xml').read_text().split('\n')
    obj_lines = [i for i, line in enumerate(x1) if line.strip() == '<object>']
    x1[obj_lines[0] + 1] = '    <name>unicorn</name>'
    (ann / f'{stems[1]}.xml').write_text('\n'.join(x1))
    x2 = (ann / f'{stems[2]}.xml').read_text()
    x2 = x2.replace('<bndbox>', '<box>', 1).replace('</bndbox>', '</box>', 1)
    (ann / f'{stems[2]}.xml').write_text(x2)
    x3 = (ann / f'{stems[3]}.xml').read_text().replace('</annotation>', (
        '  <object>\n    <name>person</name>\n    <bndbox><xmin>5000</xmin><ymin>5000</ymin><xmax>5100</xmax>'
        '<ymax>5100</ymax></bndbox>\n  </object>\n</annotation>'))
    (ann / f'{stems[3]}.xml').write_text(x3)
    labels = data / 'yolobad' / 'labels' / 'train'
    files = sorted(os.listdir(labels))
    lines_before = {f: len((labels / f).read_text().split()) // 5 for f in files}
    (labels / files[0]).write_text('0 0.5 0.5 0.2\n')
    (labels / files[1]).write_text((labels / files[1]).read_text() + '200 0.5 0.5 0.1 0.1\n')
    (labels / files[2]).write_text('0 1.5 1.5 0.2 0.2\n')
    (labels / 'ghost.txt').write_text('0 0.5 0.5 0.1 0.1\n')

    common = ['--data_path', str(data), '--projects_dir', str(tmp_path), '--no_anchors', '--examples', '5']
    assert check_main(['-p', 'vocbad', *common]) == 1
    out = capsys.readouterr().out
    n_obj3 = x3.count('<object>')
    assert f'{ann / stems[0]}.xml:1: bad XML' in out
    assert f"{ann / stems[1]}.xml:{obj_lines[0] + 1}: name 'unicorn' is not in obj_list" in out
    assert f'{ann / stems[2]}.xml:' in out and 'object without a name or a numeric bndbox' in out
    assert f'{ann / stems[3]}.xml:{x3.count(chr(10), 0, x3.rindex("<object>")) + 1}: bbox' in out
    assert 'outside the image' in out and n_obj3 >= 1
    assert check_main(['-p', 'yolobad', *common]) == 1
    out = capsys.readouterr().out
    assert f'{labels / files[0]}:1: \'0 0.5 0.5 0.2\' is not "class cx cy w h"' in out
    n1 = len((labels / files[1]).read_text().strip().split('\n'))
    assert f'{labels / files[1]}:{n1}: class 200 is not a class of obj_list' in out
    assert f'{labels / files[2]}:1: bbox' in out and 'outside the image' in out
    assert f'{labels / "ghost.txt"}: no image ghost.*' in out

    # training skips exactly those entries (and keeps the rest)
    proj = load_project('yolobad', str(tmp_path))
    ds = build_dataset(proj, 'train', SIZE, str(data))
    st = ds.stats
    assert (st['malformed_label'], st['unknown_category'], st['bad_box'], st['label_without_image']) == (1, 1, 1, 1)
    assert len(ds) == len(imgs)
    # every box of the source but those of the two rewritten files (the bad box dropped, not clipped)
    assert st['boxes'] == sum(lines_before.values()) - lines_before[files[0]] - lines_before[files[2]]
    vproj = load_project('vocbad', str(tmp_path))
    vds = build_dataset(vproj, 'train', SIZE, str(data))
    assert len(vds) == len(imgs) - 1 and vds.stats['malformed_file'] == 1
    # the converter writes exactly what training reads, and what it reports left out is not in the json
    out_json = tmp_path / 'yolobad_train.json'
    assert convert_main(['yolo', '-p', 'yolobad', '--split', 'train', '-o', str(out_json), '--data_path', str(data),
                         '--projects_dir', str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    conv = json.loads(out_json.read_text())
    assert 'bad_box=1' in printed and f'{len(conv["annotations"])} annotations' in printed
    assert len(conv['annotations']) == st['boxes']


def test_layout_errors_name_the_expected_paths(tmp_path):
    obj = ['a', 'b']
    (tmp_path / 'data' / 'v').mkdir(parents=True)
    write_project(str(tmp_path), 'v', 'voc', obj)
    with pytest.raises(UserError, match=r'ImageSets/Main/val\.txt not found'):
        build_dataset(load_project('v', str(tmp_path)), 'val', SIZE, str(tmp_path / 'data'))
    (tmp_path / 'data' / 'y' / 'images' / 'val').mkdir(parents=True)
    write_project(str(tmp_path), 'y', 'yolo', obj)
    with pytest.raises(UserError, match=r'labels/val not found'):
        build_dataset(load_project('y', str(tmp_path)), 'val', SIZE, str(tmp_path / 'data'))
    (tmp_path / 'bad.yml').write_text('project_name: x\ntrain_set: a\nval_set: b\nobj_list: [a]\n'
                                      'dataset_format: pascal\n')
    with pytest.raises(UserError, match="dataset_format' must be one of coco, voc, yolo"):  # the registry's names
        load_project(str(tmp_path / 'bad.yml'))


def test_results_file_scores_the_same_in_every_format(rendered, tmp_path):
    """coco_eval.py --results: the same detections, written with each format's converted ids, give
    the COCO numbers (VOC keeps difficult = crowd, so the COCO ground truth boxes)."""
    import coco_eval
    from efficientdet.evaluation import COCOEvaluator
    base, gt = rendered
    rng = np.random.default_rng(0)
    res = [{'image_id': a['image_id'], 'category_id': a['category_id'], 'score': float(rng.random()),
            'bbox': [float(v) + float(rng.normal(0, 2)) for v in a['bbox']]}
           for a in gt['annotations'] if not a['iscrowd'] and rng.random() < 0.8]
    src_file = {im['id']: im['file_name'] for im in gt['images']}
    metrics = {}
    for fmt, name in (('coco', None), ('voc', 'voctiny'), ('yolo', 'yolotiny')):
        if fmt == 'coco':
            args = ['-p', write_project(str(tmp_path), 'coco_tiny', 'coco', coco90_obj_list(), 'train2017',
                                        'val2017'), '--data_path', os.path.dirname(COCO_TINY)]
            rows = res
        else:
            _, conv = _convert(base, fmt, name, tmp_path / f'{fmt}.json')
            new_id = {im['file_name']: im['id'] for im in conv['images']}
            rows = [dict(r, image_id=new_id[src_file[r['image_id']]]) for r in res]
            args = ['-p', name, '--projects_dir', str(base / 'projects'), '--data_path', str(base / 'data')]
        path = tmp_path / f'{fmt}_results.json'
        path.write_text(json.dumps(rows))
        assert coco_eval.main([*args, '--results', str(path), '--output_dir', str(tmp_path)]) == 0
        if fmt == 'coco':
            ev = COCOEvaluator(build_dataset(load_project(args[1]), 'val2017', SIZE, args[3]).coco)
        else:
            ev = COCOEvaluator(build_dataset(load_project(name, str(base / 'projects')), 'val', SIZE,
                                             str(base / 'data')).coco)
        ev.add_results(rows)
        metrics[fmt] = ev.compute(image_ids=ev.coco.getImgIds())['stats']
    # all-area numbers agree exactly; the size buckets use "area", which COCO takes from the masks
    # and a box-only format from the box
    every = [0, 1, 2, 6, 7, 8]
    assert [metrics['voc'][i] for i in every] == pytest.approx([metrics['coco'][i] for i in every], abs=1e-9)
    assert metrics['yolo'][0] > 0.5  # no crowd regions in YOLO: close to, not equal to, COCO's


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['voc', 'yolo'])
def test_train_and_evaluate_a_folder(fmt, tmp_path, capsys):
    """A tiny train.py run (1 epoch, 4 images, 256 px, validation with mAP) and coco_eval.py on the
    checkpoint, on a VOC / YOLO folder."""
    import coco_eval
    import train
    gt = tiny_gt()
    src = os.path.join(COCO_TINY, 'val2017')
    names = [c['name'] for c in sorted(gt['categories'], key=lambda c: c['id'])]
    data = tmp_path / 'data'
    for split, imgs in (('train', gt['images'][:4]), ('val', gt['images'][4:6])):
        if fmt == 'voc':
            render_voc(gt, src, str(data / 'p'), split, images=imgs)
        else:
            render_yolo(gt, src, str(data / 'p'), split, names, images=imgs)
    write_project(str(tmp_path), 'p', fmt, names)
    common = ['-p', 'p', '--projects_dir', str(tmp_path), '--data_path', str(data), '-c', '0',
              '--image_size', str(SIZE), '--batch_size', '2']
    assert train.main([*common, '-n', '0', '--num_epochs', '1', '--saved_path', str(tmp_path / 'out'),
                       '--log_path', str(tmp_path / 'logs'), '--save_interval', '0', '--lr', '0.01',
                       '--warmup_epochs', '0.5']) == 0
    weights = tmp_path / 'out' / 'p' / 'best.pth'
    assert weights.is_file()
    capsys.readouterr()
    assert coco_eval.main([*common, '-w', str(weights), '--device', 'cpu', '--no_progress',
                           '--output_dir', str(tmp_path / 'res')]) == 0
    out = capsys.readouterr().out
    assert 'val: 2 images' in out and 'Average Precision' in out
    res = json.loads((tmp_path / 'res' / 'p_val_bbox_results.json').read_text())
    assert {r['image_id'] for r in res} <= {1, 2} and {r['category_id'] for r in res} <= set(range(1, 81))
    assert check_main(['-p', 'p', '--projects_dir', str(tmp_path), '--data_path', str(data),
                       '--image_size', str(SIZE)]) == 0
    out = capsys.readouterr().out
    assert 'anchor fit at 256x256' in out and 'result: clean' in out


def test_voc_ground_truth_without_images(rendered, tmp_path):
    """Scoring a results file needs no images for VOC (sizes are in the XML): every listed image counts."""
    import shutil
    base, gt = rendered
    root = tmp_path / 'voctiny'
    for sub in ('Annotations', 'ImageSets'):
        shutil.copytree(base / 'data' / 'voctiny' / sub, root / sub)
    with pytest.raises(UserError, match='JPEGImages not found'):
        load_split(str(root), 'val', coco90_obj_list(), 'voc')
    index = load_split(str(root), 'val', coco90_obj_list(), 'voc', require_images=False)
    assert len(index.image_ids) == len(gt['images']) and not index.images_checked
    assert len(index.coco_dataset['annotations']) == len(gt['annotations'])
