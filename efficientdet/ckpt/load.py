"""Loading checkpoints into a model: exact (:func:`load_weights`: inference, evaluation, resuming)
and fine-tuning (:func:`load_pretrained`: every tensor whose shape fits). The file's layout
adapter (:mod:`.layouts`) puts its weights under this project's keys (effdet and official-TF files
are converted on the fly); mismatches (variant, class count, anchors) are refused with one line
saying what to pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import get_config
from ..errors import UserError
from .files import StateDict
from .layout import Checkpoint, Source, check_variant, describe_coef, infer_num_classes, read_checkpoint
from .layouts import ConversionError, get_layout

_CLS_BIAS = 'classifier.header.pointwise_conv.conv.bias'
_CLS_WEIGHT = 'classifier.header.pointwise_conv.conv.weight'
_BOX_BIAS = 'regressor.header.pointwise_conv.conv.bias'


def _as_checkpoint(src: Union[Source, Checkpoint]) -> Checkpoint:
    return src if isinstance(src, Checkpoint) else read_checkpoint(src)


def to_our_state_dict(ck: Checkpoint, compound_coef) -> Tuple[StateDict, Dict[str, str]]:
    """The checkpoint's weights under this project's keys for efficientdet-d{compound_coef}, and the
    keys that were left out on purpose (key → reason): effdet's anchor buffer, Yet-Another's unused
    sum-fusion weights. Conversions are strict: any other unmapped key is an error."""
    layout = get_layout(ck.layout)
    if layout is None:
        raise UserError(f'{ck.name}: not an EfficientDet checkpoint (keys such as '
                        f'{", ".join(list(ck.state_dict)[:3])} match no known layout)')
    try:
        sd, left_out = layout.to_ours(ck.state_dict, compound_coef)
    except ConversionError as e:
        raise UserError(f'{ck.name}: {" ".join(str(e).split())}') from None
    return sd, {**ck.dropped, **left_out}


def _compact(keys: Sequence[str], limit: int = 6) -> str:
    """``['a.b.weight', 'a.b.bias']`` → ``'a.b.{weight,bias}'``; long lists are cut with a count."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        head, _, tail = k.rpartition('.')
        groups.setdefault(head, []).append(tail)
    parts = [(f'{h}.{{{",".join(t)}}}' if len(t) > 1 else (f'{h}.{t[0]}' if h else t[0])) for h, t in groups.items()]
    if len(parts) > limit:
        parts = parts[:limit] + [f'… ({len(keys)} keys in all)']
    return ', '.join(parts)


def _summarise_dropped(dropped: Mapping[str, str], layout: str) -> str:
    """The keys a layout's adapter left out, by reason, as that adapter names them."""
    by_reason: Dict[str, List[str]] = {}
    for k, r in dropped.items():
        by_reason.setdefault(r, []).append(k)
    adapter = get_layout(layout)
    return '; '.join((adapter.describe_dropped(keys, reason) if adapter is not None else None)
                     or f'dropped {_compact(keys)} ({reason})' for reason, keys in by_reason.items())


def _num_anchors(model: nn.Module) -> int:
    ratios, scales = getattr(model, 'aspect_ratios', None), getattr(model, 'scales', None)
    if ratios is not None and scales is not None:
        return len(ratios) * len(scales)
    return 9


def class_count_error(name: str, n_file: int, n_model: int, project: str = '') -> UserError:
    """The one-line refusal of a file whose class count differs from the model's; ``project``
    (e.g. "project 'shape' (projects/shape.yml)") names where the model's count came from."""
    where = f'{project} lists' if project else 'the model has'
    which = ('-p coco (the 90-slot COCO label map of the released checkpoints)' if n_file == 90
             else f'-p with the project these weights were trained on ({n_file} classes)')
    return UserError(f'{name}: file holds weights for {n_file} classes but {where} {n_model}; pass {which}, '
                     f'or fine-tune them on {n_model} classes (train.py -w, load_pretrained())')


def _file_anchors(sd: Mapping[str, torch.Tensor], default: int) -> int:
    """Anchors per location of a state_dict (from the box head's last bias: anchors × 4)."""
    t = sd.get(_BOX_BIAS)
    return int(t.shape[0]) // 4 if t is not None and t.dim() == 1 and t.shape[0] % 4 == 0 else default


def _header_reason(key: str, file_shape: Sequence[int], model_shape: Sequence[int], file_anchors: int,
                   model_anchors: int) -> str:
    """Why a tensor of the file does not fit the model, in words (classes / anchors when it can)."""
    fo, mo = int(file_shape[0]), int(model_shape[0])
    if key.startswith('classifier.header.pointwise_conv') and fo % file_anchors == 0 and mo % model_anchors == 0:
        if file_anchors == model_anchors:
            return f'shape: {fo // file_anchors} classes in file, {mo // model_anchors} in model'
        return (f'shape: {fo // file_anchors} classes x {file_anchors} anchors in file, '
                f'{mo // model_anchors} classes x {model_anchors} anchors in model')
    if key.startswith('regressor.header.pointwise_conv') and fo % 4 == 0 and mo % 4 == 0:
        return f'shape: {fo // 4} anchors per location in file, {mo // 4} in model'
    return f'shape: {list(file_shape)} in file, {list(model_shape)} in model'


@dataclass
class LoadReport:
    """What a load did. ``str(report)`` is the one-line summary that is printed."""
    source: str
    mode: str                      # 'exact' (load_weights) or 'fine-tune' (load_pretrained)
    file_holds: str                # e.g. 'efficientdet-d0, 90 classes (effdet layout)'
    loaded: List[str] = field(default_factory=list)
    total: int = 0                 # tensors in the model's state_dict
    skipped: Dict[str, str] = field(default_factory=dict)   # key → reason (kept the model's init)
    dropped: Dict[str, str] = field(default_factory=dict)   # file key → reason (not used on purpose)
    reinitialized: List[str] = field(default_factory=list)
    layout: str = ''               # the file's key layout (names what its adapter dropped)

    def __str__(self) -> str:
        parts = [f'{self.mode} load: {len(self.loaded)}/{self.total} tensors from {self.source} ({self.file_holds})']
        if self.skipped:
            by_reason: Dict[str, List[str]] = {}
            for k, r in self.skipped.items():
                by_reason.setdefault(r, []).append(k)
            parts.append(f'skipped {len(self.skipped)} keys: '
                         + '; '.join(f'{_compact(ks)} ({r})' for r, ks in by_reason.items()))
        if self.dropped:
            parts.append(_summarise_dropped(self.dropped, self.layout))
        if self.reinitialized:
            parts.append(f're-initialised {", ".join(self.reinitialized)}')
        return '; '.join(parts)


def _holds(ck: Checkpoint, sd: Mapping[str, torch.Tensor], file_anchors: int) -> str:
    """'efficientdet-d0, 90 classes, effdet layout' for the report line."""
    n = infer_num_classes(sd, file_anchors, 'ours')
    cls = f', {n} classes' if n is not None else ''
    layout = get_layout(ck.layout)
    how = layout.loaded_as if layout is not None else ck.layout
    return f'{describe_coef(ck.candidates)}{cls}, {how}'


def _prepare(model: nn.Module, src: Union[Source, Checkpoint], mode: str
             ) -> Tuple[Checkpoint, StateDict, StateDict, int, int, LoadReport]:
    """What both loads start from: the checkpoint (variant checked), its weights under this
    project's keys, the model's state_dict, anchors per location of model and file, the report."""
    ck = _as_checkpoint(src)
    check_variant(ck, getattr(model, 'compound_coef'))
    sd, dropped = to_our_state_dict(ck, getattr(model, 'compound_coef'))
    own = model.state_dict()
    anchors = _num_anchors(model)
    file_anchors = _file_anchors(sd, anchors)
    report = LoadReport(ck.name, mode, _holds(ck, sd, file_anchors), total=len(own), dropped=dropped,
                        layout=ck.layout)
    return ck, sd, own, anchors, file_anchors, report


def load_weights(model: nn.Module, path_or_state_dict: Union[Source, Checkpoint], strict: bool = True,
                 verbose: bool = True) -> LoadReport:
    """Exact loading (inference, evaluation, resuming): every model tensor must come from the file.

    Reads safely, unwraps, converts effdet / official-TF layouts, drops only Yet-Another's unused
    sum-fusion weights (and effdet's anchor buffer), then refuses with a UserError when the file's
    compound coefficient (from tensor shapes) or class count differs from the model's."""
    ck, sd, own, anchors, file_anchors, report = _prepare(model, path_or_state_dict, 'exact')
    coef = getattr(model, 'compound_coef')
    if file_anchors != anchors:
        raise UserError(f'{ck.name}: file has {file_anchors} anchors per location but the model {anchors} '
                        '(len(ratios) x len(scales)); build the model with the ratios/scales the weights were '
                        'trained with (projects/*.yml anchors_ratios / anchors_scales), or fine-tune with '
                        'load_pretrained()')
    if _CLS_BIAS in sd and _CLS_BIAS in own and sd[_CLS_BIAS].shape != own[_CLS_BIAS].shape:
        raise class_count_error(ck.name, sd[_CLS_BIAS].shape[0] // anchors, own[_CLS_BIAS].shape[0] // anchors)
    bad = [f'{k} {list(v.shape)} vs {list(own[k].shape)}' for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise UserError(f'{ck.name}: {len(bad)} tensors have the wrong shape for {get_config(coef).name}: '
                        + ', '.join(bad[:5]) + (' …' if len(bad) > 5 else ''))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        msg = []
        if missing:
            msg.append(f'{len(missing)} model tensors missing from the file: {_compact(missing)}')
        if unexpected:
            msg.append(f'{len(unexpected)} file tensors the model does not have: {_compact(unexpected)}')
        raise UserError(f'{ck.name}: cannot load exactly into {get_config(coef).name}: ' + '; '.join(msg)
                        + ' (use load_pretrained() to load only what fits)')
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=strict)
    report.loaded = [k for k in own if k in sd]
    report.skipped = {k: 'not in file' for k in missing}
    report.skipped.update({k: 'not in model' for k in unexpected})
    if verbose and (report.dropped or report.skipped or ck.layout != 'ours'):
        print(report)
    return report


def reinit_classifier_header_(model: nn.Module, prior: float = 0.01) -> List[str]:
    """Official initialisation of the classifier's last (pointwise) conv: variance scaling weight,
    bias -log((1 - prior) / prior) so every initial score equals ``prior``. Returns its name."""
    from ..head import variance_scaling_
    conv = model.classifier.header.pointwise_conv.conv
    variance_scaling_(conv.weight)
    with torch.no_grad():
        conv.bias.fill_(-math.log((1 - prior) / prior))
    return [f'classifier.header.pointwise_conv (focal-loss prior {prior:g})']


def load_pretrained(model: nn.Module, path: Union[Source, Checkpoint], verbose: bool = True,
                    prior: float = 0.01) -> LoadReport:
    """Fine-tuning load: every tensor whose name and shape fit is loaded; the rest keep the model's
    initialisation, and the classifier's last layer is re-initialised with the focal-loss prior when
    it did not fit (another class count). Prints ONE line saying what was loaded and what was
    skipped and why. A checkpoint of another compound coefficient is refused (UserError)."""
    ck, sd, own, anchors, file_anchors, report = _prepare(model, path, 'fine-tune')
    coef = getattr(model, 'compound_coef')
    fit: StateDict = {}
    for k, v in sd.items():
        if k not in own:
            report.skipped[k] = 'not in model'
        elif v.shape != own[k].shape:
            report.skipped[k] = _header_reason(k, v.shape, own[k].shape, file_anchors, anchors)
        else:
            fit[k] = v
    for k in own:
        if k not in sd:
            report.skipped[k] = 'not in file'
    if not fit:
        raise UserError(f'{ck.name}: no tensor of the file fits {get_config(coef).name}; nothing to fine-tune from')
    model.load_state_dict(fit, strict=False)
    report.loaded = [k for k in own if k in fit]
    if any(k in report.skipped for k in (_CLS_WEIGHT, _CLS_BIAS)) and hasattr(model, 'classifier'):
        report.reinitialized = reinit_classifier_header_(model, prior)
    if verbose:
        print(report)
    return report
