"""The scripts' shared options: one option per idea, one name, one help text.

Every script builds its parser with :class:`ScriptParser` and takes the options it shares with the
others from :data:`OPTIONS` through the group functions below (``add_project_args``,
``add_model_args``, ``add_weights_arg``, ``add_inference_args``, ``add_runtime_args``,
``add_data_args``); a runtime adds its export options from the same table. Yet-Another-EfficientDet-Pytorch's
spellings are aliases of the same option (``--nms_threshold`` = ``--iou``, ``--float16`` = ``--half``,
``--load_weights`` = ``--weights``, ``--cuda False`` = ``--device cpu``). Choices come from the
package's own lists (variants, compat modes, NMS methods, the runtime registry), so a registered
runtime appears in every ``--backend``.

``--image_size`` takes ``512``, ``384x640`` or two numbers ``384 640``; it never swallows a
positional argument that follows it (``--image_size 256 photo.jpg``).

This module sits below the runtimes, the detector and the model factory (it imports none of them
but the runtime registry, when a parser is built); what the options mean for a model or a detector
is :mod:`efficientdet.cli`.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .config import COMPAT_MODES, VARIANT_HELP, parse_variant
from .errors import UserError

__all__ = ['ScriptParser', 'OPTIONS', 'Option', 'add_options', 'add_project_args', 'add_model_args',
           'add_weights_arg', 'add_inference_args', 'add_runtime_args', 'add_data_args', 'str2bool',
           'variant_type', 'image_size_type', 'image_size_arg', 'providers_arg', 'join_size_pairs',
           'DEFAULT_PROJECT', 'RANDOM_WEIGHTS', 'project_name']

DEFAULT_PROJECT = 'shape'   # the shipped project: its D0 weights are in weights/
RANDOM_WEIGHTS = 'random'   # -w random: the official initialisation, no checkpoint (export, benchmark)
_TRUE = ('1', 'true', 'yes', 'y', 'on')
_FALSE = ('0', 'false', 'no', 'n', 'off')


# ----------------------------------------------------------------------------- value types
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


def variant_type(value: str):
    """argparse ``type`` for ``-c``: a variant key (``config.parse_variant``: 0-8, d0, d7x, lite0 …)."""
    try:
        return parse_variant(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_SIZE = re.compile(r'^\s*(\d+)\s*(?:[x,X*]\s*(\d+))?\s*$')


def image_size_type(value: Any) -> Tuple[int, int]:
    """argparse ``type`` for ``--image_size``: '512' → (512, 512); '384x640' or '384,640' → (384, 640)
    (height x width)."""
    m = _SIZE.match(str(value))
    if not m:
        raise argparse.ArgumentTypeError(f'{value!r} is not a size; use 512, 384x640 (H x W) or two numbers 384 640')
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
    return h, w


def image_size_arg(value: Any, flag: str = '--image_size') -> Union[None, Tuple[int, int]]:
    """``--image_size`` as parsed (None, ``(H, W)``, an int, ``[S]`` or ``[H, W]``) → None or ``(H, W)``."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = list(value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    if len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise UserError(f'{flag} takes H W or one number, got {len(value)} numbers')


def providers_arg(value: str) -> List[str]:
    """``--providers A,B`` → ['A', 'B']."""
    names = [v.strip() for v in str(value).split(',') if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError('give provider names separated by commas, e.g. CPUExecutionProvider')
    return names


class _CudaAction(argparse.Action):
    """Yet-Another's ``--cuda True|False``: the same option as ``--device`` (False = cpu, True = cuda:0)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, 'cuda:0' if str2bool(values) else 'cpu')


# ----------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class Option:
    """One shared option: its flags (canonical first, then aliases), argparse keywords and help."""
    flags: Tuple[str, ...]
    help: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    aliases_help: str = ''  # extra flags added as separate actions (e.g. --cuda for --device)


def _backend_names() -> Tuple[str, ...]:
    from .runtimes.base import backend_names  # importing runtimes.base runs runtimes/__init__: built-ins registered
    return backend_names()


def _nms_methods() -> Tuple[str, ...]:
    from .postprocess import NMS_METHODS
    return NMS_METHODS


# dest -> Option. ``choices`` given as a callable are resolved when a parser is built (registries).
OPTIONS: Dict[str, Option] = {
    'project': Option(('-p', '--project'), f'project: projects/NAME.yml or a yml path (classes, anchors, normalisation, '
                      f'dataset folders; default: {DEFAULT_PROJECT})', {'default': None}),
    'projects_dir': Option(('--projects_dir',), 'folder of the project files (the packaged projects are used when '
                           'NAME is not there)', {'default': 'projects'}),
    'compound_coef': Option(('-c', '--compound_coef'), f'EfficientDet variant: {VARIANT_HELP} (default: the variant '
                            'of a released weights name given with -w, else 0)',
                            {'type': variant_type, 'default': None, 'metavar': 'C'}),
    'image_size': Option(('--image_size',), "network input size: 512, 384x640 (H x W) or two numbers 384 640 "
                         "(default: the variant's)", {'type': image_size_type, 'default': None, 'metavar': 'H[xW]'}),
    'compat': Option(('--compat',), "official, or zylo117: Yet-Another-EfficientDet-Pytorch's max-pool padding and "
                     'anchor ratios, for its weights (default: what the weights say: zylo117 for its released '
                     'files, else official)', {'choices': COMPAT_MODES, 'default': None}),
    'weights': Option(('-w', '--weights', '--load_weights'),
                      'weights: a checkpoint (.pth of this project, Yet-Another or effdet; official TF .npz or '
                      'checkpoint folder), a released name (python -m efficientdet.zoo list), an exported file for '
                      '--backend, or "random" (export, benchmark); train.py: the weights to fine-tune, or "last" / a '
                      '.ckpt to resume. Default: weights/efficientdet-d{C}-{PROJECT}.pth (train.py: none, the '
                      'official initialisation; benchmark: random weights when that file is absent)',
                      {'default': None, 'metavar': 'WEIGHTS'}),
    'threshold': Option(('--threshold', '--score_threshold'), 'score threshold: detections scoring below it are '
                        'dropped', {'type': float}),
    'iou': Option(('--iou', '--nms_threshold', '--iou_threshold'), 'NMS IoU threshold', {'type': float}),
    'nms': Option(('--nms',), 'NMS method: hard, gaussian (soft-NMS, sigma 0.5) or official (the official '
                  'evaluation: per-class gaussian soft-NMS over all anchors)', {'choices': _nms_methods,
                                                                                'default': 'hard'}),
    'max_det': Option(('--max_det',), 'detections kept per image at most', {'type': int, 'default': 100}),
    'backend': Option(('--backend',), 'torch runs the PyTorch model; the others run an exported file given with -w '
                      '(python -m efficientdet.export FORMAT)', {'choices': _backend_names, 'default': 'torch'}),
    'device': Option(('--device',), 'cpu, cuda, cuda:N or a GPU index (default: cuda:0 when available, else cpu); '
                     "Yet-Another's --cuda True|False means the same", {'default': None}),
    'half': Option(('--half', '--float16'), 'reduced precision: autocast float16 on CUDA / bfloat16 on CPU (torch), '
                   'bfloat16 or float16 inference (openvino); anchors and box decoding stay float32',
                   {'type': str2bool, 'nargs': '?', 'const': True, 'default': False, 'metavar': 'BOOL'}),
    'threads': Option(('--threads',), "inference threads (default: the runtime's)", {'type': int, 'default': None}),
    'providers': Option(('--providers',), 'onnxruntime execution providers, comma-separated (default: '
                        'CPUExecutionProvider)', {'type': providers_arg, 'default': None}),
    'compile': Option(('--compile',), 'torch backend: torch.compile the network (on a CPU with frozen weights); the '
                      'first call of each input size compiles (about a minute for D0 on 2 cores)',
                      {'action': 'store_true'}),
    'data_path': Option(('--data_path',), 'folder holding {project_name}/ (the dataset)', {'default': 'datasets/'}),
    'num_workers': Option(('-n', '--num_workers'), 'data-loader worker processes (per process)', {'type': int}),
    'batch_size': Option(('--batch_size',), 'images per batch (train.py: per optimizer step, over all processes and '
                         '--accumulate micro-batches; export tflite: the file\'s fixed batch, other sizes run in '
                         'pieces)', {'type': int}),
}
_CUDA_ALIAS = ('--cuda',)


def add_options(p: argparse.ArgumentParser, *names: str, **defaults: Any) -> None:
    """Add the shared options ``names`` (keys of :data:`OPTIONS`) to ``p``; ``defaults`` sets a
    script's own default of an option (thresholds, batch size)."""
    for name in names:
        opt = OPTIONS[name]
        kw = dict(opt.kwargs)
        if callable(kw.get('choices')):
            kw['choices'] = tuple(kw['choices']())
        if name in defaults:
            kw['default'] = defaults[name]
        p.add_argument(*opt.flags, dest=name, help=opt.help, **kw)
        if name == 'device':
            p.add_argument(*_CUDA_ALIAS, dest='device', action=_CudaAction, metavar='BOOL', default=argparse.SUPPRESS,
                           help='Yet-Another spelling of --device: True = cuda:0, False = cpu')


def add_project_args(p: argparse.ArgumentParser) -> None:
    """``-p`` and ``--projects_dir``."""
    add_options(p, 'project', 'projects_dir')


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``-c``, ``--image_size``, ``--compat``: what the network is."""
    add_options(p, 'compound_coef', 'image_size', 'compat')


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    """``-w`` (``--weights``, ``--load_weights``)."""
    add_options(p, 'weights')


def add_inference_args(p: argparse.ArgumentParser, threshold: float, iou: float) -> None:
    """``--threshold``, ``--iou``, ``--nms``, ``--max_det`` with the script's thresholds."""
    add_options(p, 'threshold', 'iou', 'nms', 'max_det', threshold=threshold, iou=iou)


def add_runtime_args(p: argparse.ArgumentParser, compile: bool = True) -> None:
    """``--backend``, ``--device`` (and ``--cuda``), ``--half``, ``--threads``, ``--providers``, ``--compile``."""
    add_options(p, 'backend', 'device', 'half', 'threads', 'providers', *(('compile',) if compile else ()))


def add_data_args(p: argparse.ArgumentParser, batch_size: int, num_workers: int) -> None:
    """``--data_path``, ``-n``/``--num_workers``, ``--batch_size``."""
    add_options(p, 'data_path', 'num_workers', 'batch_size', batch_size=batch_size, num_workers=num_workers)


# ----------------------------------------------------------------------------- the parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each default shown once: appended unless the help already says it, and never
    for None / False (no default to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if 'default' in text.lower() or action.default in (None, False, argparse.SUPPRESS) or \
                action.option_strings == [] or isinstance(action, argparse._HelpAction):
            return text
        return f'{text} (default: %(default)s)'


class ScriptParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` of every script: defaults shown once in ``--help``; plugins
    (``efficientdet.plugins``) loaded first so their formats and runtimes are choices; and
    ``--image_size H W`` (two numbers) read as one value, so it never takes a following positional."""

    def __init__(self, *args: Any, **kwargs: Any):
        from .plugins import load_plugins
        load_plugins()
        kwargs.setdefault('formatter_class', _Formatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        import sys
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(join_size_pairs(argv, self._size_flags()), namespace)

    def _size_flags(self) -> Tuple[str, ...]:
        return tuple(s for a in self._actions if a.type is image_size_type for s in a.option_strings)


def join_size_pairs(argv: Sequence[str], flags: Sequence[str]) -> List[str]:
    """``[FLAG, '384', '640', ...]`` → ``[FLAG, '384x640', ...]`` for the size ``flags``; anything
    else unchanged (``FLAG 256 photo.jpg`` stays: one number, then the positional)."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        out.append(tok)
        pair = argv[i + 1:i + 3]
        if tok in flags and len(pair) == 2 and pair[0].isdigit() and pair[1].isdigit():
            out.append(f'{pair[0]}x{pair[1]}')
            i += 3
            continue
        i += 1
    return out


def project_name(args: argparse.Namespace) -> str:
    """``-p`` as given, else :data:`DEFAULT_PROJECT`."""
    return getattr(args, 'project', None) or DEFAULT_PROJECT
