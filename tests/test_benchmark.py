"""benchmark.py: report fields, stage timing, input, post-processing really exercised, user errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchmark  # noqa: E402
from efficientdet.errors import UserError  # noqa: E402

FIELDS = ('latency_ms_median', 'latency_ms_p90', 'latency_ms_mean', 'latency_ms_min', 'latency_ms_max', 'fps',
          'images_per_second', 'peak_memory_mb', 'device', 'threads', 'torch_version', 'backend', 'mode',
          'settings', 'batch_size', 'image_size', 'compound_coef')


def _check_report(r: dict, backend: str, mode: str, batch: int, iters: int) -> None:
    for f in FIELDS:
        assert f in r, f
    assert r['backend'] == backend and r['mode'] == mode and r['batch_size'] == batch
    assert 0 < r['latency_ms_min'] <= r['latency_ms_median'] <= r['latency_ms_p90'] <= r['latency_ms_max']
    assert r['fps'] == pytest.approx(1000.0 / r['latency_ms_median'], rel=1e-3)
    assert r['images_per_second'] == pytest.approx(batch * r['fps'], rel=1e-3)
    assert r['peak_memory_mb'] > 20  # the process holds torch and a model
    assert r['device'] == benchmark.cpu_model_name() and r['device']
    assert r['torch_version'] == torch.__version__
    assert r['settings']['iters'] == iters


def test_cli_writes_json(tmp_path):
    out = tmp_path / 'r.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '-c', '0', '--image_size', '256',
                           '--iters', '2', '--warmup', '1', '--threads', '2', '--tune_malloc', '--json', str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    _check_report(r, 'torch', 'end2end', 1, 2)
    assert r['threads'] == 2 and r['image_size'] == [256, 256] and r['input'].startswith('synthetic 640x480')
    assert r['malloc_tuned'] == sys.platform.startswith('linux') and r['settings']['tune_malloc']
    st = r['stage_ms_median']
    assert set(st) == {'preprocess', 'forward', 'postprocess'} and all(v > 0 for v in st.values())
    assert sum(st.values()) <= r['latency_ms_max'] * 1.01
    assert 'latency median' in proc.stdout


def test_onnxruntime_backend_batch(tmp_path):
    out = tmp_path / 'ort.json'
    assert benchmark.main(['-c', '0', '--image_size', '128', '--batch_size', '2', '--mode', 'forward',
                           '--backend', 'onnxruntime', '--iters', '2', '--warmup', '1', '--threads', '2',
                           '--json', str(out)]) == 0
    r = json.loads(out.read_text())
    _check_report(r, 'onnxruntime', 'forward', 2, 2)
    assert 'onnxruntime_version' in r and 'stage_ms_median' not in r


def test_end2end_runs_postprocessing_on_real_detections(tmp_path):
    """Weights whose class scores are high: the timed loop must decode, NMS and map boxes back."""
    from efficientdet.model import EfficientDetBackbone
    torch.manual_seed(0)
    model = EfficientDetBackbone(num_classes=6, compound_coef=0)
    with torch.no_grad():
        bias = model.classifier.header.pointwise_conv.conv.bias
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(5)) * 2.0)
    w = tmp_path / 'confident.pth'
    torch.save(model.state_dict(), str(w))
    out = tmp_path / 'e2e.json'
    assert benchmark.main(['-c', '0', '-w', str(w), '--image_size', '128', '--iters', '1', '--warmup', '0',
                           '--score_threshold', '0.5', '--max_det', '30', '--json', str(out)]) == 0
    r = json.loads(out.read_text())
    assert 0 < r['num_detections'] <= 30
    assert r['note_num_classes'] == 6


def test_synthetic_image_is_fixed_and_camera_like():
    a = benchmark.synthetic_image(640, 480)
    b = benchmark.synthetic_image(640, 480)
    assert a.shape == (480, 640, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert a.std() > 20 and len(np.unique(a.reshape(-1, 3)[:5000], axis=0)) > 1000  # not flat, not tiny
    assert not np.array_equal(a, benchmark.synthetic_image(640, 480, seed=1))


def test_user_errors():
    with pytest.raises(UserError, match='multiple of 128'):
        benchmark.main(['-c', '0', '--image_size', '300', '--iters', '1'])
    with pytest.raises(UserError, match='CUDA|cuda'):
        benchmark.main(['-c', '0', '--device', 'cuda:0', '--iters', '1']) if not torch.cuda.is_available() \
            else benchmark.main(['-c', '0', '--cuda_graphs', '--device', 'cpu', '--image_size', '128', '--iters', '1'])
    with pytest.raises(UserError, match='camera_size'):
        benchmark.main(['-c', '0', '--camera_size', '640by480', '--iters', '1'])
    with pytest.raises(UserError, match='float16'):
        benchmark.main(['-c', '0', '--half', '--half_dtype', 'float16', '--image_size', '128', '--iters', '1'])


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '-c', '0', '--image_size', '100'],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith('error: --image_size') and 'Traceback' not in proc.stderr
