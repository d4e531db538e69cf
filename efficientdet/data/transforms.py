"""Training / validation geometry on numpy images (OpenCV), boxes kept consistent with the pixels.

Images are RGB ``uint8`` arrays [H, W, 3]; boxes are float32 [N, 4] **xyxy in pixels**, where a box
(x1, y1, x2, y2) covers pixel columns x1 … x2-1 and rows y1 … y2-1 (pixel *edges*, so flipping maps
x to W - x); classes are [N] (int or float, crowd = -2), carried along untouched.

The resize follows the official EfficientDet input pipeline (google/automl ``dataloader.py``):
``random_horizontal_flip`` first, then "resize_and_crop": pick a factor f (1 for validation,
uniform in ``scale_range`` for training, official 0.1 … 2.0), scale the image so it fits
``output_size * f`` keeping its aspect ratio, crop a random ``output_size`` window when the scaled
image is larger, and leave the rest for bottom/right padding (done after normalisation by the
dataset). Boxes are scaled by the same factor, shifted by the crop offset, cut to the crop and
dropped when (nearly) empty.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from ..config import as_hw

Size = Union[int, Tuple[int, int], Sequence[int]]

# Boxes narrower/shorter than this (network pixels) after cutting to the crop are dropped; the
# official pipeline drops boxes of exactly zero area, this only adds a float tolerance.
MIN_BOX_SIZE = 1e-2


def normalize_pad(content: np.ndarray, out_hw: Tuple[int, int], mean: Sequence[float],
                  std: Sequence[float], out: Optional[np.ndarray] = None, bgr: bool = False) -> torch.Tensor:
    """uint8 RGB [h, w, 3] (h <= H, w <= W; B, G, R order with ``bgr``) → float32 [3, H, W] =
    (x / 255 − mean) / std, zeros at the bottom/right. x * mul + add per channel, read from the
    uint8 image once; ``out`` (float32 [3, H, W], e.g. one image of a batch) is written in place,
    also when it is a [3, H, W] view of H, W, 3 memory (a channels-last batch: then written in
    that order, pixel by pixel). Training data and inference share it."""
    mean_a, std_a = np.asarray(mean, np.float64).reshape(3), np.asarray(std, np.float64).reshape(3)
    mul = (1.0 / (255.0 * std_a)).astype(np.float32).reshape(3, 1, 1)
    add = (-mean_a / std_a).astype(np.float32).reshape(3, 1, 1)
    ch, cw = content.shape[:2]
    if out is None:
        out = np.zeros((3,) + tuple(out_hw), np.float32)
    else:
        out[:, ch:, :] = 0
        out[:, :ch, cw:] = 0
    hwc = out.transpose(1, 2, 0)
    if out.strides[0] < out.strides[2] and hwc.strides[1] == 3 * hwc.strides[2] == 3 * out.itemsize:
        # channels innermost (a channels-last batch): rows of w * 3 values, one pass each
        rows = hwc[:ch, :cw].reshape(ch, cw * 3)  # a view: (w, c) are contiguous within a row
        src = cv2.cvtColor(content, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(content)
        np.multiply(src.reshape(ch, cw * 3), np.tile(mul.reshape(3), cw), out=rows, casting='unsafe')
        rows += np.tile(add.reshape(3), cw)
        return torch.from_numpy(out)
    region = out[:, :ch, :cw]
    src = content.transpose(2, 0, 1)
    np.multiply(src[::-1] if bgr else src, mul, out=region, casting='unsafe')
    region += add
    return torch.from_numpy(out)


def scaled_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """Pixel size after resizing by ``scale`` (official: truncation; a tiny epsilon keeps
    ``512 / 640 * 640`` from truncating to 511). Never below 1 px."""
    return (max(1, int(math.floor(height * scale + 1e-6))), max(1, int(math.floor(width * scale + 1e-6))))


def letterbox_scale(height: int, width: int, output_size: Size, scale_factor: float = 1.0) -> float:
    """Network pixels per image pixel so the image fits ``output_size * scale_factor`` (aspect kept)."""
    oh, ow = as_hw(output_size)
    return min(scale_factor * oh / height, scale_factor * ow / width)


def hflip(image: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror left-right. image [H, W, C]; boxes [N, 4] xyxy pixels → x' = W - x."""
    w = image.shape[1]
    out = np.ascontiguousarray(image[:, ::-1])
    b = boxes.astype(np.float32, copy=True)
    b[:, 0] = w - boxes[:, 2]
    b[:, 2] = w - boxes[:, 0]
    return out, b


def clip_boxes(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """Clip xyxy pixel boxes [N, 4] to [0, width] x [0, height]."""
    b = boxes.astype(np.float32, copy=True)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    return b


def resize_and_crop(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, output_size: Size,
                    scale_factor: float = 1.0, offset: Tuple[float, float] = (0.0, 0.0),
                    min_size: float = MIN_BOX_SIZE) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Official resize-and-crop.

    image [h, w, 3] uint8; boxes [N, 4] xyxy image pixels; classes [N]; ``offset`` = (fy, fx) in
    [0, 1], the crop position as a fraction of the excess (scaled size − output size).
    Returns (content [ch, cw, 3] with ch <= H and cw <= W — the unpadded top-left part of the
    network input —, boxes [M, 4] xyxy network pixels inside the content, classes [M],
    image_scale = network pixels per image pixel).
    """
    oh, ow = as_hw(output_size)
    h, w = image.shape[:2]
    image_scale = letterbox_scale(h, w, (oh, ow), scale_factor)
    sh, sw = scaled_size(h, w, image_scale)
    off_y = int(max(0, sh - oh) * float(np.clip(offset[0], 0.0, 1.0)))
    off_x = int(max(0, sw - ow) * float(np.clip(offset[1], 0.0, 1.0)))
    if (sh, sw) != (h, w):
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
    content = np.ascontiguousarray(image[off_y:off_y + oh, off_x:off_x + ow])
    ch, cw = content.shape[:2]
    b = boxes.astype(np.float32).reshape(-1, 4) * np.float32(image_scale)
    b -= np.array([off_x, off_y, off_x, off_y], dtype=np.float32)
    b = clip_boxes(b, ch, cw)
    keep = ((b[:, 2] - b[:, 0]) > min_size) & ((b[:, 3] - b[:, 1]) > min_size)
    return content, b[keep], np.asarray(classes)[keep], float(image_scale)


class DetectionTransform:
    """Flip + official scale jitter for training; plain letterbox for validation.

    ``__call__(image, boxes, classes, rng)`` → (content uint8 [ch, cw, 3], boxes float32 [M, 4]
    xyxy network pixels, classes [M], image_scale). With ``augment=False`` the result is
    deterministic: no flip, factor 1, no crop (pure letterbox: long side = output size).
    """

    def __init__(self, output_size: Size, augment: bool = False, scale_range: Tuple[float, float] = (0.1, 2.0),
                 flip_prob: float = 0.5, min_size: float = MIN_BOX_SIZE):
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not (0 < lo <= hi) or not math.isfinite(hi):
            raise ValueError(f'scale_range must satisfy 0 < min <= max, got {scale_range}')
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f'flip_prob must be in [0, 1], got {flip_prob}')
        self.output_size = as_hw(output_size)
        self.augment = augment
        self.scale_range = (lo, hi)
        self.flip_prob = float(flip_prob)
        self.min_size = float(min_size)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
                 rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        classes = np.asarray(classes)
        if not self.augment:
            return resize_and_crop(image, boxes, classes, self.output_size, 1.0, (0.0, 0.0), self.min_size)
        rng = rng if rng is not None else np.random.default_rng()
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            image, boxes = hflip(image, boxes)
        lo, hi = self.scale_range
        factor = float(rng.uniform(lo, hi)) if hi > lo else lo
        offset = (float(rng.random()), float(rng.random()))
        return resize_and_crop(image, boxes, classes, self.output_size, factor, offset, self.min_size)

    def __repr__(self) -> str:
        return (f'DetectionTransform(output_size={self.output_size}, augment={self.augment}, '
                f'scale_range={self.scale_range}, flip_prob={self.flip_prob})')


#: A user augmentation: (image RGB uint8 [H, W, 3], boxes float32 [N, 4] xyxy pixels, labels int64 [N])
#: → the same three, boxes in the returned image's pixels.
UserTransform = Callable[[np.ndarray, np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]


def apply_user_transform(fn: UserTransform, image: np.ndarray, boxes: np.ndarray,
                         labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Call a user transform and check what it returns (TypeError naming it otherwise): image
    uint8 [H', W', 3], boxes float32 [M, 4] xyxy pixels of that image, labels int64 [M]."""
    name = getattr(fn, '__name__', type(fn).__name__)
    out = fn(image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64).reshape(-1))
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError(f'transform {name} must return (image, boxes, labels), got {type(out).__name__}')
    img, b, lab = np.asarray(out[0]), np.asarray(out[1], np.float32), np.asarray(out[2])
    if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise TypeError(f'transform {name} returned an image of shape {img.shape}; expected [H, W, 3] RGB')
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img) if np.issubdtype(img.dtype, np.floating) else img, 0, 255).astype(np.uint8)
    b = b.reshape(-1, 4) if b.size else np.zeros((0, 4), np.float32)
    lab = lab.reshape(-1).astype(np.int64)
    if len(b) != len(lab):
        raise TypeError(f'transform {name} returned {len(b)} boxes but {len(lab)} labels')
    return np.ascontiguousarray(img), b, lab


class AlbumentationsTransform:
    """An albumentations ``Compose`` built with
    ``bbox_params=A.BboxParams(format='pascal_voc', label_fields=['labels'])`` as a dataset
    ``transform=`` (image RGB uint8, boxes xyxy pixels = albumentations' pascal_voc). A class, not a
    closure, so data-loader workers started with ``spawn`` can pickle it."""

    def __init__(self, compose: Any, label_field: str = 'labels'):
        params = getattr(compose, 'processors', {}).get('bboxes')
        fmt = getattr(getattr(params, 'params', None), 'format', None)
        if fmt is not None and fmt != 'pascal_voc':
            raise ValueError(f"albumentations BboxParams format must be 'pascal_voc' (x1, y1, x2, y2 pixels), "
                             f'got {fmt!r}')
        self.compose, self.label_field = compose, label_field
        self.__name__ = f'albumentations({type(compose).__name__})'

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.compose(image=image, bboxes=boxes, **{self.label_field: labels})
        return out['image'], np.asarray(out['bboxes'], np.float32).reshape(-1, 4), np.asarray(out[self.label_field])

    def __repr__(self) -> str:
        return self.__name__


def albumentations_transform(compose: Any, label_field: str = 'labels') -> AlbumentationsTransform:
    """Adapt an albumentations ``Compose`` (pascal_voc boxes) to the dataset's ``transform=`` hook."""
    return AlbumentationsTransform(compose, label_field)
