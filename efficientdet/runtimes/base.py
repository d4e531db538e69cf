"""The interface of a deploy target, and what every target shares.

A target module (``efficientdet/runtimes/<name>.py``) defines ``TARGET``, a :class:`Target`:

- ``export(model, path, image_size, **options) -> {output: max |diff|}``: write the model in the
  target's format, verified against the eager model (skipped with ``verify=False``);
- ``load(path, threads=None, device='cpu', providers=None) -> Runtime``: run such a file;
- ``add_export_arguments(parser)``: the target's own ``python -m efficientdet.export`` options.

A :class:`Runtime` has the calling contract of ``EfficientDetBackbone``: ``runtime(x)`` with
``x`` a normalised float [B, 3, H, W] batch returns ``(None, regression [B, A, 4] (ty, tx, th,
tw), scores, anchors [1, A, 4] (y1, x1, y2, x2) input pixels)``, where ``scores`` is either the
full classification [B, A, C] after sigmoid or, for the lean exports, a
:class:`~efficientdet.postprocess.BestClass` (per-anchor best probability and class), which every
post-processing function takes alike. It also answers ``eval()``, ``to()``, ``parameters()`` and
``training`` so that code written for an ``nn.Module`` (``run_coco_eval``, ``Detector``) takes it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..config import as_hw
from ..errors import UserError
from ..postprocess import BestClass, class_mask

__all__ = ['Runtime', 'Target', 'Output', 'parse_meta', 'export_metadata', 'compare_outputs', 'head_outputs',
           'HEADS', 'INPUT_NAME', 'RAW_OUTPUTS', 'BEST_OUTPUTS', 'ExportWrapper', 'check_export_size',
           'register_target', 'backend_names', 'export_formats', 'real_classes', 'best_real_class', 'verify_export', 'require', 'refuse_compile']

INPUT_NAME = 'images'
RAW_OUTPUTS = ('regression', 'classification', 'anchors')  # head='full'
BEST_OUTPUTS = ('regression', 'scores', 'labels', 'anchors')  # head='best' (the default)
HEADS = ('best', 'full')
Output = Tuple[None, torch.Tensor, Union[torch.Tensor, BestClass], torch.Tensor]
SizeLike = Union[int, Sequence[int]]


class ExportWrapper(nn.Module):
    """``model(x) -> (features, regression, classification, anchors)`` → the exported outputs.

    head='best' (default): ``(regression, scores [B, A] best-class probability, labels [B, A]
    int64, anchors)`` — the best class is taken on the logits (one TopK) and only [B, A] values go
    through the sigmoid, instead of [B, A, C]; every post-processing here uses the best class only.
    head='full': ``(regression, classification [B, A, C] after sigmoid, anchors)``.

    ``obj_list``: with '' placeholder slots, head='best' takes the best class among the real ones
    only (:func:`best_real_class`; the file's metadata lists the others as ``excluded_classes``), the
    rule of ``postprocess.BestClass``."""

    def __init__(self, model: nn.Module, image_size: SizeLike, head: str = 'best',
                 obj_list: Optional[Sequence[str]] = None):
        super().__init__()
        from ..anchors import Anchors
        if head not in HEADS:
            raise UserError(f'--head {head!r}: choose one of {", ".join(HEADS)}')
        self.model = model
        self.head = head
        gen = next(m for m in model.modules() if isinstance(m, Anchors))
        p = next(model.parameters())
        # a (persistent) buffer: the graph's anchors are then an initializer the exporter accepts as an output
        self.register_buffer('anchors', gen.for_size(*as_hw(image_size), p.device, p.dtype).clone())
        self.real: Optional[torch.Tensor]
        self.register_buffer('real', real_classes(obj_list, model.num_classes, p.device) if head == 'best' else None)

    def forward(self, x: torch.Tensor):
        if self.head == 'full':
            _, regression, classification, _ = self.model(x)
            return regression, classification, self.anchors
        _, regression, logits, _ = self.model(x, return_logits=True)
        scores, labels = best_real_class(logits, self.real)
        return regression, scores, labels, self.anchors


def real_classes(obj_list: Optional[Sequence[str]], num_classes: int,
                 device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """long [R]: the indices of the real classes of ``obj_list`` (``postprocess.class_mask``: ''
    placeholder slots left out), for :func:`best_real_class`; None when every class is real."""
    from ..postprocess import class_mask
    allowed = class_mask(list(obj_list), num_classes) if obj_list is not None else None
    return None if allowed is None else allowed.nonzero().squeeze(1).to(device)


def best_real_class(logits: torch.Tensor, real: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's best class of [B, A, C] ``logits`` among the ``real`` classes (long [R],
    :func:`real_classes`; None: all): (scores [B, A] after sigmoid, labels [B, A] long, class
    indices of the C). In-graph form of every exported best head: a gather of the real columns
    (exact exclusion, no constant that a quantized range would have to hold), one TopK, the sigmoid
    on [B, A] values only."""
    if real is not None:
        logits = logits.index_select(-1, real)
    best, labels = logits.topk(1, dim=-1)
    labels = labels.squeeze(-1)
    return torch.sigmoid(best.squeeze(-1)), (real[labels] if real is not None else labels)


def head_outputs(head: str) -> Tuple[str, ...]:
    """Output names of an export with ``head``."""
    return BEST_OUTPUTS if head == 'best' else RAW_OUTPUTS


def check_export_size(model: nn.Module, image_size: Optional[SizeLike]) -> Tuple[int, int]:
    """(H, W) to export at: ``image_size`` or the model's own (``model.image_size``, else the
    variant's); UserError for sizes the model cannot run."""
    from ..config import check_image_size, get_config
    default = getattr(model, 'image_size', None) or get_config(model.compound_coef).input_size
    size = as_hw(image_size if image_size is not None else default)
    try:
        check_image_size(size[0], size[1], model.compound_coef)
    except ValueError as e:
        raise UserError(f'--image_size: {e}') from None
    return size


def parse_meta(meta: Dict[str, str]) -> Dict[str, object]:
    """String metadata of an exported file -> values (JSON lists, ints, booleans decoded)."""
    out: Dict[str, object] = dict(meta)
    for key in ('image_size', 'obj_list', 'mean', 'std', 'excluded_classes'):
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except ValueError:
                pass
    for key in ('num_classes', 'max_det', 'pre_nms_topk'):
        if key in meta:
            try:
                out[key] = int(meta[key])
            except ValueError:
                pass
    if 'compound_coef' in meta:  # 0-8 or a Lite name
        out['compound_coef'] = int(meta['compound_coef']) if meta['compound_coef'].isdigit() else meta['compound_coef']
    for key in ('with_nms', 'channels_last'):
        if key in meta:
            out[key] = meta[key] == 'true'
    return out


def export_metadata(model: nn.Module, size: Tuple[int, int], head: str, obj_list: Optional[Sequence[str]] = None,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """What an exported file says about itself (strings): variant, classes, input size, outputs,
    normalisation. ``mean``/``std`` default to what the weights expect (``config.resolve_normalization(model)``)."""
    from ..config import resolve_normalization
    mean, std = resolve_normalization(model, mean, std)
    meta = {'compound_coef': str(model.compound_coef), 'num_classes': str(model.num_classes),
            'image_size': json.dumps(list(size)), 'head': head, 'with_nms': 'false',
            'box_format': 'yxyx anchors, (ty, tx, th, tw) regression', 'producer': 'efficientdet.export',
            'mean': json.dumps([float(v) for v in mean]), 'std': json.dumps([float(v) for v in std])}
    if obj_list is not None:
        meta['obj_list'] = json.dumps(list(obj_list))
        allowed = class_mask(list(obj_list), model.num_classes)
        if head == 'best' and allowed is not None:  # what best_real_class leaves out in the graph
            meta['excluded_classes'] = json.dumps((~allowed).nonzero().squeeze(1).tolist())
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def compare_outputs(path: str, names: Sequence[str], got: Sequence[torch.Tensor], reference: Output,
                    atol: float, allowed: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Exported outputs (by ``names``) vs the eager model's 4-tuple ``reference``: floats within
    ``atol`` absolute and relative (boxes are pixels); best-class labels equal wherever the eager
    model's best class leads the runner-up by more than ``atol``. ``allowed``: the classes the
    file takes the best class among (:attr:`Runtime.allowed`). UserError naming the file
    otherwise; returns {name: max abs difference (labels: count of differing entries)}."""
    _, reg, cls, anc = reference
    ref: Dict[str, torch.Tensor] = {'regression': reg, 'anchors': anc}
    margin_ok: Optional[torch.Tensor] = None
    if 'classification' in names:
        ref['classification'] = cls
    else:
        masked = cls.float() if allowed is None else cls.float().masked_fill(~allowed.to(cls.device), -1.0)
        top2 = masked.topk(2, dim=-1).values if cls.shape[-1] > 1 else None
        best = BestClass.of(cls, allowed)
        ref['scores'], ref['labels'] = best.scores, best.labels
        margin_ok = (top2[..., 0] - top2[..., 1] > atol) if top2 is not None else torch.ones_like(best.labels, dtype=torch.bool)
    diffs: Dict[str, float] = {}
    for name, a in zip(names, got):
        b = ref[name].detach().cpu()
        a = torch.as_tensor(a).detach().cpu()
        if a.shape != b.shape:
            raise UserError(f'{path}: output {name} has shape {tuple(a.shape)}, the torch model {tuple(b.shape)}')
        if not a.dtype.is_floating_point:
            differ = a.long() != b.long()
            if margin_ok is not None:
                differ &= margin_ok.cpu()
            diffs[name] = float(differ.sum())
            if diffs[name]:
                raise UserError(f'{path}: output {name} differs from the torch model in {int(diffs[name])} entries')
            continue
        b = b.float()
        d = float((a.float() - b).abs().max()) if a.numel() else 0.0
        diffs[name] = d
        if not torch.allclose(a.float(), b, rtol=atol, atol=atol):
            raise UserError(f'{path}: output {name} differs from the torch model by {d:.3g} (> {atol:g} '
                            f'absolute and relative)')
    return diffs


def random_batch(image_size: SizeLike, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed random normalised batch [batch, 3, H, W] for verifying exports."""
    h, w = as_hw(image_size)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def refuse_compile(backend: str) -> None:
    """``--compile`` is torch.compile of a PyTorch model: the one refusal wherever another backend or
    an exported model is asked for it."""
    raise UserError(f'--compile applies to the torch backend (a PyTorch model), not to {backend}')


def require(module: str, what: str, install: str, package: Optional[str] = None, quiet: bool = False) -> Any:
    """``module`` imported (``quiet``: with the library-loading notes some print silenced), or
    UserError: "``what`` needs the ``package`` package: pip install ``install``". Every optional
    runtime dependency is reached through it."""
    try:
        if quiet:
            from .quiet import quiet_output
            with quiet_output():
                return importlib.import_module(module)
        return importlib.import_module(module)
    except ImportError:
        package = package or module.split('.')[0].replace('_', '-')
        raise UserError(f'{what} needs the {package} package: pip install {install}') from None


def verify_export(path: str, runtime: 'Runtime', reference: nn.Module, size: SizeLike, atol: float,
                  batch: int = 2) -> Dict[str, float]:
    """``runtime`` (the loaded export of ``path``) against the eager ``reference`` on a fixed random
    batch of ``batch`` images (:func:`compare_outputs`, with the classes the file leaves out);
    every target's verification."""
    x = random_batch(size, batch)
    p = next(reference.parameters())
    with torch.inference_mode():
        ref = reference(x.to(device=p.device, dtype=p.dtype))
    out = runtime.run(x)
    names = runtime.output_names
    return compare_outputs(path, names, [out[n] for n in names], ref, atol, runtime.allowed)


def add_head_argument(p: argparse.ArgumentParser) -> None:
    """``--head best|full`` of every export target."""
    p.add_argument('--head', choices=HEADS, default='best',
                   help='best: per-anchor best class in the graph (scores, labels; fastest); full: the [B, A, C] '
                        'classification')


class Runtime:
    """Base of the runtimes: an exported file run with ``EfficientDetBackbone``'s contract (see the
    module docstring). Subclasses set ``path``, ``meta``, ``image_size``, ``output_names`` and
    implement :meth:`run` (outputs by name, numpy or torch)."""

    name = 'runtime'
    training = False
    path: str
    meta: Dict[str, object]
    image_size: Optional[Tuple[int, int]]
    output_names: List[str]
    device = torch.device('cpu')
    channels_last = False  # True: reads a torch.channels_last batch without a copy (Detector.preprocess)

    # -- nn.Module look-alike, for code written against the eager model
    def eval(self) -> 'Runtime':
        return self

    def train(self, mode: bool = True) -> 'Runtime':
        return self

    def to(self, *args, **kwargs) -> 'Runtime':
        return self

    def requires_grad_(self, requires_grad: bool = True) -> 'Runtime':
        return self

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())

    @property
    def num_classes(self) -> Optional[int]:
        n = self.meta.get('num_classes')
        return int(n) if n is not None else None

    @property
    def compound_coef(self):
        return self.meta.get('compound_coef')

    @property
    def allowed(self) -> Optional[torch.Tensor]:
        """bool [C] of the classes a head='best' file takes the best class among (its
        ``excluded_classes`` left out); None when it excludes none."""
        excluded = self.meta.get('excluded_classes') or []
        n = self.num_classes
        if not excluded or n is None:
            return None
        mask = torch.ones(n, dtype=torch.bool)
        mask[torch.as_tensor(excluded, dtype=torch.long)] = False
        return mask

    @property
    def with_nms(self) -> bool:
        return 'num_detections' in self.output_names

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise UserError(f'{self.path}: expects a [B, 3, H, W] batch, got shape {tuple(x.shape)}')
        if self.image_size is not None and tuple(x.shape[-2:]) != tuple(self.image_size):
            raise UserError(f'{self.path} was exported for {self.image_size[0]}x{self.image_size[1]} inputs, got '
                            f'{x.shape[-2]}x{x.shape[-1]}; use --image_size {self.image_size[0]} '
                            f'{self.image_size[1]} or re-export at the size you need')

    def run(self, x: torch.Tensor) -> Dict[str, Any]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> Output:
        if self.with_nms:
            raise UserError(f'{self.path} was exported --with-nms (outputs boxes/scores/labels); use its .run() '
                            'or export without --with-nms for the Detector / --backend')
        out = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
               for k, v in self.run(x).items()}
        if 'classification' in out:
            return None, out['regression'], out['classification'], out['anchors']
        try:
            return None, out['regression'], BestClass(out['scores'], out['labels'].long()), out['anchors']
        except KeyError:
            raise UserError(f'{self.path}: outputs {self.output_names} are not those of an efficientdet export; '
                            'export it with python -m efficientdet.export') from None


class Target:
    """One deploy target; see the module docstring. ``name``: the ``--backend`` name;
    ``export_format``: the ``python -m efficientdet.export`` sub-command (None: no export);
    ``suffix``: the extension of its files."""

    name = ''
    export_format: Optional[str] = None
    suffix = ''
    also_reads: Tuple[str, ...] = ()  # other file suffixes load() takes (openvino: .onnx)
    requires: Tuple[str, ...] = ()  # Python packages it needs (for the message when missing)
    supports_half = False  # whether load(half=True) runs the network in reduced precision

    def is_exported_file(self, path: str) -> bool:
        """Whether ``path`` is a file of this target (by suffix), i.e. not a checkpoint to export first."""
        return os.path.isfile(path) and os.path.splitext(path)[1].lower() in (self.suffix, *self.also_reads)

    def versions(self) -> Dict[str, str]:
        """Versions of the packages it runs on, for reports (``{'openvino_version': '2026.4'}``)."""
        out = {}
        for name in self.requires:
            try:
                out[f'{name}_version'] = str(getattr(__import__(name), '__version__', 'unknown'))
            except ImportError:
                pass
        return out

    def export_to_run(self, model: nn.Module, path: str, image_size: SizeLike, device: torch.device,
                      fuse: bool = True, verify: bool = False, channels_last: bool = True,
                      **metadata: Any) -> Dict[str, float]:
        """Export ``model`` to run it right away on ``device`` (``benchmark.py`` without an exported
        file): :meth:`export` with the options that matter for running there; ``metadata``:
        ``obj_list``, ``mean``, ``std`` as for :meth:`export` (the class list decides which classes
        the best head leaves out)."""
        return self.export(model, path, image_size, fuse=fuse, verify=verify, **metadata)

    def add_export_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The target's own export options (common ones are added by ``efficientdet.export``)."""

    def export_options(self, args: argparse.Namespace) -> Dict[str, Any]:
        """Keyword options for :meth:`export` from the parsed target options."""
        return {}

    def export(self, model: nn.Module, path: str, image_size: Optional[SizeLike] = None, **options
               ) -> Dict[str, float]:
        raise UserError(f'--backend {self.name} has no export; it runs the .pth checkpoint directly')

    def load(self, path: str, threads: Optional[int] = None, device: str = 'cpu',
             providers: Optional[Sequence[str]] = None, half: bool = False) -> Runtime:
        """The runtime of ``path``; ``half``: reduced-precision compute (only where
        ``supports_half``; anchors and box decoding stay float32)."""
        raise NotImplementedError


_TARGETS: Dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Make ``target`` a ``--backend`` (``target.name``) and, when it exports, a ``python -m
    efficientdet.export`` sub-command (``target.export_format``). Returns it."""
    if not target.name:
        raise ValueError('a Target needs a name (its --backend value)')
    _TARGETS[target.name] = target
    return target


def backend_names() -> Tuple[str, ...]:
    """The ``--backend`` values, in registration order (the built-ins are registered when the
    ``efficientdet.runtimes`` package is imported, which importing this module does first)."""
    return tuple(_TARGETS)


def export_formats() -> Tuple[str, ...]:
    """The ``python -m efficientdet.export`` sub-commands."""
    return tuple(t.export_format for t in _TARGETS.values() if t.export_format)
