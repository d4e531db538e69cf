"""The CUDA-only paths, checked in one run (the FPS table stops at its time budget, ``--minutes``,
7.5 by default; run times on a GPU are not measured yet: the script has only run without one):

    python tools/gpu_check.py                 # every check, then the FPS table
    python tools/gpu_check.py --skip_fps      # the checks alone

1. AMP training resumed from last.ckpt equals an unbroken AMP run (GradScaler state included);
2. ``--half`` inference against float32 on the shipped shapes model: same detections, boxes
   within a few pixels, scores within 0.02;
3. channels-last against the contiguous layout: a training step (same loss) and inference (same
   detections);
4. ``benchmark.py --cuda_graphs``: the captured graph replays the eager detections;
5. 2-process NCCL DDP with SyncBatchNorm through torchrun (needs 2 GPUs; said and skipped with 1);
6. the FPS table of D0-D7 at their own input sizes, batch 1, end to end, for every backend that runs
   on CUDA (torch float32 and ``--half``, torchscript, onnxruntime with the CUDA execution
   provider), each backend tried on D0 first and left out with the reason when it cannot run.

On a machine without a CUDA GPU it says so and exits 0 having run nothing. Exit status 1 when a
check fails; the summary lists each check as PASS, FAIL (with the reason) or SKIP (with why).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# deterministic cuBLAS (the resume check compares two runs); must be set before CUDA starts
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')

import torch  # noqa: E402

SHIPPED = os.path.join(ROOT, 'weights', 'efficientdet-d0-shape.pth')
NO_GPU = 'gpu_check: no CUDA GPU found (torch.cuda.is_available() is False): nothing run'


class Skip(Exception):
    """A check that cannot run here (the reason is its message)."""


def _quiet(*args, **kwargs) -> None:
    pass


def _shapes(root: str, size: int = 256) -> str:
    """A small shapes dataset ({root}/data/shape, 16 train and 8 val images) and its project file."""
    from efficientdet.data.shapes import generate_split
    data = os.path.join(root, 'data')
    if not os.path.isdir(os.path.join(data, 'shape')):
        generate_split(os.path.join(data, 'shape'), 'train', 16, size, seed=1)
        generate_split(os.path.join(data, 'shape'), 'val', 8, size, seed=1)
    return data


def _train_cfg(root: str, out: str, **kw):
    from efficientdet.training import TrainConfig
    base = dict(project='shape', compound_coef=0, image_size=256, batch_size=4, num_workers=2, num_epochs=2,
                data_path=_shapes(root), saved_path=out, log_path=os.path.join(out, 'logs'), seed=3, lr=0.01,
                save_interval=0, no_map=True, bn_images=8, warmup_epochs=0.5)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- the checks
def check_amp_resume(root: str) -> str:
    """AMP: 8 steps straight == 3 steps, -w last, 5 more (weights, EMA, optimizer, GradScaler)."""
    from efficientdet.training import run_training
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        a = run_training(_train_cfg(root, os.path.join(root, 'amp_a'), amp=True), log=_quiet)
        run_training(_train_cfg(root, os.path.join(root, 'amp_b'), amp=True, max_steps=3), log=_quiet)
        b = run_training(_train_cfg(root, os.path.join(root, 'amp_b'), amp=True, weights='last'), log=_quiet)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    sa = torch.load(a.last_path, weights_only=True, map_location='cpu')
    sb = torch.load(b.last_path, weights_only=True, map_location='cpu')
    if sa['step'] != sb['step'] or sa['step'] != 8:
        raise AssertionError(f'steps {sa["step"]} vs {sb["step"]} (expected 8)')
    if not sa['scaler'] or sa['scaler'] != sb['scaler']:
        raise AssertionError(f'GradScaler states differ: {sa["scaler"]} vs {sb["scaler"]}')
    worst = 0.0
    for got, ref in ((sa['model'], sb['model']), (sa['ema']['model'], sb['ema']['model'])):
        for k, v in got.items():
            if v.is_floating_point():
                worst = max(worst, float((v.float() - ref[k].float()).abs().max()))
    if worst > 1e-5:
        raise AssertionError(f'resumed weights differ from the unbroken run by {worst:.3g}')
    return f'8 AMP steps, resumed at step 3: scaler {sa["scaler"].get("scale")}, max |weight diff| {worst:.2g}'


def _detections(half: bool = False, fuse: Optional[bool] = None, channels_last: bool = True):
    from efficientdet.detector import Detector
    from efficientdet.runtimes.eager import TorchModel
    det = Detector.from_checkpoint(SHIPPED, compound_coef=0, project='shape', device='cuda:0', half=half,
                                   threshold=0.3, iou=0.5, batch_size=8, fuse=fuse)
    if not channels_last and isinstance(det.runner, TorchModel):
        det.runner = TorchModel(det.model, det.device, half=half, fuse=False, channels_last=False,
                                image_size=det.image_size, allowed=det.allowed)
    images = [os.path.join(ROOT, 'assets', 'demo_shapes.jpg')]
    return det(images)


def _same_detections(ref, got, box_px: float, score_tol: float, what: str) -> Tuple[float, float]:
    """Every reference detection has one of the same class in ``got`` with boxes within ``box_px``
    pixels and scores within ``score_tol``; returns the largest box and score differences."""
    import numpy as np
    worst_box = worst_score = 0.0
    for r, g in zip(ref, got):
        if len(r) != len(g):
            raise AssertionError(f'{what}: {len(g)} detections instead of {len(r)}')
        for b, s, c in zip(r.boxes, r.scores, r.class_ids):
            same = np.flatnonzero(g.class_ids == c)
            if not len(same):
                raise AssertionError(f'{what}: class {c} missing')
            d = np.abs(g.boxes[same] - b).max(1)
            j = same[int(d.argmin())]
            worst_box = max(worst_box, float(d.min()))
            worst_score = max(worst_score, float(abs(g.scores[j] - s)))
    if worst_box > box_px or worst_score > score_tol:
        raise AssertionError(f'{what}: boxes differ by up to {worst_box:.2f} px, scores by {worst_score:.3f}')
    return worst_box, worst_score


def check_half(root: str) -> str:
    if not os.path.isfile(SHIPPED):
        raise Skip(f'{SHIPPED} is absent')
    ref = _detections(half=False)
    got = _detections(half=True)
    if not sum(len(r) for r in ref):
        raise AssertionError('the float32 model found nothing on the demo image')
    box, score = _same_detections(ref, got, box_px=2.0, score_tol=0.02, what='--half')
    return f'{sum(len(r) for r in ref)} detections; boxes within {box:.2f} px, scores within {score:.4f}'


def check_channels_last(root: str) -> str:
    if not os.path.isfile(SHIPPED):
        raise Skip(f'{SHIPPED} is absent')
    ref = _detections(fuse=False, channels_last=False)
    got = _detections(fuse=False, channels_last=True)
    box, score = _same_detections(ref, got, box_px=0.5, score_tol=1e-3, what='channels_last inference')
    # a training step in both layouts from the same weights: the same loss
    from efficientdet.factory import build_model
    from efficientdet.loss import DetectionLoss
    import numpy as np
    losses = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 256, 256, generator=g)
    ann = torch.tensor([[[20., 30., 120., 140., 0.], [150., 40., 230., 100., 2.]]] * 4)
    for cl in (False, True):
        torch.manual_seed(0)
        m = build_model(0, project='shape', weights=SHIPPED, image_size=256, verbose=False).cuda().train()
        xx = x.cuda()
        if cl:
            m = m.to(memory_format=torch.channels_last)
            xx = xx.contiguous(memory_format=torch.channels_last)
        _, reg, cls, anc = m(xx, return_logits=True)
        out = DetectionLoss()(cls, reg, anc, ann.cuda())
        out['loss'].backward()
        losses.append(float(out['loss'].detach()))
    if not np.isclose(losses[0], losses[1], rtol=1e-4):
        raise AssertionError(f'training loss {losses[1]:.6f} channels-last vs {losses[0]:.6f} contiguous')
    return f'inference boxes within {box:.3f} px; training loss {losses[1]:.5f} vs {losses[0]:.5f}'


def _benchmark(argv: List[str]) -> Dict:
    import benchmark
    args = benchmark.build_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.run_benchmark(args)


def check_cuda_graphs(root: str) -> str:
    if not os.path.isfile(SHIPPED):
        raise Skip(f'{SHIPPED} is absent')
    common = ['-p', 'shape', '-c', '0', '-w', SHIPPED, '--device', 'cuda:0', '--image',
              os.path.join(ROOT, 'assets', 'demo_shapes.jpg'), '--iters', '20', '--warmup', '3', '--threshold', '0.3']
    eager = _benchmark(common)
    graph = _benchmark(common + ['--cuda_graphs'])
    if graph['num_detections'] != eager['num_detections'] or not eager['num_detections']:
        raise AssertionError(f'{graph["num_detections"]} detections with CUDA graphs, {eager["num_detections"]} '
                             'without')
    # the replayed graph's detections against the eager ones, box by box (benchmark.py's runner)
    sys.path.insert(0, ROOT)
    from benchmark import _CudaGraphRunner
    from efficientdet.detector import Detector
    det = Detector.from_checkpoint(SHIPPED, compound_coef=0, project='shape', device='cuda:0', threshold=0.3,
                                   iou=0.5)
    batch, metas = det.preprocess([os.path.join(ROOT, 'assets', 'demo_shapes.jpg')])
    with torch.inference_mode():
        ref = det.postprocess(det.forward(batch), metas)
        got = det.postprocess(_CudaGraphRunner(det.runner, batch)(batch), metas)
    box, score = _same_detections(ref, got, box_px=1e-3, score_tol=1e-5, what='CUDA graph replay')
    return (f'{eager["num_detections"]} detections both ways (boxes within {box:.2g} px, scores within {score:.2g}); '
            f'forward {eager["stage_ms_median"]["forward"]:.2f} ms eager, {graph["stage_ms_median"]["forward"]:.2f} '
            'ms graph')


def check_nccl_ddp(root: str) -> str:
    n = torch.cuda.device_count()
    if n < 2:
        raise Skip(f'{n} GPU: 2-process NCCL needs 2 GPUs (NCCL refuses two ranks on one device)')
    data = _shapes(root)
    out = os.path.join(root, 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', os.path.join(ROOT, 'train.py'),
           '-p', 'shape', '-c', '0', '--image_size', '256', '--batch_size', '8', '-n', '2', '--num_epochs', '1',
           '--max_steps', '2', '--sync_bn', '--data_path', data, '--saved_path', out, '--log_path', out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode != 0:
        raise AssertionError(f'torchrun exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}')
    if 'SyncBatchNorm over 2 GPUs' not in proc.stdout:
        raise AssertionError('the run did not use SyncBatchNorm')
    state = torch.load(os.path.join(out, 'shape', 'last.ckpt'), weights_only=True, map_location='cpu')
    if state['step'] != 2 or len(state['rng_per_rank']) != 2:
        raise AssertionError(f'last.ckpt at step {state["step"]} with {len(state["rng_per_rank"])} RNG states')
    return '2 NCCL processes, SyncBatchNorm, 2 steps, last.ckpt with both RNG states'


# ----------------------------------------------------------------------------- the FPS table
def _cuda_backends() -> List[Tuple[str, List[str]]]:
    """(label, benchmark.py options) of every backend configuration that may run on CUDA."""
    from efficientdet.runtimes import backend_names
    out = []
    for name in backend_names():
        if name == 'torch':
            out += [('torch float32', ['--backend', 'torch']), ('torch --half', ['--backend', 'torch', '--half'])]
        elif name == 'onnxruntime':
            out.append(('onnxruntime CUDA', ['--backend', 'onnxruntime', '--providers', 'CUDAExecutionProvider']))
        else:
            out.append((name, ['--backend', name]))
    return out


def fps_table(deadline: float, variants=range(8)) -> Tuple[str, List[str]]:
    """The D0-D7 table (end-to-end FPS, batch 1, each variant at its own size) and the notes of the
    backends left out; variants past ``deadline`` are marked as not measured."""
    from efficientdet.config import get_config
    rows: Dict[str, Dict[int, str]] = {}
    notes = []
    for label, opts in _cuda_backends():
        base = opts + ['--device', 'cuda:0', '--iters', '30', '--warmup', '5']
        try:
            _benchmark(base + ['-c', '0'])
        except BaseException as e:  # noqa: BLE001 -- SystemExit/UserError of a backend that cannot run
            notes.append(f'{label}: does not run on CUDA here ({str(e).splitlines()[0][:150] if str(e) else type(e).__name__})')
            continue
        rows[label] = {}
        for v in variants:
            if time.time() > deadline:
                rows[label][v] = 'time'
                continue
            try:
                r = _benchmark(base + ['-c', str(v)])
                rows[label][v] = f'{r["fps"]:.1f}'
            except BaseException as e:  # noqa: BLE001
                rows[label][v] = 'error'
                notes.append(f'{label} D{v}: {str(e).splitlines()[0][:150] if str(e) else type(e).__name__}')
            finally:
                torch.cuda.empty_cache()
    head = '| backend | ' + ' | '.join(f'D{v} {get_config(v).input_size}' for v in variants) + ' |'
    lines = [head, '|' + '---|' * (len(variants) + 1)]
    for label, cells in rows.items():
        lines.append(f'| {label} | ' + ' | '.join(cells.get(v, '') for v in variants) + ' |')
    return '\n'.join(lines), notes


# ----------------------------------------------------------------------------- main
CHECKS: List[Tuple[str, Callable[[str], str]]] = [
    ('AMP training, resume == unbroken run (GradScaler state)', check_amp_resume),
    ('--half inference vs float32 (boxes and scores)', check_half),
    ('channels-last vs contiguous (training loss, inference)', check_channels_last),
    ('benchmark.py --cuda_graphs', check_cuda_graphs),
    ('2-process NCCL DDP with SyncBatchNorm', check_nccl_ddp),
]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description='CUDA-only checks and the GPU FPS table (see the module docstring)')
    ap.add_argument('--skip_fps', action='store_true', help='run the checks, not the FPS table')
    ap.add_argument('--minutes', type=float, default=7.5,
                    help='time budget: FPS cells not reached by then are marked "time"')
    ap.add_argument('--json', default=None, help='also write the results here')
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    start = time.time()
    print(f'gpu_check: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU), torch {torch.__version__}, '
          f'CUDA {torch.version.cuda}', flush=True)
    results = []
    root = tempfile.mkdtemp(prefix='effdet_gpu_check_')
    try:
        for title, fn in CHECKS:
            t = time.time()
            try:
                status, detail = 'PASS', fn(root)
            except Skip as e:
                status, detail = 'SKIP', str(e)
            except Exception as e:  # noqa: BLE001 -- report and go on with the other checks
                status, detail = 'FAIL', f'{type(e).__name__}: {e}'
                traceback.print_exc()
            results.append({'check': title, 'status': status, 'detail': detail, 'seconds': round(time.time() - t, 1)})
            print(f'[{status}] {title} ({time.time() - t:.0f}s): {detail}', flush=True)
            torch.cuda.empty_cache()
        table, notes = ('', [])
        if not args.skip_fps:
            table, notes = fps_table(start + args.minutes * 60)
            print('\nEnd-to-end FPS, batch 1, each variant at its own input size (30 timed runs after 5):')
            print(table)
            for n in notes:
                print(f'  note: {n}')
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f'\ngpu_check: {sum(r["status"] == "PASS" for r in results)} passed, '
          f'{sum(r["status"] == "FAIL" for r in results)} failed, {sum(r["status"] == "SKIP" for r in results)} '
          f'skipped in {time.time() - start:.0f}s')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'checks': results, 'fps_table': table, 'notes': notes,
                       'device': torch.cuda.get_device_name(0)}, f, indent=1)
    return 1 if any(r['status'] == 'FAIL' for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
