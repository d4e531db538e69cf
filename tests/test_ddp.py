"""DistributedDataParallel on CPU (gloo): 2 processes with half of a global batch each take the same
training step as one process with the whole batch (same loss, gradients and updated weights).

BN runs in eval mode (SyncBatchNorm has no CPU kernel) and drop-connect is therefore off, so the
comparison is exact up to float32 summation order. The two halves hold different numbers of boxes:
the loss normaliser must be the global positive count for the results to agree.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = ('classifier.header.pointwise_conv.conv.weight', 'regressor.header.pointwise_conv.conv.bias',
         'bifpn.0.conv6_up.pointwise_conv.conv.weight', 'backbone_net.model._conv_stem.conv.weight',
         'bifpn.0.p6_w1')


def _global_batch():
    g = torch.Generator().manual_seed(11)
    imgs = torch.randn(4, 3, 128, 128, generator=g)
    ann = torch.full((4, 3, 5), -1.0)
    ann[0, :3] = torch.tensor([[10., 20., 60., 90., 1.], [70., 10., 120., 50., 2.], [5., 5., 40., 40., 0.]])
    ann[1, :2] = torch.tensor([[30., 30., 100., 110., 0.], [0., 0., 128., 128., -2.]])
    ann[2, 0] = torch.tensor([50., 60., 80., 70., 2.])
    return imgs, ann  # image 3: no boxes


def _setup(seed=0):
    from efficientdet.engine import Trainer, build_optimizer
    from efficientdet.loss import DetectionLoss
    from efficientdet.model import EfficientDetBackbone
    torch.manual_seed(seed)
    model = EfficientDetBackbone(num_classes=3, compound_coef=0)
    model.eval()  # BN statistics fixed, no drop-connect: processes see identical networks
    return model, build_optimizer(model, 'sgd', 0.05), DetectionLoss, Trainer


def _worker(rank, world, init_file, out_file, accumulate=1):
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        model, opt, DetectionLoss, Trainer = _setup()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        trainer = Trainer(model, DetectionLoss(distributed=True), opt, ddp_model=ddp, max_nonfinite=1,
                          accumulate=accumulate)
        imgs, ann = _global_batch()
        per = imgs.shape[0] // world
        mine = imgs[rank * per:(rank + 1) * per], ann[rank * per:(rank + 1) * per]
        micro = per // accumulate  # --accumulate: micro-batches without gradient sync but the last
        r = trainer.train_step_batches([(mine[0][i:i + micro], mine[1][i:i + micro]) for i in range(0, per, micro)])
        if rank == 0:
            params = dict(model.named_parameters())
            torch.save({'result': r, 'grads': {k: params[k].grad.clone() for k in CHECK},
                        'weights': {k: params[k].detach().clone() for k in CHECK}}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('accumulate', [1, 2])
def test_two_gloo_processes_equal_one_process(tmp_path, accumulate):
    """accumulate=2: each process takes its 2 images as 2 micro-batches of 1; still the one-process step."""
    out_file = str(tmp_path / 'rank0.pt')
    mp.spawn(_worker, args=(2, str(tmp_path / 'init'), out_file, accumulate), nprocs=2, join=True)
    ddp = torch.load(out_file, weights_only=True)

    model, opt, DetectionLoss, Trainer = _setup()
    trainer = Trainer(model, DetectionLoss(), opt, max_nonfinite=1)
    r = trainer.train_step(*_global_batch())
    params = dict(model.named_parameters())
    assert ddp['result']['num_pos'] == r['num_pos'] > 0
    assert ddp['result']['loss'] == pytest.approx(r['loss'], rel=1e-5)
    assert ddp['result']['cls_loss'] == pytest.approx(r['cls_loss'], rel=1e-5)
    assert ddp['result']['box_loss'] == pytest.approx(r['box_loss'], rel=1e-5)
    assert ddp['result']['grad_norm'] == pytest.approx(r['grad_norm'], rel=1e-4)
    for k in CHECK:
        g = params[k].grad
        assert torch.allclose(ddp['grads'][k], g, rtol=1e-4, atol=1e-7 + 1e-4 * g.abs().max().item()), k
        assert torch.allclose(ddp['weights'][k], params[k].detach(), rtol=1e-5, atol=1e-7), k
    # the halves alone would normalise differently: make sure the check is sensitive to that
    _, _, DL, _ = _setup()
    model2, _, _, _ = _setup()
    imgs, ann = _global_batch()
    _, reg, cls, anc = model2(imgs[:2], return_logits=True)
    half = DL()(cls, reg, anc, ann[:2])['loss'].item()
    assert abs(half - r['loss']) > 1e-3 * abs(r['loss'])


@pytest.mark.slow
def test_torchrun_train_py_two_cpu_processes(tmp_path):
    """train.py under torchrun (2 CPU processes, gloo, DistributedSampler-style sharding) trains,
    validates on rank 0 and writes one set of checkpoints."""
    import subprocess
    from efficientdet.data import shapes
    shapes.generate_split(str(tmp_path / 'data' / 'tiny'), 'train', 8, 128, seed=0)
    shapes.generate_split(str(tmp_path / 'data' / 'tiny'), 'val', 2, 128, seed=0)
    (tmp_path / 'projects').mkdir()
    (tmp_path / 'projects' / 'tiny.yml').write_text(
        "project_name: tiny\ntrain_set: train\nval_set: val\nobj_list: ['rectangle', 'circle', 'triangle']\n")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', os.path.join(ROOT, 'train.py'),
           '-p', 'tiny', '--projects_dir', str(tmp_path / 'projects'), '--data_path', str(tmp_path / 'data'),
           '-c', '0', '--image_size', '128', '--batch_size', '4', '-n', '0', '--num_epochs', '2',
           '--saved_path', str(tmp_path / 'out'), '--log_path', str(tmp_path / 'logs'), '--max_steps', '3']
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '(2 x 1 x 2)' in proc.stdout and proc.stdout.count('val epoch 0 raw') == 1  # rank 0 only
    state = torch.load(str(tmp_path / 'out' / 'tiny' / 'last.ckpt'), weights_only=True)
    assert state['step'] == 3 and state['epoch'] == 1


@pytest.mark.slow
def test_torchrun_resume_is_exact(tmp_path):
    """2 CPU processes: 2 steps, stop, -w last, 2 more steps == 4 straight steps (every process's RNG
    state is saved in last.ckpt and restored on resume with the same process count)."""
    import subprocess
    from efficientdet.data import shapes
    shapes.generate_split(str(tmp_path / 'data' / 'tiny'), 'train', 12, 128, seed=1)
    shapes.generate_split(str(tmp_path / 'data' / 'tiny'), 'val', 2, 128, seed=1)
    (tmp_path / 'projects').mkdir()
    (tmp_path / 'projects' / 'tiny.yml').write_text(
        "project_name: tiny\ntrain_set: train\nval_set: val\nobj_list: ['rectangle', 'circle', 'triangle']\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')

    def run(out, steps, *extra):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', os.path.join(ROOT, 'train.py'),
               '-p', 'tiny', '--projects_dir', str(tmp_path / 'projects'), '--data_path', str(tmp_path / 'data'),
               '-c', '0', '--image_size', '128', '--batch_size', '4', '-n', '0', '--num_epochs', '2', '--no_map',
               '--saved_path', str(tmp_path / out), '--log_path', str(tmp_path / 'logs'), '--max_steps', str(steps),
               '--save_interval', '0', '--warmup_epochs', '0.5', '--lr', '0.02', '--seed', '3', *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return torch.load(str(tmp_path / out / 'tiny' / 'last.ckpt'), weights_only=True)
    straight = run('a', 4)
    first = run('b', 2)
    assert len(first['rng_per_rank']) == 2 and first['epoch_step'] == 2
    resumed = run('b', 4, '-w', 'last')
    assert straight['step'] == resumed['step'] == 4 and straight['epoch'] == resumed['epoch'] == 1
    for k, v in straight['model'].items():
        assert torch.equal(v, resumed['model'][k]), k
    for k, v in straight['ema']['model'].items():
        assert torch.equal(v, resumed['ema']['model'][k]), k
