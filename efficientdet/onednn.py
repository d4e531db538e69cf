"""CPU fast path of the fused model: torch's internal oneDNN fused convolution kernels.

``torch.ops.mkldnn._convolution_pointwise`` runs a convolution with its activation (swish,
ReLU, ReLU6) or a residual add fused into one call, on a weight reordered once to oneDNN's
layout; ``torch.compile`` uses the same kernels on CPU. They are internal ops, so every use is
guarded by :func:`onednn_available`, which checks once per process and per activation that
they exist and compute what ``F.conv2d`` computes; callers fall back to the plain ops otherwise.

All tensors are NCHW (channels_last strides preferred); float32 CPU only.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['onednn_available', 'ACTIVATIONS', 'pack_weight', 'ConvCall', 'PadBuffers',
           'cpu_autocast_enabled', 'usable']

# activation name -> (oneDNN attribute, scalars, eager function)
ACTIVATIONS = {
    'swish': ('swish', [], F.silu),
    'relu': ('relu', [], F.relu),
    'relu6': ('hardtanh', [0.0, 6.0], F.relu6),
}
_CHECKED: Dict[str, bool] = {}


def onednn_available(act: Optional[str] = None) -> bool:
    """Whether this torch build's oneDNN fused conv ops exist and agree with ``F.conv2d`` for
    activation ``act`` (None: plain conv and the residual add). Checked once on a tiny input."""
    key = act or 'none'
    if key not in _CHECKED:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
            w, b, o = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g), torch.randn(1, 4, 5, 5, generator=g)
            conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            with torch.no_grad():
                conv.weight.copy_(w * 3.0)  # values beyond 6 so that ReLU6's clip matters
                conv.bias.copy_(b)
            call = ConvCall(conv, x.shape, act)
            ref = F.conv2d(x, conv.weight, conv.bias, 1, 1, 1, 4)
            if act is None:
                ok = torch.allclose(call(x, o), ref + o, atol=1e-4) and torch.allclose(call(x), ref, atol=1e-4)
            else:
                ok = torch.allclose(call(x), ACTIVATIONS[act][2](ref), atol=1e-4)
            _CHECKED[key] = bool(ok)
        except Exception:  # missing op, changed signature, build without oneDNN ...
            _CHECKED[key] = False
    return _CHECKED[key]


def pack_weight(conv: nn.Conv2d, input_shape: Sequence[int]) -> torch.Tensor:
    """``conv``'s weight reordered for oneDNN (an opaque tensor; valid while the weight is)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        conv.weight.detach().to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        list(input_shape))


class ConvCall:
    """One conv's oneDNN call with everything but the input prepared once: the weight reordered
    for inputs shaped like ``input_shape``, the argument lists, the activation attribute.
    ``call(x, residual=None)`` is ``act(conv(x))`` or, without an activation, ``conv(x) +
    residual`` in one call (with both, the add follows the call). Valid while the weights are."""

    __slots__ = ('packed', 'bias', 'args', 'attr', 'scalars', 'has_act')

    def __init__(self, conv: nn.Conv2d, input_shape: Sequence[int], act: Optional[str]):
        self.packed = pack_weight(conv, input_shape)
        self.bias = conv.bias
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.attr, self.scalars = ('none', []) if act is None else (ACTIVATIONS[act][0], list(ACTIVATIONS[act][1]))
        self.has_act = act is not None

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding, stride, dilation, groups = self.args
        if residual is not None and not self.has_act:
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, self.packed, self.bias, padding, stride,
                                                                  dilation, groups, 'add', None, None, [], None)
        y = torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, padding, stride, dilation, groups,
                                                    self.attr, self.scalars, '')
        return y if residual is None else y.add_(residual)


class PadBuffers:
    """Zero-padded copies of inputs in reused per-thread buffers whose zero border is written
    only once: the asymmetric TF "SAME" padding of stride-2 convs without a fresh allocation."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self._bufs: Dict[tuple, torch.Tensor] = {}

    def clear(self) -> None:
        self._bufs = {}

    def padded(self, x: torch.Tensor, pad: Tuple[int, int, int, int]) -> torch.Tensor:
        """``F.pad(x, pad)`` (left, right, top, bottom) with zeros, into a reused buffer."""
        left, right, top, bottom = pad
        n, c, h, w = x.shape
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        key = (threading.get_ident(), n, c, h, w, tuple(pad), x.dtype, x.device, cl)
        buf = self._bufs.get(key)
        if buf is None:
            if len(self._bufs) >= self.limit:
                self._bufs = {}
            buf = x.new_zeros((n, c, h + top + bottom, w + left + right))
            if cl:
                buf = buf.contiguous(memory_format=torch.channels_last)
            self._bufs[key] = buf
        buf[:, :, top:top + h, left:left + w].copy_(x)
        return buf


def cpu_autocast_enabled() -> bool:
    """Whether CPU autocast is on (the fast path is float32 only)."""
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # older torch
        return torch.is_autocast_cpu_enabled()


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the oneDNN path may run on ``x`` now: eager float32 CPU inference only (never with
    autograd, under autocast, or while tracing / scripting / exporting)."""
    return (x.is_cpu and x.dtype is torch.float32 and weight.dtype is torch.float32 and not x.requires_grad
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not cpu_autocast_enabled()
            and not torch.jit.is_scripting())

