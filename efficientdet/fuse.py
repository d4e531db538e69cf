"""Inference-only EfficientDet built by swapping layers of the eager model.

``fuse_model(model)`` traces a copy of the eager model's ``forward`` with ``torch.fx`` (the
network's own code, whatever its modules: D0-D7x, Lite variants, any input size) and rewrites
only leaf layers in that graph; the model passed in is left untouched and stays trainable:

- each convolution followed by a ``BatchNorm2d`` becomes ONE convolution (BN folded in float64);
  a conv shared across levels with per-level BNs (the heads) gets one folded copy per call site;
- an activation right after a conv (swish, ReLU, ReLU6) and a residual add right after a conv
  are folded into that conv's module (:class:`FusedConv`);
- values computed from parameters alone (BiFPN fast-fusion weights ``relu(w) / (sum + eps)``)
  are computed once and stored as constants;
- element-wise adds / multiplies / activations write into an operand that is a fresh tensor no
  later node reads (fusion sums, SE gating);
- a 1x1 conv feeding only a strided "SAME" conv (MBConv expand -> stride-2 depthwise) becomes
  one :class:`PrePaddedPair` (fast path: the padding goes on the narrow input, not the wide map);
- the class head's concatenation is left out of the graph: ``FusedEfficientDet`` concatenates
  the per-level logits, or hands them on (``class_levels=True``) so that the best class is taken
  level by level without a copy of all A x C logits;
- every other node (up-sampling, pooling, fusion sums, SE gating, anchors) is the eager code.

:class:`FusedConv` keeps TF "SAME" padding exact for any input size, runs a 1x1 conv on a 1x1
map (squeeze-excitation) as a matmul, and has a CPU fast path (``efficientdet.onednn``: one
oneDNN call per conv with its activation or residual add fused in). Under ``torch.onnx.export``
an asymmetric padding becomes the Conv's own ``pads`` (``efficientdet.onnx_ops``).

``FusedEfficientDet.forward(x)`` returns ``(features, regression, classification, anchors)``
exactly like :class:`~efficientdet.model.EfficientDetBackbone` (within float rounding, ~1e-5):
NCHW (or channels_last) features, regression [B, A, 4] (ty, tx, th, tw), classification
[B, A, C] after sigmoid, anchors [1, A, 4] (y1, x1, y2, x2) input pixels.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import onednn
from .anchors import Anchors
from .config import as_hw, check_image_size
from .errors import UserError
from .layers import Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, Swish, same_pad_amounts
from .onnx_ops import exporting, padded_conv, padded_max_pool

__all__ = ['fuse_model', 'fold_bn', 'FusedEfficientDet', 'FusedConv', 'FusedMaxPool', 'PrePaddedPair',
           'onednn_available']

SizeLike = Union[int, Tuple[int, int], Sequence[int]]
onednn_available = onednn.onednn_available


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


# --------------------------------------------------------------------------- the swapped-in conv
class FusedConv(Conv2dStaticSamePadding):
    """``act(conv(x) [BN folded in]) [+ residual]`` with the source conv's padding rule.

    ``src``: a :class:`~efficientdet.layers.Conv2dStaticSamePadding` (TF "SAME", exact for any
    input size) or a plain ``nn.Conv2d`` (its own padding). ``act``: None, 'swish', 'relu' or
    'relu6'. ``forward(x, residual=None)``: NCHW in, NCHW out.

    CPU fast path (``set_fast(True)``; eager float32 CPU inference only, see
    ``efficientdet.onednn.usable``): one oneDNN call with the activation or the residual add fused
    in, the weight reordered once, asymmetric padding written into a reused buffer.
    """

    def __init__(self, src: nn.Module, bn: Optional[nn.BatchNorm2d] = None, act: Optional[str] = None):
        nn.Module.__init__(self)
        if isinstance(src, Conv2dStaticSamePadding):
            c = src.conv
            self.same = True
            self.kernel_size, self.stride, self.dilation = src.kernel_size, src.stride, src.dilation
            self._static, self._pad = src._static, src._pad
        elif isinstance(src, nn.Conv2d) and isinstance(src.padding, tuple):
            c = src
            self.same = False
            self.kernel_size, self.stride, self.dilation = c.kernel_size, c.stride, c.dilation
            self._pad = None
        else:
            raise TypeError(f'FusedConv takes a Conv2dStaticSamePadding or an nn.Conv2d, got {type(src).__name__}')
        if act is not None and act not in onednn.ACTIVATIONS:
            raise ValueError(f'act must be one of {sorted(onednn.ACTIVATIONS)}, got {act!r}')
        weight, bias = fold_bn(c, bn)
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, padding=c.padding,
                              dilation=c.dilation, groups=c.groups, bias=bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if bias is not None:
                self.conv.bias.copy_(bias)
        self.act = act
        self.fast = False
        self._reset_cache()

    def extra_repr(self) -> str:
        return f'act={self.act}, fast={self.fast}'

    # -- fast-path state: derived from the weights, never saved, copied or moved
    def _reset_cache(self) -> None:
        self._call: Optional[onednn.ConvCall] = None
        self._bufs = onednn.PadBuffers()
        self._plans: Dict[Tuple[int, int], Tuple[Optional[Tuple[int, int, int, int]], bool]] = {}

    def __getstate__(self):  # deepcopy / pickle: opaque oneDNN tensors cannot be copied
        state = dict(self.__dict__)
        state['_call'], state['_bufs'], state['_plans'] = None, onednn.PadBuffers(), {}
        return state

    def _apply(self, fn, recurse=True):  # .to() / .float() / channels_last: drop caches of the old weights
        self._reset_cache()
        return super()._apply(fn, recurse)

    def set_fast(self, enabled: bool) -> None:
        self.fast = bool(enabled) and onednn.onednn_available(self.act) and onednn.onednn_available(None)
        self._reset_cache()

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return y
        return onednn.ACTIVATIONS[self.act][2](y, inplace=True)  # y: this conv's fresh output

    def plan(self, h: int, w: int) -> Tuple[Optional[Tuple[int, int, int, int]], bool]:
        """For an H x W input: the explicit (left, right, top, bottom) padding still to apply (None:
        none) and whether the conv runs as a matmul (a 1x1 conv on a 1x1 map: the SE convs, ~10 us
        instead of ~60-150 us of conv-call overhead). Cached per size."""
        key = (h, w)
        plan = self._plans.get(key)
        if plan is None:
            c = self.conv
            pad = self._pad_for(h, w) if self.same else None
            if pad is not None and not any(pad):
                pad = None
            matmul = (h * w == 1 and pad is None and c.kernel_size == (1, 1) and c.stride == (1, 1)
                      and c.groups == 1 and c.padding == (0, 0))
            plan = (pad, matmul)
            self._plans[key] = plan
        return plan

    def run_onednn(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fast path on an already padded input: one oneDNN call with the activation or the
        residual add fused in (callers check ``self.fast`` and :func:`onednn.usable`)."""
        call = self._call
        if call is None:
            call = self._call = onednn.ConvCall(self.conv, x.shape, self.act)
        return call(x, residual)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.conv
        n, ci, h, w = x.shape
        pad, matmul = self.plan(int(h), int(w))
        if exporting():  # an asymmetric padding becomes the ONNX Conv's own pads
            y = padded_conv(x, c.weight, c.bias, c.stride, pad, c.groups) if pad is not None else c(x)
        elif matmul and not torch.jit.is_tracing():
            y = F.linear(x.reshape(n, ci), c.weight.reshape(c.out_channels, ci), c.bias)[:, :, None, None]
        elif self.fast and onednn.usable(x, c.weight):
            return self.run_onednn(self._bufs.padded(x, pad) if pad is not None else x, residual)
        else:
            y = c(F.pad(x, pad) if pad is not None else x)
        y = self._activate(y)
        return y if residual is None else y + residual


class PrePaddedPair(nn.Module):
    """A 1x1 conv (:class:`FusedConv`, stride 1) feeding only a conv with asymmetric "SAME"
    padding (the expand conv and the stride-2 depthwise conv of an MBConv block): in the CPU fast
    path the padding is applied to the 1x1 conv's narrow input instead of its wide output (16
    channels instead of 96 in D0's second stage), and the 1x1 conv's values on the border (its
    bias through the activation) are zeroed, so the second conv reads exactly the zero-padded map.
    Everywhere else (export, tracing, autocast, other devices): ``second(first(x))``."""

    def __init__(self, first: FusedConv, second: FusedConv) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.first, self.second
        if first.fast and second.fast and onednn.usable(x, first.conv.weight):  # never while exporting
            h, w = x.shape[-2], x.shape[-1]
            pad, _ = second.plan(h, w)
            if pad is not None:
                left, right, top, bottom = pad
                y = first.run_onednn(first._bufs.padded(x, pad))
                for border in (y[:, :, :top], y[:, :, top + h:], y[:, :, :, :left], y[:, :, :, left + w:]):
                    border.zero_()  # an empty slice where that side has no padding
                return second.run_onednn(y)
        return second(first(x))


class FusedMaxPool(MaxPool2dStaticSamePadding):
    """The eager "SAME" max-pool; under ONNX export with TF's -inf padding, one ``MaxPool`` node
    with explicit ``pads`` (``efficientdet.onnx_ops.padded_max_pool``), which every runtime takes."""

    def __init__(self, src: MaxPool2dStaticSamePadding):
        super().__init__(src.kernel_size, src.stride, src.pad_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_value != float('-inf'):
            return super().forward(x)
        ph = same_pad_amounts(x.shape[-2], self.kernel_size[0], self.stride[0])
        pw = same_pad_amounts(x.shape[-1], self.kernel_size[1], self.stride[1])
        if exporting():
            return padded_max_pool(x, self.kernel_size, self.stride, (pw[0], pw[1], ph[0], ph[1]))
        return super().forward(x)


# --------------------------------------------------------------------------- graph rewriting
_ACT_FUNCTIONS = {F.silu: 'swish', F.relu: 'relu', torch.relu: 'relu', F.relu6: 'relu6'}
_ACT_MODULES = ((nn.SiLU, 'swish'), (Swish, 'swish'), (nn.ReLU6, 'relu6'), (nn.ReLU, 'relu'))
_ADD = (operator.add, torch.add)


def _has_foldable(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in module.modules())


def _shape_helpers() -> Tuple[Any, ...]:
    """Free functions of the model code with shape-dependent Python logic: kept as opaque calls."""
    from . import bifpn
    return tuple(f for f in (getattr(bifpn, 'upsample_to', None),) if callable(f))


class _Tracer(fx.Tracer):
    """Traces through the modules that hold convs or BNs (so that they can be swapped); every
    other module, the padded conv / pool / anchor layers and the shape helpers stay opaque calls
    of the eager code."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_shape_helpers())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if getattr(m, 'fuse_opaque', False):  # e.g. a timm backbone (efficientdet.backbones): called as it is
            return True
        if isinstance(m, (Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, Anchors, nn.Conv2d, nn.BatchNorm2d)):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return not _has_foldable(m) or super().is_leaf_module(m, qualname)


def _act_of(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The activation a node applies to its single tensor input, or None."""
    if node.op == 'call_function':
        if node.target in _ACT_FUNCTIONS and len(node.args) == 1:
            return _ACT_FUNCTIONS[node.target]
        if node.target is F.hardtanh:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get('min_val', -1.0)
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get('max_val', 1.0)
            return 'relu6' if (lo, hi) == (0.0, 6.0) else None
    elif node.op == 'call_method' and node.target == 'relu' and len(node.args) == 1:
        return 'relu'
    elif node.op == 'call_module' and len(node.args) == 1 and not node.kwargs:
        m = modules[node.target]
        if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
            return 'relu6' if (m.min_val, m.max_val) == (0.0, 6.0) else None
        for cls, name in _ACT_MODULES:
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return name
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fold_constants(gm: fx.GraphModule) -> None:
    """Nodes computed from parameters / buffers alone are evaluated once and become buffers."""
    graph = gm.graph
    const: Dict[fx.Node, Any] = {}

    def value(a):
        return fx.node.map_arg(a, lambda n: const[n])

    for node in graph.nodes:
        if node.op == 'get_attr':
            obj: Any = gm
            for part in node.target.split('.'):
                obj = getattr(obj, part)
            const[node] = obj
        elif node.op in ('call_function', 'call_method') and node.all_input_nodes and \
                all(n in const for n in node.all_input_nodes):
            args, kwargs = value(node.args), value(node.kwargs)
            with torch.no_grad():
                if node.op == 'call_function':
                    const[node] = node.target(*args, **kwargs)
                else:
                    const[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    k = 0
    for node in list(graph.nodes):
        if node.op == 'get_attr' or node not in const or not isinstance(const[node], torch.Tensor):
            continue
        if all(u in const for u in node.users):
            continue
        name = f'_folded_{k}'
        k += 1
        gm.register_buffer(name, const[node].detach().clone(), persistent=False)
        with graph.inserting_before(node):
            new = graph.get_attr(name)
        node.replace_all_uses_with(new)
    graph.eliminate_dead_code()


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``x.mean((2, 3), keepdim=True)``; exported as ONNX ``GlobalAveragePool``."""
    return F.adaptive_avg_pool2d(x, 1) if exporting() else x.mean((2, 3), keepdim=True)


def _is_spatial_mean(node: fx.Node) -> bool:
    args = list(node.args[1:])
    dims = args[0] if args else node.kwargs.get('dim')
    keep = args[1] if len(args) > 1 else node.kwargs.get('keepdim', False)
    extra = set(node.kwargs) - {'dim', 'keepdim'}
    return not extra and keep is True and isinstance(dims, (tuple, list)) and tuple(dims) in ((2, 3), (-2, -1))


def _swap_convs(gm: fx.GraphModule) -> None:
    """conv [-> BN] [-> activation] [-> residual add] call chains -> one :class:`FusedConv` call each;
    "SAME" max-pools -> :class:`FusedMaxPool` (the same pool, exported without ``ceil_mode``)."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    k = 0
    for node in list(graph.nodes):
        if node.op == 'call_module' and type(modules[node.target]) is MaxPool2dStaticSamePadding:
            name = f'fused_pool_{k}'
            k += 1
            gm.add_submodule(name, FusedMaxPool(modules[node.target]))
            node.target = name
            continue
        if node.op != 'call_module' or not isinstance(modules[node.target], (Conv2dStaticSamePadding, nn.Conv2d)):
            continue
        src = modules[node.target]
        if isinstance(src, nn.Conv2d) and not isinstance(src.padding, tuple):
            continue  # padding='same' / 'valid' strings: leave the eager conv
        tail, bn, act = node, None, None
        user = _only_user(tail)
        if user is not None and user.op == 'call_module' and isinstance(modules[user.target], nn.BatchNorm2d) \
                and not modules[user.target].training:
            bn, tail = modules[user.target], user
            user = _only_user(tail)
        if user is not None:
            act = _act_of(user, modules)
            if act is not None:
                tail = user
        fused = FusedConv(src, bn, act)
        name = f'fused_conv_{k}'
        k += 1
        gm.add_submodule(name, fused)
        with graph.inserting_after(tail):
            new = graph.call_module(name, (node.args[0],))
        tail.replace_all_uses_with(new)
        chain = [tail]
        while chain[-1] is not node:
            chain.append(chain[-1].args[0])
        for old in chain:  # tail first: each node's only user is gone before it is erased
            graph.erase_node(old)
    # SE squeeze: mean over H, W -> a global average pool (GlobalAveragePool in ONNX)
    for node in list(graph.nodes):
        if node.op == 'call_method' and node.target == 'mean' and _is_spatial_mean(node):
            node.op, node.target = 'call_function', global_avg_pool
            node.args, node.kwargs = (node.args[0],), {}
    # residual adds: add(FusedConv(x), other) -> FusedConv(x, other) when ``other`` exists before the conv
    order = {n: i for i, n in enumerate(graph.nodes)}
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        if node.op != 'call_function' or node.target not in _ADD or len(node.args) != 2 or node.kwargs:
            continue
        for i in (0, 1):
            conv, other = node.args[i], node.args[1 - i]
            if not (isinstance(conv, fx.Node) and isinstance(other, fx.Node) and conv.op == 'call_module'
                    and isinstance(modules.get(conv.target), FusedConv) and len(conv.args) == 1
                    and len(conv.users) == 1 and order[other] < order[conv]):
                continue
            conv.args = (conv.args[0], other)
            node.replace_all_uses_with(conv)
            graph.erase_node(node)
            break
    _pair_prepadded(gm)
    gm.delete_all_unused_submodules()


def _pair_prepadded(gm: fx.GraphModule) -> None:
    """A 1x1 stride-1 :class:`FusedConv` whose only user is a strided "SAME" :class:`FusedConv`
    (an MBConv expand conv and its stride-2 depthwise conv) -> one :class:`PrePaddedPair` call."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    k = 0
    for node in list(graph.nodes):
        first = modules.get(node.target) if node.op == 'call_module' else None
        if not (isinstance(first, FusedConv) and len(node.args) == 1 and not node.kwargs
                and first.conv.kernel_size == (1, 1) and first.conv.stride == (1, 1)
                and first.conv.padding == (0, 0)):
            continue
        user = _only_user(node)
        second = modules.get(user.target) if user is not None and user.op == 'call_module' else None
        if not (isinstance(second, FusedConv) and second.same and max(second.conv.stride) > 1
                and user.args == (node,) and not user.kwargs):
            continue
        name = f'prepadded_{k}'
        k += 1
        gm.add_submodule(name, PrePaddedPair(first, second))
        with graph.inserting_after(user):
            new = graph.call_module(name, (node.args[0],))
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        graph.erase_node(node)


def _in_place_ok(a: torch.Tensor, b: Any) -> bool:
    """Whether ``a op= b`` gives ``a op b``: same dtype, ``b`` broadcasts to ``a``'s shape (checked
    by hand: ``torch.broadcast_shapes`` costs ~50 us, on every fusion sum and SE gate)."""
    if a.requires_grad or not isinstance(b, torch.Tensor) or b.dtype != a.dtype or b.dim() > a.dim():
        return False
    return all(m == 1 or m == n for m, n in zip(reversed(b.shape), reversed(a.shape)))


def add_into(a: torch.Tensor, b: torch.Tensor, either: bool = False) -> torch.Tensor:
    """``a + b``, written into ``a`` (or into ``b`` with ``either``) when the shapes allow; the one
    written into is a fresh tensor nothing else reads."""
    if _in_place_ok(a, b):
        return a.add_(b)
    return b.add_(a) if either and _in_place_ok(b, a) else a + b


def mul_into(a: torch.Tensor, b: torch.Tensor, either: bool = False) -> torch.Tensor:
    """``a * b``, written into ``a`` (or into ``b`` with ``either``) when the shapes allow (SE gating:
    the [B, C, 1, 1] gate times the [B, C, H, W] map goes into the map)."""
    if _in_place_ok(a, b):
        return a.mul_(b)
    return b.mul_(a) if either and _in_place_ok(b, a) else a * b


_FRESH_FUNCTIONS = (operator.add, operator.mul, torch.add, torch.mul, F.silu, F.relu6, torch.sigmoid, F.interpolate,
                    add_into, mul_into)
_IN_PLACE = {operator.add: add_into, torch.add: add_into, operator.mul: mul_into, torch.mul: mul_into}


def _fresh(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` makes a new tensor that no other name holds (not an input, parameter or view)."""
    if node.op == 'call_module':
        return isinstance(modules[node.target], (FusedConv, MaxPool2dStaticSamePadding))
    return node.op == 'call_function' and node.target in _FRESH_FUNCTIONS


def _use_in_place(gm: fx.GraphModule) -> None:
    """Element-wise adds / multiplies and activations whose operand is a fresh tensor read by no
    later node write into it (BiFPN fusion sums, SE gating, BiFPN activations): fewer large
    allocations and passes over memory; the numbers are the same."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(graph.nodes)}

    def last_use(operand: Any, node: fx.Node) -> bool:
        return (isinstance(operand, fx.Node) and _fresh(operand, modules)
                and all(order[u] <= order[node] for u in operand.users))

    for node in list(graph.nodes):
        if node.op == 'call_function' and node.target in _IN_PLACE and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            free_a, free_b = last_use(a, node), last_use(b, node)
            if free_a or free_b:  # both ops commute: the free operand first
                node.target = _IN_PLACE[node.target]
                node.args, node.kwargs = ((a, b) if free_a else (b, a)), {'either': free_a and free_b}
        elif _act_of(node, modules) in ('swish', 'relu6') and last_use(node.args[0], node):
            fn = F.silu if _act_of(node, modules) == 'swish' else F.relu6
            node.op, node.target, node.args, node.kwargs = 'call_function', fn, (node.args[0],), {'inplace': True}


def _class_levels(gm: fx.GraphModule) -> None:
    """The graph returns the class logits as the list of per-level [B, A_l, C] tensors the head
    concatenates (``FusedEfficientDet.forward`` concatenates them, or hands them on with
    ``class_levels=True``: each anchor's best class is then taken level by level, without the copy
    of all A x C logits into one tensor)."""
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == 'output')
    result = out.args[0]
    if not (isinstance(result, (tuple, list)) and len(result) == 4):
        return
    cls = result[2]
    dim = cls.kwargs.get('dim', cls.args[1] if len(cls.args) > 1 else 0) if isinstance(cls, fx.Node) else None
    if not (isinstance(cls, fx.Node) and cls.op == 'call_function' and cls.target is torch.cat and dim == 1
            and len(cls.users) == 1 and isinstance(cls.args[0], (list, tuple))):
        return
    out.args = ((result[0], result[1], list(cls.args[0]), result[3]),)
    graph.erase_node(cls)


def _rewrite(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model, concrete_args={'return_logits': True})
    except Exception as e:  # torch.fx cannot follow data-dependent Python control flow
        raise RuntimeError(f'fuse_model: torch.fx cannot trace {type(model).__name__}.forward ({e}); keep '
                           'shape-dependent Python logic inside leaf layers') from e
    gm = fx.GraphModule(model, graph)
    _fold_constants(gm)
    _swap_convs(gm)
    _use_in_place(gm)
    _class_levels(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


class FusedEfficientDet(nn.Module):
    """Inference-only EfficientDet built by :func:`fuse_model`; see the module docstring.

    ``forward(x [B, 3, H, W] normalised, return_logits=False) -> (features, regression [B, A, 4]
    (ty, tx, th, tw), classification [B, A, C] after sigmoid (logits with return_logits=True),
    anchors [1, A, 4] yxyx pixels)``; any input size the eager model takes. ``class_levels=True``
    returns the class logits as a list of per-level [B, A_l, C] tensors (P3 first) instead.
    """

    def __init__(self, net: fx.GraphModule, source: nn.Module, image_size: Tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        for attr in ('config', 'compound_coef', 'num_classes', 'compat', 'variant'):
            if hasattr(source, attr):
                setattr(self, attr, getattr(source, attr))
        self.image_size = image_size
        self.channels_last = False  # set by fuse_model: inputs are then made channels_last

    def set_fast(self, enabled: bool = True) -> 'FusedEfficientDet':
        """Switch the CPU fast path of every conv (see :class:`FusedConv`); returns self."""
        for m in self.modules():
            if isinstance(m, FusedConv):
                m.set_fast(enabled)
        return self

    def forward(self, x: torch.Tensor, return_logits: bool = False, class_levels: bool = False):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # cheap: 3 channels
        features, regression, logits, anchors = self.net(x, True)
        if class_levels:  # the logits level by level, [B, A_l, C] each (P3 first), not concatenated
            return features, regression, list(logits) if isinstance(logits, (list, tuple)) else [logits], anchors
        if isinstance(logits, (list, tuple)):
            logits = torch.cat(logits, 1)
        classification = logits if return_logits else logits.sigmoid_()  # logits: fresh from cat
        return features, regression, classification, anchors


@torch.no_grad()
def fuse_model(model: nn.Module, channels_last: bool = True, image_size: Optional[SizeLike] = None,
               fast: Optional[bool] = None, allowed: Optional[torch.Tensor] = None) -> FusedEfficientDet:
    """Fold ``model`` (an :class:`~efficientdet.model.EfficientDetBackbone`) for inference.

    Returns a NEW eval-mode :class:`FusedEfficientDet` on the model's device and dtype, with
    ``requires_grad`` off; ``model`` itself is not modified. ``image_size`` (int or (H, W),
    default ``model.image_size`` or the variant's input size) is the size whose anchors are
    computed up front; other sizes work too. ``channels_last=True`` stores the conv weights
    channels-last (inputs are converted in ``forward``). ``fast`` switches the CPU fast path
    (``efficientdet.onednn``); None: on when the model is a float32 CPU model and this torch
    build's oneDNN ops pass a self-check. Tracing and export always use the plain ops.
    ``allowed`` (bool [C], ``postprocess.class_mask``): the classes left out of it (placeholder slots)
    get logits lowered by ``head.MASKED_LOGIT`` in the class head's bias (``Classifier.leave_out_``),
    a constant: they are never an anchor's best class, at no cost per call.
    """
    if not hasattr(model, 'backbone_net') or not hasattr(model, 'regressor'):
        raise TypeError(f'fuse_model expects an EfficientDetBackbone, got {type(model).__name__}')
    default = getattr(model, 'image_size', None) or model.input_size
    size = as_hw(image_size if image_size is not None else default)
    try:
        check_image_size(size[0], size[1], model.compound_coef)
    except ValueError as e:
        raise UserError(f'image_size: {e}') from None
    p = next(model.parameters())
    src = copy.deepcopy(model).eval()  # the rewrite swaps modules: never touch the caller's model
    if allowed is not None:
        src.classifier.leave_out_(allowed)
    fused = FusedEfficientDet(_rewrite(src), src, size).to(device=p.device, dtype=p.dtype).eval()
    for q in fused.parameters():
        q.requires_grad_(False)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        fused.channels_last = True
    if fast is None:
        fast = p.device.type == 'cpu' and p.dtype == torch.float32
    fused.set_fast(bool(fast))
    for m in fused.modules():  # anchors of ``size`` computed now, not in the first call
        if isinstance(m, Anchors):
            m.for_size(size[0], size[1], p.device, p.dtype)
    return fused

