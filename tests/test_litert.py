"""LiteRT (TFLite): ``python -m efficientdet.export tflite`` and ``--backend litert``
(``efficientdet.runtimes.litert_backend``), float and int8.

One float conversion (the official Lite0 variables at 320 px, where P7 3x3 -> P6 5x5 is not a x2
resize) and one int8 conversion (the shipped shapes D0 at 256 px, fixed batch 2) are shared by the
fast tests through module fixtures; each conversion takes ~30 s.
"""
import importlib.util
import io
import json
import os
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from conftest import FIXTURES, need_shared
from efficientdet.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTS = os.path.join(ROOT, 'projects')
SHAPES_WEIGHTS = os.path.join(ROOT, 'weights', 'efficientdet-d0-shape.pth')
LITE0 = os.path.join(FIXTURES, 'tf_lite0')


def _export(argv):
    from efficientdet.export import main as export_main
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert export_main(argv) == 0
    return buf.getvalue()


def _within(got, ref, tol=1e-4):
    """|got - ref| <= tol * (1 + |ref|) everywhere (the export check's rule); the max |diff|."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    d = np.abs(got - ref)
    assert (d <= tol * (1 + np.abs(ref))).all(), float(d.max())
    return float(d.max())


def _op_counts(path):
    """{LiteRT builtin op name: count} of a .tflite file."""
    from collections import Counter
    from ai_edge_litert import schema_py_generated as fb
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith('_')}
    with open(path, 'rb') as f:
        model = fb.Model.GetRootAs(f.read(), 0)
    graph = model.Subgraphs(0)
    codes = [model.OperatorCodes(graph.Operators(i).OpcodeIndex()) for i in range(graph.OperatorsLength())]
    return Counter(names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())] for c in codes)


# ----------------------------------------------------------------------------- official Lite0, float
@pytest.fixture(scope='module')
def lite0_tflite(tmp_path_factory):
    """The official Lite0 variables (``tf_lite0``) converted to a .pth, then exported by the CLI
    with no option but the variant: 320 px, batch 1, head 'best', float32."""
    pytest.importorskip('litert_torch')
    pytest.importorskip('ai_edge_litert')
    from efficientdet.convert.__main__ import main as convert_main
    from efficientdet.model import EfficientDetBackbone
    npz = need_shared('fixtures', 'tf_lite0', 'tf_weights.npz')
    folder = tmp_path_factory.mktemp('lite0')
    pth, path = str(folder / 'lite0.pth'), str(folder / 'lite0.tflite')
    with redirect_stdout(io.StringIO()):
        assert convert_main(['tf', npz, '-c', 'lite0', '-o', pth]) == 0
    out = _export(['tflite', '-c', 'lite0', '-w', pth, '--num_classes', '90', '-o', path])
    model = EfficientDetBackbone(num_classes=90, compound_coef='lite0').eval()
    model.load_state_dict(torch.load(pth, weights_only=True))
    with np.load(os.path.join(LITE0, 'tf_outputs.npz')) as z:
        ref = {k: z[k] for k in z.files}
    return dict(path=path, pth=pth, out=out, model=model, ref=ref)


def test_official_lite0_fixture_through_the_tflite(lite0_tflite):
    """The fixture's batch of 2 (a street photo and noise) through the batch-1 file (two pieces):
    regression and best-class scores equal the official outputs within 1e-4, the labels are the
    official best classes, the anchors are the official ones and the decoded boxes match."""
    from efficientdet.anchors import decode_boxes
    from efficientdet.runtimes import load_runtime
    ref = lite0_tflite['ref']
    rt = load_runtime('litert', lite0_tflite['path'], threads=2)
    assert rt.batch_size == 1 and rt.image_size == (320, 320)
    x = torch.from_numpy(ref['input']).permute(0, 3, 1, 2).float()
    out = rt.run(x)
    box_ref = np.concatenate([ref[f'box_p{lvl}'].reshape(2, -1, 4) for lvl in range(3, 8)], 1)
    cls_ref = np.concatenate([ref[f'class_p{lvl}'].reshape(2, -1, 90) for lvl in range(3, 8)], 1)
    _within(out['regression'].numpy(), box_ref)
    _within(out['scores'].numpy(), 1 / (1 + np.exp(-cls_ref.max(-1))))
    top2 = np.sort(cls_ref, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4  # where the official best class is not a near-tie
    assert (out['labels'].numpy() == cls_ref.argmax(-1))[clear].all() and clear.mean() > 0.99
    assert np.abs(out['anchors'][0].double().numpy() - ref['anchors_yxyx']).max() <= 1e-3
    decoded = decode_boxes(out['regression'], out['anchors']).numpy()
    dref = ref['decoded_boxes_yxyx']
    assert (np.abs(decoded - dref) <= 1e-3 + 1e-4 * np.abs(dref)).all()


def test_graph_has_the_exact_forms(lite0_tflite):
    """The 3x3 -> 5x5 up-sampling of each BiFPN cell is a gather (2 per cell, 3 cells), the x2 ones
    stay resizes; the 5x5 -> 3x3 max-pool is a SAME pool, no pad with an -inf constant (int8 cannot
    quantize it)."""
    ops = _op_counts(lite0_tflite['path'])
    assert ops['GATHER_ND'] + ops['GATHER'] == 6 and ops['RESIZE_NEAREST_NEIGHBOR'] == 9
    assert ops['PADV2'] == 0 and ops['MAX_POOL_2D'] > 0


def test_export_is_verified_and_the_file_describes_itself(lite0_tflite, tmp_path):
    """The CLI verified the file against the eager model (printed); ``-w model.tflite`` alone is
    enough for ``Detector.from_exported``: variant, classes, input size, normalisation and head come
    from the flatbuffer's metadata, and the detections equal the PyTorch detector's."""
    from efficientdet.config import resolve_normalization
    from efficientdet.detector import Detector
    from efficientdet.runtimes.litert_backend import read_metadata
    assert 'verified against the eager model: regression' in lite0_tflite['out']
    with open(lite0_tflite['path'], 'rb') as f:
        meta = read_metadata(f.read())
    assert meta['compound_coef'] == 'lite0' and meta['num_classes'] == '90' and meta['head'] == 'best'
    assert json.loads(meta['image_size']) == [320, 320] and meta['quantization'] == 'float32'
    assert json.loads(meta['outputs']) == ['regression', 'scores', 'labels'] and meta['batch_size'] == '1'
    mean, std = resolve_normalization('lite0', None, None)
    assert json.loads(meta['mean']) == list(mean) and json.loads(meta['std']) == list(std)
    det = Detector.from_exported(lite0_tflite['path'], backend='litert', threshold=0.05)
    assert det.image_size == (320, 320) and len(det.obj_list) == 90 and det.mean == tuple(mean)
    ref_det = Detector(lite0_tflite['model'], [str(i) for i in range(90)], 320, threshold=0.05)
    image = os.path.join(ROOT, 'assets', 'demo_shapes.jpg')
    got, want = det(image)[0], ref_det(image)[0]
    assert len(want) > 0 and len(got) == len(want)
    np.testing.assert_array_equal(got.class_ids, want.class_ids)
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)


def test_runtime_refuses_what_it_cannot_run(lite0_tflite, tmp_path):
    from efficientdet.runtimes import load_runtime
    rt = load_runtime('litert', lite0_tflite['path'])
    with pytest.raises(UserError, match='--image_size 320 320'):
        rt(torch.zeros(1, 3, 256, 256))
    with pytest.raises(UserError, match='no such'):
        load_runtime('litert', str(tmp_path / 'missing.tflite'))
    junk = tmp_path / 'junk.tflite'
    junk.write_bytes(b'not a flatbuffer' * 10)
    with pytest.raises(UserError, match='export tflite'):
        load_runtime('litert', str(junk))
    with pytest.raises(UserError, match='--half'):
        load_runtime('litert', lite0_tflite['path'], half=True)


def test_export_options_are_checked(lite0_tflite, tmp_path):
    """Mistakes are refused before anything is converted or written."""
    pth = lite0_tflite['pth']
    out = str(tmp_path / 'x.tflite')
    n90 = ['--num_classes', '90']
    with pytest.raises(UserError, match='-p PROJECT'):
        _export(['tflite', '-c', 'lite0', '-w', pth, *n90, '--int8', '-o', out])
    with pytest.raises(UserError, match='.tflite'):
        _export(['tflite', '-c', 'lite0', '-w', pth, *n90, '-o', str(tmp_path / 'x.onnx')])
    with pytest.raises(UserError, match='--batch_size'):
        _export(['tflite', '-c', 'lite0', '-w', pth, *n90, '--batch_size', '0', '-o', out])
    with pytest.raises(UserError, match='--full_integer goes with --int8'):
        _export(['tflite', '-c', 'lite0', '-w', pth, *n90, '--full_integer', '-o', out])
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- int8
@pytest.fixture(scope='module')
def shapes_data(tmp_path_factory):
    """A few fresh shapes scenes as project 'shape' expects: 5 training images (calibration) and 6
    validation images."""
    from efficientdet.data.shapes import generate_split
    data = tmp_path_factory.mktemp('data')
    generate_split(str(data / 'shape'), 'train', 5, 256, seed=0)
    generate_split(str(data / 'shape'), 'val', 6, 256, seed=7)
    return str(data)


@pytest.fixture(scope='module')
def shapes_int8(shapes_data, tmp_path_factory):
    """The shipped shapes D0 exported ``--int8`` at 256 px with a fixed batch of 2, calibrated on
    the 5 training images (batches of 2: the last one is filled up)."""
    pytest.importorskip('litert_torch')
    pytest.importorskip('ai_edge_quantizer')
    if not os.path.isfile(SHAPES_WEIGHTS):
        pytest.skip(f'{SHAPES_WEIGHTS} (shipped weights) is absent')
    path = str(tmp_path_factory.mktemp('int8') / 'shape_int8.tflite')
    out = _export(['tflite', '-c', '0', '-p', 'shape', '--projects_dir', PROJECTS, '-w', SHAPES_WEIGHTS,
                   '--image_size', '256', '--batch_size', '2', '--int8', '--data_path', shapes_data,
                   '--calib_images', '10', '-o', path])
    return dict(path=path, out=out)


def _iou(box, boxes):
    """IoU of one (x1, y1, x2, y2) box with each of boxes [N, 4]."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area(box) + area(boxes) - inter)


def _match(got, want, iou_min: float):
    """For each detection of ``want``: whether ``got`` has one of the same class with IoU >= iou_min,
    and the score difference to the best such one."""
    ok, dscore = [], []
    for box, cls, score in zip(want.boxes, want.class_ids, want.scores):
        same = got.class_ids == cls
        if not same.any():
            ok.append(False)
            continue
        iou = _iou(box, got.boxes[same])
        ok.append(iou.max() >= iou_min)
        dscore.append(abs(got.scores[same][iou.argmax()] - score))
    return np.array(ok), np.array(dscore)


def test_int8_file_calibrated_on_the_project_anchors_float_detections_close(shapes_int8, shapes_data):
    """Full-integer int8 file: int8 input, metadata saying what it was calibrated on, anchors
    exactly the float32 model's (computed outside the graph), a batch of 3 run in pieces of the
    file's 2, and on fresh validation images the int8 detections are the float model's: at least
    90% of the confident torch detections (score > 0.5) have an int8 one of the same class with
    IoU >= 0.8, their scores within 0.05 (median)."""
    from efficientdet.detector import Detector
    from efficientdet.factory import build_model
    from efficientdet.runtimes import load_runtime
    rt = load_runtime('litert', shapes_int8['path'], threads=2)
    assert 'int8 regression max|diff|' in shapes_int8['out']
    assert rt.quantization == 'int8' and rt.batch_size == 2 and rt.meta['calib_images'] == '5'
    assert rt.meta['calib_data'] == 'shape/train' and rt.meta['obj_list'] == ['rectangle', 'circle', 'triangle']
    assert np.dtype(rt._input['dtype']) == np.int8
    model = build_model(0, project=os.path.join(PROJECTS, 'shape.yml'), weights=SHAPES_WEIGHTS, image_size=256,
                        verbose=False)
    with torch.inference_mode():
        anchors = model(torch.zeros(1, 3, 256, 256))[3]
    assert rt.anchors.dtype == torch.float32 and torch.equal(rt.anchors, anchors)
    x = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    whole = rt.run(x)
    assert whole['regression'].shape[0] == 3 and whole['regression'].dtype == torch.float32
    first = rt.run(x[:1])
    torch.testing.assert_close(whole['regression'][:1], first['regression'], rtol=0, atol=0)

    images = sorted(os.path.join(shapes_data, 'shape', 'val', f) for f in os.listdir(os.path.join(shapes_data,
                                                                                                    'shape', 'val')))
    det8 = Detector.from_exported(shapes_int8['path'], backend='litert', threshold=0.3)
    ref = Detector.from_checkpoint(SHAPES_WEIGHTS, compound_coef=0, project='shape', projects_dir=PROJECTS,
                                   image_size=256, threshold=0.3)
    assert det8.image_size == (256, 256) and det8.obj_list == ['rectangle', 'circle', 'triangle']
    oks, dscores = [], []
    for got, want in zip(det8(images), ref(images)):
        confident = want.scores > 0.5
        ok, dscore = _match(got, want, 0.8)
        oks.append(ok[confident])
        dscores.append(dscore)
    oks, dscores = np.concatenate(oks), np.concatenate(dscores)
    assert len(oks) >= 10 and oks.mean() >= 0.9, oks
    assert np.median(dscores) <= 0.05, dscores


# ----------------------------------------------------------------------------- optional packages
def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    """Without ai-edge-litert the runtime, without litert-torch the export, without
    ai-edge-quantizer the int8 export: one line naming the package to install."""
    from efficientdet.model import EfficientDetBackbone
    from efficientdet.runtimes import get_target, load_runtime
    model = EfficientDetBackbone(num_classes=3, compound_coef=0).eval()
    target = get_target('litert')
    monkeypatch.setitem(sys.modules, 'ai_edge_litert', None)
    monkeypatch.setitem(sys.modules, 'ai_edge_litert.interpreter', None)
    with pytest.raises(UserError, match='pip install ai-edge-litert'):
        load_runtime('litert', str(tmp_path / 'x.tflite'))
    monkeypatch.setitem(sys.modules, 'litert_torch', None)
    with pytest.raises(UserError, match='litert-torch package: pip install'):
        target.export(model, str(tmp_path / 'x.tflite'), 128)
    monkeypatch.setitem(sys.modules, 'ai_edge_quantizer', None)
    monkeypatch.setitem(sys.modules, 'ai_edge_quantizer.quantizer', None)
    from efficientdet.runtimes.litert_backend import quantize
    with pytest.raises(UserError, match='ai-edge-quantizer package: pip install'):
        quantize(b'', 'int8', [])
    assert not os.listdir(tmp_path)


def test_metadata_round_trip_keeps_the_model():
    """``with_metadata`` replaces an earlier entry, moves every buffer inside the flatbuffer
    16-byte aligned, and ``read_metadata`` reads it back; a file without it reads as {}."""
    pytest.importorskip('ai_edge_litert')
    pytest.importorskip('flatbuffers')
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb
    from efficientdet.runtimes.litert_backend import read_metadata, with_metadata
    model = fb.ModelT()
    model.version = 3
    model.buffers = [fb.BufferT(), fb.BufferT()]
    model.buffers[1].data = np.arange(37, dtype=np.uint8)
    model.subgraphs = []
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b'TFL3')
    data = bytes(builder.Output())
    assert read_metadata(data) == {}
    once = with_metadata(data, {'a': '1', 'b': '[2, 3]'})
    twice = with_metadata(once, {'a': '4'})
    assert read_metadata(once) == {'a': '1', 'b': '[2, 3]'} and read_metadata(twice) == {'a': '4'}
    back = fb.Model.GetRootAs(twice, 0)
    assert [back.Metadata(i).Name() for i in range(back.MetadataLength())] == [b'efficientdet']
    buf = back.Buffers(1)
    np.testing.assert_array_equal(buf.DataAsNumpy(), np.arange(37, dtype=np.uint8))
    assert buf._tab.Vector(buf._tab.Offset(4)) % 16 == 0
    assert read_metadata(b'junk' * 8) == {}


# ----------------------------------------------------------------------------- slow: mAP, other sizes
@pytest.mark.slow
def test_lite2_at_its_own_448_converts_exactly(tmp_path):
    """Lite2 at its own 448 px (levels 56, 28, 14, 7, 4: P7 4x4 -> P6 7x7 is not a x2 resize), random
    non-trivial weights, head 'full': the export's own check against the eager model (1e-4)
    passes."""
    pytest.importorskip('litert_torch')
    from test_export import randomize_
    from efficientdet.export import export_model
    from efficientdet.model import EfficientDetBackbone
    torch.manual_seed(0)
    model = randomize_(EfficientDetBackbone(num_classes=7, compound_coef='lite2'))
    diffs = export_model('tflite', model, str(tmp_path / 'lite2.tflite'), 448, head='full')
    assert set(diffs) == {'regression', 'classification', 'anchors'} and max(diffs.values()) <= 1e-4


@pytest.mark.slow
def test_int16x8_file_runs_with_its_16_bit_scales(shapes_data, tmp_path):
    """``--int16x8`` (int8 weights, 16-bit activations, heads float32): an int16 input quantized
    by the runtime, float outputs, and detections of the float model on fresh validation images."""
    pytest.importorskip('litert_torch')
    pytest.importorskip('ai_edge_quantizer')
    if not os.path.isfile(SHAPES_WEIGHTS):
        pytest.skip(f'{SHAPES_WEIGHTS} (shipped weights) is absent')
    from efficientdet.detector import Detector
    from efficientdet.runtimes import load_runtime
    path = str(tmp_path / 'q16.tflite')
    _export(['tflite', '-c', '0', '-p', 'shape', '--projects_dir', PROJECTS, '-w', SHAPES_WEIGHTS, '--image_size',
             '256', '--int16x8', '--data_path', shapes_data, '-o', path])
    rt = load_runtime('litert', path, threads=2)
    assert rt.quantization == 'int16x8' and np.dtype(rt._input['dtype']) == np.int16
    val = os.path.join(shapes_data, 'shape', 'val')
    images = sorted(os.path.join(val, f) for f in os.listdir(val))
    det = Detector.from_exported(path, backend='litert', threshold=0.3)
    ref = Detector.from_checkpoint(SHAPES_WEIGHTS, compound_coef=0, project='shape', projects_dir=PROJECTS,
                                   image_size=256, threshold=0.3)
    oks = np.concatenate([_match(got, want, 0.8)[0][want.scores > 0.5]
                          for got, want in zip(det(images), ref(images))])
    assert len(oks) >= 10 and oks.mean() >= 0.9, oks


@pytest.mark.slow
def test_map_of_every_precision_on_the_shapes_val_set(tmp_path):
    """``coco_eval.py --backend litert`` on 40 fresh 256-px shapes images with the shipped D0 (fewer
    make the mAP of an int8 file swing by a few hundredths with the calibration's rounding):
    the float .tflite gives the torch mAP within 0.001; LiteRT int8 and OpenVINO int8, calibrated
    on 32 training images, stay within 0.03 (measured on 200 images at 512 px: docs/benchmark.md)."""
    pytest.importorskip('litert_torch')
    pytest.importorskip('ai_edge_quantizer')
    if not os.path.isfile(SHAPES_WEIGHTS):
        pytest.skip(f'{SHAPES_WEIGHTS} (shipped weights) is absent')
    from efficientdet.data.shapes import generate_split
    from test_runtimes_map import _coco_eval, _map
    data = tmp_path / 'data'
    generate_split(str(data / 'shape'), 'train', 32, 256, seed=0)
    generate_split(str(data / 'shape'), 'val', 40, 256, seed=7)
    common = ['-p', 'shape', '-c', '0', '--data_path', str(data), '--image_size', '256', '--device', 'cpu',
              '--no_progress', '--projects_dir', PROJECTS]
    torch_map = _map(_coco_eval(*common, '-w', SHAPES_WEIGHTS, '--output_dir', str(tmp_path / 'torch')))
    assert torch_map > 0.3
    exports = {'litert': ['tflite', '-o', str(tmp_path / 'f.tflite')],
               'litert_int8': ['tflite', '--int8', '-o', str(tmp_path / 'q.tflite')]}
    if all(importlib.util.find_spec(m) for m in ('openvino', 'nncf')):
        exports['openvino_int8'] = ['openvino', '--int8', '-o', str(tmp_path / 'q.xml')]
    for name, argv in exports.items():
        _export(argv[:1] + ['-c', '0', '-p', 'shape', '--projects_dir', PROJECTS, '-w', SHAPES_WEIGHTS,
                            '--image_size', '256', '--data_path', str(data), '--no-verify'] + argv[1:])
        backend = name.split('_')[0]
        got = _map(_coco_eval(*common, '-w', argv[-1], '--backend', backend, '--threads', '2',
                              '--output_dir', str(tmp_path / name)))
        assert abs(got - torch_map) <= (0.001 if name == 'litert' else 0.03), (name, got, torch_map)


def test_calibration_ranges_are_the_plain_mean_over_the_images():
    """Each calibration image's min/max, averaged with equal weights (not the quantizer's moving
    average, which the last images dominate); other entries pass through."""
    from efficientdet.runtimes.litert_backend import RangeMean
    ranges = RangeMean()
    for lo, hi in ((-1.0, 2.0), (-3.0, 4.0), (-2.0, 9.0)):
        ranges.add({'t': {'min': np.array([lo, 2 * lo]), 'max': np.array([hi, 2 * hi])}, 'other': 'x'})
    got = ranges.mean()
    assert ranges.count == 3 and got['other'] == 'x'
    np.testing.assert_allclose(got['t']['min'], [-2.0, -4.0])
    np.testing.assert_allclose(got['t']['max'], [5.0, 10.0])
    assert got['t']['min'].dtype == np.float32 and 'n' not in got['t']
