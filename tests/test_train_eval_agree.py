"""Training-time mAP and coco_eval.py agree on the same checkpoint (one evaluation code path)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, 'weights', 'efficientdet-d0-shape.pth')
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='2')


def test_training_map_equals_coco_eval_on_best_pth(tmp_path):
    if not os.path.isfile(WEIGHTS):
        pytest.skip('the shipped shapes model is absent')
    from efficientdet.data.shapes import generate_split
    data = tmp_path / 'data' / 'shape'
    generate_split(str(data), 'train', 2, 256, seed=11)
    generate_split(str(data), 'val', 6, 256, seed=11)
    out = tmp_path / 'out'
    train = subprocess.run(
        [sys.executable, 'train.py', '-p', 'shape', '-c', '0', '--image_size', '256', '--batch_size', '2', '-n', '0',
         '--num_epochs', '1', '--max_steps', '1', '--lr', '1e-6', '--data_path', str(tmp_path / 'data'),
         '-w', WEIGHTS, '--saved_path', str(out), '--log_path', str(out / 'logs')],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    # raw and EMA weights are both validated; best.pth holds the better one (its mAP is logged)
    found = re.findall(r'best\.pth: the (?:raw|ema) weights of epoch 0 \(mAP (\d\.\d+)\)', train.stdout + train.stderr)
    assert len(found) == 1, train.stdout[-2000:]
    train_map = float(found[-1])
    assert train_map > 0.3  # the shipped model detects shapes: a real comparison, not 0 == 0
    ev = subprocess.run(
        [sys.executable, 'coco_eval.py', '-p', 'shape', '-c', '0', '-w', str(out / 'shape' / 'best.pth'),
         '--data_path', str(tmp_path / 'data'), '--image_size', '256', '--output_dir', str(tmp_path), '--override',
         '--no_progress'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    ap = float(re.search(r'IoU=0\.50:0\.95 \| area=   all \| maxDets=100 \] = (\d\.\d+)', ev.stdout).group(1))
    assert abs(ap - train_map) <= 6e-4, (ap, train_map)  # coco_eval prints 3 decimals, train 4
