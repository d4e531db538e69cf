"""``--grad_checkpoint``: activation checkpointing of the backbone's blocks and the BiFPN cells.

During training the activations inside each checkpointed module are not kept for the backward
pass; they are recomputed from the module's input when the gradient reaches it (one extra forward
of those modules, ``torch.utils.checkpoint`` non-reentrant). Gradients are the same: the random
state is replayed (drop-connect draws the same mask), and BatchNorm layers, which see the same
batch again, do not update their running statistics a second time.

The modules are changed in place by giving each one a subclass of its own class whose ``forward``
checkpoints (names, parameters and ``state_dict`` stay as they are, and copies of the model
keep the behaviour); outside training (eval mode or no grad) the forward is the plain one.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Type

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .util import unwrap_model

__all__ = ['enable_grad_checkpoint', 'disable_grad_checkpoint', 'checkpointed_modules']

_SUBCLASSES: Dict[type, type] = {}


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Train-mode BN layers of ``module`` normalise with batch statistics but leave their running
    statistics (and batch counter) as they are: momentum 0 for the recomputation."""
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _checkpointed(cls: Type[nn.Module]) -> type:
    """A subclass of ``cls`` whose training forward is checkpointed (one per class, cached)."""
    if getattr(cls, '_grad_checkpoint_base', None) is not None:
        return cls
    if cls not in _SUBCLASSES:
        def forward(self, *args: Any) -> Any:
            if not (self.training and torch.is_grad_enabled()):
                return cls.forward(self, *args)
            calls = [0]

            def run(*a: Any) -> Any:
                calls[0] += 1
                if calls[0] == 1:
                    return cls.forward(self, *a)
                with _bn_stats_frozen(self):  # the recomputation in backward
                    return cls.forward(self, *a)
            return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)

        _SUBCLASSES[cls] = type(f'Checkpointed{cls.__name__}', (cls,),
                                {'forward': forward, '_grad_checkpoint_base': cls, '__module__': __name__,
                                 '__doc__': f'{cls.__name__} with a checkpointed training forward.'})
    return _SUBCLASSES[cls]


def checkpointed_modules(model: nn.Module) -> List[nn.Module]:
    """The modules ``--grad_checkpoint`` covers: the backbone's own (its ``checkpoint_modules()``:
    the MBConv blocks of EfficientNet, the stages of a timm model) and every BiFPN cell."""
    m = unwrap_model(model)
    backbone, cells = getattr(m, 'backbone_net', None), getattr(m, 'bifpn', None)
    if backbone is None or cells is None:
        raise UserError(f'--grad_checkpoint needs an EfficientDet model (backbone_net and bifpn); '
                        f'{type(m).__name__} has neither')
    own = getattr(backbone, 'checkpoint_modules', None)
    if own is None:
        raise UserError(f'--grad_checkpoint: the backbone {type(backbone).__name__} does not say which of its '
                        'modules to recompute (a checkpoint_modules() method); train without --grad_checkpoint')
    return list(own()) + list(cells)


def enable_grad_checkpoint(model: nn.Module) -> int:
    """Checkpoint every backbone block and BiFPN cell of ``model`` in training; returns how many."""
    mods = checkpointed_modules(model)
    for mod in mods:
        mod.__class__ = _checkpointed(type(mod))
    return len(mods)


def disable_grad_checkpoint(model: nn.Module) -> None:
    """Undo :func:`enable_grad_checkpoint`."""
    for mod in checkpointed_modules(model):
        base = getattr(type(mod), '_grad_checkpoint_base', None)
        if base is not None:
            mod.__class__ = base
