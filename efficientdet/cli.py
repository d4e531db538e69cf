"""The scripts' shared command line: the options (:mod:`efficientdet.options`, re-exported here:
one option per idea, one name, one help text) and what they mean, decided here once.

What the options mean is decided here once: the default project (:data:`DEFAULT_PROJECT`), the
variant (``-c``, else the variant a released weights name carries, else D0), the default weights
file, the one weights check (:func:`resolve_weights`) and the one "detector from options"
(:func:`detector_from_args`).

``--image_size`` takes ``512``, ``384x640`` or two numbers ``384 640``; it never swallows a
positional argument that follows it (``--image_size 256 photo.jpg``).
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Optional

from .ckpt.files import checkpoint_path_exists
from .config import variant_tag
from .devices import parse_device
from .errors import UserError
from .options import (DEFAULT_PROJECT, OPTIONS, RANDOM_WEIGHTS, Option, ScriptParser, add_data_args,
                      add_inference_args, add_model_args, add_options, add_project_args, add_runtime_args,
                      add_weights_arg, image_size_arg, image_size_type, join_size_pairs, project_name,
                      providers_arg, str2bool, variant_type)

if TYPE_CHECKING:
    from .zoo import ResolvedWeights

__all__ = ['ScriptParser', 'OPTIONS', 'Option', 'add_options', 'add_project_args', 'add_model_args',
           'add_weights_arg', 'add_inference_args', 'add_runtime_args', 'add_data_args', 'str2bool',
           'parse_device', 'variant_type', 'image_size_type', 'image_size_arg', 'providers_arg', 'join_size_pairs',
           'DEFAULT_PROJECT', 'project_name', 'variant_of', 'default_weights', 'resolve_weights',
           'detector_from_args', 'model_from_args', 'check_size', 'RANDOM_WEIGHTS']


# ----------------------------------------------------------------------------- meaning of the options
def variant_of(args: argparse.Namespace):
    """The variant: ``-c``, else the one a released weights name carries (``-w tf_efficientdet_d2``),
    else D0. Stored back into ``args.compound_coef``."""
    if getattr(args, 'compound_coef', None) is None:
        from . import zoo
        spec = getattr(args, 'weights', None)
        found = zoo.variant_of(spec) if spec else None
        args.compound_coef = found if found is not None else 0
    return args.compound_coef


def default_weights(project: str, variant) -> str:
    """``weights/efficientdet-{variant}-{project}.pth``: where a project's trained weights are looked
    for when ``-w`` is not given (the shipped D0 shapes model is ``weights/efficientdet-d0-shape.pth``);
    ``weights/`` of the working folder, else the one beside the package (the shipped weights)."""
    stem = os.path.splitext(os.path.basename(project))[0]
    path = os.path.join('weights', f'efficientdet-{variant_tag(variant)}-{stem}.pth')
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    return path if os.path.exists(path) or not os.path.exists(beside) else beside


def resolve_weights(args: argparse.Namespace, allow_random: bool = False) -> Optional[ResolvedWeights]:
    """The one weights check: ``-w`` (a path that exists, which always wins, or a released name,
    fetched and verified by ``efficientdet.zoo``) or the project's default weights → a
    ``zoo.ResolvedWeights`` (the local ``.path`` and, for a released name, its table ``.entry``,
    which ``build_model`` / ``Detector.from_checkpoint`` take as they are); None for ``-w random``
    (only where ``allow_random``). Missing files are a UserError that says how to get them."""
    from .zoo import ResolvedWeights, resolve
    spec = getattr(args, 'weights', None)
    variant = variant_of(args)
    project = project_name(args)
    if spec is None:
        path = default_weights(project, variant)
        if checkpoint_path_exists(path):
            return ResolvedWeights(path)
        raise UserError(f'{path}: no such weights file (the default for -p {project} -c {variant}); train them with '
                        f'`python train.py -p {project} -c {variant}`, or pass -w PATH, -w NAME of released weights '
                        '(python -m efficientdet.zoo list)' + (', or -w random' if allow_random else ''))
    if spec == RANDOM_WEIGHTS:
        if not allow_random:
            raise UserError('-w random (no trained weights) is for export and benchmark; pass a weights file')
        return None
    return resolve(spec, variant)  # a path as it is; a name fetched; anything else: UserError naming it


def _project_or_none(args: argparse.Namespace):
    """The project of ``-p`` (default :data:`DEFAULT_PROJECT`), or None when ``--num_classes`` is
    given without ``-p`` (classes named by index)."""
    if getattr(args, 'num_classes', None) is not None:
        if getattr(args, 'project', None) is not None:
            raise UserError('--num_classes and -p both give the classes; pass one of them')
        return None
    from .project import load_project
    return load_project(project_name(args), getattr(args, 'projects_dir', 'projects'))


def check_size(args: argparse.Namespace) -> None:
    """``-c`` and ``--image_size`` checked together (before any file is read)."""
    from .factory import resolve_image_size
    resolve_image_size(variant_of(args), image_size_arg(getattr(args, 'image_size', None)))


_RESOLVE = object()


def model_from_args(args: argparse.Namespace, allow_random: bool = False, verbose: bool = False,
                    weights: Any = _RESOLVE):
    """The PyTorch model of the options (``factory.build_model``): variant, project (or
    ``--num_classes``), weights (:func:`resolve_weights`, unless already resolved and given as
    ``weights``; None: random), input size, compat; eval mode."""
    from .factory import build_model
    check_size(args)
    if weights is _RESOLVE:
        weights = resolve_weights(args, allow_random=allow_random)
    project = _project_or_none(args)
    return build_model(variant_of(args), num_classes=getattr(args, 'num_classes', None), project=project,
                       weights=weights, image_size=image_size_arg(args.image_size), compat=args.compat,
                       verbose=verbose).eval()


def detector_from_args(args: argparse.Namespace, batch_size: int = 1, model=None):
    """The one "detector from options": ``efficientdet.detector.Detector`` for ``--backend`` —
    torch: the checkpoint of ``-w`` (or ``model`` when given); another backend: the exported file
    of ``-w`` — with the options' classes, input size, thresholds, NMS, device and precision."""
    from .detector import Detector
    from .runtimes import check_backend_options
    check_size(args)
    common = dict(image_size=image_size_arg(args.image_size), device=args.device,
                  threshold=args.threshold, iou=args.iou, nms=args.nms, max_det=args.max_det, batch_size=batch_size,
                  half=bool(args.half), compile=getattr(args, 'compile', False))
    project = None if getattr(args, 'project', None) is None and getattr(args, 'num_classes', None) is not None \
        else project_name(args)
    target = check_backend_options(args.backend, args.providers, bool(args.half), common['compile'])
    if args.backend != 'torch':
        if not args.weights:
            raise UserError(f'--backend {args.backend} runs an exported file: pass it with -w (export one with '
                            f'python -m efficientdet.export {target.export_format} ...)')
        path = resolve_weights(args).path
        if not target.is_exported_file(path):
            raise UserError(f'{path}: --backend {args.backend} runs a {target.suffix} file exported with python -m '
                            f'efficientdet.export {target.export_format}; export the checkpoint first')
        return Detector.from_exported(path, backend=args.backend, project=project,
                                      projects_dir=args.projects_dir, threads=args.threads,
                                      providers=args.providers, **common)
    if model is not None:
        return Detector.from_model(model, project=project, projects_dir=args.projects_dir, **common)
    return Detector.from_checkpoint(resolve_weights(args), compound_coef=variant_of(args), project=project,
                                    projects_dir=args.projects_dir, compat=args.compat, **common)
