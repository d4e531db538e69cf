"""Training engine and train.py: optimizer groups, schedule, EMA, non-finite handling, sampler,
RNG state, head-only freezing, exact resume, weights-only checkpoints, SIGTERM."""
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from efficientdet.checkpoint import atomic_save
from efficientdet.engine import (EpochSampler, ModelEMA, Trainer, WarmupCosine, build_optimizer, build_scheduler,
                                 freeze_for_head_only, param_groups, rng_state, set_rng_state, set_train_mode)
from efficientdet.errors import UserError
from efficientdet.loss import DetectionLoss
from efficientdet.model import EfficientDetBackbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def d0():
    torch.manual_seed(0)
    return EfficientDetBackbone(num_classes=3, compound_coef=0)


def _batch(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, size, size, generator=g)
    ann = torch.full((n, 3, 5), -1.0)
    ann[:, 0] = torch.tensor([10., 20., 60., 90., 1.])
    ann[0, 1] = torch.tensor([70., 10., 120., 50., 2.])
    return imgs, ann


# ----------------------------------------------------------------------------- optimizer / schedule
def test_no_weight_decay_on_bn_bias_and_fusion_weights(d0):
    groups = param_groups(d0, 4e-5)
    decay = {id(p) for p in groups[0]['params']}
    names = {id(p): n for n, p in d0.named_parameters()}
    assert groups[0]['weight_decay'] == 4e-5 and groups[1]['weight_decay'] == 0.0
    for n, p in d0.named_parameters():
        is_decayed = id(p) in decay
        if n.endswith('.bias') or '.bn' in n or '_bn' in n or n.split('.')[-1].startswith('p') and '_w' in n:
            assert not is_decayed, n
    fusion = [n for n in names.values() if n.endswith(('p3_w1', 'p4_w2', 'p7_w2'))]
    assert fusion and all(id(dict(d0.named_parameters())[n]) not in decay for n in fusion)
    assert any(n.endswith('conv.weight') for i, n in names.items() if i in decay)
    assert len(decay) + len(groups[1]['params']) == len(list(d0.parameters()))
    opt = build_optimizer(d0, 'sgd', 0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]['momentum'] == 0.9
    assert not opt.param_groups[0]['nesterov']
    assert isinstance(build_optimizer(d0, 'adamw', 1e-3), torch.optim.AdamW)
    with pytest.raises(UserError):
        build_optimizer(d0, 'rmsprop', 0.1)


def test_warmup_cosine_schedule():
    f = WarmupCosine(total_steps=110, warmup_steps=10, warmup_init=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-12) and f(200) == pytest.approx(0.0, abs=1e-12)
    lrs = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after the warm-up
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.08)
    sched = build_scheduler(opt, 110, 10)
    seen = []
    for _ in range(11):
        seen.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.008) and seen[10] == pytest.approx(0.08)
    sd = sched.state_dict()
    assert sd['lr_lambdas'][0]['total_steps'] == 110  # settings travel with the state


def test_resume_keeps_this_runs_schedule_and_restores_the_step():
    """A resume with a longer run (--num_epochs raised) gets the new total and warm-up steps and the
    saved position, at the level that restores the scheduler (no patching after the load)."""
    def trainer(total, warmup):
        m = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return Trainer(m, torch.nn.Module(), opt, build_scheduler(opt, total, warmup))
    a = trainer(20, 4)
    for _ in range(6):
        a.optimizer.step()
        a.scheduler.step()
    a.step = 6
    b = trainer(40, 8)
    b.load_state_dict(a.state_dict(), restore_rng=False)
    fn = b.scheduler.lr_lambdas[0]
    assert (fn.total_steps, fn.warmup_steps) == (40, 8) and b.scheduler.last_epoch == 6 and b.step == 6
    assert b.optimizer.param_groups[0]['lr'] == pytest.approx(0.1 * fn(6))


# ----------------------------------------------------------------------------- EMA
def test_ema_ramp_and_update():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(m, decay=0.9998)
    w0 = ema.module[0].weight.clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
        m[1].num_batches_tracked.fill_(7)
    ema.update(m)
    d = 2.0 / 11.0  # min(0.9998, (1 + 1) / (10 + 1)) after the first update
    assert torch.allclose(ema.module[0].weight, d * w0 + (1 - d) * m[0].weight)
    assert ema.module[1].num_batches_tracked.item() == 7  # integer buffers copied
    ema.updates = 10 ** 6
    assert ema.current_decay() == 0.9998
    assert not any(p.requires_grad for p in ema.module.parameters())


# ----------------------------------------------------------------------------- train step
class _NaNLoss(torch.nn.Module):
    def forward(self, cls, reg, anchors, ann):
        bad = (cls.sum() + reg.sum()) * float('nan')
        return {'loss': bad, 'cls_loss': bad, 'box_loss': bad, 'num_pos': torch.tensor(0.)}


def test_nonfinite_steps_are_skipped_then_user_error(d0):
    model = EfficientDetBackbone(num_classes=3, compound_coef=0)
    model.load_state_dict(d0.state_dict())
    model.eval()
    opt = build_optimizer(model, 'sgd', 0.01)
    trainer = Trainer(model, _NaNLoss(), opt, max_nonfinite=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imgs, ann = _batch(1)
    r = trainer.train_step(imgs, ann)
    assert r['skipped'] and trainer.nonfinite_in_row == 1 and trainer.step == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match='--lr'):
        trainer.train_step(imgs, ann)


def test_train_step_updates_and_head_only_freezes(d0):
    model = EfficientDetBackbone(num_classes=3, compound_coef=0)
    model.load_state_dict(d0.state_dict())
    freeze_for_head_only(model)
    set_train_mode(model, head_only=True)
    assert not model.backbone_net.training and not model.bifpn.training and model.classifier.training
    opt = build_optimizer(model, 'sgd', 0.05)
    ema = ModelEMA(model)
    trainer = Trainer(model, DetectionLoss(), opt, build_scheduler(opt, 10, 2), ema, head_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = trainer.train_step(*_batch(2))
    assert not r['skipped'] and r['num_pos'] > 0 and math.isfinite(r['loss']) and r['grad_norm'] > 0
    after = model.state_dict()
    frozen = [k for k in after if k.startswith(('backbone_net.', 'bifpn.'))]
    heads = [k for k in after if k.startswith(('classifier.', 'regressor.')) and k.endswith('weight')]
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BN statistics
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    assert trainer.step == 1 and ema.updates == 1
    assert opt.param_groups[0]['lr'] == pytest.approx(0.05 * (0.1 + 0.9 * 0.5))  # warm-up step 1 of 2


# ----------------------------------------------------------------------------- sampler / RNG
def test_epoch_sampler_resume_and_shards():
    full = list(EpochSampler(10, seed=3))
    s = EpochSampler(10, seed=3)
    s.set_epoch(0, skip=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(1)
    assert list(s) != full and sorted(s) == list(range(10))
    shards = [list(EpochSampler(10, seed=3, rank=r, world=3)) for r in range(3)]
    assert all(len(x) == 4 for x in shards) and set(sum(shards, [])) == set(range(10))


def test_rng_state_roundtrip_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian around
    state = rng_state()
    path = str(tmp_path / 'rng.pt')
    atomic_save(state, path)
    a = (random.random(), np.random.randn(), torch.rand(3))
    set_rng_state(torch.load(path, weights_only=True))
    b = (random.random(), np.random.randn(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------- train.py end to end
PROJECT_YML = """project_name: tiny
train_set: train
val_set: val
num_gpus: 1
obj_list: ['rectangle', 'circle', 'triangle']
"""


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    from efficientdet.data import shapes
    root = tmp_path_factory.mktemp('tiny')
    shapes.generate_split(str(root / 'data' / 'tiny'), 'train', 6, 128, seed=0)
    shapes.generate_split(str(root / 'data' / 'tiny'), 'val', 2, 128, seed=0)
    (root / 'projects').mkdir()
    (root / 'projects' / 'tiny.yml').write_text(PROJECT_YML)
    return root


def _run_train(root, out, *extra):
    import train
    argv = ['-p', 'tiny', '--projects_dir', str(root / 'projects'), '--data_path', str(root / 'data'),
            '-c', '0', '--image_size', '128', '--batch_size', '2', '-n', '0', '--num_epochs', '3',
            '--saved_path', str(out), '--log_path', str(out / 'logs'), '--seed', '7', '--lr', '0.02',
            '--save_interval', '0', '--warmup_epochs', '0.5', '--no_map', *extra]
    assert train.main(argv) == 0
    return out / 'tiny'


def test_resume_is_exact(tiny_data, tmp_path):
    # 6 images, batch 2: 3 steps per epoch. 2 steps + save + resume + 2 steps (crossing the epoch end
    # with its validation) == 4 straight steps. Both start by fine-tuning from a 90-class D0 (-w).
    torch.manual_seed(123)
    pretrained = EfficientDetBackbone(num_classes=90, compound_coef=0).state_dict()
    torch.save(pretrained, str(tmp_path / 'coco_d0.pth'))
    straight = _run_train(tiny_data, tmp_path / 'a', '--max_steps', '4', '-w', str(tmp_path / 'coco_d0.pth'))
    part = _run_train(tiny_data, tmp_path / 'b', '--max_steps', '2', '-w', str(tmp_path / 'coco_d0.pth'))
    first = torch.load(str(part / 'last.ckpt'), weights_only=True)  # plain tensors/containers only
    assert first['step'] == 2 and first['epoch'] == 0 and first['epoch_step'] == 2
    resumed = _run_train(tiny_data, tmp_path / 'b', '--max_steps', '4', '-w', 'last')
    a = torch.load(str(straight / 'last.ckpt'), weights_only=True)
    b = torch.load(str(resumed / 'last.ckpt'), weights_only=True)
    assert a['step'] == b['step'] == 4 and a['epoch'] == b['epoch'] == 1 and a['epoch_step'] == 1
    for key in ('model', ):
        for k, v in a[key].items():
            assert torch.allclose(v.float(), b[key][k].float(), atol=1e-6), k
    for k, v in a['ema']['model'].items():
        assert torch.allclose(v.float(), b['ema']['model'][k].float(), atol=1e-6), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(
        torch.allclose(sa[i]['momentum_buffer'], sb[i]['momentum_buffer'], atol=1e-6) for i in sa)
    assert a['scheduler']['last_epoch'] == b['scheduler']['last_epoch'] == 4
    # and the models did train
    assert not torch.equal(first['model']['classifier.header.pointwise_conv.conv.weight'],
                           a['model']['classifier.header.pointwise_conv.conv.weight'])
    # the .pth weights are the plain EMA state_dict, loadable by EfficientDetBackbone
    pth = sorted(p for p in os.listdir(straight) if p.startswith('efficientdet-d0_'))
    assert pth, os.listdir(straight)
    sd = torch.load(str(straight / pth[-1]), weights_only=True)
    EfficientDetBackbone(num_classes=3, compound_coef=0).load_state_dict(sd)
    assert torch.equal(sd['classifier.header.pointwise_conv.conv.weight'],
                       a['ema']['model']['classifier.header.pointwise_conv.conv.weight'])
    assert (straight / 'best.pth').is_file()  # validated after epoch 0
    # fine-tuning loaded every fitting tensor: the stem is still close to the pretrained one
    stem = 'backbone_net.model._conv_stem.conv.weight'
    fresh = EfficientDetBackbone(num_classes=3, compound_coef=0).state_dict()[stem]
    assert (a['model'][stem] - pretrained[stem]).abs().mean() < 0.2 * (fresh - pretrained[stem]).abs().mean()


def test_resume_without_last_is_a_user_error(tiny_data, tmp_path):
    import train
    with pytest.raises(UserError, match='last.ckpt'):
        train.main(['-p', 'tiny', '--projects_dir', str(tiny_data / 'projects'), '--data_path',
                    str(tiny_data / 'data'), '--image_size', '128', '--batch_size', '2', '-n', '0',
                    '--saved_path', str(tmp_path), '--log_path', str(tmp_path), '-w', 'last'])
    with pytest.raises(UserError, match='multiple of 128'):
        train.main(['-p', 'tiny', '--projects_dir', str(tiny_data / 'projects'), '--data_path',
                    str(tiny_data / 'data'), '--image_size', '200'])


def test_sigterm_saves_last_ckpt_and_exits_cleanly(tiny_data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '-p', 'tiny', '--projects_dir',
           str(tiny_data / 'projects'), '--data_path', str(tiny_data / 'data'), '-c', '0', '--image_size', '128',
           '--batch_size', '2', '-n', '0', '--num_epochs', '1000', '--saved_path', str(tmp_path),
           '--log_path', str(tmp_path / 'logs'), '--no_map', '--save_interval', '0']
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.time() + 60
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('[info] D0'):
            break
        assert time.time() < deadline, ''.join(lines)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    text = ''.join(lines) + out
    assert proc.returncode == 0, text
    assert 'SIGTERM' in text and 'last.ckpt' in text
    state = torch.load(str(tmp_path / 'tiny' / 'last.ckpt'), weights_only=True)
    assert state['step'] >= 1
