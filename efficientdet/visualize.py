"""Drawing detections: one stable named colour per class (from ``webcolors``), "name score" labels.

Boxes are (x1, y1, x2, y2) pixels of the image being drawn on.
"""
from __future__ import annotations

import colorsys
import math
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import webcolors


def _css3_names() -> List[str]:
    if hasattr(webcolors, 'names'):  # webcolors >= 24.6
        return list(webcolors.names('css3'))
    return list(webcolors.CSS3_NAMES_TO_HEX)  # older releases


def _build_palette() -> List[str]:
    """Saturated, not-too-dark CSS3 colours, one name per distinct value, in hue order, then
    visited with a stride so that consecutive class ids get far-apart hues."""
    seen, picked = set(), []
    for name in sorted(_css3_names()):
        rgb = tuple(webcolors.name_to_rgb(name))
        if rgb in seen:
            continue
        seen.add(rgb)
        h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
        if s >= 0.35 and v >= 0.55:
            picked.append((round(h, 4), round(v, 4), name))
    picked.sort()
    names = [n for _, _, n in picked]
    n = len(names)
    step = max(1, int(round(n * 0.381966)))  # golden-ratio stride, made coprime with n
    while math.gcd(step, n) != 1:
        step += 1
    return [names[(i * step) % n] for i in range(n)]


PALETTE_NAMES: Tuple[str, ...] = tuple(_build_palette())


def name_to_bgr(name: str) -> Tuple[int, int, int]:
    """CSS3 colour name -> (B, G, R) ints for OpenCV."""
    rgb = webcolors.name_to_rgb(name)
    return int(rgb[2]), int(rgb[1]), int(rgb[0])


def class_color(class_id: int, rgb: bool = False) -> Tuple[int, int, int]:
    """The colour of class ``class_id``: always the same for a given id; (B, G, R) unless ``rgb``."""
    b, g, r = name_to_bgr(PALETTE_NAMES[int(class_id) % len(PALETTE_NAMES)])
    return (r, g, b) if rgb else (b, g, r)


def draw_box(img: np.ndarray, box: Sequence[float], color: Tuple[int, int, int], text: Optional[str] = None,
             thickness: Optional[int] = None) -> None:
    """Draw box (x1, y1, x2, y2) and an optional text label on ``img`` in place (colour in the
    image's channel order)."""
    h, w = img.shape[:2]
    t = thickness or max(1, int(round(0.002 * max(h, w))))
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    cv2.rectangle(img, (x1, y1), (x2, y2), color, thickness=t)  # crisp: exact class colour
    if not text:
        return
    font_scale = max(0.35, t / 3.0)
    ft = max(1, t - 1)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, ft)
    ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + base + 2  # above the box, or inside when no room
    cv2.rectangle(img, (x1, ty - th - base), (x1 + tw + 2, ty + base // 2), color, -1)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]  # order-agnostic enough for b/w text
    text_color = (0, 0, 0) if luminance > 110 else (255, 255, 255)
    cv2.putText(img, text, (x1 + 1, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_color, ft,
                lineType=cv2.LINE_AA)


def draw_detections(image: np.ndarray, boxes, scores, labels, class_names: Optional[Sequence[str]] = None,
                    rgb: bool = False, thickness: Optional[int] = None) -> np.ndarray:
    """Annotated copy of ``image`` (HWC uint8; B, G, R order unless ``rgb``).

    boxes [N, 4] (x1, y1, x2, y2) pixels of this image, scores [N], labels [N] 0-based class ids;
    text is "name score" (the id when no name is known). Lower scores are drawn first so the best
    boxes end up on top.
    """
    out = np.ascontiguousarray(image).copy()
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    for j in np.argsort(scores, kind='stable'):
        c = int(labels[j])
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) and class_names[c] else str(c)
        draw_box(out, boxes[j], class_color(c, rgb=rgb), f'{name} {scores[j]:.2f}', thickness)
    return out
