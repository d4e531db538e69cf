"""Inference-only EfficientDet: every BatchNorm folded into the conv before it.

``fuse_model(model)`` builds a NEW module (:class:`FusedEfficientDet`); the model passed in is left
untouched and stays trainable. What changes, and what does not:

- every ``BatchNorm2d`` is folded into the preceding convolution (weights scaled per output
  channel, bias adjusted), in float64, then cast back;
- the heads' shared separable convs with per-level BNs become per-level pointwise convs (the
  depthwise kernel stays shared, it comes before the BN);
- BiFPN fast-fusion weights are normalised once (``relu(w) / (sum + eps)``) and kept as floats;
- TF "SAME" paddings are fixed at build time (exact for every H, W that is a multiple of
  2**max_level, which EfficientDet requires) and anchors are precomputed for ``image_size``;
- swish is the plain ``F.silu`` (traceable, exportable), applied in place;
- optionally channels_last weights (inputs are converted in ``forward``) and, on CPU, a fast
  path through oneDNN fused conv+swish / conv+add kernels (``FusedConv``);
- under ``torch.onnx.export`` the graph is written in the form ONNX runtimes run fastest, with the
  same numbers: an asymmetric "SAME" padding becomes the Conv's own ``pads`` (no Pad node: one
  copy of the feature map less per stride-2 conv) and the SE squeeze a ``GlobalAveragePool``;
- ``forward(x)`` returns ``(features, regression, classification, anchors)`` exactly like
  :class:`~efficientdet.model.EfficientDetBackbone` (within float rounding, ~1e-5).

All tensors are NCHW (or channels_last NCHW); anchors are [1, A, 4] (y1, x1, y2, x2) in input pixels.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import Anchors
from .config import FUSION_EPS, as_hw, check_image_size
from .errors import UserError
from .layers import Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, SeparableConvBlock

__all__ = ['fuse_model', 'fold_bn', 'FusedEfficientDet', 'FusedConv', 'onednn_available']

SizeLike = Union[int, Tuple[int, int], Sequence[int]]


def fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight [O, I/g, kh, kw] and bias [O] of ``bn(conv(x))`` as a single conv (float64 maths,
    returned in the conv's dtype). ``bn=None`` returns the conv's own parameters."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else None
    if bn is None:
        return w.clone(), (b.clone() if b is not None else None)
    dt = w.dtype
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    b64 = b.double() if b is not None else torch.zeros_like(mean)
    w_f = w.double() * scale.reshape(-1, 1, 1, 1)
    b_f = (b64 - mean) * scale + beta
    return w_f.to(dt), b_f.to(dt)


_ONEDNN_OK: Optional[bool] = None


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # older torch
        return torch.is_autocast_cpu_enabled()


def onednn_available() -> bool:
    """Whether this torch build's oneDNN fused conv ops exist and compute what they should
    (checked once on a tiny input; they are internal ops, so a future torch may change them)."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
            w, b, o = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g), torch.randn(1, 4, 5, 5, generator=g)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 4, [1, 4, 5, 5])
            y1 = torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [1, 1], [1, 1], 4, 'swish', [], '')
            y2 = torch.ops.mkldnn._convolution_pointwise.binary(x, o, w, b, [1, 1], [1, 1], [1, 1], 4, 'add', None,
                                                                None, [], None)
            ref = F.conv2d(x, w, b, 1, 1, 1, 4)
            _ONEDNN_OK = bool(torch.allclose(y1, F.silu(ref), atol=1e-4) and torch.allclose(y2, ref + o, atol=1e-4))
        except Exception:  # missing op, changed signature, build without oneDNN ...
            _ONEDNN_OK = False
    return _ONEDNN_OK


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


class _PaddedConv(torch.autograd.Function):
    """Eager: zero-pad (left, right, top, bottom) then conv. ONNX: one Conv with asymmetric ``pads``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pad, groups):  # type: ignore[override]
        return F.conv2d(F.pad(x, pad), weight, bias, stride, 0, 1, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, stride, pad, groups):
        left, right, top, bottom = pad
        kernel = weight.type().sizes()[2:]
        args = [x, weight] if bias is None or bias.node().mustBeNone() else [x, weight, bias]
        return g.op('Conv', *args, kernel_shape_i=list(kernel), strides_i=list(stride),
                    pads_i=[top, left, bottom, right], group_i=groups, dilations_i=[1, 1])


class FusedConv(nn.Module):
    """Conv (BN already folded in) with static TF "SAME" padding and an optional swish.

    Symmetric padding is done by the conv itself; an asymmetric one (stride 2) by zero padding
    with the amounts fixed at build time, valid for inputs divisible by the stride.

    CPU fast path (``set_fast(True)``; eager float32 CPU inference only, never while tracing,
    scripting or with autograd): one oneDNN call per conv with the swish (or the residual add,
    ``forward_add``) fused in, the weight reordered once for oneDNN on first use, and asymmetric
    padding written into a reused per-thread buffer whose zero border is filled only once.
    """

    def __init__(self, src: Conv2dStaticSamePadding, bn: Optional[nn.BatchNorm2d] = None, act: bool = False):
        super().__init__()
        c = src.conv
        weight, bias = fold_bn(c, bn)
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, groups=c.groups,
                              dilation=c.dilation, bias=bias is not None)
        self.conv.padding = c.padding  # the symmetric "SAME" part; an asymmetric one is src._pad
        self.pad: Optional[Tuple[int, int, int, int]] = src._pad
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if bias is not None:
                self.conv.bias.copy_(bias)
        self.act = act
        self.fast = False
        self._reset_cache()

    # -- fast-path state: derived from the weights, never saved, copied or moved
    def _reset_cache(self) -> None:
        self._packed: Optional[torch.Tensor] = None  # oneDNN-layout weight (opaque tensor)
        self._pad_bufs: Dict[tuple, torch.Tensor] = {}  # (thread, shape, dtype, device, layout) -> buffer

    def __getstate__(self):  # deepcopy / pickle: opaque oneDNN tensors cannot be copied
        state = super().__getstate__() if hasattr(super(), '__getstate__') else self.__dict__.copy()
        state = dict(state)
        state['_packed'], state['_pad_bufs'] = None, {}
        return state

    def _apply(self, fn, recurse=True):  # .to() / .float() / .cuda(): drop caches of the old weights
        self._reset_cache()
        return super()._apply(fn, recurse)

    def set_fast(self, enabled: bool) -> None:
        self.fast = bool(enabled) and onednn_available()
        self._reset_cache()

    def _fast_ok(self, x: torch.Tensor) -> bool:
        return (self.fast and x.device.type == 'cpu' and x.dtype == torch.float32 and not x.requires_grad
                and self.conv.weight.dtype == torch.float32 and not _cpu_autocast()
                and not torch.jit.is_tracing() and not torch.jit.is_scripting())

    def _padded(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        if not fast:
            return F.pad(x, self.pad)
        left, right, top, bottom = self.pad
        n, c, h, w = x.shape
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        key = (threading.get_ident(), n, c, h, w, x.dtype, x.device, cl)
        buf = self._pad_bufs.get(key)
        if buf is None:
            if len(self._pad_bufs) >= 4:
                self._pad_bufs.clear()
            buf = x.new_zeros((n, c, h + top + bottom, w + left + right))
            if cl:
                buf = buf.contiguous(memory_format=torch.channels_last)
            self._pad_bufs[key] = buf
        buf[:, :, top:top + h, left:left + w].copy_(x)
        return buf

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            c = self.conv
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                c.weight.detach().to_mkldnn(), list(c.padding), list(c.stride), list(c.dilation), c.groups,
                list(x.shape))
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None and _exporting():
            c = self.conv
            x = _PaddedConv.apply(x, c.weight, c.bias, tuple(c.stride), tuple(self.pad), c.groups)
            return F.silu(x) if self.act else x
        fast = self._fast_ok(x)
        if self.pad is not None:
            x = self._padded(x, fast)
        if fast:
            c = self.conv
            return torch.ops.mkldnn._convolution_pointwise(x, self._weight(x), c.bias, list(c.padding),
                                                           list(c.stride), list(c.dilation), c.groups,
                                                           'swish' if self.act else 'none', [], '')
        x = self.conv(x)
        return F.silu(x, inplace=True) if self.act else x  # in place: x is this conv's fresh output

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``self(x) + other`` (no activation); a single oneDNN call on the fast path."""
        if self.act or self.pad is not None or not self._fast_ok(x):
            return self(x).add_(other)
        c = self.conv
        return torch.ops.mkldnn._convolution_pointwise.binary(x, other, self._weight(x), c.bias, list(c.padding),
                                                              list(c.stride), list(c.dilation), c.groups, 'add',
                                                              None, None, [], None)


def _separable(block: SeparableConvBlock, bn: Optional[nn.BatchNorm2d] = None) -> nn.Sequential:
    """Depthwise (shared, unchanged) + pointwise with ``bn`` (or the block's own BN) folded in."""
    own_bn = block.bn if block.norm else None
    if own_bn is not None and bn is not None:
        raise ValueError('a separable block with its own BN cannot take a second one')
    return nn.Sequential(FusedConv(block.depthwise_conv),
                         FusedConv(block.pointwise_conv, bn if bn is not None else own_bn,
                                   act=bool(block.activation)))


class _FusedMBConv(nn.Module):
    def __init__(self, block) -> None:
        super().__init__()
        self.expand = FusedConv(block._expand_conv, block._bn0, act=True) if block.expand else None
        self.depthwise = FusedConv(block._depthwise_conv, block._bn1, act=True)
        self.se_reduce = FusedConv(block._se_reduce, act=True)
        self.se_expand = FusedConv(block._se_expand)
        self.project = FusedConv(block._project_conv, block._bn2)
        self.skip = bool(block.id_skip)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs if self.expand is None else self.expand(inputs)
        x = self.depthwise(x)
        if _exporting():
            s = self.se_expand(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))
        else:  # the 1x1 convs on a 1x1 map as two small matmuls: no conv-call overhead
            r, e = self.se_reduce.conv, self.se_expand.conv
            s = F.silu(F.linear(x.mean((2, 3)), r.weight.flatten(1), r.bias), inplace=True)
            s = F.linear(s, e.weight.flatten(1), e.bias)[:, :, None, None]
        x = x.mul_(torch.sigmoid(s))  # x: the depthwise conv's fresh output
        return self.project.forward_add(x, inputs) if self.skip else self.project(x)


class _FusedEfficientNet(nn.Module):
    def __init__(self, backbone) -> None:
        super().__init__()
        m = backbone.model
        self.stem = FusedConv(m._conv_stem, m._bn0, act=True)
        self.blocks = nn.ModuleList([_FusedMBConv(b) for b in m._blocks])
        self.feature_blocks = list(backbone.feature_blocks)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        feats: List[torch.Tensor] = []
        for idx, block in enumerate(self.blocks):
            x = block(x)
            if idx in self.feature_blocks:
                feats.append(x)
        return feats


class _FusedBiFPN(nn.Module):
    """One BiFPN cell with folded BNs and constant fusion weights (same node order as ``bifpn.BiFPN``)."""

    def __init__(self, cell) -> None:
        super().__init__()
        self.levels: List[int] = list(cell.levels)
        self.first_time = bool(cell.first_time)
        self.pool = MaxPool2dStaticSamePadding(cell.pool.kernel_size, cell.pool.stride, cell.pool.pad_value)
        self.up = nn.ModuleList([_separable(getattr(cell, f'conv{lv}_up')) for lv in self.levels[:-1]])
        self.down = nn.ModuleList([_separable(getattr(cell, f'conv{lv}_down')) for lv in self.levels[1:]])
        if self.first_time:
            def ch(seq: nn.Sequential) -> FusedConv:
                return FusedConv(seq[0], seq[1])
            self.p3_down_channel = ch(cell.p3_down_channel)
            self.p4_down_channel = ch(cell.p4_down_channel)
            self.p5_down_channel = ch(cell.p5_down_channel)
            self.p4_down_channel_2 = ch(cell.p4_down_channel_2)
            self.p5_down_channel_2 = ch(cell.p5_down_channel_2)
            self.p5_to_p6 = ch(cell.p5_to_p6)
            pool6 = cell.p5_to_p6[2]
            self.p5_to_p6_pool = MaxPool2dStaticSamePadding(pool6.kernel_size, pool6.stride, pool6.pad_value)

        def weights(name: str, n: int) -> List[float]:
            if cell.fusion == 'sum':
                return [1.0] * n
            w = F.relu(getattr(cell, name).detach().double())
            return (w / (w.sum() + FUSION_EPS)).tolist()

        top = self.levels[-1]
        self.w_up: List[List[float]] = [weights(f'p{lv}_w1', 2) for lv in self.levels[:-1]]
        self.w_down: List[List[float]] = [weights(f'p{lv}_w2', 2 if lv == top else 3) for lv in self.levels[1:]]
        self.sum_fusion = cell.fusion == 'sum'

    def _fuse(self, w: List[float], nodes: List[torch.Tensor]) -> torch.Tensor:
        # fresh output first, then in-place accumulation (fewer large allocations)
        if self.sum_fusion:
            out = nodes[0] + nodes[1]
            for n in nodes[2:]:
                out.add_(n)
            return out
        out = nodes[0].mul(w[0]).add_(nodes[1], alpha=w[1])
        for i in range(2, len(nodes)):
            out.add_(nodes[i], alpha=w[i])
        return out

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        n = len(self.levels)
        if self.first_time:
            p3, p4, p5 = inputs[0], inputs[1], inputs[2]
            extra = [self.p5_to_p6_pool(self.p5_to_p6(p5))]
            while len(extra) < n - 3:
                extra.append(self.pool(extra[-1]))
            td_in = [self.p3_down_channel(p3), self.p4_down_channel(p4), self.p5_down_channel(p5)] + extra
            bu_in = [td_in[0], self.p4_down_channel_2(p4), self.p5_down_channel_2(p5)] + extra
        else:
            td_in = list(inputs)
            bu_in = td_in
        # top-down: index i runs over levels[:-1] from the top
        td: List[torch.Tensor] = [td_in[-1]] * n
        prev = td_in[-1]
        for i in range(n - 2, -1, -1):
            up = F.interpolate(prev, scale_factor=2.0, mode='nearest')
            prev = self.up[i](F.silu(self._fuse(self.w_up[i], [td_in[i], up]), inplace=True))
            td[i] = prev
        outs = [prev]
        for j in range(1, n):
            nodes = [bu_in[j], td[j], self.pool(prev)] if j != n - 1 else [bu_in[j], self.pool(prev)]
            prev = self.down[j - 1](F.silu(self._fuse(self.w_down[j - 1], nodes), inplace=True))
            outs.append(prev)
        return outs


class _FusedHead(nn.Module):
    """Box or class net: per level, [depthwise (shared) → pointwise with that level's BN folded → swish]
    × repeats, then the shared separable header. Output [B, A, num_outputs], P3 first."""

    def __init__(self, head) -> None:
        super().__init__()
        self.num_outputs = int(head.num_outputs)
        self.depthwise = nn.ModuleList([FusedConv(c.depthwise_conv) for c in head.conv_list])
        self.pointwise = nn.ModuleList([
            nn.ModuleList([FusedConv(conv.pointwise_conv, bn, act=True) for conv, bn in zip(head.conv_list, bns)])
            for bns in head.bn_list])
        self.header_dw = FusedConv(head.header.depthwise_conv)
        self.header_pw = FusedConv(head.header.pointwise_conv)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        outs: List[torch.Tensor] = []
        for feat, pws in zip(features, self.pointwise):
            x = feat
            for dw, pw in zip(self.depthwise, pws):
                x = pw(dw(x))
            x = self.header_pw(self.header_dw(x))
            x = x.permute(0, 2, 3, 1)  # batch size read after the permute: no NCHW copy in ONNX runtimes
            outs.append(x.reshape(x.shape[0], -1, self.num_outputs))
        return torch.cat(outs, dim=1)




class FusedEfficientDet(nn.Module):
    """Inference-only EfficientDet built by :func:`fuse_model`; see the module docstring.

    ``forward(x [B, 3, H, W] normalised, H and W multiples of 2**max_level, return_logits=False)
    -> (features, regression [B, A, 4] (ty, tx, th, tw), classification [B, A, C] after sigmoid
    (logits with return_logits=True), anchors [1, A, 4] yxyx pixels)``.
    """

    def __init__(self, model: nn.Module, image_size: SizeLike) -> None:
        super().__init__()
        self.config = model.config
        self.compound_coef = model.compound_coef
        self.num_classes = model.num_classes
        self.image_size = as_hw(image_size)
        self.channels_last = False  # set by fuse_model: inputs are then made channels_last
        self.backbone_net = _FusedEfficientNet(model.backbone_net)
        self.bifpn = nn.ModuleList([_FusedBiFPN(c) for c in model.bifpn])
        self.regressor = _FusedHead(model.regressor)
        self.classifier = _FusedHead(model.classifier)
        src: Anchors = model.anchors
        self.anchor_gen = Anchors(src.anchor_scale, src.pyramid_levels, scales=src.scales, ratios=src.ratios)
        dt = next(model.parameters()).dtype
        self.register_buffer('anchors', self.anchor_gen.for_size(*self.image_size, dtype=dt).clone(),
                             persistent=False)

    def set_fast(self, enabled: bool = True) -> 'FusedEfficientDet':
        """Switch the CPU fast path of every conv (see :class:`FusedConv`); returns self."""
        for m in self.modules():
            if isinstance(m, FusedConv):
                m.set_fast(enabled)
        return self

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.backbone_net(x)
        for cell in self.bifpn:
            feats = cell(feats)
        return feats

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        div = self.config.size_divisor
        if not torch.jit.is_tracing() and (h % div or w % div):
            raise ValueError(f'input {h}x{w}: the fused model needs H and W multiples of {div}')
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # cheap: 3 channels
        features = self.extract_features(x)
        regression = self.regressor(features)
        logits = self.classifier(features)
        classification = logits if return_logits else logits.sigmoid_()  # logits: fresh from cat
        if (h, w) == self.image_size and self.anchors.device == x.device:
            anchors = self.anchors.to(x.dtype)
        else:
            anchors = self.anchor_gen.for_size(h, w, x.device, x.dtype)
        return features, regression, classification, anchors


@torch.no_grad()
def fuse_model(model: nn.Module, channels_last: bool = True, image_size: Optional[SizeLike] = None,
               fast: Optional[bool] = None) -> FusedEfficientDet:
    """Fold ``model`` (an :class:`~efficientdet.model.EfficientDetBackbone`) for inference.

    Returns a NEW eval-mode :class:`FusedEfficientDet` on the model's device and dtype, with
    ``requires_grad`` off; ``model`` itself is not modified. ``image_size`` (int or (H, W), default
    the variant's input size) is the size whose anchors are precomputed; other multiples of
    2**max_level still work (anchors are then generated and cached on first use).
    ``channels_last=True`` stores the conv weights channels-last (feed channels-last inputs too
    for the full effect; outputs are the same either way). ``fast`` switches the CPU fast path
    (oneDNN fused conv+swish / conv+add; see :class:`FusedConv`); None: on when the model is a
    float32 CPU model and this torch build's oneDNN ops pass a self-check. Tracing and export
    always use the plain ops.
    """
    if not hasattr(model, 'backbone_net') or not hasattr(model, 'regressor'):
        raise TypeError(f'fuse_model expects an EfficientDetBackbone, got {type(model).__name__}')
    size = as_hw(image_size if image_size is not None else model.input_size)
    try:
        check_image_size(size[0], size[1], model.compound_coef)
    except ValueError as e:
        raise UserError(f'image_size: {e}') from None
    p = next(model.parameters())
    fused = FusedEfficientDet(model, size).to(device=p.device, dtype=p.dtype).eval()  # model: read only
    for q in fused.parameters():
        q.requires_grad_(False)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        fused.channels_last = True
    if fast is None:
        fast = p.device.type == 'cpu' and p.dtype == torch.float32
    fused.set_fast(bool(fast))
    return fused
