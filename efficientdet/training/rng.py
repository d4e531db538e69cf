"""Saving and restoring the Python / numpy / torch (/ CUDA) random number generators.

States are tensors and primitives only, so they read back with ``torch.load(weights_only=True)``.
A state may come back on another device or dtype (a checkpoint loaded with ``map_location``
onto a GPU, or cast): :func:`set_rng_state` moves every piece to the CPU and the dtype each
generator wants before using it.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ['rng_state', 'set_rng_state', 'seed_generators']


def seed_generators(seed: int, cuda: bool = True) -> None:
    """Python, numpy and torch generators from ``seed``; ``cuda=False`` seeds the CPU generator only
    and leaves the CUDA generators (dropout / drop-connect masks of a GPU run) alone."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Python / numpy / torch (/ CUDA) RNG states as tensors and primitives (weights_only safe)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: Dict[str, Any] = {
        'python': {'version': int(version), 'state': torch.tensor(py_state, dtype=torch.int64),
                   'gauss': None if gauss is None else float(gauss)},
        'numpy': {'name': str(np_name), 'keys': torch.from_numpy(np_keys.astype(np.int64)), 'pos': int(np_pos),
                  'has_gauss': int(np_has_gauss), 'gauss': float(np_gauss)},
        'torch': torch.get_rng_state(),
        'cuda': None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return out


def _cpu(t: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(device='cpu', dtype=dtype)


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned, wherever its tensors were loaded to."""
    py = state['python']
    random.setstate((int(py['version']), tuple(_cpu(py['state'], torch.int64).tolist()), py['gauss']))
    n = state['numpy']
    keys = _cpu(n['keys'], torch.int64).numpy().astype(np.uint32)
    np.random.set_state((str(n['name']), keys, int(n['pos']), int(n['has_gauss']), float(n['gauss'])))
    torch.set_rng_state(_cpu(state['torch'], torch.uint8))
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_cpu(s, torch.uint8) for s in cuda])
