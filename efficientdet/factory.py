"""The one way to build an EfficientDet model: variant, classes (project or count), anchors,
input size, compat mode and weights (exact load, or fine-tuning load) in one call.

Every script and module that builds a model goes through :func:`build_model`, so the variant and
the input size are validated once (:func:`resolve_image_size`) and a checkpoint that does not fit
is refused with one line saying what to pass instead.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

from .ckpt.layout import Checkpoint, infer_num_classes, read_checkpoint
from .ckpt.load import check_variant, class_count_error, load_pretrained, load_weights
from .devices import parse_device
from .convert.tf import ConversionError, read_tf_input
from .config import COMPAT_MODES, Variant, as_hw, check_image_size, get_config, parse_variant
from .errors import UserError
from .model import EfficientDetBackbone
from .project import Project, load_project

ImageSize = Union[int, Sequence[int], None]
# Class count of a model built with neither a project, a class count nor weights that say it:
# the official COCO label map (class index = category id - 1, ten ids unused).
DEFAULT_NUM_CLASSES = 90


def resolve_variant(variant: Union[Variant, str]) -> Variant:
    """The variant key (int 0-8 or a Lite name) of ``variant``; UserError naming ``-c`` otherwise."""
    try:
        key = parse_variant(variant)
        get_config(key)
    except ValueError as e:
        raise UserError(f'-c {variant}: {e}') from None
    return key


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


def read_weights(weights) -> Checkpoint:
    """A :class:`Checkpoint` from a path (``.pth``/``.ckpt``/``.npz``, or an official TF checkpoint
    directory or prefix, read with TensorFlow when it is installed), a state_dict or a Checkpoint."""
    if isinstance(weights, Checkpoint):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if os.path.isdir(path) or os.path.isfile(path + '.index'):
            try:
                tf_vars = read_tf_input(path)
            except ConversionError as e:
                raise UserError(str(e)) from None
            return read_checkpoint({k: torch.from_numpy(v) for k, v in tf_vars.items()}, name=path)
    return read_checkpoint(weights)


def _backbone_of(asked: Optional[str], ck: Optional[Checkpoint], finetune: bool) -> Optional[str]:
    """The backbone spec to build: ``asked`` (``parse_backbone``), else the one ``ck`` records."""
    from .backbones import parse_backbone, spec_of_state_dict
    recorded = spec_of_state_dict(ck.state_dict) if ck is not None else None
    if asked is None:
        return recorded
    spec = parse_backbone(asked)
    if ck is not None and not finetune and spec != recorded:
        raise UserError(f'{ck.name}: its backbone is {recorded or "efficientnet"}, not {spec or "efficientnet"}; '
                        'leave --backbone out to use the one the weights record')
    return spec


def build_model(variant: Union[Variant, str] = 0, *, num_classes: Optional[int] = None,
                project: Union[Project, str, None] = None, weights=None, image_size: ImageSize = None,
                compat: str = 'official', finetune: bool = False,
                device: Union[str, torch.device, None] = None, verbose: bool = True,
                backbone: Optional[str] = None) -> EfficientDetBackbone:
    """Build an ``EfficientDetBackbone`` and optionally load weights.

    variant: 0-8 (D0-D7x), 'd0', 'lite0' … (``config.parse_variant``).
    project: an ``efficientdet.project.Project`` or a project name / yml path; it gives the class
        count (``len(obj_list)``, '' placeholders included) and the anchors (scales, ratios).
    num_classes: class count when no project is given (default: read from ``weights``, else 90).
    weights: a checkpoint path (this project / Yet-Another or effdet ``.pth``, official TF ``.npz``
        or checkpoint directory: :func:`read_weights`) or an in-memory state_dict / ``Checkpoint``. Exact load,
        every tensor must fit; with ``finetune=True`` every tensor whose shape fits is loaded and
        the classifier's last layer is re-initialised when the class count differs.
    image_size: int or (H, W), validated by :func:`resolve_image_size`; stored as
        ``model.image_size = (H, W)`` (default: the variant's size).
    compat: 'official' or 'zylo117' (Yet-Another's padding and anchor ratios).
    device: where the model goes (None: stays on CPU). A model loaded exactly (not fine-tuned) is
        put in eval mode.
    Mismatches (variant, class count, anchors) raise UserError in one line saying what to pass.
    """
    key = resolve_variant(variant)
    size = resolve_image_size(key, image_size)
    if compat not in COMPAT_MODES:
        raise UserError(f'--compat {compat!r}: choose one of {", ".join(COMPAT_MODES)}')
    proj = _as_project(project)
    ratios = proj.anchors_ratios if proj is not None else None
    scales = proj.anchors_scales if proj is not None else None
    n_anchors = (len(ratios) if ratios is not None else 3) * (len(scales) if scales is not None else 3)

    ck = None
    if weights is not None:
        ck = read_weights(weights)
        check_variant(ck, key)
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

    spec = _backbone_of(backbone, ck, finetune)
    model = EfficientDetBackbone(num_classes=n, compound_coef=key, ratios=ratios, scales=scales, compat=compat,
                                 backbone=spec)
    model.image_size = size
    if ck is not None:
        if finetune:
            load_pretrained(model, ck, verbose=verbose)
        else:
            load_weights(model, ck, strict=True, verbose=verbose)
            model.eval()
    if device is not None:
        model = model.to(parse_device(device))
    return model
