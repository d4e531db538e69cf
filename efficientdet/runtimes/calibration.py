"""Calibration images for post-training int8 quantization (``export tflite --int8``,
``export openvino --int8``).

A :class:`CalibrationSet` is N images of a project's training split, read and preprocessed by the
package's own dataset code (``efficientdet.data.build_dataset``, no augmentation): letterboxed to
the export size, normalised with the normalisation the exported file records, padded bottom/right,
exactly what the model sees at inference. The images are a fixed random sample of the split
(``seed``), all of them when the split holds fewer than N. They are read from disk on each pass,
never all held in memory.

    calib = CalibrationSet(load_project('shape'), 'datasets/', count=300)
    images = calibration_images(calib, (512, 512), mean, std)
    for x in images:            # x: float32 [1, 3, H, W]; iterable again and again
        ...
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import as_hw
from ..errors import UserError

__all__ = ['CalibrationSet', 'CalibrationImages', 'DEFAULT_CALIB_IMAGES', 'add_calibration_arguments',
           'calibration_from_args', 'calibration_images', 'compare_quantized']

DEFAULT_CALIB_IMAGES = 300


class CalibrationSet:
    """``count`` images of ``project``'s training split under ``data_path`` (see the module
    docstring). ``split``: another split name (default ``project.train_set``)."""

    def __init__(self, project: Any, data_path: str = 'datasets/', count: int = DEFAULT_CALIB_IMAGES,
                 seed: int = 0, split: Optional[str] = None):
        if count < 1:
            raise UserError(f'--calib_images {count}: must be at least 1')
        self.project = project
        self.data_path = data_path
        self.count = int(count)
        self.seed = int(seed)
        self.split = split or project.train_set

    def describe(self) -> str:
        """Which images, in a few words (recorded in the exported file's metadata)."""
        return f'{self.project.project_name}/{self.split}'

    def dataset(self, image_size: Tuple[int, int], mean: Sequence[float], std: Sequence[float]):
        """The split as a ``CocoDataset`` at ``image_size`` with ``mean``/``std``; UserError when it
        has no images."""
        from ..data import build_dataset
        ds = build_dataset(self.project, self.split, image_size, self.data_path, mean=mean, std=std)
        if len(ds) == 0:
            raise UserError(f'{ds.ann_file}: no images to calibrate on; int8 needs training images of the '
                            'project (-p, --data_path)')
        return ds

    def indices(self, n: int) -> List[int]:
        """The sample of a split of ``n`` images: ``count`` distinct indices in order (all if fewer)."""
        if n <= self.count:
            return list(range(n))
        return sorted(np.random.default_rng(self.seed).choice(n, self.count, replace=False).tolist())


class CalibrationImages:
    """Normalised float32 [1, 3, H, W] images, iterable any number of times: a
    :class:`CalibrationSet` read from disk on each pass, or prepared [N, 3, H, W] batches."""

    def __init__(self, source: Any, image_size, mean: Sequence[float], std: Sequence[float]):
        self.size = as_hw(image_size)
        self.source = source
        if isinstance(source, CalibrationSet):
            self._dataset = source.dataset(self.size, mean, std)
            self._indices = source.indices(len(self._dataset))
            self._batches: Optional[List[torch.Tensor]] = None
            self.description = source.describe()
        else:
            self._batches = [torch.as_tensor(b).float() for b in source]
            self.description = 'given'
            for b in self._batches:
                if b.dim() != 4 or b.shape[1] != 3 or tuple(b.shape[-2:]) != self.size:
                    raise UserError(f'calibration images must be [N, 3, {self.size[0]}, {self.size[1]}] batches, '
                                    f'got {tuple(b.shape)}')
        if len(self) == 0:
            raise UserError('int8: no calibration images')

    def __len__(self) -> int:
        if self._batches is not None:
            return sum(b.shape[0] for b in self._batches)
        return len(self._indices)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._batches is not None:
            for b in self._batches:
                yield from b.split(1)
            return
        for i in self._indices:
            yield self._dataset[i]['img'].unsqueeze(0)

    def batches(self, batch: int) -> Iterator[torch.Tensor]:
        """[batch, 3, H, W] batches of exactly ``batch`` (a fixed-batch model); the last one is
        filled up with the first images again."""
        first: List[torch.Tensor] = []
        pending: List[torch.Tensor] = []
        for x in self:
            if len(first) < batch:
                first.append(x)
            pending.append(x)
            if len(pending) == batch:
                yield torch.cat(pending)
                pending = []
        if pending:
            yield torch.cat(pending + (first * batch)[:batch - len(pending)])

    def head(self, count: int) -> torch.Tensor:
        """The first ``count`` images as one [count, 3, H, W] batch (fewer if there are fewer)."""
        out: List[torch.Tensor] = []
        for x in self:
            out.append(x)
            if len(out) == count:
                break
        return torch.cat(out)


def calibration_images(calibration: Any, image_size, mean: Sequence[float], std: Sequence[float]
                       ) -> CalibrationImages:
    """:class:`CalibrationImages` of a :class:`CalibrationSet` or of an iterable of normalised
    [N, 3, H, W] batches, at ``image_size``."""
    if calibration is None:
        raise UserError('int8 calibrates on training images: pass -p PROJECT (and --data_path)')
    if isinstance(calibration, CalibrationImages):
        return calibration
    return CalibrationImages(calibration, image_size, mean, std)


def compare_quantized(path: str, runtime: Any, model: torch.nn.Module, images: CalibrationImages, label: str,
                      count: int = 8) -> Dict[str, float]:
    """A quantized export (``runtime``, the contract of ``runtimes.base``) against the eager
    ``model`` on the first ``count`` calibration images: the anchors must be exactly the model's
    (UserError otherwise: they are never quantized); the max |diff| of the regression and of the
    best-class scores is returned as ``{label + ' regression': .., label + ' scores': ..}``,
    reported, not gated (int8 accuracy is measured as mAP)."""
    from ..postprocess import BestClass
    x = images.head(count)
    p = next(model.parameters())
    with torch.inference_mode():
        _, reg, cls, anchors = model(x.to(device=p.device, dtype=p.dtype))
        _, q_reg, q_cls, q_anchors = runtime(x)
    if not torch.equal(torch.as_tensor(q_anchors).float().cpu(), anchors.float().cpu()):
        raise UserError(f'{path}: the anchors differ from the model\'s (they must stay float32, outside the '
                        'quantized graph)')
    # the file's best class is taken among its real classes: so is the reference's
    ref = BestClass.of(cls, getattr(runtime, 'allowed', None)).scores if isinstance(q_cls, BestClass) else cls
    got = q_cls.scores if isinstance(q_cls, BestClass) else q_cls
    return {f'{label} regression': float((torch.as_tensor(q_reg).float() - reg.float().cpu()).abs().max()),
            f'{label} scores': float((torch.as_tensor(got).float() - ref.float().cpu()).abs().max())}


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    """``--data_path`` (the scripts' shared option) and ``--calib_images``: the int8 export options
    (``-p`` names the project)."""
    from ..options import add_options
    add_options(p, 'data_path')
    p.add_argument('--calib_images', type=int, default=DEFAULT_CALIB_IMAGES,
                   help=f'--int8: training images of the project calibrated on (default {DEFAULT_CALIB_IMAGES}; '
                        'all if fewer)')


def calibration_from_args(args: argparse.Namespace, flag: str = '--int8') -> CalibrationSet:
    """The :class:`CalibrationSet` of parsed export options: the project (``-p``, default the
    scripts' default project; ``--projects_dir``), ``--data_path``, ``--calib_images``; UserError
    for a model without a project (``--num_classes``)."""
    if getattr(args, 'num_classes', None) is not None:
        raise UserError(f'{flag} calibrates on training images of a project: pass -p PROJECT (and --data_path '
                        'holding its images) instead of --num_classes')
    from ..options import project_name
    from ..project import load_project
    return CalibrationSet(load_project(project_name(args), args.projects_dir), args.data_path, args.calib_images)
