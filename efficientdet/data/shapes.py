"""Synthetic shapes dataset (rectangle, circle, triangle) in COCO format, small enough to learn on CPU.

    python -m efficientdet.data.shapes --root datasets/shape --num_train 500 --num_val 100 \\
        --image_size 256 --seed 0

writes ``{root}/train/*.jpg``, ``{root}/val/*.jpg`` and ``{root}/annotations/instances_{train,val}.json``
(category ids 1..3 in :data:`CLASSES` order). Output is a pure function of the arguments: the same
seed gives byte-identical files. :func:`render_scene` makes one image for demos.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from ..ckpt.files import atomic_write
from ..errors import UserError, run_cli

CLASSES: Tuple[str, ...] = ('rectangle', 'circle', 'triangle')
MIN_REL_SIZE, MAX_REL_SIZE = 0.08, 0.5     # object size as a fraction of the image side
MAX_OBJECTS = 6
MAX_OCCLUDED = 0.35                        # at most this fraction of an object may be hidden
MIN_CONTRAST = 110                         # L1 RGB distance between a shape and what lies under it
_SPLIT_CODES = {'train': 0, 'val': 1}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Solid, linear gradient or smooth noise background, RGB uint8 [size, size, 3]."""
    kind = rng.integers(3)
    base = rng.integers(0, 256, 3).astype(np.float32)
    if kind == 0:
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:
        other = rng.integers(0, 256, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + (other - base) * t[..., None]
    else:
        cells = int(rng.integers(4, 17))
        noise = rng.normal(0.0, 35.0, (cells, cells, 3)).astype(np.float32)
        img = base + cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        img += rng.normal(0.0, 6.0, (size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Binary mask (uint8 0/1 [size, size]) of one shape lying fully inside the image."""
    mask = np.zeros((size, size), np.uint8)
    side = rng.uniform(MIN_REL_SIZE, MAX_REL_SIZE) * size
    if cls == 0:  # rectangle, axis-aligned, aspect 0.4 … 1
        w, h = side, side * rng.uniform(0.4, 1.0)
        if rng.random() < 0.5:
            w, h = h, w
        w, h = max(int(round(w)), 3), max(int(round(h)), 3)
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        mask[y0:y0 + h, x0:x0 + w] = 1
    elif cls == 1:  # circle
        r = max(int(round(side / 2)), 2)
        cx = int(rng.integers(r, size - r))
        cy = int(rng.integers(r, size - r))
        cv2.circle(mask, (cx, cy), r, 1, thickness=-1, lineType=cv2.LINE_8)
    else:  # triangle inscribed in a circle of diameter `side`, random rotation, not too thin
        r = max(side / 2, 2.0)
        cx = rng.uniform(r, size - r)
        cy = rng.uniform(r, size - r)
        a0 = rng.uniform(0, 2 * np.pi)
        angles = a0 + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
        pts = np.clip(np.round(pts), 0, size - 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8)
    return mask


def render_scene(rng: np.random.Generator, size: int,
                 max_objects: int = MAX_OBJECTS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image. Returns (image RGB uint8 [size, size, 3], boxes float32 [N, 4] xyxy
    pixels, exactly tight around each shape's visible pixels (x2, y2 exclusive), classes int64 [N]
    0-based in :data:`CLASSES` order). 1 … ``max_objects`` objects, each mostly visible."""
    img, boxes, classes, _ = render_scene_layers(rng, size, max_objects)
    return img, boxes, classes


def render_scene_layers(rng: np.random.Generator, size: int, max_objects: int = MAX_OBJECTS
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render_scene` plus the object map int32 [size, size]: index of the visible object
    per pixel, -1 for background."""
    if size < 32:
        raise UserError(f'image size {size} is too small for the shapes dataset (use at least 32)')
    img = _background(rng, size)
    n = int(rng.integers(1, max_objects + 1))
    areas: List[int] = []
    colours: List[np.ndarray] = []
    classes: List[int] = []
    cover = np.full((size, size), -1, np.int32)  # index of the topmost object per pixel
    for _ in range(n):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASSES)))
            mask = _shape_mask(rng, cls, size).astype(bool)
            area = int(np.count_nonzero(mask))
            if area < 16:
                continue
            below = cover[mask]
            hidden = np.bincount(below[below >= 0], minlength=len(areas))
            visible = np.bincount(cover[cover >= 0], minlength=len(areas))
            if np.any(visible - hidden < (1.0 - MAX_OCCLUDED) * np.array(areas, np.float64)):
                continue  # would hide too much of an earlier object
            free = mask & (cover < 0)
            under = [img[free].reshape(-1, 3).astype(np.float32).mean(0)] if free.any() else []
            under += [colours[j] for j in np.flatnonzero(hidden)]
            colour = _contrasting_colour(rng, under)
            if colour is None:
                continue
            img[mask] = colour
            cover[mask] = len(areas)
            areas.append(area)
            colours.append(colour.astype(np.float32))
            classes.append(cls)
            break
    boxes = np.zeros((len(areas), 4), np.float32)
    ys, xs = np.nonzero(cover >= 0)
    owner = cover[ys, xs]
    for k, (v, op) in enumerate(((xs, np.minimum), (ys, np.minimum), (xs + 1, np.maximum), (ys + 1, np.maximum))):
        init = np.full(len(areas), size if op is np.minimum else 0, np.int64)
        op.at(init, owner, v)
        boxes[:, k] = init
    return img, boxes, np.array(classes, np.int64), cover


def _contrasting_colour(rng: np.random.Generator, under: List[np.ndarray]) -> Optional[np.ndarray]:
    for _ in range(30):
        c = rng.integers(0, 256, 3)
        if all(np.abs(c - u).sum() >= MIN_CONTRAST for u in under):
            return c.astype(np.uint8)
    return None


def generate_split(root: str, split: str, num_images: int, image_size: int, seed: int,
                   start_id: int = 1) -> Dict[str, object]:
    """Write ``num_images`` scenes to ``{root}/{split}/`` and return the COCO dict (also written to
    ``{root}/annotations/instances_{split}.json``). Image i uses the seed (seed, split, i)."""
    image_dir = os.path.join(root, split)
    ann_dir = os.path.join(root, 'annotations')
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    code = _SPLIT_CODES.get(split, len(split))
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        rng = np.random.default_rng([seed, code, i])
        img, boxes, classes = render_scene(rng, image_size)
        image_id = start_id + i
        name = f'{image_id:06d}.jpg'
        if not cv2.imwrite(os.path.join(image_dir, name), np.ascontiguousarray(img[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise UserError(f'cannot write {os.path.join(image_dir, name)}; check the --root folder')
        images.append(dict(id=image_id, file_name=name, height=image_size, width=image_size))
        for b, c in zip(boxes.tolist(), classes.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            annotations.append(dict(id=ann_id, image_id=image_id, category_id=c + 1, bbox=[b[0], b[1], w, h],
                                    area=float(w * h), iscrowd=0))
            ann_id += 1
    data = dict(info=dict(description=f'synthetic shapes, seed {seed}'), licenses=[], images=images,
                annotations=annotations,
                categories=[dict(id=k + 1, name=n, supercategory='shape') for k, n in enumerate(CLASSES)])
    path = os.path.join(ann_dir, f'instances_{split}.json')
    atomic_write(path, lambda f: json.dump(data, f), binary=False)
    return data


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog='python -m efficientdet.data.shapes',
                                 description='Write the synthetic shapes dataset (COCO format).')
    ap.add_argument('--root', default='datasets/shape', help='output folder ({data_path}/{project_name})')
    ap.add_argument('--num_train', type=int, default=500)
    ap.add_argument('--num_val', type=int, default=100)
    ap.add_argument('--image_size', type=int, default=256)
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args(argv)
    if args.num_train < 0 or args.num_val < 0:
        raise UserError('--num_train and --num_val must be >= 0')
    if args.image_size < 32:
        raise UserError(f'--image_size must be at least 32, got {args.image_size}')
    if args.seed < 0:
        raise UserError(f'--seed must be >= 0, got {args.seed}')
    for split, n in (('train', args.num_train), ('val', args.num_val)):
        data = generate_split(args.root, split, n, args.image_size, args.seed)
        print(f'{split}: {n} images, {len(data["annotations"])} objects -> {os.path.join(args.root, split)}')
    return 0


if __name__ == '__main__':
    run_cli(main)
