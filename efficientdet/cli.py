"""Small helpers shared by the command-line scripts."""
from __future__ import annotations

import argparse
from typing import Any, Union

import torch

from .config import COMPAT_MODES, VARIANT_HELP, parse_variant
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


def variant_type(value: str):
    """argparse ``type`` for ``-c``: a variant key (``config.parse_variant``: 0-8, d0, d7x, lite0 …)."""
    try:
        return parse_variant(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser, variant_default: Any = 0) -> None:
    """The options every model-building script shares: ``-c``, ``--image_size H [W]``, ``--compat``."""
    p.add_argument('-c', '--compound_coef', type=variant_type, default=variant_default,
                   help=f'EfficientDet variant: {VARIANT_HELP}')
    p.add_argument('--image_size', type=int, nargs='+', default=None, metavar=('H', 'W'),
                   help="network input size: H W, or one number for a square input (default: the variant's)")
    p.add_argument('--compat', choices=COMPAT_MODES, default='official',
                   help="zylo117: Yet-Another-EfficientDet-Pytorch's max-pool padding and anchor ratios "
                        '(for its published weights)')


def image_size_arg(value: Any, flag: str = '--image_size') -> Union[None, tuple]:
    """``--image_size`` as parsed (None, ``[S]``, ``[H, W]`` or an int) → None or ``(H, W)``."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = list(value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) == 2:
        return (value[0], value[1])
    raise UserError(f'{flag} takes H W or one number, got {len(value)} numbers')


def add_backend_args(p: argparse.ArgumentParser, model_help: str = 'the exported file given with -w') -> None:
    """``--backend`` (``efficientdet.runtimes.BACKENDS``), ``--providers`` and ``--threads``: the
    options of every script that runs a model. ``model_help`` says where a non-torch backend's file
    comes from."""
    from .runtimes import BACKENDS
    p.add_argument('--backend', choices=BACKENDS, default='torch',
                   help=f'torch runs the PyTorch model; onnxruntime / openvino / torchscript run {model_help} '
                        '(python -m efficientdet.export onnx|openvino|torchscript)')
    p.add_argument('--providers', type=providers_arg, default=None,
                   help='onnxruntime execution providers, comma-separated (default CPUExecutionProvider)')
    p.add_argument('--threads', type=int, default=None, help='inference threads (default: the runtime\'s)')


def providers_arg(value: str) -> list:
    """``--providers A,B`` → ['A', 'B']."""
    names = [v.strip() for v in str(value).split(',') if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError('give provider names separated by commas, e.g. CPUExecutionProvider')
    return names
