"""Parity with the official TF model and Yet-Another-EfficientDet-Pytorch on shared fixtures."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from conftest import FIXTURES, need_shared
from efficientdet import EfficientDetBackbone
from efficientdet.anchors import decode_boxes
from efficientdet.convert.tf import ConversionError, read_tf_input, tf_to_state_dict


def _tol(ref, rel=1e-5, atol=1e-5):
    """Feature maps and head outputs (float32). Measured max |ours - ref| on the D0 fixtures, 1 and 2
    threads: TF 1.1e-6 (box regression; BiFPN maps <= 4.8e-7), Yet-Another 7.2e-7, i.e. at most 0.06 of
    this bound element-wise (ref magnitudes up to ~5)."""
    return atol + rel * np.abs(ref)


def _tf_fixture_dirs():
    dirs = sorted(glob.glob(os.path.join(FIXTURES, 'tf_d*')))
    return dirs or [os.path.join(FIXTURES, 'tf_d0')]


def _model_from_tf_dir(d):
    meta = json.load(open(os.path.join(need_shared(d), 'meta.json')))
    coef = int(meta['model_name'].split('-d')[1].replace('x', '')) if 'd7x' not in meta['model_name'] else 8
    sd = tf_to_state_dict(read_tf_input(os.path.join(d, 'tf_weights.npz')), coef, meta['num_classes'])
    model = EfficientDetBackbone(num_classes=meta['num_classes'], compound_coef=coef)
    model.load_state_dict(sd, strict=True)
    return model.eval(), meta


@pytest.mark.parametrize('fixture_dir', _tf_fixture_dirs(), ids=os.path.basename)
def test_official_tf_parity(fixture_dir):
    model, meta = _model_from_tf_dir(fixture_dir)
    with np.load(os.path.join(fixture_dir, 'tf_outputs.npz')) as z:
        ref = {k: z[k] for k in z.files}
    x = torch.from_numpy(ref['input']).permute(0, 3, 1, 2).float()
    levels = list(range(meta['min_level'], meta['max_level'] + 1))
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        backbone = model.backbone_net(x)
        cell0 = model.bifpn[0]
        td_in, _ = cell0._inputs(backbone)
        feats, reg, logits, anchors = model(x, return_logits=True)
    worst = {}
    for i, lvl in enumerate(levels):
        got_in = nhwc(backbone[i]) if lvl <= 5 else nhwc(td_in[lvl])
        for name, got in ((f'bifpn_in_p{lvl}', got_in), (f'bifpn_out_p{lvl}', nhwc(feats[i]))):
            diff = np.abs(got - ref[name])
            worst[name] = float(diff.max())
            assert (diff <= _tol(ref[name])).all(), (name, worst[name])
    n = x.shape[0]
    cls_ref = np.concatenate([ref[f'class_p{l}'].reshape(n, -1, meta['num_classes']) for l in levels], 1)
    box_ref = np.concatenate([ref[f'box_p{l}'].reshape(n, -1, 4) for l in levels], 1)
    assert np.all(np.abs(logits.numpy() - cls_ref) <= _tol(cls_ref))
    assert np.all(np.abs(reg.numpy() - box_ref) <= _tol(box_ref))
    assert np.abs(anchors[0].double().numpy() - ref['anchors_yxyx']).max() <= 1e-3  # pixels; measured 0
    decoded = decode_boxes(reg, anchors).numpy()
    assert np.abs(decoded - ref['decoded_boxes_yxyx']).max() <= 1e-3  # pixels; measured 2.4e-4


def test_zylo117_parity_in_compat_mode(zylo_d0):
    sd = np.load(need_shared('fixtures', 'zylo117_d0', 'zylo117_state_dict.npz'))
    state = {k: torch.from_numpy(sd[k]) if sd[k].dtype == np.int64 else torch.from_numpy(sd[k]).float()
             for k in sd.files}
    model = EfficientDetBackbone(num_classes=90, compound_coef=0, compat='zylo117').eval()
    model.load_state_dict(state, strict=True)
    x = torch.from_numpy(zylo_d0['input_nchw']).float()
    with torch.no_grad():
        feats, reg, cls, anchors = model(x)
    for i, lvl in enumerate(range(3, 8)):
        ref = zylo_d0[f'bifpn_out_p{lvl}']
        assert np.all(np.abs(feats[i].numpy() - ref) <= _tol(ref)), lvl
    assert np.all(np.abs(reg.numpy() - zylo_d0['regression']) <= _tol(zylo_d0['regression']))
    assert np.abs(cls.numpy() - zylo_d0['classification']).max() <= 1e-5  # after sigmoid; measured 2.7e-7
    assert np.abs(anchors.double().numpy() - zylo_d0['anchors']).max() <= 1e-3

    # the same weights in the default official mode are a different (the official) computation
    official = EfficientDetBackbone(num_classes=90, compound_coef=0).eval()
    official.load_state_dict(state, strict=True)
    with torch.no_grad():
        _, _, cls_o, anchors_o = official(x)
    assert np.abs(anchors_o.double().numpy() - zylo_d0['anchors']).max() > 1.0
    assert np.abs(cls_o.numpy() - zylo_d0['classification']).max() > 1e-3


def test_tf_conversion_rejects_wrong_coefficient_and_lists_names():
    tf_vars = read_tf_input(need_shared('fixtures', 'tf_d0', 'tf_weights.npz'))
    with pytest.raises(ConversionError, match='not found'):
        tf_to_state_dict(tf_vars, 1)
    extra = dict(tf_vars)
    extra['some_scope/unexpected/kernel'] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match='some_scope/unexpected/kernel'):
        tf_to_state_dict(extra, 0)
    with pytest.raises(ConversionError, match='90 classes'):
        tf_to_state_dict(tf_vars, 0, num_classes=80)


def test_tf_conversion_maps_every_variant_layout():
    """Synthesise official-named variables from a model of each small variant and round-trip them."""
    from efficientdet.convert.tf import export_tf_names
    for coef in (1, 8):
        model = EfficientDetBackbone(num_classes=7, compound_coef=coef)
        tf_vars = export_tf_names(model)
        sd = tf_to_state_dict(tf_vars, coef)
        for k, v in model.state_dict().items():
            if not k.endswith('num_batches_tracked'):
                assert torch.equal(sd[k], v.float()), k


@pytest.mark.parametrize('coef', [0, 1, 8])
def test_tf_export_matches_official_variable_counts(coef):
    """Independent of the converter's own mapping: with 90 classes the official-named variables
    export_tf_names produces hold exactly as many values as the official TF model has variables
    (``all``: trainable + BN moving statistics, official_param_counts.json), for D0, D1 (fast fusion)
    and D7x (sum fusion, P8); for D0 every name and shape equals the official model's (meta.json)."""
    from efficientdet.config import CONFIGS
    from efficientdet.convert.tf import export_tf_names
    counts = json.load(open(need_shared('fixtures', 'official_param_counts.json')))
    model = EfficientDetBackbone(num_classes=90, compound_coef=coef)
    tf_vars = export_tf_names(model)
    assert sum(int(np.asarray(v).size) for v in tf_vars.values()) == counts[CONFIGS[coef].name]['all']
    if coef == 0:
        meta = json.load(open(need_shared('fixtures', 'tf_d0', 'meta.json')))
        official = {(k[:-2] if k.endswith(':0') else k): tuple(shape) for k, shape in meta['variables'].items()}
        assert {k: tuple(np.asarray(v).shape) for k, v in tf_vars.items()} == official
