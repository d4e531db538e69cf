"""The backbone seam: EfficientDetBackbone on any module that gives P3-P5 with known channels.

- a plain PyTorch backbone: build, forward, a training step, save and reload, --grad_checkpoint;
- ``--backbone timm:NAME`` end to end through train.py, with a stand-in ``timm`` module (timm's
  ``create_model(name, features_only=True, out_indices=…)`` contract: a module with ``feature_info``
  and a list of feature maps), because timm cannot be imported on every machine (it needs a
  torchvision built for the installed torch): the weights record the backbone, and coco_eval.py,
  efficientdet_test.py and export load them without the option; --freeze, --grad_checkpoint and
  --backbone_weights work, --drop_connect refuses in one line.
The real timm is not exercised by the suite: it needs a torchvision built for the installed torch,
which the package index of the test machines does not offer for this CPU torch (timm 0.5-1.0 all
import torchvision at start-up).
The EfficientNet backbones are unchanged: tests/test_parity.py, test_lite.py, test_model.py.
"""
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_project
from efficientdet.errors import UserError, run_cli
from efficientdet.model import EfficientDetBackbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyBackbone(nn.Module):
    """Five stride-2 stages; P3-P5 are stages 3-5 (strides 8, 16, 32)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([_stage(3, 8), _stage(8, 12), _stage(12, 16), _stage(16, 24), _stage(24, 32)])
        self.out_channels = (16, 24, 32)

    def forward(self, x):
        feats = []
        for i, s in enumerate(self.stages):
            x = s(x)
            if i >= 2:
                feats.append(x)
        return feats

    def checkpoint_modules(self):
        return list(self.stages)


def _batch(size=128):
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, size, size, generator=g)
    ann = torch.full((2, 2, 5), -1.0)
    ann[0, 0] = torch.tensor([10., 20., 60., 90., 1.]) * torch.tensor([size / 128] * 4 + [1.])
    ann[1, :2] = torch.tensor([[30., 30., 100., 110., 0.], [5., 5., 40., 40., 2.]]) * torch.tensor([size / 128] * 4 + [1.])
    return imgs, ann


def test_any_module_with_p3_to_p5_is_a_backbone():
    from efficientdet.loss import DetectionLoss
    from efficientdet.training import Trainer, build_optimizer
    from efficientdet.training.memory import enable_grad_checkpoint
    torch.manual_seed(0)
    model = EfficientDetBackbone(num_classes=3, compound_coef=0, backbone=TinyBackbone())
    plain = EfficientDetBackbone(num_classes=3, compound_coef=0)
    x, ann = _batch(64)
    feats, reg, cls, anchors = model.eval()(x)
    _, reg0, cls0, anchors0 = plain.eval()(x)
    assert len(feats) == 5 and reg.shape == reg0.shape and cls.shape == cls0.shape and torch.equal(anchors, anchors0)
    assert model.bifpn[0].p5_down_channel[0].conv.in_channels == 32  # the BiFPN reads the backbone's channels
    # a training step moves the backbone's weights
    model.train()
    before = model.backbone_net.stages[0][0].weight.detach().clone()
    t = Trainer(model, DetectionLoss(), build_optimizer(model, 'sgd', 0.05))
    r = t.train_step(x, ann)
    assert not r['skipped'] and not torch.equal(before, model.backbone_net.stages[0][0].weight)
    # save and reload
    twin = EfficientDetBackbone(num_classes=3, compound_coef=0, backbone=TinyBackbone())
    twin.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.eval()(x)[1:3], twin.eval()(x)[1:3]))
    # --grad_checkpoint: the backbone's own modules and the BiFPN cells, same gradients
    grads = []
    for m in (twin, _checkpointed(twin)):
        m.train()
        m.zero_grad()
        torch.manual_seed(1)
        _, rg, cl, an = m(x, return_logits=True)
        DetectionLoss()(cl, rg, an, ann)['loss'].backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k, g in grads[0].items():
        assert torch.allclose(grads[1][k], g, rtol=1e-5, atol=1e-6 * g.abs().max().item() + 1e-12), k
    assert enable_grad_checkpoint(EfficientDetBackbone(num_classes=3, compound_coef=0, backbone=TinyBackbone())) == 8

    class NoList(nn.Module):
        out_channels = (16, 24, 32)

        def forward(self, x):
            return TinyBackbone()(x)
    with pytest.raises(UserError, match='checkpoint_modules'):
        enable_grad_checkpoint(EfficientDetBackbone(num_classes=3, compound_coef=0, backbone=NoList()))
    with pytest.raises(ValueError, match='three feature maps'):
        EfficientDetBackbone(num_classes=3, compound_coef=0, backbone=nn.Identity())


def _checkpointed(model):
    import copy
    from efficientdet.training.memory import enable_grad_checkpoint
    m = copy.deepcopy(model)
    enable_grad_checkpoint(m)
    return m


# ----------------------------------------------------------------------------- timm:NAME
FAKE_TIMM = '''
"""A stand-in for timm's create_model(features_only=True) contract (tests only)."""
import torch
from torch import nn

__version__ = 'stand-in'


class FeatureInfo:
    def __init__(self, channels, reductions):
        self._c, self._r = list(channels), list(reductions)

    def channels(self):
        return list(self._c)

    def reduction(self):
        return list(self._r)


def _stage(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyFeatures(nn.ModuleDict):
    CHANNELS = (8, 12, 16, 24, 32)

    def __init__(self, out_indices):
        super().__init__()
        cin = 3
        for i, c in enumerate(self.CHANNELS[:max(out_indices) + 1]):
            self[f'layer{i}'] = _stage(cin, c)
            cin = c
        self.out_indices = tuple(out_indices)
        self.feature_info = FeatureInfo([self.CHANNELS[i] for i in out_indices], [2 ** (i + 1) for i in out_indices])

    def forward(self, x):
        out = []
        for i, m in enumerate(self.values()):
            x = m(x)
            if i in self.out_indices:
                out.append(x)
        return out


def create_model(name, pretrained=False, features_only=False, out_indices=(0, 1, 2, 3, 4), pretrained_cfg_overlay=None,
                 **kwargs):
    if name != 'tinynet' or not features_only:
        raise RuntimeError(f'Unknown model ({name})')
    net = TinyFeatures(out_indices)
    if pretrained:
        path = (pretrained_cfg_overlay or {}).get('file')
        if path is None:
            raise RuntimeError('no network: cannot download pretrained weights')
        state = torch.load(path, weights_only=True)
        net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()})
    return net
'''


@pytest.fixture
def fake_timm(tmp_path, monkeypatch):
    import importlib.util
    path = tmp_path / 'fake_timm.py'
    path.write_text(textwrap.dedent(FAKE_TIMM))
    spec = importlib.util.spec_from_file_location('timm', str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, 'timm', mod)  # restored (or removed) after the test
    yield mod


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return Path(make_tiny_project(tmp_path_factory.mktemp('seam'), n_train=4))


def _train(root, out, *extra):
    import train
    argv = ['-p', 'tiny', '--projects_dir', str(root / 'projects'), '--data_path', str(root / 'data'), '-c', '0',
            '--image_size', '128', '--batch_size', '2', '-n', '0', '--num_epochs', '1', '--saved_path', str(out),
            '--log_path', str(out / 'logs'), '--save_interval', '0', '--lr', '0.01', '--bn_images', '2', *extra]
    assert train.main(argv) == 0
    return out / 'tiny'


def test_timm_backbone_trains_and_its_weights_load_without_the_option(fake_timm, tiny, tmp_path, capsys):
    from efficientdet.backbones import TimmBackbone, spec_of_state_dict
    from efficientdet.factory import build_model
    torch.manual_seed(0)
    out = _train(tiny, tmp_path / 'o', '--backbone', 'timm:tinynet', '--no_map', '--grad_checkpoint')
    said = capsys.readouterr().out
    assert '--grad_checkpoint: 8 modules' in said  # the 5 stages of the timm body + 3 BiFPN cells
    state = torch.load(str(out / 'last.ckpt'), weights_only=True)
    assert spec_of_state_dict(state['model']) == 'timm:tinynet' and state['meta']['backbone'] == 'timm:tinynet'
    assert TimmBackbone('tinynet').body.feature_info.reduction() == [8, 16, 32]  # out_indices of strides 8-32
    best = out / 'best.pth'
    model = build_model(0, project=str(tiny / 'projects' / 'tiny.yml'), weights=str(best), image_size=128)
    assert isinstance(model.backbone_net, TimmBackbone) and model.backbone_net.name == 'tinynet'
    sd = torch.load(str(best), weights_only=True)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match='its backbone is timm:tinynet, not efficientnet'):
        build_model(0, project=str(tiny / 'projects' / 'tiny.yml'), weights=str(best), backbone='efficientnet')
    # resuming with another --backbone: the same one-line refusal (exit 2), not a shape mismatch
    import train
    argv = ['-p', 'tiny', '--projects_dir', str(tiny / 'projects'), '--data_path', str(tiny / 'data'), '-c', '0',
            '--image_size', '128', '--batch_size', '2', '-n', '0', '--num_epochs', '2', '--saved_path',
            str(tmp_path / 'o'), '--log_path', str(tmp_path / 'o' / 'logs'), '-w', 'last', '--backbone', 'efficientnet']
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train.main(argv))
    assert e.value.code == 2 and 'its backbone is timm:tinynet, not efficientnet' in capsys.readouterr().err

    # the scripts take the weights without --backbone
    import coco_eval
    import efficientdet_test
    common = ['-p', 'tiny', '--projects_dir', str(tiny / 'projects'), '-c', '0', '--image_size', '128', '-w', str(best)]
    assert coco_eval.main(common + ['--data_path', str(tiny / 'data'), '--no_progress', '--output_dir',
                                    str(tmp_path / 'res'), '--device', 'cpu']) == 0
    assert 'Average Precision' in capsys.readouterr().out
    img = sorted((tiny / 'data' / 'tiny' / 'val').glob('*.jpg'))[0]
    assert efficientdet_test.main(common + [str(img), '--output', str(tmp_path / 'det'), '--device', 'cpu']) == 0
    from efficientdet.export import main as export_main
    # (no check against the eager model: 4 training images give BN statistics so degenerate that the
    # outputs reach ~1e7, beyond any float32 tolerance, with the EfficientNet backbone as well)
    assert export_main(['torchscript', *common, '-o', str(tmp_path / 'm.pt'), '--no_verify']) == 0
    assert 'wrote' in capsys.readouterr().out and (tmp_path / 'm.pt').is_file()


def test_timm_backbone_options(fake_timm, tiny, tmp_path):
    from efficientdet.backbones import TimmBackbone
    torch.manual_seed(5)
    src = TimmBackbone('tinynet')
    torch.save(src.body.state_dict(), str(tmp_path / 'tinynet.pth'))
    out = _train(tiny, tmp_path / 'o', '--backbone', 'timm:tinynet', '--no_map', '--max_steps', '1',
                 '--backbone_weights', str(tmp_path / 'tinynet.pth'), '--freeze', 'backbone_net', '--freeze_bn')
    model = torch.load(str(out / 'last.ckpt'), weights_only=True)['model']
    body = {k[len('backbone_net.body.'):]: v for k, v in model.items() if k.startswith('backbone_net.body.')}
    assert body.keys() == src.body.state_dict().keys()
    assert all(torch.equal(v, src.body.state_dict()[k]) for k, v in body.items())  # loaded, then frozen
    with pytest.raises(UserError, match='--drop_connect is the stochastic depth of the EfficientNet backbones'):
        _train(tiny, tmp_path / 'd', '--backbone', 'timm:tinynet', '--no_map', '--drop_connect', '0.2')
    with pytest.raises(UserError, match=r'--backbone timm:nosuchnet: timm cannot build it'):
        _train(tiny, tmp_path / 'e', '--backbone', 'timm:nosuchnet', '--no_map')
    with pytest.raises(UserError, match="--backbone 'resnet18': use efficientnet"):
        _train(tiny, tmp_path / 'f', '--backbone', 'resnet18', '--no_map')
    with pytest.raises(UserError, match='--backbone_weights imagenet: timm could not load'):
        _train(tiny, tmp_path / 'g', '--backbone', 'timm:tinynet', '--no_map', '--backbone_weights', 'imagenet')


def test_missing_timm_is_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm -> ImportError
    with pytest.raises(UserError, match='pip install timm'):
        _train(tiny, tmp_path / 'o', '--backbone', 'timm:resnet18', '--no_map')
