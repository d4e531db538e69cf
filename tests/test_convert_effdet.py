"""rwightman effdet checkpoints → ours: fixture parity, key naming for D1/D6/D7x, CLI.
(The CLI runs through a real subprocess in test_checkpoint.py::test_inspect_cli_subprocess.)"""

import argparse
import json

import numpy as np
import pytest
import torch

from conftest import load_npz, need_shared
from efficientdet import EfficientDetBackbone
from efficientdet.checkpoint import read_checkpoint
from efficientdet.config import BACKBONES, CONFIGS, EFFICIENTNET_STAGES, round_filters, round_repeats
from efficientdet.convert.__main__ import main as convert_main
from efficientdet.convert.inspect_ckpt import describe_checkpoint
from efficientdet.convert.effdet import effdet_key_map, effdet_to_state_dict, state_dict_to_effdet
from efficientdet.convert.tf import ConversionError

pytestmark = pytest.mark.filterwarnings('ignore:for .*copying from a non-meta parameter')
EFFDET_SD = ('fixtures', 'effdet_d0', 'effdet_state_dict.npz')


def _effdet_d0():
    return read_checkpoint(need_shared(*EFFDET_SD)).state_dict


def _meta_model(coef, num_classes=90):
    with torch.device('meta'):
        return EfficientDetBackbone(num_classes=num_classes, compound_coef=coef)


# ------------------------------------------------------------------ an independent effdet layout
def effdet_layout(coef, num_classes=90, num_anchors=9):
    """Key → shape of effdet's ``tf_efficientdet_d{coef}``, written from effdet's construction rules
    (timm EfficientNet stages, BiFPN node offsets, resample convs where channels change,
    edge weights for fast fusion only, repeat-major head BNs), independently of the converter."""
    cfg = CONFIGS[coef]
    ch, levels = cfg.fpn_num_filters, cfg.levels
    out = {}

    def bn(p, c):
        out.update({f'{p}.weight': (c,), f'{p}.bias': (c,), f'{p}.running_mean': (c,),
                    f'{p}.running_var': (c,), f'{p}.num_batches_tracked': ()})

    def conv(p, cout, cin, k=1, bias=False, groups=1):
        out[f'{p}.weight'] = (cout, cin // groups, k, k)
        if bias:
            out[f'{p}.bias'] = (cout,)

    # backbone
    lite = cfg.backbone.startswith('efficientnet-lite')  # timm lite: fixed stem, first/last repeats, no SE
    params = BACKBONES[cfg.backbone]
    stem = 32 if lite else round_filters(32, params.width)
    conv('backbone.conv_stem', stem, 3, 3)
    bn('backbone.bn1', stem)
    for s, st in enumerate(EFFICIENTNET_STAGES):
        cin, cout = round_filters(st.in_ch, params.width), round_filters(st.out_ch, params.width)
        cin = stem if s == 0 else cin
        fixed = lite and s in (0, len(EFFICIENTNET_STAGES) - 1)
        for i in range(st.repeats if fixed else round_repeats(st.repeats, params.depth)):
            b, bin_ = f'backbone.blocks.{s}.{i}', (cin if i == 0 else cout)
            se = None if lite else max(1, int(bin_ * st.se_ratio))
            if st.expand_ratio == 1:
                conv(f'{b}.conv_dw', bin_, bin_, st.kernel, groups=bin_)
                bn(f'{b}.bn1', bin_)
                mid, pw, last_bn = bin_, 'conv_pw', 'bn2'
            else:
                mid = bin_ * st.expand_ratio
                conv(f'{b}.conv_pw', mid, bin_)
                bn(f'{b}.bn1', mid)
                conv(f'{b}.conv_dw', mid, mid, st.kernel, groups=mid)
                bn(f'{b}.bn2', mid)
                pw, last_bn = 'conv_pwl', 'bn3'
            if se is not None:
                conv(f'{b}.se.conv_reduce', se, mid, bias=True)
                conv(f'{b}.se.conv_expand', mid, se, bias=True)
            conv(f'{b}.{pw}', cout, mid)
            bn(f'{b}.{last_bn}', cout)
    # fpn.resample: extra levels made from the last feature map
    feats = list(cfg.backbone_channels)
    in_ch = feats[-1]
    for off in range(len(feats), len(levels)):
        if in_ch != ch:
            conv(f'fpn.resample.{off}.conv.conv', ch, in_ch, bias=True)
            bn(f'fpn.resample.{off}.conv.bn', ch)
        in_ch = ch
    chans = feats + [ch] * (len(levels) - len(feats))
    # node list: effdet's bifpn_config bookkeeping of node ids
    node_ids = {lvl: [i] for i, lvl in enumerate(levels)}
    nxt, nodes = len(levels), []
    for lvl in reversed(levels[:-1]):
        nodes.append([node_ids[lvl][-1], node_ids[lvl + 1][-1]])
        node_ids[lvl].append(nxt)
        nxt += 1
    for lvl in levels[1:]:
        nodes.append(list(node_ids[lvl]) + [node_ids[lvl - 1][-1]])
        node_ids[lvl].append(nxt)
        nxt += 1
    for c in range(cfg.fpn_cell_repeats):
        for n, offsets in enumerate(nodes):
            p = f'fpn.cell.{c}.fnode.{n}'
            if cfg.fusion == 'fast':
                out[f'{p}.combine.edge_weights'] = (len(offsets),)
            for off in offsets:
                if off < len(chans) and chans[off] != ch:
                    conv(f'{p}.combine.resample.{off}.conv.conv', ch, chans[off], bias=True)
                    bn(f'{p}.combine.resample.{off}.conv.bn', ch)
            conv(f'{p}.after_combine.conv.conv_dw', ch, ch, 3, groups=ch)
            conv(f'{p}.after_combine.conv.conv_pw', ch, ch, bias=True)
            bn(f'{p}.after_combine.conv.bn', ch)
        chans = [ch] * len(levels)
    for net, n_out in (('class_net', num_classes), ('box_net', 4)):
        for r in range(cfg.box_class_repeats):
            conv(f'{net}.conv_rep.{r}.conv_dw', ch, ch, 3, groups=ch)
            conv(f'{net}.conv_rep.{r}.conv_pw', ch, ch, bias=True)
            for j in range(len(levels)):
                bn(f'{net}.bn_rep.{r}.{j}.bn', ch)
        conv(f'{net}.predict.conv_dw', ch, ch, 3, groups=ch)
        conv(f'{net}.predict.conv_pw', num_anchors * n_out, ch, bias=True)
    return out


def test_independent_layout_is_effdets_real_d0_layout():
    meta = json.load(open(need_shared('fixtures', 'effdet_d0', 'effdet_meta.json')))
    real = {k: tuple(v) for k, v in meta['state_dict'].items()}
    assert effdet_layout(0) == real


@pytest.mark.parametrize('coef', [0, 1, 6, 8])
def test_inverse_mapping_names_match_effdet_layout(coef):
    """D1 (more cells), D6 (sum fusion: no edge weights), D7x (P8: more nodes and offsets)."""
    model = _meta_model(coef)
    theirs = state_dict_to_effdet(model.state_dict(), model)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == effdet_layout(coef)
    if CONFIGS[coef].fusion == 'sum':
        assert not any(k.endswith('edge_weights') for k in theirs)


# ------------------------------------------------------------------ fixture parity
def test_effdet_d0_fixture_parity():
    sd = effdet_to_state_dict(_effdet_d0(), 0)
    model = EfficientDetBackbone(num_classes=90, compound_coef=0).eval()
    model.load_state_dict(sd, strict=True)
    ref = load_npz('fixtures', 'effdet_d0', 'effdet_outputs.npz')
    x = torch.from_numpy(ref['input_nchw']).float()
    with torch.no_grad():
        _, reg, logits, _ = model(x, return_logits=True)
    n, start, worst = x.shape[0], 0, 0.0
    for lvl in range(3, 8):
        cls_ref, box_ref = ref[f'class_p{lvl}'], ref[f'box_p{lvl}']  # [B, A*C, H, W] anchor-major
        h, w = cls_ref.shape[2:]
        count = h * w * 9
        got_cls = logits[:, start:start + count].reshape(n, h, w, 9 * 90).permute(0, 3, 1, 2).numpy()
        got_box = reg[:, start:start + count].reshape(n, h, w, 9 * 4).permute(0, 3, 1, 2).numpy()
        start += count
        for got, want in ((got_cls, cls_ref), (got_box, box_ref)):
            diff = np.abs(got - want)
            worst = max(worst, float(diff.max()))
            # float32 head outputs: measured max |diff| 1.9e-6 (class logits, |ref| <= 4.8), 1 and 2 threads
            assert (diff <= 1e-5 + 1e-5 * np.abs(want)).all(), (lvl, float(diff.max()))
    assert start == logits.shape[1]
    assert worst < 1e-5


def test_round_trip_d1_through_effdet_layout():
    torch.manual_seed(0)
    model = EfficientDetBackbone(num_classes=7, compound_coef=1)
    with torch.no_grad():  # BN statistics and fusion weights away from their defaults
        for k, v in model.state_dict().items():
            if v.is_floating_point() and ('running' in k or '_w' in k):
                v.uniform_(0.5, 1.5)
    theirs = state_dict_to_effdet(model.state_dict(), model)
    assert len(theirs) == len(model.state_dict())
    back = effdet_to_state_dict({k: v.clone() for k, v in theirs.items()}, 1, num_classes=7)
    assert list(back) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    _meta_model(1, num_classes=7).load_state_dict(back, strict=True)


def test_round_trip_d7x_names_and_values():
    """Every tensor carries its own marker value (zero-memory expanded scalars)."""
    model = _meta_model(8, num_classes=3)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    kmap = effdet_key_map(model)
    theirs = {kmap[k]: torch.tensor(i, dtype=dt).expand(shape) for i, (k, (shape, dt)) in enumerate(shapes.items())}
    back = effdet_to_state_dict(theirs, 8, num_classes=3, model=model)
    assert list(back) == list(shapes)
    for i, (k, (shape, dt)) in enumerate(shapes.items()):
        assert tuple(back[k].shape) == shape and back[k].dtype == dt, k
        assert back[k][(0,) * len(shape)].item() == i, k
    # P8 exists on both sides: fnode count grows to 10 per cell, resample offsets up to 5
    assert 'fpn.cell.7.fnode.9.after_combine.conv.bn.weight' in theirs
    assert kmap['bifpn.7.conv8_down.bn.weight'] == 'fpn.cell.7.fnode.9.after_combine.conv.bn.weight'


def test_bn_rep_is_repeat_major_and_ours_level_major():
    kmap = effdet_key_map(_meta_model(0))
    assert kmap['classifier.bn_list.4.2.weight'] == 'class_net.bn_rep.2.4.bn.weight'
    assert kmap['regressor.bn_list.0.1.running_var'] == 'box_net.bn_rep.1.0.bn.running_var'


# ------------------------------------------------------------------ strictness
def test_unused_and_missing_keys_are_named():
    sd = _effdet_d0()
    extra = dict(sd)
    extra['backbone.conv_head.weight'] = torch.zeros(1280, 320, 1, 1)
    with pytest.raises(ConversionError, match=r'1 input keys not used: backbone\.conv_head\.weight'):
        effdet_to_state_dict(extra, 0)
    fewer = {k: v for k, v in sd.items() if k != 'fpn.cell.1.fnode.4.combine.edge_weights'}
    with pytest.raises(ConversionError, match=r'fpn\.cell\.1\.fnode\.4\.combine\.edge_weights'):
        effdet_to_state_dict(fewer, 0)
    with pytest.raises(ConversionError, match=r'this file is efficientdet-d0 .* -c 2'):
        effdet_to_state_dict(sd, 2)
    with pytest.raises(ConversionError, match='90 classes but --num_classes 80'):
        effdet_to_state_dict(sd, 0, num_classes=80)


# ------------------------------------------------------------------ CLI
def _write_bench_checkpoint(path):
    """A timm/effdet training checkpoint: args Namespace, bench keys (model.* + anchors.boxes)."""
    sd = _effdet_d0()
    bench = {'module.model.' + k: v.float() if v.is_floating_point() else v.long() for k, v in sd.items()}
    bench['module.anchors.boxes'] = torch.zeros(12276, 4)
    torch.save({'epoch': 3, 'arch': 'tf_efficientdet_d0', 'args': argparse.Namespace(lr=0.1),
                'state_dict': {k: v * 0 if v.is_floating_point() else v for k, v in bench.items()},
                'state_dict_ema': bench}, path)
    return sd


def test_cli_converts_wrapped_bench_checkpoint(tmp_path, capsys):
    src, out = str(tmp_path / 'effdet_d0.pth.tar'), str(tmp_path / 'd0.pth')
    sd = _write_bench_checkpoint(src)
    assert convert_main(['effdet', src, '-c', '0', '-o', out]) == 0
    printed = capsys.readouterr().out
    assert 'efficientdet-d0, 90 classes, 784 tensors, 3,880,067 parameters' in printed
    assert 'state_dict_ema' in printed and 'anchors.boxes' in printed
    loaded = torch.load(out, weights_only=True)
    model = EfficientDetBackbone(num_classes=90, compound_coef=0)
    model.load_state_dict(loaded, strict=True)  # EMA weights (the non-EMA copy is all zeros)
    assert torch.equal(loaded['classifier.header.pointwise_conv.conv.bias'],
                       sd['class_net.predict.conv_pw.bias'].float())
    info = describe_checkpoint(src)  # inspect: an effdet DetBench training checkpoint
    assert 'effdet' in info['origin'] and 'DetBench' in info['origin'] and info['compound_coef'] == 0
    assert info['training']['epoch'] == 3 and info['weights_under'] == 'state_dict_ema'
    assert list(info['dropped']) == ['module.anchors.boxes']


@pytest.mark.parametrize('case', ['missing', 'not_effdet', 'wrong_coef'])
def test_cli_user_errors_are_one_line(tmp_path, capsys, case):
    from efficientdet.errors import run_cli
    src = {'missing': str(tmp_path / 'nope.pth'),
           'not_effdet': need_shared('fixtures', 'zylo117_d0', 'zylo117_state_dict.npz'),
           'wrong_coef': need_shared(*EFFDET_SD)}[case]
    out = tmp_path / 'o.pth'
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: convert_main(['effdet', src, '-c', '3', '-o', str(out)]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.strip().count('\n') == 0 and src in err
    assert 'Traceback' not in err and not out.exists()
    expect = {'missing': 'no such checkpoint file', 'not_effdet': 'not an effdet checkpoint',
              'wrong_coef': 'this file is efficientdet-d0 (from its tensor shapes) but -c 3 (efficientdet-d3) was asked; pass -c 0'}[case]
    assert expect in err
