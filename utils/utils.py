"""Yet-Another-EfficientDet-Pytorch compatible helpers (``from utils.utils import preprocess,
invert_affine, postprocess``), written on top of this package.

Same call signatures, outputs and semantics as theirs:
- ``preprocess`` returns original images (BGR uint8, as ``cv2.imread``), framed images (float32
  HWC, normalised RGB, padded bottom/right with 0) and metas
  ``(new_w, new_h, old_w, old_h, padding_w, padding_h)``;
- ``postprocess`` returns, per image, ``{'rois': [N, 4] (x1, y1, x2, y2) input pixels,
  'class_ids': [N] 0-based, 'scores': [N]}`` as numpy, score descending;
- ``invert_affine`` maps rois back to original-image pixels, in place.
Deliberate differences: images are read with EXIF orientation, gray/RGBA/16-bit handled
(``efficientdet.preprocess.read_image``); ``preprocess_video`` uses the RGB mean/std like
``preprocess`` (theirs has them reversed by default); ``invert_affine`` also accepts a single float.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from efficientdet.postprocess import batched_nms
from efficientdet.preprocess import IMAGENET_MEAN, IMAGENET_STD, read_image, to_rgb
from efficientdet.visualize import PALETTE_NAMES, draw_box, name_to_bgr

Meta = Tuple[int, int, int, int, int, int]

__all__ = ['aspectaware_resize_padding', 'preprocess', 'preprocess_video', 'invert_affine', 'postprocess',
           'STANDARD_COLORS', 'from_colorname_to_bgr', 'standard_to_bgr', 'get_index_label', 'plot_one_box',
           'boolean_string']


def aspectaware_resize_padding(image: np.ndarray, width: int, height: int, interpolation: Optional[int] = None,
                               means: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, int, int, int, int, int, int]:
    """Resize HWC ``image`` so it fits ``width`` x ``height`` keeping the aspect ratio (the long side
    fills it, the other is truncated to an int), place it top-left on a float32 canvas filled with
    ``means`` (or 0). Returns (canvas, new_w, new_h, old_w, old_h, padding_w, padding_h)."""
    if image.ndim == 2:
        image = image[..., None]
    old_h, old_w, c = image.shape
    if old_w > old_h:
        new_w, new_h = width, int(width / old_w * old_h)
    else:
        new_w, new_h = int(height / old_h * old_w), height
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    canvas = np.zeros((height, width, c), np.float32)
    if means is not None:
        canvas[...] = means
    if (new_w, new_h) != (old_w, old_h):
        flags = cv2.INTER_LINEAR if interpolation is None else interpolation
        image = cv2.resize(image, (new_w, new_h), interpolation=flags)
        if image.ndim == 2:
            image = image[..., None]
    canvas[:new_h, :new_w] = image
    return canvas, new_w, new_h, old_w, old_h, width - new_w, height - new_h


def _frame(bgr_images: Sequence[np.ndarray], max_size: int, mean: Sequence[float], std: Sequence[float]
           ) -> Tuple[List[np.ndarray], List[Meta]]:
    framed, metas = [], []
    for img in bgr_images:
        normalized = (img[..., ::-1] / 255 - np.asarray(mean)) / np.asarray(std)
        out = aspectaware_resize_padding(normalized, max_size, max_size)
        framed.append(out[0])
        metas.append(tuple(out[1:]))
    return framed, metas


def preprocess(*image_path: str, max_size: int = 512, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> Tuple[List[np.ndarray], List[np.ndarray], List[Meta]]:
    """Read images -> (originals BGR uint8, framed float32 [max_size, max_size, 3], metas)."""
    ori_imgs = [np.ascontiguousarray(read_image(p)[..., ::-1]) for p in image_path]
    framed, metas = _frame(ori_imgs, max_size, mean, std)
    return ori_imgs, framed, metas


def preprocess_video(*frame_from_video: np.ndarray, max_size: int = 512, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Tuple[Tuple[np.ndarray, ...], List[np.ndarray], List[Meta]]:
    """BGR frames (as from ``cv2.VideoCapture``) -> (frames, framed float32 images, metas)."""
    frames = tuple(np.ascontiguousarray(to_rgb(f, bgr=True)[..., ::-1]) for f in frame_from_video)
    framed, metas = _frame(frames, max_size, mean, std)
    return frames, framed, metas


def invert_affine(metas: Union[float, Sequence[Meta]], preds: List[Dict[str, np.ndarray]]) -> List[Dict[str, np.ndarray]]:
    """Map ``preds[i]['rois']`` (x1, y1, x2, y2 input pixels) back to original pixels, in place.
    ``metas``: one float scale for all images, or per-image metas from ``preprocess``."""
    for i, pred in enumerate(preds):
        rois = pred['rois']
        if len(rois) == 0:
            continue
        if isinstance(metas, (int, float)):
            rois[:, [0, 2]] = rois[:, [0, 2]] / metas
            rois[:, [1, 3]] = rois[:, [1, 3]] / metas
        else:
            new_w, new_h, old_w, old_h = metas[i][:4]
            rois[:, [0, 2]] = rois[:, [0, 2]] / (new_w / old_w)
            rois[:, [1, 3]] = rois[:, [1, 3]] / (new_h / old_h)
    return preds


def _empty() -> Dict[str, np.ndarray]:
    return {'rois': np.array(()), 'class_ids': np.array(()), 'scores': np.array(())}


def postprocess(x: torch.Tensor, anchors: torch.Tensor, regression: torch.Tensor, classification: torch.Tensor,
                regressBoxes, clipBoxes, threshold: float, iou_threshold: float) -> List[Dict[str, np.ndarray]]:
    """Yet-Another's post-processing. x [B, 3, H, W] (only its size is used), anchors [1, A, 4]
    yxyx, regression [B, A, 4], classification [B, A, C] after sigmoid; ``regressBoxes`` /
    ``clipBoxes``: ``BBoxTransform()`` / ``ClipBoxes()``. Anchors whose best class score is
    > ``threshold`` go through NMS per class at ``iou_threshold``. Returns per image
    ``{'rois' xyxy, 'class_ids', 'scores'}`` numpy, score descending (empty arrays if none)."""
    boxes = clipBoxes(regressBoxes(anchors, regression), x)  # [B, A, 4] xyxy
    scores, classes = classification.max(dim=2)
    keep = scores > threshold
    img_idx, anchor_idx = keep.nonzero(as_tuple=True)
    cand_boxes = boxes[img_idx, anchor_idx]
    cand_scores = scores[img_idx, anchor_idx]
    cand_classes = classes[img_idx, anchor_idx]
    # one NMS call for the whole batch: groups are (image, class) pairs
    kept = batched_nms(cand_boxes.float(), cand_scores.float(), img_idx * classification.shape[2] + cand_classes,
                       iou_threshold)
    kept_img = img_idx[kept]
    out = []
    for i in range(x.shape[0]):  # split the (score-ordered) result per image
        sel = kept[kept_img == i]
        if sel.numel() == 0:
            out.append(_empty())
            continue
        out.append({'rois': cand_boxes[sel].cpu().numpy(), 'class_ids': cand_classes[sel].cpu().numpy(),
                    'scores': cand_scores[sel].cpu().numpy()})
    return out


# ---------------------------------------------------------------- drawing helpers (their names)
STANDARD_COLORS: List[str] = list(PALETTE_NAMES)


def from_colorname_to_bgr(color: str) -> Tuple[int, int, int]:
    return name_to_bgr(color)


def standard_to_bgr(list_color_name: Sequence[str]) -> List[Tuple[int, int, int]]:
    return [name_to_bgr(c) for c in list_color_name]


def get_index_label(label: str, obj_list: Sequence[str]) -> int:
    return int(list(obj_list).index(label))


def plot_one_box(img: np.ndarray, coord: Sequence[float], label: Optional[str] = None, score: Optional[float] = None,
                 color: Optional[Tuple[int, int, int]] = None, line_thickness: Optional[int] = None) -> None:
    """Draw one box (x1, y1, x2, y2) with "label score" on ``img`` in place."""
    text = None
    if label:
        text = label if score is None else f'{label} {float(score):.2f}'
    draw_box(img, coord, color or (0, 255, 0), text, line_thickness)


def boolean_string(s: str) -> bool:
    if s not in {'False', 'True'}:
        raise ValueError('Not a valid boolean string')
    return s == 'True'
