"""Validation of training candidates (the raw weights and their EMA) on the validation set.

Each candidate's weights are loaded into one scratch copy of the model (plain BatchNorm, eval mode),
its BN statistics are re-estimated over training batches (:func:`~.ema.recompute_bn`) so that they
match those weights, and it is evaluated (losses and COCO mAP). Neither the training model nor the
EMA is touched, so validation never changes the training trajectory (exact resume).

Under torch.distributed every process validates: rank 0 re-estimates the BN statistics and sends
the candidate's weights to the others (so every process evaluates the same network), each process
computes the losses and the detections of its shard of the validation set, the sums are reduced
and the detections gathered, and one COCO evaluation runs (``evaluation.run_coco_eval``). The
figures equal one process's (the losses up to how the images fall into batches).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Set

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..distributed import broadcast_tensors, dist_info
from .ema import recompute_bn

__all__ = ['val_losses', 'evaluate', 'evaluate_candidates', 'BNCalibrator']


@torch.no_grad()
def val_losses(model: nn.Module, criterion: nn.Module, loader: Iterable[Dict[str, Any]], device: torch.device,
               should_stop: Callable[[], bool] = lambda: False, distributed: Optional[bool] = None
               ) -> Dict[str, float]:
    """Mean losses (``loss``, ``cls_loss``, ``box_loss``) of ``model`` in eval mode over ``loader``
    (batches with ``img`` [B,3,H,W] and ``annot`` [B,N,5] xyxy px + class): the mean over the
    batches whose losses are finite; NaN when none is. ``distributed`` (default: when a process
    group of several processes exists): ``loader`` is this process's shard and the sums are
    reduced over all processes (a collective; ``should_stop`` is then not consulted)."""
    _, world = dist_info()
    if distributed is None:
        distributed = world > 1
    was = model.training
    model.eval()
    sums, n = np.zeros(3), 0
    try:
        for batch in loader:
            if not distributed and should_stop():
                break
            _, reg, cls, anchors = model(batch['img'].to(device), return_logits=True)
            out = criterion(cls, reg, anchors, batch['annot'].to(device))
            vals = np.array([float(out['loss']), float(out['cls_loss']), float(out['box_loss'])])
            if np.all(np.isfinite(vals)):
                sums += vals
                n += 1
    finally:
        model.train(was)
    if distributed:
        t = torch.tensor([*sums, n], dtype=torch.float64, device=device if dist.get_backend() == 'nccl' else 'cpu')
        dist.all_reduce(t)
        t = t.cpu().numpy()
        sums, n = t[:3], int(round(t[3]))
    m = sums / n if n else np.full(3, np.nan)
    return {'loss': float(m[0]), 'cls_loss': float(m[1]), 'box_loss': float(m[2])}


def evaluate(model: nn.Module, criterion: nn.Module, loader: Iterable[Dict[str, Any]], dataset: Any,
             device: torch.device, batch_size: int, max_images: Optional[int] = None, with_map: bool = True,
             num_workers: int = 0, should_stop: Callable[[], bool] = lambda: False) -> Dict[str, Any]:
    """Validation losses and (``with_map``) COCO ``AP``, ``AP50``, ``AP75`` of ``model`` (floats),
    and its precision-recall ``curves`` (see ``COCOEvaluator.compute``) for the TensorBoard figure.
    Under torch.distributed every process calls it with ``loader`` over its own shard; the mAP is
    of the first ``max_images`` images of ``dataset``, detected shard by shard."""
    _, world = dist_info()
    out: Dict[str, Any] = dict(val_losses(model, criterion, loader, device, should_stop))
    if with_map and (world > 1 or not should_stop()):
        from ..evaluation import run_coco_eval
        metrics, _ = run_coco_eval(model, dataset, batch_size=batch_size, device=device, max_images=max_images,
                                   progress=False, num_workers=num_workers)
        for k in ('AP', 'AP50', 'AP75'):
            if metrics.get(k) is not None:
                out[k] = float(metrics[k])
        out['curves'] = metrics.get('curves')
    return out


def evaluate_candidates(candidates: Dict[str, Dict[str, torch.Tensor]], calibrator: 'BNCalibrator',
                        evaluate_fn: Callable[[nn.Module], Dict[str, float]], compare_running: bool = False,
                        keep_state_dicts: bool = True) -> Dict[str, Dict[str, Any]]:
    """Evaluate each candidate state_dict (``{'raw': ..., 'ema': ...}``) after ``calibrator`` gave
    it matching BN statistics. ``compare_running`` also evaluates each candidate with the
    statistics it had (reported as ``NAME/running_bn``, for measurement; only when the calibrator
    re-estimates). Returns ``{name: {'metrics': ..., 'state_dict': weights as evaluated (None
    unless keep_state_dicts)}}``. Under torch.distributed every process calls it (collectives)."""
    results: Dict[str, Dict[str, Any]] = {}
    for name, sd in candidates.items():
        if compare_running and calibrator.recomputes:
            model = calibrator(sd, recompute=False)
            results[f'{name}/running_bn'] = {'metrics': evaluate_fn(model), 'state_dict': None}
        model = calibrator(sd)
        results[name] = {'metrics': evaluate_fn(model),
                         'state_dict': {k: v.detach().clone() for k, v in model.state_dict().items()}
                         if keep_state_dicts else None}
    return results


class BNCalibrator:
    """Puts a state_dict into ``scratch`` (a copy of the model with plain BatchNorm) and, when
    ``recomputes`` (default: ``batches`` given), re-estimates the BN statistics of the layers in
    ``names`` over ``batches()`` (training images; RNG-neutral: the random state is restored
    afterwards). Under torch.distributed, ``batches`` is needed on rank 0 only: calling the
    calibrator is then a collective that gives every process rank 0's weights and statistics."""

    def __init__(self, scratch: nn.Module, batches: Optional[Callable[[], Iterable[torch.Tensor]]] = None,
                 names: Optional[Set[str]] = None, recomputes: Optional[bool] = None):
        self.scratch, self.batches, self.names = scratch.eval(), batches, names
        self.recomputes = batches is not None if recomputes is None else bool(recomputes)

    def __call__(self, state_dict: Dict[str, torch.Tensor], recompute: bool = True, sync: bool = True) -> nn.Module:
        """``scratch`` holding ``state_dict`` (with re-estimated BN statistics when ``recompute``);
        ``sync``: every process gets rank 0's result (a collective under torch.distributed)."""
        from .rng import rng_state, set_rng_state
        self.scratch.load_state_dict(state_dict)
        self.scratch.eval()
        rank, world = dist_info()
        if recompute and self.recomputes and self.batches is not None and (rank == 0 or not sync):
            saved = rng_state()
            try:
                recompute_bn(self.scratch, self.batches(), self.names)
            finally:
                set_rng_state(saved)
        if sync and world > 1:
            broadcast_tensors(list(self.scratch.state_dict().values()), 0)
        return self.scratch

    def state_dict_of(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``state_dict`` with matching BN statistics (a copy); this process alone (no collective)."""
        return {k: v.detach().clone() for k, v in self(state_dict, sync=False).state_dict().items()}
