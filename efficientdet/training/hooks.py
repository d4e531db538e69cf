"""Training behaviours as hooks on :class:`~.trainer.Trainer`'s loop.

A hook subclasses :class:`Hook`, sets a unique ``name`` and overrides the events it needs; each
event gets the trainer first. Whatever a hook must remember across a resume it returns from
``state_dict`` (tensors and plain containers) and takes back in ``load_state_dict``; the trainer
saves it in ``last.ckpt`` under the hook's name. A hook stops the run with
``trainer.request_stop(reason)``. Under torch.distributed every process runs every hook: a hook
that only acts on rank 0 (writing files, printing) must still take the same decisions on all
ranks (the validation hook broadcasts its result for that).
"""
from __future__ import annotations

import math
import numbers
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from .ema import ModelEMA
from .optim import load_scheduler_position
from .rng import rng_state, set_rng_state
from .util import dist_info


class Trainer(Protocol):
    """What hooks see of ``efficientdet.training.trainer.Trainer`` (declared here, so that this
    module does not import the trainer that imports it)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    step: int
    epoch: int
    epoch_step: int
    stop_reason: Optional[str]
    nonfinite_in_row: int
    nonfinite_total: int

    @property
    def ema(self) -> Optional[ModelEMA]: ...

    @property
    def scheduler(self) -> Any: ...

    def hook(self, name: str) -> Optional['Hook']: ...

    def call(self, event: str, *args: Any) -> None: ...

    def request_stop(self, reason: str) -> None: ...

    def state_dict(self, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]: ...

__all__ = ['Hook', 'EMAHook', 'LRScheduleHook', 'SignalHook', 'DataOrderHook', 'ProgressHook', 'TensorBoardHook',
           'ValidationHook', 'BestCheckpointHook', 'EarlyStoppingHook', 'CheckpointHook', 'is_better']

Log = Callable[..., None]


class Hook:
    """Base class: every event does nothing; no state.

    The lifecycle a hook can rely on (:meth:`Trainer.fit <efficientdet.training.Trainer.fit>`):

    - ``on_fit_start`` once, before the first step (after any resume); then per epoch
      ``on_epoch_start``, per step ``on_update`` (only when the weights changed) and
      ``on_step_end``, ``on_validation`` when a validation ran, and ``on_epoch_end``;
    - ``on_fit_end`` only when the run ends normally or by a requested stop (the epochs are done,
      ``max_steps``, early stopping, a signal, ``trainer.request_stop``); never after an exception,
      so nothing is saved from a failed run: the last good checkpoint stays;
    - ``close`` always, last, on every exit path (normal end, requested stop, exception, a second
      Ctrl+C), on every hook, even when another hook's ``close`` raised: release resources there
      (files, writers, signal handlers);
    - a stop asked for while a step runs takes effect at that step: no step starts after it.

    Under torch.distributed every process runs every event; an exception on one process ends it,
    and the others stop at their next collective (gloo notices the closed connection, torchrun
    stops the remaining processes), so a failing rank never leaves the others waiting.
    """

    name = 'hook'

    def on_fit_start(self, trainer: 'Trainer') -> None:
        """Before the first step of :meth:`Trainer.fit` (after any resume)."""

    def on_epoch_start(self, trainer: 'Trainer') -> None:
        """Before an epoch's (remaining) steps; ``trainer.epoch_step`` > 0 in a resumed epoch."""

    def on_update(self, trainer: 'Trainer', result: Dict[str, Any]) -> None:
        """After an optimizer step that changed the weights (not after a skipped step)."""

    def on_step_end(self, trainer: 'Trainer', result: Dict[str, Any]) -> None:
        """After every step (``result['skipped']`` says whether the weights changed); counters
        already count it."""

    def on_epoch_end(self, trainer: 'Trainer', epoch: int, finished: bool) -> None:
        """After an epoch's steps. ``finished``: the epoch is complete and the counters are at the
        next one; False when the run stopped mid-epoch (``trainer.stop_reason`` says why)."""

    def on_validation(self, trainer: 'Trainer', report: Dict[str, Any]) -> None:
        """After a validation (sent by :class:`ValidationHook`); see its docstring for ``report``."""

    def on_fit_end(self, trainer: 'Trainer') -> None:
        """After the loop ended normally (finished, or stopped by a hook); not after an exception."""

    def close(self, trainer: 'Trainer') -> None:
        """Always, last (also after an exception): release resources."""

    def wants_stop(self, trainer: 'Trainer') -> bool:
        """This process's vote to stop after the current step (agreed between processes)."""
        return False

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def on_missing_state(self, trainer: 'Trainer') -> None:
        """A resumed state holds nothing for this hook (it was off in the earlier run)."""


def is_better(value: Optional[float], best: Optional[float], metric: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` (higher mAP, lower loss) by more than ``min_delta``."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if metric == 'map' else value < best - min_delta


# ----------------------------------------------------------------------------- weights
class EMAHook(Hook):
    """Updates :class:`~.ema.ModelEMA` after each real update; its state is the EMA."""

    name = 'ema'

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def on_update(self, trainer, result):
        self.ema.update(trainer.model)

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)

    def on_missing_state(self, trainer):
        self.ema.__init__(trainer.model, self.ema.decay, self.ema.ramp)  # restart from the resumed weights


class LRScheduleHook(Hook):
    """Steps a per-update LR scheduler after each real update (a skipped step does not advance
    the schedule). On resume a ``LambdaLR`` keeps this run's schedule and the saved position."""

    name = 'lr_schedule'

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def on_update(self, trainer, result):
        self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        load_scheduler_position(self.scheduler, state)


# ----------------------------------------------------------------------------- run control
class SignalHook(Hook):
    """SIGINT/SIGTERM: stop at the step under way (a step whose last backward has not started yet
    is abandoned, one further along completes; none starts after), let the checkpoint hook write
    last.ckpt, stop (the script then exits with 128 + the signal number). A second Ctrl+C aborts
    at once without saving. The handlers are installed in ``on_fit_start`` and the previous ones
    restored in ``close``."""

    name = 'signal'

    def __init__(self, log: Log = print):
        self.requested: Optional[int] = None
        self._old: Dict[int, Any] = {}
        self.log = log

    def on_fit_start(self, trainer):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def close(self, trainer):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f'\n[{signal.Signals(signum).name}] stopping at the step under way and saving last.ckpt (Ctrl+C '
              'again aborts without saving)', file=sys.stderr, flush=True)

    def wants_stop(self, trainer):
        return self.requested is not None

    def on_epoch_end(self, trainer, epoch, finished):
        # a signal during validation (one process: no agreement needed)
        if self.requested is not None and dist_info()[1] == 1:
            trainer.request_stop('signal')

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for Ctrl+C, 143 for SIGTERM); 130 when none was seen."""
        return 128 + int(self.requested or signal.SIGINT)


class DataOrderHook(Hook):
    """Positions the training data at the trainer's counters at each epoch start, so that a resumed
    run sees exactly the batches it had not seen: the :class:`~.sampler.EpochSampler` skips the
    images already used in the epoch (each image's augmentation is seeded from its place in the
    order, :class:`~.sampler.SeededItems`, so no worker random state needs restoring)."""

    name = 'data'

    def __init__(self, loader: Any, images_per_step: int):
        self.loader, self.images_per_step = loader, int(images_per_step)

    def on_epoch_start(self, trainer):
        self.loader.sampler.set_epoch(trainer.epoch, trainer.epoch_step * self.images_per_step)


# ----------------------------------------------------------------------------- reporting
class ProgressHook(Hook):
    """Progress bar (rank 0) and one summary line per epoch (mean train losses, LR, step)."""

    name = 'progress'

    def __init__(self, steps_per_epoch: int, num_epochs: int, enabled: bool = True, log: Log = print,
                 epoch_summary: Optional[Callable[[], str]] = None):
        self.steps_per_epoch, self.num_epochs, self.enabled, self.log = steps_per_epoch, num_epochs, enabled, log
        self.epoch_summary = epoch_summary
        self.bar = None
        self.sums, self.count = np.zeros(3), 0

    def on_epoch_start(self, trainer):
        from tqdm import tqdm
        self.sums, self.count = np.zeros(3), 0
        self.bar = tqdm(total=self.steps_per_epoch, initial=trainer.epoch_step, disable=not self.enabled,
                        desc=f'epoch {trainer.epoch}/{self.num_epochs}', dynamic_ncols=True)

    def on_step_end(self, trainer, r):
        if self.bar is not None:
            self.bar.update(1)
        if not r['skipped']:
            self.sums += (r['loss'], r['cls_loss'], r['box_loss'])
            self.count += 1
            if self.bar is not None:
                self.bar.set_postfix(loss=f'{r["loss"]:.4f}', cls=f'{r["cls_loss"]:.4f}',
                                     box=f'{r["box_loss"]:.5f}', lr=f'{r["lr"]:.2e}', refresh=False)
        elif self.enabled and self.bar is not None:
            self.bar.write(f'[warn] step {trainer.step}: non-finite loss or gradients, update skipped '
                           f'({trainer.nonfinite_in_row} in a row)')

    def on_epoch_end(self, trainer, epoch, finished):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if trainer.stop_reason == 'signal':
            return
        if self.count:
            m = self.sums / self.count
            self.log(f'epoch {epoch}: train loss {m[0]:.5f} (cls {m[1]:.5f}, box {m[2]:.6f}), '
                     f'lr {trainer.optimizer.param_groups[0]["lr"]:.3e}, step {trainer.step}'
                     + (f', {trainer.nonfinite_total} skipped non-finite steps' if trainer.nonfinite_total else ''))
        if self.epoch_summary is not None:
            self.log(self.epoch_summary())

    def close(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoardHook(Hook):
    """Train losses, LR and positives per step; validation metrics per candidate (``AP/val_raw``,
    ``AP/val_ema``) and of the better one (``AP/val``), and the better one's precision-recall
    figure (image ``precision_recall/val``, when its metrics hold ``curves`` and matplotlib is
    installed). Rank 0 only; a resumed run writes a new event folder."""

    name = 'tensorboard'

    def __init__(self, log_dir: str, enabled: bool = True, log: Log = print):
        self.log_dir, self.enabled, self.log = log_dir, enabled, log
        self.writer = None
        self._said_no_plots = False

    def on_fit_start(self, trainer):
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(self.log_dir)

    def on_step_end(self, trainer, r):
        if self.writer is None or r['skipped']:
            return
        for k in ('loss', 'cls_loss', 'box_loss'):
            self.writer.add_scalar(f'{k}/train', r[k], trainer.step)
        self.writer.add_scalar('lr', r['lr'], trainer.step)
        self.writer.add_scalar('num_pos', r['num_pos'], trainer.step)

    def on_validation(self, trainer, report):
        if self.writer is None:
            return
        for name, metrics in (report.get('results') or {}).items():
            for k, v in metrics.items():
                if not isinstance(v, numbers.Real):
                    continue  # the curves
                self.writer.add_scalar(f'{k}/val_{name.replace("/", "_")}', v, trainer.step)
                if name == report['source']:
                    self.writer.add_scalar(f'{k}/val', v, trainer.step)
        chosen = (report.get('results') or {}).get(report['source']) or {}
        if chosen.get('curves') is not None:
            from ..errors import UserError
            from ..plots import pr_rgb, require_matplotlib
            try:
                require_matplotlib('the precision-recall figure in TensorBoard')
            except UserError as e:  # optional: say so once, keep training
                if not self._said_no_plots:
                    self.log(f'[info] {e}')
                    self._said_no_plots = True
                return
            self.writer.add_image('precision_recall/val', pr_rgb(chosen), trainer.step, dataformats='HWC')

    def close(self, trainer):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ----------------------------------------------------------------------------- validation
class ValidationHook(Hook):
    """Validates after every ``interval``-th finished epoch (and the last one); RNG-neutral, so
    validation never changes the training trajectory.

    ``evaluate_candidates()`` returns ``{name: {'metrics': {...}, 'state_dict': ...}}`` for the
    raw weights and/or the EMA (see :func:`~.validation.evaluate_candidates`); the better one by
    ``metric`` ('map': higher ``AP``, 'loss': lower ``loss``) among ``('raw', 'ema')`` is chosen
    (on a tie the first; the log marks ``<- better`` only a strictly better one). Every process
    calls it (a distributed evaluation: each process evaluates its shard); rank 0's pick is
    broadcast, so every process acts on the same one.
    Sends ``on_validation(report)`` to every hook with ``report`` = ``{'epoch', 'step', 'metric',
    'value' (float or None), 'source' ('raw' | 'ema'), 'results' ({name: metrics}, rank 0),
    'state_dict' (the chosen weights as evaluated, rank 0)}``; value and source are broadcast.
    """

    name = 'validation'

    def __init__(self, evaluate_candidates: Callable[[], Dict[str, Dict[str, Any]]], metric: str = 'map',
                 interval: int = 1, num_epochs: Optional[int] = None, is_main: bool = True, log: Log = print):
        self.evaluate_candidates, self.metric = evaluate_candidates, metric
        self.interval, self.num_epochs, self.is_main, self.log = max(int(interval), 1), num_epochs, is_main, log

    def _value(self, metrics: Dict[str, float]) -> Optional[float]:
        v = metrics.get('AP' if self.metric == 'map' else 'loss')
        return float(v) if v is not None and math.isfinite(v) else None

    def on_epoch_end(self, trainer, epoch, finished):
        if not finished or trainer.stop_reason == 'signal':
            return
        last = self.num_epochs is not None and trainer.epoch >= self.num_epochs
        if epoch % self.interval and not last:
            return
        report: Dict[str, Any] = {'epoch': epoch, 'step': trainer.step, 'metric': self.metric, 'value': None,
                                  'source': 'raw', 'results': None, 'state_dict': None}
        order = ('raw', 'ema')
        saved = rng_state()
        t0 = time.time()
        try:
            res = self.evaluate_candidates()
        finally:
            set_rng_state(saved)
        values = {k: self._value(res[k]['metrics']) for k in order if k in res}
        sign = 1.0 if self.metric == 'map' else -1.0
        pick = max(values, key=lambda k: -math.inf if values[k] is None else sign * values[k])
        strictly = values[pick] is not None and all(
            v is None or sign * values[pick] > sign * v for k, v in values.items() if k != pick)
        if self.is_main:
            for name, r in res.items():
                mt = r['metrics']
                msg = (f'val epoch {epoch} {name}: loss {mt["loss"]:.5f} (cls {mt["cls_loss"]:.5f}, '
                       f'box {mt["box_loss"]:.6f})')
                if 'AP' in mt:
                    msg += f', mAP {mt["AP"]:.4f}, AP50 {mt.get("AP50", float("nan")):.4f}'
                self.log(msg + (' <- better' if name == pick and len(values) > 1 and strictly else ''))
            self.log(f'[info] validation at step {trainer.step} took {time.time() - t0:.0f}s')
            report.update(results={k: r['metrics'] for k, r in res.items()}, state_dict=res[pick]['state_dict'])
        report.update(value=values[pick], source=pick)
        flags = torch.tensor([math.nan if values[pick] is None else values[pick], float(order.index(pick))],
                             dtype=torch.float64)
        _, world = dist_info()
        if world > 1:
            flags = flags.to(trainer.device)
            dist.broadcast(flags, 0)
            flags = flags.cpu()
            v = float(flags[0])
            report.update(value=None if math.isnan(v) else v, source=order[int(flags[1])])
        trainer.call('on_validation', report)


class BestCheckpointHook(Hook):
    """Writes ``best.pth`` (and ``efficientdet-{tag}_{epoch}_{step}.pth``) with the validated weights
    whenever the validation value improves; remembers the best value, its epoch and whether the
    raw or the EMA weights gave it."""

    name = 'best'

    def __init__(self, save_dir: str, tag: str, metric: str = 'map', min_delta: float = 0.0,
                 is_main: bool = True, log: Log = print):
        self.save_dir, self.tag, self.metric, self.min_delta, self.is_main, self.log = (
            save_dir, tag, metric, float(min_delta), is_main, log)
        self.value: Optional[float] = None
        self.epoch = -1
        self.source: Optional[str] = None

    def on_validation(self, trainer, report):
        if not is_better(report['value'], self.value, self.metric, self.min_delta):
            return
        self.value, self.epoch, self.source = float(report['value']), int(report['epoch']), report['source']
        if self.is_main and report.get('state_dict') is not None:
            from ..ckpt.files import atomic_save
            atomic_save(report['state_dict'], os.path.join(self.save_dir, 'best.pth'))
            atomic_save(report['state_dict'],
                        os.path.join(self.save_dir, f'efficientdet-{self.tag}_{report["epoch"]}_{report["step"]}.pth'))
            self.log(f'[info] best.pth: the {self.source} weights of epoch {self.epoch} '
                     f'({"mAP" if self.metric == "map" else "val loss"} {self.value:.4f})')

    def state_dict(self):
        return {'value': self.value, 'epoch': self.epoch, 'source': self.source}

    def load_state_dict(self, state):
        self.value = None if state.get('value') is None else float(state['value'])
        self.epoch = int(state.get('epoch', -1))
        self.source = state.get('source')


class EarlyStoppingHook(Hook):
    """Stops when ``patience`` validated epochs pass without an improvement of ``min_delta``."""

    name = 'early_stopping'

    def __init__(self, patience: int, metric: str = 'map', min_delta: float = 0.0, log: Log = print):
        self.patience, self.metric, self.min_delta, self.log = int(patience), metric, float(min_delta), log
        self.value: Optional[float] = None
        self.epoch = -1

    def on_validation(self, trainer, report):
        if is_better(report['value'], self.value, self.metric, self.min_delta):
            self.value, self.epoch = float(report['value']), int(report['epoch'])
        if self.patience > 0 and report['epoch'] - self.epoch > self.patience:
            self.log(f'[info] early stopping at epoch {report["epoch"]}: best {self.metric} '
                     f'{self.value if self.value is not None else float("nan"):.5f} at epoch {self.epoch}')
            trainer.request_stop('early_stop')

    def state_dict(self):
        return {'value': self.value, 'epoch': self.epoch}

    def load_state_dict(self, state):
        self.value = None if state.get('value') is None else float(state['value'])
        self.epoch = int(state.get('epoch', -1))


class CheckpointHook(Hook):
    """``last.ckpt`` (the whole training state, for ``-w last``) after every epoch, every
    ``save_interval`` steps and at the end; plain weights ``efficientdet-{tag}_{epoch}_{step}.pth``
    every ``save_interval`` steps and at the end (unless stopped by a signal). All writes are
    atomic (a crash never leaves a half-written file). ``weights()`` gives the state_dict to write
    (the EMA with matching BN statistics, or the raw weights)."""

    name = 'checkpoint'

    def __init__(self, save_dir: str, tag: str, weights: Callable[[], Dict[str, torch.Tensor]],
                 save_interval: int = 0, meta: Optional[Dict[str, Any]] = None, is_main: bool = True):
        self.save_dir, self.tag, self.weights, self.save_interval = save_dir, tag, weights, int(save_interval)
        self.meta, self.is_main = dict(meta or {}), is_main

    def on_fit_start(self, trainer):
        if self.is_main:
            os.makedirs(self.save_dir, exist_ok=True)

    @property
    def last_path(self) -> str:
        return os.path.join(self.save_dir, 'last.ckpt')

    def save_last(self, trainer: 'Trainer') -> None:
        from ..ckpt.files import atomic_save
        state = trainer.state_dict(self.meta)  # every process (RNG states are gathered)
        if self.is_main:
            atomic_save(state, self.last_path)

    def save_weights(self, trainer: 'Trainer', epoch: int) -> None:
        if self.is_main:
            from ..ckpt.files import atomic_save
            atomic_save(self.weights(), os.path.join(self.save_dir, f'efficientdet-{self.tag}_{epoch}_{trainer.step}.pth'))

    def on_step_end(self, trainer, result):
        if self.save_interval > 0 and trainer.step % self.save_interval == 0:
            self.save_weights(trainer, trainer.epoch)
            self.save_last(trainer)

    def on_epoch_end(self, trainer, epoch, finished):
        if trainer.stop_reason is None:
            self.save_last(trainer)

    def on_fit_end(self, trainer):
        if trainer.stop_reason != 'signal':
            last_epoch = trainer.epoch - 1 if trainer.epoch_step == 0 and trainer.epoch > 0 else trainer.epoch
            self.save_weights(trainer, last_epoch)
        self.save_last(trainer)
