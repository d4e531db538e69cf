"""``Detector``: images in, per-image ``Detections`` (original-image pixels) out.

    det = Detector.from_checkpoint('weights/efficientdet-d0-shape.pth', compound_coef=0, project='shape')
    for d in det(['a.jpg', 'b.png']):
        print(d.boxes, d.scores, d.class_names)

Pipeline (``Detector.__call__``): letterbox + normalise → model → decode + NMS → map back.
The model is any callable ``model(batch [B, 3, H, W]) -> (features, regression, classification,
anchors)`` — an ``EfficientDetBackbone`` or, e.g., an exported runtime wrapped to that contract.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_SCALES, as_hw, check_image_size, ratios_for, resolve_normalization
from .devices import parse_device
from .errors import UserError
from .postprocess import NMS_METHODS, class_mask, detect
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageLike, ImageMeta, boxes_to_original, preprocess_batch
from .visualize import draw_detections

ModelFn = Callable[[torch.Tensor], Tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Detections:
    """Detections of one image, in original-image pixels.

    boxes [N, 4] float32 (x1, y1, x2, y2), scores [N] float32, class_ids [N] int64 (0-based, obj_list
    order), class_names [N]; score descending.
    """
    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: List[str] = field(default_factory=list)
    image_hw: Optional[Tuple[int, int]] = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_list(self) -> List[Dict[str, Any]]:
        """One JSON-ready dict per detection: x1, y1, x2, y2 (original pixels), score, class_id,
        class_name."""
        return [{'x1': float(b[0]), 'y1': float(b[1]), 'x2': float(b[2]), 'y2': float(b[3]),
                 'score': float(s), 'class_id': int(c), 'class_name': n}
                for b, s, c, n in zip(self.boxes, self.scores, self.class_ids, self.class_names)]

    def to_coco(self, image_id: int, cat_ids: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
        """COCO result dicts {image_id, category_id, bbox [x, y, w, h], score}. ``cat_ids[class_id]``
        gives the category id; without it, class_id + 1 (Yet-Another's 90-entry COCO obj_list)."""
        out = []
        for b, s, c in zip(self.boxes, self.scores, self.class_ids):
            cat = int(cat_ids[int(c)]) if cat_ids is not None else int(c) + 1
            out.append({'image_id': int(image_id), 'category_id': cat,
                        'bbox': [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        'score': float(s)})
        return out

    def draw(self, image: np.ndarray, rgb: bool = False) -> np.ndarray:
        """Annotated copy of ``image`` (the original image, B, G, R order unless ``rgb``)."""
        names = {int(c): n for c, n in zip(self.class_ids, self.class_names)}
        table = [names.get(i, str(i)) for i in range(int(self.class_ids.max()) + 1)] if len(self) else []
        return draw_detections(image, self.boxes, self.scores, self.class_ids, table, rgb=rgb)



class Detector:
    """Run a detection model on images: the one inference path of every script, of evaluation
    (``evaluation.run_coco_eval``) and of training's validation and debug images.

    model: an ``EfficientDetBackbone`` or any callable with its contract (see module docstring);
    obj_list: class names by class index ('' entries are placeholder slots, e.g. COCO's unused ids:
    they are left out before each anchor's best class is taken, ``postprocess.class_mask``, so they
    never appear and never hide a real class); image_size: network input int or (H, W);
    threshold / iou / nms / max_det: see ``efficientdet.postprocess.detect``; mean/std: RGB
    normalisation (0-1 scale; default: the variant's, ``config.resolve_normalization``, or
    ImageNet's). A PyTorch model runs through ``runtimes.eager.TorchModel``: ``fuse`` (default:
    yes, unless ``half``) runs its BN-folded copy, the model itself (``.model``) staying as given;
    ``half`` runs the network under autocast (float16 on CUDA, bfloat16 on CPU) while anchors,
    decoding and NMS stay float32 (the one meaning of ``--half`` everywhere); ``compile``:
    ``torch.compile`` the network (``TorchModel``; the first call of each input shape compiles).
    """

    def __init__(self, model: ModelFn, obj_list: Sequence[str], image_size: Union[int, Sequence[int]],
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 threshold: float = 0.2, iou: float = 0.2, nms: str = 'hard', max_det: int = 100,
                 device: Union[str, torch.device, None] = 'cpu', half: bool = False, batch_size: int = 8,
                 fuse: Optional[bool] = None, compile: bool = False):
        if nms not in NMS_METHODS:
            raise UserError(f'--nms {nms!r}: choose one of {", ".join(NMS_METHODS)}')
        if not 0.0 <= float(threshold) <= 1.0:
            raise UserError(f'--threshold {threshold}: must be between 0 and 1')
        if not 0.0 <= float(iou) <= 1.0:
            raise UserError(f'--iou {iou}: must be between 0 and 1')
        if int(max_det) < 1:
            raise UserError(f'--max_det {max_det}: must be at least 1')
        self.device = parse_device(device)
        self.image_size = as_hw(image_size)
        self.half = bool(half)
        self.obj_list = list(obj_list)
        num_classes = getattr(model, 'num_classes', None)
        if num_classes is not None and int(num_classes) != len(self.obj_list):
            raise UserError(f'the model has {num_classes} classes but {len(self.obj_list)} class names were given')
        # bool [C] of the real classes; None when every slot is one
        self.allowed = class_mask(self.obj_list, num_classes)
        if isinstance(model, nn.Module):
            compound_coef = getattr(model, 'compound_coef', None)
            if compound_coef is not None:
                try:
                    check_image_size(*self.image_size, compound_coef)
                except ValueError as e:
                    raise UserError(f'--image_size: {e}') from None
            from .runtimes.eager import TorchModel
            model = model.to(device=self.device).eval()
            self.runner: ModelFn = TorchModel(model, self.device, half=half, fuse=fuse, image_size=self.image_size,
                                              compile=compile, allowed=self.allowed)
        elif compile:
            from .runtimes.base import refuse_compile
            refuse_compile(getattr(model, 'name', 'an exported model'))
        else:
            self.runner = model  # an exported runtime: its precision was chosen when it was loaded
            _check_excluded(model, self.allowed)
        self.model = model
        if getattr(model, 'compound_coef', None) is not None:
            # the weights' own normalisation unless given (Lite: (x - 127) / 128; AdvProp: 0.5 / 0.5)
            mean, std = resolve_normalization(model, mean, std)
        self.mean = tuple(mean if mean is not None else IMAGENET_MEAN)
        self.std = tuple(std if std is not None else IMAGENET_STD)
        self.threshold, self.iou, self.nms, self.max_det = float(threshold), float(iou), nms, int(max_det)
        self.batch_size = max(1, int(batch_size))
        self.source: Optional[str] = None  # the file the model was loaded from (from_checkpoint / from_exported)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, obj_list: Optional[Sequence[str]] = None, project: Optional[str] = None,
                   projects_dir: str = 'projects', image_size: Optional[Union[int, Sequence[int]]] = None,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   **options: Any) -> 'Detector':
        """Detector on a built ``EfficientDetBackbone``: classes and mean/std from ``obj_list`` /
        ``project`` (else the label map of released weights, ``model.weights_entry``, e.g. COCO's;
        else classes named by index), input size from ``image_size`` or the model's
        (``model.image_size``, else the variant's), normalisation the weights' own unless given
        (``model.input_mean`` / ``input_std``). ``options``: the constructor's."""
        proj = _load(project, projects_dir)
        if proj is not None:
            obj_list = list(proj.obj_list) if obj_list is None else obj_list
            mean = proj.mean if mean is None else mean
            std = proj.std if std is None else std
        entry = getattr(model, 'weights_entry', None)
        if obj_list is None and entry is not None and entry.project is not None:
            names = _load(entry.project, projects_dir).obj_list  # the label map the released weights use
            obj_list = list(names) if len(names) == model.num_classes else None
        if obj_list is None:
            obj_list = [str(i) for i in range(model.num_classes)]
        size = image_size if image_size is not None else (
            getattr(model, 'image_size', None) or model.config.input_size)
        mean, std = resolve_normalization(model, mean, std)
        return cls(model, obj_list, size, mean=mean, std=std, **options)

    @classmethod
    def from_checkpoint(cls, path: str, compound_coef: Optional[Union[int, str]] = None,
                        obj_list: Optional[Sequence[str]] = None,
                        project: Optional[str] = None, projects_dir: str = 'projects',
                        image_size: Optional[Union[int, Sequence[int]]] = None,
                        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                        ratios: Optional[Sequence[Tuple[float, float]]] = None,
                        scales: Optional[Sequence[float]] = None, compat: Optional[str] = None,
                        **options: Any) -> 'Detector':
        """Build an ``EfficientDetBackbone`` and load ``path`` exactly (strict), then
        :meth:`from_model`.

        ``path``: a checkpoint file or a released weights name (``'coco'`` with ``compound_coef``,
        ``'tf_efficientdet_d2'``, …, or what ``efficientdet.zoo.resolve`` made of one;
        ``factory.build_model``); ``compound_coef`` None: the variant a released name implies,
        else 0. Classes / mean / std / anchors come from ``project`` (a name under ``projects_dir``
        or a yml path) unless given explicitly; with neither ``obj_list`` nor ``project`` the class
        names are those of the released weights' label map (COCO), else the class count is read from
        the file and classes are named by index. ``image_size``, ``compat`` and the normalisation
        default to what released weights say, else the variant's. Files of another variant or class
        count raise UserError saying what the file holds. ``options``: the constructor's (threshold,
        iou, nms, max_det, device, half, batch_size, fuse, compile).
        """
        from dataclasses import replace
        from .factory import build_model
        from .project import Project
        proj = _load(project, projects_dir)
        if proj is not None:
            obj_list = list(proj.obj_list) if obj_list is None else list(obj_list)
            mean = proj.mean if mean is None else mean
            std = proj.std if std is None else std
        if ratios is not None or scales is not None:  # explicit anchors win over the project's
            if proj is None:
                if obj_list is None:
                    raise UserError('ratios/scales given without classes: pass project or obj_list too')
                proj = Project('<arguments>', '', '', 1, list(IMAGENET_MEAN), list(IMAGENET_STD),
                               list(DEFAULT_SCALES), list(ratios_for(compat or 'official', None)), list(obj_list),
                               '<arguments>')
            proj = replace(proj, anchors_ratios=list(ratios if ratios is not None else proj.anchors_ratios),
                           anchors_scales=list(scales if scales is not None else proj.anchors_scales))
        if proj is not None and obj_list is not None:
            proj = replace(proj, obj_list=list(obj_list))
        num_classes = len(obj_list) if proj is None and obj_list is not None else None
        model = build_model(compound_coef, num_classes=num_classes, project=proj, weights=path,
                            image_size=image_size, compat=compat, verbose=False)
        detector = cls.from_model(model, obj_list=obj_list, mean=mean, std=std, **options)
        local = getattr(path, 'path', path)  # a zoo.ResolvedWeights: its file
        detector.source = os.fspath(local) if isinstance(local, (str, os.PathLike)) else None
        return detector

    @classmethod
    def from_exported(cls, path: str, backend: str = 'onnxruntime', obj_list: Optional[Sequence[str]] = None,
                      project: Optional[str] = None, projects_dir: str = 'projects',
                      image_size: Optional[Union[int, Sequence[int]]] = None, device: str = 'cpu',
                      threads: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None, providers: Optional[Sequence[str]] = None,
                      half: bool = False, compile: bool = False, **options: Any) -> 'Detector':
        """Detector on an exported model (``efficientdet.runtimes``: a registered ``--backend``;
        ``providers``: onnxruntime execution providers; ``half``: reduced precision where the
        backend has it, UserError elsewhere; ``compile``: always a UserError, it is for the torch
        backend). Classes, mean/std and the input size come from the explicit arguments, then the
        project, then the file's metadata. ``options``: the constructor's."""
        if compile:
            from .runtimes.base import refuse_compile
            refuse_compile(backend)
        from .runtimes import load_runtime
        runtime = load_runtime(backend, path, threads=threads, device=device, providers=providers, half=half)
        meta = getattr(runtime, 'meta', {}) or {}
        proj = _load(project, projects_dir)
        if proj is not None:
            obj_list = list(proj.obj_list) if obj_list is None else obj_list
            mean = proj.mean if mean is None else mean
            std = proj.std if std is None else std
        obj_list = obj_list if obj_list is not None else meta.get('obj_list')
        n = getattr(runtime, 'num_classes', None)
        if obj_list is None:
            if n is None:
                raise UserError(f'{path}: the file does not say its classes; pass -p PROJECT')
            obj_list = [str(i) for i in range(n)]
        elif n is not None and n != len(obj_list):
            raise UserError(f'{path}: exported for {n} classes but {len(obj_list)} class names were given')
        size = image_size if image_size is not None else (getattr(runtime, 'image_size', None)
                                                          or meta.get('image_size'))
        if size is None:
            raise UserError(f'{path}: the input size is unknown; pass --image_size')
        detector = cls(runtime, obj_list, size, mean=mean if mean is not None else meta.get('mean', IMAGENET_MEAN),
                       std=std if std is not None else meta.get('std', IMAGENET_STD), device=device, half=half,
                       **options)
        detector.source = os.fspath(path)
        return detector

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]], bgr: bool = False) -> List[Detections]:
        """Detect objects. ``images``: a path, an HWC numpy array (RGB, or B, G, R with ``bgr``), a
        CHW tensor (uint8, or float in [0, 1]), or a list of them (any sizes). Returns one
        ``Detections`` per image, in original-image pixels."""
        if isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)):
            images = [images]
        images = list(images)
        results: List[Detections] = []
        for start in range(0, len(images), self.batch_size):
            results += self._detect_batch(images[start:start + self.batch_size], bgr)
        return results

    def _detect_batch(self, images: Sequence[ImageLike], bgr: bool) -> List[Detections]:
        batch, metas = self.preprocess(images, bgr)
        return self.postprocess(self.forward(batch), metas)

    # the three stages of ``__call__`` (``benchmark.py`` times them one by one)
    def preprocess(self, images: Sequence[ImageLike], bgr: bool = False) -> Tuple[torch.Tensor, List[ImageMeta]]:
        """Images -> (normalised float32 batch [B, 3, H, W] on the device, per-image ImageMeta)."""
        channels_last = self.device.type == 'cpu' and getattr(self.runner, 'channels_last', False)
        batch, metas = preprocess_batch(images, self.image_size, self.mean, self.std, bgr=bgr,
                                        channels_last=channels_last)
        if self.device.type == 'cuda':
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch, metas

    def forward(self, batch: torch.Tensor):
        """The model: ``(features | None, regression, classification | BestClass, anchors)``."""
        return self.runner(batch)

    def postprocess(self, outputs, metas: Sequence[ImageMeta]) -> List[Detections]:
        """Decode + NMS (float32, ``postprocess.detect``; placeholder classes left out before the best
        class is taken) -> one ``Detections`` per image, original pixels."""
        _, regression, classification, anchors = outputs
        per_image = detect(classification, regression, anchors, self.image_size, score_threshold=self.threshold,
                           iou_threshold=self.iou, max_det=self.max_det, nms=self.nms, allowed=self.allowed)
        out = []
        for det, meta in zip(per_image, metas):
            ids = det['labels'].cpu().numpy().astype(np.int64)
            out.append(Detections(boxes=boxes_to_original(det['boxes'], meta),
                                  scores=det['scores'].float().cpu().numpy(), class_ids=ids,
                                  class_names=[self.class_name(i) for i in ids], image_hw=meta.orig_hw))
        return out

    def detect_prepared(self, batch: torch.Tensor, metas: Sequence[ImageMeta]) -> List[Detections]:
        """Detections of a batch that is already letterboxed and normalised as :meth:`preprocess`
        makes it (e.g. a dataset's validation batch [B, 3, H, W]), with each image's ``ImageMeta``
        (how it was placed in the input): forward, then :meth:`postprocess`."""
        return self.postprocess(self.forward(batch.to(self.device)), metas)

    def class_name(self, class_id: int) -> str:
        """Name of a class index (its index as text when obj_list has no name for it)."""
        if 0 <= class_id < len(self.obj_list) and self.obj_list[class_id]:
            return self.obj_list[class_id]
        return str(class_id)


def _load(project: Optional[str], projects_dir: str):
    """The Project of a name / yml path / Project, or None."""
    if project is None:
        return None
    from .project import Project, load_project
    return project if isinstance(project, Project) else load_project(project, projects_dir)


def _check_excluded(runtime: Any, allowed: Optional[torch.Tensor]) -> None:
    """An exported file that takes each anchor's best class in its graph (head 'best') must have
    left out the same placeholder classes as the class list used now; UserError otherwise (its best
    class could be a placeholder and hide a real detection)."""
    meta = getattr(runtime, 'meta', None) or {}
    if meta.get('head', 'best') != 'best' or meta.get('with_nms'):
        return
    have = getattr(runtime, 'allowed', None)
    same = (have is None and allowed is None) or (
        have is not None and allowed is not None and have.shape == allowed.shape and bool((have == allowed).all()))
    if not same:
        path = getattr(runtime, 'path', 'the exported file')
        raise UserError(f'{path} takes each anchor\'s best class in its graph over other classes than the class list '
                        'given (its placeholder \'\' slots differ); export it with the same -p PROJECT, or with '
                        '--head full')
