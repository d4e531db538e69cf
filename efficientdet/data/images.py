"""Reading dataset images: full decode with problem flags, and the pixel size from the file header.

Pixels are taken as stored: EXIF orientation is ignored, as in the COCO annotations.
"""
from __future__ import annotations

import struct
from typing import List, Optional, Tuple

import cv2
import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def load_image_checked(path: str, expected_hw: Optional[Tuple[float, float]] = None
                       ) -> Tuple[Optional[np.ndarray], List[str]]:
    """Read an image as RGB uint8 [H, W, 3]. Returns (image or None, problem kinds among
    'corrupt_image', 'size_mismatch', 'truncated_image')."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None, ['corrupt_image']
    img = None
    if buf.size:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None or img.ndim != 3 or img.size == 0:
        return None, ['corrupt_image']
    problems = []
    if buf[:2].tobytes() == b'\xff\xd8' and b'\xff\xd9' not in buf[-1024:].tobytes():
        problems.append('truncated_image')
    if expected_hw is not None and (img.shape[0], img.shape[1]) != (int(expected_hw[0]), int(expected_hw[1])):
        problems.append('size_mismatch')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), problems


def read_image_size(path: str) -> Optional[Tuple[int, int]]:
    """(height, width) in stored pixels, or None when the file is missing or not an image.

    PNG and JPEG sizes come from the header (no decode); other formats are decoded."""
    try:
        with open(path, 'rb') as f:
            head = f.read(32)
            if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':
                w, h = struct.unpack('>II', head[16:24])
                return (h, w) if h > 0 and w > 0 else None
            if head[:2] == b'\xff\xd8':
                size = _jpeg_size(f)
                if size is not None:
                    return size
    except OSError:
        return None
    img, problems = load_image_checked(path)
    return None if img is None else (int(img.shape[0]), int(img.shape[1]))


def _jpeg_size(f) -> Optional[Tuple[int, int]]:
    """Walk the JPEG markers up to the first start-of-frame; None when the stream is odd."""
    f.seek(2)
    while True:
        if f.read(1) != b'\xff':
            return None
        b = f.read(1)
        while b == b'\xff':  # fill bytes
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            continue
        seg = f.read(2)
        if len(seg) < 2:
            return None
        length = struct.unpack('>H', seg)[0]
        if marker in _JPEG_SOF:
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack('>HH', data[1:5])
            return (h, w) if h > 0 and w > 0 else None
        if length < 2:
            return None
        f.seek(length - 2, 1)
