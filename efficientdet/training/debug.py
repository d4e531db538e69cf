"""``--debug``: after each validation, a few validation images with the chosen weights' detections
(coloured, by class) and the ground truth (white), as JPEGs in ``{log_path}/{project}/debug``.

The detections come from the one inference path (``Detector.detect_prepared``), so they are what
``efficientdet_test.py`` would draw for the same weights; boxes are drawn on the network input
(the letterboxed image), in its pixels.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Sequence

import numpy as np
import torch

from .hooks import Hook

__all__ = ['write_debug_images', 'DebugImagesHook', 'DEBUG_THRESHOLD']

DEBUG_THRESHOLD = 0.3  # score threshold of the drawn detections


@torch.no_grad()
def write_debug_images(model: torch.nn.Module, loader: Iterable[Dict[str, Any]], obj_list: Sequence[str],
                       mean: Sequence[float], std: Sequence[float], folder: str, tag: str, limit: int = 4) -> None:
    """The first ``limit`` images of ``loader``'s first batch (``img`` [B, 3, H, W] normalised with
    ``mean``/``std``, ``annot`` [B, N, 5] x1, y1, x2, y2 input pixels + class) with ``model``'s
    detections, written as ``{folder}/{tag}_{i}.jpg``."""
    import cv2
    from ..detector import Detector
    from ..preprocess import ImageMeta
    from ..visualize import draw_detections
    os.makedirs(folder, exist_ok=True)
    batch = next(iter(loader))
    imgs = batch['img'][:limit]
    hw = (int(imgs.shape[-2]), int(imgs.shape[-1]))
    device = next(model.parameters()).device
    was = model.training
    try:
        detector = Detector(model, obj_list, hw, mean=mean, std=std, threshold=DEBUG_THRESHOLD, iou=0.5,
                            device=device, batch_size=len(imgs))
        metas = [ImageMeta(scale=1.0, orig_hw=hw, input_hw=hw, resized_hw=hw)] * len(imgs)
        dets = detector.detect_prepared(imgs, metas)
    finally:
        model.train(was)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for i, det in enumerate(dets):
        rgb = ((imgs[i].float().cpu() * s + m).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        for x1, y1, x2, y2, c in batch['annot'][i].tolist():
            if c >= 0:
                cv2.rectangle(bgr, (int(x1), int(y1)), (int(x2), int(y2)), (255, 255, 255), 1)
        out = draw_detections(bgr, det.boxes, det.scores, det.class_ids, list(obj_list))
        cv2.imwrite(os.path.join(folder, f'{tag}_{i}.jpg'), out)


class DebugImagesHook(Hook):
    """After each validation (main process), :func:`write_debug_images` of the weights it chose
    (``report['state_dict']``), loaded into ``model`` (a scratch copy, not the training model)."""

    name = 'debug_images'

    def __init__(self, loader: Iterable[Dict[str, Any]], model: torch.nn.Module, obj_list: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], folder: str, is_main: bool = True):
        self.loader, self.model, self.obj_list = loader, model, list(obj_list)
        self.mean, self.std, self.folder, self.is_main = mean, std, folder, is_main

    def on_validation(self, trainer: Any, report: Dict[str, Any]) -> None:
        if self.is_main and report.get('state_dict') is not None:
            self.model.load_state_dict(report['state_dict'])
            write_debug_images(self.model, self.loader, self.obj_list, self.mean, self.std, self.folder,
                               f'epoch{report["epoch"]}')
