"""Training as a library: a run built from a :class:`~.config.TrainConfig`, its default hooks, and
:func:`run_training`, the one call ``train.py`` makes.

    from efficientdet.training import Hook, TrainConfig, run_training

    class PrintLoss(Hook):
        name = 'print_loss'
        def on_step_end(self, trainer, result):
            print(trainer.step, result['loss'])

    cfg = TrainConfig(project='shape', compound_coef=0, image_size=256, num_epochs=2, batch_size=4)
    result = run_training(cfg, hooks=[PrintLoss()])      # TrainResult: steps, stop_reason, best_path …
    result = run_training(cfg.replace(weights='last', num_epochs=4))   # continue the same run

:func:`build_run` builds everything (data, model, EMA, BN re-estimation, optimizer, schedule,
hooks, resume) without running it; :meth:`Run.fit` runs it; :func:`default_hooks` is the hook
list a run gets. Under torchrun every process calls :func:`run_training`.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from ..ckpt.files import safe_load
from ..config import resolve_normalization, variant_tag
from ..distributed import DistContext, init_from_env, shard_indices
from ..errors import UserError
from .config import Recipe, TrainConfig, resolve_recipe
from .ema import ModelEMA, trainable_bn_names
from .freeze import freeze_for_head_only, freeze_parameters, set_train_mode
from .hooks import (BestCheckpointHook, CheckpointHook, DataOrderHook, EarlyStoppingHook, Hook, ProgressHook,
                    SignalHook, TensorBoardHook, ValidationHook)
from .optim import build_optimizer, build_scheduler, schedule_change
from .rng import seed_generators
from .sampler import EpochSampler, SeededItems
from .trainer import Trainer
from .validation import BNCalibrator, evaluate, evaluate_candidates

__all__ = ['TrainResult', 'Run', 'build_run', 'default_hooks', 'run_training', 'make_trainer', 'use_sync_bn', 'build_data',
           'seed_everything', 'subset_indices']

Log = Callable[..., None]


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log of the processes other than rank 0."""


def say(message: str) -> None:
    """The default log: a line on stdout, flushed (a job log or a pipe sees it at once)."""
    print(message, flush=True)


@dataclass
class TrainResult:
    """What a run did. ``stop_reason``: 'finished' (every epoch), 'max_steps', 'signal' (Ctrl+C /
    SIGTERM), 'early_stop', or a hook's own reason; ``best_*``: the best validation (``metric``
    'map' or 'loss'; None when none ran) and ``best.pth``; ``exit_code``: what ``train.py`` exits
    with (0, or 128 + the signal number)."""
    steps: int
    epoch: int
    stop_reason: str
    metric: str
    best_metric: Optional[float]
    best_epoch: Optional[int]
    best_source: Optional[str]
    best_path: Optional[str]
    last_path: str
    save_dir: str
    exit_code: int


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (and CUDA) generators from ``seed``."""
    seed_generators(seed)


def subset_indices(n: int, fraction: Optional[float], seed: int) -> Optional[List[int]]:
    """A seeded random ``fraction`` of range(n) (sorted), or None for everything."""
    if fraction is None:
        return None
    if not 0 < fraction <= 1:
        raise UserError(f'--subset must be a fraction in (0, 1], got {fraction}')
    k = max(1, int(math.ceil(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _collate(batch):
    from ..data import collate_fn
    return collate_fn(batch)


@dataclass
class Data:
    """The datasets and loaders of a run. ``train_loader`` yields micro-batches of this process's
    share (``EpochSampler`` with item seeds over :class:`~.sampler.SeededItems`); ``val_loader``
    this process's shard of the first ``val_count`` validation images."""
    train_ds: Any
    val_ds: Any
    train_items: Any
    train_loader: DataLoader
    val_loader: DataLoader
    val_count: int


def build_data(cfg: TrainConfig, recipe: Recipe, project: Any, image_size: Tuple[int, int], rank: int,
               world: int, local_bs: int) -> Data:
    """Train/val datasets and loaders of ``cfg``; ``local_bs`` images per loader batch (one
    micro-batch of one process)."""
    from ..cli import variant_of
    from ..data import build_dataset
    from ..project import check_scale_range
    mean, std = resolve_normalization(variant_of(cfg), project.mean, project.std)
    scale_range = (check_scale_range(cfg.scale_range, '--scale_range') if cfg.scale_range is not None
                   else project.scale_range)
    train_ds = build_dataset(project, project.train_set, image_size, cfg.data_path, augment=True, mean=mean, std=std,
                             scale_range=scale_range)
    val_ds = build_dataset(project, project.val_set, image_size, cfg.data_path, augment=False, mean=mean, std=std)
    idx = subset_indices(len(train_ds), cfg.subset, cfg.seed)
    items = SeededItems(Subset(train_ds, idx) if idx is not None else train_ds, base_seed=cfg.seed,
                        drop_crowd=recipe.drop_crowd)
    val_count = len(val_ds) if cfg.subset is None else max(1, int(math.ceil(len(val_ds) * cfg.subset)))
    if cfg.examples_per_epoch is not None and cfg.examples_per_epoch < cfg.batch_size:
        raise UserError(f'--examples_per_epoch {cfg.examples_per_epoch} is less than one batch of {cfg.batch_size}')
    sampler = EpochSampler(len(items), shuffle=True, seed=cfg.seed, rank=rank, world=world,
                           examples_per_epoch=cfg.examples_per_epoch, item_seeds=True)
    loader_kw = dict(num_workers=cfg.num_workers, collate_fn=_collate, pin_memory=torch.cuda.is_available())
    # own generator: the workers' base seed is drawn from it, not from the global RNG (whose state a
    # resumed run restores); the augmentation itself is seeded per item (SeededItems)
    train_loader = DataLoader(items, batch_size=local_bs, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    val_loader = DataLoader(Subset(val_ds, shard_indices(val_count, rank, world)), batch_size=local_bs,
                            shuffle=False, drop_last=False, **loader_kw)
    return Data(train_ds, val_ds, items, train_loader, val_loader, val_count)


def _to_plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


class Run:
    """Everything a training run is made of (see :func:`build_run`); :meth:`fit` runs it once.

    Attributes: ``cfg`` (the configuration with the recipe's values filled in), ``recipe``,
    ``ctx`` (rank, world, device), ``project``, ``variant``, ``image_size``, ``model`` (the bare
    model being trained), ``trainer``, ``data``, ``steps_per_epoch``, ``save_dir``,
    ``resume_path`` (None for a new run), ``hooks`` (the trainer's, in order)."""

    def __init__(self, **parts: Any):
        self.__dict__.update(parts)

    @property
    def last_path(self) -> str:
        return os.path.join(self.save_dir, 'last.ckpt')

    def fit(self) -> TrainResult:
        """Train; returns what happened. Exceptions propagate (no checkpoint is written after one)."""
        cfg, trainer, log = self.cfg, self.trainer, self.log
        reason = trainer.fit(self.data.train_loader, cfg.num_epochs, self.steps_per_epoch, max_steps=cfg.max_steps,
                             data_name=f'the training data ({self.data.train_ds.ann_file})')
        best = trainer.hook('best')
        best_path = os.path.join(self.save_dir, 'best.pth') if best is not None and best.value is not None else None
        signals = trainer.hook('signal')
        code = signals.exit_code if reason == 'signal' and signals is not None else 0
        if reason == 'signal':
            log(f'[info] stopped at step {trainer.step}; {self.last_path} saved — continue with: python train.py '
                f'-p {self.project_arg} -c {self.variant} -w last ... (the same options)')
        else:
            log(f'[info] done ({reason or "finished"}): step {trainer.step}, checkpoints in {self.save_dir}'
                + (f'; best.pth = {best.source} weights of epoch {best.epoch}' if best_path and best.source else ''))
        return TrainResult(steps=trainer.step, epoch=trainer.epoch, stop_reason=reason or 'finished',
                           metric=self.es_metric, best_metric=None if best is None else best.value,
                           best_epoch=None if best is None or best.value is None else best.epoch,
                           best_source=None if best is None else best.source, best_path=best_path,
                           last_path=self.last_path, save_dir=self.save_dir, exit_code=code)


def _check_numbers(cfg: TrainConfig, world: int) -> int:
    """Validate the counts of ``cfg``; returns the images per process per micro-batch."""
    if cfg.accumulate < 1:
        raise UserError(f'--accumulate must be at least 1, got {cfg.accumulate}')
    if cfg.num_epochs < 1:
        raise UserError(f'--num_epochs must be at least 1, got {cfg.num_epochs}')
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f'--max_steps {cfg.max_steps} would train no step; give at least 1 (or leave it out)')
    per_step = world * cfg.accumulate
    if cfg.batch_size < per_step or cfg.batch_size % per_step:
        raise UserError(f'--batch_size {cfg.batch_size} must be a multiple of {per_step} (= {world} processes x '
                        f'--accumulate {cfg.accumulate})')
    return cfg.batch_size // per_step


def _weights_source(cfg: TrainConfig, save_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """(training state to resume, weights to fine-tune from) of ``-w``; refuses to start a new run
    over another run's ``last.ckpt``."""
    from ..cli import resolve_weights
    last = os.path.join(save_dir, 'last.ckpt')
    resume, finetune = None, None
    if cfg.weights == 'last':
        resume = last
        if not os.path.isfile(resume):
            raise UserError(f'-w last: {resume} does not exist; train once without -w (or with -w FILE.pth) first, '
                            'or check --saved_path and -p')
    elif cfg.weights and cfg.weights.endswith('.ckpt'):
        resume = cfg.weights
        if not os.path.isfile(resume):
            raise UserError(f'-w {resume}: no such training state (a .ckpt written by train.py); check the path')
    elif cfg.weights:
        finetune = resolve_weights(cfg)  # same attribute names as the options
    if os.path.exists(last) and (resume is None or os.path.abspath(resume) != os.path.abspath(last)):
        raise UserError(f'{last} holds the training state of an earlier run, which this run would replace: continue '
                        f'that run with -w last (the same options), or train anew into another --saved_path (or move '
                        f'{save_dir} away)')
    return resume, finetune


def build_run(cfg: TrainConfig, hooks: Sequence[Hook] = (), ctx: Optional[DistContext] = None,
              log: Log = say) -> Run:
    """Everything of a run from ``cfg``: data, model (``factory.build_model``), EMA, frozen parts,
    optimizer and schedule, BN re-estimation, the hooks (:func:`default_hooks` with ``hooks``
    added before the signal and checkpoint hooks) and, with ``-w last`` / a ``.ckpt``, the resumed
    state. ``ctx``: the process group (default: from torchrun's environment). Nothing is trained."""
    from ..cli import project_name, variant_of
    from ..factory import build_model, resolve_image_size, resolve_variant
    from ..loss import DetectionLoss
    from ..project import load_project
    ctx = ctx or init_from_env()
    rank, world, device = ctx.rank, ctx.world, ctx.device
    is_main = rank == 0
    log = log if is_main else _quiet
    recipe, cfg = resolve_recipe(cfg)
    project_arg = project_name(cfg)
    project = load_project(project_arg, cfg.projects_dir)
    if project.num_gpus == 0 and device.type == 'cuda' and world == 1:
        device = torch.device('cpu')
    variant = resolve_variant(variant_of(cfg))  # variant_of writes cfg.compound_coef (our copy)
    cfg.compound_coef = variant
    tag = variant_tag(variant)
    from ..cli import image_size_arg
    image_size = resolve_image_size(variant, image_size_arg(cfg.image_size))
    local_bs = _check_numbers(cfg, world)
    if cfg.amp and device.type != 'cuda':
        log('[note] --amp needs CUDA; training in float32')
    es_metric = cfg.es_metric or ('loss' if cfg.no_map else 'map')
    if es_metric == 'map' and cfg.no_map:
        raise UserError('--es_metric map needs the COCO evaluation; drop --no_map')
    if cfg.backbone_weights and cfg.weights:
        raise UserError('--backbone_weights and -w both give initial weights; pass one of them')
    seed_everything(cfg.seed + rank)

    save_dir = os.path.join(cfg.saved_path, project.project_name)
    resume_path, finetune_from = _weights_source(cfg, save_dir)
    state = safe_load(resume_path, map_location='cpu') if resume_path else None
    data = build_data(cfg, recipe, project, image_size, rank, world, local_bs)
    images_per_step = local_bs * cfg.accumulate  # per process
    steps_per_epoch = len(data.train_loader.sampler) // images_per_step
    if steps_per_epoch < 1:
        raise UserError(f'the training set has {len(data.train_loader.sampler) * world} images per epoch, fewer than '
                        f'one step of {cfg.batch_size}; lower --batch_size')
    log(data.train_ds.summary())
    log(data.val_ds.summary())

    # the model; a resumed state's backbone is the one it records
    backbone = cfg.backbone
    if state is not None and isinstance(state.get('model'), dict):  # the one rule of build_model, on the state
        from ..ckpt.layout import read_checkpoint
        from ..factory import backbone_of
        backbone = backbone_of(cfg.backbone, read_checkpoint(state['model'], name=resume_path), finetune=False)
    model = build_model(variant, project=project, weights=finetune_from, image_size=image_size, compat=cfg.compat,
                        finetune=True, verbose=is_main, backbone=backbone)
    _initial_backbone(model, cfg, log)
    if cfg.head_only:
        freeze_for_head_only(model)
        log('[info] --head_only: backbone_net, bifpn frozen')
    if cfg.freeze:
        frozen = freeze_parameters(model, cfg.freeze)
        log(f'[info] --freeze {cfg.freeze!r}: {len(frozen)} parameter tensors frozen')
    model.to(device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == 'cpu'
    if channels_last:
        model.to(memory_format=torch.channels_last)
    set_train_mode(model, cfg.head_only, cfg.freeze_bn)
    bn_names = trainable_bn_names(model)
    ema = ModelEMA(model, decay=cfg.ema_decay) if cfg.ema else None
    scratch = copy.deepcopy(model).eval()  # plain BN: the weights validated (every process) and saved (rank 0)
    if cfg.grad_checkpoint:
        from .memory import enable_grad_checkpoint
        log(f'[info] --grad_checkpoint: {enable_grad_checkpoint(model)} modules recompute their activations')
    if cfg.sync_bn and device.type != 'cuda':
        log('[note] --sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); plain BatchNorm used')
    if use_sync_bn(cfg.sync_bn, recipe, world, device.type, local_bs):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log(f'[info] SyncBatchNorm over {world} GPUs ({local_bs} images each)')

    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    run = Run(cfg=cfg, recipe=recipe, ctx=ctx, device=device, log=log, project=project, project_arg=project_arg,
              variant=variant, tag=tag, image_size=image_size, local_bs=local_bs, images_per_step=images_per_step,
              data=data, steps_per_epoch=steps_per_epoch, save_dir=save_dir, resume_path=resume_path,
              es_metric=es_metric, model=model, ema=ema, channels_last=channels_last, trainer=None, hooks=[])
    run.calibrator = _calibrator(run, scratch, bn_names)
    run.val_criterion = DetectionLoss(label_smoothing=cfg.label_smoothing)
    run.trainer = make_trainer(cfg, model, steps_per_epoch, device=device, ema=ema, ddp=ddp,
                               hooks=default_hooks(run, hooks), channels_last=channels_last)
    run.hooks = run.trainer.hooks
    if state is not None:
        _resume(run, state)
    b = cfg.batch_size
    log(f'[info] {tag.upper()} {image_size[0]}x{image_size[1]}px, {len(project.obj_list)} classes, batch {b} '
        f'({world} x {cfg.accumulate} x {local_bs}), {steps_per_epoch} steps/epoch, {cfg.optim} lr '
        f'{run.trainer.scheduler.base_lrs[0]:g}, recipe '
        f'{recipe.name}, device {device}{", EMA" if ema else ""}{", AMP" if run.trainer.amp else ""}; checkpoints in '
        f'{save_dir}')
    return run


def use_sync_bn(asked: bool, recipe: Recipe, world: int, device_type: str, local_bs: int) -> bool:
    """Whether BatchNorm is synchronised across the GPUs: on several CUDA processes, when
    ``--sync_bn`` asks, when the recipe syncs every multi-GPU run (official), or when each GPU holds
    4 images or fewer."""
    return world > 1 and device_type == 'cuda' and (asked or recipe.sync_bn_always or local_bs <= 4)


def make_trainer(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int, *,
                 device: Optional[torch.device] = None, ema: Optional[ModelEMA] = None,
                 ddp: Optional[torch.nn.Module] = None, hooks: Sequence[Hook] = (),
                 channels_last: bool = False) -> Trainer:
    """The :class:`Trainer` of ``cfg`` for ``model``: optimizer (``--optim``, ``--lr`` default 0.08 x
    batch / 64 for SGD, ``--weight_decay``), warm-up + cosine schedule over ``--num_epochs`` epochs
    of ``steps_per_epoch`` steps, the detection loss, clipping and weight decay as the recipe says
    (``--recipe official``: per-tensor then global clipping with the decay inside the gradient).
    What :func:`build_run` uses; a test takes the official recipe's step from here."""
    from ..loss import DetectionLoss
    recipe, cfg = resolve_recipe(cfg)
    world = 1 if ddp is None else torch.distributed.get_world_size()
    lr = cfg.lr if cfg.lr is not None else (0.08 * cfg.batch_size / 64 if cfg.optim == 'sgd' else 1e-3)
    wd = cfg.weight_decay if cfg.weight_decay is not None else (4e-5 if cfg.optim == 'sgd' else 1e-2)
    optimizer = build_optimizer(model, cfg.optim, lr, cfg.momentum, wd)
    scheduler = build_scheduler(optimizer, cfg.num_epochs * steps_per_epoch,
                                int(round(cfg.warmup_epochs * steps_per_epoch)))
    criterion = DetectionLoss(label_smoothing=cfg.label_smoothing, distributed=world > 1)
    return Trainer(model, criterion, optimizer, scheduler, ema, device=device, amp=cfg.amp,
                   clip_grad_norm=cfg.clip_grad or None, ddp_model=ddp, head_only=cfg.head_only,
                   channels_last=channels_last, hooks=hooks, accumulate=cfg.accumulate, freeze_bn=cfg.freeze_bn,
                   clip_per_tensor=recipe.clip_per_tensor, decay_in_grad=recipe.decay_in_grad and cfg.optim == 'sgd')


def _initial_backbone(model: torch.nn.Module, cfg: TrainConfig, log: Log) -> None:
    """``--backbone_weights`` and ``--drop_connect`` on the backbone (EfficientNet or timm)."""
    from ..backbones import TimmBackbone, load_timm_weights
    timm_backbone = isinstance(model.backbone_net, TimmBackbone)
    if cfg.backbone_weights:
        if timm_backbone:
            log(load_timm_weights(model, cfg.backbone_weights))
        else:
            from ..convert.backbone import load_backbone_weights
            log(load_backbone_weights(model, cfg.backbone_weights))
    if cfg.drop_connect is not None:
        net = getattr(model.backbone_net, 'model', None)
        if not hasattr(net, 'set_drop_connect_rate'):
            raise UserError(f'--drop_connect is the stochastic depth of the EfficientNet backbones; '
                            f'{type(model.backbone_net).__name__} has none (leave --drop_connect out)')
        try:
            net.set_drop_connect_rate(cfg.drop_connect)
        except ValueError as e:
            raise UserError(f'--drop_connect: {e} (the official 1 - survival_prob)') from None


def _calibrator(run: Run, scratch: torch.nn.Module, bn_names: Set[str]) -> BNCalibrator:
    """BN re-estimation over a fixed, seeded set of ``--bn_images`` training images (rank 0 computes,
    the others receive the result)."""
    cfg, local_bs = run.cfg, run.local_bs
    if cfg.bn_images <= 0 or not run.ctx.is_main:
        return BNCalibrator(scratch, None, bn_names, recomputes=cfg.bn_images > 0)
    items = run.data.train_items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed))
    count = min(len(order), max(local_bs, math.ceil(cfg.bn_images / local_bs) * local_bs))
    loader = DataLoader(Subset(items, order[:count].tolist()), batch_size=local_bs, num_workers=cfg.num_workers,
                        collate_fn=_collate, drop_last=False)

    def batches() -> Iterator[torch.Tensor]:
        for b in loader:
            x = b['img'].to(run.device)
            yield x.contiguous(memory_format=torch.channels_last) if run.channels_last else x
    return BNCalibrator(scratch, batches, bn_names, recomputes=True)


def default_hooks(run: Run, extra: Sequence[Hook] = ()) -> List[Hook]:
    """The hooks of a run, in order: data order, progress, TensorBoard, validation (the recipe's
    candidates), best.pth, early stopping, ``--debug`` images, then ``extra`` (a user's), then the
    signal hook and the checkpoint hook (last, so that ``last.ckpt`` holds every hook's state after
    the step). The EMA and LR-schedule hooks are the trainer's own (first)."""
    cfg, ctx, log = run.cfg, run.ctx, run.log
    is_main = ctx.is_main
    signals = SignalHook(log=log)
    calibrator, device, data = run.calibrator, run.device, run.data

    def candidates() -> Dict[str, Dict[str, Any]]:
        trainer = run.trainer
        sds = {}
        for name in run.recipe.validate:
            if name == 'ema' and trainer.ema is not None:
                sds['ema'] = trainer.ema.module.state_dict()
            elif name == 'raw':
                sds['raw'] = trainer.model.state_dict()
        if not sds:  # --no-ema with a recipe that validates the EMA only
            sds['raw'] = trainer.model.state_dict()

        def ev(m):
            return evaluate(m, run.val_criterion, data.val_loader, data.val_ds, device, run.local_bs, data.val_count,
                            not cfg.no_map, cfg.num_workers, lambda: signals.requested is not None)
        return evaluate_candidates(sds, calibrator, ev, compare_running=cfg.bn_compare, keep_state_dicts=is_main)

    def weights_to_save() -> Dict[str, torch.Tensor]:
        trainer = run.trainer
        src = trainer.ema.module if trainer.ema is not None else trainer.model
        return calibrator.state_dict_of(src.state_dict())

    from ..backbones import backbone_spec
    meta = {'compound_coef': run.variant, 'variant': run.tag, 'num_classes': len(run.project.obj_list),
            'image_size': list(run.image_size), 'project': run.project.project_name,
            'obj_list': list(run.project.obj_list), 'backbone': backbone_spec(run.model) or 'efficientnet',
            'recipe': run.recipe.name, 'args': {k: _to_plain(v) for k, v in vars(cfg).items()}}
    tb_dir = os.path.join(cfg.log_path, run.project.project_name, 'tensorboard',
                          datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
    hooks: List[Hook] = [
        DataOrderHook(data.train_loader, run.images_per_step),
        ProgressHook(run.steps_per_epoch, cfg.num_epochs, enabled=is_main, log=log, epoch_summary=data.train_ds.summary),
        TensorBoardHook(tb_dir, enabled=is_main, log=log),
        ValidationHook(candidates, run.es_metric, cfg.val_interval, cfg.num_epochs, is_main=is_main, log=log),
        BestCheckpointHook(run.save_dir, run.tag, run.es_metric, cfg.es_min_delta, is_main=is_main, log=log),
        EarlyStoppingHook(cfg.es_patience, run.es_metric, cfg.es_min_delta, log=log),
    ]
    if cfg.debug:
        from .debug import DebugImagesHook
        mean, std = resolve_normalization(run.variant, run.project.mean, run.project.std)
        hooks.append(DebugImagesHook(data.val_loader, calibrator.scratch if is_main else None, run.project.obj_list,
                                     mean, std, os.path.join(cfg.log_path, run.project.project_name, 'debug'), is_main))
    hooks += list(extra)
    hooks += [signals, CheckpointHook(run.save_dir, run.tag, weights_to_save, cfg.save_interval, meta, is_main=is_main)]
    return hooks


def _resume(run: Run, state: Dict[str, Any]) -> None:
    """Restore ``state`` into the run and say what resumed (and what changed)."""
    trainer, cfg, log, world = run.trainer, run.cfg, run.log, run.ctx.world
    sched_state = (state.get('hooks') or {}).get('lr_schedule') or state.get('scheduler')
    trainer.load_state_dict(state, restore_rng=True, path=run.resume_path)
    if world > 1 and not trainer.rng_restorable(state):
        seed_everything(cfg.seed + run.ctx.rank + 1000003 * trainer.step)
        log(f'[note] {run.resume_path} holds no RNG state for {world} processes (saved with another process count '
            'or an older version): the random augmentation after the resume differs from an uninterrupted run')
    if cfg.max_steps is not None and trainer.step >= cfg.max_steps:
        raise UserError(f'{run.resume_path} is at step {trainer.step}: --max_steps {cfg.max_steps} leaves nothing to '
                        'train; raise --max_steps')
    log(f'[info] resumed {run.resume_path}: epoch {trainer.epoch}, step {trainer.step}'
        + (f', {trainer.epoch_step} steps into the epoch' if trainer.epoch_step else ''))
    if sched_state is not None and trainer.scheduler is not None:
        change = schedule_change(sched_state, trainer.scheduler)
        if change:
            log(f'[info] {change}')


def run_training(cfg: TrainConfig, hooks: Optional[Sequence[Hook]] = None, log: Log = say) -> TrainResult:
    """Build the run of ``cfg`` (:func:`build_run`, with ``hooks`` added to the defaults) and train.
    Under torchrun the process group is started from the environment (and ended after a normal
    end); every process calls this. Returns a :class:`TrainResult`; a user mistake raises
    :class:`~efficientdet.errors.UserError`, and any exception leaves the last good checkpoint
    as it was."""
    ctx = init_from_env()
    result = build_run(cfg, hooks or (), ctx=ctx, log=log).fit()
    ctx.close()  # after an exception the process group is left to the process's end (a peer may be gone)
    return result
