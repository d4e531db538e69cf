"""Training-step throughput of Yet-Another-EfficientDet-Pytorch, for comparison with
``tools/bench_train.py`` (run it with the peer's own Python environment; nothing of the peer is
imported into this project):

    ZYLO=/path/to/Yet-Another-EfficientDet-Pytorch $PEER_PY tools/peer_train_step.py [--threads 2]

Its ``EfficientDetBackbone`` (D0, 90 classes, train mode) and its ``FocalLoss``, AdamW: forward +
loss + backward + step on 8 random 256x256 images with 8 random boxes each, the same sizes as
``bench_train.py``'s defaults; prints the median images/s over the timed steps.
"""
import argparse
import os
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch_size', type=int, default=8)
    ap.add_argument('--image_size', type=int, default=256)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.environ['ZYLO'])
    from backbone import EfficientDetBackbone  # the peer's modules, from its checkout
    from efficientdet.loss import FocalLoss
    torch.manual_seed(0)
    model = EfficientDetBackbone(num_classes=90, compound_coef=0).train()
    criterion, opt = FocalLoss(), torch.optim.AdamW(model.parameters(), 1e-3)
    b, s = args.batch_size, args.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s, s, generator=g)
    xy = torch.rand(b, 8, 2, generator=g) * (s - 64)
    wh = torch.rand(b, 8, 2, generator=g) * 56 + 8
    annotations = torch.cat([xy, xy + wh, torch.randint(0, 90, (b, 8, 1), generator=g).float()], -1)
    times = []
    for i in range(args.warmup + args.iters):
        t = time.perf_counter()
        _, regression, classification, anchors = model(x)
        cls_loss, box_loss = criterion(classification, regression, anchors, annotations)
        loss = cls_loss.mean() + box_loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    print(f'Yet-Another D0 {s}px batch {b}, {args.threads} threads: median {b / statistics.median(times):.2f} img/s '
          f'(best {b / min(times):.2f}, worst {b / max(times):.2f}, {len(times)} steps)')


if __name__ == '__main__':
    main()
