"""The training configuration: :class:`TrainConfig` (one field per ``train.py`` option, same name,
same default, its help text in the field's metadata), the recipes (``--recipe``) and the
``train.py`` command line built from both.

The command line is made from this module, so the options and the configuration cannot drift:
the options shared with the other scripts (``-p``, ``-c``, ``--image_size``, ``-w``, ``--data_path``,
``-n``, ``--batch_size`` …) come from :mod:`efficientdet.cli`, every other field becomes an option
from its metadata. From Python::

    from efficientdet.training import TrainConfig, run_training
    result = run_training(TrainConfig(project='shape', compound_coef=0, image_size=256, num_epochs=10))
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from ..cli import (OPTIONS, ScriptParser, add_data_args, add_model_args, add_project_args, add_weights_arg,
                   str2bool)
from ..errors import UserError

__all__ = ['TrainConfig', 'Recipe', 'RECIPES', 'resolve_recipe', 'build_parser', 'config_from_args',
           'option_fields', 'default_num_workers', 'SHARED_GROUPS']


def default_num_workers() -> int:
    """Data-loader workers per process by default: one per CPU core, at most 12."""
    return min(12, os.cpu_count() or 1)


def _shared(name: str, factory: Any = None, default: Any = None) -> Any:
    """A field that is the option ``name`` of :data:`efficientdet.cli.OPTIONS` (its flags, help and,
    unless ``train.py`` sets its own, its default live there)."""
    meta = {'shared': True}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    opt_default = OPTIONS[name].kwargs.get('default', default)
    return field(default=opt_default, metadata=meta)


def _opt(default: Any, help: str, **argparse_kw: Any) -> Any:
    """A ``train.py`` option: ``--NAME`` with ``help`` and argparse keywords (type, action, choices …)."""
    return field(default=default, metadata={'help': help, 'argparse': argparse_kw})


_BOOL_WORD = dict(type=str2bool, nargs='?', const=True, metavar='BOOL')  # Yet-Another's --debug True


@dataclass
class TrainConfig:
    """Everything a training run is made from; the fields are ``train.py``'s options (same names,
    same defaults; ``python train.py --help`` shows each one's help). A field left at None takes
    the value its help names (often the recipe's, see :data:`RECIPES`)."""

    # -- shared with the other scripts (efficientdet.cli)
    project: Optional[str] = _shared('project')
    projects_dir: str = _shared('projects_dir')
    compound_coef: Union[int, str, None] = _shared('compound_coef')
    image_size: Union[int, Tuple[int, int], None] = _shared('image_size')
    compat: Optional[str] = _shared('compat')
    weights: Optional[str] = _shared('weights')
    data_path: str = _shared('data_path')
    num_workers: int = _shared('num_workers', factory=default_num_workers)
    batch_size: Optional[int] = _shared('batch_size', default=None)  # None: the recipe's

    # -- the recipe and the network
    recipe: str = _opt('default', 'training recipe: default (batch 12, 500 epochs of the training set, global '
                       'gradient clipping, crowd boxes ignored, the better of the raw and EMA weights with '
                       're-estimated BN statistics validated) or official (what google/automl does: batch 64, 300 '
                       'epochs of 120,000 images, cross-GPU BatchNorm on every multi-GPU run, per-tensor then '
                       'global clipping with the weight decay inside, crowd boxes dropped, the EMA weights with '
                       'their averaged BN statistics validated and saved); options given explicitly win',
                       choices=('default', 'official'))
    backbone: Optional[str] = _opt(None, "feature extractor: efficientnet (the variant's EfficientNet-B / -Lite, the "
                                   'default) or timm:NAME (a timm features_only model such as timm:resnet18, random '
                                   'initialisation; needs pip install timm); saved weights remember it',
                                   metavar='SPEC')
    backbone_weights: Optional[str] = _opt(None, 'ImageNet weights for the backbone only: for EfficientNet a timm '
                                           'tf_efficientnet_bN state_dict (.pth) or the official efficientnet-bN '
                                           'variables (.npz, or a TF checkpoint folder with TensorFlow installed); for '
                                           'timm:NAME a state_dict of that timm model (.pth or .safetensors)',
                                           metavar='FILE')
    drop_connect: Optional[float] = _opt(None, 'stochastic depth of the backbone blocks (official 1 - '
                                         "survival_prob; default: the variant's: 0 for D0, 0.2 for the others)",
                                         type=float, metavar='RATE')

    # -- optimisation
    accumulate: int = _opt(1, 'micro-batches per optimizer step (gradient accumulation): each process holds '
                           'batch_size / (processes x N) images at a time; the loss is normalised over the '
                           'positives of the whole step, so the gradients are those of one big batch',
                           type=int, metavar='N')
    lr: Optional[float] = _opt(None, 'peak learning rate (default: official 0.08 x batch/64 for sgd, 1e-3 for adamw)',
                               type=float)
    optim: str = _opt('sgd', 'optimizer: sgd (official: momentum, L2 weight decay) or adamw',
                      choices=('sgd', 'adamw'))
    momentum: float = _opt(0.9, 'SGD momentum', type=float)
    weight_decay: Optional[float] = _opt(None, 'default 4e-5 (sgd, official) / 1e-2 (adamw)', type=float)
    warmup_epochs: float = _opt(1.0, 'linear LR warm-up length in epochs (official 1.0)', type=float)
    clip_grad: float = _opt(10.0, 'gradient clipping norm (0: off); --recipe official clips each gradient '
                            'tensor to it, then the global norm', type=float)
    label_smoothing: float = _opt(0.0, 'label smoothing of the focal loss targets', type=float)
    amp: bool = _opt(False, 'mixed precision (CUDA only)', action='store_true')
    sync_bn: bool = _opt(False, 'SyncBatchNorm across GPUs (default: when the per-GPU batch is 4 or less; '
                         '--recipe official: on every multi-GPU run)', action='store_true')
    grad_checkpoint: bool = _opt(False, 'activation checkpointing of the backbone blocks and BiFPN cells: much less '
                                 'memory, about one extra forward pass of them per step, same gradients',
                                 action='store_true')
    channels_last: Optional[bool] = _opt(None, 'channels-last memory format (default: on for CPU training, where it '
                                         'makes the depthwise-convolution backward several times faster; off on '
                                         'GPUs)', action=argparse.BooleanOptionalAction)

    # -- what trains
    head_only: bool = _opt(False, 'train only the box/class heads (== --freeze "(backbone_net|bifpn)\\.")', **_BOOL_WORD)
    freeze: Optional[str] = _opt(None, 'freeze the parameters whose names match REGEX from their start, like the '
                                 'official var_freeze_expr (e.g. backbone_net, or '
                                 '"backbone_net\\.model\\._(conv_stem|bn0|blocks\\.[0-4]\\.)"); modules left without '
                                 'a trainable parameter run in eval mode', metavar='REGEX')
    freeze_bn: bool = _opt(False, 'every BatchNorm layer in eval mode: running statistics frozen (their affine '
                           'parameters still train unless --freeze covers them)', action='store_true')

    # -- length of the run
    num_epochs: Optional[int] = _opt(None, 'epochs to train (default: 500; --recipe official: 300)', type=int)
    examples_per_epoch: Optional[int] = _opt(None, 'images per epoch, drawn from shuffled passes over the '
                                             'training set (default: the training set once; --recipe official: '
                                             '120000)', type=int, metavar='N')
    max_steps: Optional[int] = _opt(None, 'stop after this many optimizer steps in total (at least 1)', type=int)
    subset: Optional[float] = _opt(None, 'use this fraction of the train and val images (quick experiments)',
                                   type=float, metavar='FRACTION')
    seed: int = _opt(42, 'random seed (data order, augmentation, initialisation)', type=int)

    # -- data
    scale_range: Optional[Tuple[float, float]] = _opt(None, "training scale jitter: random resize factor range "
                                                      "(default: the project's scale_range, else the official 0.1 "
                                                      '2.0; 1 1 turns it off)', type=float, nargs=2,
                                                      metavar=('MIN', 'MAX'))

    # -- weights averaging and BN statistics
    ema: bool = _opt(True, 'keep an EMA of the weights (decay --ema_decay); raw and EMA weights are both validated',
                     action=argparse.BooleanOptionalAction)
    ema_decay: float = _opt(0.9998, "decay of the weights' EMA (per optimizer step)", type=float)
    bn_images: Optional[int] = _opt(None, 'training images over which the BN statistics of validated and saved '
                                    'weights are re-estimated, so that they match those weights (0: keep the '
                                    'running statistics; default: 256; --recipe official: 0, the EMA\'s averaged '
                                    'statistics)', type=int)
    bn_compare: bool = _opt(False, 'also validate the raw and EMA weights with their running BN statistics '
                            '(measurement)', action='store_true')

    # -- validation, checkpoints, logs
    val_interval: int = _opt(1, 'epochs between validations', type=int)
    no_map: bool = _opt(False, 'validate with the loss only (no COCO mAP)', action='store_true')
    es_metric: Optional[str] = _opt(None, 'what best.pth and early stopping follow (default: map, or loss with '
                                    '--no_map)', choices=('map', 'loss'))
    es_min_delta: float = _opt(0.0, 'early stopping: minimum improvement', type=float)
    es_patience: int = _opt(0, 'early stopping: validations without improvement before stopping (0: off)', type=int)
    save_interval: int = _opt(500, 'optimizer steps between checkpoints (0: off)', type=int)
    saved_path: str = _opt('logs/', 'checkpoints (best.pth, the periodic .pth files, last.ckpt) go to '
                           '{saved_path}/{project_name}/')
    log_path: str = _opt('logs/', 'TensorBoard logs and --debug images go to {log_path}/{project_name}/')
    debug: bool = _opt(False, 'write validation images with predicted and true boxes to {log_path}/{project}/debug',
                       **_BOOL_WORD)

    def replace(self, **changes: Any) -> 'TrainConfig':
        """A copy with ``changes`` (e.g. ``cfg.replace(weights='last')`` to resume)."""
        return dataclasses.replace(self, **changes)


def option_fields() -> Dict[str, dataclasses.Field]:
    """TrainConfig's fields by name (all of them are options of train.py)."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


#: The shared option groups of :mod:`efficientdet.cli` that ``train.py`` takes, with the fields they add.
SHARED_GROUPS = ((add_project_args, ('project', 'projects_dir')),
                 (add_model_args, ('compound_coef', 'image_size', 'compat')),
                 (add_weights_arg, ('weights',)),
                 (add_data_args, ('data_path', 'num_workers', 'batch_size')))


def build_parser(prog: str = 'train.py', description: Optional[str] = None) -> ScriptParser:
    """``train.py``'s parser: the shared options of :mod:`efficientdet.cli`, then one option per
    other :class:`TrainConfig` field (``--NAME``, help and argparse keywords from its metadata,
    default from the field)."""
    p = ScriptParser(prog=prog, description=description or
                     'EfficientDet training (Yet-Another-EfficientDet-Pytorch compatible options)')
    fields = option_fields()
    for group, names in SHARED_GROUPS:
        if group is add_data_args:
            group(p, batch_size=_default(fields['batch_size']), num_workers=_default(fields['num_workers']))
        else:
            group(p)
    for name, f in fields.items():
        if f.metadata.get('shared'):
            continue
        kw = dict(f.metadata['argparse'])
        p.add_argument(f'--{name}', dest=name, default=_default(f), help=f.metadata['help'], **kw)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``train.py`` options."""
    values = vars(args)
    cfg = TrainConfig(**{name: values[name] for name in option_fields()})
    if cfg.scale_range is not None:
        cfg.scale_range = tuple(cfg.scale_range)
    return cfg


# ----------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """What a recipe decides. Fields set to None in a :class:`TrainConfig` take the recipe's value;
    the others are behaviours only a recipe chooses."""
    name: str
    batch_size: int
    num_epochs: int
    examples_per_epoch: Optional[int]   # None: the training set once per epoch
    bn_images: int                      # 0: validate / save weights with the BN statistics they carry
    sync_bn_always: bool                # SyncBatchNorm on every multi-GPU run (else --sync_bn or <= 4 per GPU)
    clip_per_tensor: bool               # clip each gradient tensor to --clip_grad, then the global norm
    decay_in_grad: bool                 # SGD's L2 term added to the gradient before clipping
    drop_crowd: bool                    # crowd boxes removed from the training targets (else: ignored regions)
    validate: Tuple[str, ...]           # candidates validated: ('raw', 'ema') keeps the better; ('ema',)


RECIPES: Dict[str, Recipe] = {
    # this project's defaults (Yet-Another-EfficientDet-Pytorch's batch and epochs; the official LR
    # schedule, optimizer and loss)
    'default': Recipe('default', batch_size=12, num_epochs=500, examples_per_epoch=None, bn_images=256,
                      sync_bn_always=False, clip_per_tensor=False, decay_in_grad=False, drop_crowd=False,
                      validate=('raw', 'ema')),
    # google/automl at 6a54c87 (facts read from the official trainer, not its code):
    'official': Recipe(
        'official',
        batch_size=64,             # tf2/train.py:80 batch_size 64 (main.py:74 train_batch_size 64)
        num_epochs=300,            # hparams_config.py:221 num_epochs = 300
        examples_per_epoch=120000,  # tf2/train.py:100 num_examples_per_epoch 120000; :215 steps = that // batch
        bn_images=0,               # det_model_fn.py:374-376 + utils.py:78-87: the EMA covers BN moving_mean /
                                   # moving_variance; det_model_fn.py:549-554 evaluates the EMA variables
        sync_bn_always=True,       # utils.py:260-264 batch_norm_class: cross-replica BN whenever training on
                                   # 'tpu' or 'gpus' (several devices)
        clip_per_tensor=True,      # hparams_config.py:220 clip_gradients_norm 10; tf2/train_lib.py:675-681 and
                                   # det_model_fn.py:402-408: tf.clip_by_norm per tensor, then clip_by_global_norm
        decay_in_grad=True,        # tf2/train_lib.py:653-655 (det_model_fn.py:359-360): reg_l2_loss = 4e-5
                                   # (hparams_config.py:242) x sum of l2_loss of '.*(kernel|weight):0$' added to
                                   # the loss whose gradients are clipped
        drop_crowd=True,           # hparams_config.py:197 skip_crowd_during_training = True; dataloader.py:303-306
                                   # removes the crowd boxes of training images
        validate=('ema',),         # hparams_config.py:279 moving_average_decay 0.9998; det_model_fn.py:549-554
    ),
}


def resolve_recipe(cfg: TrainConfig) -> Tuple[Recipe, TrainConfig]:
    """The recipe of ``cfg`` and a copy of ``cfg`` whose recipe-dependent fields left at None
    (``batch_size``, ``num_epochs``, ``examples_per_epoch``, ``bn_images``) hold the recipe's values."""
    recipe = RECIPES.get(cfg.recipe)
    if recipe is None:
        raise UserError(f'--recipe {cfg.recipe!r}: choose one of {", ".join(RECIPES)}')
    changes = {k: getattr(recipe, k) for k in ('batch_size', 'num_epochs', 'examples_per_epoch', 'bn_images')
               if getattr(cfg, k) is None}
    return recipe, dataclasses.replace(cfg, **changes)

