"""``python -m efficientdet.convert inspect FILE``: what a checkpoint is.

Reports origin (this project / Yet-Another-EfficientDet-Pytorch / effdet / official TF names),
compound coefficient (or the candidates: D6 and D7 have identical shapes), class count, parameter
count, whether it is a full training checkpoint (epoch, step), and how to load or convert it.
Reads with ``weights_only=True`` (``.npz`` without pickles): inspecting never runs code.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List

from ..ckpt.layout import Checkpoint, describe_coef, infer_num_classes, num_parameters, read_checkpoint
from ..ckpt.layouts import get_layout
from ..config import get_config


def _origin(ck: Checkpoint) -> str:
    layout = get_layout(ck.layout)
    return layout.origin(ck) if layout is not None else 'unknown (not an EfficientDet layout this project knows)'


def describe_checkpoint(path: str) -> Dict[str, Any]:
    """Facts about a checkpoint file as a dict (see module docstring)."""
    ck = read_checkpoint(path)
    cands = ck.candidates
    info: Dict[str, Any] = {
        'file': path,
        'origin': _origin(ck),
        'layout': ck.layout,
        'weights_under': '/'.join(ck.wrapper) or None,
        'compound_coef': cands[0] if len(cands) == 1 else None,
        'candidates': cands,
        'variant': describe_coef(cands),
        'num_classes': infer_num_classes(ck.state_dict, 9, ck.layout),
        'tensors': len(ck.state_dict),
        'parameters': num_parameters(ck.state_dict),
        'training': ck.training,
        'dropped': ck.dropped,
    }
    return info


def _load_hint(info: Dict[str, Any]) -> str:
    """The flags that load this file in every script, e.g. '-c 0 -p coco -w FILE'."""
    if info['layout'] == 'unknown':
        return 'not loadable'
    c = ' or '.join(f'-c {x}' for x in info['candidates']) or '-c C'
    n = info['num_classes']
    p = ('-p coco (the 90-slot COCO label map)' if n == 90
         else f'-p PROJECT (a project whose obj_list has {n} entries)' if n else '-p PROJECT')
    hint = f'{c} {p} -w {info["file"]}'
    layout = get_layout(info['layout'])
    if layout is not None and layout.convert_command:
        hint += (f'  (converted on the fly; to write a .pth once: python -m efficientdet.convert '
                 f'{layout.convert_command} {info["file"]} {c} -o OUT.pth)')
    return hint


def format_report(info: Dict[str, Any]) -> str:
    """Human-readable lines for ``describe_checkpoint``'s dict."""
    lines: List[str] = [f"file:           {info['file']}", f"origin:         {info['origin']}"]
    if info['weights_under']:
        lines.append(f"weights under:  '{info['weights_under']}'")
    cands = info['candidates']
    if len(cands) > 1:
        coef = (f"{info['variant']} (-c {' or -c '.join(map(str, cands))}: identical tensor shapes, "
                'the file cannot tell them apart)')
    elif cands:
        coef = f"{info['variant']} (-c {cands[0]})"
    else:
        coef = 'unknown: tensor shapes match no EfficientDet variant'
    lines.append(f'variant:        {coef}')
    n = info['num_classes']
    lines.append(f"num_classes:    {n if n is not None else 'unknown'}")
    lines.append(f"parameters:     {info['parameters']:,} ({info['tensors']} tensors incl. BN statistics)")
    t = info['training']
    if t is not None:
        ema = ', EMA weights present (used for loading)' if t.get('has_ema') else ''
        lines.append(f"training ckpt:  yes: epoch {t.get('epoch')}, step {t.get('step')}{ema}; "
                     f"keys: {', '.join(t.get('keys', []))}")
    else:
        lines.append('training ckpt:  no (weights only)')
    if info['dropped']:
        lines.append(f"left out:       {', '.join(info['dropped'])} ({'; '.join(sorted(set(info['dropped'].values())))})")
    lines.append(f'load with:      {_load_hint(info)}')
    lite = bool(info['candidates']) and all(get_config(c).is_lite for c in info['candidates'])
    if info['layout'] in ('ours', 'yet_another') and info['training'] is None and not lite:
        lines.append("note:           Yet-Another's own weights reproduce its outputs with "
                     "EfficientDetBackbone(..., compat='zylo117')")
    return '\n'.join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    print(format_report(describe_checkpoint(args.input)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand to ``python -m efficientdet.convert``."""
    q = subparsers.add_parser('inspect', help='say what a checkpoint is (origin, variant, classes, size)')
    q.add_argument('input', help='.pth / .ckpt / .npz / .safetensors')
    q.set_defaults(func=cmd_inspect)
