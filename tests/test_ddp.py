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


# ----------------------------------------------------------------------------- distributed validation
def _coco_tiny_project(folder):
    """A project for ../shared/data/coco_tiny: the official 90-slot COCO label map."""
    import yaml
    from conftest import need_shared
    need_shared('data', 'coco_tiny')
    with open(os.path.join(ROOT, 'projects', 'coco.yml')) as f:
        y = yaml.safe_load(f)
    y.update(project_name='coco_tiny', train_set='train2017', val_set='val2017')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'coco_tiny.yml'), 'w') as f:
        yaml.safe_dump(y, f)


class _Stamped(torch.utils.data.Dataset):
    """A validation dataset whose image tensors carry their index in pixel (0, 0, 0), so that the
    oracle below knows which image it sees whatever process and batch it lands in."""

    def __init__(self, ds):
        self.ds = ds
        for k in ('coco', 'cat_ids', 'obj_list', 'image_size', 'mean', 'std'):
            setattr(self, k, getattr(ds, k))

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item['img'] = item['img'].clone()
        item['img'][0, 0, 0] = float(i)
        return item


class _Oracle(torch.nn.Module):
    """A detector of the model contract whose output depends only on the image: its ground-truth boxes
    jittered by a few pixels, with scores and false positives drawn from a generator seeded by the
    image index (a mAP well between 0 and 1, sensitive to any image lost or counted twice)."""

    def __init__(self, ds, n, num_classes):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        boxes, owner, labels, scores = [], [], [], []
        for i in range(n):
            g = torch.Generator().manual_seed(i)
            s = float(ds[i]['scale'])
            b, lab = ds.ds.annotations(i)
            b = torch.as_tensor(b, dtype=torch.float32) * s
            keep = torch.as_tensor(lab) >= 0
            b, lab = b[keep], torch.as_tensor(lab)[keep].long()
            b = b + torch.randn(b.shape, generator=g) * 1.0
            fp = torch.rand(3, 4, generator=g) * 100
            fp = torch.cat([fp[:, :2], fp[:, :2] + 5 + fp[:, 2:] * 0.3], 1)
            b = torch.cat([b, fp])
            lab = torch.cat([lab, torch.randint(0, num_classes, (3,), generator=g)])
            sc = torch.cat([0.3 + 0.6 * torch.rand(len(b) - 3, generator=g), 0.05 + 0.45 * torch.rand(3, generator=g)])
            boxes.append(b[:, [1, 0, 3, 2]])  # yxyx
            owner += [i] * len(b)
            labels.append(lab)
            scores.append(sc)
        anchors = torch.cat(boxes)
        cls = torch.zeros(n, len(anchors), num_classes)
        cls[torch.tensor(owner), torch.arange(len(anchors)), torch.cat(labels)] = torch.cat(scores)
        self.register_buffer('anchors', anchors[None])
        self.register_buffer('cls', cls)
        self.num_classes = num_classes

    def forward(self, x):
        idx = x[:, 0, 0, 0].round().long()
        return None, torch.zeros(x.shape[0], self.anchors.shape[1], 4), self.cls[idx], self.anchors


def _oracle_eval(projects, n):
    from efficientdet.data import build_dataset
    from efficientdet.evaluation import run_coco_eval
    from efficientdet.project import load_project
    project = load_project('coco_tiny', projects)
    ds = _Stamped(build_dataset(project, project.val_set, 128, os.path.join(ROOT, '..', 'shared', 'data')))
    oracle = _Oracle(ds, n, len(ds.obj_list))
    return run_coco_eval(oracle, ds, batch_size=3, max_images=n, progress=False, nms_threshold=0.5)


def _eval_worker(rank, world, init_file, out_dir, projects, n):
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        import json
        metrics, results = _oracle_eval(projects, n)
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:  # floats round-trip exactly in JSON
            json.dump({'stats': metrics['stats'], 'per_class': metrics['per_class'], 'n': metrics['num_images'],
                       'dets': metrics['num_detections'], 'results': results}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_coco_eval_equals_one_process(tmp_path):
    """2 gloo processes, each detecting its shard of 12 coco_tiny images through the one Detector path,
    the results lists gathered, one COCO evaluation: every figure equals one process's."""
    import json
    projects = str(tmp_path / 'projects')
    _coco_tiny_project(projects)
    n = 12
    mp.spawn(_eval_worker, args=(2, str(tmp_path / 'init'), str(tmp_path), projects, n), nprocs=2, join=True)
    one, results = _oracle_eval(projects, n)
    assert 0.2 < one['AP'] < 0.95 and one['num_images'] == n  # a real comparison, not 0 == 0
    key = lambda r: (r['image_id'], r['category_id'], r['score'], tuple(r['bbox']))  # noqa: E731
    for rank in (0, 1):
        got = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert got['stats'] == one['stats'] and got['per_class'] == one['per_class'], rank
        assert (got['n'], got['dets']) == (n, one['num_detections'])
        assert sorted(got['results'], key=key) == sorted(json.loads(json.dumps(results)), key=key)


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_within_seconds(tmp_path):
    """2 gloo processes under torchrun, rank 1 raises at step 2: both end (non-zero) soon after, and
    last.ckpt is the step-1 one (--save_interval 1); nothing was written after the failure."""
    import subprocess
    import time
    from efficientdet.data import shapes
    shapes.generate_split(str(tmp_path / 'data' / 'tiny'), 'train', 8, 128, seed=0)
    shapes.generate_split(str(tmp_path / 'data' / 'tiny'), 'val', 2, 128, seed=0)
    (tmp_path / 'projects').mkdir()
    (tmp_path / 'projects' / 'tiny.yml').write_text(
        "project_name: tiny\ntrain_set: train\nval_set: val\nobj_list: ['rectangle', 'circle', 'triangle']\n")
    driver = tmp_path / 'driver.py'
    driver.write_text(f'''
import sys, time
sys.path.insert(0, {ROOT!r})
import torch.distributed as dist
from efficientdet.training import Hook, TrainConfig, run_training

class FailOnRank1(Hook):
    name = 'fail'
    def on_step_end(self, trainer, result):
        if trainer.step == 2 and dist.get_rank() == 1:
            open({str(tmp_path / 'failed_at')!r}, 'w').write(str(time.time()))
            raise RuntimeError('rank 1 fails at step 2')

run_training(TrainConfig(project='tiny', projects_dir={str(tmp_path / 'projects')!r},
                         data_path={str(tmp_path / 'data')!r}, compound_coef=0, image_size=128, batch_size=4,
                         num_workers=0, num_epochs=2, saved_path={str(tmp_path / 'out')!r},
                         log_path={str(tmp_path / 'logs')!r}, save_interval=1, no_map=True, bn_images=2),
             hooks=[FailOnRank1()])
''')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', str(driver)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    ended = time.time()
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'rank 1 fails at step 2' in proc.stderr
    failed = float((tmp_path / 'failed_at').read_text())
    assert ended - failed < 60, ended - failed
    print(f"every rank ended {ended - failed:.1f} s after the failure")
    state = torch.load(str(tmp_path / 'out' / 'tiny' / 'last.ckpt'), weights_only=True)
    assert state['step'] == 1


def _shapes_for_the_shipped_model(tmp_path):
    from efficientdet.data.shapes import generate_split
    generate_split(str(tmp_path / 'data' / 'shape'), 'train', 4, 256, seed=11)
    generate_split(str(tmp_path / 'data' / 'shape'), 'val', 6, 256, seed=11)


@pytest.mark.slow
def test_torchrun_validation_and_coco_eval_equal_one_process(tmp_path):
    """The shipped shapes model fine-tuned one step (lr 1e-6) by train.py under torchrun (2 CPU
    processes): the mAP its distributed validation logs equals coco_eval.py on best.pth, and
    coco_eval.py under torchrun prints the same figures and writes the same results as one process."""
    import json
    import re
    import subprocess
    weights = os.path.join(ROOT, 'weights', 'efficientdet-d0-shape.pth')
    if not os.path.isfile(weights):
        pytest.skip('the shipped shapes model is absent')
    _shapes_for_the_shipped_model(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    run = lambda args, **kw: subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,  # noqa: E731
                                            timeout=600, **kw)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2']
    out = tmp_path / 'out'
    train = run(torchrun + ['train.py', '-p', 'shape', '-c', '0', '--image_size', '256', '--batch_size', '4', '-n', '0',
                            '--num_epochs', '1', '--max_steps', '1', '--lr', '1e-6', '--data_path', str(tmp_path / 'data'),
                            '-w', weights, '--saved_path', str(out), '--log_path', str(out / 'logs')])
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    found = re.findall(r'val epoch 0 (raw|ema): .*mAP (\d\.\d+)', train.stdout)
    assert len(found) == 2, train.stdout[-3000:]  # logged once (rank 0), for both candidates
    maps = {k: float(v) for k, v in found}
    common = ['coco_eval.py', '-p', 'shape', '-c', '0', '-w', str(out / 'shape' / 'best.pth'), '--data_path',
              str(tmp_path / 'data'), '--image_size', '256', '--no_progress', '--device', 'cpu']
    one = run([sys.executable] + common + ['--output_dir', str(tmp_path / 'one')])
    assert one.returncode == 0, one.stderr[-2000:]
    ap = float(re.search(r'IoU=0\.50:0\.95 \| area=   all \| maxDets=100 \] = (\d\.\d+)', one.stdout).group(1))
    assert ap > 0.3 and min(abs(ap - v) for v in maps.values()) <= 6e-4, (ap, maps)  # printed to 3 / 4 decimals
    two = run(torchrun + common + ['--output_dir', str(tmp_path / 'two')])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    summary = lambda text: [ln for ln in text.splitlines() if 'Average' in ln or ln.startswith(('BBox', '|'))]  # noqa
    assert summary(two.stdout) == summary(one.stdout) and summary(one.stdout)
    assert two.stdout.count('Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all') == 1  # rank 0 alone prints
    key = lambda r: (r['image_id'], r['category_id'], r['score'], tuple(r['bbox']))  # noqa: E731
    res = [sorted(json.loads((tmp_path / d / 'shape_val_bbox_results.json').read_text()), key=key)
           for d in ('one', 'two')]
    assert res[0] == res[1] and res[0]


def _broadcast_worker(rank, world, init_file, out_file):
    sys.path.insert(0, ROOT)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        from efficientdet.distributed import broadcast_tensors
        g = torch.Generator().manual_seed(rank)
        tensors = [torch.randn(3, 4, generator=g), torch.tensor(rank + 5), torch.randn(2, 3, 4, 5, generator=g)
                   .contiguous(memory_format=torch.channels_last), torch.randint(0, 9, (7,), generator=g),
                   torch.randn(6, generator=g).double()]
        broadcast_tensors(tensors, 0)
        torch.save(tensors, f'{out_file}.{rank}')
    finally:
        dist.destroy_process_group()


def test_broadcast_tensors_gives_every_rank_rank_0s_values(tmp_path):
    """Mixed dtypes, a 0-d tensor and a channels_last one, grouped into one broadcast per dtype."""
    out = str(tmp_path / 'b')
    mp.spawn(_broadcast_worker, args=(2, str(tmp_path / 'init'), out), nprocs=2, join=True)
    a, b = torch.load(f'{out}.0', weights_only=True), torch.load(f'{out}.1', weights_only=True)
    g = torch.Generator().manual_seed(0)
    want = [torch.randn(3, 4, generator=g), torch.tensor(5), torch.randn(2, 3, 4, 5, generator=g),
            torch.randint(0, 9, (7,), generator=g), torch.randn(6, generator=g).double()]
    for x, y, w in zip(a, b, want):
        assert torch.equal(x, w) and torch.equal(y, w) and y.dtype == w.dtype and y.shape == w.shape
    assert b[2].is_contiguous(memory_format=torch.channels_last)
