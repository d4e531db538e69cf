"""Dataset formats: each one turns a split of a dataset folder into the same in-memory COCO dict.

A format is one module with one :class:`DatasetFormat` subclass registered in :data:`FORMATS`
under the name a project file gives as ``dataset_format`` (``coco`` by default). Its ``read``
returns a :class:`SplitData`; :func:`load_split` validates that with the one validator
(:func:`efficientdet.data.annotations.index_coco`) into a :class:`CocoIndex`, which the dataset,
``python -m efficientdet.data.check``, ``python -m efficientdet.data.convert`` and evaluation
use. Adding a format (OpenImages, LabelMe, ...) means one module and one ``register_format`` call.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, TypeVar

from ...errors import UserError
from ..annotations import MAX_EXAMPLES, CocoIndex, Issues, index_coco


@dataclass
class SplitData:
    """One split read by a format, not yet validated.

    ``data``: COCO instances dict (images with id, file_name relative to ``image_dir``, height,
    width; annotations with id, image_id, category_id, bbox x/y/w/h image pixels, area, iscrowd;
    categories). ``source``: what messages name (a json file, or the format's folder).
    ``issues``: problems found while parsing (malformed files and lines). ``where``: annotation id →
    'file:line'. ``images_found``: False when the image folder is absent (ground truth only).
    """
    data: Dict[str, Any]
    image_dir: str
    source: str
    issues: Issues
    where: Dict[int, str] = field(default_factory=dict)
    images_found: bool = True


class DatasetFormat(ABC):
    """A dataset layout under ``{data_path}/{project_name}/``."""
    #: the project file's ``dataset_format`` value
    name: str = ''
    #: where things go, with ``{root}`` and ``{split}`` placeholders (used in messages and docs)
    layout: str = ''

    def describe(self, root_dir: str, split: str) -> str:
        return self.layout.format(root=root_dir, split=split)

    def check_root(self, root_dir: str, split: str) -> None:
        """UserError when the dataset folder itself is missing."""
        if not os.path.isdir(root_dir):
            hint = (f' (to make the synthetic shapes set: python -m efficientdet.data.shapes --root {root_dir})'
                    if os.path.basename(os.path.normpath(root_dir)) == 'shape' else '')
            raise UserError(f'dataset folder {root_dir} not found; expected {self.describe(root_dir, split)} '
                            f'({self.name} layout). Put the dataset there or pass --data_path pointing at the '
                            f'folder that holds it{hint}')

    def need(self, path: str, root_dir: str, split: str, folder: bool = False, required: bool = True) -> bool:
        """Whether ``path`` (a file, or a folder) exists; UserError naming it and the expected layout
        when it does not and is ``required``."""
        found = os.path.isdir(path) if folder else os.path.isfile(path)
        if required and not found:
            raise UserError(f'{"folder" if folder else "file"} {path} not found; expected '
                            f'{self.describe(root_dir, split)} ({self.name} layout). Check train_set / val_set in '
                            'the project file and --data_path')
        return found

    @abstractmethod
    def read(self, root_dir: str, split: str, obj_list: Optional[Sequence[str]], issues: Issues,
             require_images: bool = True) -> SplitData:
        """Read split ``split`` of the dataset in ``root_dir``. Problems in single files or lines
        go to ``issues`` (with file and line); a missing folder or list file raises UserError.
        ``require_images=False``: a missing image folder is allowed where the format can (ground
        truth for scoring a results file)."""


FORMATS: Dict[str, DatasetFormat] = {}
F = TypeVar('F', bound=DatasetFormat)


def register_format(fmt: F) -> F:
    """Make ``fmt`` available as ``dataset_format: <fmt.name>``."""
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str, source: str = 'dataset_format') -> DatasetFormat:
    """The registered format ``name``; UserError naming ``source`` and the known names otherwise."""
    fmt = FORMATS.get(str(name).strip().lower())
    if fmt is None:
        raise UserError(f'{source}: unknown dataset format {name!r}; use one of {", ".join(sorted(FORMATS))}')
    return fmt


def format_names() -> List[str]:
    return sorted(FORMATS)


def load_split(root_dir: str, split: str, obj_list: Optional[Sequence[str]], dataset_format: str = 'coco',
               check_files: bool = True, max_examples: int = MAX_EXAMPLES,
               require_images: bool = True) -> CocoIndex:
    """Read and validate one split of any format into a :class:`CocoIndex` (skipped entries are
    counted in its ``issues``). ``require_images=False`` allows a missing image folder
    (``index.images_checked`` is then False and every listed image counts)."""
    fmt = get_format(dataset_format)
    part = fmt.read(root_dir, split, obj_list, Issues(max_examples), require_images=require_images)
    return index_coco(part.data, part.source, part.image_dir, obj_list, check_files=check_files and part.images_found,
                      max_examples=max_examples, where=part.where, issues=part.issues)


def project_split(project: Any, split: str, data_path: str = 'datasets/', check_files: bool = True,
                  max_examples: int = MAX_EXAMPLES, require_images: bool = True) -> CocoIndex:
    """:func:`load_split` for a loaded project (its folder under ``data_path``, obj_list and
    ``dataset_format``)."""
    fmt = getattr(project, 'dataset_format', 'coco')
    get_format(fmt, f'{getattr(project, "path", "project file")}: dataset_format')
    return load_split(os.path.join(data_path, project.project_name), split, project.obj_list, fmt, check_files,
                      max_examples, require_images)


from . import coco, voc, yolo  # noqa: E402,F401  (registers the built-in formats)
