"""Train EfficientDet (D0–D7x, Lite0–Lite4) on a COCO-format dataset (Yet-Another-EfficientDet-Pytorch's CLI).

    python train.py -p shape -c 0 --image_size 256 --batch_size 8 --num_epochs 30
    python train.py -p coco -c 2 --batch_size 32 -w weights/efficientdet-d2.pth   # fine-tune
    python train.py -p coco -c 2 -w last                                           # resume exactly
    python train.py -p coco -c 4 --batch_size 64 --accumulate 8 --grad_checkpoint  # big model, small memory
    python train.py -p mine -c 3 --backbone_weights tf_efficientnet_b3.pth         # from an ImageNet backbone
    torchrun --nproc_per_node 4 train.py -p coco -c 3 --batch_size 64              # 4 GPUs (DDP)

Checkpoints go to {saved_path}/{project_name}/: best.pth (the better of the raw and the EMA
weights at the best validation), efficientdet-{variant}_{epoch}_{step}.pth (EMA weights when --ema
is on), all plain state_dicts with BN statistics re-estimated for those weights, and last.ckpt (the
whole training state, for -w last). Ctrl+C or SIGTERM: the current step finishes, last.ckpt is
written, the run exits with status 130 / 143. The loop and its behaviours (hooks) live in
efficientdet/training; docs/training.md says how to add one.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from efficientdet.ckpt.files import safe_load
from efficientdet.cli import (ScriptParser, add_data_args, add_model_args, add_project_args, add_weights_arg,
                              image_size_arg, project_name, resolve_weights, str2bool, variant_of)
from efficientdet.config import resolve_normalization, variant_tag
from efficientdet.errors import UserError, run_cli
from efficientdet.factory import build_model, resolve_image_size, resolve_variant
from efficientdet.loss import DetectionLoss
from efficientdet.project import check_scale_range, load_project
from efficientdet.training import (BestCheckpointHook, CheckpointHook, DataOrderHook, EarlyStoppingHook, EpochSampler,
                                   ModelEMA, ProgressHook, SignalHook, TensorBoardHook, Trainer, ValidationHook,
                                   build_optimizer, build_scheduler, freeze_for_head_only, freeze_parameters,
                                   set_train_mode, trainable_bn_names)
from efficientdet.training.debug import DebugImagesHook
from efficientdet.training.validation import BNCalibrator, evaluate, evaluate_candidates


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ScriptParser(prog='train.py',
                     description='EfficientDet training (Yet-Another-EfficientDet-Pytorch compatible options)')
    add_project_args(p)
    add_model_args(p)
    add_weights_arg(p)
    add_data_args(p, batch_size=12, num_workers=min(12, os.cpu_count() or 1))
    p.add_argument('--accumulate', type=int, default=1, metavar='N',
                   help='micro-batches per optimizer step (gradient accumulation): each process holds '
                        'batch_size / (processes x N) images at a time; the loss is normalised over the '
                        'positives of the whole step, so the gradients are those of one big batch')
    p.add_argument('--grad_checkpoint', action='store_true',
                   help='activation checkpointing of the backbone blocks and BiFPN cells: much less memory, '
                        'about one extra forward pass of them per step, same gradients')
    p.add_argument('--head_only', type=str2bool, nargs='?', const=True, default=False,
                   help='train only the box/class heads (== --freeze "(backbone_net|bifpn)\\.")')
    p.add_argument('--freeze', type=str, default=None, metavar='REGEX',
                   help='freeze the parameters whose names match REGEX from their start, like the official '
                        'var_freeze_expr (e.g. backbone_net, or "backbone_net\\.model\\._(conv_stem|bn0|blocks\\.[0-4]\\.)"); '
                        'modules left without a trainable parameter run in eval mode')
    p.add_argument('--freeze_bn', action='store_true',
                   help='every BatchNorm layer in eval mode: running statistics frozen (their affine '
                        'parameters still train unless --freeze covers them)')
    p.add_argument('--backbone_weights', type=str, default=None, metavar='FILE',
                   help='an ImageNet EfficientNet checkpoint for the backbone only: a timm tf_efficientnet_bN '
                        'state_dict (.pth) or the official efficientnet-bN variables (.npz, or a TF checkpoint '
                        'folder with TensorFlow installed)')
    p.add_argument('--lr', type=float, default=None,
                   help='peak learning rate (default: official 0.08 x batch/64 for sgd, 1e-3 for adamw)')
    p.add_argument('--optim', type=str, default='sgd', choices=['sgd', 'adamw'],
                   help='optimizer: sgd (official: momentum, L2 weight decay) or adamw')
    p.add_argument('--num_epochs', type=int, default=500, help='epochs to train')
    p.add_argument('--val_interval', type=int, default=1, help='epochs between validations')
    p.add_argument('--save_interval', type=int, default=500, help='optimizer steps between checkpoints (0: off)')
    p.add_argument('--es_min_delta', type=float, default=0.0, help='early stopping: minimum improvement')
    p.add_argument('--es_patience', type=int, default=0,
                   help='early stopping: validations without improvement before stopping (0: off)')
    p.add_argument('--es_metric', choices=['map', 'loss'], default=None,
                   help='what best.pth and early stopping follow (default: map, or loss with --no_map)')
    p.add_argument('--log_path', type=str, default='logs/',
                   help='TensorBoard logs and --debug images go to {log_path}/{project_name}/')
    p.add_argument('--saved_path', type=str, default='logs/',
                   help='checkpoints (best.pth, the periodic .pth files, last.ckpt) go to {saved_path}/{project_name}/')
    p.add_argument('--debug', type=str2bool, nargs='?', const=True, default=False,
                   help='write validation images with predicted and true boxes to {log_path}/{project}/debug')
    # additions
    p.add_argument('--amp', action='store_true', help='mixed precision (CUDA only)')
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=True,
                   help='keep an EMA of the weights (decay --ema_decay); raw and EMA weights are both validated')
    p.add_argument('--ema_decay', type=float, default=0.9998, help='decay of the weights\' EMA (per optimizer step)')
    p.add_argument('--bn_images', type=int, default=256,
                   help='training images over which the BN statistics of validated and saved weights are '
                        're-estimated, so that they match those weights (0: keep the running statistics)')
    p.add_argument('--bn_compare', action='store_true',
                   help='also validate the raw and EMA weights with their running BN statistics (measurement)')
    p.add_argument('--subset', type=float, default=None, metavar='FRACTION',
                   help='use this fraction of the train and val images (quick experiments)')
    p.add_argument('--seed', type=int, default=42, help='random seed (data order, augmentation, initialisation)')
    p.add_argument('--max_steps', type=int, default=None, help='stop after this many optimizer steps in total')
    p.add_argument('--warmup_epochs', type=float, default=1.0, help='linear LR warm-up length (official 1.0)')
    p.add_argument('--scale_range', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                   help='training scale jitter: random resize factor range (default: the project\'s '
                        'scale_range, else the official 0.1 2.0; 1 1 turns it off)')
    p.add_argument('--drop_connect', type=float, default=None, metavar='RATE',
                   help='stochastic depth of the backbone blocks (official 1 - survival_prob; default: the '
                        'variant\'s: 0 for D0, 0.2 for the others)')
    p.add_argument('--label_smoothing', type=float, default=0.0, help='label smoothing of the focal loss targets')
    p.add_argument('--weight_decay', type=float, default=None, help='default 4e-5 (sgd, official) / 1e-2 (adamw)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--clip_grad', type=float, default=10.0, help='gradient clipping global norm (0: off)')
    p.add_argument('--sync_bn', action='store_true',
                   help='SyncBatchNorm across GPUs (automatic when the per-GPU batch is 4 or less)')
    p.add_argument('--no_map', action='store_true', help='validate with the loss only (no COCO mAP)')
    p.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels-last memory format (default: on for CPU training, where it makes the '
                        'depthwise-convolution backward several times faster; off on GPUs)')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- setup helpers
def setup_distributed() -> Tuple[int, int, int, torch.device]:
    """(rank, world, local_rank, device) from torchrun's environment; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        dev = torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')
        return 0, 1, 0, dev
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device('cuda', local_rank), 'nccl'
    else:
        device, backend = torch.device('cpu'), 'gloo'
    if not dist.is_initialized():
        # long timeout: the other processes wait while rank 0 validates
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return rank, world, local_rank, device


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def subset_indices(n: int, fraction: Optional[float], seed: int) -> Optional[List[int]]:
    """A seeded random ``fraction`` of range(n) (sorted), or None for everything."""
    if fraction is None:
        return None
    if not 0 < fraction <= 1:
        raise UserError(f'--subset must be a fraction in (0, 1], got {fraction}')
    k = max(1, int(math.ceil(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def collate(batch):
    from efficientdet.data import collate_fn
    return collate_fn(batch)


def build_data(args, project, image_size: Tuple[int, int], rank: int, world: int, local_bs: int):
    """Train/val datasets and loaders; ``local_bs`` images per loader batch (one micro-batch)."""
    from efficientdet.data import build_dataset
    from efficientdet.data.dataset import seed_worker
    mean, std = resolve_normalization(variant_of(args), project.mean, project.std)
    scale_range = (check_scale_range(args.scale_range, '--scale_range') if args.scale_range is not None
                   else project.scale_range)
    train_ds = build_dataset(project, project.train_set, image_size, args.data_path, augment=True, mean=mean, std=std,
                             scale_range=scale_range)
    val_ds = build_dataset(project, project.val_set, image_size, args.data_path, augment=False, mean=mean, std=std)
    idx = subset_indices(len(train_ds), args.subset, args.seed)
    train_items = Subset(train_ds, idx) if idx is not None else train_ds
    val_count = len(val_ds) if args.subset is None else max(1, int(math.ceil(len(val_ds) * args.subset)))
    sampler = EpochSampler(len(train_items), shuffle=True, seed=args.seed, rank=rank, world=world)
    if sampler.per_rank() < local_bs:
        raise UserError(f'the training set has {len(train_items)} images, fewer than one batch of {local_bs} '
                        f'per process; lower --batch_size')
    loader_kw = dict(num_workers=args.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                     worker_init_fn=seed_worker if args.num_workers > 0 else None)
    # own generator: creating an iterator then draws its worker base seed from it, not from the global
    # RNG (whose state a resumed run restores exactly)
    train_loader = DataLoader(train_items, batch_size=local_bs, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed), **loader_kw)
    val_loader = DataLoader(Subset(val_ds, range(val_count)), batch_size=local_bs, shuffle=False,
                            drop_last=False, **loader_kw)
    return train_ds, val_ds, train_loader, val_loader, val_count


def to_plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [to_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


# ----------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    args = get_args(argv)
    rank, world, local_rank, device = setup_distributed()
    try:
        return train(args, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    """Build everything from ``args``, run the trainer; returns the exit status (0, or 128 + signal)."""
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    project = load_project(project_name(args), args.projects_dir)
    if project.num_gpus == 0 and device.type == 'cuda' and world == 1:
        device = torch.device('cpu')
    variant = resolve_variant(variant_of(args))
    args.compound_coef = variant
    tag = variant_tag(variant)
    image_size = resolve_image_size(variant, image_size_arg(args.image_size))
    if args.accumulate < 1:
        raise UserError(f'--accumulate must be at least 1, got {args.accumulate}')
    per_step = world * args.accumulate
    if args.batch_size < per_step or args.batch_size % per_step:
        raise UserError(f'--batch_size {args.batch_size} must be a multiple of {per_step} (= {world} processes x '
                        f'--accumulate {args.accumulate})')
    local_bs = args.batch_size // per_step  # images per process per micro-batch
    if args.num_epochs < 1:
        raise UserError(f'--num_epochs must be at least 1, got {args.num_epochs}')
    if args.amp and device.type != 'cuda':
        log('[note] --amp needs CUDA; training in float32')
    es_metric = args.es_metric or ('loss' if args.no_map else 'map')
    if es_metric == 'map' and args.no_map:
        raise UserError('--es_metric map needs the COCO evaluation; drop --no_map')
    if args.backbone_weights and args.weights:
        raise UserError('--backbone_weights and -w both give initial weights; pass one of them')
    seed_everything(args.seed + rank)

    train_ds, val_ds, train_loader, val_loader, val_count = build_data(args, project, image_size, rank, world,
                                                                       local_bs)
    images_per_step = local_bs * args.accumulate  # per process
    steps_per_epoch = len(train_loader.sampler) // images_per_step
    if steps_per_epoch < 1:
        raise UserError(f'the training set has {len(train_loader.sampler) * world} images, fewer than one step of '
                        f'{args.batch_size}; lower --batch_size')
    log(train_ds.summary())
    log(val_ds.summary())

    save_dir = os.path.join(args.saved_path, project.project_name)
    resume_path, finetune_from = None, None
    if args.weights:
        if args.weights == 'last':
            resume_path = os.path.join(save_dir, 'last.ckpt')
            if not os.path.isfile(resume_path):
                raise UserError(f'-w last: {resume_path} does not exist; train once without -w (or with -w '
                                'FILE.pth) first, or check --saved_path and -p')
        elif args.weights.endswith('.ckpt'):
            resume_path = args.weights
        else:
            finetune_from = resolve_weights(args)
    model = build_model(variant, project=project, weights=finetune_from, image_size=image_size,
                        compat=args.compat, finetune=True, verbose=is_main)
    if args.backbone_weights:
        from efficientdet.convert.backbone import load_backbone_weights
        log(load_backbone_weights(model, args.backbone_weights))
    if args.drop_connect is not None:
        try:
            model.backbone_net.model.set_drop_connect_rate(args.drop_connect)
        except ValueError as e:
            raise UserError(f'--drop_connect: {e} (the official 1 - survival_prob)') from None
    frozen: List[str] = []
    if args.head_only:
        freeze_for_head_only(model)
        log('[info] --head_only: backbone_net, bifpn frozen')
    if args.freeze:
        frozen = freeze_parameters(model, args.freeze)
        log(f'[info] --freeze {args.freeze!r}: {len(frozen)} parameter tensors frozen')
    model.to(device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == 'cpu'
    if channels_last:
        model.to(memory_format=torch.channels_last)
    set_train_mode(model, args.head_only, args.freeze_bn)
    bn_names = trainable_bn_names(model)
    ema = ModelEMA(model, decay=args.ema_decay) if args.ema else None
    scratch = copy.deepcopy(model).eval() if is_main else None  # plain BN: validation and saved weights
    if args.grad_checkpoint:
        from efficientdet.training.memory import enable_grad_checkpoint
        log(f'[info] --grad_checkpoint: {enable_grad_checkpoint(model)} modules recompute their activations')
    use_sync_bn = world > 1 and device.type == 'cuda' and (args.sync_bn or local_bs <= 4)
    if args.sync_bn and device.type != 'cuda':
        log('[note] --sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); plain BatchNorm used')
    if use_sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log(f'[info] SyncBatchNorm over {world} GPUs ({local_bs} images each)')

    lr = args.lr if args.lr is not None else (0.08 * args.batch_size / 64 if args.optim == 'sgd' else 1e-3)
    wd = args.weight_decay if args.weight_decay is not None else (4e-5 if args.optim == 'sgd' else 1e-2)
    optimizer = build_optimizer(model, args.optim, lr, args.momentum, wd)
    total_steps = args.num_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total_steps, int(round(args.warmup_epochs * steps_per_epoch)))
    criterion = DetectionLoss(label_smoothing=args.label_smoothing, distributed=world > 1)
    val_criterion = DetectionLoss(label_smoothing=args.label_smoothing)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    # BN statistics for validated / saved weights: a fixed, seeded set of training images
    calibrator = None
    if is_main:
        bn_loader = None
        if args.bn_images > 0:
            order = torch.randperm(len(train_loader.dataset), generator=torch.Generator().manual_seed(args.seed))
            count = min(len(order), max(local_bs, math.ceil(args.bn_images / local_bs) * local_bs))
            bn_loader = DataLoader(Subset(train_loader.dataset, order[:count].tolist()), batch_size=local_bs,
                                   num_workers=args.num_workers, collate_fn=collate, drop_last=False,
                                   generator=torch.Generator().manual_seed(args.seed))

        def bn_batches():
            for b in bn_loader:
                x = b['img'].to(device)
                yield x.contiguous(memory_format=torch.channels_last) if channels_last else x
        calibrator = BNCalibrator(scratch, bn_batches if bn_loader is not None else None, bn_names)

    def candidates() -> Dict[str, Dict[str, Any]]:
        sds = {'raw': trainer.model.state_dict()}
        if trainer.ema is not None:
            sds['ema'] = trainer.ema.module.state_dict()

        def ev(m):
            return evaluate(m, val_criterion, val_loader, val_ds, device, local_bs, val_count, not args.no_map,
                            args.num_workers, lambda: signals.requested is not None)
        return evaluate_candidates(sds, calibrator, ev, compare_running=args.bn_compare)

    def weights_to_save() -> Dict[str, torch.Tensor]:
        src = trainer.ema.module if trainer.ema is not None else trainer.model
        return calibrator.state_dict_of(src.state_dict())

    meta = {'compound_coef': variant, 'variant': tag, 'num_classes': len(project.obj_list),
            'image_size': list(image_size), 'project': project.project_name, 'obj_list': list(project.obj_list),
            'args': {k: to_plain(v) for k, v in vars(args).items()}}
    signals = SignalHook(log=log)
    tb_dir = os.path.join(args.log_path, project.project_name, 'tensorboard',
                          datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
    # order matters where hooks act on the same event: the signal hook after validation (a Ctrl+C
    # during validation stops the run there), the checkpoint hook last (it saves every hook's state)
    hooks = [
        DataOrderHook(train_loader, args.seed, rank, images_per_step),
        ProgressHook(steps_per_epoch, args.num_epochs, enabled=is_main, log=log, epoch_summary=train_ds.summary),
        TensorBoardHook(tb_dir, enabled=is_main),
        ValidationHook(candidates, es_metric, args.val_interval, args.num_epochs, is_main=is_main, log=log),
        BestCheckpointHook(save_dir, tag, es_metric, args.es_min_delta, is_main=is_main, log=log),
        EarlyStoppingHook(args.es_patience, es_metric, args.es_min_delta, log=log),
        signals,
        CheckpointHook(save_dir, tag, weights_to_save, args.save_interval, meta, is_main=is_main),
    ]
    if args.debug:
        mean, std = resolve_normalization(variant, project.mean, project.std)
        hooks.append(DebugImagesHook(val_loader, calibrator.scratch if is_main else None, project.obj_list, mean, std,
                                     os.path.join(args.log_path, project.project_name, 'debug'), is_main))
    trainer = Trainer(model, criterion, optimizer, scheduler, ema, device=device, amp=args.amp,
                      clip_grad_norm=args.clip_grad or None, ddp_model=ddp, head_only=args.head_only,
                      channels_last=channels_last, hooks=hooks, accumulate=args.accumulate, freeze_bn=args.freeze_bn)
    if resume_path:
        # on the CPU first: each part is moved where it belongs by the load (the RNG states stay on the CPU)
        state = safe_load(resume_path, map_location='cpu')
        trainer.load_state_dict(state, restore_rng=True, path=resume_path)
        if world > 1 and not trainer.rng_restorable(state):
            seed_everything(args.seed + rank + 1000003 * trainer.step)
            log(f'[note] {resume_path} holds no RNG state for {world} processes (saved with another process count '
                'or an older version): the random augmentation after the resume differs from an uninterrupted run')
        log(f'[info] resumed {resume_path}: epoch {trainer.epoch}, step {trainer.step}'
            + (f', {trainer.epoch_step} steps into the epoch' if trainer.epoch_step else ''))
    log(f'[info] {tag.upper()} {image_size[0]}x{image_size[1]}px, {len(project.obj_list)} classes, batch '
        f'{args.batch_size} ({world} x {args.accumulate} x {local_bs}), {steps_per_epoch} steps/epoch, {args.optim} '
        f'lr {lr:g}, device {device}{", EMA" if ema else ""}{", AMP" if trainer.amp else ""}; checkpoints in {save_dir}',
        flush=True)

    reason = trainer.fit(train_loader, args.num_epochs, steps_per_epoch, max_steps=args.max_steps)
    if reason == 'signal':
        log(f'[info] stopped at step {trainer.step}; {os.path.join(save_dir, "last.ckpt")} saved — '
            f'continue with: python train.py -p {project_name(args)} -c {args.compound_coef} -w last ...')
        return signals.exit_code
    best = trainer.hook('best')
    log(f'[info] done: step {trainer.step}, checkpoints in {save_dir}'
        + (f'; best.pth = {best.source} weights of epoch {best.epoch}' if best is not None and best.source else ''))
    return 0


if __name__ == '__main__':
    run_cli(main)
