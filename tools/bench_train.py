"""Training-step throughput: forward + loss + backward + optimizer step (+ EMA), in images/s.

    python tools/bench_train.py -c 0 --image_size 256 --batch_size 8 --threads 2

Random images and random boxes (``--boxes`` per image, ``--num_classes`` classes); the model is in
train mode (BN statistics, drop-connect) as in training. Prints the median and the spread over
``--iters`` timed steps after ``--warmup`` untimed ones, the median time of each phase and the
process's peak resident memory (VmHWM).

Memory of one training step with and without ``--grad_checkpoint``, one fresh process per
configuration (peak RSS on the CPU; on a GPU ``--device cuda`` reports the peak CUDA memory):

    python tools/bench_train.py --memory_table 0,1,2,3 --batch_size 2 --threads 2
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficientdet.cli import variant_type  # noqa: E402
from efficientdet.config import get_config, variant_tag  # noqa: E402
from efficientdet.errors import run_cli  # noqa: E402
from efficientdet.loss import DetectionLoss  # noqa: E402
from efficientdet.model import EfficientDetBackbone  # noqa: E402
from efficientdet.training import ModelEMA, build_optimizer  # noqa: E402
from efficientdet.training.memory import enable_grad_checkpoint  # noqa: E402


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024.0
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_table(args: argparse.Namespace) -> int:
    """One subprocess per (variant, checkpointing) running one training step; prints peak memory."""
    rows = []
    for c in [variant_type(v) for v in args.memory_table.split(',')]:
        size = args.image_size or get_config(c).input_size
        peaks = []
        for ckpt in (False, True):
            cmd = [sys.executable, os.path.abspath(__file__), '-c', str(c), '--image_size', str(size),
                   '--batch_size', str(args.batch_size), '--num_classes', str(args.num_classes), '--iters', '1',
                   '--warmup', '0', '--threads', str(args.threads), '--device', args.device]
            if args.channels_last:
                cmd.append('--channels_last')
            if ckpt:
                cmd.append('--grad_checkpoint')
            proc = subprocess.run(cmd, capture_output=True, text=True)
            m = re.search(r'peak memory ([0-9.]+) MiB', proc.stdout)
            peaks.append(float(m.group(1)) if m and proc.returncode == 0 else float('nan'))
            if proc.returncode:
                print(f'{variant_tag(c)} {"checkpointed" if ckpt else "plain"}: failed '
                      f'({(proc.stderr.strip().splitlines() or ["?"])[-1]})', flush=True)
        saving = 1.0 - peaks[1] / peaks[0] if peaks[0] == peaks[0] and peaks[1] == peaks[1] else float('nan')
        rows.append((variant_tag(c), size, peaks[0], peaks[1], saving))
        print(f'{variant_tag(c).upper():>5} {size:>5}px batch {args.batch_size}: {peaks[0]:8.0f} MiB -> '
              f'{peaks[1]:8.0f} MiB with --grad_checkpoint ({saving * 100:.0f}% less)', flush=True)
    return 0


def random_annotations(batch: int, boxes: int, size: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """[B, boxes, 5] (x1, y1, x2, y2, class) network-input pixels, sizes 4-50 % of the image."""
    g = torch.Generator().manual_seed(seed)
    wh = (torch.rand(batch, boxes, 2, generator=g) * 0.46 + 0.04) * size
    xy = torch.rand(batch, boxes, 2, generator=g) * (size - wh)
    cls = torch.randint(0, num_classes, (batch, boxes, 1), generator=g).float()
    return torch.cat([xy, xy + wh, cls], -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('-c', '--compound_coef', type=variant_type, default=0)
    ap.add_argument('--image_size', type=int, default=None, help='default: 256 (table: the variant\'s size)')
    ap.add_argument('--batch_size', type=int, default=8)
    ap.add_argument('--num_classes', type=int, default=90)
    ap.add_argument('--boxes', type=int, default=8, help='boxes per image')
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--channels_last', action='store_true')
    ap.add_argument('--no_ema', action='store_true')
    ap.add_argument('--grad_checkpoint', action='store_true', help='activation checkpointing (as train.py)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--memory_table', default=None, metavar='C,C,...',
                    help='peak memory of one step per variant, plain and checkpointed (subprocesses)')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_table:
        return memory_table(args)
    args.image_size = args.image_size or 256
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = EfficientDetBackbone(num_classes=args.num_classes, compound_coef=args.compound_coef).to(device)
    model.train()
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ann = random_annotations(args.batch_size, args.boxes, args.image_size, args.num_classes).to(device)
    criterion = DetectionLoss()
    opt = build_optimizer(model, 'sgd', 1e-3)
    ema = None if args.no_ema else ModelEMA(model)
    phases = {'forward': [], 'loss': [], 'backward': [], 'step': [], 'total': []}
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        _, reg, cls, anchors = model(x, return_logits=True)
        t1 = time.perf_counter()
        out = criterion(cls, reg, anchors, ann)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out['loss'].backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        if ema is not None:
            ema.update(model)
        t4 = time.perf_counter()
        if i >= args.warmup:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[k].append(v)
    tot = sorted(phases['total'])
    ips = [args.batch_size / t for t in tot]
    print(f'{variant_tag(args.compound_coef).upper()} {args.image_size}px batch {args.batch_size}, {args.num_classes} classes, '
          f'{args.threads} threads,{", channels_last" if args.channels_last else ""}: '
          f'median {statistics.median(ips):.2f} img/s (best {max(ips):.2f}, worst {min(ips):.2f}, '
          f'{args.iters} steps)')
    print('  phase medians (ms): ' + ', '.join(f'{k} {statistics.median(v) * 1000:.0f}' for k, v in phases.items()))
    if device.type == 'cuda':
        print(f'  peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB (CUDA, allocated)')
    else:
        print(f'  peak memory {peak_rss_mib():.0f} MiB (process RSS, VmHWM)')
    return 0


if __name__ == '__main__':
    run_cli(main)
