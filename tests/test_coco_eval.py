"""coco_eval.py: --results mode through a subprocess, user errors, results-file reuse, and a full
run with a model on coco_tiny val2017."""
import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pycocotools.cocoeval import COCOeval

from conftest import ROOT, SHARED, need_shared, pycocotools_coco
from efficientdet.errors import UserError

sys.path.insert(0, ROOT)
import coco_eval  # noqa: E402

SUMMARY_RE = re.compile(r'^ Average (Precision|Recall) +\((AP|AR)\) @\[ IoU=(\S+) +\| area= *(\w+) \| '
                        r'maxDets= *(\d+) \] = (-?\d\.\d{3})$', re.M)


@pytest.fixture(scope='module')
def gt():
    with open(need_shared('data', 'coco_tiny', 'annotations', 'instances_val2017.json')) as f:
        return json.load(f)


_coco = pycocotools_coco


def _project(tmp_path, gt, name='tiny', obj_list=None, project_name='coco_tiny', ratios=None):
    """A project yml for coco_tiny; obj_list defaults to the category names in id order."""
    if obj_list is None:
        obj_list = [c['name'] for c in sorted(gt['categories'], key=lambda c: c['id'])]
    lines = [f'project_name: {project_name}', 'train_set: train2017', 'val_set: val2017',
             'num_gpus: 1', 'mean: [0.485, 0.456, 0.406]', 'std: [0.229, 0.224, 0.225]',
             "anchors_scales: '[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]'",
             f"anchors_ratios: '{ratios or '[(1.0, 1.0), (2 ** 0.5, 2 ** -0.5), (2 ** -0.5, 2 ** 0.5)]'}'",
             f'obj_list: {json.dumps(obj_list)}']
    path = tmp_path / f'{name}.yml'
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def _jittered_results(gt, seed=0):
    rng = np.random.default_rng(seed)
    res = []
    for a in gt['annotations']:
        if not a['iscrowd'] and rng.random() < 0.8:
            b = np.array(a['bbox']) + rng.normal(0, 3, 4)
            res.append({'image_id': a['image_id'], 'category_id': a['category_id'],
                        'bbox': [round(float(v), 2) for v in b], 'score': round(float(rng.random()), 5)})
    return res


def _parse_summary(out):
    m = SUMMARY_RE.findall(out)
    assert len(m) == 12, out
    return [float(x[-1]) for x in m]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'coco_eval.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_results_mode_subprocess(tmp_path, gt):
    data_path = os.path.join(SHARED, 'data')
    proj = _project(tmp_path, gt)
    res = _jittered_results(gt)
    (tmp_path / 'res.json').write_text(json.dumps(res))
    p = _cli('-p', proj, '--data_path', data_path, '--results', 'res.json', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    # the 12 numbers equal pycocotools on the same file over all val images
    coco = _coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(res)), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert _parse_summary(p.stdout) == [float(f'{v:.3f}') for v in ev.stats]
    assert 0.3 < ev.stats[0] < 0.95
    # per-class table rows: person AP from the precision array, ground-truth count without crowd
    k = ev.params.catIds.index(1)
    prec = ev.eval['precision'][:, :, k, 0, 2]
    n_person = sum(1 for a in gt['annotations'] if a['category_id'] == 1 and not a['iscrowd'])
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith('person '))
    assert row.split()[1:] == [f'{prec[prec > -1].mean():.3f}', f'{prec[0][prec[0] > -1].mean():.3f}',
                               str(n_person)]
    assert not any(f.endswith('bbox_results.json') for f in os.listdir(tmp_path))  # --results writes nothing

    # --max_images restricts the evaluated images (first K of the annotation file)
    p = _cli('-p', proj, '--data_path', data_path, '--results', 'res.json', '--max_images', '10', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert '(10 images' in p.stdout


def test_user_errors_are_one_line(tmp_path, gt):
    data_path = os.path.join(SHARED, 'data')
    need_shared('data', 'coco_tiny')
    bad = _project(tmp_path, gt, name='bad', obj_list=['person', 'car'])
    (tmp_path / 'res.json').write_text('[]')
    p = _cli('-p', bad, '--data_path', data_path, '--results', 'res.json', cwd=tmp_path)
    assert p.returncode == 2
    assert 'Traceback' not in p.stderr and p.stderr.startswith('error: ') and len(p.stderr.splitlines()) == 1
    assert 'obj_list' in p.stderr


def _main(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = coco_eval.main(list(args))
    return rc, out.getvalue()


def test_errors(tmp_path, gt):
    data_path = os.path.join(SHARED, 'data')
    proj = _project(tmp_path, gt)
    # obj_list that disagrees with the annotation categories (too short, and the 90-list is fine)
    with pytest.raises(UserError, match='obj_list'):
        _main('-p', _project(tmp_path, gt, name='short', obj_list=['person']), '--data_path', data_path,
              '--results', 'x.json')
    # annotation file that is not COCO
    root = tmp_path / 'data' / 'coco_tiny' / 'annotations'
    root.mkdir(parents=True)
    ann = root / 'instances_val2017.json'
    ann.write_text('{"images": []}')
    with pytest.raises(UserError, match='instances_val2017.json.*not a COCO'):
        _main('-p', proj, '--data_path', str(tmp_path / 'data'), '--results', 'x.json')
    # a val set with no images
    ann.write_text(json.dumps({'images': [], 'annotations': [], 'categories': gt['categories']}))
    with pytest.raises(UserError, match='no usable images'):
        _main('-p', proj, '--data_path', str(tmp_path / 'data'), '--results', 'x.json')
    # missing / malformed results file
    with pytest.raises(UserError, match='results file not found'):
        _main('-p', proj, '--data_path', data_path, '--results', str(tmp_path / 'nope.json'))
    (tmp_path / 'bad.json').write_text('[{"image_id": 1}]')
    with pytest.raises(UserError, match='entry 0 is not a COCO box result'):
        _main('-p', proj, '--data_path', data_path, '--results', str(tmp_path / 'bad.json'))
    (tmp_path / 'other.json').write_text(json.dumps([{'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 1, 1],
                                                      'score': 0.5}]))
    with pytest.raises(UserError, match='not in'):
        _main('-p', proj, '--data_path', data_path, '--results', str(tmp_path / 'other.json'))
    # model run: missing weights, bad image size
    with pytest.raises(UserError, match='none.pth: no such checkpoint file'):
        _main('-p', proj, '--data_path', data_path, '-w', str(tmp_path / 'none.pth'),
              '--output_dir', str(tmp_path), '--device', 'cpu')
    with pytest.raises(UserError, match='image_size'):
        _main('-p', proj, '--data_path', data_path, '--image_size', '0', '--output_dir', str(tmp_path),
              '--device', 'cpu')


def _fixture_weights(tmp_path):
    """Yet-Another's D0 layout with 90 classes (fixture weights, float32) as a .pth file."""
    import torch
    from efficientdet.ckpt.files import atomic_save
    z = np.load(need_shared('fixtures', 'zylo117_d0', 'zylo117_state_dict.npz'))
    weights = str(tmp_path / 'd0_90.pth')
    atomic_save({k: torch.from_numpy(z[k].astype(np.float32) if z[k].dtype == np.float16 else z[k])
                 for k in z.files}, weights)
    return weights


def _ya_project(tmp_path, gt):
    ya = [''] * 90
    for c in gt['categories']:
        ya[c['id'] - 1] = c['name']
    return ya, _project(tmp_path, gt, name='ya', obj_list=ya, ratios='[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]')


def test_recomputes_by_default_and_reuses_only_a_run_with_the_same_key(tmp_path, gt):
    """Detections are recomputed unless --reuse; --reuse scores the earlier file only when everything
    that made it is the same, and names the first field that differs otherwise: thresholds, input
    size, another data set (same project name and val_set), another project, the weights."""
    import shutil
    data_path = os.path.join(SHARED, 'data')
    weights = _fixture_weights(tmp_path)
    _, proj = _ya_project(tmp_path, gt)
    out = tmp_path / 'out'
    base = ['-p', proj, '-w', weights, '--data_path', data_path, '--image_size', '128', '--max_images', '2',
            '--device', 'cpu', '--output_dir', str(out), '--no_progress']
    results = out / 'coco_tiny_val2017_bbox_results.json'
    rc, first = _main(*base)
    assert rc == 0 and 'wrote' in first and 'reusing' not in first
    key = json.loads((out / 'coco_tiny_val2017_bbox_results.json.meta.json').read_text())['key']
    assert key['image_size'] == [128, 128] and key['threshold'] == 0.05 and key['project'] == 'coco_tiny'
    rc, again = _main(*base)  # the default: recompute, and say the earlier file was replaced
    assert rc == 0 and 'reusing' not in again and 'replacing the earlier file' in again
    rc, reused = _main(*base, '--reuse')
    assert rc == 0 and 'reusing' in reused and 'not reusing' not in reused and 'wrote' not in reused
    assert _parse_summary(reused) == _parse_summary(first)
    rc, other = _main(*base, '--reuse', '--threshold', '0.3')
    assert 'not reusing' in other and 'threshold=0.05' in other and 'wrote' in other
    rc, other = _main(*base[:7], '128', '256', *base[8:], '--reuse')  # another input size (H W)
    assert 'not reusing' in other and 'image_size=[128, 128]' in other
    rc, _ = _main(*base)
    # a second data set: same project name and val_set, other images and annotations
    second = tmp_path / 'second' / 'coco_tiny'
    (second / 'annotations').mkdir(parents=True)
    shutil.copytree(os.path.join(data_path, 'coco_tiny', 'val2017'), second / 'val2017')
    sub = dict(gt, images=gt['images'][2:12])
    keep = {im['id'] for im in sub['images']}
    sub['annotations'] = [a for a in gt['annotations'] if a['image_id'] in keep]
    (second / 'annotations' / 'instances_val2017.json').write_text(json.dumps(sub))
    rc, other = _main(*[str(tmp_path / 'second') if a == data_path else a for a in base], '--reuse')
    assert 'not reusing' in other and 'wrote' in other
    assert any(f'{k}=' in other for k in ('annotations', 'data_path', 'ground_truth_sha256'))
    rc, _ = _main(*base)  # back to the first data set
    # another project file under the same name (other anchors): the earlier file is not its results
    ya, _ = _ya_project(tmp_path, gt)
    other_proj = _project(tmp_path, gt, name='ya_official_ratios', obj_list=ya)
    rc, other = _main(*[other_proj if a == proj else a for a in base], '--reuse')
    assert 'not reusing' in other and ('anchors_ratios=' in other or 'project_sha256=' in other)
    rc, _ = _main(*base)
    os.remove(out / 'coco_tiny_val2017_bbox_results.json.meta.json')
    rc, nometa = _main(*base, '--reuse')
    assert 'not reusing' in nometa and 'missing' in nometa
    rc, forced = _main(*base, '--reuse', '--override')
    assert 'reusing' not in forced and 'wrote' in forced
    with pytest.raises(UserError, match='no such checkpoint file'):  # reusing never skips the weights check
        _main(*[(str(tmp_path / 'none.pth') if a == weights else a) for a in base], '--reuse')
    assert results.exists()


def test_full_run_with_model(tmp_path, gt):
    """Yet-Another's 90-entry COCO obj_list ('' gaps) with their D0 layout (fixture weights), at 256 px
    on the first 8 val images; the written file is valid COCO results in the dataset's id space."""
    from efficientdet.evaluation import COCOEvaluator

    weights = _fixture_weights(tmp_path)
    ya, proj = _ya_project(tmp_path, gt)
    out_dir = tmp_path / 'out'
    with pytest.raises(UserError, match='90 classes'):  # 80-class project, 90-class weights
        _main('-p', _project(tmp_path, gt), '-w', weights, '--data_path', os.path.join(SHARED, 'data'),
              '--image_size', '256', '--output_dir', str(tmp_path), '--device', 'cpu')
    rc, out = _main('-p', proj, '-c', '0', '-w', weights, '--data_path', os.path.join(SHARED, 'data'),
                    '--image_size', '256', '--max_images', '8', '--batch_size', '4', '--device', 'cpu',
                    '--compat', 'zylo117', '--threshold', '0.05', '--output_dir', str(out_dir),
                    '--no_progress')
    assert rc == 0
    path = out_dir / 'coco_tiny_val2017_bbox_results.json'
    res = json.loads(path.read_text())
    assert res, 'the fixture weights give confident detections at 0.05'
    coco = _coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = coco.loadRes(str(path))
    assert len(loaded.getAnnIds()) == len(res)
    first8 = set(coco.getImgIds()[:8])
    assert {r['image_id'] for r in res} <= first8
    assert len([r for r in res if r['image_id'] == res[0]['image_id']]) <= 100
    valid_ids = {c['id'] for c in gt['categories']}
    assert {r['category_id'] for r in res} <= valid_ids  # label i -> id i + 1, gaps never emitted
    for r in res:  # boxes in original-image pixels, inside the image
        info = coco.imgs[r['image_id']]
        x, y, w, h = r['bbox']
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0
        assert x + w <= info['width'] + 0.01 and y + h <= info['height'] + 0.01
        assert 0.05 < r['score'] <= 1
    assert max(r['bbox'][0] + r['bbox'][2] for r in res) > 256  # really mapped back from 256 px
    # printed numbers = evaluating the written file on the same 8 images
    ev = COCOEvaluator(coco, class_names=ya)
    ev.add_results(res)
    m = ev.compute(image_ids=sorted(first8))
    assert _parse_summary(out) == [float(f'{v:.3f}') for v in m['stats']]
    assert '(8 images' in out and 'wrote' in out
