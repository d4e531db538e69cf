"""BN folding (efficientdet.fuse), ONNX / TorchScript export and their runtimes (efficientdet.backends)."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from efficientdet.errors import UserError
from efficientdet.fuse import FusedEfficientDet, fold_bn, fuse_model, onednn_available
from efficientdet.model import EfficientDetBackbone

ATOL = 1e-4


def randomize_(model: EfficientDetBackbone, seed: int = 0) -> EfficientDetBackbone:
    """Non-trivial BN running stats and affine parameters, fusion weights, head biases: folding
    errors (wrong eps, per-level BN mix-ups, transposed scales) then show up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.3)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
        for name, p in model.named_parameters():
            if name.split('.')[-1] in ('p3_w1', 'p4_w1', 'p5_w1', 'p6_w1', 'p7_w1', 'p4_w2', 'p5_w2', 'p6_w2',
                                       'p7_w2', 'p8_w1', 'p8_w2'):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 0.3)  # some negative: relu matters
            elif name.endswith('bias') and 'header' in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _make(coef: int = 0, num_classes: int = 20, seed: int = 0) -> EfficientDetBackbone:
    torch.manual_seed(seed)
    return randomize_(EfficientDetBackbone(num_classes=num_classes, compound_coef=coef), seed)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    d = float((a.float() - b.float()).abs().max())
    assert d <= atol, f'{what}: max |diff| {d:.3g} > {atol}'


@pytest.fixture(scope='module')
def d0():
    return _make(0)


# --------------------------------------------------------------------------- fuse
def test_fold_bn_matches_conv_then_bn():
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=True)
    bn = torch.nn.BatchNorm2d(5, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    w, b = fold_bn(conv, bn)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        _close(torch.nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), 'folded conv', 1e-5)


@pytest.mark.parametrize('coef,size,channels_last,fast', [(0, (128, 256), False, False), (0, (256, 256), True, True),
                                                          (1, 128, True, True)])
def test_fuse_same_outputs(coef, size, channels_last, fast, d0):
    model = d0 if coef == 0 else _make(coef, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_model(model, channels_last=channels_last, image_size=size, fast=fast)
    assert isinstance(fused, FusedEfficientDet) and not fused.training
    assert any(getattr(m, 'fast', False) for m in fused.modules()) == (fast and onednn_available())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert all(not p.requires_grad for p in fused.parameters())
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(3))
    xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.inference_mode():
        ref = model(x, return_logits=True)
        out = fused(xf, return_logits=True)
    assert len(out[0]) == len(ref[0])
    for i, (a, b) in enumerate(zip(out[0], ref[0])):
        assert a.shape == b.shape
        _close(a, b, f'feature P{3 + i}')
    for name, a, b in zip(('regression', 'logits', 'anchors'), out[1:], ref[1:]):
        assert a.shape == b.shape
        _close(a, b, name)
    assert float(ref[2].std()) > 0.1 and float(ref[1].std()) > 0.01  # really varied outputs
    for k, v in model.state_dict().items():  # the source model is left untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_fuse_d7x_sum_fusion_p8():
    """D7x: sum fusion, six levels (P3-P8), B7 backbone."""
    model = _make(8, num_classes=5)
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        ref, out = model(x, return_logits=True), fuse_model(model, image_size=256)(x, return_logits=True)
    assert len(out[0]) == 6
    for name, a, b in zip(('regression', 'logits', 'anchors'), out[1:], ref[1:]):
        _close(a, b, name)


@pytest.mark.parametrize('hw', [(128, 384), (200, 136), (160, 160)])
def test_fuse_other_sizes(d0, hw):
    """The fused model is the eager model's own graph: any size the eager model takes (odd
    level sizes too: 160 -> P7 of 2x2, 200x136 -> P7 of 2x2 after 7x5, 4x3 ...) gives its outputs."""
    fused = fuse_model(d0, channels_last=False, image_size=256)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = fused(x), d0(x)
    for name, u, v in zip(('regression', 'classification', 'anchors'), a[1:], b[1:]):
        assert u.shape == v.shape
        _close(u, v, f'{name} at {hw}')


@pytest.mark.parametrize('fast', [False, True])
def test_fuse_lite_relu6_odd_size(fast):
    """EfficientDet-Lite0 (ReLU6, no SE) at 320 px (P7 3x3 up-sampled to P6 5x5): the swapped-layer
    model matches the eager one, ReLU6 folded into the convs (oneDNN hardtanh on the fast path)."""
    from efficientdet.fuse import FusedConv
    torch.manual_seed(0)
    model = randomize_(EfficientDetBackbone(num_classes=4, compound_coef='lite0'))
    fused = fuse_model(model, image_size=320, fast=fast)
    convs = [m for m in fused.modules() if isinstance(m, FusedConv)]
    assert sum(m.act == 'relu6' for m in convs) > 40 and not any(m.act == 'swish' for m in convs)
    assert any(m.fast for m in convs) == (fast and onednn_available('relu6'))
    x = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref, out = model(x), fused(x)
    for name, a, b in zip(('regression', 'classification', 'anchors'), out[1:], ref[1:]):
        assert a.shape == b.shape
        _close(a, b, name)


def test_fuse_bad_size(d0):
    with pytest.raises(UserError, match='image_size'):
        fuse_model(d0, image_size=(64, 2048))  # P6 would be 1x32: the official model cannot run it


def test_same_max_pool_needs_no_padded_copy_where_it_can():
    """The TF "SAME" max-pool (-inf padding; eager and fused alike) equals an explicit -inf pad +
    pool at every small size; trailing-only padding (ceil_mode) and padding equal on both sides
    (odd sizes: the pool's implicit -inf padding, what the LiteRT converter turns into one SAME
    MAX_POOL_2D) make no padded copy."""
    import torch.nn.functional as F
    from efficientdet.fuse import FusedMaxPool
    from efficientdet.layers import MaxPool2dStaticSamePadding, same_pad_amounts
    src = MaxPool2dStaticSamePadding(3, 2)
    for pool in (src, FusedMaxPool(src)):
        for h in range(1, 12):
            for w in (1, 2, 5, 8):
                x = torch.randn(1, 2, h, w) - 5  # all negative: a zero padding would win the max
                ph, pw = same_pad_amounts(h, 3, 2), same_pad_amounts(w, 3, 2)
                ref = F.max_pool2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=float('-inf')), 3, 2)
                assert torch.equal(pool(x), ref), (h, w)
    calls = []
    real = torch.nn.functional.pad
    try:
        torch.nn.functional.pad = lambda *a, **k: calls.append(a) or real(*a, **k)
        for size in (5, 8):  # symmetric (1, 1) and trailing-only (0, 1)
            src(torch.randn(1, 2, size, size))
    finally:
        torch.nn.functional.pad = real
    assert not calls


def test_fuse_swaps_layers_only(d0):
    """Only leaf layers change: no BatchNorm left, every conv is a FusedConv, the activations and
    residual adds moved into them, the BiFPN weights are constants, and the pools, up-sampling and
    anchors are the eager code."""
    from efficientdet.fuse import FusedConv
    from efficientdet.layers import Conv2dStaticSamePadding, MaxPool2dStaticSamePadding
    fused = fuse_model(d0, image_size=128, fast=False)
    mods = list(fused.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in mods)
    convs = [m for m in mods if isinstance(m, FusedConv)]
    assert not any(isinstance(m, Conv2dStaticSamePadding) and not isinstance(m, FusedConv) for m in mods)
    assert sum(m.act == 'swish' for m in convs) > 60
    assert any(isinstance(m, MaxPool2dStaticSamePadding) for m in mods)
    code = fused.net.code
    assert ('upsample' in code or 'interpolate' in code) and 'p3_w1' not in code  # weights: constants
    n_res = sum(isinstance(n.args, tuple) and len(n.args) == 2 and n.op == 'call_module' and
                isinstance(fused.net.get_submodule(n.target), FusedConv) for n in fused.net.graph.nodes)
    assert n_res == sum(getattr(b, 'id_skip', False) for b in d0.backbone_net.model._blocks)


@pytest.mark.parametrize('size', [(9, 9), (10, 12), (11, 8)])
@pytest.mark.parametrize('kernel', [3, 5])
def test_prepadded_pair_equals_the_two_convs(size, kernel):
    """The fast path pads a 1x1 conv's narrow input instead of its wide output and zeroes the
    border values: the strided conv then reads exactly the zero-padded map, whatever the padding
    (3x3 stride 2: (0, 1) on even sides, 5x5: (1, 2), odd sides: symmetric)."""
    from efficientdet.fuse import FusedConv, PrePaddedPair
    from efficientdet.layers import Conv2dStaticSamePadding
    if not onednn_available('swish'):
        pytest.skip('the oneDNN fast path is not available in this torch build')
    torch.manual_seed(0)
    expand = Conv2dStaticSamePadding(4, 12, 1)
    dw = Conv2dStaticSamePadding(12, 12, kernel, stride=2, groups=12)
    with torch.no_grad():
        expand.conv.bias.uniform_(1.0, 2.0)  # a border left unzeroed would show: swish(bias) > 0
    pair = PrePaddedPair(FusedConv(expand, act='swish'), FusedConv(dw, act='swish')).eval()
    pair = pair.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, *size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = pair.second(pair.first(x))  # fast path off: the plain convs
        pair.first.set_fast(True)
        pair.second.set_fast(True)
        out = pair(x)
        again = pair(x)  # the reused padding buffer keeps its zero border
    assert pair.first._bufs._bufs, 'the fast path padded the 1x1 conv input'
    ref_eager = torch.nn.functional.silu(dw(torch.nn.functional.silu(expand(x))))
    _close(out, ref_eager, 'pre-padded pair', 1e-5)
    _close(ref, ref_eager, 'plain pair', 1e-5)
    assert torch.equal(out, again)


def test_fused_class_levels_concatenate_to_the_logits(d0):
    """``class_levels=True`` hands on the per-level logits the head concatenates; the best class
    taken level by level equals the one of the concatenation."""
    from efficientdet.fuse import PrePaddedPair
    from efficientdet.postprocess import BestClass
    fused = fuse_model(d0, image_size=256)
    assert sum(isinstance(m, PrePaddedPair) for m in fused.modules()) == 4  # D0's four stride-2 blocks
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = fused(x, return_logits=True)[2]
        levels = fused(x, return_logits=True, class_levels=True)[2]
    assert [v.shape[1] for v in levels] == [32 * 32 * 9, 16 * 16 * 9, 8 * 8 * 9, 4 * 4 * 9, 2 * 2 * 9]
    assert torch.equal(torch.cat(levels, 1), logits)
    whole, split = BestClass.from_logits(logits), BestClass.from_level_logits(levels)
    assert torch.equal(whole.scores, split.scores) and torch.equal(whole.labels, split.labels)
    idx = torch.tensor([[0, 9215, 9216, 11519, 11520, 12095, 12096, 12239, 12240, 12275]] * 2)  # level edges
    assert torch.equal(BestClass.from_level_logits(levels).labels_at(idx), whole.labels.gather(1, idx))


def test_fast_fused_model_copies_and_moves(d0):
    import copy
    fused = fuse_model(d0, image_size=128, fast=True)
    x = torch.randn(1, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a = fused(x)  # fills the oneDNN weight caches
        b = copy.deepcopy(fused)(x)  # the caches are not copied, they are rebuilt
        c = copy.deepcopy(fused).double()(x.double())  # other dtype: the plain path
    for name, u, v, w in zip(('regression', 'classification'), a[1:3], b[1:3], c[1:3]):
        _close(u, v, name)
        _close(u, w, name)


def test_fuse_zylo117_compat():
    torch.manual_seed(0)
    m = randomize_(EfficientDetBackbone(num_classes=5, compound_coef=0, compat='zylo117'))
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        a, b = fuse_model(m, image_size=128)(x.contiguous(memory_format=torch.channels_last)), m(x)
    for name, u, v in zip(('regression', 'classification', 'anchors'), a[1:], b[1:]):
        _close(u, v, name)


# --------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize('head', ['best', 'full'])
def test_onnx_export_matches_torch(d0, tmp_path, head):
    from efficientdet.backends import OnnxRuntimeModel
    from efficientdet.export import export_onnx
    from efficientdet.postprocess import BestClass
    path = str(tmp_path / 'd0.onnx')
    diffs = export_onnx(d0, path, 256, head=head)  # checker + onnxruntime vs eager, batch 2
    names = {'regression', 'anchors'} | ({'scores', 'labels'} if head == 'best' else {'classification'})
    assert set(diffs) == names and max(diffs.values()) <= ATOL
    rt = OnnxRuntimeModel(path, threads=2)
    assert rt.image_size == (256, 256) and rt.num_classes == 20 and rt.compound_coef == 0 and not rt.with_nms
    assert rt.meta['head'] == head and len(rt.meta['mean']) == 3
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))  # another batch size
    feats, reg, cls, anc = rt(x)
    with torch.inference_mode():
        _, r, c, a = d0(x)
    assert feats is None
    _close(reg, r, 'regression')
    _close(anc, a, 'anchors')
    if head == 'full':
        _close(cls, c, 'classification')
    else:
        assert isinstance(cls, BestClass)
        ref = BestClass.of(c)
        _close(cls.scores, ref.scores, 'best scores')
        assert (cls.labels == ref.labels).float().mean() > 0.999  # only exact near-ties may differ
    with pytest.raises(UserError, match='exported for 256x256'):
        rt(torch.randn(1, 3, 128, 128))
    # the runtime-friendly graph: stride-2 "SAME" paddings are the convs' own (asymmetric) pads,
    # no Pad node, the SE squeeze is a GlobalAveragePool, the pools have explicit pads
    import onnx
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert 'Pad' not in ops and ops.count('GlobalAveragePool') == 16
    pads = [list(a.ints) for n in graph.node if n.op_type == 'Conv' for a in n.attribute if a.name == 'pads']
    assert pads.count([0, 0, 1, 1]) == 3 and pads.count([1, 1, 2, 2]) == 2  # stem, 3x3 and 5x5 stride-2 dw
    assert all(a.name != 'ceil_mode' or a.i == 0 for n in graph.node if n.op_type == 'MaxPool' for a in n.attribute)
    assert ('TopK' in ops) == (head == 'best')


def test_onnx_static_batch_export_is_verified(d0, tmp_path):
    """--static-batch fixes the batch to 1: the verification must feed a batch of 1 (it used to
    feed 2 and crash inside onnxruntime), and a failed write leaves no temp file behind."""
    import onnx
    from efficientdet.export import export_onnx
    path = tmp_path / 'd0_static.onnx'
    diffs = export_onnx(d0, str(path), 128, dynamic_batch=False)
    assert max(diffs.values()) <= ATOL
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d0_static.onnx']


def _confident_model() -> EfficientDetBackbone:
    """A model whose class scores are high and varied, so NMS has real work to do."""
    m = _make(0, num_classes=6, seed=2)
    with torch.no_grad():
        b = m.classifier.header.pointwise_conv.conv.bias
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(5)) * 2.0)
    return m


class _FixedHeads(torch.nn.Module):
    """Stands in for the network: returns stored head outputs (batch of any size: first rows)."""

    def __init__(self, reg, cls, anchors):
        super().__init__()
        self.register_buffer('reg', reg)
        self.register_buffer('cls', cls)
        self.register_buffer('anc', anchors)

    def forward(self, x, return_logits=False):
        b = x.shape[0]
        cls = torch.logit(self.cls[:b]) if return_logits else self.cls[:b]  # stored as probabilities
        return None, self.reg[:b] + 0 * x.sum(), cls, self.anc


def test_onnx_nms_graph_equals_detect(tmp_path):
    """The exported post-processing (NonMaxSuppression op) on exactly the same head outputs as
    ``postprocess.detect``: identical detections, in the same order."""
    import onnxruntime as ort
    from efficientdet.anchors import Anchors
    from efficientdet.export import NMSExportWrapper
    from efficientdet.postprocess import detect
    g = torch.Generator().manual_seed(0)
    anchors = Anchors(4.0, [3, 4, 5, 6, 7]).for_size(128, 128)
    a = anchors.shape[1]
    cls = torch.sigmoid(torch.randn(2, a, 7, generator=g) * 2.0)  # spread, rarely saturated scores
    reg = torch.randn(2, a, 4, generator=g) * 0.3
    wrapper = NMSExportWrapper(_FixedHeads(reg, cls, anchors), 128, 7, score_threshold=0.6, iou_threshold=0.5,
                               max_det=60, pre_nms_topk=1000).eval()
    path = str(tmp_path / 'nms.onnx')
    x = torch.zeros(2, 3, 128, 128)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer notes on shape-derived constants
        torch.onnx.export(wrapper, (x,), path, input_names=['images'], opset_version=17, dynamo=False,
                          output_names=['boxes', 'scores', 'labels', 'num_detections'])
    assert 'NonMaxSuppression' in {n.op_type for n in __import__('onnx').load(path).graph.node}
    boxes, scores, labels, num = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(
        None, {'images': x.numpy()})
    ref = detect(cls, reg, anchors, (128, 128), score_threshold=0.6, iou_threshold=0.5, max_det=60, nms='hard',
                 pre_nms_topk=1000)
    assert int((cls.max(-1).values > 0.6).sum()) > 1000  # top-k, NMS and max_det all cut something
    for i, d in enumerate(ref):
        n = int(num[i])
        assert n == len(d['scores']) == 60
        np.testing.assert_allclose(boxes[i, :n], d['boxes'].numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(scores[i, :n], d['scores'].numpy(), atol=1e-6)
        np.testing.assert_array_equal(labels[i, :n], d['labels'].numpy())


def test_onnx_with_nms_same_detections_as_eager(tmp_path):
    from efficientdet.backends import OnnxRuntimeModel
    from efficientdet.export import compare_detections, export_onnx
    from efficientdet.postprocess import detect
    model = _confident_model()
    path = str(tmp_path / 'd0_nms.onnx')
    export_onnx(model, path, 128, with_nms=True, score_threshold=0.5, iou_threshold=0.5, max_det=50)
    rt = OnnxRuntimeModel(path)
    assert rt.with_nms
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(11))
    out = rt.run(x)
    assert out['boxes'].shape == (2, 50, 4) and out['labels'].dtype == np.int64
    with torch.inference_mode():
        _, reg, cls, anc = model(x)
    ref = detect(cls, reg, anc, (128, 128), score_threshold=0.5, iou_threshold=0.5, max_det=50, nms='hard')
    n = torch.tensor([len(d['scores']) for d in ref])
    boxes, scores, labels = torch.zeros(2, 50, 4), torch.zeros(2, 50), torch.full((2, 50), -1)
    for i, d in enumerate(ref):  # detect's per-image lists -> the export's padded layout
        boxes[i, :n[i]], scores[i, :n[i]], labels[i, :n[i]] = d['boxes'], d['scores'], d['labels']
    stats = compare_detections(path, [out[k] for k in ('boxes', 'scores', 'labels', 'num_detections')],
                                [boxes, scores, labels, n], 1e-4)
    assert stats['matched'] >= 0.9 and n.min() >= 10  # whole network + NMS: near-ties may flip a box or two
    for i in range(2):
        k = int(out['num_detections'][i])
        assert (out['labels'][i, k:] == -1).all() and (out['scores'][i, k:] == 0).all()
    with pytest.raises(UserError, match='with-nms'):
        rt(x)


# --------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize('head', ['best', 'full'])
def test_torchscript_export_matches_torch(d0, tmp_path, head):
    from efficientdet.backends import TorchScriptModel
    from efficientdet.export import export_torchscript
    from efficientdet.postprocess import BestClass
    path = str(tmp_path / 'd0.pt')
    diffs = export_torchscript(d0, path, 128, head=head)
    assert max(diffs.values()) <= ATOL
    ts = TorchScriptModel(path)
    assert ts.image_size == (128, 128) and ts.channels_last and ts.num_classes == 20
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = d0(x)
    got = ts(x)
    _close(got[1], ref[1], 'regression')
    _close(got[3], ref[3], 'anchors')
    if head == 'full':
        _close(got[2], ref[2], 'classification')
    else:
        _close(got[2].scores, BestClass.of(ref[2]).scores, 'best scores')


# --------------------------------------------------------------------------- OpenVINO
def test_openvino_export_matches_torch(d0, tmp_path):
    """IR written, verified in OpenVINO, read back with its metadata; a tiny input (128: P6 2x2 ->
    P7 1x1) exercises the max-pool that OpenVINO takes only with explicit pads."""
    pytest.importorskip('openvino')
    from efficientdet.backends import OpenVINOModel, load_backend
    from efficientdet.export import export_openvino
    from efficientdet.postprocess import BestClass
    path = str(tmp_path / 'd0.xml')
    diffs = export_openvino(d0, path, 128, obj_list=[f'c{i}' for i in range(20)])
    assert max(diffs.values()) <= ATOL and os.path.isfile(str(tmp_path / 'd0.bin'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d0.bin', 'd0.xml']
    rt = load_backend('openvino', path, threads=1)
    assert isinstance(rt, OpenVINOModel) and rt.image_size == (128, 128) and rt.num_classes == 20
    assert rt.meta['obj_list'][3] == 'c3'
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(9))  # a third batch size
    _, reg, best, anc = rt(x)
    with torch.inference_mode():
        _, r, c, a = d0(x)
    _close(reg, r, 'regression')
    _close(anc, a, 'anchors')
    _close(best.scores, BestClass.of(c).scores, 'best scores')
    with pytest.raises(UserError, match='.xml'):
        export_openvino(d0, str(tmp_path / 'd0.onnx'), 128)


def test_openvino_runs_onnx_file(d0, tmp_path):
    pytest.importorskip('openvino')
    from efficientdet.backends import load_backend
    from efficientdet.export import export_onnx
    path = str(tmp_path / 'd0.onnx')
    export_onnx(d0, path, 128, head='full', verify=False)
    rt = load_backend('openvino', path)
    assert rt.num_classes == 20 and rt.meta['head'] == 'full'  # metadata read from the ONNX file
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = d0(x)
    for name, a, b in zip(('regression', 'classification', 'anchors'), rt(x)[1:], ref[1:]):
        _close(a, b, name)


def test_openvino_missing_says_how_to_install(d0, tmp_path, monkeypatch):
    import sys
    from efficientdet.backends import load_backend
    from efficientdet.export import export_openvino
    monkeypatch.setitem(sys.modules, 'openvino', None)  # as if not installed: import fails
    with pytest.raises(UserError, match='pip install openvino'):
        export_openvino(d0, str(tmp_path / 'd0.xml'), 128)
    with pytest.raises(UserError, match='pip install openvino'):
        load_backend('openvino', str(tmp_path / 'd0.xml'))
    assert not os.listdir(tmp_path)


def test_targets_registry():
    """One module per target behind one interface; unknown names fail in one line."""
    from efficientdet.runtimes import BACKENDS, EXPORT_FORMATS, get_target, load_runtime, target_for_format
    # the built-ins (a test of plugins may have registered one more in this process)
    assert {'torch', 'onnxruntime', 'openvino', 'torchscript', 'litert'} <= set(BACKENDS)
    assert {'onnx', 'openvino', 'torchscript', 'tflite'} <= set(EXPORT_FORMATS)
    for fmt in EXPORT_FORMATS:
        t = target_for_format(fmt)
        assert t.export_format == fmt and t.name in BACKENDS and t.suffix.startswith('.')
    assert get_target('torch').export_format is None
    with pytest.raises(UserError, match='--backend'):
        get_target('tensorrt')
    with pytest.raises(UserError, match='runs the .pth'):
        load_runtime('torch', 'x.pth')
    with pytest.raises(UserError, match='--providers'):
        load_runtime('openvino', 'x.xml', providers=['CPUExecutionProvider'])


# --------------------------------------------------------------------------- CLI
def test_cli_export_onnx_with_weights(d0, tmp_path, capsys):
    from efficientdet.export import main
    w = str(tmp_path / 'w.pth')
    torch.save(d0.state_dict(), w)
    out = str(tmp_path / 'cli.onnx')
    assert main(['onnx', '-c', '0', '-w', w, '--num_classes', '20', '--image_size', '128', '-o', out]) == 0
    assert 'verified' in capsys.readouterr().out
    import onnx
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta['num_classes'] == '20' and json.loads(meta['image_size']) == [128, 128]


def test_cli_user_errors(d0, tmp_path):
    from efficientdet.export import main
    with pytest.raises(UserError, match='no such'):
        main(['onnx', '-c', '0', '-w', str(tmp_path / 'missing.pth'), '-o', str(tmp_path / 'x.onnx')])
    with pytest.raises(UserError, match='image_size'):
        main(['onnx', '-c', '0', '--num_classes', '3', '--image_size', '64', '2048', '-o', str(tmp_path / 'x.onnx')])
    w = str(tmp_path / 'w.pth')
    torch.save(d0.state_dict(), w)  # 20 classes
    with pytest.raises(UserError):
        main(['onnx', '-c', '0', '-w', w, '--num_classes', '5', '-o', str(tmp_path / 'x.onnx')])
    assert not os.path.exists(tmp_path / 'x.onnx')


def test_export_metadata_takes_the_weights_normalisation():
    """A model whose weights expect another normalisation (AdvProp ports: 0.5 / 0.5, carried by
    build_model as input_mean / input_std) is exported with it when no mean/std is given."""
    from efficientdet.model import EfficientDetBackbone
    from efficientdet.runtimes.base import export_metadata, parse_meta
    model = EfficientDetBackbone(num_classes=3, compound_coef=0).eval()
    model.input_mean, model.input_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    meta = parse_meta(export_metadata(model, (128, 128), 'best'))
    assert meta['mean'] == [0.5, 0.5, 0.5] and meta['std'] == [0.5, 0.5, 0.5]
    meta = parse_meta(export_metadata(model, (128, 128), 'best', mean=(0.1, 0.2, 0.3), std=(1, 1, 1)))
    assert meta['mean'] == [0.1, 0.2, 0.3]  # given values win
