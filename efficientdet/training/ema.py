"""Exponential moving average of the weights, and BatchNorm statistics that match a set of weights.

Official recipe (google/automl): EMA of every variable (BN moving statistics included) with decay
0.9998 and the ``min(decay, (1 + n) / (10 + n))`` ramp of ``num_updates``. The ramp makes the EMA
average roughly the last ``(10 + n) / 9`` updates, i.e. about the last 11 % of the steps done so far,
so the window already grows with the run (a short run gets a short window).

An averaged copy of the weights with averaged BN *statistics* is not self-consistent: the running
statistics were collected from older weights (BN momentum 0.01 keeps ~100 steps of history, the
EMA then lags them further). :func:`recompute_bn` re-estimates them for the weights at hand
(what ``torch.optim.swa_utils.update_bn`` does for SWA) before a model is validated or saved.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .util import unwrap_model

__all__ = ['ModelEMA', 'recompute_bn', 'trainable_bn_names']


class ModelEMA:
    """Exponential moving average of a model's float parameters and buffers (BN statistics
    included, as the official EMA covers the moving mean/variance); integer buffers are copied.

    ``decay_now = min(decay, (1 + n) / (10 + n))`` after n updates (official ``num_updates`` ramp)
    unless ``ramp=False``. ``self.module`` is an eval-mode copy to validate and save.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp: bool = True):
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.ramp = ramp
        self.updates = 0

    def current_decay(self) -> float:
        if not self.ramp:
            return self.decay
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @staticmethod
    def _tensors(modules: List[nn.Module]) -> List[torch.Tensor]:
        # read from each module's own dicts at every step: .to() may have replaced a buffer
        return [t for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step: float parameters and buffers lerp towards ``model``'s in one fused call,
        integer buffers (BN's num_batches_tracked) are copied. The module lists are walked once
        (``named_modules`` is most of the cost of a state_dict-based update), the tensors each step."""
        self.updates += 1
        d = self.current_decay()
        src = unwrap_model(model)
        if getattr(self, '_src_ref', None) is not src:
            self._src_ref = src
            self._mods = (list(self.module.modules()), list(src.modules()))
        ema_t, src_t = (self._tensors(mods) for mods in self._mods)
        if len(ema_t) != len(src_t):
            raise ValueError('ModelEMA.update: the model no longer has the EMA copy\'s structure')
        ema_f = [e for e in ema_t if e.is_floating_point()]
        src_f = [s if s.dtype == e.dtype else s.to(e.dtype) for e, s in zip(ema_t, src_t) if e.is_floating_point()]
        ints = [(e, s) for e, s in zip(ema_t, src_t) if not e.is_floating_point()]
        if ema_f:
            torch._foreach_lerp_(ema_f, src_f, 1.0 - d)
        if ints:
            torch._foreach_copy_([e for e, _ in ints], [s for _, s in ints])

    def state_dict(self) -> Dict[str, Any]:
        # 'model' so checkpoint.extract_state_dict finds the EMA weights inside last.ckpt
        return {'model': self.module.state_dict(), 'updates': self.updates, 'decay': self.decay, 'ramp': self.ramp}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state['model'])
        self.updates = int(state['updates'])
        self.decay = float(state.get('decay', self.decay))
        self.ramp = bool(state.get('ramp', self.ramp))


def trainable_bn_names(model: nn.Module) -> Set[str]:
    """Names of the BatchNorm modules of ``model`` that are in train mode (their statistics are
    being learned); frozen ones (``--freeze_bn``, ``--head_only``) are in eval mode and excluded."""
    return {n for n, m in unwrap_model(model).named_modules() if isinstance(m, _BatchNorm) and m.training}


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterable[torch.Tensor], names: Optional[Set[str]] = None,
                 prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> int:
    """Re-estimate the running mean/variance of ``model``'s BatchNorm layers (in place) for its
    current weights, as the equal-weight average over ``batches`` (images [B,3,H,W] normalised).

    Only the BN layers named in ``names`` (default: all) are reset and updated; everything else
    runs in eval mode (drop-connect off), so the statistics describe the network as it is
    evaluated. ``prepare`` moves a batch to the model's device / memory format. The model is left
    in eval mode. Returns the number of batches used (0 leaves the statistics untouched).
    """
    m = unwrap_model(model)
    bns = [mod for n, mod in m.named_modules() if isinstance(mod, _BatchNorm) and mod.track_running_stats
           and (names is None or n in names)]
    if not bns:
        return 0
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum)
             for bn in bns]
    m.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative (equal-weight) average over the batches
        bn.train()
    n = 0
    try:
        for imgs in batches:
            if prepare is not None:
                imgs = prepare(imgs)
            m(imgs)
            n += 1
    finally:
        for bn, (mean, var, count, momentum) in zip(bns, saved):
            bn.momentum = momentum
            if n == 0:  # nothing seen: keep what was there
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        m.eval()
    return n
