"""Training: the trainer and its hooks, optimizer / schedule, EMA, freezing, validation, RNG state.

| module | what lives there |
|---|---|
| ``config`` | :class:`TrainConfig` (one field per ``train.py`` option), the recipes, ``train.py``'s parser |
| ``run`` | :func:`run_training`, :func:`build_run`, :func:`default_hooks`, :class:`TrainResult`: the run as library code |
| ``trainer`` | :class:`Trainer`: the optimizer step (micro-batches, AMP, clipping, non-finite skip), the loop, the state |
| ``hooks`` | :class:`Hook` and the behaviours: EMA, LR schedule, signals, data order, progress, TensorBoard, validation, best.pth, early stopping, checkpoints |
| ``optim`` | parameter groups, optimizer, warm-up + cosine |
| ``ema`` | :class:`ModelEMA`, :func:`recompute_bn` |
| ``validation`` | validation losses / mAP, raw-vs-EMA candidates, :class:`BNCalibrator` |
| ``freeze`` | ``--freeze`` / ``--head_only`` / ``--freeze_bn`` |
| ``memory`` | ``--grad_checkpoint`` (activation checkpointing) |
| ``sampler`` | resumable, sharded data order; per-image augmentation seeds (:class:`SeededItems`) |
| ``rng``, ``util`` | RNG state, DDP helpers |
"""
from .ema import ModelEMA, recompute_bn, trainable_bn_names
from .freeze import freeze_for_head_only, freeze_parameters, frozen_modules, set_train_mode
from .hooks import (BestCheckpointHook, CheckpointHook, DataOrderHook, EarlyStoppingHook, EMAHook, Hook,
                    LRScheduleHook, ProgressHook, SignalHook, TensorBoardHook, ValidationHook)
from .optim import WarmupCosine, build_optimizer, build_scheduler, param_groups
from .rng import rng_state, set_rng_state
from .sampler import EpochSampler, SeededItems
from .trainer import STATE_FORMAT, STATE_VERSION, Trainer
from .util import dist_info, unwrap_model
from .config import RECIPES, TrainConfig
from .run import Run, TrainResult, build_run, default_hooks, run_training

__all__ = ['Trainer', 'STATE_FORMAT', 'STATE_VERSION', 'Hook', 'EMAHook', 'LRScheduleHook', 'SignalHook',
           'DataOrderHook', 'ProgressHook', 'TensorBoardHook', 'ValidationHook', 'BestCheckpointHook',
           'EarlyStoppingHook', 'CheckpointHook', 'ModelEMA', 'recompute_bn', 'trainable_bn_names',
           'param_groups', 'build_optimizer', 'WarmupCosine', 'build_scheduler', 'EpochSampler', 'rng_state',
           'set_rng_state', 'unwrap_model', 'dist_info', 'freeze_for_head_only', 'freeze_parameters',
           'frozen_modules', 'set_train_mode', 'SeededItems', 'TrainConfig', 'RECIPES', 'TrainResult', 'Run',
           'build_run', 'default_hooks', 'run_training']
