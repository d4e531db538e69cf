"""The table of released weights: one JSON file (``table.json`` beside this module, or the file
``EFFICIENTDET_ZOO_TABLE`` names), read into :class:`Entry` rows. No URL lives in code.

A row is found by its name (``tf_efficientdet_d2``, ``efficientdet-d2``) or by its publisher's
file name (``tf_efficientdet_d2_43-8107aa99.pth``, ``efficientdet-d2.pth``); ``coco`` with a
variant is the row marked ``"coco": true`` for that variant (the effdet port of the official
weights: the faithful ones).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..config import COMPAT_MODES, Variant, get_config, parse_variant
from ..errors import UserError

TABLE_ENV = 'EFFICIENTDET_ZOO_TABLE'
DEFAULT_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'table.json')
COCO = 'coco'  # the short form: the faithful official weights of the chosen variant

Triple = Tuple[float, float, float]


@dataclass(frozen=True)
class Entry:
    """One released checkpoint and the facts that go with it.

    ``mean``/``std``: the RGB input normalisation on the 0-1 scale its weights expect when it
    differs from the variant's own (effdet's AdvProp ports: 0.5 / 0.5), else None.
    ``compat``: the computation the weights were trained with ('zylo117' for Yet-Another's).
    ``ap_published`` / ``ap_official``: COCO val2017 AP as published by the source (its own
    evaluation of the file; the official TF model's, as the source lists it); never measured here.
    ``sha256_prefix``: the first hex digits of the file's sha256 when the publisher gives them.
    """
    name: str
    variant: Variant
    source: str
    url: str
    input_size: int
    compat: str = 'official'
    project: Optional[str] = None
    sha256_prefix: Optional[str] = None
    mean: Optional[Triple] = None
    std: Optional[Triple] = None
    ap_published: Optional[float] = None
    ap_official: Optional[float] = None
    size_bytes: Optional[int] = None
    coco: bool = False
    source_title: str = ''

    @property
    def file_name(self) -> str:
        """The publisher's file name (the last part of the URL): the name in every cache and mirror."""
        return self.url.rstrip('/').rsplit('/', 1)[-1]

    @property
    def variant_name(self) -> str:
        """'efficientdet-d2', 'efficientdet-d7x', 'efficientdet-lite0' …"""
        return get_config(self.variant).name


@dataclass(frozen=True)
class Backbone:
    """ImageNet weights of one backbone on the Hugging Face Hub: repository, file, revision."""
    name: str
    repo: str
    file: str
    revision: str


@dataclass(frozen=True)
class Table:
    entries: Tuple[Entry, ...]
    backbones: Mapping[str, Backbone]
    path: str

    def find(self, spec: str) -> Optional[Entry]:
        """The row named ``spec`` (its name or its publisher's file name), else None."""
        return next((e for e in self.entries if spec in (e.name, e.file_name)), None)

    def coco(self, variant: Variant) -> Optional[Entry]:
        """The row ``coco`` stands for with ``variant`` (None when there is none)."""
        return next((e for e in self.entries if e.coco and e.variant == variant), None)


def _triple(v: Any, where: str) -> Optional[Triple]:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
        raise UserError(f'{where}: must be a list of three numbers (RGB, 0-1 scale)')
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def _entry(row: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]], where: str) -> Entry:
    missing = [k for k in ('name', 'variant', 'source', 'url', 'input_size') if k not in row]
    if missing:
        raise UserError(f'{where}: missing {", ".join(missing)}')
    src = sources.get(row['source'])
    if src is None:
        raise UserError(f'{where}: source {row["source"]!r} is not one of {", ".join(sources)}')
    try:
        variant = parse_variant(row['variant'])
        get_config(variant)
    except ValueError as e:
        raise UserError(f'{where}: variant {row["variant"]!r}: {e}') from None
    compat = row.get('compat', src.get('compat', 'official'))
    if compat not in COMPAT_MODES:
        raise UserError(f'{where}: compat {compat!r} is not one of {", ".join(COMPAT_MODES)}')
    return Entry(name=str(row['name']), variant=variant, source=str(row['source']), url=str(row['url']),
                 input_size=int(row['input_size']), compat=compat, project=row.get('project', src.get('project')),
                 sha256_prefix=row.get('sha256_prefix') or None, mean=_triple(row.get('mean'), f'{where}: mean'),
                 std=_triple(row.get('std'), f'{where}: std'), ap_published=row.get('ap_published'),
                 ap_official=row.get('ap_official'), size_bytes=row.get('size_bytes'), coco=bool(row.get('coco')),
                 source_title=str(src.get('title', row['source'])))


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> Table:
    try:
        with open(path, 'r', encoding='utf-8') as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: cannot read the weights table ({e})') from None
    sources = raw.get('sources', {})
    entries = tuple(_entry(row, sources, f'{path}: weights[{i}]') for i, row in enumerate(raw.get('weights', [])))
    names: Dict[str, str] = {}
    for e in entries:
        for key in {e.name, e.file_name}:
            if key in names and names[key] != e.name:
                raise UserError(f'{path}: {key!r} names both {names[key]} and {e.name}')
            names[key] = e.name
        if e.coco and sum(1 for o in entries if o.coco and o.variant == e.variant) > 1:
            raise UserError(f'{path}: more than one "coco" row for {e.variant_name}')
    backbones = {name: Backbone(name, b['repo'], b['file'], b.get('revision', 'main'))
                 for name, b in raw.get('imagenet', {}).get('backbones', {}).items()}
    return Table(entries, backbones, path)


def load_table(path: Optional[str] = None) -> Table:
    """The table at ``path``, else ``$EFFICIENTDET_ZOO_TABLE``, else the one shipped in the package
    (re-read when the file changes)."""
    path = path or os.environ.get(TABLE_ENV) or DEFAULT_TABLE
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        where = f' (from ${TABLE_ENV})' if path != DEFAULT_TABLE else ''
        raise UserError(f'{path}: weights table not found{where}') from None
    return _read(os.path.abspath(path), mtime)

