"""Target 'torch': the PyTorch model itself (the fused inference model by default).

:class:`TorchModel` runs an ``EfficientDetBackbone`` (or its fused copy, ``efficientdet.fuse``)
with the runtimes' contract: the best class is taken on the logits (the sigmoid then runs on
[B, A] values, not [B, A, C]); with ``half`` the network runs under autocast (float16 on CUDA,
bfloat16 on CPU: :func:`half_dtype`) while anchors, regression and scores come out float32, so
decoding is always float32 — the one meaning of ``--half`` in every script.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Union

import torch
from torch import nn

from ..errors import UserError
from ..postprocess import BestClass
from .base import Output, Target, register_target

__all__ = ['TorchModel', 'half_dtype', 'TARGET']


def half_dtype(device: Union[str, torch.device], kind: str = 'auto') -> torch.dtype:
    """The autocast dtype of ``--half`` on ``device``: 'auto' = float16 on CUDA, bfloat16 on CPU
    (CPU autocast has no float16 convolutions); 'float16' / 'bfloat16' explicitly."""
    dev = torch.device(device)
    if kind == 'auto':
        kind = 'float16' if dev.type == 'cuda' else 'bfloat16'
    if kind == 'float16' and dev.type != 'cuda':
        raise UserError('--half_dtype float16 needs --device cuda:0 (CPU autocast supports bfloat16 only)')
    if kind not in ('float16', 'bfloat16'):
        raise UserError(f'--half_dtype {kind!r}: choose auto, float16 or bfloat16')
    return torch.float16 if kind == 'float16' else torch.bfloat16


class TorchModel:
    """``model`` on ``device`` in eval mode, called with the runtimes' contract (see the module
    docstring). ``fuse``: run the fused copy (``efficientdet.fuse``; default: when the model can
    be fused and runs in float32 without autocast, where it is the fastest path); ``half``:
    autocast, ``half_kind`` as :func:`half_dtype`; ``compile``: ``torch.compile`` the network
    (on a CPU with frozen weights, inductor's ``freezing``: convs with prepacked weights and the
    element-wise glue generated as fused loops; the fused model's own oneDNN fast path is then
    off). Compilation happens in the first call of each input shape (about a minute for D0 on 2
    cores), so it pays off for long runs (video, evaluation, serving). ``allowed``: bool [C], the
    classes each anchor's best class is taken among (``postprocess.class_mask``)."""

    name = 'torch'
    training = False

    def __init__(self, model: nn.Module, device: Union[str, torch.device] = 'cpu', half: bool = False,
                 half_kind: str = 'auto', fuse: Optional[bool] = None, channels_last: bool = True,
                 fast: Optional[bool] = None, image_size=None, compile: bool = False,
                 allowed: Optional[torch.Tensor] = None):
        self.device = torch.device(device)
        self.allowed = allowed  # bool [C]: the classes an anchor's best class is taken among (None: all)
        self.half = half_dtype(self.device, half_kind) if half else None
        model = model.to(self.device).eval()
        self.source = model
        if fuse is None:
            fuse = hasattr(model, 'fuse') and self.half is None
        self.fused = bool(fuse)
        self.channels_last = channels_last
        # fused: the left-out classes are folded into the class head's bias (no masking per call)
        self.net = model.fuse(channels_last=channels_last, image_size=image_size,
                              fast=False if compile else fast,  # compiled: inductor's convs
                              allowed=allowed) if fuse else model
        if not fuse and channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.image_size = getattr(self.net, 'image_size', None)
        self.compiled = bool(compile)
        # inductor options of the compiled network (CPU: frozen, prepacked weights); None: not compiled
        self.compile_options = ({'freezing': True} if self.device.type == 'cpu' else {}) if compile else None
        if compile:
            self.net = torch.compile(self.net, dynamic=False, options=self.compile_options or None)
        # a module with the model's contract but no ``return_logits`` gives probabilities only
        import inspect
        self.gives_logits = self.fused or 'return_logits' in inspect.signature(model.forward).parameters

    def eval(self) -> 'TorchModel':
        return self

    def train(self, mode: bool = True) -> 'TorchModel':
        return self

    def parameters(self):
        return self.source.parameters()

    @property
    def num_classes(self) -> int:
        return int(self.source.num_classes)

    def __call__(self, x: torch.Tensor) -> Output:
        x = x.to(self.device, torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=self.half) if self.half is not None else nullcontext()
        with ctx:
            if self.fused:  # class logits level by level: no [B, A, C] concatenation
                _, regression, levels, anchors = self.net(x, return_logits=True, class_levels=True)
                best = BestClass.from_level_logits(levels)  # left-out classes folded in (fuse_model)
            elif self.gives_logits:
                _, regression, logits, anchors = self.net(x, return_logits=True)
                best = BestClass.from_logits(logits, self.allowed)
            else:
                _, regression, classification, anchors = self.net(x)
                best = BestClass.of(classification, self.allowed)
        return None, regression.float(), best, anchors.float()


class _TorchTarget(Target):
    name = 'torch'


TARGET = register_target(_TorchTarget())
