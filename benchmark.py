"""Latency / throughput benchmark of EfficientDet D0–D7x.

    python benchmark.py -c 0                                   # torch, end2end, 512x512, batch 1
    python benchmark.py -c 0 --threads 2 --mode forward --json d0.json
    python benchmark.py -c 0 --backend onnxruntime --threads 2
    python benchmark.py -c 0 --backend openvino --threads 2 --json d0_ov.json
    python benchmark.py -c 2 --batch_size 8 --device cuda:0 --half   # "extreme FPS"

Every iteration processes the same content: a fixed synthetic camera frame (``--camera_size``,
640x480 by default), generated in memory as OpenCV would decode it (uint8 HWC, B, G, R), or
``--image PATH`` decoded once before timing. ``--mode end2end`` (default) runs the pipeline of
``efficientdet.detector.Detector`` stage by stage: preprocessing (letterbox + normalisation straight
from the uint8 B, G, R frame into the batch), the forward pass of ``--backend``
(``efficientdet.runtimes``; exported backends take each anchor's best class in the graph), and the
post-processing (``efficientdet.postprocess.detect``: score threshold and top-k before a batched
per-class NMS on the candidates, boxes mapped back to the original image). ``--mode forward`` times
the forward pass alone on a prepared input batch. Warm-up runs come first and are not timed.

Reported (and written with ``--json``): latency_ms_median / _p90 / _mean / _min / _max over the
timed runs, fps (= 1000 / median: calls per second of one stream), images_per_second
(= batch_size x fps: with batch > 1 the "extreme FPS" throughput), per-stage medians in
end2end mode (preprocess, forward, postprocess, end2end) and end2end_minus_forward_ms_median,
peak_memory_mb (CPU: peak resident set size of the process, from /proc; CUDA: max allocated), device (CPU model from /proc/cpuinfo or the GPU name), threads, versions, backend,
mode and every setting. Random weights unless ``-w``: random heads score ~0.01, so with the
default threshold almost nothing reaches NMS; ``num_detections`` is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from efficientdet.cli import (ScriptParser, add_inference_args, add_model_args, add_options, add_project_args,
                              add_runtime_args, add_weights_arg, default_weights, model_from_args, parse_device,
                              project_name, resolve_weights, variant_of)
from efficientdet.detector import Detector
from efficientdet.errors import UserError, run_cli

# --------------------------------------------------------------------------- machine facts


def cpu_model_name() -> str:
    """CPU model from /proc/cpuinfo ('model name'), else platform.processor()."""
    try:
        with open('/proc/cpuinfo', 'r', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.lower().startswith(('model name', 'hardware', 'cpu model')):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status', 'r', encoding='utf-8') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    """Peak resident set size of this process (VmHWM, /proc/self/status), MiB."""
    kb = _proc_status_kb('VmHWM')
    if kb is None:  # not Linux: fall back to getrusage (KiB on Linux, bytes on macOS)
        try:
            import resource
            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return r / (1024 * 1024) if sys.platform == 'darwin' else r / 1024
        except (ImportError, OSError):
            return None
    return kb / 1024


# --------------------------------------------------------------------------- input


def synthetic_image(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A fixed camera-like frame, uint8 [H, W, 3] in OpenCV's B, G, R order: smooth gradient
    background, filled shapes of several sizes and colours, mild sensor noise. Same pixels for
    the same arguments."""
    import cv2
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 60 + 120 * xx / max(1, width - 1)
    img[..., 1] = 90 + 80 * yy / max(1, height - 1)
    img[..., 2] = 140 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    img = img.astype(np.uint8)
    for _ in range(24):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(4, min(width, height) // 40), max(8, min(width, height) // 3)))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x0 + size, y0 + int(size * rng.uniform(0.5, 2.0))), color, -1)
        else:
            cv2.circle(img, (x0, y0), size // 2, color, -1)
    noise = rng.normal(0.0, 4.0, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _parse_wh(text: str) -> Tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise UserError(f'--camera_size {text!r}: use WIDTHxHEIGHT, e.g. 640x480') from None
    if w < 1 or h < 1:
        raise UserError(f'--camera_size {text!r}: width and height must be positive')
    return w, h


# --------------------------------------------------------------------------- model runners


def _set_threads(threads: Optional[int]) -> int:
    if threads is not None:
        if threads < 1:
            raise UserError(f'--threads {threads}: must be at least 1')
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process
            pass
        try:
            import cv2
            cv2.setNumThreads(threads)
        except ImportError:
            pass
    return torch.get_num_threads()


def _sync(dev: torch.device) -> None:
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


class _CudaGraphRunner:
    """Replays one captured CUDA graph of ``fn`` on a static input buffer (fixed shape)."""

    def __init__(self, fn: Callable, example: torch.Tensor):
        self.fn = fn
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor):
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def benchmark_weights(args: argparse.Namespace) -> Tuple[Any, str]:
    """(the weights, ``zoo.ResolvedWeights``, or None for random weights; what the report says):
    ``-w`` through the one weights check (``cli.resolve_weights``; ``-w random`` allowed); without
    ``-w`` the project's default weights when that file exists, else random weights (the speed does
    not depend on them)."""
    if args.weights is None:
        path = default_weights(project_name(args), variant_of(args))
        if not os.path.exists(path):
            return None, f'random (official init; {path} not found)'
    got = resolve_weights(args, allow_random=True)
    return got, got.label if got is not None else 'random (official init)'


def build_runner(args: argparse.Namespace, dev: torch.device, workdir: str
                 ) -> Tuple[Callable[[torch.Tensor], Any], Dict[str, Any], Dict[str, Any]]:
    """The forward callable ``f(batch [B, 3, H, W]) -> (features|None, regression, scores,
    anchors)`` of ``--backend`` (``efficientdet.runtimes``), what the Detector needs of the model
    (obj_list, image_size, mean, std) and notes for the report. ``-w`` may be an exported file of
    the backend (run as it is) or a checkpoint / random weights (built, and for an exported
    backend exported to ``workdir`` first)."""
    from efficientdet.runtimes import check_backend_options
    notes: Dict[str, Any] = {}
    target = check_backend_options(args.backend, args.providers, args.half, args.compile)
    if args.backend != 'torch' and args.cuda_graphs:
        raise UserError('--cuda_graphs applies to --backend torch only')
    weights, notes['weights'] = benchmark_weights(args)
    exported = weights is not None and args.backend != 'torch' and target.is_exported_file(weights.path)
    if not exported:
        model = model_from_args(args, weights=weights)
        detector = Detector.from_model(model, project=None if args.num_classes is not None else project_name(args),
                                       projects_dir=args.projects_dir)
        spec = {'obj_list': detector.obj_list, 'image_size': detector.image_size, 'mean': detector.mean,
                'std': detector.std, 'variant': model.compound_coef}
        notes['num_classes'] = model.num_classes
    if args.backend != 'torch':
        path = weights.path if exported else os.path.join(workdir, 'model' + target.suffix)
        if not exported:  # with the class list and normalisation the pipeline uses
            t = time.perf_counter()
            target.export_to_run(model, path, spec['image_size'], dev, fuse=args.fuse, verify=args.verify,
                                 channels_last=args.channels_last, obj_list=spec['obj_list'], mean=spec['mean'],
                                 std=spec['std'])
            notes['export_s'] = round(time.perf_counter() - t, 2)
        # the file loaded once: classes, size and normalisation from its metadata unless -p is given
        detector = Detector.from_exported(path, backend=args.backend,
                                          project=project_name(args) if args.project else None,
                                          projects_dir=args.projects_dir, threads=args.threads,
                                          providers=args.providers, half=args.half)
        runner = detector.runner
        if args.half:
            notes['half'] = f'{args.backend} {getattr(runner, "precision", "reduced precision")}; anchors and decoding float32'
        notes['quantization'] = (getattr(runner, 'meta', None) or {}).get('quantization', 'float32')
        spec = {'obj_list': detector.obj_list, 'image_size': detector.image_size, 'mean': detector.mean,
                'std': detector.std, 'variant': runner.compound_coef}
        notes['num_classes'] = len(detector.obj_list)
        return runner, spec, notes

    from efficientdet.runtimes.eager import TorchModel
    torch_model = TorchModel(model, dev, half=args.half, half_kind=args.half_dtype, fuse=args.fuse,
                             channels_last=args.channels_last, fast=args.fast, image_size=spec['image_size'],
                             compile=args.compile, allowed=detector.allowed)
    if args.half:
        notes['half'] = f'autocast {str(torch_model.half).replace("torch.", "")}; anchors and decoding float32'
    notes['cpu_fast_path'] = any(getattr(m, 'fast', False) for m in torch_model.net.modules())
    if args.compile:
        notes['compile'] = f'torch.compile, inductor options {torch_model.compile_options}, compiled during warm-up'
    if args.cuda_graphs:
        if dev.type != 'cuda':
            raise UserError('--cuda_graphs needs --device cuda:0')
        example = torch.zeros(args.batch_size, 3, *spec['image_size'], device=dev)
        with torch.inference_mode():
            return _CudaGraphRunner(torch_model, example), spec, notes
    return torch_model, spec, notes


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """Build, warm up, time; returns the report dict (see the module docstring)."""
    from efficientdet.config import get_config
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        raise UserError('--iters and --batch_size must be at least 1, --warmup at least 0')
    if args.compile and args.warmup < 1:
        raise UserError('--compile needs --warmup 1 or more (compilation happens in the first call)')
    dev = parse_device(args.device)
    threads = _set_threads(args.threads)
    malloc_tuned = False
    if args.tune_malloc is None:
        args.tune_malloc = dev.type == 'cpu'
    if args.tune_malloc:
        from efficientdet.runtimes.tuning import tune_cpu_allocator
        malloc_tuned = tune_cpu_allocator()
    if args.image is not None:
        import cv2
        if not os.path.isfile(args.image):
            raise UserError(f'--image {args.image}: no such file')
        frame = cv2.imread(args.image, cv2.IMREAD_COLOR)
        if frame is None:
            raise UserError(f'--image {args.image}: OpenCV cannot decode it')
        source = args.image
    else:
        cw, ch = _parse_wh(args.camera_size)
        frame = synthetic_image(cw, ch)
        source = f'synthetic {cw}x{ch} frame'
    frames = [frame] * args.batch_size

    with tempfile.TemporaryDirectory(prefix='effdet_bench_') as workdir:
        runner, spec, notes = build_runner(args, dev, workdir)
        size = spec['image_size']
        pipe = Detector(runner, spec['obj_list'], size, mean=spec['mean'], std=spec['std'], threshold=args.threshold,
                        iou=args.iou, nms=args.nms, max_det=args.max_det, device=dev, batch_size=args.batch_size)
        prepared, _ = pipe.preprocess(frames, bgr=True)
        stages: Dict[str, List[float]] = {'preprocess': [], 'forward': [], 'postprocess': [], 'end2end': []}
        totals: List[float] = []
        num_det = 0
        if dev.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(dev)
        peak_reset = reset_peak_rss() if dev.type == 'cpu' else False
        with torch.inference_mode():
            for i in range(args.warmup + args.iters):
                timed = i >= args.warmup
                _sync(dev)
                t0 = time.perf_counter()
                if args.mode == 'forward':
                    pipe.forward(prepared)
                    _sync(dev)
                    t1 = time.perf_counter()
                    if timed:
                        totals.append(t1 - t0)
                    continue
                batch, metas = pipe.preprocess(frames, bgr=True)
                _sync(dev)
                t1 = time.perf_counter()
                out = pipe.forward(batch)
                _sync(dev)
                t2 = time.perf_counter()
                dets = pipe.postprocess(out, metas)
                _sync(dev)
                t3 = time.perf_counter()
                if timed:
                    totals.append(t3 - t0)
                    stages['preprocess'].append(t1 - t0)
                    stages['forward'].append(t2 - t1)
                    stages['postprocess'].append(t3 - t2)
                    stages['end2end'].append(t3 - t0)
                    num_det = sum(len(d) for d in dets)
        if dev.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20
            device_name = torch.cuda.get_device_name(dev)
        else:
            peak = peak_rss_mb()
            device_name = cpu_model_name()

    ms = [t * 1000.0 for t in totals]
    median = statistics.median(ms)

    def sig(v: float) -> float:  # 6 significant digits: exact enough at any speed, short JSON
        return float(f'{v:.6g}')

    report: Dict[str, Any] = {
        'latency_ms_median': sig(median),
        'latency_ms_p90': sig(_percentile(ms, 90)),
        'latency_ms_mean': sig(statistics.fmean(ms)),
        'latency_ms_min': sig(min(ms)),
        'latency_ms_max': sig(max(ms)),
        'fps': sig(1000.0 / median),
        'images_per_second': sig(1000.0 * args.batch_size / median),
        'peak_memory_mb': round(peak, 1) if peak is not None else None,
        'peak_memory_kind': ('cuda max_memory_allocated' if dev.type == 'cuda' else
                             'process peak RSS (VmHWM)' + (' since warm-up' if peak_reset else '')),
        'device': device_name,
        'device_type': dev.type,
        'cpu_count': os.cpu_count(),
        'threads': threads,
        'torch_version': torch.__version__,
        'backend': args.backend,
        'mode': args.mode,
        'model': get_config(spec['variant']).name,
        'compound_coef': spec['variant'],
        'image_size': list(size),
        'batch_size': args.batch_size,
        'iters': args.iters,
        'warmup': args.warmup,
        'input': source,
        'num_detections': num_det if args.mode == 'end2end' else None,
        'malloc_tuned': malloc_tuned,
        'python': platform.python_version(),
        'settings': {k: v for k, v in sorted(vars(args).items()) if k != 'json'},
    }
    if args.mode == 'end2end':
        report['stage_ms_median'] = {k: sig(statistics.median(v) * 1000.0) for k, v in stages.items()}
        # per call: everything around the forward pass (pre- and post-processing, hand-over)
        report['end2end_minus_forward_ms_median'] = sig(statistics.median(
            [(t - f) * 1000.0 for t, f in zip(stages['end2end'], stages['forward'])]))
    from efficientdet.runtimes import get_target
    report.update(get_target(args.backend).versions())
    report.update({f'note_{k}': v for k, v in notes.items()})
    return report


def build_parser() -> ScriptParser:
    p = ScriptParser(description=__doc__)
    add_project_args(p)
    add_model_args(p)
    add_weights_arg(p)
    p.add_argument('--num_classes', type=int, default=None,
                   help='class count of a model without a project (classes named by index; not with -p)')
    add_options(p, 'batch_size', batch_size=1)
    add_runtime_args(p)
    p.add_argument('--half_dtype', default='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='torch --half: auto = float16 on CUDA, bfloat16 on CPU')
    add_inference_args(p, threshold=0.05, iou=0.5)
    p.add_argument('--mode', default='end2end', choices=['end2end', 'forward'],
                   help='end2end: preprocess + forward + post-processing; forward: the forward pass alone')
    p.add_argument('--iters', type=int, default=30, help='timed runs')
    p.add_argument('--warmup', type=int, default=5, help='untimed runs first')
    p.add_argument('--json', default=None, help='write the report here')
    p.add_argument('--fuse', action=argparse.BooleanOptionalAction, default=True,
                   help='fold BatchNorms (efficientdet.fuse); --no-fuse runs the training model')
    p.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=True,
                   help='channels_last memory format (torch / torchscript backends)')
    p.add_argument('--fast', action=argparse.BooleanOptionalAction, default=None,
                   help='CPU fast path of the fused model (oneDNN conv+swish fusion; default: on for float32 CPU)')
    p.add_argument('--cuda_graphs', action='store_true', help='replay a captured CUDA graph (torch, CUDA)')
    p.add_argument('--tune_malloc', action=argparse.BooleanOptionalAction, default=None,
                   help='keep freed memory in the process (glibc mallopt): large activations are reused, not '
                        'page-faulted in afresh each call; resident memory stays at its peak '
                        '(efficientdet.runtimes.tuning.tune_cpu_allocator; default: on for CPU)')
    p.add_argument('--verify', action='store_true', help='check exported files against the eager model')
    p.add_argument('--camera_size', default='640x480', help='synthetic frame WIDTHxHEIGHT')
    p.add_argument('--image', default=None, help='use this image file instead of the synthetic frame')
    return p


def format_report(r: Dict[str, Any]) -> str:
    lines = [f"{r['model']} {r['image_size'][0]}x{r['image_size'][1]} batch {r['batch_size']} | "
             f"backend {r['backend']} | mode {r['mode']} | {r['device']} | threads {r['threads']} | "
             f"torch {r['torch_version']}",
             f"latency median {r['latency_ms_median']:.1f} ms, p90 {r['latency_ms_p90']:.1f} ms, "
             f"min {r['latency_ms_min']:.1f} ms | {r['fps']:.2f} FPS | {r['images_per_second']:.2f} images/s | "
             f"peak memory {r['peak_memory_mb']} MB"]
    if 'stage_ms_median' in r:
        s = r['stage_ms_median']
        lines.append(f"stages (median ms): preprocess {s['preprocess']:.1f}, forward {s['forward']:.1f}, "
                     f"postprocess {s['postprocess']:.1f}, end2end {s['end2end']:.1f} (end2end - forward "
                     f"{r['end2end_minus_forward_ms_median']:.1f}); detections {r['num_detections']}")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_benchmark(args)
    print(format_report(report))
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=2)
            f.write('\n')
    return 0


if __name__ == '__main__':
    run_cli(main)
