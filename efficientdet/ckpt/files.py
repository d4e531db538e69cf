"""Checkpoint files: safe reading (``weights_only``; ``.npz`` without pickles), atomic writing,
and unwrapping the containers that hold the weights (EMA preferred, ``module.``/``model.`` prefixes).

Nothing here knows what the weights mean: that is :mod:`efficientdet.ckpt.layout`.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import uuid
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..errors import UserError

StateDict = Dict[str, torch.Tensor]

# Containers we unwrap, most preferred first (EMA weights are what the official evaluation uses).
WRAPPER_KEYS = ('state_dict_ema', 'model_ema', 'ema', 'state_dict', 'model')
_PREFIXES = ('module.', 'model.')
# effdet's DetBenchTrain/DetBenchPredict keep the anchor boxes as a buffer next to ``model.*``.
_BENCH_BUFFERS = {'anchors.boxes': 'effdet DetBench anchor buffer: anchors are rebuilt from the config, '
                                   'never learned'}
# Inert classes allowed in weights_only loads: timm/effdet training checkpoints store their
# command-line ``args`` as an argparse.Namespace (rebuilt from a plain dict, runs no code).
_SAFE_GLOBALS = [argparse.Namespace]

def checkpoint_path_exists(path: str) -> bool:
    """A file, a folder (an official TF checkpoint folder) or an official TF checkpoint prefix
    (``model.ckpt`` beside ``model.ckpt.index``): something a weights option can name."""
    return os.path.exists(path) or os.path.isfile(path + '.index')


def safe_load(path: str, map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)``; a file that would need arbitrary unpickling
    (it could run code) is refused with a UserError naming the file, never executed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint file')
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_GLOBALS):
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(str(e))
        if 'global' in detail:
            what = f'the file needs arbitrary unpickling, which could run code{detail}'
        else:
            what = (f'the file is not a tensors-only checkpoint{detail}: it may need arbitrary unpickling, '
                    'which could run code, or not be a checkpoint at all')
        raise UserError(f'{path}: refused to load: {what}. It was not executed. If you trust it, re-save it '
                        'as a plain state_dict of tensors.') from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{path}: not a readable PyTorch checkpoint ({msg})') from None


def _unpickling_detail(msg: str) -> str:
    """The useful part of torch's weights_only refusal, e.g. ' (Unsupported global: GLOBAL io.open)'."""
    msg = re.sub(r'\x1b\[[0-9;]*m', '', msg)
    m = re.search(r'(Unsupported [^\n]*?)(?: was not an allowed global|\n|$)', msg)
    return f' ({m.group(1).strip()[:160]})' if m else ''


def read_npz(path: str) -> Dict[str, torch.Tensor]:
    """Arrays of an ``.npz`` (never unpickled: object arrays are refused) as tensors."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k], copy=True)) for k in z.files}  # keeps 0-d shapes
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f'{path}: not a readable .npz of arrays ({str(e).strip().splitlines()[0]})') from None


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temp file in the same folder (created with the usual
    0o666 & ~umask permissions), fsync, then rename over ``path``: a crash at any point leaves
    either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: Any, depth: int = 0) -> Optional[Tuple[StateDict, List[str]]]:
    """The flat name → tensor dict inside ``obj`` and the wrapper keys that led to it."""
    if _is_tensor_dict(obj):
        return dict(obj), []
    if not isinstance(obj, Mapping) or depth >= 3:
        return None
    for k in WRAPPER_KEYS:
        inner = obj.get(k)
        if isinstance(inner, Mapping):
            got = unwrap(inner, depth + 1)
            if got is not None:
                return got[0], [k] + got[1]
    return None


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove ``module.`` / ``model.`` prefixes shared by every key (repeatedly)."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def drop_bench_buffers(sd: StateDict) -> Tuple[StateDict, Dict[str, str]]:
    """effdet bench state_dicts: ``model.*`` plus ``anchors.boxes``; drop (and name) the buffer."""
    bare = {k: (k[len('module.'):] if k.startswith('module.') else k) for k in sd}
    bench = [k for k in sd if bare[k] in _BENCH_BUFFERS]
    rest = [k for k in sd if k not in bench]
    if not bench or not rest or not all(bare[k].startswith('model.') for k in rest):
        return sd, {}
    return {k: sd[k] for k in rest}, {k: _BENCH_BUFFERS[bare[k]] for k in bench}


def extract_state_dict(obj: Any, path: str = '<checkpoint>') -> StateDict:
    """Unwrap ``state_dict_ema`` / ``model_ema`` / ``ema`` / ``state_dict`` / ``model`` containers
    (EMA preferred) and strip ``module.`` / ``model.`` prefixes: a flat name → tensor dict."""
    got = unwrap(obj)
    if got is None:
        raise UserError(f'{path}: does not hold a state_dict (a mapping of names to tensors)')
    return strip_prefixes(got[0])


def training_info(obj: Any) -> Optional[Dict[str, Any]]:
    """Epoch, step, top-level keys and EMA presence of a full training checkpoint; None for bare weights."""
    if not isinstance(obj, Mapping) or not any(k in obj for k in ('model', 'state_dict')) \
            or not any(k in obj for k in ('optimizer', 'epoch', 'step')):
        return None  # ours: model, ema, optimizer, …; timm/effdet: state_dict, state_dict_ema, epoch, …

    def scalar(v):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.item()
        return v if isinstance(v, (int, float)) else None
    return {'epoch': scalar(obj.get('epoch')), 'step': scalar(obj.get('step')),
            'keys': [k for k in obj if isinstance(k, str)],
            'has_ema': any(isinstance(obj.get(k), Mapping) and unwrap(obj.get(k)) is not None
                           for k in ('ema', 'state_dict_ema', 'model_ema'))}


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (a format that holds nothing but tensors)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f'{path}: reading .safetensors files needs safetensors (pip install safetensors)') from None
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{path}: not a readable .safetensors file ({msg})') from None


def read_file(path: str) -> Any:
    """The object a checkpoint file holds: an ``.npz`` or ``.safetensors`` as a dict of tensors
    (never unpickled), anything else through :func:`safe_load`. UserError naming the file when it
    is missing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint file')
    if path.endswith('.npz'):
        return read_npz(path)
    return read_safetensors(path) if path.endswith('.safetensors') else safe_load(path)
