"""Detect objects in images with a trained EfficientDet.

    python efficientdet_test.py img1.jpg img2.png -p shape -c 0 -w weights/efficientdet-d0-shape.pth
    python efficientdet_test.py photos/ -p coco -c 0 -w efficientdet-d0.pth --batch_size 8

Inputs are image files and folders (every image file directly inside, in name order). For every
image writes an annotated copy and a JSON of its detections (x1, y1, x2, y2 in original-image
pixels, score, class id, class name) to --output, and prints one summary line. Images that are
missing or unreadable are reported by name and skipped; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import cv2

from efficientdet.cli import (ScriptParser, add_inference_args, add_model_args, add_options, add_project_args,
                              add_runtime_args, add_weights_arg, detector_from_args)
from efficientdet.errors import UserError, run_cli

DEFAULT_IMAGE = os.path.join('assets', 'demo_shapes.jpg')  # of the working folder, else beside this script
if not os.path.exists(DEFAULT_IMAGE):
    DEFAULT_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_IMAGE)
_WRITABLE = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_READABLE = _WRITABLE


def add_detection_args(p: argparse.ArgumentParser) -> None:
    """The options of the image and the video script: project, model, weights, thresholds, runtime."""
    add_project_args(p)
    add_model_args(p)
    add_weights_arg(p)
    add_inference_args(p, threshold=0.2, iou=0.2)
    add_runtime_args(p)


def summary_line(name: str, det) -> str:
    """'name: N detections; top: circle 0.91 (x2), square 0.80'."""
    n = len(det)
    line = f'{name}: {n} detection{"s" if n != 1 else ""}'
    if n:
        best: Dict[str, List[float]] = {}
        for cname, s in zip(det.class_names, det.scores):
            best.setdefault(cname, []).append(float(s))
        top = sorted(best.items(), key=lambda kv: -max(kv[1]))[:3]
        line += '; top: ' + ', '.join(f'{c} {max(v):.2f}' + (f' (x{len(v)})' if len(v) > 1 else '') for c, v in top)
    return line


def _unique_stem(path: str, used: Dict[str, int]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or 'image'
    k = used.get(stem, 0)
    used[stem] = k + 1
    return stem if k == 0 else f'{stem}_{k}'


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Image files as given, and for each folder the image files directly inside it (name order).
    A folder without images is a UserError; a missing file is kept (reported when read)."""
    out: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.lower().endswith(_READABLE) and os.path.isfile(os.path.join(path, f)))
            if not found:
                raise UserError(f'{path}: folder holds no image files ({", ".join(_READABLE)})')
            out += found
        else:
            out.append(path)
    return out


def build_parser() -> ScriptParser:
    p = ScriptParser(description=__doc__.split('\n\n')[0])
    p.add_argument('images', nargs='*', help=f'image files or folders of images (default: {DEFAULT_IMAGE})')
    add_detection_args(p)
    add_options(p, 'batch_size', batch_size=1)
    p.add_argument('-o', '--output', default='test_out', help='folder for annotated images and JSON files')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f'--batch_size {args.batch_size}: must be at least 1')
    images = expand_inputs(args.images or [DEFAULT_IMAGE])

    from efficientdet.preprocess import read_image
    detector = detector_from_args(args, batch_size=args.batch_size)
    os.makedirs(args.output, exist_ok=True)
    failed, used = 0, {}
    for start in range(0, len(images), args.batch_size):
        chunk = []
        for path in images[start:start + args.batch_size]:
            try:
                chunk.append((path, read_image(path)))
            except UserError as e:
                print(f'error: {e} (skipped)', file=sys.stderr)
                failed += 1
        dets = detector([rgb for _, rgb in chunk]) if chunk else []
        for (path, rgb), det in zip(chunk, dets):
            _write_outputs(args.output, path, rgb, det, used)
            print(summary_line(os.path.basename(path), det))
    if failed:
        print(f'{failed} of {len(images)} image(s) could not be read', file=sys.stderr)
    return 1 if failed else 0


def _write_outputs(folder: str, path: str, rgb, det, used: Dict[str, int]) -> None:
    """The annotated copy and the JSON of one image's detections."""
    stem = _unique_stem(path, used)
    ext = os.path.splitext(path)[1].lower()
    ext = ext if ext in _WRITABLE else '.jpg'
    out_img = os.path.join(folder, stem + ext)
    bgr = det.draw(rgb, rgb=True)[..., ::-1]
    if not cv2.imwrite(out_img, bgr):
        raise UserError(f'{out_img}: could not write the annotated image (is --output writable?)')
    record = {'image': path, 'width': int(rgb.shape[1]), 'height': int(rgb.shape[0]), 'detections': det.to_list()}
    with open(os.path.join(folder, stem + '.json'), 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1)


if __name__ == '__main__':
    run_cli(main)
