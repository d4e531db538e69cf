"""Training machinery: optimizer, LR schedule, EMA, the train step and the resumable training state.

Official recipe (google/automl ``hparams_config.py`` / ``det_model_fn.py``): SGD momentum 0.9,
L2 weight decay 4e-5 on convolution kernels only (not on BN, biases or the BiFPN fusion weights),
linear warm-up from ``lr_warmup_init`` (0.1 x lr) over ``lr_warmup_epoch`` (1.0) epochs then cosine
decay, gradient clipping at global norm 10, exponential moving average of the weights with decay
0.9998 and the ``min(decay, (1 + n) / (10 + n))`` ramp of ``num_updates``.
One deliberate difference: the official cosine counts from step 0 although it decays over
``total - warmup`` steps (so its LR touches 0 one warm-up before the end and rises again); here the
cosine starts at the end of the warm-up and reaches 0 exactly at ``total_steps``.

Everything :meth:`Trainer.state_dict` returns is tensors and plain Python containers, so a saved
training state reads back with ``torch.load(weights_only=True)`` (``checkpoint.safe_load``).
"""
from __future__ import annotations

import copy
import math
import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from .errors import UserError

__all__ = ['param_groups', 'build_optimizer', 'WarmupCosine', 'build_scheduler', 'ModelEMA', 'Trainer',
           'EpochSampler', 'rng_state', 'set_rng_state', 'unwrap_model', 'set_train_mode', 'freeze_for_head_only',
           'dist_info']

STATE_FORMAT = 'efficientdet-training-state'
STATE_VERSION = 1


# ----------------------------------------------------------------------------- helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel wrappers."""
    while hasattr(model, 'module') and isinstance(model.module, nn.Module):
        model = model.module
    return model


def dist_info() -> tuple:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def freeze_for_head_only(model: nn.Module) -> List[str]:
    """Freeze ``backbone_net`` and ``bifpn`` (requires_grad False); returns the frozen module names.
    Their BatchNorms are kept in eval mode by :func:`set_train_mode`."""
    m = unwrap_model(model)
    names = []
    for name in ('backbone_net', 'bifpn'):
        sub = getattr(m, name, None)
        if sub is None:
            raise UserError(f'--head_only needs a model with .{name}; {type(m).__name__} has none')
        for p in sub.parameters():
            p.requires_grad_(False)
        names.append(name)
    return names


def set_train_mode(model: nn.Module, head_only: bool = False) -> None:
    """``model.train()``; with ``head_only`` the frozen backbone and BiFPN stay in eval mode (their
    BN statistics are not updated and drop-connect is off)."""
    model.train()
    if head_only:
        m = unwrap_model(model)
        m.backbone_net.eval()
        m.bifpn.eval()


# ----------------------------------------------------------------------------- optimizer / schedule
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
        raise UserError('the model has no trainable parameters (is everything frozen?)')
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
    scheduler and checkpoints holding it pickle; on resume ``Trainer`` keeps the current run's
    settings and restores only the step."""

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
    """Per-iteration warm-up + cosine ``LambdaLR`` (call ``step()`` once per batch)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, warmup_init))


# ----------------------------------------------------------------------------- EMA
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


# ----------------------------------------------------------------------------- RNG state
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


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state['python']
    random.setstate((int(py['version']), tuple(int(v) for v in py['state'].tolist()), py['gauss']))
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), int(n['pos']), int(n['has_gauss']),
                         float(n['gauss'])))
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ----------------------------------------------------------------------------- sampler
class EpochSampler(Sampler[int]):
    """Deterministic per-epoch order (seeded by ``seed + epoch``), sharded across ``world`` ranks
    (padded by repeating, like DistributedSampler), able to start mid-epoch.

    ``set_epoch(epoch, skip)`` skips the first ``skip`` indices of this rank's share, so a resumed
    run continues with exactly the batches it had not seen yet.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed = int(size), bool(shuffle), int(seed)
        self.rank, self.world = int(rank), int(world)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def per_rank(self) -> int:
        return math.ceil(self.size / self.world)

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank() * self.world
        while len(order) < total:
            order += order[:total - len(order)]
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return max(self.per_rank() - self.skip, 0)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """One object holding everything a training run changes, with the train step.

    ``train_step(images [B,3,H,W], annotations [B,N,5] xyxy px + class)`` runs forward (autocast on
    CUDA when ``amp``), :class:`~efficientdet.loss.DetectionLoss`, backward, clipping at
    ``clip_grad_norm``, the optimizer step, the EMA update and one scheduler step, and returns
    floats ``loss cls_loss box_loss num_pos lr grad_norm`` plus ``skipped`` / ``stop`` flags.
    A non-finite loss (or, without AMP, non-finite gradients) skips the update; ``max_nonfinite``
    of them in a row raise :class:`UserError`. Under DistributedDataParallel the skip/stop decisions
    are agreed between the processes so that none of them waits in a collective alone.

    ``state_dict()`` / ``load_state_dict()`` cover model, EMA, optimizer, scheduler, AMP scaler,
    counters (epoch, batches done in the epoch, global step, best metric) and the RNG states.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, ema: Optional[ModelEMA] = None,
                 device: Optional[torch.device] = None, amp: bool = False, clip_grad_norm: Optional[float] = 10.0,
                 max_nonfinite: int = 10, ddp_model: Optional[nn.Module] = None, head_only: bool = False,
                 channels_last: bool = False):
        self.model = unwrap_model(model)
        self.net = ddp_model if ddp_model is not None else model
        self.criterion = criterion
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ema = ema
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.amp = bool(amp) and self.device.type == 'cuda'
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp)
        self.clip_grad_norm = clip_grad_norm
        self.max_nonfinite = int(max_nonfinite)
        self.head_only = head_only
        self.channels_last = channels_last
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # counters (saved)
        self.epoch = 0          # current epoch (0-based)
        self.epoch_step = 0     # batches consumed in the current epoch
        self.step = 0           # batches consumed overall (== scheduler position)
        self.best_metric: Optional[float] = None
        self.best_epoch = -1
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0

    # ------------------------------------------------------------------ step
    def _sync(self, values: torch.Tensor) -> torch.Tensor:
        rank, world = dist_info()
        if world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def train_step(self, images: torch.Tensor, annotations: torch.Tensor, stop_requested: bool = False
                   ) -> Dict[str, Any]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        annotations = annotations.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, enabled=self.amp):
            _, regression, classification, anchors = self.net(images, return_logits=True)
        out = self.criterion(classification, regression, anchors, annotations)
        loss = out['loss']
        # one small all-reduce: logged values (sum over ranks), non-finite and stop votes
        _, world = dist_info()
        local = torch.stack([loss.detach().float(), out['cls_loss'].detach().float(),
                             out['box_loss'].detach().float(), out['num_pos'].detach().float().reshape(()),
                             (~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(stop_requested), device=loss.device)])
        agg = self._sync(local.detach())
        nonfinite = bool(agg[4] > 0)
        result: Dict[str, Any] = {
            'loss': float(agg[0]) / world, 'cls_loss': float(agg[1]) / world, 'box_loss': float(agg[2]) / world,
            'num_pos': float(agg[3]), 'lr': self.optimizer.param_groups[0]['lr'], 'grad_norm': float('nan'),
            'skipped': False, 'stop': bool(agg[5] > 0)}
        self.optimizer.zero_grad(set_to_none=True)
        if not nonfinite:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self.clip_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in self.params
                                                             if p.grad is not None]))
            result['grad_norm'] = float(norm)
            if not self.amp and not math.isfinite(result['grad_norm']):
                nonfinite = True  # (with AMP the scaler skips such steps itself and lowers its scale)
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.ema is not None:
                    self.ema.update(self.model)
        if nonfinite:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            result['skipped'] = True
            if self.nonfinite_in_row >= self.max_nonfinite:
                raise UserError(
                    f'the loss (or its gradients) was NaN/inf for {self.nonfinite_in_row} steps in a row '
                    f'(step {self.step}, epoch {self.epoch}); training diverged. Try a lower --lr (e.g. a tenth), '
                    'check the data with python -m efficientdet.data.check, and train without --amp')
        else:
            self.nonfinite_in_row = 0
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.epoch_step += 1
        return result

    def end_epoch(self) -> None:
        """Move the counters to the start of the next epoch."""
        self.epoch += 1
        self.epoch_step = 0

    # ------------------------------------------------------------------ state
    def state_dict(self, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return {
            'format': STATE_FORMAT, 'version': STATE_VERSION,
            'model': self.model.state_dict(),
            'ema': self.ema.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
            'scaler': self.scaler.state_dict(),
            'epoch': self.epoch, 'epoch_step': self.epoch_step, 'step': self.step,
            'best_metric': self.best_metric, 'best_epoch': self.best_epoch,
            'nonfinite_in_row': self.nonfinite_in_row, 'nonfinite_total': self.nonfinite_total,
            'rng': rng_state(),
            'meta': dict(meta or {}),
        }

    def load_state_dict(self, state: Dict[str, Any], restore_rng: bool = True, path: str = '<state>') -> None:
        if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
            raise UserError(f'{path} is not a training state written by train.py (no {STATE_FORMAT!r} marker); '
                            'to start from plain weights pass -w FILE.pth instead of resuming')
        try:
            self.model.load_state_dict(state['model'])
        except RuntimeError as e:
            raise UserError(f'{path}: the saved model does not fit this one ({str(e).splitlines()[0]}); resume '
                            'with the same -c, project (classes) and anchors it was trained with') from None
        if self.ema is not None:
            if state.get('ema') is not None:
                self.ema.load_state_dict(state['ema'])
            else:
                self.ema = ModelEMA(self.model, self.ema.decay, self.ema.ramp)
        try:
            self.optimizer.load_state_dict(state['optimizer'])
        except (ValueError, KeyError) as e:
            raise UserError(f'{path}: the optimizer state does not fit ({e}); resume with the same --optim '
                            'and --head_only setting') from None
        if self.scheduler is not None and state.get('scheduler') is not None:
            sched = dict(state['scheduler'])
            if 'lr_lambdas' in sched:  # LambdaLR: restore the position; the schedule's shape (total and
                # warm-up steps) stays the one built from this run's arguments (--num_epochs may change)
                sched['lr_lambdas'] = [None] * len(sched['lr_lambdas'])
            self.scheduler.load_state_dict(sched)
            if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):  # this run's LR at that step
                step = self.scheduler.last_epoch
                lrs = [base * fn(step) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
                for group, lr in zip(self.optimizer.param_groups, lrs):
                    group['lr'] = lr
                self.scheduler._last_lr = lrs
        if state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.epoch_step, self.step = int(state['epoch']), int(state['epoch_step']), int(state['step'])
        self.best_metric = state.get('best_metric')
        self.best_epoch = int(state.get('best_epoch', -1))
        self.nonfinite_in_row = int(state.get('nonfinite_in_row', 0))
        self.nonfinite_total = int(state.get('nonfinite_total', 0))
        if restore_rng and state.get('rng') is not None:
            set_rng_state(state['rng'])
