"""Image reading, letterbox resize + normalisation, and mapping boxes back to the original image.

Conventions: images are RGB uint8 HWC numpy arrays; network inputs are float32 CHW, normalised
with mean/std (RGB, 0-1 scale) and padded with 0 at the bottom/right after normalisation. Boxes
are (x1, y1, x2, y2) pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from .config import IMAGENET_MEAN, IMAGENET_STD, as_hw
from .data.transforms import clip_boxes, letterbox_scale, normalize_pad, scaled_size
from .errors import UserError


ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor]

# Any depth and colour, no alpha; EXIF orientation is applied (it is not with IMREAD_UNCHANGED).
_READ_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


@dataclass(frozen=True)
class ImageMeta:
    """How an original image was placed in the network input.

    scale: network pixels per original pixel (min(H / h, W / w)); orig_hw: (h, w) of the original;
    input_hw: (H, W) of the network input; resized_hw: (h', w') of the image content inside the
    input (top-left corner, the rest is padding; h' = floor(h * scale), the official truncation).
    """
    scale: float
    orig_hw: Tuple[int, int]
    input_hw: Tuple[int, int]
    resized_hw: Tuple[int, int]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Any-depth image -> uint8: uint16 is mapped 0..65535 -> 0..255, float 0..1 (if max <= 1)
    or 0..255 is scaled/clipped, bool -> 0/255."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        img = np.nan_to_num(image.astype(np.float32))
        if img.size and img.max() <= 1.0:
            img = img * 255.0
        return np.clip(np.round(img), 0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        return np.clip(image, 0, 255).astype(np.uint8)
    raise UserError(f'unsupported image dtype {image.dtype}; give uint8, uint16 or float images')


def to_rgb(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """HW / HW1 / HW3 / HW4 array -> RGB uint8 HWC (gray replicated, alpha dropped). ``bgr``: the
    colour channels are in OpenCV's B, G, R order."""
    img = to_uint8(np.asarray(image))
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[..., None], 3, axis=2))
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise UserError(f'expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got {tuple(img.shape)}')
    img = img[..., :3]
    return np.ascontiguousarray(img[..., ::-1] if bgr else img)


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file -> RGB uint8 HWC. EXIF orientation is applied; grayscale becomes 3
    channels; alpha is dropped; 16-bit is scaled to 8-bit. A missing or unreadable file raises
    UserError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such image file')
    try:
        data = np.fromfile(path, dtype=np.uint8)  # works with non-ASCII paths, unlike cv2.imread
    except OSError as e:
        raise UserError(f'{path}: cannot read the file ({e.strerror or e})') from None
    img = cv2.imdecode(data, _READ_FLAGS) if data.size else None
    if img is None:
        raise UserError(f'{path}: not a readable image (unknown format or corrupt file)')
    return to_rgb(img, bgr=True)


def letterbox(image: np.ndarray, size: Union[int, Sequence[int]], mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, bgr: bool = False, out: Optional[np.ndarray] = None
              ) -> Tuple[torch.Tensor, ImageMeta]:
    """Image (HWC; RGB, or B, G, R with ``bgr``; any depth / channel count ``to_rgb`` takes) ->
    (float32 [3, H, W] normalised input, ImageMeta).

    Resize keeping the aspect ratio so the image fits H x W (``size`` int: H = W = size, the long
    side becomes ``size``; official truncation of the resized size), bilinear on the uint8 image,
    then the training data's ``normalize_pad``: (x / 255 - mean) / std, zeros bottom/right. A uint8
    3-channel image is used as it is (no colour-order copy: the channel swap happens inside the
    normalisation); ``out`` (float32 [3, H, W]) receives the result in place.
    """
    hh, ww = as_hw(size)
    img = np.asarray(image)
    if not (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        img, bgr = to_rgb(img, bgr=bgr), False
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise UserError(f'empty image of shape {tuple(image.shape)}')
    scale = letterbox_scale(h, w, (hh, ww))
    nh, nw = scaled_size(h, w, scale)  # official truncation, the same as the training data
    nh, nw = min(hh, nh), min(ww, nw)
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    tensor = normalize_pad(img, (hh, ww), mean, std, out=out, bgr=bgr)
    return tensor, ImageMeta(float(scale), (h, w), (hh, ww), (nh, nw))


def boxes_to_original(boxes: Union[np.ndarray, torch.Tensor], meta: ImageMeta) -> np.ndarray:
    """(x1, y1, x2, y2) network-input pixels [N, 4] -> (x1, y1, x2, y2) original-image pixels,
    float32 numpy, clipped to [0, w] x [0, h] of the original. Divides by the one ``meta.scale``,
    like the official inference and this project's evaluation (``evaluation.to_original_pixels``)
    and the inverse of how training maps ground-truth boxes; the truncated resize makes the image
    content up to 1 network pixel smaller than ``scale`` says, which this ignores, as they do."""
    b = boxes.detach().cpu().float().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, np.float32)
    h, w = meta.orig_hw
    return clip_boxes(b.reshape(-1, 4) / np.float32(meta.scale), h, w)


def load_image(image: ImageLike, bgr: bool = False) -> np.ndarray:
    """Path, numpy array (HWC, RGB unless ``bgr``) or torch tensor (CHW RGB; uint8 0-255 or float
    0-1) -> RGB uint8 HWC."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        elif t.ndim != 2:
            raise UserError(f'expected an image tensor of shape CxHxW or HxW, got {tuple(image.shape)}')
        arr = t.numpy()
        if t.is_floating_point():
            arr = np.clip(arr.astype(np.float32), 0.0, 1.0)  # torchvision convention: floats in [0, 1]
        return to_rgb(arr, bgr=bgr)
    if isinstance(image, np.ndarray):
        return to_rgb(image, bgr=bgr)
    raise UserError(f'cannot use {type(image).__name__} as an image; give a path, a numpy array or a tensor')


def preprocess_batch(images: Union[ImageLike, Sequence[ImageLike]], size: Union[int, Sequence[int]],
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     bgr: bool = False, channels_last: bool = False) -> Tuple[torch.Tensor, List[ImageMeta]]:
    """Images of any sizes (paths, arrays, tensors; see ``load_image``) -> (batch float32
    [B, 3, H, W], metas). Each image is letterboxed straight into its slot of the batch: a uint8
    frame (e.g. B, G, R from ``cv2.imread`` with ``bgr``) is read once by the resize and once by the
    normalisation, with no intermediate colour-converted or stacked copy. ``channels_last``: the
    batch is laid out B, H, W, 3 in memory (``torch.channels_last`` strides; same values), the
    layout of the image itself and the one the CPU runtimes' first convolution reads."""
    if isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)):
        images = [images]
    images = list(images)
    hh, ww = as_hw(size)
    if channels_last:
        buf = np.empty((len(images), hh, ww, 3), np.float32)
        out = buf.transpose(0, 3, 1, 2)  # [B, 3, H, W] view of the B, H, W, 3 memory
    else:
        out = buf = np.empty((len(images), 3, hh, ww), np.float32)
    metas = []
    for i, im in enumerate(images):
        if isinstance(im, np.ndarray):
            _, meta = letterbox(im, (hh, ww), mean, std, bgr=bgr, out=out[i])
        else:
            _, meta = letterbox(load_image(im, bgr=bgr), (hh, ww), mean, std, out=out[i])
        metas.append(meta)
    batch = torch.from_numpy(buf)
    return (batch.permute(0, 3, 1, 2) if channels_last else batch), metas
