"""``python -m efficientdet.convert tf INPUT -c C -o OUT.pth [--num_classes N]``: official TF
variables (an ``.npz`` of name → array, or a checkpoint folder when TensorFlow is installed) written
once as a plain .pth of this project's keys. The mapping itself is the official-TF layout adapter,
:mod:`efficientdet.ckpt.layouts.tf` (re-exported here).
"""
from __future__ import annotations

import argparse

from ..ckpt.files import atomic_save
from ..ckpt.layout import Checkpoint, check_variant, num_parameters
from ..ckpt.layouts import ConversionError
from ..ckpt.layouts.tf import bifpn_nodes, export_tf_names, read_tf_input, tf_to_state_dict
from ..options import variant_type
from ..config import VARIANT_HELP, get_config
from ..errors import UserError

__all__ = ['ConversionError', 'bifpn_nodes', 'export_tf_names', 'read_tf_input', 'tf_to_state_dict', 'register']


def _cmd_tf(args: argparse.Namespace) -> int:
    try:
        tf_vars = read_tf_input(args.input)
        check_variant(Checkpoint(args.input, {k[:-2] if k.endswith(':0') else k: v for k, v in tf_vars.items()},
                                 'tf'), args.compound_coef)
        sd = tf_to_state_dict(tf_vars, args.compound_coef, args.num_classes)
    except ConversionError as e:
        raise UserError(f'{args.input}: {e}') from None
    atomic_save(sd, args.output)
    n = num_parameters(sd)
    print(f'wrote {args.output}: {get_config(args.compound_coef).name}, {len(sd)} tensors, {n:,} parameters')
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tf`` subcommand to ``python -m efficientdet.convert``."""
    p = subparsers.add_parser('tf', help='official TensorFlow variables (.npz or checkpoint dir) → .pth')
    p.add_argument('input')
    p.add_argument('-c', '--compound_coef', type=variant_type, required=True, metavar='C', help=VARIANT_HELP)
    p.add_argument('-o', '--output', required=True)
    p.add_argument('--num_classes', type=int, default=None, help='expected class count (checked)')
    p.set_defaults(func=_cmd_tf)
