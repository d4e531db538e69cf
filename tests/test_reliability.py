"""Reliability and security through the real scripts: untrusted input, user mistakes, dirty data,
interrupted writes. Each user mistake must give one clear line naming the file/field, a non-zero
exit and no traceback."""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from efficientdet.anchors import decode_boxes, encode_boxes
from efficientdet.checkpoint import atomic_save, safe_load
from efficientdet.model import EfficientDetBackbone
from efficientdet.postprocess import nms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
PROJECT_YML = """project_name: tiny
train_set: train
val_set: val
obj_list: ['rectangle', 'circle', 'triangle']
"""


def _python_files():
    for base, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('datasets', 'runs', 'logs', '__pycache__')]
        for f in files:
            if f.endswith('.py'):
                yield os.path.join(base, f)


def test_no_eval_exec_or_unsafe_loaders_anywhere():
    offenders = []
    for path in _python_files():
        tree = ast.parse(open(path, encoding='utf-8').read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ''
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ''
            if name in ('eval', 'exec') and (isinstance(f, ast.Name) or owner == 'builtins'):
                offenders.append(f'{path}:{node.lineno} {name}')
            if owner == 'yaml' and name in ('load', 'unsafe_load', 'full_load'):
                offenders.append(f'{path}:{node.lineno} yaml.{name}')
            if owner == 'pickle' and name in ('load', 'loads'):
                offenders.append(f'{path}:{node.lineno} pickle.{name}')
            if owner == 'torch' and name == 'load':
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get('weights_only'), ast.Constant) and kw['weights_only'].value is True):
                    offenders.append(f'{path}:{node.lineno} torch.load without weights_only=True')
    assert not offenders, offenders


_SAVER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from efficientdet.checkpoint import atomic_save
big = {'w': torch.arange(4_000_000, dtype=torch.float32)}
print('ready', flush=True)
i = 0
while True:
    i += 1
    big['step'] = torch.tensor(i)
    atomic_save(big, sys.argv[1])
"""


def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / 'last.ckpt'
    atomic_save({'w': torch.zeros(3), 'step': torch.tensor(0)}, str(path))
    for delay in (0.3, 0.9):
        proc = subprocess.Popen([sys.executable, '-c', _SAVER, str(path), ROOT], stdout=subprocess.PIPE, text=True,
                                env=ENV)
        assert proc.stdout.readline().strip() == 'ready'
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        state = safe_load(str(path))  # old or new, never torn
        assert set(state) == {'w', 'step'}
        step = int(state['step'])
        if step == 0:  # the file written above, untouched
            assert torch.equal(state['w'], torch.zeros(3))
        else:  # one complete save of the writer: its 4M-element tensor and a step it reached
            assert step >= 1
            assert torch.equal(state['w'], torch.arange(4_000_000, dtype=torch.float32))
    leftovers = [p for p in os.listdir(tmp_path) if p != 'last.ckpt']
    assert all(p.endswith('.tmp') for p in leftovers)  # a killed writer can only leave its temp file


@pytest.mark.parametrize('fail_in', ['replace', 'write'])
def test_failed_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_in):
    """Deterministic: an error while writing the temp file or renaming it over the target leaves
    the previous file byte-for-byte intact and removes the temp file (atomic_save and atomic_write)."""
    from efficientdet.ckpt import files as checkpoint  # where atomic_write and its os live
    ckpt, txt = tmp_path / 'last.ckpt', tmp_path / 'log.json'
    atomic_save({'w': torch.arange(5.0), 'step': torch.tensor(7)}, str(ckpt))
    checkpoint.atomic_write(str(txt), lambda f: f.write('{"old": 1}'), binary=False)
    before = {p: p.read_bytes() for p in (ckpt, txt)}

    class Boom(OSError):
        pass

    def fail(*args, **kwargs):
        raise Boom('injected failure')

    if fail_in == 'replace':
        monkeypatch.setattr(checkpoint.os, 'replace', fail)
        save_new = lambda: atomic_save({'w': torch.ones(9), 'step': torch.tensor(8)}, str(ckpt))  # noqa: E731
        write_new = lambda: checkpoint.atomic_write(str(txt), lambda f: f.write('{"new": 2}'),  # noqa: E731
                                                    binary=False)
    else:
        save_new = lambda: checkpoint.atomic_write(str(ckpt), lambda f: (f.write(b'partial'), fail()))  # noqa: E731
        write_new = lambda: checkpoint.atomic_write(str(txt), lambda f: (f.write('{"ne'), fail()),  # noqa: E731
                                                    binary=False)
    for attempt in (save_new, write_new):
        with pytest.raises(Boom):
            attempt()
        assert sorted(os.listdir(tmp_path)) == ['last.ckpt', 'log.json']  # no temp file left behind
        assert {p: p.read_bytes() for p in (ckpt, txt)} == before
    # a failure when there was no previous file leaves nothing at all
    fresh = tmp_path / 'fresh.ckpt'
    with pytest.raises(Boom):
        if fail_in == 'replace':
            atomic_save({'w': torch.ones(2)}, str(fresh))
        else:
            checkpoint.atomic_write(str(fresh), lambda f: fail())
    assert sorted(os.listdir(tmp_path)) == ['last.ckpt', 'log.json']
    monkeypatch.undo()
    state = safe_load(str(ckpt))
    assert int(state['step']) == 7 and torch.equal(state['w'], torch.arange(5.0))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    from efficientdet.data.shapes import generate_split
    root = tmp_path_factory.mktemp('rel')
    generate_split(str(root / 'data' / 'tiny'), 'train', 4, 128, seed=3)
    generate_split(str(root / 'data' / 'tiny'), 'val', 2, 128, seed=3)
    (root / 'projects').mkdir()
    (root / 'projects' / 'tiny.yml').write_text(PROJECT_YML)
    return root


def _run(args, cwd=ROOT, timeout=240):
    proc = subprocess.run([sys.executable] + args, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _train_args(root, out, *extra):
    return ['train.py', '-p', 'tiny', '--projects_dir', str(root / 'projects'), '--data_path', str(root / 'data'),
            '-c', '0', '--image_size', '128', '--batch_size', '2', '-n', '0', '--num_epochs', '1',
            '--saved_path', str(out), '--log_path', str(out / 'logs'), '--no_map', *extra]


def _assert_user_error(code, err, *needles):
    assert code == 2, err
    assert 'Traceback' not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith('error:')]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, err)


def _broken_copy(tiny, tmp_path, mutate):
    root = tmp_path / 'copy'
    shutil.copytree(tiny, root)
    mutate(root)
    return root


def test_train_user_mistakes_are_one_clear_line(tiny, tmp_path):
    code, _, err = _run(_train_args(tiny, tmp_path, '-p', 'nosuchproject'))
    _assert_user_error(code, err, 'nosuchproject')

    root = _broken_copy(tiny, tmp_path, lambda r: shutil.rmtree(r / 'data' / 'tiny' / 'train'))
    code, _, err = _run(_train_args(root, tmp_path))
    _assert_user_error(code, err, 'train')

    def not_coco(r):
        (r / 'data' / 'tiny' / 'annotations' / 'instances_train.json').write_text(json.dumps({'foo': 1}))
    root = _broken_copy(tiny, tmp_path / 'b', not_coco)
    code, _, err = _run(_train_args(root, tmp_path))
    _assert_user_error(code, err, 'instances_train.json')

    def other_classes(r):
        (r / 'projects' / 'tiny.yml').write_text(PROJECT_YML.replace("'triangle'", "'hexagon'"))
    root = _broken_copy(tiny, tmp_path / 'c', other_classes)
    code, _, err = _run(_train_args(root, tmp_path))
    _assert_user_error(code, err, 'hexagon')

    code, _, err = _run(_train_args(tiny, tmp_path, '--image_size', '64', '512'))
    _assert_user_error(code, err, '--image_size', 'too elongated')

    code, _, err = _run(_train_args(tiny, tmp_path, '--accumulate', '3'))
    _assert_user_error(code, err, '--batch_size 2', '--accumulate 3')

    code, _, err = _run(_train_args(tiny, tmp_path, '--freeze', 'efficientnet'))
    _assert_user_error(code, err, '--freeze', 'backbone_net')

    d1 = tmp_path / 'd1.pth'
    torch.save(EfficientDetBackbone(num_classes=3, compound_coef=1).state_dict(), str(d1))
    code, _, err = _run(_train_args(tiny, tmp_path, '-w', str(d1)))
    _assert_user_error(code, err, 'd1', '-c 0')

    def bad_yml(r):
        (r / 'projects' / 'tiny.yml').write_text(PROJECT_YML + "anchors_scales: '__import__(\"os\").getcwd()'\n")
    root = _broken_copy(tiny, tmp_path / 'e', bad_yml)
    code, _, err = _run(_train_args(root, tmp_path))
    _assert_user_error(code, err, 'anchors_scales')


def test_inference_user_mistakes(tiny, tmp_path):
    w = tmp_path / 'w.pth'
    torch.save(EfficientDetBackbone(num_classes=3, compound_coef=0).state_dict(), str(w))
    base = ['efficientdet_test.py', '-p', 'tiny', '--projects_dir', str(tiny / 'projects'), '-w', str(w),
            '--image_size', '128', '--output', str(tmp_path / 'out')]
    img = str(next((tiny / 'data' / 'tiny' / 'val').iterdir()))
    code, _, err = _run(base + [img, '--device', 'tpu:7'])
    _assert_user_error(code, err, 'tpu:7')
    code, _, err = _run(base + [img, '-c', '2'])
    _assert_user_error(code, err, '-c 2')
    code, _, err = _run(base[:-4] + [img, '--image_size', '64', '512'])
    _assert_user_error(code, err, 'too elongated')


def test_dirty_data_is_survived_and_counted_by_training(tiny, tmp_path):
    def dirty(r):
        d = r / 'data' / 'tiny'
        imgs = sorted((d / 'train').iterdir())
        imgs[0].write_bytes(b'not a jpeg at all')  # corrupt image
        ann_path = d / 'annotations' / 'instances_train.json'
        ann = json.loads(ann_path.read_text())
        ann['annotations'][1]['bbox'] = [10, 10, -5, 8]  # negative width
        ann['annotations'][2]['bbox'] = [500, 500, 20, 20]  # outside the 128 px image
        del ann['annotations'][3]['category_id']  # missing field
        ann['images'].append(dict(id=999, file_name='missing.jpg', height=128, width=128))  # missing file
        ann_path.write_text(json.dumps(ann))
    root = _broken_copy(tiny, tmp_path, dirty)
    n_boxes = len(json.loads((tiny / 'data' / 'tiny' / 'annotations' / 'instances_train.json').read_text())
                  ['annotations'])
    code, out, err = _run(_train_args(root, tmp_path / 'out', '--max_steps', '2'))
    assert code == 0, err
    text = out + err
    assert 'Traceback' not in text
    # CocoDataset.summary(): '<set>: N images (..), M boxes (..); skipped: kind=n, ...' -- once when the
    # set is indexed (the corrupt image is found only when it is read) and again after the epoch
    train_lines = [ln for ln in out.splitlines() if ln.startswith('train: ')]
    assert len(train_lines) == 2, out

    def skipped(line):
        assert '; skipped: ' in line, line
        part = line.split('; skipped: ', 1)[1].split(' (python -m', 1)[0].split(';', 1)[0]
        return dict((k, int(v)) for k, v in (item.split('=') for item in part.split(', ')))

    indexed = {'missing_image': 1, 'annotation_missing_fields': 1, 'bad_box': 2}  # bad_box: -5 wide, outside
    assert skipped(train_lines[0]) == indexed
    assert skipped(train_lines[1]) == dict(indexed, corrupt_image=1)  # both batches read all 4 images
    # the missing file is skipped (4 images left); 3 annotations gone (2 bad boxes, 1 without category)
    assert train_lines[1].startswith(f'train: 4 images (0 without boxes), {n_boxes - 3} boxes'), train_lines[1]
    assert any(ln.startswith('val: ') and ln.endswith('; nothing skipped') for ln in out.splitlines()), out
    code, out, err = _run(['-m', 'efficientdet.data.check', '-p', 'tiny', '--projects_dir', str(root / 'projects'),
                           '--data_path', str(root / 'data')])
    assert code == 1 and 'Traceback' not in err, err


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.floats(0.0, 1e4), st.floats(0.0, 1e4)),
                min_size=1, max_size=20))
def test_box_coding_round_trip_property(rows):
    boxes = torch.tensor([[y, x, y + h, x + w] for y, x, h, w in rows], dtype=torch.float64)
    anchors = torch.tensor([[0.0, 0.0, 32.0, 64.0]], dtype=torch.float64).expand_as(boxes)
    codes = encode_boxes(boxes, anchors)
    assert torch.isfinite(codes).all()
    back = decode_boxes(codes, anchors)
    assert torch.allclose(back, boxes, atol=1e-4 + 1e-6 * boxes.abs().max().item())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 60), st.floats(0.0, 1.0), st.integers(0, 2 ** 31 - 1))
def test_nms_property_degenerate_and_huge_boxes(n, iou, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 1e6 - 5e5
    wh = torch.rand(n, 2, generator=g) * 1e6
    if seed % 3 == 0:
        wh[:, 1] = 0.0  # degenerate: zero-height boxes
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    keep = nms(boxes, scores, iou)
    assert keep.dtype == torch.long and len(set(keep.tolist())) == len(keep) <= n
    if n:
        assert int(keep[0]) == int(scores.argmax())
        assert bool((scores[keep][1:] <= scores[keep][:-1]).all())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from([1, 3, 4]), st.sampled_from(['uint8', 'uint16']),
       st.sampled_from([128, 256, (128, 256)]))
def test_preprocessing_property_any_size_and_channels(h, w, channels, dtype, size):
    from efficientdet.preprocess import boxes_to_original, letterbox
    rng = np.random.default_rng(h * 1000 + w)
    hi = 255 if dtype == 'uint8' else 65535
    img = rng.integers(0, hi + 1, (h, w, channels) if channels > 1 else (h, w), dtype=dtype)
    x, meta = letterbox(img, size)
    hh, ww = (size, size) if isinstance(size, int) else size
    assert x.shape == (3, hh, ww) and torch.isfinite(x).all()
    nh, nw = meta.resized_hw
    assert 1 <= nh <= hh and 1 <= nw <= ww and (nh == hh or nw == ww)
    assert float(x[:, nh:, :].abs().max() if nh < hh else 0) == 0.0  # bottom padding is zero
    full = boxes_to_original(torch.tensor([[0.0, 0.0, float(nw), float(nh)]]), meta)
    # one scale back, like training and the official code: the truncated resize leaves the content
    # up to one network pixel short, i.e. up to 1 / scale original pixels
    assert np.allclose(full, [[0, 0, w, h]], atol=1.0 / meta.scale + 1e-3)
