"""Train EfficientDet (D0–D7x, Lite0–Lite4) on a COCO-format dataset (Yet-Another-EfficientDet-Pytorch's CLI).

    python train.py -p shape -c 0 --image_size 256 --batch_size 8 --num_epochs 30
    python train.py -p coco -c 2 --batch_size 32 -w weights/efficientdet-d2.pth   # fine-tune
    python train.py -p coco -c 2 -w last                                           # resume exactly
    python train.py -p coco -c 4 --batch_size 64 --accumulate 8 --grad_checkpoint  # big model, small memory
    python train.py -p mine -c 3 --backbone_weights tf_efficientnet_b3.pth         # from an ImageNet backbone
    python train.py -p coco -c 0 --recipe official                                 # google/automl's recipe
    torchrun --nproc_per_node 4 train.py -p coco -c 3 --batch_size 64              # 4 GPUs (DDP)

Checkpoints go to {saved_path}/{project_name}/: best.pth (the better of the raw and the EMA
weights at the best validation), efficientdet-{variant}_{epoch}_{step}.pth (EMA weights when --ema
is on), all plain state_dicts with BN statistics re-estimated for those weights, and last.ckpt (the
whole training state, for -w last). A new run refuses a folder that holds another run's last.ckpt
(continue it with -w last, or pass another --saved_path). Ctrl+C or SIGTERM: the run stops at the
step under way, last.ckpt is written, the run exits with status 130 / 143. Options become an
efficientdet.training.TrainConfig and the run is efficientdet.training.run_training (the same
call from Python); docs/training.md says how to add a hook.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from efficientdet.errors import run_cli
from efficientdet.training.config import build_parser, config_from_args


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """train.py's options (one per ``TrainConfig`` field)."""
    return build_parser(prog='train.py').parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    from efficientdet.training.run import run_training
    return run_training(config_from_args(get_args(argv))).exit_code


if __name__ == '__main__':
    run_cli(main)
