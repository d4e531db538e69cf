"""Released weights by name: a source beside the file system.

A weights spec is either a path (a file, an official TF checkpoint folder or prefix), which always
wins when it exists, or a name of the table (:mod:`.table`, one JSON file):

- ``tf_efficientdet_d0`` … ``tf_efficientdet_d7x``, ``tf_efficientdet_d0_ap`` … ``_d5_ap``,
  ``tf_efficientdet_lite0`` … ``lite4``, ``lite3x``: rwightman effdet's ports of the official weights;
- ``efficientdet-d0`` … ``efficientdet-d8`` (D8 = D7x): Yet-Another-EfficientDet-Pytorch's own;
- each publisher's file name (``tf_efficientdet_d0_34-f153e0cf.pth``, ``efficientdet-d2.pth``);
- ``coco``: the faithful official weights of the chosen variant (the effdet port).

:func:`resolve` turns a spec into a :class:`ResolvedWeights` (a local path, fetched and verified
by :mod:`.fetch` when needed, and the table row with the facts the weights come with: variant,
input size, normalisation, compat mode); :func:`open_weights` also reads it (safely, through
:mod:`efficientdet.ckpt`) and removes a cached file that does not hold the named variant.
``python -m efficientdet.zoo list|get|verify`` is the command.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ..ckpt.files import checkpoint_path_exists
from ..ckpt.layout import Checkpoint, describe_coef, read_checkpoint
from ..config import Variant, get_config, resolve_variant
from ..errors import UserError
from .fetch import MIRROR_ENV, OFFLINE_ENV, cache_dir, cache_path, discard, fetch, offline, source_url
from .hub import backbone_file
from .table import COCO, TABLE_ENV, Backbone, Entry, Table, load_table

__all__ = ['Entry', 'Backbone', 'Table', 'ResolvedWeights', 'COCO', 'load_table', 'is_name', 'variant_of',
           'lookup', 'resolve', 'open_weights', 'fetch', 'cache_dir', 'cache_path', 'source_url', 'offline',
           'backbone_file', 'OFFLINE_ENV', 'MIRROR_ENV', 'TABLE_ENV']

Spec = Union[str, 'os.PathLike[str]']


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights spec made local: ``path``, and ``entry`` when it was a released name (None for a path)."""
    path: str
    entry: Optional[Entry] = None

    @property
    def label(self) -> str:
        """What messages call it: the released name, else the path."""
        return self.entry.name if self.entry is not None else self.path

    @property
    def variant(self) -> Optional[Variant]:
        """The variant of a released name (None for a path: its tensors tell, once read)."""
        return self.entry.variant if self.entry is not None else None


def _variant(variant: Union[Variant, str, None]) -> Optional[Variant]:
    return None if variant is None else resolve_variant(variant)


def is_name(spec: object) -> bool:
    """Whether ``spec`` names released weights (``coco`` or a table name / file name) and is not
    an existing path (a path always wins)."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    spec = os.fspath(spec)
    return not checkpoint_path_exists(spec) and (spec == COCO or load_table().find(spec) is not None)


def variant_of(spec: object) -> Optional[Variant]:
    """The variant a released name implies (``tf_efficientdet_d2`` → 2, ``efficientdet-d8`` → 8);
    None for ``coco``, paths and anything else."""
    if not is_name(spec) or os.fspath(spec) == COCO:  # type: ignore[arg-type]
        return None
    entry = load_table().find(os.fspath(spec))  # type: ignore[arg-type]
    return entry.variant if entry is not None else None


def lookup(spec: Spec, variant: Union[Variant, str, None] = None) -> Optional[Entry]:
    """The table row ``spec`` names, checked against ``variant`` (``-c``; None: not given), without
    touching the network; None when ``spec`` is an existing path. UserError for ``coco`` without a
    variant, a name of another variant than ``variant``, or a spec that is neither a path nor a name."""
    spec = os.fspath(spec)
    if checkpoint_path_exists(spec):
        return None
    key = _variant(variant)
    table = load_table()
    if spec == COCO:
        if key is None:
            raise UserError('-w coco: the released COCO weights of which variant? pass -c (0-8, lite0 … lite4)')
        entry = table.coco(key)
        if entry is None:
            raise UserError(f'-w coco: no released COCO weights are listed for {get_config(key).name} '
                            f'(python -m efficientdet.zoo list)')
        return entry
    entry = table.find(spec)
    if entry is None:
        names = [e.name for e in table.entries] + [COCO]
        close = difflib.get_close_matches(os.path.basename(spec), names, n=1)
        hint = f'did you mean {close[0]}? ' if close else ''
        raise UserError(f'{spec}: no such checkpoint file or folder, and no released weights have that name; {hint}'
                        'python -m efficientdet.zoo list shows the names')
    if key is not None and key != entry.variant:
        raise UserError(f'-w {spec}: these are {entry.variant_name} weights but -c {key} ({get_config(key).name}) '
                        f'was asked; pass -c {entry.variant}, or leave -c out')
    return entry


def resolve(spec: Spec, variant: Union[Variant, str, None] = None, progress: bool = True) -> ResolvedWeights:
    """``spec`` as a local file: an existing path as it is, a released name fetched into torch.hub's
    cache (verified; see :mod:`.fetch`) when it is not there yet. ``variant``: ``-c`` (needed for
    ``coco``; checked against a name)."""
    entry = lookup(spec, variant)
    if entry is None:
        return ResolvedWeights(os.fspath(spec))
    return ResolvedWeights(fetch(entry, progress=progress), entry)


def open_weights(spec: Union[Spec, ResolvedWeights], variant: Union[Variant, str, None] = None,
                 progress: bool = True) -> Tuple[Checkpoint, ResolvedWeights]:
    """:func:`resolve` (unless ``spec`` already is a :class:`ResolvedWeights`), then read the file
    (:func:`efficientdet.ckpt.layout.read_checkpoint`: safe loading, layout detection). A cached
    released file that does not read, or whose tensors are not its entry's variant, is removed from
    the cache (UserError saying so)."""
    got = spec if isinstance(spec, ResolvedWeights) else resolve(spec, variant, progress=progress)
    if got.entry is None:
        return read_checkpoint(got.path), got
    try:
        ck = read_checkpoint(got.path, name=f'{got.entry.name} ({got.path})')
    except UserError as e:
        raise discard(got.entry, got.path, str(e).split(': ', 1)[-1]) from None
    if got.entry.variant not in ck.candidates:
        raise discard(got.entry, got.path, f'its tensors are {describe_coef(ck.candidates)}, '
                                           f'not {got.entry.variant_name}') from None
    return ck, got
