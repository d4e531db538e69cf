"""Released EfficientDet weights by name.

  python -m efficientdet.zoo list [--dir D]          the table: name, variant, source, published AP, size, cached
  python -m efficientdet.zoo get NAME... [--dir D]   fetch ahead of time (e.g. for an offline machine)
  python -m efficientdet.zoo verify [--dir D]        re-check every cached file (hash, size, tensors)

Files go to torch.hub's checkpoint cache ($TORCH_HOME/hub/checkpoints) unless --dir is given; a
folder filled with ``get --dir D`` serves an offline machine as its $TORCH_HOME/hub/checkpoints.
APs are COCO val2017 mAP@[.5:.95] as published by each source, not measured by this project.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from ..options import ScriptParser, variant_type
from ..config import VARIANT_HELP
from ..errors import UserError, run_cli
from . import cache_dir, cache_path, fetch, load_table, lookup
from .fetch import check_file, remove_cached


def _size(entry, path: str) -> str:
    n = os.path.getsize(path) if os.path.isfile(path) else entry.size_bytes
    return f'{n / 2 ** 20:.1f} MiB' if n is not None else '?'


def _ap(v: Optional[float]) -> str:
    return f'{v:.1f}' if v is not None else '-'


def _cmd_list(args: argparse.Namespace) -> int:
    table = load_table()
    folder = args.dir or cache_dir()
    rows = [('name', 'variant', '-c', 'source', 'AP', 'AP official', 'size', 'cached')]
    for e in table.entries:
        path = cache_path(e, folder)
        rows.append((e.name + (' (coco)' if e.coco else ''), e.variant_name, str(e.variant), e.source,
                     _ap(e.ap_published), _ap(e.ap_official), _size(e, path), 'yes' if os.path.isfile(path) else 'no'))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f'\ncache: {folder}\nAP: COCO val2017 mAP@[.5:.95] as published by the source (its evaluation of the file; '
          'the official TF model\'s as it lists it), not measured here. "coco" = -w coco for that variant.')
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    for spec in args.names:
        entry = lookup(spec, args.compound_coef if spec == 'coco' else None)
        if entry is None:
            raise UserError(f'{spec}: an existing path, not a released name (python -m efficientdet.zoo list)')
        path = fetch(entry, args.dir)
        print(f'{entry.name}: {path}')
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    folder = args.dir or cache_dir()
    bad = checked = 0
    for e in load_table().entries:
        path = cache_path(e, folder)
        if not os.path.isfile(path):
            continue
        checked += 1
        try:
            check_file(e, path)
        except UserError as err:
            bad += 1
            remove_cached(path)
            print(f'{e.name}: BAD, removed {path} ({err})')
        else:
            print(f'{e.name}: ok ({path})')
    print(f'{checked} cached files checked in {folder}, {bad} bad')
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(prog='python -m efficientdet.zoo', description=__doc__)  # plugins loaded (layouts)
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('list', help='the table of released weights, and which are cached')
    p.add_argument('--dir', default=None, help='cache folder to look in (default: torch.hub checkpoints)')
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser('get', help='fetch released weights ahead of time')
    p.add_argument('names', nargs='+', metavar='NAME', help="names from 'list' (or coco with -c)")
    p.add_argument('-c', '--compound_coef', type=variant_type, default=None, metavar='C',
                   help=f'variant for the name coco: {VARIANT_HELP}')
    p.add_argument('--dir', default=None, help='folder to put them in (default: torch.hub checkpoints)')
    p.set_defaults(func=_cmd_get)
    p = sub.add_parser('verify', help='re-check every cached file; bad ones are removed')
    p.add_argument('--dir', default=None, help='cache folder to check (default: torch.hub checkpoints)')
    p.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    run_cli(main)
