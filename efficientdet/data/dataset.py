"""Detection dataset over any registered format, its collate function and loader builder.

A split is read by its format (:mod:`efficientdet.data.formats`: ``coco`` json, Pascal ``voc``,
``yolo``) and validated by :func:`efficientdet.data.annotations.index_coco` — the rules that
``python -m efficientdet.data.check`` lists and evaluation uses. :func:`build_dataset` builds one
from a project file (``dataset_format``, ``obj_list``, mean/std).
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from .annotations import (CROWD_CLASS, ISSUES, SKIPPING, CocoIndex, Issues, check_boxes, coco_from_dict, index_coco,
                          load_coco_json)
from .formats import get_format, load_split
from .images import load_image_checked
from .transforms import DetectionTransform, Size, UserTransform, apply_user_transform, as_hw, normalize_pad

# the annotation names are re-exported: they lived here before data/annotations.py
__all__ = ['CocoDataset', 'DetectionDataset', 'build_dataset', 'collate_fn', 'seed_worker', 'build_dataloader',
           'PAD_VALUE', 'CROWD_CLASS', 'ISSUES', 'CocoIndex', 'Issues', 'check_boxes', 'index_coco', 'load_coco_json',
           'load_image_checked']

PAD_VALUE = -1.0
# Bits of the per-image flags that data-loader workers set in shared memory.
_FLAG_BITS = {'corrupt_image': 1, 'size_mismatch': 2, 'truncated_image': 4}


class CocoDataset(Dataset):
    """Detection dataset (any ``dataset_format``) with letterbox, optional official augmentation
    and an optional user transform.

    ``__getitem__`` → dict(img=float32 [3, H, W] normalised RGB, letterboxed and zero-padded
    bottom/right; annot=float32 [N, 5] (x1, y1, x2, y2, class) xyxy network-input pixels, class
    0-based in obj_list order, -2 for crowd; image_id=int (dataset id); scale=float (network px per
    original px); orig_size=(h, w) of the file). Unreadable images are skipped (the next readable
    one is returned) and counted; see :attr:`stats` and :meth:`summary`.

    ``transform(image, boxes, labels) -> (image, boxes, labels)``: a user augmentation applied to
    each original image first — image RGB uint8 [H, W, 3], boxes float32 [N, 4] xyxy image pixels,
    labels int64 [N] (class index, -2 crowd) — followed by the official flip and scale jitter when
    ``augment`` is True, or by the plain letterbox when it is False (the user transform then
    replaces the official augmentation). An albumentations ``Compose`` works through
    :func:`efficientdet.data.transforms.albumentations_transform`.
    """

    def __init__(self, root_dir: str, set_name: str, obj_list: Optional[Sequence[str]], image_size: Size,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: bool = False, scale_range: Tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5,
                 dataset_format: str = 'coco', transform: Optional[UserTransform] = None,
                 require_images: bool = True):
        self.root_dir, self.set_name = root_dir, set_name
        self.image_size = as_hw(image_size)
        if min(self.image_size) <= 0:
            raise UserError(f'image size must be positive, got {image_size}')
        if transform is not None and not callable(transform):
            raise TypeError(f'transform must be a callable (image, boxes, labels) -> (image, boxes, labels), '
                            f'got {type(transform).__name__}')
        self.dataset_format = get_format(dataset_format).name
        index = load_split(root_dir, set_name, obj_list, self.dataset_format, require_images=require_images)
        self.ann_file, self.image_dir = index.ann_file, index.image_dir
        if len(index.image_ids) == 0:
            raise UserError(f'{self.ann_file}: no usable images in {self.image_dir} '
                            f'(run python -m efficientdet.data.check to see why)')
        self.index = index
        self.obj_list: List[str] = index.names
        self.cat_ids: List[int] = index.cat_ids
        self.image_ids: List[int] = index.image_ids.tolist()
        self.transform = DetectionTransform(self.image_size, augment, scale_range, flip_prob)
        self.user_transform = transform
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        # Per-image problem flags found while loading, shared with data-loader workers.
        self._flags = torch.zeros(len(self.image_ids), dtype=torch.uint8)
        try:
            self._flags.share_memory_()
        except (RuntimeError, OSError):  # no shared memory: counts from workers stay local
            pass
        self._coco = None

    @property
    def images_found(self) -> bool:
        """False when built with ``require_images=False`` and the image folder is absent: the
        dataset then serves only its ground truth (``coco``, ``image_ids``), no items."""
        return bool(self.index.images_checked)

    @property
    def coco(self):
        """pycocotools ``COCO`` over the cleaned annotations (built on first use)."""
        if self._coco is None:
            self._coco = coco_from_dict(self.index.coco_dataset, self.ann_file, validate=False)
        return self._coco

    @property
    def num_classes(self) -> int:
        return len(self.obj_list)

    def __getstate__(self) -> Dict[str, Any]:  # workers do not need the pycocotools index
        state = self.__dict__.copy()
        state['_coco'] = None
        return state

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Boxes [N, 4] float32 xyxy original pixels and classes [N] int64 of item ``i``."""
        s, e = self.index.ranges[i]
        return self.index.boxes[s:e], self.index.labels[s:e]

    def load_image(self, i: int) -> Optional[np.ndarray]:
        """RGB uint8 [H, W, 3] of item ``i``, or None (and flagged) when it cannot be decoded."""
        flags = self._flags.numpy()  # shares memory with the tensor (and with workers)
        if flags[i] & _FLAG_BITS['corrupt_image']:
            return None
        img, problems = load_image_checked(str(self.index.paths[i]), self.index.sizes[i])
        for p in problems:
            flags[i] |= _FLAG_BITS[p]
        return img

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        if not self.images_found:
            raise UserError(f'{self.image_dir}: image folder not found; this dataset holds ground truth only')
        n = len(self)
        for k in range(n):
            i = (idx + k) % n
            img = self.load_image(i)
            if img is not None:
                break
        else:
            raise UserError(f'none of the {n} images in {self.image_dir} can be decoded')
        boxes, labels = self.annotations(i)
        h, w = img.shape[:2]
        if self._flags.numpy()[i] & _FLAG_BITS['size_mismatch']:  # annotated size was wrong: clip to the file
            keep, boxes, _, _ = check_boxes(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1),
                                            np.tile(np.array([[h, w]], np.float32), (len(boxes), 1)))
            boxes, labels = boxes[keep].astype(np.float32), labels[keep]
        rng = None
        if self.augment:
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,)).item()))
        image = img
        if self.user_transform is not None:
            image, boxes, labels = apply_user_transform(self.user_transform, img, boxes, labels)
            h, w = image.shape[:2]  # scale and orig_size then describe the transformed image
        content, boxes, labels, scale = self.transform(image, boxes, labels, rng)
        annot = np.concatenate([boxes.reshape(-1, 4), labels.reshape(-1, 1).astype(np.float32)], 1)
        return dict(img=self.normalize_pad(content), annot=torch.from_numpy(annot.astype(np.float32)),
                    image_id=int(self.image_ids[i]), scale=scale, orig_size=(int(h), int(w)))

    def normalize_pad(self, content: np.ndarray) -> torch.Tensor:
        """uint8 RGB [h, w, 3] → normalised float32 [3, H, W] padded bottom/right (shared helper)."""
        return normalize_pad(content, self.image_size, self.mean, self.std)

    @property
    def stats(self) -> Dict[str, int]:
        """Counters: images, boxes, crowd and every problem kind of :data:`ISSUES`."""
        out = dict(images=len(self), boxes=int(len(self.index.labels)), crowd=self.index.num_crowd)
        out.update(self.index.issues.counts)
        flags = self._flags.numpy()
        for kind, bit in _FLAG_BITS.items():
            out[kind] = out[kind] + int(np.count_nonzero(flags & bit))
        return out

    def summary(self) -> str:
        """One line: what the set holds and what was skipped, dropped or clipped."""
        s = self.stats
        head = (f'{self.set_name}: {s["images"]} images ({s["image_without_annotations"]} without boxes), '
                f'{s["boxes"]} boxes ({s["crowd"]} crowd)')
        skipped = [f'{k}={s[k]}' for k in SKIPPING if s[k]]
        notes = [f'{k}={s[k]}' for k in ('box_clipped', 'size_mismatch', 'truncated_image') if s[k]]
        tail = '; skipped: ' + ', '.join(skipped) if skipped else '; nothing skipped'
        if notes:
            tail += '; fixed up: ' + ', '.join(notes)
        return head + tail + ('' if not skipped else ' (python -m efficientdet.data.check lists them)')

    def __repr__(self) -> str:
        return (f'{type(self).__name__}({self.ann_file!r}, {self.dataset_format}, {len(self)} images, '
                f'{self.num_classes} classes, {self.transform}'
                + (f', transform={self.user_transform!r}' if self.user_transform is not None else '') + ')')


#: The dataset class under a format-neutral name (``CocoDataset`` reads every format).
DetectionDataset = CocoDataset


def build_dataset(project: Any, split: str, image_size: Size, data_path: str = 'datasets/', *,
                  augment: bool = False, transform: Optional[UserTransform] = None,
                  mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                  require_images: bool = True, **kwargs: Any) -> CocoDataset:
    """The dataset of a project's split (``split`` = a set name such as ``project.train_set``):
    ``{data_path}/{project_name}/`` read with the project's ``dataset_format``, classes from its
    obj_list, normalisation ``mean``/``std`` (default: the project's). ``transform``: a user
    augmentation (see :class:`CocoDataset`); other keyword arguments go to :class:`CocoDataset`."""
    fmt = get_format(getattr(project, 'dataset_format', 'coco'), f'{getattr(project, "path", "project")}: '
                     'dataset_format')
    return CocoDataset(os.path.join(data_path, project.project_name), split, project.obj_list, image_size,
                       project.mean if mean is None else mean, project.std if std is None else std,
                       augment=augment, dataset_format=fmt.name,
                       transform=transform, require_images=require_images, **kwargs)


def collate_fn(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack samples: img [B, 3, H, W]; annot [B, Nmax, 5] padded with -1 rows (Nmax >= 1);
    image_id list[int]; scale float32 [B]; orig_size list[(h, w)]."""
    imgs = torch.stack([b['img'] for b in batch])
    annots = [b['annot'].reshape(-1, 5) for b in batch]
    annot = torch.nn.utils.rnn.pad_sequence(annots, batch_first=True, padding_value=PAD_VALUE)
    if annot.shape[1] == 0:
        annot = torch.full((len(batch), 1, 5), PAD_VALUE, dtype=torch.float32)
    return dict(img=imgs, annot=annot, image_id=[b['image_id'] for b in batch],
                scale=torch.tensor([b['scale'] for b in batch], dtype=torch.float32),
                orig_size=[b['orig_size'] for b in batch])


def seed_worker(worker_id: int) -> None:
    """Seed numpy / random in a data-loader worker from its torch seed (reproducible runs)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                     distributed: bool = False, seed: int = 0, drop_last: bool = False,
                     num_replicas: Optional[int] = None, rank: Optional[int] = None) -> DataLoader:
    """DataLoader with :func:`collate_fn`, a seeded generator, DistributedSampler when
    ``distributed`` (replicas/rank from the process group unless given; call
    ``loader.sampler.set_epoch(epoch)`` each epoch), pinned memory when CUDA is available and
    persistent workers when ``num_workers > 0``."""
    if batch_size < 1:
        raise UserError(f'batch size must be at least 1, got {batch_size}')
    if num_workers < 0:
        raise UserError(f'num_workers must be >= 0, got {num_workers}')
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=num_workers > 0, worker_init_fn=seed_worker if num_workers > 0 else None,
                      generator=generator)
