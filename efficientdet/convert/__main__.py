"""Convert or inspect EfficientDet weights.

  python -m efficientdet.convert tf INPUT -c C -o OUT.pth [--num_classes N]
  python -m efficientdet.convert effdet IN.pth -c C -o OUT.pth
  python -m efficientdet.convert inspect FILE

For ``tf``, INPUT is an ``.npz`` of official variable name → array, or an official checkpoint directory when
TensorFlow is installed. OUT.pth is a plain state_dict that ``EfficientDetBackbone(num_classes=N,
compound_coef=C)`` loads strictly with ``torch.load(OUT, weights_only=True)``.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from ..errors import run_cli
from ..options import ScriptParser
from . import effdet, inspect_ckpt, tf


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(prog='python -m efficientdet.convert', description=__doc__)  # plugins loaded (layouts)
    sub = parser.add_subparsers(dest='cmd', required=True)
    for command in (tf, effdet, inspect_ckpt):
        command.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    run_cli(main)
