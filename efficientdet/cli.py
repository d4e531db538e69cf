"""Small helpers shared by the command-line scripts."""
from __future__ import annotations

import argparse
from typing import Any, Union

import torch

from .errors import UserError

_TRUE = ('1', 'true', 'yes', 'y', 'on')
_FALSE = ('0', 'false', 'no', 'n', 'off')


def str2bool(value: Any) -> bool:
    """Yet-Another passes booleans as words (``--head_only True``); also 1/0, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got {value!r}')


def parse_device(name: Union[str, int, torch.device, None], flag: str = '--device') -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or a bare GPU index → torch.device; None picks cuda:0 when available.
    Unknown names and CUDA without a GPU are UserErrors naming ``flag``."""
    if name is None:
        return torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')
    if isinstance(name, torch.device):
        dev = name
    else:
        text = str(name).strip()
        if text.isdigit():
            text = f'cuda:{text}'
        try:
            dev = torch.device(text)
        except (RuntimeError, TypeError, ValueError):
            raise UserError(f'{flag} {name!r} is not a device name; use cpu, cuda:0 or a GPU index') from None
    if dev.type not in ('cpu', 'cuda'):
        raise UserError(f'{flag} {name}: only cpu and cuda devices are supported')
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'{flag} {name}: CUDA is not available on this machine; use {flag} cpu')
    return dev
