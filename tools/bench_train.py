"""Training-step throughput: forward + loss + backward + optimizer step (+ EMA), in images/s.

    python tools/bench_train.py -c 0 --image_size 256 --batch_size 8 --threads 2

Random images and random boxes (``--boxes`` per image, ``--num_classes`` classes); the model is in
train mode (BN statistics, drop-connect) as in training. Prints the median and the spread over
``--iters`` timed steps after ``--warmup`` untimed ones, and the median time of each phase.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from efficientdet.engine import ModelEMA, build_optimizer  # noqa: E402
from efficientdet.errors import run_cli  # noqa: E402
from efficientdet.loss import DetectionLoss  # noqa: E402
from efficientdet.model import EfficientDetBackbone  # noqa: E402


def random_annotations(batch: int, boxes: int, size: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """[B, boxes, 5] (x1, y1, x2, y2, class) network-input pixels, sizes 4-50 % of the image."""
    g = torch.Generator().manual_seed(seed)
    wh = (torch.rand(batch, boxes, 2, generator=g) * 0.46 + 0.04) * size
    xy = torch.rand(batch, boxes, 2, generator=g) * (size - wh)
    cls = torch.randint(0, num_classes, (batch, boxes, 1), generator=g).float()
    return torch.cat([xy, xy + wh, cls], -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('-c', '--compound_coef', type=int, default=0)
    ap.add_argument('--image_size', type=int, default=256)
    ap.add_argument('--batch_size', type=int, default=8)
    ap.add_argument('--num_classes', type=int, default=90)
    ap.add_argument('--boxes', type=int, default=8, help='boxes per image')
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--channels_last', action='store_true')
    ap.add_argument('--no_ema', action='store_true')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EfficientDetBackbone(num_classes=args.num_classes, compound_coef=args.compound_coef)
    model.train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ann = random_annotations(args.batch_size, args.boxes, args.image_size, args.num_classes)
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
    print(f'D{args.compound_coef} {args.image_size}px batch {args.batch_size}, {args.num_classes} classes, '
          f'{args.threads} threads,{", channels_last" if args.channels_last else ""}: '
          f'median {statistics.median(ips):.2f} img/s (best {max(ips):.2f}, worst {min(ips):.2f}, '
          f'{args.iters} steps)')
    print('  phase medians (ms): ' + ', '.join(f'{k} {statistics.median(v) * 1000:.0f}' for k, v in phases.items()))
    return 0


if __name__ == '__main__':
    run_cli(main)
