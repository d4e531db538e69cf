"""benchmark.py: report fields, stage timing, input, post-processing really exercised, user errors."""
import json
import os
import subprocess
import sys
import time

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


def _cpuinfo_model_name():
    """The first 'model name' of /proc/cpuinfo, read here independently of benchmark.py; None if absent."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                key, sep, value = line.partition(':')
                if sep and key.strip() == 'model name':
                    return value.strip()
    except OSError:
        pass
    return None


def _status_mb(field):
    """VmRSS / VmHWM of this (pytest) process in MiB, from /proc/self/status; None off Linux."""
    try:
        with open('/proc/self/status', encoding='utf-8') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _check_report(r: dict, backend: str, mode: str, batch: int, iters: int) -> None:
    for f in FIELDS:
        assert f in r, f
    assert r['backend'] == backend and r['mode'] == mode and r['batch_size'] == batch
    assert 0 < r['latency_ms_min'] <= r['latency_ms_median'] <= r['latency_ms_p90'] <= r['latency_ms_max']
    assert r['fps'] == pytest.approx(1000.0 / r['latency_ms_median'], rel=1e-3)
    assert r['images_per_second'] == pytest.approx(batch * r['fps'], rel=1e-3)
    assert r['device_type'] == 'cpu'
    if os.path.exists('/proc/self/status'):  # Linux: the kernel's high-water mark, reset after warm-up
        since = ' since warm-up' if os.access('/proc/self/clear_refs', os.W_OK) else ''
        assert r['peak_memory_kind'] == 'process peak RSS (VmHWM)' + since
    cpu = _cpuinfo_model_name()
    if cpu is not None:  # else (no 'model name' line, e.g. some ARM kernels) there is nothing to compare with
        assert r['device'] == cpu
    assert isinstance(r['device'], str) and r['device']
    assert r['torch_version'] == torch.__version__
    assert r['settings']['iters'] == iters


def _settled_rss_mb():
    """This process's resident memory after garbage collection and glibc's trim: what stays
    resident through a benchmark call (earlier tests' garbage, freed during the call, would
    otherwise look like memory the call released)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _status_mb('VmRSS')


def _check_peak_in_process(r: dict, rss_before_mb, hwm_after_mb) -> None:
    """benchmark.main ran in this process: its peak is this process's resident memory in MiB. It
    cannot exceed our own high-water mark read afterwards, and the memory this process already held
    before the call (torch, the test modules) stays resident, so the peak is at least most of it."""
    if rss_before_mb is None or hwm_after_mb is None:  # not Linux: no counters to compare with
        return
    assert 0.8 * rss_before_mb <= r['peak_memory_mb'] <= hwm_after_mb + 0.5, (rss_before_mb, hwm_after_mb)


def _run_measured(args, tmp_path, timeout=300):
    """Run benchmark.py in a child; returns (code, stdout, stderr, the child's own peak RSS in MiB
    from wait4's rusage: an independent measurement of the same kernel counter)."""
    out, err = tmp_path / 'stdout.txt', tmp_path / 'stderr.txt'
    with open(out, 'w') as fo, open(err, 'w') as fe:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'benchmark.py')] + args, cwd=str(tmp_path),
                                stdout=fo, stderr=fe)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            pytest.fail(f'benchmark.py {args} ran past {timeout}s')
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return proc.returncode, out.read_text(), err.read_text(), usage.ru_maxrss / 1024  # KiB on Linux


def _check_peak_child(r: dict, child_peak_mb: float) -> None:
    """The child's reported peak (since warm-up) is at most its lifetime peak and, as the model, the
    input and the activations are all resident after the warm-up, most of it. Linux keeps the
    parent's high-water mark across fork + exec, so where the child's lifetime peak is no more than
    this (pytest) process's own, it says nothing of the child and only the upper bound applies."""
    assert r['peak_memory_mb'] <= child_peak_mb + 0.1, child_peak_mb
    parent_hwm = _status_mb('VmHWM')
    if parent_hwm is None or child_peak_mb > parent_hwm + 1:
        assert 0.5 * child_peak_mb <= r['peak_memory_mb'], child_peak_mb


linux_only = pytest.mark.skipif(not (sys.platform.startswith('linux') and hasattr(os, 'wait4')),
                                reason='peak memory and malloc tuning are checked against Linux /proc and glibc')


@linux_only
def test_cli_writes_json(tmp_path):
    """Default on CPU: the glibc allocator is tuned (--tune_malloc defaults to on for --device cpu)."""
    out = tmp_path / 'r.json'
    code, stdout, stderr, child_peak = _run_measured(['-c', '0', '--image_size', '256', '--iters', '2', '--warmup',
                                                      '1', '--threads', '2', '--json', str(out)], tmp_path)
    assert code == 0, stderr
    r = json.loads(out.read_text())
    _check_report(r, 'torch', 'end2end', 1, 2)
    _check_peak_child(r, child_peak)
    assert r['threads'] == 2 and r['image_size'] == [256, 256] and r['input'].startswith('synthetic 640x480')
    assert r['settings']['tune_malloc'] is True and r['malloc_tuned'] is True
    st = r['stage_ms_median']
    assert set(st) == {'preprocess', 'forward', 'postprocess', 'end2end'} and all(v > 0 for v in st.values())
    assert st['end2end'] == pytest.approx(r['latency_ms_median'], rel=1e-3)
    assert st['preprocess'] + st['forward'] + st['postprocess'] <= r['latency_ms_max'] * 1.01
    assert 0 < r['end2end_minus_forward_ms_median'] < st['end2end']
    assert 'latency median' in stdout


@linux_only
def test_cli_no_tune_malloc(tmp_path):
    out = tmp_path / 'r.json'
    code, _, stderr, child_peak = _run_measured(['-c', '0', '--image_size', '128', '--mode', 'forward', '--iters',
                                                 '2', '--warmup', '1', '--threads', '1', '--no-tune_malloc',
                                                 '--json', str(out)], tmp_path)
    assert code == 0, stderr
    r = json.loads(out.read_text())
    _check_report(r, 'torch', 'forward', 1, 2)
    _check_peak_child(r, child_peak)
    assert r['settings']['tune_malloc'] is False and r['malloc_tuned'] is False


def test_onnxruntime_backend_batch(tmp_path):
    out = tmp_path / 'ort.json'
    rss_before = _settled_rss_mb()
    assert benchmark.main(['-c', '0', '--image_size', '128', '--batch_size', '2', '--mode', 'forward',
                           '--backend', 'onnxruntime', '--iters', '2', '--warmup', '1', '--threads', '2',
                           '--no-tune_malloc', '--json', str(out)]) == 0
    hwm_after = _status_mb('VmHWM')
    r = json.loads(out.read_text())
    _check_report(r, 'onnxruntime', 'forward', 2, 2)
    assert r['settings']['tune_malloc'] is False and r['malloc_tuned'] is False
    _check_peak_in_process(r, rss_before, hwm_after)
    assert 'onnxruntime_version' in r and 'stage_ms_median' not in r


def test_exported_backend_with_a_placeholder_project(tmp_path):
    """-p coco (ten '' placeholder slots) on an exported backend: the temporary export leaves out the
    same classes as the pipeline (it was refused before), and the file is loaded once."""
    out = tmp_path / 'coco.json'
    assert benchmark.main(['-c', '0', '-p', 'coco', '-w', 'random', '--image_size', '128', '--backend', 'onnxruntime',
                           '--iters', '1', '--warmup', '0', '--threads', '2', '--no-tune_malloc',
                           '--json', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['backend'] == 'onnxruntime' and r['note_num_classes'] == 90


def test_openvino_backend_end2end(tmp_path):
    """--backend openvino: exported to a temp IR, run stage by stage, its version reported."""
    pytest.importorskip('openvino')
    out = tmp_path / 'ov.json'
    assert benchmark.main(['-c', '0', '--image_size', '128', '--backend', 'openvino', '--iters', '2', '--warmup',
                           '1', '--threads', '1', '--no-tune_malloc', '--verify', '--json', str(out)]) == 0
    r = json.loads(out.read_text())
    _check_report(r, 'openvino', 'end2end', 1, 2)
    assert 'openvino_version' in r and r['note_export_s'] > 0
    assert set(r['stage_ms_median']) == {'preprocess', 'forward', 'postprocess', 'end2end'}
    with pytest.raises(UserError, match='--providers'):
        benchmark.main(['-c', '0', '--backend', 'openvino', '--providers', 'CPUExecutionProvider', '--iters', '1',
                        '--no-tune_malloc'])


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
    assert benchmark.main(['-c', '0', '-w', str(w), '--num_classes', '6', '--image_size', '128', '--iters', '1',
                           '--warmup', '0',
                           '--score_threshold', '0.5', '--max_det', '30', '--no-tune_malloc',
                           '--json', str(out)]) == 0
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
    # in-process calls: --no-tune_malloc keeps benchmark from changing this pytest process's allocator
    no_tune = ['--no-tune_malloc']
    with pytest.raises(UserError, match='image_size'):
        benchmark.main(['-c', '0', '--image_size', '64', '2048', '--iters', '1'] + no_tune)
    with pytest.raises(UserError, match='--cuda_graphs needs --device cuda'):  # refused on CPU, GPU or not
        benchmark.main(['-c', '0', '--cuda_graphs', '--device', 'cpu', '--image_size', '128', '--iters', '1']
                       + no_tune)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match='CUDA|cuda'):
            benchmark.main(['-c', '0', '--device', 'cuda:0', '--iters', '1'] + no_tune)
    with pytest.raises(UserError, match='camera_size'):
        benchmark.main(['-c', '0', '--camera_size', '640by480', '--iters', '1'] + no_tune)
    with pytest.raises(UserError, match='float16'):
        benchmark.main(['-c', '0', '--half', '--half_dtype', 'float16', '--image_size', '128', '--iters', '1']
                       + no_tune)


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '-c', '0', '--image_size', '64',
                           '2048'],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith('error: --image_size') and 'Traceback' not in proc.stderr
