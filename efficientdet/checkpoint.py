"""Safe checkpoint I/O: ``weights_only`` loading, atomic saving, state-dict unwrapping."""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Dict

import torch

from .errors import UserError

_WRAPPER_KEYS = ('state_dict_ema', 'state_dict', 'model_ema', 'model')
_PREFIXES = ('module.', 'model.')


def safe_load(path: str, map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)``; a file that would need arbitrary unpickling
    (it could run code) is refused with a UserError naming the file, never executed."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint file')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f'{path}: refused to load: the file needs arbitrary unpickling, which could run '
                        f'code ({str(e).splitlines()[0]}). Re-save it as a plain state_dict of tensors '
                        'in a trusted environment.') from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f'{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})') from None


def extract_state_dict(obj: Any, path: str = '<checkpoint>') -> Dict[str, torch.Tensor]:
    """Unwrap ``state_dict`` / ``state_dict_ema`` / ``model`` containers and strip ``module.`` /
    ``model.`` prefixes, returning a flat name → tensor dict."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f'{path}: does not hold a state_dict (a mapping of names to tensors)')
    sd = dict(obj)
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` with torch.save to a temp file in the same folder, fsync, then rename: a crash
    at any point leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
