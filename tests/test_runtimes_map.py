"""Every backend proves its accuracy: ``coco_eval.py --backend X`` on an exported file gives the
mAP of the PyTorch model (within 0.001) on a small synthetic shapes validation set, with the
shipped shapes D0 weights."""
import io
import os
import re
import sys
from contextlib import redirect_stdout

import pytest

from conftest import skip_hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, 'weights', 'efficientdet-d0-shape.pth')
SIZE = '256'

pytestmark = pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason=f'{WEIGHTS} (shipped weights) is absent')


@pytest.fixture(scope='module')
def shapes_val(tmp_path_factory):
    """12 fresh 256-px shapes scenes (seed 7) laid out as project 'shape' expects."""
    from efficientdet.data.shapes import generate_split
    data = tmp_path_factory.mktemp('data')
    generate_split(str(data / 'shape'), 'val', 12, 256, seed=7)
    return str(data)


def _coco_eval(*args: str) -> str:
    sys.path.insert(0, ROOT)
    import coco_eval
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert coco_eval.main(list(args)) == 0
    return buf.getvalue()


def _map(out: str) -> float:
    m = re.search(r'Average Precision\s+\(AP\) @\[ IoU=0\.50:0\.95 \| area=\s*all \| maxDets=100 \] = ([-\d.]+)', out)
    assert m, out[-2000:]
    return float(m.group(1))


@pytest.fixture(scope='module')
def torch_map(shapes_val, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('torch')
    out = _coco_eval('-p', 'shape', '-c', '0', '-w', WEIGHTS, '--data_path', shapes_val, '--image_size', SIZE,
                     '--device', 'cpu', '--output_dir', str(out_dir), '--no_progress', '--projects_dir',
                     os.path.join(ROOT, 'projects'))
    value = _map(out)
    assert value > 0.3, 'the shipped shapes model detects shapes: the comparison below is not between zeros'
    return value


@pytest.mark.parametrize('fmt,backend', [('onnx', 'onnxruntime'), ('openvino', 'openvino'),
                                         ('torchscript', 'torchscript')])
def test_backend_map_equals_torch(fmt, backend, shapes_val, torch_map, tmp_path):
    if backend == 'openvino':
        pytest.importorskip('openvino')
    from efficientdet.export import main as export_main
    path = str(tmp_path / ('model' + {'onnx': '.onnx', 'openvino': '.xml', 'torchscript': '.pt'}[fmt]))
    projects = os.path.join(ROOT, 'projects')
    with redirect_stdout(io.StringIO()):
        assert export_main([fmt, '-c', '0', '-p', 'shape', '--projects_dir', projects, '-w', WEIGHTS,
                            '--image_size', SIZE, '-o', path, '--no-verify']) == 0  # verified: test_export.py
    out = _coco_eval('-p', 'shape', '-c', '0', '-w', path, '--backend', backend, '--data_path', shapes_val,
                     '--image_size', SIZE, '--device', 'cpu', '--output_dir', str(tmp_path), '--no_progress',
                     '--projects_dir', projects, '--threads', '1')
    assert abs(_map(out) - torch_map) <= 0.001, (backend, _map(out), torch_map)


def test_openvino_half_runs_reduced_precision_close_to_torch(shapes_val, torch_map, tmp_path):
    """``--float16`` with the openvino backend compiles the IR for bfloat16 (or float16) inference:
    the runtime says which, and the mAP stays close to float32 torch (bfloat16 costs about 0.003
    mAP on 100 shapes images; a broken reduced-precision path would lose far more)."""
    pytest.importorskip('openvino')
    from efficientdet.errors import UserError
    from efficientdet.export import main as export_main
    from efficientdet.runtimes import load_runtime
    from efficientdet.runtimes.openvino_backend import reduced_precision
    try:
        precision = reduced_precision()
    except UserError as e:
        skip_hardware(f'this CPU has no reduced-precision OpenVINO inference: {e}')
    path = str(tmp_path / 'model.xml')
    projects = os.path.join(ROOT, 'projects')
    with redirect_stdout(io.StringIO()):
        assert export_main(['openvino', '-c', '0', '-p', 'shape', '--projects_dir', projects, '-w', WEIGHTS,
                            '--image_size', SIZE, '-o', path, '--no-verify']) == 0
    # what OpenVINO itself compiled the network for, not only what was asked
    assert load_runtime('openvino', path, threads=1, half=True).compiled_precision() == precision
    assert load_runtime('openvino', path, threads=1).compiled_precision() == 'f32'
    out = _coco_eval('-p', 'shape', '-c', '0', '-w', path, '--backend', 'openvino', '--float16', '--data_path',
                     shapes_val, '--image_size', SIZE, '--device', 'cpu', '--output_dir', str(tmp_path),
                     '--no_progress', '--projects_dir', projects, '--threads', '1')
    assert abs(_map(out) - torch_map) <= 0.02, (precision, _map(out), torch_map)
