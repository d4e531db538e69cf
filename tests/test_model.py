import json

import numpy as np
import pytest
import torch

from conftest import need_shared
from efficientdet import EfficientDetBackbone
from efficientdet.anchors import generate_anchors
from efficientdet.config import CONFIGS, OFFICIAL_RATIOS, check_image_size
from efficientdet.layers import Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, same_pad_amounts


def test_param_counts_match_official_for_all_nine_variants():
    counts = json.load(open(need_shared('fixtures', 'official_param_counts.json')))
    for c, cfg in CONFIGS.items():
        if cfg.is_lite:
            continue  # tests/test_lite.py
        model = EfficientDetBackbone(num_classes=90, compound_coef=c)
        n = sum(p.numel() for p in model.parameters())
        assert n == counts[cfg.name]['trainable'], (cfg.name, n)
        assert model.config.fusion == ('fast' if counts[cfg.name]['fpn_weight_method'] is None else 'sum')
        assert model.config.anchor_scale == counts[cfg.name]['anchor_scale']
        assert model.config.max_level == counts[cfg.name]['max_level']


def test_bn_and_fusion_details():
    m = EfficientDetBackbone(num_classes=3, compound_coef=0)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert bns and all(b.momentum == 0.01 and b.eps == 1e-3 for b in bns)
    assert hasattr(m.bifpn[0], 'p4_down_channel_2') and hasattr(m.bifpn[0], 'p5_down_channel_2')
    assert not hasattr(m.bifpn[1], 'p4_down_channel_2')
    d6 = EfficientDetBackbone(num_classes=3, compound_coef=6)
    assert not any('_w1' in k or '_w2' in k for k, _ in d6.named_parameters())
    # separable conv: depthwise without bias, pointwise with one bias
    sep = m.bifpn[0].conv6_up
    assert sep.depthwise_conv.conv.bias is None and sep.pointwise_conv.conv.bias is not None


@pytest.mark.parametrize('size,k,s,expect', [(8, 3, 2, (0, 1)), (9, 3, 2, (1, 1)), (8, 5, 2, (1, 2)),
                                             (7, 3, 1, (1, 1)), (1, 3, 2, (1, 1))])
def test_tf_same_padding_amounts(size, k, s, expect):
    assert same_pad_amounts(size, k, s) == expect


def test_same_conv_matches_explicit_tf_padding():
    torch.manual_seed(0)
    conv = Conv2dStaticSamePadding(4, 6, 5, 2)
    for h, w in ((16, 16), (15, 9)):
        x = torch.randn(1, 4, h, w)
        ph, pw = same_pad_amounts(h, 5, 2), same_pad_amounts(w, 5, 2)
        ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (pw[0], pw[1], ph[0], ph[1])),
                                         conv.conv.weight, conv.conv.bias, 2)
        assert torch.allclose(conv(x), ref, atol=1e-6)


def test_maxpool_padding_never_wins_the_max():
    x = -torch.rand(1, 1, 4, 4) - 1.0  # all negative
    official = MaxPool2dStaticSamePadding(3, 2)(x)
    zero_pad = MaxPool2dStaticSamePadding(3, 2, pad_value=0.0)(x)
    assert (official < 0).all()
    assert (zero_pad[..., -1, :] == 0).all()  # Yet-Another's zero padding wins on the border
    # odd size: padding on both sides
    y = -torch.rand(1, 1, 5, 5) - 1.0
    assert (MaxPool2dStaticSamePadding(3, 2)(y) < 0).all()


def test_official_ratios_are_sqrt2():
    assert OFFICIAL_RATIOS[1] == pytest.approx((2 ** 0.5, 2 ** -0.5))
    assert EfficientDetBackbone(3, 0).aspect_ratios[1] == pytest.approx((2 ** 0.5, 2 ** -0.5))
    assert EfficientDetBackbone(3, 0, compat='zylo117').aspect_ratios[1] == (1.4, 0.7)


def test_non_square_input_and_anchors_follow_real_size():
    m = EfficientDetBackbone(num_classes=4, compound_coef=0).eval()
    x = torch.randn(1, 3, 256, 384)
    with torch.no_grad():
        feats, reg, cls, anchors = m(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    a = sum(h * w for h, w in [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]) * 9
    assert reg.shape == (1, a, 4) and cls.shape == (1, a, 4) and anchors.shape == (1, a, 4)
    assert float(cls.min()) >= 0 and float(cls.max()) <= 1
    np.testing.assert_allclose(anchors[0].numpy(), generate_anchors((256, 384), range(3, 8)), atol=1e-4)
    centers_x = (anchors[0, :, 1] + anchors[0, :, 3]) / 2
    assert float(centers_x.max()) < 384 and float(centers_x.max()) > 256


def test_image_size_check_refuses_only_what_the_official_cannot_run():
    for h, w, v in ((256, 384, 0), (320, 480, 0), (250, 256, 0), (300, 300, 'lite0'), (384, 384, 8), (1, 1, 0)):
        check_image_size(h, w, v)
    # P6 would be 1x8 and P7 1x4: the official resampling neither pools nor up-samples that
    with pytest.raises(ValueError, match='P6 would be 1x8'):
        check_image_size(64, 512, 0)
    with pytest.raises(ValueError, match='whole number'):
        check_image_size(0, 256, 0)


@pytest.mark.parametrize('coef', [0, 1, 2])
def test_forward_256_small_variants(coef):
    m = EfficientDetBackbone(num_classes=5, compound_coef=coef).eval()
    with torch.no_grad():
        feats, reg, cls, anchors = m(torch.randn(1, 3, 256, 256))
    assert len(feats) == 5 and reg.shape[1] == cls.shape[1] == anchors.shape[1] == 12276


@pytest.mark.slow
@pytest.mark.parametrize('coef', [3, 4, 5, 6, 7, 8])
def test_forward_256_large_variants(coef):
    m = EfficientDetBackbone(num_classes=5, compound_coef=coef).eval()
    with torch.no_grad():
        feats, reg, cls, anchors = m(torch.randn(1, 3, 256, 256))
    assert len(feats) == (6 if coef == 8 else 5)
    assert reg.shape[1] == cls.shape[1] == anchors.shape[1]


def test_d7x_has_p8_level():
    m = EfficientDetBackbone(num_classes=2, compound_coef=8)
    assert m.config.levels == [3, 4, 5, 6, 7, 8]
    assert hasattr(m.bifpn[0], 'conv7_up') and hasattr(m.bifpn[0], 'conv8_down')
    assert len(m.classifier.bn_list) == 6


def test_training_step_backprop():
    m = EfficientDetBackbone(num_classes=3, compound_coef=0).train()
    feats, reg, logits, anchors = m(torch.randn(2, 3, 128, 128), return_logits=True)
    (reg.square().mean() + logits.mean()).backward()
    assert m.backbone_net.model._conv_stem.conv.weight.grad is not None
    assert m.bifpn[0].p6_w1.grad is not None


def test_training_swish_saves_only_its_input():
    from efficientdet.layers import MemoryEfficientSwish
    x = torch.randn(4, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = MemoryEfficientSwish()(x * 1.0)
    assert len(saved) == 1 and saved[0].shape == x.shape
    y.sum().backward()
    s = torch.sigmoid(x)
    assert torch.allclose(x.grad, s * (1 + x * (1 - s)), atol=1e-6)
