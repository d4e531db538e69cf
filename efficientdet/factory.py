"""The one way to build an EfficientDet model: variant, classes (project or count), anchors,
input size, compat mode and weights (exact load, or fine-tuning load) in one call.

Every script and module that builds a model goes through :func:`build_model`, so the variant and
the input size are validated once (:func:`resolve_image_size`) and a checkpoint that does not fit
is refused with one line saying what to pass instead.

Weights, top-down: a spec (path or released name) → a local file (:mod:`efficientdet.zoo`; a path
that exists always wins) → read safely and its layout detected (:mod:`efficientdet.ckpt.layout`) →
that layout's adapter (:mod:`efficientdet.ckpt.layouts`) → loaded into the model
(:mod:`efficientdet.ckpt.load`). What a released entry says about its weights (compat mode, input
size, input normalisation) is applied here and carried by the model (:func:`build_model`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import zoo
from .ckpt.layout import Checkpoint, infer_num_classes, read_checkpoint
from .ckpt.load import check_variant, class_count_error, load_pretrained, load_weights
from .config import (COMPAT_MODES, OFFICIAL_RATIOS, Variant, as_hw, check_image_size, get_config,
                     resolve_normalization, resolve_variant)
from .devices import parse_device
from .errors import UserError
from .model import EfficientDetBackbone
from .project import Project, load_project

ImageSize = Union[int, Sequence[int], None]
# Class count of a model built with neither a project, a class count nor weights that say it:
# the official COCO label map (class index = category id - 1, ten ids unused).
DEFAULT_NUM_CLASSES = 90


def resolve_image_size(variant: Union[Variant, str], image_size: ImageSize = None) -> Tuple[int, int]:
    """The network input size ``(H, W)`` for ``variant``: the variant's own size when
    ``image_size`` is None, else ``image_size`` (an int or ``(H, W)``) after the model's size check
    (``config.check_image_size``). Raises UserError naming ``--image_size``."""
    key = resolve_variant(variant)
    if image_size is None:
        s = int(get_config(key).input_size)
        return s, s
    try:
        h, w = as_hw(image_size)
        check_image_size(h, w, key)
    except (ValueError, TypeError) as e:
        raise UserError(f'--image_size {image_size}: {e}') from None
    return h, w


def _as_project(project: Union[Project, str, 'os.PathLike[str]', None]) -> Optional[Project]:
    """A Project from a Project, a name/path (projects/ or the packaged ones) or None."""
    if project is None or isinstance(project, Project):
        return project
    return load_project(os.fspath(project))


WeightsSpec = Union[str, 'os.PathLike[str]', 'zoo.ResolvedWeights', Mapping[str, Any], Checkpoint, None]


def open_weights(weights: WeightsSpec, variant: Union[Variant, str, None] = None
                 ) -> Tuple[Checkpoint, Optional['zoo.Entry']]:
    """The :class:`Checkpoint` of ``weights`` and, for a released name, its table entry (None
    otherwise). ``weights``: a path (``.pth``/``.ckpt``/``.npz``/``.safetensors``, or an official TF
    checkpoint folder or prefix, read with TensorFlow when it is installed), a released name
    (``coco`` with ``variant``, ``tf_efficientdet_d2``, ``efficientdet-d2.pth`` …: fetched and
    verified by :mod:`efficientdet.zoo`), what :func:`efficientdet.zoo.resolve` made of one, an
    in-memory state_dict, or a Checkpoint."""
    if isinstance(weights, Checkpoint):
        return weights, None
    if isinstance(weights, (str, os.PathLike, zoo.ResolvedWeights)):
        ck, got = zoo.open_weights(weights, variant)
        return ck, got.entry
    return read_checkpoint(weights), None


def read_weights(weights: WeightsSpec, variant: Union[Variant, str, None] = None) -> Checkpoint:
    """The :class:`Checkpoint` of ``weights`` (see :func:`open_weights`)."""
    return open_weights(weights, variant)[0]


def weights_variant(weights: WeightsSpec) -> Optional[Variant]:
    """The variant a released name implies (``tf_efficientdet_d2`` → 2); None for anything else."""
    if isinstance(weights, zoo.ResolvedWeights):
        return weights.variant
    return zoo.variant_of(weights) if isinstance(weights, (str, os.PathLike)) else None


def _ratios_of(proj: Optional[Project], compat: str):
    """The project's anchor ratios, except that the official ones (every project's default) stand
    for the compat mode's own with ``compat='zylo117'`` (Yet-Another's 1.4 / 0.7), as ImageNet's
    mean/std stand for the weights' own normalisation."""
    if proj is None:
        return None
    ratios = proj.anchors_ratios
    official = len(ratios) == len(OFFICIAL_RATIOS) and all(
        abs(a - c) < 1e-6 and abs(b - d) < 1e-6 for (a, b), (c, d) in zip(ratios, OFFICIAL_RATIOS))
    return None if compat == 'zylo117' and official else ratios


def backbone_of(asked: Optional[str], ck: Optional[Checkpoint], finetune: bool) -> Optional[str]:
    """The backbone spec to build: ``asked`` (``backbones.parse_backbone``), else the one ``ck``
    records (``backbone_net.spec``), else None (the variant's EfficientNet)."""
    from .backbones import parse_backbone, spec_of_state_dict
    recorded = spec_of_state_dict(ck.state_dict) if ck is not None else None
    if asked is None:
        return recorded
    spec = parse_backbone(asked)
    if ck is not None and not finetune and spec != recorded:
        raise UserError(f'{ck.name}: its backbone is {recorded or "efficientnet"}, not {spec or "efficientnet"}; '
                        'leave --backbone out to use the one the weights record')
    return spec


def build_model(variant: Union[Variant, str, None] = None, *, num_classes: Optional[int] = None,
                project: Union[Project, str, None] = None, weights: WeightsSpec = None, image_size: ImageSize = None,
                compat: Optional[str] = None, finetune: bool = False,
                device: Union[str, torch.device, None] = None, verbose: bool = True,
                backbone: Optional[str] = None) -> EfficientDetBackbone:
    """Build an ``EfficientDetBackbone`` and optionally load weights.

    variant: 0-8 (D0-D7x), 'd0', 'lite0' … (``config.parse_variant``); None: the variant a
        released weights name implies (``weights='tf_efficientdet_d2'`` → D2), else D0.
    project: an ``efficientdet.project.Project`` or a project name / yml path; it gives the class
        count (``len(obj_list)``, '' placeholders included) and the anchors (scales, ratios).
    num_classes: class count when no project is given (default: read from ``weights``, else 90).
    weights: a checkpoint path (this project / Yet-Another or effdet ``.pth``, official TF ``.npz``
        or checkpoint directory), a released name (``'coco'`` = the official weights of ``variant``,
        ``'tf_efficientdet_d2'``, ``'efficientdet-d2'`` …: fetched once into torch.hub's cache,
        verified; a path that exists wins over a name; see :mod:`efficientdet.zoo`) or an
        in-memory state_dict / ``Checkpoint``. Exact load, every tensor must fit; with
        ``finetune=True`` every tensor whose shape fits is loaded and the classifier's last layer
        is re-initialised when the class count differs.
    image_size: int or (H, W), validated by :func:`resolve_image_size`; stored as
        ``model.image_size = (H, W)`` (default: the released weights' input size, else the variant's).
    compat: 'official' or 'zylo117' (Yet-Another's padding and anchor ratios); None: what the
        released weights were trained with (Yet-Another's: 'zylo117'), else 'official'.
    backbone: the feature extractor (``efficientdet.backbones``: None / 'efficientnet' for the
        variant's EfficientNet, 'timm:NAME'). Default: the one the weights record (a model trained
        with ``--backbone timm:NAME`` saves it), else EfficientNet. An exact load refuses weights of
        another backbone; ``finetune`` builds ``backbone`` and loads what fits.
    device: where the model goes (None: stays on CPU). A model loaded exactly (not fine-tuned) is
        put in eval mode.
    Mismatches (variant, class count, anchors) raise UserError in one line saying what to pass.

    What the weights come with travels on the model, for every consumer: ``model.weights_entry``
    (the table row of a released name, else None), ``model.compat``, ``model.image_size`` and
    ``model.input_mean`` / ``model.input_std`` (RGB, 0-1 scale: what the weights expect, e.g. 0.5 /
    0.5 for the AdvProp ports; ``config.resolve_normalization(model, mean, std)`` uses them).
    """
    implied = weights_variant(weights) if variant is None else None
    key = resolve_variant(variant if variant is not None else (implied if implied is not None else 0))
    if compat is not None and compat not in COMPAT_MODES:
        raise UserError(f'--compat {compat!r}: choose one of {", ".join(COMPAT_MODES)}')
    proj = _as_project(project)

    ck, entry = (None, None) if weights is None else open_weights(weights, key)
    if ck is not None:
        check_variant(ck, key)
    compat = compat or (entry.compat if entry is not None else 'official')
    size = resolve_image_size(key, image_size if image_size is not None or entry is None else entry.input_size)
    ratios = _ratios_of(proj, compat)
    scales = proj.anchors_scales if proj is not None else None
    n_anchors = (len(ratios) if ratios is not None else 3) * (len(scales) if scales is not None else 3)
    n_file = infer_num_classes(ck.state_dict, n_anchors, ck.layout) if ck is not None else None
    if proj is not None:
        if num_classes is not None and num_classes != proj.num_classes:
            raise UserError(f'num_classes={num_classes} but project {proj.project_name!r} lists '
                            f'{proj.num_classes} classes; give one of them')
        n = proj.num_classes
        if n_file is not None and n_file != n and not finetune:
            raise class_count_error(ck.name, n_file, n, f'project {proj.project_name!r}')
    else:
        n = num_classes if num_classes is not None else (n_file or DEFAULT_NUM_CLASSES)
    if n <= 0:
        raise UserError(f'num_classes={n}: must be at least 1')

    spec = backbone_of(backbone, ck, finetune)
    model = EfficientDetBackbone(num_classes=n, compound_coef=key, ratios=ratios, scales=scales, compat=compat,
                                 backbone=spec)
    model.image_size = size
    model.weights_entry = entry
    model.input_mean, model.input_std = resolve_normalization(
        key, entry.mean if entry is not None else None, entry.std if entry is not None else None)
    if ck is not None:
        if finetune:
            load_pretrained(model, ck, verbose=verbose)
        else:
            load_weights(model, ck, strict=True, verbose=verbose)
            model.eval()
    if device is not None:
        model = model.to(parse_device(device))
    return model
