"""Train EfficientDet D0–D7x on a COCO-format dataset (Yet-Another-EfficientDet-Pytorch's CLI).

    python train.py -p shape -c 0 --image_size 256 --batch_size 8 --num_epochs 30
    python train.py -p coco -c 2 --batch_size 32 -w weights/efficientdet-d2.pth   # fine-tune
    python train.py -p coco -c 2 -w last                                           # resume exactly
    torchrun --nproc_per_node 4 train.py -p coco -c 3 --batch_size 64              # 4 GPUs (DDP)

Checkpoints go to {saved_path}/{project_name}/: efficientdet-d{c}_{epoch}_{step}.pth and best.pth
(plain state_dicts, EMA weights when --ema is on) and last.ckpt (the whole training state, for
-w last). Ctrl+C or SIGTERM: the current step finishes, last.ckpt is written, the run exits.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from efficientdet.checkpoint import atomic_save, safe_load
from efficientdet.config import check_image_size, get_config
from efficientdet.engine import (EpochSampler, ModelEMA, Trainer, build_optimizer, build_scheduler,
                                 freeze_for_head_only, rng_state, set_rng_state, set_train_mode)
from efficientdet.cli import str2bool
from efficientdet.errors import UserError, run_cli
from efficientdet.loss import DetectionLoss
from efficientdet.model import EfficientDetBackbone
from efficientdet.project import load_project



def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser('EfficientDet training (Yet-Another-EfficientDet-Pytorch compatible options)')
    p.add_argument('-p', '--project', type=str, default='coco', help='project file projects/NAME.yml')
    p.add_argument('-c', '--compound_coef', type=int, default=0, help='EfficientDet D0-D7 (8 = D7x)')
    p.add_argument('-n', '--num_workers', type=int, default=min(12, os.cpu_count() or 1),
                   help='data-loader worker processes (per process)')
    p.add_argument('--batch_size', type=int, default=12, help='images per step over all processes/GPUs')
    p.add_argument('--head_only', type=str2bool, nargs='?', const=True, default=False,
                   help='train only the box/class heads (backbone and BiFPN frozen, their BN in eval mode)')
    p.add_argument('--lr', type=float, default=None,
                   help='peak learning rate (default: official 0.08 x batch/64 for sgd, 1e-3 for adamw)')
    p.add_argument('--optim', type=str, default='sgd', choices=['sgd', 'adamw'])
    p.add_argument('--num_epochs', type=int, default=500)
    p.add_argument('--val_interval', type=int, default=1, help='epochs between validations')
    p.add_argument('--save_interval', type=int, default=500, help='steps between checkpoints')
    p.add_argument('--es_min_delta', type=float, default=0.0, help='early stopping: minimum improvement')
    p.add_argument('--es_patience', type=int, default=0,
                   help='early stopping: validations without improvement before stopping (0: off)')
    p.add_argument('--es_metric', choices=['map', 'loss'], default=None,
                   help='what best.pth and early stopping follow (default: map, or loss with --no_map)')
    p.add_argument('--data_path', type=str, default='datasets/', help='folder holding {project_name}/')
    p.add_argument('--log_path', type=str, default='logs/')
    p.add_argument('-w', '--load_weights', type=str, default=None,
                   help="weights to fine-tune from (.pth/.npz), or 'last' (or a .ckpt) to resume exactly")
    p.add_argument('--saved_path', type=str, default='logs/')
    p.add_argument('--debug', type=str2bool, nargs='?', const=True, default=False,
                   help='write validation images with predicted and true boxes to {log_path}/{project}/debug')
    # additions
    p.add_argument('--amp', action='store_true', help='mixed precision (CUDA only)')
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=True,
                   help='keep an EMA of the weights (decay --ema_decay), validated and saved')
    p.add_argument('--ema_decay', type=float, default=0.9998)
    p.add_argument('--image_size', type=int, default=None, help='input size (default: the variant\'s, 512 for D0)')
    p.add_argument('--subset', type=float, default=None, metavar='FRACTION',
                   help='use this fraction of the train and val images (quick experiments)')
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--projects_dir', type=str, default='projects')
    p.add_argument('--max_steps', type=int, default=None, help='stop after this many steps in total')
    p.add_argument('--warmup_epochs', type=float, default=1.0, help='linear LR warm-up length (official 1.0)')
    p.add_argument('--label_smoothing', type=float, default=0.0)
    p.add_argument('--weight_decay', type=float, default=None, help='default 4e-5 (sgd, official) / 1e-2 (adamw)')
    p.add_argument('--momentum', type=float, default=0.9)
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


def build_data(args, project, image_size: int, rank: int, world: int, local_bs: int):
    from efficientdet.data import CocoDataset
    from efficientdet.data.dataset import seed_worker
    root = os.path.join(args.data_path, project.project_name)
    train_ds = CocoDataset(root, project.train_set, project.obj_list, image_size, project.mean, project.std,
                           augment=True)
    val_ds = CocoDataset(root, project.val_set, project.obj_list, image_size, project.mean, project.std,
                         augment=False)
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


class StopFlag:
    """SIGINT/SIGTERM → finish the step, save last.ckpt, exit. A second Ctrl+C aborts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f'\n[{name}] stopping after this step and saving last.ckpt (Ctrl+C again aborts without saving)',
              file=sys.stderr, flush=True)


def to_plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model, criterion, loader, device, stop: StopFlag) -> Dict[str, float]:
    """Mean val losses of ``model`` (eval mode) over ``loader``."""
    was = model.training
    model.eval()
    sums = np.zeros(3)
    n = 0
    try:
        for batch in loader:
            if stop.requested:
                break
            imgs = batch['img'].to(device)
            _, reg, cls, anchors = model(imgs, return_logits=True)
            out = criterion(cls, reg, anchors, batch['annot'].to(device))
            vals = np.array([float(out['loss']), float(out['cls_loss']), float(out['box_loss'])])
            if np.all(np.isfinite(vals)):
                sums += vals
                n += 1
    finally:
        model.train(was)
    if n == 0:
        return {'loss': float('nan'), 'cls_loss': float('nan'), 'box_loss': float('nan')}
    m = sums / n
    return {'loss': float(m[0]), 'cls_loss': float(m[1]), 'box_loss': float(m[2])}


@torch.no_grad()
def write_debug_images(model, loader, device, obj_list, mean, std, folder: str, tag: str, limit: int = 4) -> None:
    """Validation images with predictions (score > 0.3) and ground truth (white) as JPEGs."""
    import cv2
    from efficientdet.postprocess import detect
    from efficientdet.visualize import draw_detections
    os.makedirs(folder, exist_ok=True)
    batch = next(iter(loader))
    imgs = batch['img'][:limit].to(device)
    was = model.training
    model.eval()
    try:
        _, reg, cls, anchors = model(imgs)
    finally:
        model.train(was)
    dets = detect(cls.float(), reg.float(), anchors.float(), image_size=tuple(imgs.shape[-2:]), score_threshold=0.3)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for i, d in enumerate(dets):
        rgb = ((batch['img'][i] * s + m).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        for x1, y1, x2, y2, c in batch['annot'][i].tolist():
            if c >= 0:
                cv2.rectangle(bgr, (int(x1), int(y1)), (int(x2), int(y2)), (255, 255, 255), 1)
        out = draw_detections(bgr, d['boxes'].cpu().numpy(), d['scores'].cpu().numpy(), d['labels'].cpu().numpy(),
                              obj_list)
        cv2.imwrite(os.path.join(folder, f'{tag}_{i}.jpg'), out)


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
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    project = load_project(args.project, args.projects_dir)
    if project.num_gpus == 0 and device.type == 'cuda' and world == 1:
        device = torch.device('cpu')
    cfg = get_config(args.compound_coef) if 0 <= args.compound_coef <= 8 else None
    if cfg is None:
        raise UserError(f'-c/--compound_coef must be 0-8 (8 = D7x), got {args.compound_coef}')
    image_size = args.image_size or cfg.input_size
    try:
        check_image_size(image_size, image_size, args.compound_coef)
    except ValueError as e:
        raise UserError(f'--image_size: {e}') from None
    if args.batch_size < world or args.batch_size % world:
        raise UserError(f'--batch_size {args.batch_size} must be a multiple of the {world} processes')
    local_bs = args.batch_size // world
    if args.num_epochs < 1:
        raise UserError(f'--num_epochs must be at least 1, got {args.num_epochs}')
    if args.amp and device.type != 'cuda':
        log('[note] --amp needs CUDA; training in float32')
    es_metric = args.es_metric or ('loss' if args.no_map else 'map')
    if es_metric == 'map' and args.no_map:
        raise UserError('--es_metric map needs the COCO evaluation; drop --no_map')
    seed_everything(args.seed + rank)

    train_ds, val_ds, train_loader, val_loader, val_count = build_data(args, project, image_size, rank, world,
                                                                       local_bs)
    iters_per_epoch = len(train_loader.sampler) // local_bs
    log(train_ds.summary())
    log(val_ds.summary())

    model = EfficientDetBackbone(num_classes=len(project.obj_list), compound_coef=args.compound_coef,
                                 ratios=project.anchors_ratios, scales=project.anchors_scales)
    save_dir = os.path.join(args.saved_path, project.project_name)
    resume_path = None
    if args.load_weights:
        if args.load_weights == 'last':
            resume_path = os.path.join(save_dir, 'last.ckpt')
            if not os.path.isfile(resume_path):
                raise UserError(f'-w last: {resume_path} does not exist; train once without -w (or with -w '
                                'FILE.pth) first, or check --saved_path and -p')
        elif args.load_weights.endswith('.ckpt'):
            resume_path = args.load_weights
        else:
            if is_main:
                model.load_pretrained(args.load_weights, verbose=True)
            else:
                model.load_pretrained(args.load_weights, verbose=False)
    if args.head_only:
        frozen = freeze_for_head_only(model)
        log(f'[info] --head_only: {", ".join(frozen)} frozen')
    model.to(device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == 'cpu'
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEMA(model, decay=args.ema_decay) if args.ema else None
    use_sync_bn = world > 1 and device.type == 'cuda' and (args.sync_bn or local_bs <= 4)
    if args.sync_bn and device.type != 'cuda':
        log('[note] --sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); plain BatchNorm used')
    if use_sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log(f'[info] SyncBatchNorm over {world} GPUs ({local_bs} images each)')

    lr = args.lr if args.lr is not None else (0.08 * args.batch_size / 64 if args.optim == 'sgd' else 1e-3)
    wd = args.weight_decay if args.weight_decay is not None else (4e-5 if args.optim == 'sgd' else 1e-2)
    optimizer = build_optimizer(model, args.optim, lr, args.momentum, wd)
    total_steps = args.num_epochs * iters_per_epoch
    scheduler = build_scheduler(optimizer, total_steps, int(round(args.warmup_epochs * iters_per_epoch)))
    criterion = DetectionLoss(label_smoothing=args.label_smoothing, distributed=world > 1)
    val_criterion = DetectionLoss(label_smoothing=args.label_smoothing)
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    trainer = Trainer(model, criterion, optimizer, scheduler, ema, device=device, amp=args.amp,
                      clip_grad_norm=args.clip_grad or None, ddp_model=ddp, head_only=args.head_only,
                      channels_last=channels_last)
    if resume_path:
        state = safe_load(resume_path, map_location=device)
        trainer.load_state_dict(state, restore_rng=world == 1, path=resume_path)
        if world > 1:
            seed_everything(args.seed + rank + 1000003 * trainer.step)
        log(f'[info] resumed {resume_path}: epoch {trainer.epoch}, step {trainer.step}'
            + (f', {trainer.epoch_step} batches into the epoch' if trainer.epoch_step else ''))

    meta = {'compound_coef': args.compound_coef, 'num_classes': len(project.obj_list), 'image_size': image_size,
            'project': project.project_name, 'obj_list': list(project.obj_list),
            'args': {k: to_plain(v) for k, v in vars(args).items()}}

    def eval_model():
        return ema.module if ema is not None else model

    def save_weights(name: str) -> None:
        if is_main:
            atomic_save(eval_model().state_dict(), os.path.join(save_dir, name))

    def save_last() -> None:
        if is_main:
            atomic_save(trainer.state_dict(meta), os.path.join(save_dir, 'last.ckpt'))

    from tqdm import tqdm
    done = False
    stopped_by_signal = False
    stop = StopFlag()
    writer = None
    try:
        stop.install()
        if is_main:
            from tensorboardX import SummaryWriter
            tb_dir = os.path.join(args.log_path, project.project_name, 'tensorboard',
                                  datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
            writer = SummaryWriter(tb_dir)
            os.makedirs(save_dir, exist_ok=True)
            log(f'[info] D{args.compound_coef} {image_size}px, {len(project.obj_list)} classes, batch '
                f'{args.batch_size} ({world} x {local_bs}), {iters_per_epoch} steps/epoch, {args.optim} lr {lr:g}, '
                f'device {device}{", EMA" if ema else ""}{", AMP" if trainer.amp else ""}; checkpoints in {save_dir}',
                flush=True)
        while trainer.epoch < args.num_epochs and not done:
            epoch = trainer.epoch
            train_loader.sampler.set_epoch(epoch, trainer.epoch_step * local_bs)
            train_loader.generator.manual_seed(args.seed * 1000003 + rank * 10007 + epoch * 101 + trainer.epoch_step)
            set_train_mode(model, args.head_only)
            bar = tqdm(train_loader, total=iters_per_epoch, initial=trainer.epoch_step, disable=not is_main,
                       desc=f'epoch {epoch}/{args.num_epochs}', dynamic_ncols=True)
            sums, count = np.zeros(3), 0
            it = iter(bar)
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except RuntimeError:
                    if stop.requested:  # a data worker died of the same Ctrl+C
                        break
                    raise
                r = trainer.train_step(batch['img'], batch['annot'], stop_requested=stop.requested)
                if not r['skipped']:
                    sums += (r['loss'], r['cls_loss'], r['box_loss'])
                    count += 1
                    bar.set_postfix(loss=f'{r["loss"]:.4f}', cls=f'{r["cls_loss"]:.4f}', box=f'{r["box_loss"]:.5f}',
                                    lr=f'{r["lr"]:.2e}', refresh=False)
                    if writer is not None:
                        for k in ('loss', 'cls_loss', 'box_loss'):
                            writer.add_scalar(f'{k}/train', r[k], trainer.step)
                        writer.add_scalar('lr', r['lr'], trainer.step)
                        writer.add_scalar('num_pos', r['num_pos'], trainer.step)
                elif is_main:
                    bar.write(f'[warn] step {trainer.step}: non-finite loss, update skipped '
                              f'({trainer.nonfinite_in_row} in a row)')
                if r['stop']:
                    stopped_by_signal = done = True
                    break
                if args.save_interval > 0 and trainer.step % args.save_interval == 0:
                    save_weights(f'efficientdet-d{args.compound_coef}_{epoch}_{trainer.step}.pth')
                    save_last()
                if args.max_steps is not None and trainer.step >= args.max_steps:
                    done = True
                    break
            bar.close()
            if stopped_by_signal:
                break
            epoch_finished = trainer.epoch_step >= iters_per_epoch
            if epoch_finished:
                trainer.end_epoch()
            if count:
                m = sums / count
                log(f'epoch {epoch}: train loss {m[0]:.5f} (cls {m[1]:.5f}, box {m[2]:.6f}), '
                    f'lr {optimizer.param_groups[0]["lr"]:.3e}, step {trainer.step}'
                    + (f', {trainer.nonfinite_total} skipped non-finite steps' if trainer.nonfinite_total else ''))
            log(train_ds.summary())
            if epoch_finished and (epoch % max(args.val_interval, 1) == 0 or trainer.epoch >= args.num_epochs):
                improved, should_stop = run_validation(args, trainer, eval_model(), val_criterion, val_loader,
                                                       val_ds, val_count, device, stop, writer, es_metric, project,
                                                       is_main, epoch, local_bs)
                if improved:
                    save_weights('best.pth')
                    save_weights(f'efficientdet-d{args.compound_coef}_{epoch}_{trainer.step}.pth')
                if should_stop:
                    log(f'[info] early stopping at epoch {epoch}: best {es_metric} {trainer.best_metric:.5f} '
                        f'at epoch {trainer.best_epoch}')
                    done = True
                if stop.requested and world == 1:
                    stopped_by_signal = done = True
            save_last()
        if not stopped_by_signal:
            last_epoch = trainer.epoch - 1 if trainer.epoch_step == 0 and trainer.epoch > 0 else trainer.epoch
            save_weights(f'efficientdet-d{args.compound_coef}_{last_epoch}_{trainer.step}.pth')
        save_last()
        if stopped_by_signal:
            log(f'[info] stopped at step {trainer.step}; {os.path.join(save_dir, "last.ckpt")} saved — '
                f'continue with: python train.py -p {args.project} -c {args.compound_coef} -w last ...')
        else:
            log(f'[info] done: step {trainer.step}, checkpoints in {save_dir}')
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
    return 0


def run_validation(args, trainer: Trainer, model, criterion, val_loader, val_ds, val_count, device, stop, writer,
                   es_metric: str, project, is_main: bool, epoch: int, local_bs: int) -> Tuple[bool, bool]:
    """Validate on rank 0 (the others wait), RNG-neutral (resumed runs stay exact). Returns
    (improved, early_stop), agreed by every process."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    flags = torch.zeros(2)
    if is_main:
        saved_rng = rng_state()
        t0 = time.time()
        losses = validate(model, criterion, val_loader, device, stop)
        metrics: Dict[str, Any] = {}
        if not args.no_map and not stop.requested:
            from efficientdet.evaluation import run_coco_eval
            metrics, _ = run_coco_eval(model, val_ds, batch_size=local_bs, device=device, max_images=val_count,
                                       progress=False, num_workers=args.num_workers)
        if args.debug:
            write_debug_images(model, val_loader, device, project.obj_list, project.mean, project.std,
                               os.path.join(args.log_path, project.project_name, 'debug'), f'epoch{epoch}')
        set_rng_state(saved_rng)
        mAP = metrics.get('AP') if metrics else None
        msg = (f'val epoch {epoch}: loss {losses["loss"]:.5f} (cls {losses["cls_loss"]:.5f}, '
               f'box {losses["box_loss"]:.6f})')
        if mAP is not None:
            msg += f', mAP {mAP:.4f}, AP50 {metrics.get("AP50", float("nan")):.4f}'
        print(msg + f' [{time.time() - t0:.0f}s]')
        if writer is not None:
            for k, v in losses.items():
                writer.add_scalar(f'{k}/val', v, trainer.step)
            for k in ('AP', 'AP50', 'AP75'):
                if metrics.get(k) is not None:
                    writer.add_scalar(f'{k}/val', metrics[k], trainer.step)
        value = mAP if es_metric == 'map' else losses['loss']
        improved = False
        if value is not None and math.isfinite(value):
            if trainer.best_metric is None:
                improved = True
            elif es_metric == 'map':
                improved = value > trainer.best_metric + args.es_min_delta
            else:
                improved = value < trainer.best_metric - args.es_min_delta
            if improved:
                trainer.best_metric, trainer.best_epoch = float(value), epoch
        should_stop = args.es_patience > 0 and epoch - trainer.best_epoch > args.es_patience
        flags = torch.tensor([float(improved), float(should_stop)])
    if world > 1:
        flags = flags.to(device)
        dist.broadcast(flags, 0)
        flags = flags.cpu()
    return bool(flags[0]), bool(flags[1])


if __name__ == '__main__':
    run_cli(main)
