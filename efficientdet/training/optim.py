"""Optimizer parameter groups and the warm-up + cosine LR schedule.

Official recipe (google/automl ``hparams_config.py`` / ``det_model_fn.py``): SGD momentum 0.9,
L2 weight decay 4e-5 on convolution kernels only (not on BN, biases or the BiFPN fusion weights),
linear warm-up from ``lr_warmup_init`` (0.1 x lr) over ``lr_warmup_epoch`` (1.0) epochs then cosine
decay. One deliberate difference: the official cosine counts from step 0 although it decays over
``total - warmup`` steps (so its LR touches 0 one warm-up before the end and rises again); here the
cosine starts at the end of the warm-up and reaches 0 exactly at ``total_steps``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import UserError
from .util import unwrap_model

__all__ = ['param_groups', 'build_optimizer', 'WarmupCosine', 'build_scheduler', 'load_scheduler_position',
           'schedule_change']


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two groups of the trainable parameters: conv/linear weights (ndim > 1) with
    ``weight_decay``; BN weights/biases, conv biases and the BiFPN fusion weights (all 1-D) without
    (the official ``.*(kernel|weight):0`` L2 regex matches only TF kernels)."""
    decay, no_decay = [], []
    for _, p in unwrap_model(model).named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{'params': decay, 'weight_decay': float(weight_decay)},
              {'params': no_decay, 'weight_decay': 0.0}]
    return [g for g in groups if g['params']]


def build_optimizer(model: nn.Module, name: str = 'sgd', lr: float = 0.08, momentum: float = 0.9,
                    weight_decay: float = 4e-5) -> torch.optim.Optimizer:
    """``sgd``: official momentum SGD (no Nesterov) with coupled L2 decay (== the official
    ``weight_decay * l2_loss`` term); ``adamw``: AdamW with decoupled decay. Decay never applies
    to BN parameters, biases or BiFPN fusion weights."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise UserError('the model has no trainable parameters (is everything frozen? check --freeze)')
    if lr <= 0 or not math.isfinite(lr):
        raise UserError(f'--lr must be a positive number, got {lr}')
    name = name.lower()
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == 'adamw':
        return torch.optim.AdamW(groups, lr=lr)
    raise UserError(f"--optim must be 'sgd' or 'adamw', got {name!r}")


class WarmupCosine:
    """LR multiplier for ``LambdaLR``: linear from ``warmup_init`` to 1 over ``warmup_steps``, then
    cosine from 1 to 0 at ``total_steps`` (0 afterwards). A plain object (not a lambda), so the
    scheduler and checkpoints holding it pickle; on resume the current run's settings are kept and
    only the position is restored."""

    def __init__(self, total_steps: int, warmup_steps: int, warmup_init: float = 0.1):
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(min(int(warmup_steps), self.total_steps), 0)
        self.warmup_init = float(warmup_init)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_init + (1.0 - self.warmup_init) * step / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    warmup_init: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-update warm-up + cosine ``LambdaLR`` (call ``step()`` once per optimizer update)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, warmup_init))


def load_scheduler_position(scheduler: torch.optim.lr_scheduler.LRScheduler, state: Dict[str, Any]) -> None:
    """Restore a scheduler's position from ``state``; a ``LambdaLR`` keeps this run's schedule
    (total and warm-up steps: ``--num_epochs`` may change on resume) and gets this run's LR at
    the restored step."""
    sched = dict(state)
    if 'lr_lambdas' in sched:
        sched['lr_lambdas'] = [None] * len(sched['lr_lambdas'])
    scheduler.load_state_dict(sched)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        step = scheduler.last_epoch
        lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group['lr'] = lr
        scheduler._last_lr = lrs


def schedule_change(state: Dict[str, Any], scheduler: torch.optim.lr_scheduler.LRScheduler) -> Optional[str]:
    """What differs between a saved ``LambdaLR`` state (``state``) and ``scheduler`` (this run's):
    a one-line description of the change of total steps, warm-up steps, warm-up start or peak LR,
    with the LR the resumed step gets under each, or None when the schedule is the same (or not a
    :class:`WarmupCosine`)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or not scheduler.lr_lambdas:
        return None
    now = scheduler.lr_lambdas[0]
    saved = (state.get('lr_lambdas') or [None])[0]
    if not isinstance(now, WarmupCosine) or not isinstance(saved, dict):
        return None
    before = WarmupCosine(1, 0)
    before.__dict__.update(saved)
    base_then = [float(b) for b in state.get('base_lrs', scheduler.base_lrs)]
    parts = []
    for name, a, b in (('total steps', before.total_steps, now.total_steps),
                       ('warm-up steps', before.warmup_steps, now.warmup_steps),
                       ('warm-up start', before.warmup_init, now.warmup_init),
                       ('peak LR', base_then[0] if base_then else None, scheduler.base_lrs[0])):
        if a is not None and a != b:
            parts.append(f'{name} {a:g} -> {b:g}')
    if not parts:
        return None
    step = int(state.get('last_epoch', 0))
    lr_then = base_then[0] * before(step) if base_then else float('nan')
    lr_now = scheduler.base_lrs[0] * now(step)
    return (f'the LR schedule changed on resume ({", ".join(parts)}): the LR at step {step} is {lr_now:.4g} '
            f'(the saved run would use {lr_then:.4g}); resume with the same --num_epochs, --batch_size, --lr and '
            '--warmup_epochs to continue the saved schedule')
