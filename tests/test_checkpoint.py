"""Checkpoint safety, recognition (variant, classes, origin), exact and fine-tuning loads, inspect."""
import functools
import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, need_shared
from efficientdet import EfficientDetBackbone
from efficientdet.checkpoint import (atomic_save, compound_coef_candidates, describe_coef, extract_state_dict,
                                     infer_compound_coef, infer_num_classes, load_pretrained, load_weights,
                                     read_checkpoint, safe_load, yet_another_fusion_keys)
from efficientdet.convert.__main__ import main as convert_main
from efficientdet.convert.effdet import effdet_to_state_dict
from efficientdet.convert.inspect_ckpt import _origin, describe_checkpoint, format_report
from efficientdet.convert.tf import read_tf_input, tf_to_state_dict
from efficientdet.errors import UserError, run_cli

ZYLO = ('fixtures', 'zylo117_d0', 'zylo117_state_dict.npz')
EFFDET = ('fixtures', 'effdet_d0', 'effdet_state_dict.npz')
TF = ('fixtures', 'tf_d0', 'tf_weights.npz')
pytestmark = pytest.mark.filterwarnings('ignore:for .*copying from a non-meta parameter')
CLS_W, CLS_B = 'classifier.header.pointwise_conv.conv.weight', 'classifier.header.pointwise_conv.conv.bias'


@functools.lru_cache(maxsize=None)
def _meta_model(coef, num_classes=90, ratios=None):
    """Structure only (meta tensors, nothing computed); loading into it checks keys and shapes."""
    kw = {'ratios': list(ratios)} if ratios else {}
    with torch.device('meta'):
        return EfficientDetBackbone(num_classes=num_classes, compound_coef=coef, **kw)


def _zylo_sd():
    return {k: v.float() if v.is_floating_point() else v for k, v in read_checkpoint(need_shared(*ZYLO)).state_dict.items()}


def _reference(kind):
    """Each fixture converted by the path that does not go through checkpoint.py."""
    if kind == 'zylo':
        return _zylo_sd()
    if kind == 'effdet':
        return effdet_to_state_dict(read_checkpoint(need_shared(*EFFDET)).state_dict, 0)
    return tf_to_state_dict(read_tf_input(need_shared(*TF)), 0)


# ------------------------------------------------------------------ safety
class _Evil:
    marker = ''

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('fmt', ['torch_zip', 'plain_pickle'])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, fmt, capsys):
    marker = tmp_path / 'pwned'
    evil = _Evil()
    evil.marker = str(marker)
    path = str(tmp_path / 'evil.pth')
    payload = {'state_dict': {'w': torch.ones(1)}, 'extra': evil}
    if fmt == 'torch_zip':
        torch.save(payload, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    for load in (safe_load, lambda p: load_weights(_meta_model(0), p), lambda p: load_pretrained(_meta_model(0), p),
                 describe_checkpoint):
        with pytest.raises(UserError, match='refused to load.*could run code.*not executed') as e:
            load(path)
        assert path in str(e.value)
        assert not marker.exists()
    with pytest.raises(SystemExit) as e:  # the CLI: one line, exit 2, no traceback
        run_cli(lambda: convert_main(['inspect', path]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and err.strip().count('\n') == 0
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = str(tmp_path / 'obj.npz')
    np.savez(path, a=np.array([{'x': 1}], dtype=object))
    with pytest.raises(UserError, match='obj.npz: not a readable .npz'):
        read_checkpoint(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(UserError, match='no such checkpoint file'):
        load_weights(_meta_model(0), str(tmp_path / 'nope.pth'))
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint at all')
    with pytest.raises(UserError, match='junk.pth: refused to load: the file is not a tensors-only checkpoint'):
        safe_load(str(junk))
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(UserError, match='empty.pth: not a readable PyTorch checkpoint'):
        safe_load(str(empty))


# ------------------------------------------------------------------ unwrapping
def test_extract_state_dict_wrappers_and_prefixes():
    a, b = torch.ones(2), torch.zeros(2)
    assert extract_state_dict({'x.weight': a}).keys() == {'x.weight'}
    assert extract_state_dict({'state_dict': {'module.x.weight': a}})['x.weight'] is a
    assert extract_state_dict({'state_dict': {'x.weight': a}, 'state_dict_ema': {'x.weight': b}})['x.weight'] is b
    assert extract_state_dict({'model': {'model.x.weight': a, 'model.y': b}}).keys() == {'x.weight', 'y'}
    with pytest.raises(UserError, match='f.pth: does not hold a state_dict'):
        extract_state_dict({'epoch': 3}, 'f.pth')


def test_training_checkpoint_is_recognised_and_prefers_ema(tmp_path):
    sd = _zylo_sd()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    ckpt = {'model': sd, 'ema': ema, 'optimizer': {'state': {0: {'exp_avg': torch.ones(3)}}, 'param_groups': []},
            'scheduler': {'last_epoch': 4}, 'scaler': {'scale': 1024.0}, 'epoch': 4, 'step': 1234,
            'rng': {'torch': torch.get_rng_state()}}
    path = str(tmp_path / 'last.ckpt')
    atomic_save(ckpt, path)
    ck = read_checkpoint(path)
    assert ck.training['epoch'] == 4 and ck.training['step'] == 1234 and ck.training['has_ema']
    assert ck.wrapper == ['ema'] and torch.equal(ck.state_dict[CLS_B], ema[CLS_B])
    ckpt['ema'] = None
    atomic_save(ckpt, path)
    assert read_checkpoint(path).wrapper == ['model']
    info = describe_checkpoint(path)
    report = format_report(info)
    assert 'this project (full training checkpoint)' in report and 'epoch 4, step 1234' in report
    assert info['compound_coef'] == 0 and info['num_classes'] == 90


# ------------------------------------------------------------------ recognising
def test_candidates_distinguish_every_variant_except_d6_d7():
    for c in range(9):
        sd = _meta_model(c, num_classes=5).state_dict()
        expect = [6, 7] if c in (6, 7) else [c]
        assert compound_coef_candidates(sd) == expect, c
        assert infer_compound_coef(sd) == (None if c in (6, 7) else c)
        assert infer_num_classes(sd) == 5
    assert describe_coef([6, 7]) == 'efficientdet-d6 or efficientdet-d7'
    assert describe_coef([8]) == 'efficientdet-d7x'
    # partial state_dicts still narrow it down; nothing recognisable gives no candidate
    backbone_only = {k: v for k, v in _meta_model(2).state_dict().items() if k.startswith('backbone_net')}
    assert compound_coef_candidates(backbone_only) == [2]
    assert compound_coef_candidates({'foo.weight': torch.ones(1)}) == []


@pytest.mark.parametrize('parts,layout', [(ZYLO, 'ours'), (EFFDET, 'effdet'), (TF, 'tf')])
def test_recognises_each_fixture_layout(parts, layout):
    ck = read_checkpoint(need_shared(*parts))
    assert ck.layout == layout
    assert ck.candidates == [0] and infer_compound_coef(ck.state_dict) == 0
    assert infer_num_classes(ck.state_dict) == 90
    assert infer_num_classes(ck.state_dict, num_anchors=7) is None  # 810 is not a multiple of 7


# ------------------------------------------------------------------ exact loading
@pytest.mark.parametrize('kind,parts', [('zylo', ZYLO), ('effdet', EFFDET), ('tf', TF)])
def test_load_weights_exact_for_each_layout(kind, parts):
    model = EfficientDetBackbone(num_classes=90, compound_coef=0)
    report = load_weights(model, need_shared(*parts), verbose=False)
    assert len(report.loaded) == report.total == 784 and not report.skipped and not report.dropped
    ref = _reference(kind)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k].to(v.dtype)), k


def test_load_weights_wrong_coefficient_names_both():
    path = need_shared(*ZYLO)
    with pytest.raises(UserError) as e:
        load_weights(_meta_model(1), path)
    msg = str(e.value)
    assert 'this file is efficientdet-d0 (from its tensor shapes) but -c 1' in msg
    assert msg.endswith('pass -c 0') and path in msg and '\n' not in msg


def test_load_weights_wrong_class_count_suggests_fine_tuning():
    with pytest.raises(UserError) as e:
        load_weights(_meta_model(0, num_classes=3), need_shared(*EFFDET))
    msg = str(e.value)
    assert 'holds weights for 90 classes but the model has 3' in msg and 'load_pretrained' in msg and '-w' in msg
    assert 'pass -p coco' in msg  # 90 classes: the COCO label map is what to pass


def test_load_weights_different_anchor_count():
    model = _meta_model(0, ratios=((1.0, 1.0),))  # 3 anchors per location
    with pytest.raises(UserError, match='9 anchors per location but the model 3'):
        load_weights(model, need_shared(*ZYLO))


def test_load_weights_strict_lists_missing_keys():
    sd = _zylo_sd()
    del sd['bifpn.1.conv5_down.bn.running_var']
    with pytest.raises(UserError, match=r'1 model tensors missing from the file: bifpn\.1\.conv5_down\.bn\.running_var'):
        load_weights(_meta_model(0), sd)
    report = load_weights(_meta_model(0), sd, strict=False, verbose=False)
    assert report.skipped == {'bifpn.1.conv5_down.bn.running_var': 'not in file'}


def _yet_another(coef, num_classes=90):
    """A Yet-Another-EfficientDet-Pytorch state_dict of a sum-fusion variant (meta tensors)."""
    sd = dict(_meta_model(coef, num_classes).state_dict())
    sd.update({k: torch.empty(shape, device='meta') for k, shape in yet_another_fusion_keys(coef).items()})
    return sd


def test_yet_another_d6_fusion_weights_dropped_exactly(capsys):
    sd = _yet_another(6)
    fusion = yet_another_fusion_keys(6)
    assert len(fusion) == 64 and sum(math.prod(s) for s in fusion.values()) == 152
    for coef in (6, 7):  # D6 and D7 weights have identical shapes
        report = load_weights(_meta_model(coef), sd)
        assert set(report.dropped) == set(fusion) and len(report.loaded) == report.total
    out = capsys.readouterr().out
    assert 'dropped 64 Yet-Another BiFPN fusion weights' in out and '152 values' in out and 'sum fusion' in out
    # anything else stays an error
    for extra, shape in (('bifpn.0.p8_w1', (2,)), ('bifpn.0.p6_w1', (3,))):
        bad = dict(sd)
        bad[extra] = torch.empty(shape, device='meta')
        with pytest.raises(UserError, match=extra.replace('.', r'\.')):
            load_weights(_meta_model(6), bad)
    # a fast-fusion variant never drops its fusion weights
    zylo = _zylo_sd()
    del zylo['bifpn.0.p6_w1']
    with pytest.raises(UserError, match=r'bifpn\.0\.p6_w1'):
        load_weights(_meta_model(0), zylo)


def test_d6_d7_file_into_other_variant_says_6_or_7():
    with pytest.raises(UserError) as e:
        load_weights(_meta_model(5), _yet_another(6))
    assert 'this file is efficientdet-d6 or efficientdet-d7 (from its tensor shapes)' in str(e.value) and '-c 6 or -c 7' in str(e.value)
    assert 'Yet-Another' in _origin(read_checkpoint(_yet_another(8)))  # D7x too


# ------------------------------------------------------------------ fine-tuning
def test_load_pretrained_other_class_count(capsys):
    path = need_shared(*ZYLO)
    model = EfficientDetBackbone(num_classes=3, compound_coef=0)
    report = load_pretrained(model, path)
    out = capsys.readouterr().out
    assert out.count('\n') == 1, out  # ONE line
    assert ('skipped 2 keys: classifier.header.pointwise_conv.conv.{weight,bias} '
            '(shape: 90 classes in file, 3 in model)') in out
    assert '782/784 tensors' in out and 're-initialised classifier.header.pointwise_conv' in out
    ref = _zylo_sd()
    own = model.state_dict()
    assert report.loaded == [k for k in own if k not in (CLS_W, CLS_B)]
    for k in report.loaded:
        assert torch.equal(own[k], ref[k]), k
    assert torch.allclose(own[CLS_B], torch.full((27,), -math.log(99.0)))
    assert 0.06 < own[CLS_W].std().item() < 0.2  # variance scaling, fan_in 64: ~0.125


def test_load_pretrained_converts_effdet_and_keeps_same_class_header(capsys):
    model = EfficientDetBackbone(num_classes=90, compound_coef=0)
    report = load_pretrained(model, need_shared(*EFFDET))
    assert len(report.loaded) == 784 and not report.skipped and not report.reinitialized
    ref = _reference('effdet')
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert 'converted from effdet keys' in capsys.readouterr().out


def test_load_pretrained_refuses_other_coefficient():
    with pytest.raises(UserError) as e:
        load_pretrained(_meta_model(2, num_classes=3), need_shared(*TF))
    msg = str(e.value)
    assert 'this file is efficientdet-d0 (from its tensor shapes) but -c 2' in msg
    assert msg.endswith('pass -c 0')


def test_load_pretrained_other_anchor_count_reason(capsys):
    model = _meta_model(0, num_classes=3, ratios=((1.0, 1.0),))
    report = load_pretrained(model, _zylo_sd())
    assert report.skipped['regressor.header.pointwise_conv.conv.bias'] == \
        'shape: 9 anchors per location in file, 3 in model'
    assert report.skipped[CLS_B] == 'shape: 90 classes x 9 anchors in file, 3 classes x 3 anchors in model'


# ------------------------------------------------------------------ inspect
@pytest.mark.parametrize('parts,origin', [(ZYLO, 'this project or Yet-Another-EfficientDet-Pytorch'),
                                          (EFFDET, 'rwightman efficientdet-pytorch'),
                                          (TF, 'official TensorFlow')])
def test_inspect_each_fixture_kind(parts, origin):
    counts = json.load(open(need_shared('fixtures', 'official_param_counts.json')))
    info = describe_checkpoint(need_shared(*parts))
    assert info['origin'].startswith(origin)
    assert info['compound_coef'] == 0 and info['num_classes'] == 90 and info['training'] is None
    assert info['parameters'] == counts['efficientdet-d0']['trainable']
    text = format_report(info)
    assert 'efficientdet-d0 (-c 0)' in text and 'num_classes:    90' in text and 'no (weights only)' in text


def test_inspect_cli_subprocess(tmp_path):
    path = str(tmp_path / 'last.ckpt')
    atomic_save({'model': _zylo_sd(), 'ema': None, 'optimizer': {}, 'epoch': 7, 'step': 70}, path)
    r = subprocess.run([sys.executable, '-m', 'efficientdet.convert', 'inspect', path], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'origin:         this project (full training checkpoint)' in r.stdout
    assert 'variant:        efficientdet-d0 (-c 0)' in r.stdout
    assert 'parameters:     3,880,067' in r.stdout and 'epoch 7, step 70' in r.stdout


def test_inspect_d6_d7_candidates_and_yet_another_origin():
    ck = read_checkpoint(_yet_another(6))
    assert ck.candidates == [6, 7]
    assert _origin(ck).startswith('Yet-Another-EfficientDet-Pytorch (holds 64 BiFPN fusion weights, 152 values')
