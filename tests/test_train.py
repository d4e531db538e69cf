"""Training (efficientdet.training) and train.py: optimizer groups, schedule, EMA and BN statistics,
non-finite / AMP-skipped steps, sampler, RNG state, freezing, gradient accumulation and checkpointing,
ImageNet backbones, hooks, exact resume, weights-only checkpoints, SIGTERM."""
import copy
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_project
from efficientdet.checkpoint import atomic_save
from efficientdet.engine import (EpochSampler, ModelEMA, Trainer, WarmupCosine, build_optimizer, build_scheduler,
                                 freeze_for_head_only, param_groups, rng_state, set_rng_state, set_train_mode)
from efficientdet.training import Hook
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

@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    return Path(make_tiny_project(tmp_path_factory.mktemp('tiny'), n_train=6))


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
    with pytest.raises(UserError, match='too elongated'):
        train.main(['-p', 'tiny', '--projects_dir', str(tiny_data / 'projects'), '--data_path',
                    str(tiny_data / 'data'), '--image_size', '64', '512'])


def test_sigterm_saves_last_ckpt_and_exits_non_zero(tiny_data, tmp_path):
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
    assert proc.returncode == 128 + signal.SIGTERM, text  # saved, but the run did not complete
    assert 'SIGTERM' in text and 'last.ckpt' in text and 'Traceback' not in text
    state = torch.load(str(tmp_path / 'tiny' / 'last.ckpt'), weights_only=True)
    assert state['step'] >= 1


# ----------------------------------------------------------------------------- gradient accumulation
def _four_images(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    imgs = torch.randn(4, 3, 128, 128, generator=g).to(dtype)
    ann = torch.full((4, 3, 5), -1.0)
    ann[0, :2] = torch.tensor([[10., 20., 60., 90., 1.], [70., 10., 120., 50., 2.]])
    ann[1, 0] = torch.tensor([30., 30., 100., 110., 0.])
    ann[2, :3] = torch.tensor([[5., 5., 40., 40., 0.], [50., 60., 80., 70., 2.], [0., 64., 64., 128., 1.]])
    return imgs, ann  # image 3: no boxes


def _grads_after_step(model, batches, **kw):
    m = copy.deepcopy(model)
    opt = build_optimizer(m, 'sgd', 1e-3)
    t = Trainer(m, DetectionLoss(), opt, clip_grad_norm=None, max_nonfinite=1, accumulate=len(batches), **kw)
    r = t.train_step_batches(batches)
    return r, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, m


def test_accumulation_gradients_equal_one_big_batch(d0):
    """Three uneven micro-batches (2 + 1 + 1 images, one without boxes) give the gradients of the
    4-image batch: the normaliser counts the positives of the whole step. float64, BN in eval."""
    model = copy.deepcopy(d0).double().eval()
    imgs, ann = _four_images(torch.float64)
    r1, g1, m1 = _grads_after_step(model, [(imgs, ann)])
    micro = [(imgs[:2], ann[:2]), (imgs[2:3], ann[2:3]), (imgs[3:], ann[3:])]
    r2, g2, m2 = _grads_after_step(model, micro)
    assert r1['num_pos'] == r2['num_pos'] > 0
    assert r2['loss'] == pytest.approx(r1['loss'], rel=1e-9)
    assert g1.keys() == g2.keys() and len(g1) == len(list(d0.parameters()))
    for k in g1:
        assert torch.allclose(g2[k], g1[k], rtol=1e-6, atol=1e-6 * g1[k].abs().max().item() + 1e-12), k
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), k
    # sensitivity: normalising each micro-batch by its own positives gives another loss
    crit = DetectionLoss()
    naive = 0.0
    for x, a in micro:
        _, reg, cls, anc = model(x, return_logits=True)
        naive += float(crit(cls, reg, anc, a)['loss'].detach())
    assert abs(naive - r1['loss']) > 1e-2 * r1['loss']


def test_accumulate_needs_a_criterion_that_counts_positives(d0):
    t = Trainer(copy.deepcopy(d0).eval(), _NaNLoss(), build_optimizer(d0, 'sgd', 0.1), accumulate=2)
    with pytest.raises(ValueError, match='count_positives'):
        t.train_step_batches([_batch(1), _batch(1)])
    with pytest.raises(UserError, match='--accumulate'):
        Trainer(d0, DetectionLoss(), build_optimizer(d0, 'sgd', 0.1), accumulate=0)


# ----------------------------------------------------------------------------- gradient checkpointing
def test_grad_checkpoint_same_gradients_and_bn_statistics():
    """Train mode with drop-connect on: checkpointed blocks and cells replay the random state and
    do not update the BN statistics twice; gradients equal to 1e-6 of their scale."""
    from efficientdet.training.memory import checkpointed_modules, disable_grad_checkpoint, enable_grad_checkpoint
    torch.manual_seed(1)
    model = EfficientDetBackbone(num_classes=3, compound_coef=0)
    for block in model.backbone_net.model._blocks:  # B0 trains without stochastic depth; switch it on
        block.drop_rate = 0.3
    imgs, ann = _four_images()
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    n = enable_grad_checkpoint(ckpt)
    assert n == len(checkpointed_modules(ckpt)) == len(ckpt.backbone_net.model._blocks) + len(ckpt.bifpn)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    grads, stats = [], []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(7)
        _, reg, cls, anc = m(imgs[:2], return_logits=True)
        DetectionLoss()(cls, reg, anc, ann[:2])['loss'].backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
        stats.append({k: v for k, v in m.state_dict().items() if 'running' in k or 'num_batches' in k})
    for k, g in grads[0].items():
        assert torch.allclose(grads[1][k], g, rtol=1e-5, atol=1e-6 * g.abs().max().item() + 1e-12), k
    assert all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])  # one BN update, not two
    # the checkpointed copy keeps its behaviour through deepcopy and can be undone
    twin = copy.deepcopy(ckpt)
    assert type(twin.bifpn[0]) is type(ckpt.bifpn[0]) and type(ckpt.bifpn[0]) is not type(plain.bifpn[0])
    disable_grad_checkpoint(twin)
    assert type(twin.bifpn[0]) is type(plain.bifpn[0])


@pytest.mark.slow
def test_grad_checkpoint_lowers_peak_memory():
    """Peak RSS of one D0 256 px training step at batch 2, fresh process each (tools/bench_train.py)."""
    cmd = [sys.executable, os.path.join(ROOT, 'tools', 'bench_train.py'), '--memory_table', '0', '--image_size',
           '256', '--batch_size', '2', '--threads', '1']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-2000:]
    import re
    plain, ckpt = (float(v) for v in re.search(r'([0-9.]+) MiB -> +([0-9.]+) MiB', out.stdout).groups())
    assert ckpt < 0.85 * plain, out.stdout


# ----------------------------------------------------------------------------- freezing
def test_freeze_regex_and_freeze_bn_keep_parameters_bit_identical(d0):
    from efficientdet.training import freeze_parameters, frozen_modules
    model = copy.deepcopy(d0)
    names = freeze_parameters(model, r'(backbone_net|bifpn\.0\.)')
    assert names and all(n.startswith(('backbone_net.', 'bifpn.0.')) for n in names)
    assert frozen_modules(model)[:2] == ['backbone_net', 'bifpn.0']
    set_train_mode(model, freeze_bn=True)
    assert not model.backbone_net.training and not model.bifpn[0].training and model.bifpn[1].training
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    opt = build_optimizer(model, 'adamw', 1e-2)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters())) - len(names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, DetectionLoss(), opt, ema=ModelEMA(model), freeze_bn=True)
    for s in range(2):
        assert not trainer.train_step(*_batch(2, seed=s))['skipped']
    after = model.state_dict()
    frozen = set(names)
    stats = [k for k in after if 'running_' in k or 'num_batches' in k]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in stats)  # --freeze_bn: statistics fixed everywhere
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith('bifpn.1.'))


def test_freeze_user_errors(d0):
    from efficientdet.training import freeze_parameters
    with pytest.raises(UserError, match='matches no parameter.*backbone_net'):
        freeze_parameters(copy.deepcopy(d0), 'efficientnet')
    with pytest.raises(UserError, match='not a valid regular expression'):
        freeze_parameters(copy.deepcopy(d0), '(unclosed')
    everything = copy.deepcopy(d0)
    freeze_parameters(everything, '.')
    with pytest.raises(UserError, match='no trainable parameters'):
        build_optimizer(everything, 'sgd', 0.1)


# ----------------------------------------------------------------------------- GPU-path bugs on the CPU
class _Elsewhere(torch.Tensor):
    """A tensor that behaves like one on a CUDA device: no .numpy() / .tolist() until moved to the CPU."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")
        out = super().__torch_function__(func, types, args, kwargs)
        to_cpu = func is torch.Tensor.cpu or (func is torch.Tensor.to and 'cpu' in str(args[1:]) + str(kwargs))
        return out.as_subclass(torch.Tensor) if to_cpu and isinstance(out, torch.Tensor) else out


def test_rng_state_restored_from_tensors_on_another_device_and_dtype():
    """-w last on a GPU loaded the RNG state with map_location=cuda; restoring must not need CPU tensors."""
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    state = rng_state()
    moved = copy.deepcopy(state)
    moved['python']['state'] = moved['python']['state'].to(torch.float64).as_subclass(_Elsewhere)
    moved['numpy']['keys'] = moved['numpy']['keys'].to(torch.float64).as_subclass(_Elsewhere)
    moved['torch'] = moved['torch'].as_subclass(_Elsewhere)
    with pytest.raises(TypeError, match='cuda'):
        moved['numpy']['keys'].numpy()  # what the earlier restore did
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(moved)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class _InfGradLoss(DetectionLoss):
    """The detection loss plus a term whose value is 0 and whose gradient is NaN (an fp16 overflow
    in the backward, as the GradScaler sees it)."""

    def forward(self, cls_logits, regression, anchors, annotations, normalizer=None):
        out = super().forward(cls_logits, regression, anchors, annotations, normalizer=normalizer)
        out['loss'] = out['loss'] + torch.sqrt((cls_logits.float().sum() * 0.0).abs())
        return out


def test_amp_skipped_steps_do_not_advance_ema_or_schedule_and_are_counted(d0):
    def trainer(criterion, max_nonfinite=2):
        model = copy.deepcopy(d0).eval()
        opt = build_optimizer(model, 'sgd', 0.05)
        t = Trainer(model, criterion, opt, build_scheduler(opt, 10, 2), ModelEMA(model), max_nonfinite=max_nonfinite)
        # the AMP path of the step with a real GradScaler; the forward stays float32 (CPU bfloat16
        # autocast is slow and plays no part in what is tested)
        t.amp, t.scaler = True, torch.amp.GradScaler('cpu', init_scale=1024.0)
        t._forward = lambda images: model(images, return_logits=True)[1:]
        return t, model
    t, model = trainer(_InfGradLoss())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr0 = t.optimizer.param_groups[0]['lr']
    r = t.train_step(*_batch(1))
    assert r['skipped'] and not math.isfinite(r['grad_norm'])
    assert t.ema.updates == 0 and t.scheduler.last_epoch == 0 and t.optimizer.param_groups[0]['lr'] == lr0
    assert t.nonfinite_in_row == 1 and t.nonfinite_total == 1 and t.step == 1
    assert t.scaler.get_scale() == 512.0  # lowered at the skipped step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match='2 steps in a row'):
        t.train_step(*_batch(1))  # persistent overflow is reported
    # control: the same trainer with a finite loss updates, and the EMA and schedule move
    t, model = trainer(DetectionLoss())
    r = t.train_step(*_batch(1))
    assert not r['skipped'] and t.ema.updates == 1 and t.scheduler.last_epoch == 1 and t.nonfinite_in_row == 0


# ----------------------------------------------------------------------------- EMA and BN statistics
def test_recompute_bn_gives_the_statistics_of_the_weights():
    from efficientdet.training import recompute_bn
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2, momentum=0.01))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(9.0)
    batches = [torch.randn(4, 3, 8, 8) + i for i in range(3)]
    assert recompute_bn(net, batches) == 3
    assert not net.training and net[4].momentum == 0.01
    with torch.no_grad():
        h = torch.cat([net[0](x) for x in batches])
    assert torch.allclose(net[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([net[0](x).var((0, 2, 3), unbiased=True) for x in batches]).mean(0).detach()
    assert torch.allclose(net[1].running_var, per_batch_var, rtol=1e-4)
    # only the named layers are re-estimated
    net[4].running_mean.fill_(3.0)
    recompute_bn(net, batches, names={'1'})
    assert torch.all(net[4].running_mean == 3.0)


class _Counter(Hook):
    name = 'counter'

    def __init__(self):
        self.updates = 0

    def on_update(self, trainer, result):
        self.updates += 1

    def state_dict(self):
        return {'updates': self.updates}

    def load_state_dict(self, state):
        self.updates = int(state['updates'])


def test_validation_keeps_the_better_of_raw_and_ema_and_hooks_resume(d0, tmp_path):
    from efficientdet.training import BestCheckpointHook, EarlyStoppingHook, ValidationHook
    scores = iter([(0.5, 0.6), (0.55, 0.4), (0.3, 0.2), (0.1, 0.1)])
    raw_sd = {'w': torch.zeros(1)}
    ema_sd = {'w': torch.ones(1)}

    def candidates():
        raw, ema = next(scores)
        return {'raw': {'metrics': {'loss': 1.0, 'cls_loss': 1.0, 'box_loss': 0.0, 'AP': raw}, 'state_dict': raw_sd},
                'ema': {'metrics': {'loss': 1.0, 'cls_loss': 1.0, 'box_loss': 0.0, 'AP': ema}, 'state_dict': ema_sd}}
    logs = []

    def make():
        model = torch.nn.Linear(1, 1)
        return Trainer(model, DetectionLoss(), torch.optim.SGD(model.parameters(), lr=0.1), hooks=[
            _Counter(), ValidationHook(candidates, 'map', log=logs.append),
            BestCheckpointHook(str(tmp_path), 'd0', 'map', log=logs.append),
            EarlyStoppingHook(1, 'map', log=logs.append)])
    t = make()
    t.call('on_epoch_end', 0, True)
    best = t.hook('best')
    assert best.source == 'ema' and best.value == 0.6
    assert torch.equal(torch.load(str(tmp_path / 'best.pth'), weights_only=True)['w'], ema_sd['w'])
    t.call('on_epoch_end', 1, True)  # raw 0.55 < 0.6: no new best
    assert best.epoch == 0 and t.stop_reason is None
    t.hook('counter').updates = 5
    state = t.state_dict()
    assert state['hooks']['best'] == {'value': 0.6, 'epoch': 0, 'source': 'ema'}
    t2 = make()
    t2.load_state_dict(state, restore_rng=False)
    assert t2.hook('counter').updates == 5 and t2.hook('best').value == 0.6 and t2.hook('early_stopping').epoch == 0
    t2.call('on_epoch_end', 2, True)  # 2 validations without improvement, patience 1
    assert t2.stop_reason == 'early_stop'
    assert any('<- better' in s and ' ema:' in s for s in logs)
    t2.call('on_epoch_end', 3, False)  # an unfinished epoch is not validated
    assert next(scores) == (0.1, 0.1)


# ----------------------------------------------------------------------------- ImageNet backbones
def _timm_backbone_file(model, path, extra_head=True):
    """Our backbone's weights in timm's tf_efficientnet layout (plus a classification head)."""
    from efficientdet.ckpt.layouts.effdet import map_backbone_keys as _map_backbone
    names = {}
    _map_backbone(names, model)
    sd = model.state_dict()
    timm = {theirs[len('backbone.'):]: sd[ours].clone() for ours, theirs in names.items()}
    if extra_head:
        timm.update({'conv_head.weight': torch.randn(1280, 320, 1, 1), 'bn2.weight': torch.ones(1280),
                     'classifier.weight': torch.randn(1000, 1280), 'classifier.bias': torch.zeros(1000)})
    torch.save(timm, str(path))
    return sd


def test_backbone_weights_timm_layout_loads_the_backbone_only(tmp_path):
    from efficientdet.convert.backbone import load_backbone_weights
    torch.manual_seed(2)
    src = _timm_backbone_file(EfficientDetBackbone(num_classes=3, compound_coef=0), tmp_path / 'b0.pth')
    torch.manual_seed(3)
    dst = EfficientDetBackbone(num_classes=5, compound_coef=0)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    msg = load_backbone_weights(dst, str(tmp_path / 'b0.pth'))
    assert 'efficientnet-b0' in msg and '4 tensors of the file not used' in msg
    after = dst.state_dict()
    assert all(torch.equal(after[k], src[k]) for k in after if k.startswith('backbone_net.'))
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith('backbone_net.'))
    with pytest.raises(UserError, match=r'holds efficientnet-b0.*-c 0 \(D0\)'):
        load_backbone_weights(EfficientDetBackbone(num_classes=3, compound_coef=2), str(tmp_path / 'b0.pth'))
    bad = torch.load(str(tmp_path / 'b0.pth'), weights_only=True)
    del bad['blocks.1.0.conv_dw.weight']
    torch.save(bad, str(tmp_path / 'broken.pth'))
    with pytest.raises(UserError, match='1 backbone tensors are missing'):
        load_backbone_weights(EfficientDetBackbone(num_classes=3, compound_coef=0), str(tmp_path / 'broken.pth'))
    torch.save({'foo.weight': torch.zeros(1)}, str(tmp_path / 'other.pth'))
    with pytest.raises(UserError, match='not an EfficientNet'):
        load_backbone_weights(dst, str(tmp_path / 'other.pth'))


def test_backbone_weights_official_tf_variables(tmp_path):
    from conftest import load_npz
    from efficientdet.convert.backbone import load_backbone_weights
    from efficientdet.convert.tf import tf_to_state_dict
    tf = load_npz('fixtures', 'tf_d0', 'tf_weights.npz')
    np.savez(str(tmp_path / 'efficientnet-b0.npz'), **{k: v for k, v in tf.items() if k.startswith('efficientnet-b0/')})
    model = EfficientDetBackbone(num_classes=3, compound_coef=0)
    head = model.classifier.header.pointwise_conv.conv.weight.clone()
    load_backbone_weights(model, str(tmp_path / 'efficientnet-b0.npz'))
    full = tf_to_state_dict({k: v.astype(np.float32) for k, v in tf.items()}, 0)
    own = model.state_dict()
    keys = [k for k in own if k.startswith('backbone_net.')]
    assert keys and all(torch.equal(own[k], full[k].to(own[k].dtype)) for k in keys)
    assert torch.equal(model.classifier.header.pointwise_conv.conv.weight, head)
    with pytest.raises(UserError, match=r'-c 0 \(D0\)'):
        load_backbone_weights(EfficientDetBackbone(num_classes=3, compound_coef=1),
                              str(tmp_path / 'efficientnet-b0.npz'))


# ----------------------------------------------------------------------------- train.py with the new options
def test_train_py_accumulate_checkpoint_freeze_and_backbone(tiny_data, tmp_path):
    """--backbone_weights + --freeze backbone_net + --freeze_bn + --accumulate 2 + --grad_checkpoint:
    the run trains, and the backbone in last.ckpt is bit-identical to the file (weights and BN statistics)."""
    torch.manual_seed(9)
    src = _timm_backbone_file(EfficientDetBackbone(num_classes=3, compound_coef=0), tmp_path / 'b0.pth')
    out = _run_train(tiny_data, tmp_path / 'o', '--max_steps', '2', '--backbone_weights', str(tmp_path / 'b0.pth'),
                     '--freeze', 'backbone_net', '--freeze_bn', '--accumulate', '2', '--grad_checkpoint',
                     '-c', 'd0', '--image_size', '128', '192', '--compat', 'zylo117')
    state = torch.load(str(out / 'last.ckpt'), weights_only=True)
    assert state['step'] == 2 and state['accumulate'] == 2 and state['epoch_step'] == 2
    assert state['meta']['image_size'] == [128, 192] and state['meta']['variant'] == 'd0'
    assert state['meta']['args']['compat'] == 'zylo117'
    model = state['model']
    bb = [k for k in model if k.startswith('backbone_net.')]
    assert bb and all(torch.equal(model[k], src[k]) for k in bb)
    first = EfficientDetBackbone(num_classes=3, compound_coef=0)
    assert not torch.equal(model['classifier.header.pointwise_conv.conv.weight'],
                           first.classifier.header.pointwise_conv.conv.weight)


def test_scale_range_from_the_project_or_the_command_line(tiny_data, tmp_path):
    """Training scale jitter: the project's ``scale_range`` (default official 0.1-2.0), replaced by
    ``--scale_range MIN MAX``; validation data is never jittered; a bad range is a UserError."""
    import train
    from efficientdet.project import load_project
    from efficientdet.training.config import config_from_args, resolve_recipe
    from efficientdet.training.run import build_data
    project = load_project('tiny', str(tiny_data / 'projects'))
    base = ['-p', 'tiny', '--projects_dir', str(tiny_data / 'projects'), '--data_path', str(tiny_data / 'data'),
            '-n', '0', '-c', '0']

    def data(extra):
        recipe, cfg = resolve_recipe(config_from_args(train.get_args(base + extra)))
        return build_data(cfg, recipe, project, (128, 128), 0, 1, 2)
    for extra, expect in (([], (0.1, 2.0)), (['--scale_range', '1', '1'], (1.0, 1.0)),
                          (['--scale_range', '0.5', '1.5'], (0.5, 1.5))):
        d = data(extra)
        assert d.train_ds.transform.scale_range == expect and not d.val_ds.transform.augment
    with pytest.raises(UserError, match=r'--scale_range must be two numbers \[min, max\] with 0 < min <= max'):
        data(['--scale_range', '2', '1'])


def test_drop_connect_rate_schedule_and_bad_value(tiny_data, tmp_path):
    """--drop_connect sets the official linear stochastic-depth schedule on the backbone blocks;
    an out-of-range value is a UserError naming the option."""
    import train
    m = EfficientDetBackbone(num_classes=3, compound_coef=0)
    blocks = m.backbone_net.model._blocks
    assert all(b.drop_rate == 0.0 for b in blocks)  # official D0: none
    m.backbone_net.model.set_drop_connect_rate(0.2)
    assert [b.drop_rate for b in blocks] == pytest.approx([0.2 * i / len(blocks) for i in range(len(blocks))])
    with pytest.raises(UserError, match=r'--drop_connect: drop connect rate must be in \[0, 1\)'):
        _run_train(tiny_data, tmp_path / 'o', '--max_steps', '1', '--drop_connect', '1.5')
