"""``python -m efficientdet.convert effdet IN.pth -c C -o OUT.pth [--num_classes N]``: a rwightman
efficientdet-pytorch (``effdet``) ``tf_efficientdet_*`` checkpoint written once as a plain .pth of
this project's keys. The renaming itself is the effdet layout adapter,
:mod:`efficientdet.ckpt.layouts.effdet` (re-exported here).
"""
from __future__ import annotations

import argparse

from ..ckpt.files import atomic_save
from ..ckpt.layout import check_variant, infer_num_classes, num_parameters, read_checkpoint
from ..ckpt.layouts import ConversionError, get_layout, layout_names
from ..ckpt.layouts.effdet import effdet_key_map, effdet_to_state_dict, state_dict_to_effdet
from ..options import variant_type
from ..config import VARIANT_HELP, get_config
from ..errors import UserError

__all__ = ['effdet_key_map', 'effdet_to_state_dict', 'state_dict_to_effdet', 'register']


def _cmd_effdet(args: argparse.Namespace) -> int:
    ck = read_checkpoint(args.input)
    if ck.layout != 'effdet':  # what the file is, and what to do with it, from the layout registry
        layout = get_layout(ck.layout)
        hint = ('expected keys such as backbone.conv_stem.weight, fpn.cell.0…' if layout is None else
                f'convert it with: python -m efficientdet.convert {layout.convert_command} {args.input} -c C -o OUT.pth'
                if layout.convert_command else 'it loads directly (-w)')
        raise UserError(f'{args.input}: not an effdet checkpoint (looks like {layout_names()[ck.layout]}); {hint}')
    check_variant(ck, args.compound_coef)
    try:
        sd = effdet_to_state_dict(ck.state_dict, args.compound_coef, args.num_classes)
    except ConversionError as e:
        raise UserError(f'{args.input}: {" ".join(str(e).split())}') from None
    atomic_save(sd, args.output)
    n_cls = infer_num_classes(sd)
    note = ''
    if ck.dropped:
        note = f'; left out {", ".join(ck.dropped)} ({"; ".join(sorted(set(ck.dropped.values())))})'
    print(f'wrote {args.output}: {get_config(args.compound_coef).name}, {n_cls} classes, {len(sd)} tensors, '
          f'{num_parameters(sd):,} parameters (from {args.input}'
          + (f', weights under {"/".join(ck.wrapper)}' if ck.wrapper else '') + f'){note}')
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``effdet`` subcommand to ``python -m efficientdet.convert``."""
    p = subparsers.add_parser('effdet', help='rwightman effdet tf_efficientdet_d* checkpoint → .pth')
    p.add_argument('input', help='effdet .pth/.pth.tar (bare, or under state_dict / state_dict_ema / model)')
    p.add_argument('-c', '--compound_coef', type=variant_type, required=True, metavar='C', help=VARIANT_HELP)
    p.add_argument('-o', '--output', required=True)
    p.add_argument('--num_classes', type=int, default=None, help='expected class count (checked)')
    p.set_defaults(func=_cmd_effdet)
