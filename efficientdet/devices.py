"""Device names: ``--device`` values and what library calls accept as a device."""
from __future__ import annotations

from typing import Union

import torch

from .errors import UserError

__all__ = ['parse_device']


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
