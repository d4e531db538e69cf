"""The trainer: one optimizer step (micro-batches, AMP, clipping, non-finite skip), a short loop,
and the resumable training state. Every other behaviour is a :class:`~.hooks.Hook`.

The loop (:meth:`Trainer.fit`)::

    on_fit_start
    while epochs remain and nobody asked to stop:
        on_epoch_start
        for each group of `accumulate` micro-batches:
            train_step_batches  ->  on_update (only when the weights changed)  ->  on_step_end
        on_epoch_end(epoch, finished)      # counters already at the next epoch when finished
    on_fit_end                             # only when the loop ended normally or by a requested stop
    close                                  # always, last, also after an exception

Hooks run in the order they were given. A hook asks the loop to stop with
:meth:`Trainer.request_stop`; its ``state_dict`` travels in ``last.ckpt`` under its ``name``.
The lifecycle a hook can rely on is written down in :class:`~.hooks.Hook`.

Everything :meth:`Trainer.state_dict` returns is tensors and plain Python containers, so a saved
training state reads back with ``torch.load(weights_only=True)`` (``checkpoint.safe_load``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grad_norm_, get_total_norm

from ..errors import UserError
from .ema import ModelEMA
from .hooks import EMAHook, Hook, LRScheduleHook
from .rng import rng_state, set_rng_state
from .util import dist_info, unwrap_model

__all__ = ['Trainer', 'STATE_FORMAT', 'STATE_VERSION', 'gather_rng_states']

STATE_FORMAT = 'efficientdet-training-state'
STATE_VERSION = 2   # 1: EMA, schedule and best metric at the top level (still read)
Batch = Tuple[torch.Tensor, torch.Tensor]


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every process's RNG state (rank order) under torch.distributed, else ``[rng_state()]``.
    A collective: every process must call it at the same point."""
    _, world = dist_info()
    mine = rng_state()
    if world <= 1:
        return [mine]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


class Trainer:
    """Everything a training run changes, the train step and the loop.

    ``train_step(images [B,3,H,W], annotations [B,N,5] xyxy px + class)`` is one optimizer step on
    one batch; ``train_step_batches([(images, annotations), ...])`` one step on several
    micro-batches (gradient accumulation): the loss normaliser is the positive-anchor count of the
    whole effective batch (every micro-batch, every process), so the gradients equal those of one
    big batch (BatchNorm statistics aside). Each step runs forward (autocast on CUDA when
    ``amp``), :class:`~efficientdet.loss.DetectionLoss`, backward, clipping at ``clip_grad_norm``
    and the optimizer step, and returns floats ``loss cls_loss box_loss num_pos lr grad_norm``
    plus ``skipped`` / ``stop`` flags.

    A non-finite loss or gradient norm (with AMP: a step the GradScaler skips) changes no weight,
    does not advance the EMA or the LR schedule (``on_update`` is not called) and counts in
    ``nonfinite_in_row``; ``max_nonfinite`` in a row raise :class:`UserError`. Under
    DistributedDataParallel the skip/stop decisions are agreed between the processes.

    ``scheduler`` and ``ema`` are shorthands for :class:`~.hooks.LRScheduleHook` and
    :class:`~.hooks.EMAHook` (run first, in that order: EMA then schedule).

    Clipping (``clip_grad_norm``): by default the global norm of all gradients. ``clip_per_tensor``
    (the official trainer): each gradient tensor is first clipped to that norm, then the global
    norm, both as TF's ``clip_by_norm`` / ``clip_by_global_norm`` (``t * c / max(norm, c)``).
    ``decay_in_grad``: the SGD weight decay of each parameter group is taken out of the optimizer
    and added to the gradient before clipping (the official L2 term inside the clipped gradient);
    the step result then also holds ``reg_l2_loss`` = sum of ``wd / 2 * ||w||^2`` (the official
    ``reg_l2_loss``, before the update).

    A stop asked for while a step runs (a hook's ``wants_stop``: Ctrl+C, SIGTERM) is agreed
    between the processes just before that step's last backward: when agreed there, the step is
    abandoned (no update, counters unchanged, ``result['aborted']``), so no step starts after the
    request is seen.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, ema: Optional[ModelEMA] = None,
                 device: Optional[torch.device] = None, amp: bool = False, clip_grad_norm: Optional[float] = 10.0,
                 max_nonfinite: int = 10, ddp_model: Optional[nn.Module] = None, head_only: bool = False,
                 channels_last: bool = False, hooks: Sequence[Hook] = (), accumulate: int = 1,
                 freeze_bn: bool = False, clip_per_tensor: bool = False, decay_in_grad: bool = False):
        self.model = unwrap_model(model)
        self.net = ddp_model if ddp_model is not None else model
        self.criterion = criterion
        self.optimizer = optimizer
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.amp = bool(amp) and self.device.type == 'cuda'
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp)
        self.clip_grad_norm = clip_grad_norm
        self.max_nonfinite = int(max_nonfinite)
        self.head_only = head_only
        self.freeze_bn = freeze_bn
        self.channels_last = channels_last
        if accumulate < 1:
            raise UserError(f'--accumulate must be at least 1, got {accumulate}')
        self.accumulate = int(accumulate)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip_per_tensor = bool(clip_per_tensor)
        # (parameters, weight decay) whose L2 term goes into the gradient (decay_in_grad)
        self.l2_groups: List[Tuple[List[torch.Tensor], float]] = []
        if decay_in_grad:
            if not isinstance(optimizer, torch.optim.SGD):
                raise ValueError('decay_in_grad needs SGD (coupled L2 weight decay); AdamW decays apart from '
                                 'the gradient')
            for group in optimizer.param_groups:
                wd = float(group.get('weight_decay', 0.0))
                if wd:
                    self.l2_groups.append((list(group['params']), wd))
                    group['weight_decay'] = 0.0
        own: List[Hook] = []
        if ema is not None:
            own.append(EMAHook(ema))
        if scheduler is not None:
            own.append(LRScheduleHook(scheduler))
        self.hooks: List[Hook] = own + list(hooks)
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f'hook names must be unique (their state is saved by name): {names}')
        # counters (saved)
        self.epoch = 0          # current epoch (0-based)
        self.epoch_step = 0     # optimizer steps done in the current epoch
        self.step = 0           # optimizer steps attempted overall (skipped ones included)
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.stop_reason: Optional[str] = None  # not saved: a resumed run starts afresh

    # ------------------------------------------------------------------ hooks
    def hook(self, name: str) -> Optional[Hook]:
        """The hook called ``name``, or None."""
        return next((h for h in self.hooks if h.name == name), None)

    def call(self, event: str, *args: Any) -> None:
        """Run ``event`` (a :class:`~.hooks.Hook` method name) on every hook, in order."""
        for h in self.hooks:
            getattr(h, event)(self, *args)

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (the first reason given is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def ema(self) -> Optional[ModelEMA]:
        h = self.hook('ema')
        return h.ema if h is not None else None

    @property
    def scheduler(self) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        h = self.hook('lr_schedule')
        return h.scheduler if h is not None else None

    # ------------------------------------------------------------------ step
    def _sync(self, values: torch.Tensor) -> torch.Tensor:
        _, world = dist_info()
        if world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def _prepare(self, images: torch.Tensor, annotations: torch.Tensor) -> Batch:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, annotations.to(self.device, non_blocking=True)

    def _forward(self, images: torch.Tensor):
        with torch.autocast(self.device.type, enabled=self.amp):
            _, regression, classification, anchors = self.net(images, return_logits=True)
        return regression, classification, anchors

    def train_step(self, images: torch.Tensor, annotations: torch.Tensor, stop_requested: bool = False
                   ) -> Dict[str, Any]:
        """One optimizer step on one batch (see the class docstring)."""
        return self.train_step_batches([(images, annotations)], stop_requested)

    def _wants_stop(self) -> bool:
        return any(h.wants_stop(self) for h in self.hooks)

    def train_step_batches(self, batches: Sequence[Batch], stop_requested: bool = False) -> Dict[str, Any]:
        """One optimizer step over the micro-batches ``batches`` (gradients accumulated).
        ``stop_requested`` (or a hook's ``wants_stop``) seen before the last backward abandons
        the step (see the class docstring)."""
        if not batches:
            raise ValueError('train_step_batches needs at least one micro-batch')
        _, world = dist_info()
        n = len(batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64)
        local_nonfinite = False
        backward_done = False
        normalizer: Optional[torch.Tensor] = None
        total_pos = 0.0
        counter = getattr(self.criterion, 'count_positives', None)
        if counter is None and n > 1:
            raise ValueError('gradient accumulation needs a criterion with count_positives (DetectionLoss)')
        for i, (images, annotations) in enumerate(batches):
            last = i == n - 1
            # DDP: forward and backward of all but the last micro-batch without gradient sync
            with (contextlib.nullcontext() if last else self._no_sync()):
                images, annotations = self._prepare(images, annotations)
                reg, cls, anchors = self._forward(images)
                if normalizer is None and counter is not None:
                    # positives of the effective batch (all micro-batches, all processes): the
                    # matching needs only the boxes and the anchors, so it is known before any loss
                    local_pos = sum(float(counter(anchors, b[1].to(self.device))) for b in batches)
                    total_pos = float(self._sync(torch.tensor([local_pos], dtype=torch.float64))[0])
                    normalizer = torch.tensor(total_pos + 1.0, device=self.device)
                if counter is not None:
                    out = self.criterion(cls, reg, anchors, annotations, normalizer=normalizer)
                else:  # a criterion that normalises on its own (one micro-batch only)
                    out = self.criterion(cls, reg, anchors, annotations)
                    total_pos = float(out['num_pos'])
                loss = out['loss']
                sums += torch.stack([loss.detach(), out['cls_loss'].detach(),
                                     out['box_loss'].detach()]).double().cpu()
                local_nonfinite |= not bool(torch.isfinite(loss.detach()))
                if not last:
                    if not local_nonfinite:
                        self.scaler.scale(loss).backward()
                    del reg, cls, out, loss
                    continue
            # last micro-batch: agree on the logged values, skip and stop before its backward
            local_stop = stop_requested or self._wants_stop()
            agg = self._sync(torch.cat([sums, torch.tensor([float(local_nonfinite), float(local_stop)],
                                                           dtype=torch.float64)]))
            if bool(agg[4] > 0):  # a stop was asked for: this step is not taken
                self.optimizer.zero_grad(set_to_none=True)
                return {'loss': float(agg[0]) / world, 'cls_loss': float(agg[1]) / world,
                        'box_loss': float(agg[2]) / world, 'num_pos': total_pos,
                        'lr': self.optimizer.param_groups[0]['lr'], 'grad_norm': float('nan'), 'skipped': True,
                        'stop': True, 'aborted': True}
            if not bool(agg[3] > 0):
                self.scaler.scale(loss).backward()
                backward_done = True
        result: Dict[str, Any] = {
            'loss': float(agg[0]) / world, 'cls_loss': float(agg[1]) / world, 'box_loss': float(agg[2]) / world,
            'num_pos': total_pos, 'lr': self.optimizer.param_groups[0]['lr'], 'grad_norm': float('nan'),
            'skipped': False, 'stop': False, 'aborted': False}
        if self.l2_groups:
            result['reg_l2_loss'] = self.reg_l2_loss()
        updated = False
        if backward_done:
            self.scaler.unscale_(self.optimizer)
            result['grad_norm'] = float(self._clip())
            finite = math.isfinite(result['grad_norm'])
            if self.amp:
                # the scaler skips the step itself on inf/NaN gradients and lowers its scale
                before = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                updated = finite and self.scaler.get_scale() >= before
            elif finite:
                self.optimizer.step()
                updated = True
        if not updated:
            self.optimizer.zero_grad(set_to_none=True)
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
            self.call('on_update', result)
        self.step += 1
        self.epoch_step += 1
        self.call('on_step_end', result)
        return result

    def reg_l2_loss(self) -> float:
        """The official ``reg_l2_loss`` of the parameters whose decay is in the gradient: sum over
        them of ``wd / 2 * ||w||^2``."""
        total = 0.0
        for params, wd in self.l2_groups:
            if params:
                norms = torch.stack(torch._foreach_norm([p.detach() for p in params])).double()
                total += 0.5 * wd * float(norms.square().sum())
        return total

    @torch.no_grad()
    def _clip(self) -> torch.Tensor:
        """Add the L2 term (``decay_in_grad``), clip (see the class docstring); returns the global
        norm the final clipping saw (NaN/inf when a gradient is not finite)."""
        for params, wd in self.l2_groups:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_add_(grads, [p for p in params if p.grad is not None], alpha=wd)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        c = self.clip_grad_norm
        if not (c and self.clip_per_tensor):  # torch's rule: c / (total + 1e-6), at most 1
            return clip_grad_norm_([p for p in self.params if p.grad is not None], c) if c else get_total_norm(grads)
        norms = torch.stack(torch._foreach_norm(grads)).float()
        # tf.clip_by_norm of each tensor: t * c / max(||t||, c); its norm is then min(||t||, c)
        torch._foreach_mul_(grads, list((c / norms.clamp(min=c)).unbind()))
        total = torch.linalg.vector_norm(norms.clamp(max=c))
        torch._foreach_mul_(grads, c / torch.clamp(total, min=c))  # tf.clip_by_global_norm: c / max(global, c)
        return total

    def _no_sync(self):
        no_sync = getattr(self.net, 'no_sync', None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def end_epoch(self) -> None:
        """Move the counters to the start of the next epoch."""
        self.epoch += 1
        self.epoch_step = 0

    # ------------------------------------------------------------------ loop
    def _groups(self, loader: Iterable[Dict[str, Any]]) -> Iterator[List[Batch]]:
        group: List[Batch] = []
        for batch in loader:
            group.append((batch['img'], batch['annot']))
            if len(group) == self.accumulate:
                yield group
                group = []

    def fit(self, loader: Iterable[Dict[str, Any]], num_epochs: int, steps_per_epoch: int,
            max_steps: Optional[int] = None, data_name: str = 'the training data') -> Optional[str]:
        """Train until ``num_epochs`` epochs of ``steps_per_epoch`` optimizer steps are done, or a
        hook (or ``max_steps`` optimizer steps in total) stops the run. ``loader`` yields dicts with
        ``img`` / ``annot`` micro-batches (``accumulate`` per step). Returns the stop reason (None:
        ran to the end; 'max_steps', 'signal', 'early_stop' or a hook's own reason).

        Lifecycle (see :class:`~.hooks.Hook`): ``on_fit_end`` runs only when the loop ends normally
        or by a requested stop, never after an exception; ``close`` runs on every hook, last, on
        every exit path. A loader that runs out before an epoch's ``steps_per_epoch`` steps is a
        :class:`UserError` naming ``data_name``."""
        self.stop_reason = None
        try:
            self.call('on_fit_start')
            while self.epoch < num_epochs and self.stop_reason is None:
                if max_steps is not None and self.step >= max_steps:
                    self.request_stop('max_steps')
                    break
                self.call('on_epoch_start')
                if self.epoch_step < steps_per_epoch:
                    for group in self._groups(self._guarded(loader)):
                        r = self.train_step_batches(group)
                        if r['stop']:
                            self.request_stop('signal')
                        elif dist_info()[1] == 1 and self._wants_stop():
                            self.request_stop('signal')  # one process: no agreement needed, stop now
                        if max_steps is not None and self.step >= max_steps:
                            self.request_stop('max_steps')
                        if self.stop_reason is not None or self.epoch_step >= steps_per_epoch:
                            break
                finished = self.epoch_step >= steps_per_epoch
                if not finished and self.stop_reason is None:
                    if self._wants_stop():  # the loader ended because a data worker died of the signal
                        self.request_stop('signal')
                    else:
                        raise UserError(f'{data_name} ran out after {self.epoch_step} of the {steps_per_epoch} '
                                        f'steps of epoch {self.epoch} (the loader yields fewer batches than an '
                                        'epoch needs); check that the data loader yields every image of the set')
                epoch = self.epoch
                if finished:
                    self.end_epoch()
                self.call('on_epoch_end', epoch, finished)
            self.call('on_fit_end')
        except BaseException:
            self.close(raise_errors=False)  # the run's own exception is the one that matters
            raise
        self.close()
        return self.stop_reason

    def close(self, raise_errors: bool = True) -> None:
        """``close`` on every hook, in order; every hook is closed even when one raises (then the
        first error is raised after them, when ``raise_errors``)."""
        first: Optional[Exception] = None
        for h in self.hooks:
            try:
                h.close(self)
            except Exception as e:  # noqa: BLE001 -- close the others first
                first = first or e
        if first is not None and raise_errors:
            raise first

    def _guarded(self, loader: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        it = iter(loader)
        while True:
            try:
                yield next(it)
            except StopIteration:
                return
            except RuntimeError:
                if self._wants_stop():  # a data worker died of the same Ctrl+C
                    return
                raise

    # ------------------------------------------------------------------ state
    def state_dict(self, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The whole training state. Under torch.distributed every process must call it (the RNG
        states of all processes are gathered, so a resume with the same process count is exact)."""
        hooks = {h.name: h.state_dict() for h in self.hooks}
        rngs = gather_rng_states()
        return {
            'format': STATE_FORMAT, 'version': STATE_VERSION,
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'scaler': self.scaler.state_dict(),
            'epoch': self.epoch, 'epoch_step': self.epoch_step, 'step': self.step,
            'nonfinite_in_row': self.nonfinite_in_row, 'nonfinite_total': self.nonfinite_total,
            'accumulate': self.accumulate,
            'rng': rngs[0], 'rng_per_rank': rngs,
            'hooks': {k: v for k, v in hooks.items() if v is not None},
            # the same objects under their earlier top-level names (readers of last.ckpt find the
            # EMA weights there); saved once
            'ema': hooks.get('ema'), 'scheduler': hooks.get('lr_schedule'),
            'meta': dict(meta or {}),
        }

    def load_state_dict(self, state: Dict[str, Any], restore_rng: bool = True, path: str = '<state>') -> None:
        """Restore :meth:`state_dict`'s output (tensors may sit on any device; each part is moved
        where it belongs). ``restore_rng``: this process's RNG state (its own rank's when the file
        holds one per process)."""
        if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
            raise UserError(f'{path} is not a training state written by train.py (no {STATE_FORMAT!r} marker); '
                            'to start from plain weights pass -w FILE.pth instead of resuming')
        version = state.get('version', 1)
        if not isinstance(version, int) or version > STATE_VERSION:
            raise UserError(f'{path}: training state version {version} is newer than this version of the package '
                            f'reads ({STATE_VERSION}); resume with the version that wrote it, or fine-tune from its '
                            'weights with -w FILE.pth')
        try:
            self.model.load_state_dict(state['model'])
        except RuntimeError as e:
            raise UserError(f'{path}: the saved model does not fit this one ({str(e).splitlines()[0]}); resume '
                            'with the same -c, project (classes) and anchors it was trained with') from None
        try:
            self.optimizer.load_state_dict(state['optimizer'])
        except (ValueError, KeyError) as e:
            raise UserError(f'{path}: the optimizer state does not fit ({e}); resume with the same --optim, '
                            '--freeze and --head_only settings') from None
        if state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        saved_acc = int(state.get('accumulate', 1))
        if saved_acc != self.accumulate and int(state.get('epoch_step', 0)):
            raise UserError(f'{path} stopped mid-epoch with --accumulate {saved_acc}; resume with --accumulate '
                            f'{saved_acc} (the data order depends on it)')
        self.epoch, self.epoch_step, self.step = int(state['epoch']), int(state['epoch_step']), int(state['step'])
        self.nonfinite_in_row = int(state.get('nonfinite_in_row', 0))
        self.nonfinite_total = int(state.get('nonfinite_total', 0))
        hooks = dict(state.get('hooks') or {})
        # version 1 files: EMA, scheduler and best metric at the top level
        for name, key in (('ema', 'ema'), ('lr_schedule', 'scheduler')):
            if name not in hooks and state.get(key) is not None:
                hooks[name] = state[key]
        if 'best' not in hooks and state.get('best_metric') is not None:
            hooks['best'] = {'value': state['best_metric'], 'epoch': int(state.get('best_epoch', -1)),
                             'source': None}
        for h in self.hooks:
            if h.name in hooks:
                h.load_state_dict(hooks[h.name])
            else:
                h.on_missing_state(self)
        if restore_rng:
            rank, world = dist_info()
            per_rank = state.get('rng_per_rank')
            if world > 1:
                if per_rank is not None and len(per_rank) == world:
                    set_rng_state(per_rank[rank])
            elif state.get('rng') is not None:
                set_rng_state(state['rng'])

    def rng_restorable(self, state: Dict[str, Any]) -> bool:
        """Whether ``state`` holds an RNG state for this process (same process count)."""
        _, world = dist_info()
        per_rank = state.get('rng_per_rank')
        return state.get('rng') is not None if world == 1 else per_rank is not None and len(per_rank) == world
