"""Figures for people: evaluation curves and dataset pictures, written as PNG files.

matplotlib is optional (``pip install matplotlib``) and imported only when a figure is made; the
package imports without it. Figures are drawn on matplotlib's Agg canvas without pyplot (no GUI,
no global figure registry) and written atomically.

Every figure function takes plain numbers (the metrics of
:meth:`efficientdet.evaluation.COCOEvaluator.compute`, or arrays) and returns the matplotlib
``Figure``; the artists that carry the numbers have a ``gid`` (e.g. ``'AP'`` bars, ``'pr/0.5'``
lines) so that they can be read back. :func:`write_eval_plots` writes the evaluation set,
``python -m efficientdet.data.check --plots`` the dataset set (:func:`samples_figure`,
:func:`box_shapes_figure`, :func:`class_counts_figure`).
"""
from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ['INSTALL_HINT', 'require_matplotlib', 'figure_rgb', 'save_png', 'pr_figure', 'pr_rgb', 'pr_per_class_figure',
           'ap_per_class_figure', 'ap_by_size_figure', 'confusion_figure', 'eval_figures', 'write_eval_plots',
           'samples_figure', 'box_shapes_figure', 'class_counts_figure', 'write_figures']

INSTALL_HINT = 'pip install matplotlib'
DPI = 100
_AREAS = ('small', 'medium', 'large')


def require_matplotlib(flag: str = '--plots', out_dir: Optional[str] = None) -> None:
    """Raise UserError (one line) when matplotlib is missing (saying what to pip install) or when
    ``out_dir`` is given and exists as something other than a folder: call it before long work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f'{flag} draws with matplotlib, which is not installed: {INSTALL_HINT}') from None
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f'{flag} {out_dir}: exists and is not a folder; name a folder for the PNG files')


def _figure(width: float, height: float, layout: Optional[str] = 'constrained') -> 'Figure':
    """A new Figure (inches) on an Agg canvas, constrained layout unless ``layout`` is None."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def figure_rgb(fig: 'Figure') -> np.ndarray:
    """The rendered figure as uint8 RGB [H, W, 3] (e.g. for TensorBoard's ``add_image``, HWC)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: 'Figure', path: str) -> str:
    """Write ``fig`` to ``path`` as PNG, atomically; returns the path."""
    from .ckpt.files import atomic_write
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=DPI)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def write_figures(figures: Mapping[str, 'Figure'], out_dir: str, log: Callable[[str], None] = print) -> List[str]:
    """Save ``{file name: figure}`` as ``out_dir/NAME`` and say so (naming the files replaced)."""
    require_matplotlib(out_dir=out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths, replaced = [], []
    for name, fig in figures.items():
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            replaced.append(name)
        paths.append(save_png(fig, path))
    note = ('' if not replaced else '; each replaced an earlier file of that name' if len(replaced) == len(paths)
            else f'; replaced the earlier {", ".join(replaced)}')
    log(f'plots: wrote {", ".join(figures)} to {out_dir}{note}')
    return paths


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes, color='0.4')
    ax.set_xticks([])
    ax.set_yticks([])


def _label(name: str, index: int) -> str:
    return str(name) if name else f'class {index}'


# ----------------------------------------------------------------------------- evaluation
def _curves(metrics: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[str]]:
    """(precision [T, R, K], recall thresholds [R], valid [K] (class has ground truth), names)."""
    c = metrics.get('curves')
    if c is None:
        raise ValueError('metrics have no "curves": compute them with efficientdet.evaluation.COCOEvaluator')
    p = np.asarray(c['precision'], dtype=np.float64)
    valid = (p > -1).all(axis=(0, 1)) if p.size else np.zeros(p.shape[-1], dtype=bool)
    return p, np.asarray(c['recall_thresholds'], dtype=np.float64), valid, list(c['names'])


def _pr_axes(ax: Any) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('recall')
    ax.set_ylabel('precision')
    ax.grid(alpha=0.3)


def pr_figure(metrics: Mapping[str, Any], title: str = 'precision-recall, all classes') -> 'Figure':
    """Precision over recall, mean over the classes with ground truth, at IoU 0.5 (line gid
    ``'pr/0.5'``; its mean over recall is AP50) and averaged over IoU 0.5:0.95 (``'pr/0.5:0.95'``;
    mean = AP). COCOeval's interpolated precision at 101 recall points, area all, 100 dets."""
    p, rec, valid, _ = _curves(metrics)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    if not valid.any():
        _no_data(ax, 'no ground truth in the evaluated images')
    else:
        at50 = p[0][:, valid].mean(1)
        avg = p[:, :, valid].mean(axis=(0, 2))
        ax.plot(rec, at50, gid='pr/0.5', label=f'IoU 0.5  (AP50 {float(metrics["AP50"]):.3f})')
        ax.plot(rec, avg, gid='pr/0.5:0.95', label=f'IoU 0.5:0.95  (AP {float(metrics["AP"]):.3f})')
        ax.legend(loc='best')
        _pr_axes(ax)
    images = f', {metrics["num_images"]} images' if 'num_images' in metrics else ''
    ax.set_title(f'{title} ({int(valid.sum())} classes{images})')
    return fig


def pr_rgb(metrics: Mapping[str, Any]) -> np.ndarray:
    """:func:`pr_figure` rendered as uint8 RGB [H, W, 3] (TensorBoard at each validation)."""
    return figure_rgb(pr_figure(metrics))


def pr_per_class_figure(metrics: Mapping[str, Any]) -> 'Figure':
    """One panel per class with ground truth (title gid = class name): precision over recall at
    IoU 0.5 (``'pr/0.5'``) and averaged over 0.5:0.95 (``'pr/0.5:0.95'``)."""
    p, rec, valid, names = _curves(metrics)
    ks = np.flatnonzero(valid)
    cols = max(1, math.ceil(math.sqrt(len(ks))))
    rows = max(1, math.ceil(len(ks) / cols))
    width, height = max(2.4 * cols, 5.0) + 0.6, 2.3 * rows + 1.2
    fig = _figure(width, height, layout=None)  # fixed margins: constrained layout is slow for many panels
    if not len(ks):
        _no_data(fig.add_subplot(), 'no class has ground truth in the evaluated images')
        return fig
    fig.subplots_adjust(left=0.5 / width, right=1 - 0.15 / width, bottom=0.8 / height, top=1 - 1.0 / height,
                        wspace=0.12, hspace=0.45)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(ks):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, ks):
        ax.plot(rec, p[0, :, k], gid='pr/0.5', lw=1.2, label='IoU 0.5')
        ax.plot(rec, p[:, :, k].mean(0), gid='pr/0.5:0.95', lw=1.2, label='IoU 0.5:0.95')
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f'{_label(names[k], k)}\nAP50 {p[0, :, k].mean():.3f}  AP {p[:, :, k].mean():.3f}',
                     fontsize=8, gid=names[k])
        ax.tick_params(labelsize=7)
    fig.suptitle('precision (y) over recall (x) per class', y=1 - 0.15 / height, va='top')
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc='lower center', ncols=2)
    return fig


def _valid_rows(metrics: Mapping[str, Any]) -> List[Dict[str, Any]]:
    return [r for r in metrics.get('per_class', []) if r['AP'] >= 0]


def ap_per_class_figure(metrics: Mapping[str, Any]) -> 'Figure':
    """Horizontal bars per class with ground truth, best first: AP (IoU 0.5:0.95, gid ``'AP'``)
    and AP50 (gid ``'AP50'``), as in the per-class table; dashed line: the overall AP."""
    rows = sorted(_valid_rows(metrics), key=lambda r: -r['AP'])
    fig = _figure(7, 1.6 + 0.3 * max(len(rows), 3))
    ax = fig.add_subplot()
    if not rows:
        _no_data(ax, 'no class has ground truth in the evaluated images')
        return fig
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r['AP50'] for r in rows], height=0.4, label='AP50', gid='AP50', color='tab:orange')
    ax.barh(y + 0.2, [r['AP'] for r in rows], height=0.4, label='AP (IoU 0.5:0.95)', gid='AP', color='tab:blue')
    ax.axvline(float(metrics['AP']), ls='--', color='tab:blue', lw=1, gid='mAP')
    ax.set_yticks(y, [_label(r['name'], r['category_id']) for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel('average precision')
    fig.legend(loc='outside lower center', ncols=2)
    ax.set_title(f'AP per class (dashed: mAP {float(metrics["AP"]):.3f})')
    return fig


def ap_by_size_figure(metrics: Mapping[str, Any]) -> 'Figure':
    """AP (IoU 0.5:0.95) by object size: bars of COCOeval's APs / APm / APl over all classes (gid
    ``'AP_by_size'``; a size without objects: height 0, marked "none") and a per-class table as an
    image (gid ``'AP_by_size/class'``, [K, 3], NaN where the class has no object of that size)."""
    overall = [float(metrics[k]) for k in ('APs', 'APm', 'APl')]
    rows = _valid_rows(metrics)
    fig = _figure(9, max(3.5, 1.2 + 0.22 * len(rows)))
    ax, ax2 = fig.subplots(1, 2, width_ratios=(1, 1.2))
    bars = ax.bar(_AREAS, [max(v, 0.0) for v in overall], gid='AP_by_size', color='tab:blue')
    for b, v in zip(bars, overall):
        ax.text(b.get_x() + b.get_width() / 2, max(v, 0.0) + 0.01, f'{v:.3f}' if v >= 0 else 'none',
                ha='center', va='bottom')
    ax.set_ylim(0, 1)
    ax.set_ylabel('AP (IoU 0.5:0.95)')
    ax.set_title('all classes (area < 32², 32²-96², > 96² px)', fontsize=9)
    if rows:
        table = np.array([[r[f'AP{a[0]}'] for a in _AREAS] for r in rows], dtype=np.float64)
        table[table < 0] = np.nan
        im = ax2.imshow(table, aspect='auto', vmin=0, vmax=1, cmap='viridis', gid='AP_by_size/class')
        ax2.set_xticks(range(3), _AREAS)
        ax2.set_yticks(range(len(rows)), [_label(r['name'], r['category_id']) for r in rows], fontsize=7)
        fig.colorbar(im, ax=ax2, label='AP')
        ax2.set_title('per class (blank: no objects of that size)', fontsize=9)
    else:
        _no_data(ax2, 'no class has ground truth')
    fig.suptitle('AP by object size')
    return fig


def confusion_figure(confusion: Mapping[str, Any]) -> 'Figure':
    """Confusion matrix (rows: true class, columns: detected class, last row / column:
    background). Colour = share of the row (gid ``'confusion'``); each non-zero cell shows its
    count (gid ``'count'``)."""
    m = np.asarray(confusion['matrix'], dtype=np.int64)
    names = [_label(n, i) for i, n in enumerate(confusion['names'])] + ['background']
    n = len(names)
    side = min(4 + 0.38 * n, 32)
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot()
    sums = m.sum(1, keepdims=True)
    share = np.divide(m, sums, out=np.zeros(m.shape), where=sums > 0)
    im = ax.imshow(share, cmap='Blues', vmin=0, vmax=1, gid='confusion')
    fig.colorbar(im, ax=ax, label='share of the row', shrink=0.6)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    size = float(np.clip(0.6 * side * 72 / n / 3, 4, 8))  # about three digits per cell
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha='center', va='center', fontsize=size,
                    color='white' if share[i, j] > 0.5 else 'black', gid='count')
    ax.set_xlabel('detected class (background: a box no detection found)')
    ax.set_ylabel('true class (background: a detection matching no box)')
    ax.set_title(f'confusion at IoU >= {confusion["iou_threshold"]:g}, detections scoring >= '
                 f'{confusion["score_threshold"]:g}')
    return fig


def eval_figures(metrics: Mapping[str, Any]) -> Dict[str, 'Figure']:
    """All evaluation figures by file name."""
    figs = {'pr_curve.png': pr_figure(metrics), 'pr_curves_per_class.png': pr_per_class_figure(metrics),
            'ap_per_class.png': ap_per_class_figure(metrics), 'ap_by_size.png': ap_by_size_figure(metrics)}
    if metrics.get('confusion') is not None:
        figs['confusion_matrix.png'] = confusion_figure(metrics['confusion'])
    return figs


def write_eval_plots(source: Union[Mapping[str, Any], Any], out_dir: str,
                     log: Callable[[str], None] = print) -> List[str]:
    """Write the evaluation figures of ``source`` (the metrics of ``COCOEvaluator.compute``, or a
    ``COCOEvaluator``, computed first when it has not been) to ``out_dir``: pr_curve.png,
    pr_curves_per_class.png, ap_per_class.png, ap_by_size.png, confusion_matrix.png."""
    require_matplotlib(out_dir=out_dir)
    if isinstance(source, Mapping):
        metrics = source
    else:
        metrics = source.metrics if getattr(source, 'metrics', None) is not None else source.compute()
    return write_figures(eval_figures(metrics), out_dir, log)


# ----------------------------------------------------------------------------- datasets
def samples_figure(samples: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray, str]], names: Sequence[str],
                   title: str = '') -> 'Figure':
    """Grid of images with their ground truth. ``samples``: (image RGB uint8 [H, W, 3], boxes
    [N, 4] x1, y1, x2, y2 pixels of that image, labels [N] class index or -2 for crowd, caption).
    Each box is a rectangle patch (gid ``'gt'``, crowd dashed, gid ``'crowd'``) with its class
    name; colours are the detection drawings' (``visualize.class_color``)."""
    from matplotlib.patches import Rectangle
    from .visualize import class_color
    cols = max(1, min(4, math.ceil(math.sqrt(len(samples)))))
    rows = max(1, math.ceil(len(samples) / cols))
    fig = _figure(3.2 * cols, 3.0 * rows + 0.4)
    if not samples:
        _no_data(fig.add_subplot(), 'no readable images')
        return fig
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (img, boxes, labels, caption) in zip(axes.flat, samples):
        ax.imshow(img)
        for (x1, y1, x2, y2), c in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                                       np.asarray(labels).reshape(-1).astype(np.int64)):
            crowd = c < 0
            color = '0.6' if crowd else tuple(v / 255.0 for v in class_color(int(c), rgb=True))
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=color,
                                   ls='--' if crowd else '-', gid='crowd' if crowd else 'gt'))
            ax.text(x1, y1, 'crowd' if crowd else _label(names[c] if c < len(names) else '', int(c)),
                    fontsize=6, va='bottom', color='black', gid='name',
                    bbox=dict(boxstyle='square,pad=0.1', fc=color, ec='none', alpha=0.8))
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def _log_bins(values: np.ndarray, marks: np.ndarray, count: int = 40) -> np.ndarray:
    pos = np.concatenate([values[values > 0], marks[marks > 0]])
    lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (1.0, 2.0)
    return np.geomspace(lo / 1.15, hi * 1.15, count + 1)


def box_shapes_figure(sizes: np.ndarray, aspects: np.ndarray, covered: np.ndarray, anchor_sizes: np.ndarray,
                      anchor_aspects: np.ndarray, input_hw: Tuple[int, int], title: str = '') -> 'Figure':
    """Histograms of box size sqrt(w * h) and aspect ratio w / h, in network-input pixels after the
    letterbox (what anchors match), stacked by whether the box has an anchor with IoU >= 0.5
    (``covered``; gids ``'boxes/covered'``, ``'boxes/uncovered'``), with a vertical line (gid
    ``'anchor'``) at every anchor size and aspect ratio the model generates at that input size."""
    sizes, aspects = np.asarray(sizes, np.float64), np.asarray(aspects, np.float64)
    covered = np.asarray(covered, bool)
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    for ax, values, marks, what in ((axes[0], sizes, np.asarray(anchor_sizes, np.float64), 'size sqrt(w·h), input px'),
                                    (axes[1], aspects, np.asarray(anchor_aspects, np.float64), 'aspect ratio w / h')):
        bins = _log_bins(values, marks)
        ax.hist([values[covered], values[~covered]], bins=bins, stacked=True, color=('tab:green', 'tab:red'),
                label=('an anchor with IoU >= 0.5', 'force-matched only'))
        for container, gid in zip(ax.containers, ('boxes/covered', 'boxes/uncovered')):
            for patch in container:
                patch.set_gid(gid)
        for m in marks:
            ax.axvline(m, color='0.2', lw=0.8, ls=':', gid='anchor')
        ax.set_xscale('log')
        ax.set_xlabel(what)
        ax.set_ylabel('boxes')
    axes[0].legend(loc='upper right', fontsize=8)
    axes[0].set_title(f'box sizes (dotted: the {len(anchor_sizes)} anchor sizes)', fontsize=9)
    axes[1].set_title(f'aspect ratios (dotted: the {len(anchor_aspects)} anchor ratios)', fontsize=9)
    share = float(covered.mean()) if covered.size else 0.0
    fig.suptitle((title + ': ' if title else '') + f'{len(sizes)} boxes at {input_hw[0]}x{input_hw[1]} input, '
                 f'{share:.1%} with an anchor of IoU >= 0.5')
    return fig


def class_counts_figure(names: Sequence[str], counts: Mapping[str, np.ndarray]) -> 'Figure':
    """Boxes per class (crowd left out) as horizontal bars, one series per split (gid = split
    name), classes in obj_list order."""
    k = len(names)
    fig = _figure(7, 1.6 + 0.3 * max(k, 3))
    ax = fig.add_subplot()
    height = 0.8 / max(len(counts), 1)
    y = np.arange(k)
    for j, (split, c) in enumerate(counts.items()):
        c = np.asarray(c, dtype=np.int64)
        bars = ax.barh(y - 0.4 + height * (j + 0.5), c, height=height, label=f'{split} ({int(c.sum())})', gid=split)
        ax.bar_label(bars, fontsize=6, padding=2)
    ax.set_yticks(y, [_label(n, i) for i, n in enumerate(names)], fontsize=8)
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_xlabel('boxes')
    fig.legend(loc='outside lower center', ncols=max(len(counts), 1))
    ax.set_title('boxes per class')
    return fig
