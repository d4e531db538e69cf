"""tools/gpu_check.py: without a CUDA GPU it says so plainly and exits 0 having run nothing."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'gpu_check.py'), '--json',
                           str(tmp_path / 'r.json')], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == 'gpu_check: no CUDA GPU found (torch.cuda.is_available() is False): nothing run'
    assert not (tmp_path / 'r.json').exists() and os.listdir(tmp_path) == []  # nothing run, nothing written
