"""Post-training int8: the calibration images (``efficientdet.runtimes.calibration``, shared by
both int8 exports) and ``python -m efficientdet.export openvino --int8`` (NNCF). The LiteRT int8
export is tested in ``test_litert.py``."""
import io
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from conftest import run_isolated
from efficientdet.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTS = os.path.join(ROOT, 'projects')
SHAPES_WEIGHTS = os.path.join(ROOT, 'weights', 'efficientdet-d0-shape.pth')
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope='module')
def shapes_data(tmp_path_factory):
    """5 training and 6 validation shapes scenes (256 px) as project 'shape' expects."""
    from efficientdet.data.shapes import generate_split
    data = tmp_path_factory.mktemp('data')
    generate_split(str(data / 'shape'), 'train', 5, 256, seed=0)
    generate_split(str(data / 'shape'), 'val', 6, 256, seed=7)
    return str(data)


def _project():
    from efficientdet.project import load_project
    return load_project('shape', PROJECTS)


def test_calibration_images_are_the_datasets_own_preprocessing(shapes_data):
    """A CalibrationSet reads training images through the package's dataset (letterbox,
    normalisation, padding): each image equals ``build_dataset(...)[i]['img']``; a sample of a
    larger split is fixed by the seed, distinct and in order; fewer images than asked: all of them.
    Iterable again (read anew), batched to a fixed size with the last batch filled up."""
    from efficientdet.data import build_dataset
    from efficientdet.runtimes.calibration import CalibrationSet, calibration_images
    calib = CalibrationSet(_project(), shapes_data, count=300)
    images = calibration_images(calib, (192, 256), MEAN, STD)
    assert len(images) == 5 and images.description == 'shape/train'
    ds = build_dataset(_project(), 'train', (192, 256), shapes_data, mean=MEAN, std=STD)
    got = list(images)
    assert [tuple(x.shape) for x in got] == [(1, 3, 192, 256)] * 5
    for i, x in enumerate(got):
        torch.testing.assert_close(x[0], ds[i]['img'], rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(got, images))  # a second pass, the same images
    batches = list(images.batches(2))
    assert [b.shape[0] for b in batches] == [2, 2, 2]
    assert torch.equal(batches[2][0], got[4][0]) and torch.equal(batches[2][1], got[0][0])  # filled up
    assert torch.equal(images.head(3), torch.cat(got[:3]))
    small = CalibrationSet(_project(), shapes_data, count=3, seed=1)
    picked = small.indices(50)
    assert picked == sorted(set(picked)) and len(picked) == 3 and picked == small.indices(50)
    assert CalibrationSet(_project(), shapes_data, count=3, seed=2).indices(50) != picked
    assert small.indices(2) == [0, 1]


def test_calibration_mistakes_are_one_line(shapes_data, tmp_path):
    import argparse
    from efficientdet.runtimes.calibration import CalibrationSet, calibration_from_args, calibration_images
    with pytest.raises(UserError, match='--calib_images'):
        CalibrationSet(_project(), shapes_data, count=0)
    args = argparse.Namespace(project=None, num_classes=3, projects_dir=PROJECTS, data_path=shapes_data,
                              calib_images=8)
    with pytest.raises(UserError, match='-p PROJECT'):
        calibration_from_args(args)
    with pytest.raises(UserError):  # no such dataset folder
        calibration_images(CalibrationSet(_project(), str(tmp_path)), 256, MEAN, STD)
    with pytest.raises(UserError, match=r'\[N, 3, 256, 256\]'):
        calibration_images([torch.zeros(2, 3, 128, 128)], 256, MEAN, STD)
    with pytest.raises(UserError, match='no calibration images'):
        calibration_images([], 256, MEAN, STD)


def test_openvino_int8_export_keeps_anchors_and_detections(shapes_data, tmp_path):
    """``export openvino --int8``: NNCF-quantized IR (int8 FakeQuantize nodes in the graph), its
    metadata saying so, the float graph verified first, the anchors exactly the float32 model's,
    and on fresh validation images a confident torch detection (score > 0.5) has an int8 one
    of the same class with IoU >= 0.8 for at least 90% of them (calibrated on 4 images only)."""
    pytest.importorskip('openvino')
    pytest.importorskip('nncf')
    if not os.path.isfile(SHAPES_WEIGHTS):
        pytest.skip(f'{SHAPES_WEIGHTS} (shipped weights) is absent')
    run_isolated(_openvino_int8_check, shapes_data, str(tmp_path))  # NNCF and OpenVINO int8: own process


def _openvino_int8_check(shapes_data: str, tmp: str) -> None:
    """The body of the test above, run in a fresh process."""
    import pathlib
    from efficientdet.detector import Detector
    from efficientdet.export import main as export_main
    from efficientdet.runtimes import load_runtime
    from test_litert import _match
    tmp_path = pathlib.Path(tmp)
    path = str(tmp_path / 'int8.xml')
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert export_main(['openvino', '-c', '0', '-p', 'shape', '--projects_dir', PROJECTS, '-w', SHAPES_WEIGHTS,
                            '--image_size', '256', '--int8', '--data_path', shapes_data, '--calib_images', '4',
                            '-o', path]) == 0
    out = buf.getvalue()
    assert 'verified against the eager model: regression max|diff|' in out  # the float graph first
    assert 'int8 regression max|diff|' in out
    assert sorted(os.listdir(tmp_path)) == ['int8.bin', 'int8.xml']
    rt = load_runtime('openvino', path, threads=2)
    assert rt.meta['quantization'] == 'int8' and rt.meta['calib_images'] == '4'
    assert any(op.get_type_name() == 'FakeQuantize' for op in rt.model.get_ops())
    from efficientdet.factory import build_model
    model = build_model(0, project=os.path.join(PROJECTS, 'shape.yml'), weights=SHAPES_WEIGHTS, image_size=256,
                        verbose=False)
    x = torch.zeros(1, 3, 256, 256)
    with torch.inference_mode():
        anchors = model(x)[3]
    assert torch.equal(rt(x)[3], anchors)
    val = os.path.join(shapes_data, 'shape', 'val')
    images = sorted(os.path.join(val, f) for f in os.listdir(val))
    det8 = Detector.from_exported(path, backend='openvino', threshold=0.3)
    ref = Detector.from_checkpoint(SHAPES_WEIGHTS, compound_coef=0, project='shape', projects_dir=PROJECTS,
                                   image_size=256, threshold=0.3)
    oks = []
    for got, want in zip(det8(images), ref(images)):
        ok, _ = _match(got, want, 0.8)
        oks.append(ok[want.scores > 0.5])
    oks = np.concatenate(oks)
    assert len(oks) >= 10 and oks.mean() >= 0.9, oks


def test_openvino_int8_needs_a_project(tmp_path):
    from efficientdet.export import main as export_main
    with pytest.raises(UserError, match='-p PROJECT'):
        export_main(['openvino', '-c', '0', '--num_classes', '3', '-w', 'random', '--image_size', '128', '--int8',
                     '-o', str(tmp_path / 'x.xml')])
    assert not os.listdir(tmp_path)
