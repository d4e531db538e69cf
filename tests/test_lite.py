"""EfficientDet-Lite0-4 and input sizes that are not multiples of 128, against the official model.

Reference: ``../shared/fixtures/tf_lite0`` (official Keras efficientdet-lite0 at 320x320, where P6
and P7 are 5x5 and 3x3) and ``official_param_counts_lite.json``.
"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import FIXTURES, need_shared
from efficientdet import EfficientDetBackbone
from efficientdet.anchors import decode_boxes, generate_anchors
from efficientdet.bifpn import upsample_to
from efficientdet.config import (CONFIGS, IMAGENET_MEAN, IMAGENET_STD, LITE_VARIANTS, OFFICIAL_RATIOS,
                                 VARIANTS, check_image_size, feature_sizes, get_config, parse_variant,
                                 resolve_normalization, variant_tag)
from efficientdet.layers import MemoryEfficientSwish

pytestmark = pytest.mark.usefixtures('one_thread')
LITE0 = os.path.join(FIXTURES, 'tf_lite0')


def _tol(ref, rel=1e-5, atol=1e-5):
    """Feature maps and head outputs (float32). Measured max |ours - ref| on tf_lite0 at 1 and 2
    threads: BiFPN maps <= 5.3e-6, class logits 6.7e-6, box outputs 5.8e-6 (refs up to ~7)."""
    return atol + rel * np.abs(ref)


# ----------------------------------------------------------------------------- configs
def test_lite_variants_match_official_counts_and_hparams():
    """All six: trainable parameters and all variables (BN statistics included) with 90 classes,
    default image size, anchor scale, sum fusion, ReLU6, backbone and (pixel - 127) / 128."""
    official = json.load(open(need_shared('fixtures', 'official_param_counts_lite.json')))
    assert sorted(official) == sorted(get_config(k).name for k in LITE_VARIANTS)
    for key in LITE_VARIANTS:
        cfg = get_config(key)
        ref = official[cfg.name]
        model = EfficientDetBackbone(num_classes=90, compound_coef=key)
        trainable = sum(p.numel() for p in model.parameters())
        stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(('running_mean', 'running_var')))
        assert (trainable, trainable + stats) == (ref['trainable'], ref['all']), cfg.name
        assert cfg.input_size == ref['image_size'] and cfg.anchor_scale == ref['anchor_scale']
        assert cfg.max_level == ref['max_level'] and cfg.fusion == ref['fpn_weight_method'] == 'sum'
        assert cfg.act == ref['act_type'] == 'relu6' and cfg.backbone == ref['backbone_name']
        np.testing.assert_allclose(np.array(cfg.mean) * 255, ref['mean_rgb'], rtol=1e-12)
        np.testing.assert_allclose(np.array(cfg.std) * 255, ref['stddev_rgb'], rtol=1e-12)


def test_variant_keys_and_spellings():
    assert VARIANTS == tuple(range(9)) + ('lite0', 'lite1', 'lite2', 'lite3', 'lite3x', 'lite4')
    assert set(VARIANTS) == set(CONFIGS)
    for spelling in ('lite3x', 'LITE3X', 'efficientdet-lite3x', 'tf_efficientdet_lite3x'):
        assert parse_variant(spelling) == 'lite3x'
    assert variant_tag('efficientdet-lite0') == 'lite0'
    m = EfficientDetBackbone(num_classes=3, compound_coef='efficientdet-lite0')
    assert m.compound_coef == 'lite0' and m.config.name == 'efficientdet-lite0'
    with pytest.raises(ValueError, match='lite0'):
        get_config('lite5')


def test_lite_backbone_has_no_se_and_only_relu6():
    """EfficientNet-Lite: no squeeze-excitation, ReLU6 everywhere (backbone, BiFPN, heads), stem
    fixed at 32 channels, first and last stage repeats not depth-scaled (Lite4: 1+4+4+6+6+8+1)."""
    m = EfficientDetBackbone(num_classes=3, compound_coef='lite4')
    names = [n for n, _ in m.named_parameters()]
    assert not any('_se_' in n for n in names)
    acts = [x for x in m.modules() if isinstance(x, (torch.nn.ReLU6, MemoryEfficientSwish, torch.nn.SiLU))]
    assert acts and all(isinstance(a, torch.nn.ReLU6) for a in acts)
    net = m.backbone_net.model
    assert net._conv_stem.conv.out_channels == 32 and len(net._blocks) == 30
    assert net._blocks[0]._depthwise_conv.conv.in_channels == 32
    # D models keep SE and swish
    d0 = EfficientDetBackbone(num_classes=3, compound_coef=0)
    assert all(b.has_se for b in d0.backbone_net.model._blocks)
    assert not any(isinstance(x, torch.nn.ReLU6) for x in d0.modules())


def test_official_d0_backbone_has_no_stochastic_depth():
    """The official EfficientDet sets survival_prob 0 (off) for its B0 backbone; B1+ and Lite keep 0.8."""
    rates = lambda k: [b.drop_rate for b in EfficientDetBackbone(3, k).backbone_net.model._blocks]
    assert max(rates(0)) == 0.0
    assert max(rates(1)) > 0.15 and max(rates('lite0')) > 0.15


# ----------------------------------------------------------------------------- normalisation
def test_normalization_rule():
    lite_mean, lite_std = resolve_normalization('lite0')
    assert lite_mean == pytest.approx((127 / 255,) * 3) and lite_std == pytest.approx((128 / 255,) * 3)
    assert resolve_normalization(0) == (IMAGENET_MEAN, IMAGENET_STD)
    # ImageNet values (the projects' default) mean "the variant's default" for a Lite model
    assert resolve_normalization('lite2', list(IMAGENET_MEAN), list(IMAGENET_STD)) == (lite_mean, lite_std)
    # any other choice is kept, for D and Lite alike
    custom = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert resolve_normalization('lite2', *custom) == custom
    assert resolve_normalization(3, *custom) == custom


def test_lite_normalisation_is_pixel_minus_127_over_128():
    from efficientdet.preprocess import letterbox
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    t, _ = letterbox(img, 16, *resolve_normalization('lite0'))
    ref = (img.astype(np.float64).transpose(2, 0, 1) - 127.0) / 128.0
    np.testing.assert_allclose(t.numpy().reshape(ref.shape), ref, atol=1e-6)


# ----------------------------------------------------------------------------- any input size
def _tf_nearest(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ``resize_nearest_neighbor`` (align_corners=False, half_pixel_centers=False), NCHW."""
    h, w = x.shape[-2:]
    iy = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(int), h - 1)
    ix = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(int), w - 1)
    return x[..., iy, :][..., ix]


@pytest.mark.parametrize('src,dst', [((3, 3), (5, 5)), ((3, 4), (5, 8)), ((2, 3), (4, 6)), ((1, 2), (2, 3))])
def test_bifpn_up_sampling_is_tf_nearest_to_the_target_size(src, dst):
    x = torch.randn(1, 2, *src)
    got = upsample_to(x, torch.empty(1, 2, *dst))
    np.testing.assert_array_equal(got.numpy(), _tf_nearest(x.numpy(), *dst))


def test_up_sampling_gather_indices_equal_torch_nearest_at_every_ratio():
    """The gather that replaces a resize whose ratio is not 2 picks the rows torch's (and TF1's)
    nearest resize picks, for every source size up to 40 and every larger target up to 80; x2
    keeps the plain resize."""
    from efficientdet.bifpn import nearest_indices
    for src in range(1, 41):
        x = torch.arange(float(src)).view(1, 1, src, 1)
        for dst in range(src, 81):
            ref = torch.nn.functional.interpolate(x, size=(dst, 1), mode='nearest').flatten().long().tolist()
            assert list(nearest_indices(src, dst)) == ref, (src, dst)
    x = torch.randn(1, 2, 3, 4)
    got = upsample_to(x, torch.empty(1, 2, 5, 4))  # rows only: columns unchanged, a fresh tensor
    np.testing.assert_array_equal(got.numpy(), _tf_nearest(x.numpy(), 5, 4))
    assert got.data_ptr() != x.data_ptr()
    same = upsample_to(x, torch.empty(1, 2, 3, 4))
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


def _official_anchors(image_hw, min_level, max_level, anchor_scale, num_scales=3, aspects=(1.0, 2.0, 0.5)):
    """Loop-for-loop reading of the official ``Anchors._generate_configs`` / ``_generate_boxes``
    (tf2/anchors.py): per level and per (octave, aspect), float64, cast to float32 at the end."""
    feat = [tuple(image_hw)]
    for _ in range(max_level):
        feat.append(((feat[-1][0] - 1) // 2 + 1, (feat[-1][1] - 1) // 2 + 1))
    boxes_all = []
    for level in range(min_level, max_level + 1):
        boxes_level = []
        for octave in range(num_scales):
            for aspect in aspects:
                stride = (feat[0][0] / float(feat[level][0]), feat[0][1] / float(feat[level][1]))
                octave_scale = octave / float(num_scales)
                bx = anchor_scale * stride[1] * 2 ** octave_scale
                by = anchor_scale * stride[0] * 2 ** octave_scale
                ax = np.sqrt(aspect)
                ay = 1.0 / ax
                x = np.arange(stride[1] / 2, image_hw[1], stride[1])
                y = np.arange(stride[0] / 2, image_hw[0], stride[0])
                xv, yv = np.meshgrid(x, y)
                xv, yv = xv.reshape(-1), yv.reshape(-1)
                b = np.vstack((yv - by * ay / 2.0, xv - bx * ax / 2.0, yv + by * ay / 2.0, xv + bx * ax / 2.0))
                boxes_level.append(np.swapaxes(b, 0, 1)[:, None])
        boxes_all.append(np.concatenate(boxes_level, axis=1).reshape(-1, 4))
    return np.vstack(boxes_all).astype(np.float32)


@pytest.mark.parametrize('hw,scale', [((320, 480), 4.0), ((300, 200), 3.0), ((320, 320), 3.0), ((97, 130), 4.0)])
def test_anchors_follow_the_official_at_any_size(hw, scale):
    """Unequal strides per axis (320x480: P7 is 3x4, strides 106.7 / 120) give unequal base sizes."""
    ours = generate_anchors(hw, range(3, 8), scale, ratios=OFFICIAL_RATIOS)
    ref = _official_anchors(hw, 3, 7, scale)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


def test_official_lite0_anchors_fixture():
    with np.load(need_shared('fixtures', 'tf_lite0', 'tf_outputs.npz')) as z:
        ref = z['anchors_yxyx']
    assert np.abs(_official_anchors((320, 320), 3, 7, 3.0) - ref).max() <= 1e-3  # the transcription itself
    assert np.abs(generate_anchors((320, 320), range(3, 8), 3.0) - ref).max() <= 1e-3


@pytest.mark.parametrize('variant,hw', [(0, (320, 480)), ('lite0', (300, 200)), ('lite0', (129, 77))])
def test_odd_sizes_run_with_ceil_halved_levels(variant, hw):
    """The official D0 at 320x480 (P7 3x4) and Lite0 at sizes that halve oddly at every level."""
    check_image_size(*hw, variant)
    m = EfficientDetBackbone(num_classes=4, compound_coef=variant).eval()
    with torch.no_grad():
        feats, reg, cls, anchors = m(torch.randn(1, 3, *hw))
    sizes = feature_sizes(*hw, 7)[3:]
    assert [tuple(f.shape[-2:]) for f in feats] == sizes
    n = sum(h * w for h, w in sizes) * 9
    assert reg.shape == (1, n, 4) and cls.shape == (1, n, 4) and anchors.shape == (1, n, 4)
    np.testing.assert_allclose(anchors[0].numpy(), _official_anchors(hw, 3, 7, m.config.anchor_scale), atol=1e-3)
    assert torch.isfinite(reg).all() and torch.isfinite(cls).all()


@pytest.mark.parametrize('variant', LITE_VARIANTS)
def test_every_lite_variant_runs_at_a_small_odd_size(variant):
    m = EfficientDetBackbone(num_classes=2, compound_coef=variant).eval()
    with torch.no_grad():
        feats, reg, cls, anchors = m(torch.randn(1, 3, 72, 100))
    sizes = feature_sizes(72, 100, 7)[3:]  # 9x13 … 1x1 (P6 2x2, P7 1x1)
    assert [tuple(f.shape[-2:]) for f in feats] == sizes and feats[0].shape[1] == m.config.fpn_num_filters
    assert reg.shape[1] == cls.shape[1] == anchors.shape[1] == 9 * sum(h * w for h, w in sizes)


def test_lite_trains_at_an_odd_size():
    m = EfficientDetBackbone(num_classes=3, compound_coef='lite0').train()
    feats, reg, logits, anchors = m(torch.randn(2, 3, 96, 136), return_logits=True)
    (reg.square().mean() + logits.mean()).backward()
    assert m.backbone_net.model._conv_stem.conv.weight.grad is not None
    assert m.bifpn[0].conv6_up.pointwise_conv.conv.weight.grad is not None


# ----------------------------------------------------------------------------- official Lite0 parity
@pytest.fixture(scope='module')
def lite0():
    from efficientdet.convert.tf import read_tf_input, tf_to_state_dict
    meta = json.load(open(os.path.join(need_shared('fixtures', 'tf_lite0'), 'meta.json')))
    sd = tf_to_state_dict(read_tf_input(os.path.join(LITE0, 'tf_weights.npz')), 'lite0', meta['num_classes'])
    model = EfficientDetBackbone(num_classes=meta['num_classes'], compound_coef='lite0').eval()
    model.load_state_dict(sd, strict=True)
    with np.load(os.path.join(LITE0, 'tf_outputs.npz')) as z:
        ref = {k: z[k] for k in z.files}
    x = torch.from_numpy(ref['input']).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        backbone = model.backbone_net(x)
        td_in, _ = model.bifpn[0]._inputs(backbone)
        feats, reg, logits, anchors = model(x, return_logits=True)
    return dict(model=model, meta=meta, ref=ref, x=x, backbone=backbone, td_in=td_in, feats=feats, reg=reg,
                logits=logits, anchors=anchors)


def test_official_lite0_stage_by_stage(lite0):
    ref, meta = lite0['ref'], lite0['meta']
    assert meta['image_size_hw'] == [320, 320] and meta['fpn_weight_method'] == 'sum'
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    for i, lvl in enumerate(range(3, 8)):
        got_in = nhwc(lite0['backbone'][i]) if lvl <= 5 else nhwc(lite0['td_in'][lvl])
        for name, got in ((f'bifpn_in_p{lvl}', got_in), (f'bifpn_out_p{lvl}', nhwc(lite0['feats'][i]))):
            assert got.shape == ref[name].shape, name
            assert (np.abs(got - ref[name]) <= _tol(ref[name])).all(), (name, float(np.abs(got - ref[name]).max()))
    n = 2
    cls_ref = np.concatenate([ref[f'class_p{l}'].reshape(n, -1, 90) for l in range(3, 8)], 1)
    box_ref = np.concatenate([ref[f'box_p{l}'].reshape(n, -1, 4) for l in range(3, 8)], 1)
    assert (np.abs(lite0['logits'].numpy() - cls_ref) <= _tol(cls_ref)).all()
    assert (np.abs(lite0['reg'].numpy() - box_ref) <= _tol(box_ref)).all()
    assert np.abs(lite0['anchors'][0].double().numpy() - ref['anchors_yxyx']).max() <= 1e-3  # measured 0
    decoded = decode_boxes(lite0['reg'], lite0['anchors']).numpy()
    dref = ref['decoded_boxes_yxyx']
    # 1e-3 px plus 1e-5 relative: a regression difference of ~5e-6 moves a box by ~5e-6 of its size, and
    # the random heads make boxes up to 2.8e4 px (measured there: 2.9e-2 px at 1 thread, 6.8e-2 at 2,
    # i.e. <= 2.5e-6 relative)
    assert (np.abs(decoded - dref) <= 1e-3 + 1e-5 * np.abs(dref)).all()


@pytest.mark.parametrize('mode', ['global', 'per_class'])
@pytest.mark.parametrize('method', ['hard', 'gaussian'])
def test_official_lite0_postprocess(lite0, mode, method):
    """The official post-processing of this model's own outputs equals the fixture's detections."""
    from efficientdet.postprocess import official_postprocess
    from test_postprocess import assert_same_detections
    ref = lite0['ref']
    boxes, scores, classes, valid = official_postprocess(torch.sigmoid(lite0['logits']), lite0['reg'],
                                                         lite0['anchors'], (320, 320), method=method, mode=mode)
    key = f'{mode}_{method}_'
    assert valid.tolist() == ref[key + 'valid'].tolist()
    for i in range(2):
        n = int(ref[key + 'valid'][i])
        assert_same_detections(boxes[i].numpy(), scores[i].numpy(), classes[i].numpy().astype(np.float32),
                               ref[key + 'boxes_yxyx'][i], ref[key + 'scores'][i], ref[key + 'classes'][i], n,
                               tie=1e-5, atol=1e-3)


def test_tf_names_of_lite_models_are_the_official_ones():
    """export_tf_names (the converter's inverse) gives exactly the official Lite0 variables and, for
    every Lite variant, as many values as the official model has variables."""
    from efficientdet.convert.tf import export_tf_names, tf_to_state_dict
    counts = json.load(open(need_shared('fixtures', 'official_param_counts_lite.json')))
    meta = json.load(open(need_shared('fixtures', 'tf_lite0', 'meta.json')))
    official = {(k[:-2] if k.endswith(':0') else k): tuple(s) for k, s in meta['variables'].items()}
    for key in LITE_VARIANTS:
        model = EfficientDetBackbone(num_classes=90, compound_coef=key)
        tf_vars = export_tf_names(model)
        assert sum(int(np.asarray(v).size) for v in tf_vars.values()) == counts[get_config(key).name]['all'], key
        if key == 'lite0':
            assert {k: tuple(np.asarray(v).shape) for k, v in tf_vars.items()} == official
        if key == 'lite3x':
            sd = tf_to_state_dict(tf_vars, key)
            for k, v in model.state_dict().items():
                if not k.endswith('num_batches_tracked'):
                    assert torch.equal(sd[k], v.float()), k


def test_tf_lite_conversion_refuses_the_d0_reading():
    from efficientdet.convert.tf import ConversionError, read_tf_input, tf_to_state_dict
    tf_vars = read_tf_input(need_shared('fixtures', 'tf_lite0', 'tf_weights.npz'))
    with pytest.raises(ConversionError, match='efficientdet-d0'):
        tf_to_state_dict(tf_vars, 0)


# ----------------------------------------------------------------------------- effdet and layout detection
@pytest.mark.parametrize('key', ['lite0', 'lite4'])
def test_effdet_lite_layout_round_trip(key):
    """Our Lite weights under effdet's ``tf_efficientdet_lite*`` names: the key set and shapes equal
    effdet's construction rules (written independently in test_convert_effdet), and back."""
    from efficientdet.checkpoint import compound_coef_candidates
    from efficientdet.convert.effdet import effdet_to_state_dict, state_dict_to_effdet
    from test_convert_effdet import effdet_layout
    model = EfficientDetBackbone(num_classes=20, compound_coef=key)
    theirs = state_dict_to_effdet(model.state_dict(), model)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == effdet_layout(key, num_classes=20)
    assert compound_coef_candidates(theirs, 'effdet') == [key]
    back = effdet_to_state_dict(theirs, key)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_lite_and_d_layouts_are_told_apart():
    """Lite0 and D0 have the same channel counts; squeeze-excitation tells them apart."""
    from efficientdet.checkpoint import compound_coef_candidates
    from efficientdet.convert.tf import read_tf_input
    assert compound_coef_candidates(EfficientDetBackbone(5, 'lite0').state_dict()) == ['lite0']
    assert compound_coef_candidates(EfficientDetBackbone(5, 0).state_dict()) == [0]
    assert compound_coef_candidates(EfficientDetBackbone(5, 'lite3x').state_dict()) == ['lite3x']
    tf_vars = read_tf_input(need_shared('fixtures', 'tf_lite0', 'tf_weights.npz'))
    assert compound_coef_candidates(tf_vars, 'tf') == ['lite0']


def test_convert_cli_and_inspect_for_lite(tmp_path, capsys):
    """``convert tf`` of the official Lite0 variables, ``convert effdet`` of the same weights under
    effdet's names, and ``convert inspect`` of all three files: each is recognised as Lite0, and
    the converted files load exactly; asking for D0 is refused, naming -c lite0."""
    from efficientdet.convert.__main__ import main as convert_main
    from efficientdet.convert.effdet import state_dict_to_effdet
    from efficientdet.convert.inspect_ckpt import describe_checkpoint
    from efficientdet.errors import UserError
    npz = need_shared('fixtures', 'tf_lite0', 'tf_weights.npz')
    ours, ours2, theirs = (str(tmp_path / n) for n in ('lite0.pth', 'lite0_b.pth', 'effdet_lite0.pth'))
    assert convert_main(['tf', npz, '-c', 'lite0', '-o', ours]) == 0
    sd = torch.load(ours, weights_only=True)
    model = EfficientDetBackbone(num_classes=90, compound_coef='lite0')
    model.load_state_dict(sd, strict=True)
    torch.save(state_dict_to_effdet(sd, model), theirs)
    assert convert_main(['effdet', theirs, '-c', 'lite0', '-o', ours2]) == 0
    back = torch.load(ours2, weights_only=True)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    for path in (npz, ours, theirs):
        info = describe_checkpoint(path)
        assert info['compound_coef'] == 'lite0' and info['num_classes'] == 90, (path, info)
    with pytest.raises(UserError, match='lite0'):
        convert_main(['tf', npz, '-c', '0', '-o', str(tmp_path / 'x.pth')])
    with pytest.raises(UserError, match='lite0'):
        convert_main(['effdet', theirs, '-c', '0', '-o', str(tmp_path / 'y.pth')])
