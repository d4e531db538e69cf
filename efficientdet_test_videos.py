"""Detect objects in a video file, a camera or a network stream and write an annotated video.

    python efficientdet_test_videos.py clip.mp4 -p shape -c 0 -w weights/efficientdet-d0-shape.pth
    python efficientdet_test_videos.py 0 --show --output camera.mp4      # camera index 0, live window
    python efficientdet_test_videos.py rtsp://host:554/stream -p coco -w efficientdet-d0.pth

The source is a camera index, a video file, or anything else OpenCV's VideoCapture opens (rtsp://,
http(s):// URLs, GStreamer pipelines). Each frame gets its boxes and the processing speed (FPS)
drawn on it; ``--show`` also displays it live (q or Esc closes). Ctrl+C stops cleanly: the frames
written so far stay in a playable file (exit code 130).
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence, Union

import cv2

from efficientdet.errors import UserError, run_cli
from efficientdet.cli import ScriptParser, detector_from_args
from efficientdet_test import add_detection_args

WINDOW = 'EfficientDet (q or Esc to stop)'


def is_stream(source: str) -> bool:
    """A URL (``scheme://…``) or a GStreamer pipeline (``… ! …``): handed to OpenCV as is."""
    return '://' in source or ' ! ' in source


def open_source(source: str) -> Union[int, str]:
    """A camera index ('0', '1' …), a video path (must exist) or a stream URL / pipeline."""
    if source.isdigit():
        return int(source)
    if not is_stream(source) and not os.path.isfile(source):
        raise UserError(f'{source}: no such video file (give a path, a camera index such as 0, or a stream URL '
                        'such as rtsp://host/stream)')
    return source


def default_output(source: Union[int, str]) -> str:
    if isinstance(source, int):
        return os.path.join('test_out', f'camera{source}.mp4')
    if is_stream(source):
        return os.path.join('test_out', 'stream_det.mp4')
    return os.path.join('test_out', os.path.splitext(os.path.basename(source))[0] + '_det.mp4')


def draw_fps(frame, fps: float) -> None:
    text = f'FPS: {fps:.1f}'
    scale = max(0.5, frame.shape[0] / 720.0)
    thick = max(1, int(round(2 * scale)))
    cv2.putText(frame, text, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(frame, text, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)


def open_window() -> None:
    """The live window of ``--show``; UserError when this OpenCV build or machine has no GUI."""
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    except cv2.error as e:
        detail = str(e).strip().splitlines()[-1][:120] if str(e).strip() else 'no GUI backend'
        raise UserError(f'--show: cannot open a window ({detail}); OpenCV needs a GUI build (opencv-python, '
                        'not -headless) and a display. Drop --show to only write the video') from None


def build_parser() -> ScriptParser:
    p = ScriptParser(description=__doc__.split('\n\n')[0])
    p.add_argument('source', help='video file, camera index (0, 1, …) or stream URL (rtsp://, http://, …)')
    add_detection_args(p)
    p.add_argument('-o', '--output', default=None, help='output video (.mp4; default test_out/NAME_det.mp4)')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    p.add_argument('--show', action='store_true', help='show the annotated frames in a window (q or Esc stops); '
                   'needs an OpenCV with GUI support (pip install opencv-python) and a display')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    source = open_source(args.source)
    detector = detector_from_args(args)
    if args.show:
        open_window()
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        what = (f'camera {source}' if isinstance(source, int)
                else f'{source}: not a reachable stream' if is_stream(source) else f'{source}: not a readable video')
        raise UserError(f'{what}: cannot open it')
    writer = None
    written = 0
    out_path = args.output or default_output(source)
    interrupted = False
    try:
        fps_in = cap.get(cv2.CAP_PROP_FPS) or 0.0
        fps_in = fps_in if 0 < fps_in < 1000 else 30.0
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if isinstance(source, str) else 0
        bar = None
        if isinstance(source, str) and not is_stream(source) and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=total if total > 0 else None, unit='frame', desc=os.path.basename(source))
        fps_smooth = 0.0
        try:
            while True:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                t0 = time.perf_counter()
                det = detector(frame, bgr=True)[0]
                out = det.draw(frame)
                dt = time.perf_counter() - t0
                fps_now = 1.0 / dt if dt > 0 else 0.0
                fps_smooth = fps_now if fps_smooth == 0 else 0.9 * fps_smooth + 0.1 * fps_now
                draw_fps(out, fps_smooth)
                if writer is None:
                    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
                    h, w = out.shape[:2]
                    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*'mp4v'), fps_in, (w, h))
                    if not writer.isOpened():
                        raise UserError(f'{out_path}: cannot write a video there (check the folder and '
                                        'that the name ends in .mp4)')
                writer.write(out)
                written += 1
                if bar is not None:
                    bar.update(1)
                if args.show:
                    cv2.imshow(WINDOW, out)
                    if cv2.waitKey(1) & 0xFF in (ord('q'), 27):
                        break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if args.show:
            cv2.destroyAllWindows()
    if written == 0 and not interrupted:
        raise UserError(f'{args.source}: no frames could be read')
    state = 'stopped by Ctrl+C; ' if interrupted else ''
    print(f'{state}wrote {written} frame(s) to {out_path}')
    return 130 if interrupted else 0


if __name__ == '__main__':
    run_cli(main)
