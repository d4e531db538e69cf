"""The commands a user types with released COCO checkpoints, run as subprocesses, for each released
layout (official TF variables .npz, Yet-Another-EfficientDet-Pytorch .pth, effdet .pth; 90 classes):

    python -m efficientdet.convert inspect FILE
    python -m efficientdet.convert {tf,effdet} FILE -c 0 -o OUT.pth       (layouts that convert)
    python coco_eval.py -p coco -c 0 -w FILE ...                          (real COCO images)
    python efficientdet_test.py FOLDER -p coco -c 0 -w FILE ...
    python -m efficientdet.export onnx -c 0 -p coco -w FILE ...   (and the .onnx through efficientdet_test.py)
    python benchmark.py -c 0 -p coco -w FILE ...
    python train.py -p coco -c 0 -w FILE ...                            (fine-tuning keeps the classifier)

The fixture weights are random, so mAP is ~0: the tests check exit codes, that coco_eval.py and
efficientdet_test.py find the same detections in the same image, that class indices land on the
right COCO category ids (and placeholders never appear), and, separately, that the 90-slot label
map scores ground truth at mAP 1.0. Also the newcomer's details (misspelled yml keys, YAML
errors with line and column, a size the model cannot run, ``--help`` naming the module).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import COCO_TINY, ROOT, need_shared
from efficientdet.ckpt.files import atomic_save
from efficientdet.errors import UserError
from efficientdet.evaluation import COCOEvaluator
from efficientdet.project import load_project

SIZE = '256'
N_IMAGES = 2
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
LAYOUTS = ('tf', 'yet_another', 'effdet')


def _run(*args, cwd=ROOT, timeout=300):
    """A command as the user types it; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _ok(p):
    assert p.returncode == 0, (p.args, p.stdout[-2000:], p.stderr[-3000:])
    return p.stdout


def _torch_file(npz_path: str, out: str) -> str:
    """A released-layout .pth: the fixture's tensors (stored float16) saved as float32."""
    with np.load(npz_path) as z:
        atomic_save({k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files}, out)
    return out


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """The three released layouts as files, and coco_tiny where ``-p coco`` looks for it."""
    root = tmp_path_factory.mktemp('journeys')
    files = {
        'tf': str(shutil.copy(need_shared('fixtures', 'tf_d0', 'tf_weights.npz'), root / 'efficientdet-d0.npz')),
        'yet_another': _torch_file(need_shared('fixtures', 'zylo117_d0', 'zylo117_state_dict.npz'),
                                   str(root / 'efficientdet-d0.pth')),
        'effdet': _torch_file(need_shared('fixtures', 'effdet_d0', 'effdet_state_dict.npz'),
                              str(root / 'tf_efficientdet_d0.pth')),
    }
    need_shared('data', 'coco_tiny', 'val2017')
    (root / 'datasets').mkdir()
    os.symlink(COCO_TINY, root / 'datasets' / 'coco')  # {data_path}/{project_name}/ of coco.yml
    with open(os.path.join(COCO_TINY, 'annotations', 'instances_val2017.json')) as f:
        gt = json.load(f)
    return {'root': root, 'files': files, 'gt': gt}


def _assert_same_detections(a, b, box_atol, score_atol=1e-3):
    """Lists of (score, class, box) hold the same detections, in any order among equal scores."""
    assert len(a) == len(b) > 0
    rest = list(a)
    for s2, c2, b2 in b:
        hit = next((k for k, (s1, c1, b1) in enumerate(rest) if c1 == c2 and abs(s1 - s2) < score_atol
                    and np.abs(np.subtract(b1, b2)).max() < box_atol), None)
        assert hit is not None, (s2, c2, b2)
        rest.pop(hit)


def _compat(layout):
    return ['--compat', 'zylo117'] if layout == 'yet_another' else []


@pytest.mark.parametrize('layout', LAYOUTS)
def test_released_checkpoint_journey(released, layout, tmp_path):
    weights = released['files'][layout]
    gt = released['gt']
    cat_name = {c['id']: c['name'] for c in gt['categories']}
    cat_id = {c['name']: c['id'] for c in gt['categories']}
    obj_list = load_project('coco').obj_list

    # 1. what is this file?
    info = _ok(_run('-m', 'efficientdet.convert', 'inspect', weights))
    assert 'efficientdet-d0 (-c 0)' in info and 'num_classes:    90' in info and '-p coco' in info

    # 2. layouts other than this project's also convert to a plain .pth once (loaded strictly below)
    converted = weights
    if layout != 'yet_another':
        converted = str(tmp_path / 'converted.pth')
        _ok(_run('-m', 'efficientdet.convert', layout, weights, '-c', '0', '-o', converted))
        wrong = _run('-m', 'efficientdet.convert', layout, weights, '-c', '1', '-o', str(tmp_path / 'x.pth'))
        assert wrong.returncode == 2 and wrong.stderr.count('\n') == 1
        assert 'this file is efficientdet-d0' in wrong.stderr and 'pass -c 0' in wrong.stderr

    # 3. COCO evaluation on real COCO images, straight from the released file
    out_dir = tmp_path / 'eval'
    ev = _ok(_run('coco_eval.py', '-p', 'coco', '-c', '0', '-w', weights, '--data_path',
                  str(released['root'] / 'datasets'), '--image_size', SIZE, '--max_images', str(N_IMAGES),
                  '--device', 'cpu', '--output_dir', str(out_dir), '--no_progress', *_compat(layout)))
    assert f'({N_IMAGES} images' in ev
    results = json.loads((out_dir / 'coco_val2017_bbox_results.json').read_text())
    assert results, 'random heads give detections above 0.05'
    assert {r['category_id'] for r in results} <= set(cat_name)  # the 10 placeholder ids never appear
    lines = ev.splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith('class '))
    end = next(k for k in range(head + 2, len(lines)) if lines[k].startswith('---'))
    rows = [line.split('  ')[0].strip() for line in lines[head + 2:end]]
    assert sorted(rows) == sorted(cat_name.values())  # per-class table: the 80 categories, no placeholder

    # 4. the same images through efficientdet_test.py (a folder, batched), from the converted file
    images = {r['image_id'] for r in results}
    by_id = {im['id']: im for im in gt['images']}
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in images:
        shutil.copy(os.path.join(COCO_TINY, 'val2017', by_id[i]['file_name']), folder)
    out = tmp_path / 'test_out'
    _ok(_run('efficientdet_test.py', str(folder), '-p', 'coco', '-c', '0', '-w', converted, '--image_size', SIZE,
             '--threshold', '0.05', '--iou', '0.5', '--nms', 'hard', '--max_det', '100', '--batch_size', '2',
             '--device', 'cpu', '-o', str(out), *_compat(layout)))
    for i in images:
        stem = os.path.splitext(by_id[i]['file_name'])[0]
        dets = json.loads((out / f'{stem}.json').read_text())['detections']
        assert all(obj_list[d['class_id']] == d['class_name'] != '' for d in dets)  # no placeholder output
        mine = [(d['score'], cat_id[d['class_name']], [d['x1'], d['y1'], d['x2'] - d['x1'], d['y2'] - d['y1']])
                for d in dets]
        theirs = [(r['score'], r['category_id'], r['bbox']) for r in results if r['image_id'] == i]
        _assert_same_detections(mine, theirs, box_atol=0.05)  # category ids: class index -> id, by name


# the loading path differs per layout only inside build_model, which the journey above covers for
# all three: the heavier export / training runs take one layout in the fast suite, the rest in -m slow
LAYOUTS_ONE_FAST = [LAYOUTS[0]] + [pytest.param(layout, marks=pytest.mark.slow) for layout in LAYOUTS[1:]]


@pytest.mark.parametrize('layout', LAYOUTS_ONE_FAST)
def test_released_checkpoint_export_and_benchmark(released, layout, tmp_path):
    weights = released['files'][layout]
    onnx_path = str(tmp_path / 'd0.onnx')
    _ok(_run('-m', 'efficientdet.export', 'onnx', '-c', '0', '-p', 'coco', '-w', weights, '--image_size', SIZE,
             '-o', onnx_path, *_compat(layout)))
    # the exported file finds what the checkpoint finds, through efficientdet_test.py --backend
    image = os.path.join(COCO_TINY, 'val2017', released['gt']['images'][0]['file_name'])
    found = {}
    for backend, w in (('torch', weights), ('onnxruntime', onnx_path)):
        out = tmp_path / backend
        _ok(_run('efficientdet_test.py', image, '-p', 'coco', '-c', '0', '-w', w, '--backend', backend,
                 '--image_size', SIZE, '--threshold', '0.05', '--iou', '0.5', '-o', str(out), *_compat(layout)))
        dets = json.loads(next(out.glob('*.json')).read_text())['detections']
        found[backend] = [(d['score'], d['class_id'], [d['x1'], d['y1'], d['x2'], d['y2']]) for d in dets]
    _assert_same_detections(found['onnxruntime'], found['torch'], box_atol=0.5)
    bench = _ok(_run('benchmark.py', '-c', '0', '-p', 'coco', '-w', weights, '--image_size', SIZE, '--iters', '2',
                     '--warmup', '1', '--threads', '1', '--device', 'cpu', '--json', str(tmp_path / 'b.json'),
                     *_compat(layout)))
    result = json.loads((tmp_path / 'b.json').read_text())
    assert result['latency_ms_median'] > 0, bench


@pytest.mark.parametrize('layout', LAYOUTS_ONE_FAST)
def test_released_checkpoint_fine_tunes_on_coco_keeping_the_classifier(released, layout, tmp_path):
    """train.py -p coco -w RELEASED: every tensor fits the 90-slot label map, so nothing is
    re-initialised; one step runs and a checkpoint is written."""
    p = _run('train.py', '-p', 'coco', '-c', '0', '-w', released['files'][layout], '--data_path',
             str(released['root'] / 'datasets'), '--image_size', SIZE, '--batch_size', '2', '--max_steps', '1',
             '--num_epochs', '1', '--no_map', '--saved_path', str(tmp_path / 'saved'), '--log_path',
             str(tmp_path / 'logs'), *_compat(layout))
    out = _ok(p) + p.stderr
    assert 'fine-tune load: 784/784 tensors' in out and 're-initialised' not in out
    assert os.path.isdir(tmp_path / 'saved' / 'coco') and os.listdir(tmp_path / 'saved' / 'coco')


def test_official_lite0_journey_through_every_script(released, tmp_path):
    """The official EfficientDet-Lite0 variables (../shared/fixtures/tf_lite0, 90 classes) through the
    same commands with ``-c lite0`` at its own 320 px (levels 40, 20, 10, 5, 3) and at an odd,
    non-square size: inspect, convert, coco_eval.py, efficientdet_test.py, export + the exported file,
    benchmark.py, and one fine-tuning step of train.py."""
    npz = str(shutil.copy(need_shared('fixtures', 'tf_lite0', 'tf_weights.npz'), tmp_path / 'efficientdet-lite0.npz'))
    info = _ok(_run('-m', 'efficientdet.convert', 'inspect', npz))
    assert 'lite0' in info and 'num_classes:    90' in info
    pth = str(tmp_path / 'lite0.pth')
    _ok(_run('-m', 'efficientdet.convert', 'tf', npz, '-c', 'lite0', '-o', pth))
    wrong = _run('-m', 'efficientdet.convert', 'tf', npz, '-c', '0', '-o', str(tmp_path / 'x.pth'))
    assert wrong.returncode == 2 and 'lite0' in wrong.stderr and wrong.stderr.count('\n') == 1
    data = str(released['root'] / 'datasets')
    out_dir = tmp_path / 'eval'
    _ok(_run('coco_eval.py', '-p', 'coco', '-c', 'lite0', '-w', npz, '--data_path', data, '--max_images', '2',
             '--device', 'cpu', '--output_dir', str(out_dir), '--no_progress'))  # default size: 320
    results = json.loads((out_dir / 'coco_val2017_bbox_results.json').read_text())
    assert results and {r['category_id'] for r in results} <= {c['id'] for c in released['gt']['categories']}
    image = os.path.join(COCO_TINY, 'val2017', released['gt']['images'][0]['file_name'])
    onnx_path = str(tmp_path / 'lite0.onnx')
    _ok(_run('-m', 'efficientdet.export', 'onnx', '-c', 'lite0', '-p', 'coco', '-w', pth, '--image_size', '200', '296',
             '-o', onnx_path))
    found = {}
    for backend, w in (('torch', pth), ('onnxruntime', onnx_path)):
        out = tmp_path / backend
        _ok(_run('efficientdet_test.py', image, '-p', 'coco', '-c', 'lite0', '-w', w, '--backend', backend,
                 '--image_size', '200', '296', '--threshold', '0.05', '-o', str(out)))
        dets = json.loads(next(out.glob('*.json')).read_text())['detections']
        found[backend] = [(d['score'], d['class_id'], [d['x1'], d['y1'], d['x2'], d['y2']]) for d in dets]
    _assert_same_detections(found['onnxruntime'], found['torch'], box_atol=0.5)
    _ok(_run('benchmark.py', '-c', 'lite0', '-p', 'coco', '-w', pth, '--iters', '2', '--warmup', '1', '--threads', '1',
             '--device', 'cpu', '--json', str(tmp_path / 'b.json')))
    assert json.loads((tmp_path / 'b.json').read_text())['latency_ms_median'] > 0
    p = _run('train.py', '-p', 'coco', '-c', 'lite0', '-w', pth, '--data_path', data, '--image_size', '200', '296',
             '--batch_size', '2', '--max_steps', '1', '--num_epochs', '1', '--no_map', '--saved_path',
             str(tmp_path / 'saved'), '--log_path', str(tmp_path / 'logs'))
    out = _ok(p) + p.stderr
    assert 're-initialised' not in out and os.listdir(tmp_path / 'saved' / 'coco')


def test_coco_label_map_scores_ground_truth_at_map_1(released):
    """Class index i of projects/coco.yml is COCO category id i + 1 (the official label map); ground
    truth given as detections with label = category id - 1 scores mAP 1.0 through the project's own
    category resolution, and the ten placeholder slots match no category."""
    from efficientdet.data.dataset import CocoDataset
    project = load_project('coco')
    assert len(project.obj_list) == 90
    assert [i + 1 for i, n in enumerate(project.obj_list) if n == ''] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    ds = CocoDataset(COCO_TINY, 'val2017', project.obj_list, 256, augment=False)
    cat_ids = [None if c is None or c < 0 else int(c) for c in ds.cat_ids]
    for i, n in enumerate(project.obj_list):
        assert cat_ids[i] == (None if n == '' else i + 1), (i, n)
    gt = released['gt']
    ev = COCOEvaluator(ds.coco, cat_ids=ds.cat_ids, class_names=project.obj_list)
    anns = [a for a in gt['annotations'] if not a['iscrowd']]
    image_ids = sorted({a['image_id'] for a in anns})
    for i in image_ids:
        mine = [a for a in anns if a['image_id'] == i]
        xyxy = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                         for a in mine], dtype=np.float64)
        ev.update([i], [{'boxes': xyxy, 'scores': np.ones(len(mine)),
                         'labels': np.array([a['category_id'] - 1 for a in mine])}])
    m = ev.compute(image_ids=image_ids)
    assert m['stats'][0] == pytest.approx(1.0)
    # the data check accepts the placeholders on the same real COCO data
    check = _ok(_run('-m', 'efficientdet.data.check', '-p', 'coco', '--data_path', str(released['root'] / 'datasets'),
                     '--no_images', '--no_anchors'))
    assert 'result: clean' in check
    # one class off (id + 1) and the score collapses: the test can fail
    ev2 = COCOEvaluator(ds.coco, cat_ids=ds.cat_ids, class_names=project.obj_list)
    for i in image_ids:
        mine = [a for a in anns if a['image_id'] == i and a['category_id'] < 90]
        if not mine:
            continue
        xyxy = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                         for a in mine], dtype=np.float64)
        ev2.update([i], [{'boxes': xyxy, 'scores': np.ones(len(mine)),
                          'labels': np.array([a['category_id'] for a in mine])}])
    assert ev2.compute(image_ids=image_ids)['stats'][0] < 0.2


def test_80_name_project_still_works_with_an_80_class_head(tmp_path):
    """A project listing only the 80 names builds an 80-class head; a 90-class file is refused in
    one line that says to pass -p coco."""
    from efficientdet.factory import build_model
    names = [n for n in load_project('coco').obj_list if n]
    yml = tmp_path / 'coco80.yml'
    yml.write_text('project_name: coco\ntrain_set: train2017\nval_set: val2017\nobj_list: '
                   + json.dumps(names) + '\n')
    assert build_model(0, project=str(yml)).num_classes == 80
    with pytest.raises(UserError) as e:
        build_model(0, project=str(yml), weights=need_shared('fixtures', 'tf_d0', 'tf_weights.npz'))
    assert '90 classes' in str(e.value) and 'pass -p coco' in str(e.value) and '\n' not in str(e.value)
    # fine-tuning keeps everything but the classifier
    model = build_model(0, project=str(yml), weights=need_shared('fixtures', 'tf_d0', 'tf_weights.npz'),
                        finetune=True, verbose=False)
    assert model.num_classes == 80


# ------------------------------------------------------------------------------ newcomer's details
def test_misspelled_yml_key_is_reported(tmp_path):
    yml = tmp_path / 'p.yml'
    yml.write_text("project_name: p\ntrain_set: t\nval_set: v\nobj_list: ['a']\nanchor_scales: '[1.0]'\n")
    with pytest.raises(UserError, match=r"unknown field 'anchor_scales'.*did you mean 'anchors_scales'"):
        load_project(str(yml))


def test_yaml_error_gives_line_and_column(tmp_path):
    yml = tmp_path / 'p.yml'
    yml.write_text("project_name: p\ntrain_set: t\nval_set: v\nobj_list: ['a', 'b'\n")
    with pytest.raises(UserError, match=r'p\.yml:\d+:\d+: not valid YAML'):
        load_project(str(yml))


def test_model_rejects_a_size_it_cannot_run_clearly():
    """``model(x)`` at a size the official model cannot run raises a clear error (the rule of
    config.check_image_size), not a shape error deep inside the BiFPN."""
    from efficientdet.config import check_image_size
    from efficientdet.model import EfficientDetBackbone
    bad = (64, 512)
    with pytest.raises(ValueError) as rule:
        check_image_size(*bad, 0)
    model = EfficientDetBackbone(num_classes=2, compound_coef=0).eval()
    with pytest.raises(ValueError) as e, torch.no_grad():
        model(torch.zeros(1, 3, *bad))
    assert str(e.value) == str(rule.value)


@pytest.mark.parametrize('module', ['efficientdet.convert', 'efficientdet.export', 'efficientdet.data.check',
                                    'efficientdet.data.shapes', 'efficientdet.data.convert'])
def test_help_names_the_module(module):
    out = _ok(_run('-m', module, '--help'))
    assert out.startswith(f'usage: python -m {module}')


def test_readme_python_examples_run_as_written(released, tmp_path):
    """The README's pretrained-model examples (the ```python blocks that load weights) run
    unchanged, with a released D0 file named as the README names it and the repository's
    weights/ and assets/."""
    import re
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        blocks = [b for b in re.findall(r'```python\n(.*?)```', f.read(), re.S)
                  if 'build_model(' in b or 'Detector.from_checkpoint(' in b]
    assert len(blocks) >= 2
    shutil.copy(released['files']['yet_another'], tmp_path / 'efficientdet-d0.pth')
    for name in ('weights', 'assets'):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    for code in blocks:
        p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, (code, p.stderr[-2000:])
