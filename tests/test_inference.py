"""Detector (mapping back, batching, COCO output, weight checks) and the two inference scripts,
run through subprocess with a randomly initialised D0 saved to a temporary .pth."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from efficientdet.checkpoint import atomic_save
from efficientdet.detector import Detections, Detector
from efficientdet.errors import UserError
from efficientdet.model import EfficientDetBackbone
from efficientdet.preprocess import read_image
from efficientdet.visualize import class_color

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ['circle', 'square', 'triangle']


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A random 3-class D0 checkpoint and a project yml naming its classes."""
    d = tmp_path_factory.mktemp('tiny')
    torch.manual_seed(0)
    model = EfficientDetBackbone(num_classes=3, compound_coef=0)
    with torch.no_grad():  # spread the class scores so several classes appear
        model.classifier.header.pointwise_conv.conv.bias.normal_(-1.0, 1.0)
    weights = str(d / 'w.pth')
    atomic_save(model.state_dict(), weights)
    proj = d / 'tiny.yml'
    proj.write_text('project_name: tiny\ntrain_set: train\nval_set: val\nnum_gpus: 1\n'
                    f'obj_list: {CLASSES}\n')
    return {'dir': d, 'weights': weights, 'project': str(proj)}


def run_script(args, cwd=ROOT, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- Detector with a stub model
class StubModel:
    """Any callable with the model contract works (the hook for exported runtimes): one anchor
    (y1, x1, y2, x2) = (32, 64, 96, 192) scores 0.9 for class 1, another 0.1."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        self.inputs.append((tuple(x.shape), x.dtype))
        b = x.shape[0]
        anchors = torch.tensor([[[32.0, 64.0, 96.0, 192.0], [0.0, 0.0, 16.0, 16.0]]])
        cls = torch.tensor([[0.1, 0.9], [0.05, 0.1]]).expand(b, 2, 2)
        return None, torch.zeros(b, 2, 4), cls, anchors


def test_detector_maps_boxes_back_to_original_pixels():
    stub = StubModel()
    det = Detector(stub, ['a', 'b'], 256, threshold=0.5, batch_size=2)
    land = np.zeros((100, 200, 3), np.uint8)  # scale 1.28, content 128 x 256
    port = np.zeros((200, 100, 3), np.uint8)  # content 256 x 128: the box leaves the image on the right
    out = det([land, torch.zeros(3, 100, 200, dtype=torch.uint8), port])
    assert stub.inputs == [((2, 3, 256, 256), torch.float32), ((1, 3, 256, 256), torch.float32)]
    assert len(out) == 3 and all(isinstance(d, Detections) for d in out)
    np.testing.assert_allclose(out[0].boxes, [[50, 25, 150, 75]], rtol=1e-6)
    np.testing.assert_allclose(out[1].boxes, out[0].boxes)
    np.testing.assert_allclose(out[2].boxes, [[50, 25, 100, 75]], rtol=1e-6)  # clipped to the width
    assert out[0].boxes.dtype == np.float32 and out[0].class_ids.tolist() == [1] and out[0].class_names == ['b']
    assert out[0].scores.tolist() == pytest.approx([0.9]) and out[0].image_hw == (100, 200)
    coco = out[0].to_coco(7)
    assert coco == [{'image_id': 7, 'category_id': 2, 'bbox': [50.0, 25.0, 100.0, 50.0], 'score': pytest.approx(0.9)}]
    assert out[0].to_coco(7, cat_ids=[5, 11])[0]['category_id'] == 11
    drawn = out[0].draw(land)
    assert (land == 0).all() and tuple(drawn[75, 100]) == class_color(1)
    assert det(np.zeros((10, 10, 3), np.uint8))[0].to_list()[0]['class_name'] == 'b'


def test_detector_rejects_bad_settings():
    with pytest.raises(UserError, match='--nms'):
        Detector(StubModel(), ['a'], 256, nms='soft')
    from efficientdet.runtimes import load_runtime
    for backend in ('onnxruntime', 'torchscript'):  # run in the precision they were exported with
        with pytest.raises(UserError, match='--half: --backend .* applies to torch, openvino'):
            load_runtime(backend, 'model.file', half=True)
    with pytest.raises(UserError, match='--threshold'):
        Detector(StubModel(), ['a'], 256, threshold=2.0)


# ----------------------------------------------------------------------------- Detector from a checkpoint
def test_from_checkpoint_batches_and_sources(tiny, tmp_path):
    det = Detector.from_checkpoint(tiny['weights'], project=tiny['project'], image_size=256, threshold=0.2, iou=0.2)
    assert isinstance(det.model, EfficientDetBackbone) and det.obj_list == CLASSES
    assert all(hasattr(det.model, n) for n in ('backbone_net', 'bifpn', 'regressor', 'classifier'))
    rng = np.random.default_rng(0)
    a = (rng.random((97, 203, 3)) * 255).astype(np.uint8)
    b = (rng.random((150, 60, 3)) * 255).astype(np.uint8)
    p = str(tmp_path / 'a.png')
    cv2.imwrite(p, a[..., ::-1])
    batch = det([p, b, torch.from_numpy(a).permute(2, 0, 1)])
    single = det(b)[0]
    assert len(batch) == 3 and len(batch[0]) > 0
    np.testing.assert_allclose(batch[1].boxes, single.boxes, atol=1e-3)
    np.testing.assert_allclose(batch[1].scores, single.scores, atol=1e-5)
    np.testing.assert_allclose(batch[2].boxes, batch[0].boxes, atol=1e-3)
    for d, (h, w) in zip(batch, [(97, 203), (150, 60), (97, 203)]):
        assert d.image_hw == (h, w)
        assert (d.boxes >= 0).all() and (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        assert (d.scores > 0.2).all() and (np.diff(d.scores) <= 0).all()
        assert d.class_names == [CLASSES[i] for i in d.class_ids]


def test_from_checkpoint_explains_mismatches(tiny, tmp_path):
    two = tmp_path / 'two.yml'
    two.write_text("project_name: two\ntrain_set: t\nval_set: v\nobj_list: ['x', 'y']\n")
    with pytest.raises(UserError, match=r'3 classes but project .two. lists 2'):
        Detector.from_checkpoint(tiny['weights'], project=str(two))
    with pytest.raises(UserError, match=r'efficientdet-d0.*-c 0'):
        Detector.from_checkpoint(tiny['weights'], compound_coef=1, project=tiny['project'])
    with pytest.raises(UserError, match='image_size.*too elongated'):  # P6 1x8: the official cannot run it
        Detector.from_checkpoint(tiny['weights'], project=tiny['project'], image_size=(64, 512))
    with pytest.raises(UserError, match='no such checkpoint'):
        Detector.from_checkpoint(str(tmp_path / 'missing.pth'), project=tiny['project'])
    # no project: classes counted from the file and named by index
    det = Detector.from_checkpoint(tiny['weights'], image_size=128)
    assert det.obj_list == ['0', '1', '2']


# ----------------------------------------------------------------------------- efficientdet_test.py
def _write_inputs(d):
    rng = np.random.default_rng(3)
    paths = {}
    odd = (rng.random((123, 257, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(d / 'odd.png'), odd)
    paths['odd.png'] = (123, 257)
    cv2.imwrite(str(d / 'gray.png'), (rng.random((90, 70)) * 255).astype(np.uint8))
    paths['gray.png'] = (90, 70)
    rgba = (rng.random((64, 80, 4)) * 255).astype(np.uint8)
    cv2.imwrite(str(d / 'rgba.png'), rgba)
    paths['rgba.png'] = (64, 80)
    cv2.imwrite(str(d / 'deep.png'), (rng.random((50, 60, 3)) * 65535).astype(np.uint16))
    paths['deep.png'] = (50, 60)
    from test_preprocess import jpeg_with_orientation
    (d / 'rot.jpg').write_bytes(jpeg_with_orientation(odd[:80, :120, ::-1].copy(), 6))
    paths['rot.jpg'] = (120, 80)  # EXIF-rotated: height and width swap
    (d / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    return paths


def _check_drawn(record, out_img, src_rgb):
    """Every JSON box is drawn in its class colour; nothing is drawn away from the boxes."""
    src = src_rgb[..., ::-1].astype(np.int16)
    assert out_img.shape == src.shape
    h, w = src.shape[:2]
    allowed = np.zeros((h, w), bool)
    for det in record['detections']:
        x1, y1, x2, y2 = (int(round(det[k])) for k in ('x1', 'y1', 'x2', 'y2'))
        colour = np.array(class_color(det['class_id']))
        edges = []
        if y2 < h:
            edges.append(out_img[y2, x1 + 1:x2])
        if x2 < w:
            edges.append(out_img[y1 + 1:y2, x2])
        assert edges, det
        px = np.concatenate(edges)
        # the box's own label (class colour + antialiased text) may cover part of a small box
        assert (px == colour).all(1).mean() >= 0.3, (det, px[:5], colour)
        allowed[max(0, y1 - 40):max(y2, y1 + 30) + 3, max(0, x1 - 3):max(x2, x1 + 220) + 3] = True  # box + label
    changed = (out_img.astype(np.int16) != src).any(-1)
    assert not (changed & ~allowed).any()


def test_image_script_outputs_and_errors(tiny, tmp_path):
    paths = _write_inputs(tmp_path)
    out = tmp_path / 'out'
    images = [str(tmp_path / n) for n in paths] + [str(tmp_path / 'missing.png'), str(tmp_path / 'broken.jpg')]
    r = run_script(['efficientdet_test.py', *images, '-p', tiny['project'], '-w', tiny['weights'],
                    '--image_size', '256', '--iou', '0.0', '--max_det', '3', '--output', str(out)])
    assert r.returncode == 1, r.stderr
    assert 'Traceback' not in r.stderr
    assert 'missing.png: no such image file' in r.stderr and 'broken.jpg: not a readable image' in r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(paths) and all(l.split(':')[0] in paths for l in lines)
    det = Detector.from_checkpoint(tiny['weights'], project=tiny['project'], image_size=256, iou=0.0, max_det=3)
    for name, (h, w) in paths.items():
        stem, ext = os.path.splitext(name)
        record = json.loads((out / f'{stem}.json').read_text())
        assert (record['height'], record['width']) == (h, w)
        assert 1 <= len(record['detections']) <= 3
        assert f'{name}: {len(record["detections"])} detection' in r.stdout
        # the JSON is exactly what the Detector finds in-process
        mine = det(str(tmp_path / name))[0].to_list()
        assert [d['class_name'] for d in mine] == [d['class_name'] for d in record['detections']]
        np.testing.assert_allclose([[d[k] for k in ('x1', 'y1', 'x2', 'y2', 'score')] for d in mine],
                                   [[d[k] for k in ('x1', 'y1', 'x2', 'y2', 'score')] for d in record['detections']],
                                   atol=1e-3)
        for d in record['detections']:
            assert 0 <= d['x1'] <= d['x2'] <= w and 0 <= d['y1'] <= d['y2'] <= h
            assert d['class_name'] == CLASSES[d['class_id']]
        drawn = cv2.imread(str(out / name))
        assert drawn is not None and drawn.shape[:2] == (h, w)
        if ext == '.png':  # lossless: check the drawing pixel by pixel
            _check_drawn(record, drawn, read_image(str(tmp_path / name)))


def test_image_script_default_weights_missing(tmp_path):
    r = run_script([os.path.join(ROOT, 'efficientdet_test.py'), '-p', 'coco', '-c', '2'], cwd=str(tmp_path))
    assert r.returncode == 2
    assert 'Traceback' not in r.stderr
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and 'weights/efficientdet-d2-coco.pth' in msg and 'train' in msg
    # the demo runs from any folder: the shipped weights and demo image are found beside the scripts
    r = run_script([os.path.join(ROOT, 'efficientdet_test.py')], cwd=str(tmp_path))
    assert r.returncode == 0 and 'demo_shapes.jpg: 5 detections' in r.stdout, r.stderr


# ----------------------------------------------------------------------------- efficientdet_test_videos.py
def _make_video(path, frames=6, size=(128, 96)):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), 10.0, size)
    assert w.isOpened()
    for i in range(frames):
        f = np.full((size[1], size[0], 3), 40 + 20 * i, np.uint8)
        cv2.rectangle(f, (20 + 5 * i, 30), (60 + 5 * i, 70), (255, 255, 255), -1)
        w.write(f)
    w.release()


def _read_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


def test_video_script(tiny, tmp_path):
    src = tmp_path / 'clip.mp4'
    _make_video(src)
    out = tmp_path / 'res' / 'annotated.mp4'
    r = run_script(['efficientdet_test_videos.py', str(src), '-p', tiny['project'], '-w', tiny['weights'],
                    '--image_size', '128', '--max_det', '3', '--output', str(out)])
    assert r.returncode == 0, r.stderr
    assert 'Traceback' not in r.stderr and f'wrote 6 frame(s) to {out}' in r.stdout
    assert '6/6' in r.stderr  # tqdm progress
    frames = _read_frames(out)
    inputs = _read_frames(src)
    assert len(frames) == 6 and frames[0].shape == (96, 128, 3)
    # the FPS text (white on black outline) is drawn in the top-left corner of every frame
    assert all((f[:30, :90].astype(int) - i[:30, :90]).__abs__().max() > 100 for f, i in zip(frames, inputs))
    r = run_script(['efficientdet_test_videos.py', str(tmp_path / 'nope.mp4'), '-p', tiny['project'],
                    '-w', tiny['weights']])
    assert r.returncode == 2 and 'nope.mp4: no such video file' in r.stderr and 'Traceback' not in r.stderr


def test_video_script_takes_stream_urls(tiny, tmp_path):
    """Anything OpenCV opens is a source: a file:// URL plays like the file; an unreachable stream
    is one line, exit 2; --show without a GUI build says so instead of crashing."""
    src = tmp_path / 'clip.mp4'
    _make_video(src, frames=3)
    out = tmp_path / 'from_url.mp4'
    r = run_script(['efficientdet_test_videos.py', 'file://' + str(src), '-p', tiny['project'], '-w', tiny['weights'],
                    '--image_size', '128', '--output', str(out)])
    assert r.returncode == 0, r.stderr
    assert f'wrote 3 frame(s) to {out}' in r.stdout and len(_read_frames(out)) == 3
    r = run_script(['efficientdet_test_videos.py', 'http://127.0.0.1:9/none.mp4', '-p', tiny['project'],
                    '-w', tiny['weights'], '--image_size', '128', '--output', str(tmp_path / 'x.mp4')])
    assert r.returncode == 2 and 'not a reachable stream' in r.stderr and 'Traceback' not in r.stderr
    if not _has_gui():
        r = run_script(['efficientdet_test_videos.py', str(src), '--show', '-p', tiny['project'], '-w',
                        tiny['weights'], '--image_size', '128', '--output', str(tmp_path / 'y.mp4')])
        assert r.returncode == 2 and '--show: cannot open a window' in r.stderr and 'Traceback' not in r.stderr


def _has_gui() -> bool:
    import re
    m = re.search(r'GUI:\s*(\S+)', cv2.getBuildInformation())
    return bool(m) and m.group(1).upper() not in ('NONE', 'NO')


def test_video_script_ctrl_c_releases_writer(tiny, tmp_path, monkeypatch, capsys):
    import efficientdet_test_videos as vid
    src = tmp_path / 'clip.mp4'
    _make_video(src, frames=8)
    out = tmp_path / 'stopped.mp4'
    calls = {'n': 0}
    real_call = Detector.__call__

    def interrupting(self, *a, **k):
        calls['n'] += 1
        if calls['n'] == 4:
            raise KeyboardInterrupt
        return real_call(self, *a, **k)

    monkeypatch.setattr(Detector, '__call__', interrupting)
    code = vid.main([str(src), '-p', tiny['project'], '-w', tiny['weights'], '--image_size', '128',
                     '--output', str(out), '--no_progress'])
    assert code == 130
    assert 'stopped by Ctrl+C; wrote 3 frame(s)' in capsys.readouterr().out
    assert len(_read_frames(out)) == 3  # the writer was released: a playable file


@pytest.mark.parametrize('fmt,backend', [('onnx', 'onnxruntime'), ('openvino', 'openvino')])
def test_detector_on_exported_file_matches_torch(tiny, tmp_path, fmt, backend):
    """An exported file run by its runtime gives the same detections as the PyTorch model."""
    pytest.importorskip(backend)
    from efficientdet.export import export_model
    ref = Detector.from_checkpoint(tiny['weights'], project=tiny['project'], image_size=128, max_det=5)
    path = str(tmp_path / ('m.onnx' if fmt == 'onnx' else 'm.xml'))
    export_model(fmt, ref.model, path, image_size=128, obj_list=CLASSES)
    det = Detector.from_exported(path, backend=backend, max_det=5)  # classes and size from the file
    assert det.image_size == (128, 128) and det.obj_list == CLASSES
    img = (np.random.default_rng(5).random((70, 150, 3)) * 255).astype(np.uint8)
    a, b = ref(img)[0], det(img)[0]
    assert len(a) == len(b) > 0 and a.class_names == b.class_names
    np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-2)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-4)


def test_detector_torch_paths_agree(tiny):
    """The fused fast path (default) and the eager model give the same detections; ``half`` on CPU is
    bfloat16 autocast with float32 anchors and decoding (boxes close, not bit-equal)."""
    from efficientdet.postprocess import BestClass
    fused = Detector.from_checkpoint(tiny['weights'], project=tiny['project'], image_size=128)
    plain = Detector(fused.model, CLASSES, 128, fuse=False)
    half = Detector(fused.model, CLASSES, 128, half=True)
    assert fused.runner.fused and not plain.runner.fused and not half.runner.fused
    img = (np.random.default_rng(3).random((90, 128, 3)) * 255).astype(np.uint8)
    a, b = fused(img)[0], plain(img)[0]
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    batch, _ = half.preprocess([img])
    _, reg, best, anchors = half.forward(batch)
    assert reg.dtype == anchors.dtype == best.scores.dtype == torch.float32 and isinstance(best, BestClass)
    assert torch.equal(anchors, fused.model.anchors(batch, torch.float32))  # never computed in half precision
    c = half(img)[0]
    assert len(c) > 0 and np.abs(c.scores[:1] - a.scores[:1]).max() < 0.05


@pytest.mark.slow
def test_detector_compiled_equals_eager(tiny):
    """``compile=True`` (the scripts' ``--compile``): torch.compile of the fused network, with frozen
    weights on a CPU; the same detections as the uncompiled fused model (compiles once, ~1 min)."""
    fused = Detector.from_checkpoint(tiny['weights'], project=tiny['project'], image_size=128)
    compiled = Detector(fused.model, CLASSES, 128, compile=True)
    assert compiled.runner.compiled and compiled.runner.fused
    img = (np.random.default_rng(5).random((90, 128, 3)) * 255).astype(np.uint8)
    a, b = fused(img)[0], compiled(img)[0]
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert list(a.class_ids) == list(b.class_ids)


def test_compile_is_for_the_torch_backend(tiny, tmp_path):
    with pytest.raises(UserError, match='--compile applies to the torch backend'):
        Detector(StubModel(), CLASSES, 128, compile=True)
    r = run_script(['efficientdet_test.py', str(tmp_path / 'x.jpg'), '--backend', 'onnxruntime', '-w', 'm.onnx',
                    '--compile'])
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert '--compile applies to the torch backend (a PyTorch model), not to onnxruntime' in r.stderr
