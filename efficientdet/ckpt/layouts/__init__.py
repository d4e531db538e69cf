"""Checkpoint key layouts: one adapter module per layout, each one :class:`Layout` registered with
:func:`register_layout`. :mod:`efficientdet.ckpt` asks the registry, downward, which layout a
state_dict is in (:func:`detect_layout`) and has that layout's adapter turn it into this project's
keys (:meth:`Layout.to_ours`). Adding a layout means one module and one ``register_layout`` call.

Built in, in detection order: ``tf`` (official TF variable names), ``yet_another``
(Yet-Another-EfficientDet-Pytorch files that carry its unused sum-fusion weights), ``ours`` (this
project's keys, which Yet-Another's other files share) and ``effdet`` (rwightman efficientdet-pytorch).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, TypeVar

from ...config import Variant
from ..files import StateDict
from ..signature import FEATURES, SignatureSpec

UNKNOWN = 'unknown'


class CheckpointView(Protocol):
    """What an adapter reads of a :class:`efficientdet.ckpt.layout.Checkpoint` (which satisfies it;
    the adapters sit below that module and never import it)."""
    state_dict: StateDict
    dropped: Dict[str, str]
    training: Optional[Dict[str, Any]]

    @property
    def candidates(self) -> List[Variant]: ...


class ConversionError(ValueError):
    """A state_dict that does not convert exactly (missing, unused or mis-shaped tensors, named)."""


class Layout(ABC):
    """One checkpoint key layout."""
    #: ``Checkpoint.layout`` value
    name: str = ''
    #: what ``inspect`` and messages call it
    title: str = ''
    #: how a load report says the keys were taken ('this project / Yet-Another keys', 'converted from …')
    loaded_as: str = ''
    #: where the architecture features live in its keys (:mod:`efficientdet.ckpt.signature`)
    signature: SignatureSpec = {}
    #: the classifier's last bias (its length is anchors x classes)
    class_bias: str = ''
    #: the ``python -m efficientdet.convert`` command that writes a .pth of this layout once (None: none needed)
    convert_command: Optional[str] = None
    #: detection order: lower is asked first (a layout that refines another comes before it)
    order: int = 100

    @abstractmethod
    def claims(self, sd: Mapping[str, Any]) -> bool:
        """Whether ``sd`` (prefixes already stripped) is in this layout."""

    def clean(self, sd: StateDict) -> StateDict:
        """The state_dict as the adapter wants to keep it (e.g. TF's ``':0'`` suffixes removed)."""
        return sd

    def read_path(self, path: str) -> Optional[Dict[str, Any]]:
        """Tensors of a checkpoint that is not one file this layout alone knows how to read (a TF
        checkpoint folder); None for anything else (read by :func:`efficientdet.ckpt.files.read_file`)."""
        return None

    @abstractmethod
    def to_ours(self, sd: StateDict, variant: Variant) -> Tuple[StateDict, Dict[str, str]]:
        """``sd`` under this project's keys for ``variant``, and the keys left out on purpose (key →
        reason). Strict: any other unmapped, missing or mis-shaped tensor raises ConversionError."""

    def origin(self, ck: CheckpointView) -> str:
        """Where a checkpoint of this layout comes from, in words (``inspect``)."""
        return self.title

    def describe_dropped(self, keys: List[str], reason: str) -> Optional[str]:
        """How a load report names the ``keys`` this adapter's :meth:`to_ours` left out for
        ``reason``; None: listed as they are."""
        return None


LAYOUTS: Dict[str, Layout] = {}
L = TypeVar('L', bound=Layout)


def register_layout(layout: L) -> L:
    """Make ``layout`` known to :func:`detect_layout` (asked in ``order``); its ``signature`` may
    name the features of :data:`efficientdet.ckpt.signature.FEATURES` only."""
    unknown = sorted(set(layout.signature) - set(FEATURES))
    if unknown:
        raise ValueError(f'layout {layout.name!r}: signature features {unknown} are not among {FEATURES}')
    LAYOUTS[layout.name] = layout
    ordered = sorted(LAYOUTS.values(), key=lambda x: x.order)
    LAYOUTS.clear()
    LAYOUTS.update((x.name, x) for x in ordered)
    return layout


def get_layout(name: str) -> Optional[Layout]:
    """The registered layout ``name`` (None for 'unknown' or an unregistered name)."""
    return LAYOUTS.get(name)


def detect_layout(sd: Mapping[str, Any]) -> str:
    """Name of the first layout (in ``order``) that claims ``sd``, else ``'unknown'``."""
    return next((name for name, layout in LAYOUTS.items() if layout.claims(sd)), UNKNOWN)


def layout_names() -> Dict[str, str]:
    """Layout name → title, 'unknown' included."""
    return {**{n: layout.title for n, layout in LAYOUTS.items()}, UNKNOWN: UNKNOWN}


from . import effdet, ours, tf, yet_another  # noqa: E402,F401  (registers the built-in layouts)
