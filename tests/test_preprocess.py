"""Image reading (EXIF, gray, RGBA, 16-bit, bad files), letterbox + mapping back, batches of mixed
sizes, the Yet-Another ``utils.utils`` helpers and drawing."""
import struct

import cv2
import numpy as np
import pytest
import torch

from efficientdet.errors import UserError
from efficientdet.preprocess import (IMAGENET_MEAN, IMAGENET_STD, ImageMeta, boxes_to_original, letterbox,
                                     preprocess_batch, read_image)
from efficientdet.visualize import PALETTE_NAMES, class_color, draw_detections


def jpeg_with_orientation(bgr: np.ndarray, orientation: int) -> bytes:
    """JPEG bytes carrying an EXIF APP1 segment with only the Orientation tag (0x0112)."""
    ok, buf = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    tiff = b'II' + struct.pack('<HI', 42, 8) + struct.pack('<H', 1) + struct.pack('<HHIHH', 0x0112, 3, 1, orientation, 0)
    tiff += struct.pack('<I', 0)
    payload = b'Exif\x00\x00' + tiff
    data = buf.tobytes()
    return data[:2] + b'\xff\xe1' + struct.pack('>H', len(payload) + 2) + payload + data[2:]


def marked_image(h=40, w=60):
    """BGR image, black, with a pure red block in the top-left corner."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:10, :20] = (0, 0, 255)
    return img


# ----------------------------------------------------------------------------- read_image
def test_read_color_png_is_rgb(tmp_path):
    p = str(tmp_path / 'c.png')
    cv2.imwrite(p, marked_image())
    img = read_image(p)
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [255, 0, 0]  # red in RGB order


def test_read_exif_rotated_jpeg(tmp_path):
    p = tmp_path / 'rot.jpg'
    p.write_bytes(jpeg_with_orientation(marked_image(), 6))  # 6: rotate 90° clockwise to display
    img = read_image(str(p))
    assert img.shape == (60, 40, 3)  # width and height swapped
    # the red block moved from the top-left to the top-right corner
    assert img[2, 35, 0] > 200 and img[2, 35, 2] < 60
    assert img[2, 2, 0] < 60


def test_read_gray_rgba_and_16bit(tmp_path):
    gray = (np.arange(30 * 50).reshape(30, 50) % 256).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'g.png'), gray)
    g = read_image(str(tmp_path / 'g.png'))
    assert g.shape == (30, 50, 3) and (g[..., 0] == gray).all() and (g[..., 2] == gray).all()

    bgra = np.zeros((20, 30, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 128
    cv2.imwrite(str(tmp_path / 'a.png'), bgra)
    a = read_image(str(tmp_path / 'a.png'))
    assert a.shape == (20, 30, 3) and a[0, 0].tolist() == [30, 20, 10]

    v16 = np.array([[0, 257 * 100, 65535]], np.uint16).repeat(4, 0)
    cv2.imwrite(str(tmp_path / 'd.png'), np.stack([v16, v16, v16], -1))
    d = read_image(str(tmp_path / 'd.png'))
    assert d.dtype == np.uint8 and d[0, :, 0].tolist() == [0, 100, 255]


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match='nope.jpg: no such image file'):
        read_image(str(tmp_path / 'nope.jpg'))
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'this is not an image')
    with pytest.raises(UserError, match='bad.png: not a readable image'):
        read_image(str(bad))
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(UserError, match='empty.jpg'):
        read_image(str(empty))


# ----------------------------------------------------------------------------- letterbox
def test_letterbox_shapes_normalisation_and_padding():
    img = np.full((100, 200, 3), 255, np.uint8)
    x, meta = letterbox(img, 128)
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32
    assert meta == ImageMeta(0.64, (100, 200), (128, 128), (64, 128))
    expect = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[:, :64].mean((1, 2)).numpy(), expect, rtol=1e-5)
    assert (x[:, 64:] == 0).all()  # padding is 0 after normalisation
    x2, meta2 = letterbox(img, (128, 384))  # explicit H x W: height limits
    assert x2.shape == (3, 128, 384) and meta2.resized_hw == (128, 256) and (x2[:, :, 256:] == 0).all()


def test_boxes_map_back_to_the_original():
    """A white rectangle found in the network input maps back onto the original rectangle."""
    h, w = 333, 517
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = 101, 57, 300, 222
    img[y1:y2, x1:x2] = 255
    x, meta = letterbox(img, 256)
    on = (x[0] > 0).numpy()
    ys, xs = np.nonzero(on)
    net_box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = boxes_to_original(net_box, meta)
    np.testing.assert_allclose(back[0], [x1, y1, x2, y2], atol=2.5)
    # the inverse of the training / official mapping (one scale), and clipping to the original
    s = meta.scale
    fwd = np.array([[10.0 * s, 20.0 * s, 400.0 * s, 300.0 * s], [-5, -5, 600, 600]], np.float32)
    back = boxes_to_original(torch.from_numpy(fwd), meta)
    np.testing.assert_allclose(back[0], [10, 20, 400, 300], rtol=1e-5)
    assert back[1].tolist() == [0, 0, w, h]


def test_preprocess_batch_mixed_sources_and_sizes(tmp_path):
    a = (np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)
    p = str(tmp_path / 'a.png')
    cv2.imwrite(p, a[..., ::-1])
    t = torch.from_numpy(a).permute(2, 0, 1)  # CHW uint8
    tf = t.float() / 255.0  # CHW float in [0, 1]
    gray = a[..., 0]
    batch, metas = preprocess_batch([p, a, t, tf, gray, a[:20]], 128)
    assert batch.shape == (6, 3, 128, 128)
    for k in (1, 2, 3):
        torch.testing.assert_close(batch[k], batch[0], atol=1e-5, rtol=0)
    assert metas[-1].orig_hw == (20, 80) and metas[-1].resized_hw == (32, 128)
    assert metas[4].resized_hw == (80, 128)
    raw = batch[4, :, :80] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)  # gray -> 3 equal channels
    torch.testing.assert_close(raw[1], raw[2], atol=1e-5, rtol=0)
    # resized as uint8 (like the training data), then normalised
    torch.testing.assert_close(raw[0] * 255, torch.from_numpy(cv2.resize(gray, (128, 80)).astype(np.float32)),
                               atol=1e-3, rtol=0)
    bgr_batch, _ = preprocess_batch(a[..., ::-1].copy(), 128, bgr=True)
    torch.testing.assert_close(bgr_batch[0], batch[0])
    # channels_last: the same values (padding included), laid out B, H, W, 3, for every source
    cl, cl_metas = preprocess_batch([p, a, t, tf, gray, a[:20]], 128, channels_last=True)
    assert cl.shape == batch.shape and cl.is_contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous() and torch.equal(cl, batch) and cl_metas == metas
    cl_bgr, _ = preprocess_batch(a[..., ::-1].copy(), 128, bgr=True, channels_last=True)
    assert torch.equal(cl_bgr[0], batch[0])
    with pytest.raises(UserError, match='missing.png'):
        preprocess_batch([p, str(tmp_path / 'missing.png')], 128)


# ----------------------------------------------------------------------------- Yet-Another helpers
def test_yet_another_preprocess_and_invert_affine(tmp_path):
    from utils.utils import aspectaware_resize_padding, invert_affine, preprocess
    img = (np.random.default_rng(1).random((60, 90, 3)) * 255).astype(np.uint8)
    p = str(tmp_path / 'x.png')
    cv2.imwrite(p, img)
    ori, framed, metas = preprocess(p, max_size=128)
    assert (ori[0] == img).all()  # BGR, like cv2.imread
    assert framed[0].shape == (128, 128, 3) and framed[0].dtype == np.float32
    assert metas[0] == (128, 85, 90, 60, 0, 43)  # new_w, new_h (truncated), old_w, old_h, pad_w, pad_h
    assert (framed[0][85:] == 0).all()
    rgb_norm = (img[0, 0, ::-1] / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    canvas = aspectaware_resize_padding(np.tile(rgb_norm, (60, 90, 1)), 128, 128)[0]
    np.testing.assert_allclose(canvas[0, 0], rgb_norm, rtol=1e-5)
    preds = [{'rois': np.array([[128.0, 85.0, 64.0, 42.5]]), 'class_ids': np.array([0]), 'scores': np.array([0.5])}]
    out = invert_affine(metas, preds)
    np.testing.assert_allclose(out[0]['rois'][0], [90, 60, 45, 30])
    out = invert_affine(0.5, [{'rois': np.array([[1.0, 2.0, 3.0, 4.0]])}])
    np.testing.assert_allclose(out[0]['rois'][0], [2, 4, 6, 8])


# ----------------------------------------------------------------------------- drawing
def test_draw_detections_colours_are_stable_and_drawn():
    assert len(PALETTE_NAMES) >= 20 and len(set(PALETTE_NAMES)) == len(PALETTE_NAMES)
    assert class_color(3) == class_color(3 + len(PALETTE_NAMES))
    assert class_color(0) != class_color(1)
    assert class_color(2, rgb=True) == class_color(2)[::-1]
    img = np.zeros((100, 120, 3), np.uint8)
    out = draw_detections(img, [[30, 40, 90, 80]], [0.87], [2], ['a', 'b', 'c'], thickness=2)
    assert (img == 0).all()  # the input is untouched
    assert tuple(out[80, 60]) == class_color(2)  # bottom edge in the class colour (B, G, R)
    assert tuple(out[60, 90]) == class_color(2)  # right edge
    assert (out[60, 60] == 0).all()  # inside stays
    rgb = draw_detections(img, [[30, 40, 90, 80]], [0.87], [2], ['a', 'b', 'c'], rgb=True, thickness=2)
    assert tuple(rgb[80, 60]) == class_color(2, rgb=True)


