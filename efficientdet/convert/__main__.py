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

from ..ckpt.files import atomic_save
from ..ckpt.layout import Checkpoint, check_variant, num_parameters
from ..cli import variant_type
from ..config import VARIANT_HELP, get_config
from ..errors import UserError, run_cli
from . import effdet
from .tf import ConversionError, read_tf_input, tf_to_state_dict


def _cmd_tf(args: argparse.Namespace) -> int:
    tf_vars = read_tf_input(args.input)
    check_variant(Checkpoint(args.input, {k[:-2] if k.endswith(':0') else k: v for k, v in tf_vars.items()}, 'tf'),
                  args.compound_coef)
    try:
        sd = tf_to_state_dict(tf_vars, args.compound_coef, args.num_classes)
    except ConversionError as e:
        raise UserError(f'{args.input}: {e}') from None
    atomic_save(sd, args.output)
    n = num_parameters(sd)
    print(f'wrote {args.output}: {get_config(args.compound_coef).name}, {len(sd)} tensors, {n:,} parameters')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m efficientdet.convert', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('tf', help='official TensorFlow variables (.npz or checkpoint dir) → .pth')
    p.add_argument('input')
    p.add_argument('-c', '--compound_coef', type=variant_type, required=True, metavar='C', help=VARIANT_HELP)
    p.add_argument('-o', '--output', required=True)
    p.add_argument('--num_classes', type=int, default=None, help='expected class count (checked)')
    p.set_defaults(func=_cmd_tf)
    effdet.register(sub)  # the effdet and inspect commands
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    run_cli(main)
