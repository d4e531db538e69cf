"""Validation of training candidates (the raw weights and their EMA) on the validation set.

Each candidate's weights are loaded into one scratch copy of the model (plain BatchNorm, eval mode),
its BN statistics are re-estimated over training batches (:func:`~.ema.recompute_bn`) so that they
match those weights, and it is evaluated (losses and COCO mAP). Neither the training model nor the
EMA is touched, so validation never changes the training trajectory (exact resume).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Set

import numpy as np
import torch
from torch import nn

from .ema import recompute_bn

__all__ = ['val_losses', 'evaluate', 'evaluate_candidates', 'BNCalibrator']


@torch.no_grad()
def val_losses(model: nn.Module, criterion: nn.Module, loader: Iterable[Dict[str, Any]], device: torch.device,
               should_stop: Callable[[], bool] = lambda: False) -> Dict[str, float]:
    """Mean losses (``loss``, ``cls_loss``, ``box_loss``) of ``model`` in eval mode over ``loader``
    (batches with ``img`` [B,3,H,W] and ``annot`` [B,N,5] xyxy px + class); NaN when none is finite."""
    was = model.training
    model.eval()
    sums, n = np.zeros(3), 0
    try:
        for batch in loader:
            if should_stop():
                break
            _, reg, cls, anchors = model(batch['img'].to(device), return_logits=True)
            out = criterion(cls, reg, anchors, batch['annot'].to(device))
            vals = np.array([float(out['loss']), float(out['cls_loss']), float(out['box_loss'])])
            if np.all(np.isfinite(vals)):
                sums += vals
                n += 1
    finally:
        model.train(was)
    m = sums / n if n else np.full(3, np.nan)
    return {'loss': float(m[0]), 'cls_loss': float(m[1]), 'box_loss': float(m[2])}


def evaluate(model: nn.Module, criterion: nn.Module, loader: Iterable[Dict[str, Any]], dataset: Any,
             device: torch.device, batch_size: int, max_images: Optional[int] = None, with_map: bool = True,
             num_workers: int = 0, should_stop: Callable[[], bool] = lambda: False) -> Dict[str, Any]:
    """Validation losses and (``with_map``) COCO ``AP``, ``AP50``, ``AP75`` of ``model`` (floats),
    and its precision-recall ``curves`` (see ``COCOEvaluator.compute``) for the TensorBoard figure."""
    out: Dict[str, Any] = dict(val_losses(model, criterion, loader, device, should_stop))
    if with_map and not should_stop():
        from ..evaluation import run_coco_eval
        metrics, _ = run_coco_eval(model, dataset, batch_size=batch_size, device=device, max_images=max_images,
                                   progress=False, num_workers=num_workers)
        for k in ('AP', 'AP50', 'AP75'):
            if metrics.get(k) is not None:
                out[k] = float(metrics[k])
        out['curves'] = metrics.get('curves')
    return out


def evaluate_candidates(candidates: Dict[str, Dict[str, torch.Tensor]], calibrator: 'BNCalibrator',
                        evaluate_fn: Callable[[nn.Module], Dict[str, float]], compare_running: bool = False
                        ) -> Dict[str, Dict[str, Any]]:
    """Evaluate each candidate state_dict (``{'raw': ..., 'ema': ...}``) after ``calibrator`` gave
    it matching BN statistics. ``compare_running`` also evaluates each candidate with the
    statistics it had (reported as ``NAME/running_bn``, for measurement). Returns
    ``{name: {'metrics': ..., 'state_dict': weights as evaluated}}``.
    """
    results: Dict[str, Dict[str, Any]] = {}
    for name, sd in candidates.items():
        if compare_running and calibrator.batches is not None:
            calibrator.scratch.load_state_dict(sd)
            results[f'{name}/running_bn'] = {'metrics': evaluate_fn(calibrator.scratch.eval()), 'state_dict': None}
        model = calibrator(sd)
        results[name] = {'metrics': evaluate_fn(model),
                         'state_dict': {k: v.detach().clone() for k, v in model.state_dict().items()}}
    return results


class BNCalibrator:
    """Puts a state_dict into ``scratch`` (a copy of the model with plain BatchNorm) and, when
    ``batches`` is given, re-estimates the BN statistics of the layers in ``names`` over those
    training batches (RNG-neutral: the random state is restored afterwards)."""

    def __init__(self, scratch: nn.Module, batches: Optional[Callable[[], Iterable[torch.Tensor]]] = None,
                 names: Optional[Set[str]] = None):
        self.scratch, self.batches, self.names = scratch.eval(), batches, names

    def __call__(self, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
        from .rng import rng_state, set_rng_state
        self.scratch.load_state_dict(state_dict)
        self.scratch.eval()
        if self.batches is not None:
            saved = rng_state()
            try:
                recompute_bn(self.scratch, self.batches(), self.names)
            finally:
                set_rng_state(saved)
        return self.scratch

    def state_dict_of(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``state_dict`` with matching BN statistics (a copy)."""
        return {k: v.detach().clone() for k, v in self(state_dict).state_dict().items()}
