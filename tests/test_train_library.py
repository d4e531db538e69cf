"""Training as a library: TrainConfig is train.py's command line, run_training from Python with user
hooks (the docs' CSV example), the hook lifecycle on every exit path, Ctrl+C at the step it
arrives in, exact resume with data-loader workers and a --save_interval save, the resume errors
(exit 2, one line), and the run-to-run rules (second run over last.ckpt, --max_steps 0,
schedule change on resume, '<- better' on equal values)."""
import argparse
import copy
import csv
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_project
from efficientdet.errors import UserError, run_cli
from efficientdet.training import Hook, TrainConfig, run_training
from efficientdet.training.config import build_parser, config_from_args, option_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- the configuration
def _actions():
    return [a for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)]


def test_every_train_py_option_is_a_train_config_field_with_the_same_default():
    import train
    fields = option_fields()
    dests = {}
    for a in _actions():
        if a.default is argparse.SUPPRESS:  # aliases such as --cuda write another option's dest
            continue
        dests[a.dest] = a.default
    assert set(dests) == set(fields), (set(dests) ^ set(fields))
    cfg = TrainConfig()
    # the parser's defaults are the fields' (built from them); these must stay what they are, on both sides
    kept = {'project': None, 'compound_coef': None, 'batch_size': None, 'num_epochs': None, 'lr': None,
            'optim': 'sgd', 'num_workers': 2, 'val_interval': 1, 'save_interval': 500, 'es_patience': 0,
            'ema_decay': 0.9998, 'head_only': False, 'seed': 42, 'data_path': 'datasets/', 'saved_path': 'logs/',
            'log_path': 'logs/', 'recipe': 'default', 'weights': None}
    assert {k: getattr(cfg, k) for k in kept} == kept
    assert {k: dests[k] for k in kept} == kept
    # parsing nothing gives the default configuration, through train.py's own parser
    assert config_from_args(train.get_args([])) == cfg
    # and the shared options are the ones of efficientdet.cli (one name, one help everywhere)
    from efficientdet.cli import OPTIONS
    by_dest = {a.dest: a for a in _actions()}
    for name, f in fields.items():
        if f.metadata.get('shared'):
            assert by_dest[name].help == OPTIONS[name].help and tuple(by_dest[name].option_strings) == \
                OPTIONS[name].flags, name


def test_every_train_py_option_has_a_help_text():
    import train
    for a in _actions():
        assert a.help and a.help != argparse.SUPPRESS and len(a.help) > 10, a.option_strings
    text = build_parser().format_help()
    for flag in ('--optim', '--num_epochs', '--log_path', '--saved_path', '--seed', '--momentum', '--ema_decay',
                 '--label_smoothing', '--recipe', '--backbone', '--examples_per_epoch'):
        block = text[text.index(flag):]
        assert re.search(r'\S', block[len(flag):].split('\n  -')[0]), flag
    assert train.get_args(['--recipe', 'official', '--backbone', 'timm:resnet18']).recipe == 'official'


def test_options_become_the_config_fields():
    import train
    cfg = config_from_args(train.get_args(['-p', 'coco', '-c', '2', '--image_size', '384', '640', '-w', 'x.pth',
                                           '--batch_size', '8', '--scale_range', '0.5', '1.5', '--no-ema',
                                           '--head_only', 'True', '--recipe', 'official']))
    assert (cfg.project, cfg.compound_coef, cfg.image_size, cfg.weights, cfg.batch_size) == ('coco', 2, (384, 640),
                                                                                             'x.pth', 8)
    assert cfg.scale_range == (0.5, 1.5) and cfg.ema is False and cfg.head_only is True and cfg.recipe == 'official'
    assert cfg.replace(weights='last').weights == 'last' and cfg.weights == 'x.pth'


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return Path(make_tiny_project(tmp_path_factory.mktemp('lib'), n_train=6))


def _cfg(root, out, **kw):
    base = dict(project='tiny', projects_dir=str(root / 'projects'), data_path=str(root / 'data'), compound_coef=0,
                image_size=128, batch_size=2, num_workers=0, num_epochs=2, saved_path=str(out),
                log_path=str(out / 'logs'), seed=7, lr=0.02, save_interval=0, warmup_epochs=0.5, no_map=True,
                bn_images=2)
    base.update(kw)
    return TrainConfig(**base)


class Recorder(Hook):
    """Records the events it sees (and raises / stops where told)."""
    name = 'recorder'

    def __init__(self, raise_at=None, stop_at=None, close_raises=False, signal_at=None):
        self.events, self.raise_at, self.stop_at, self.close_raises = [], raise_at, stop_at, close_raises
        self.signal_at = signal_at
        self.handler_during_fit = None

    def on_fit_start(self, trainer):
        self.events.append('fit_start')

    def on_step_end(self, trainer, result):
        self.events.append(f'step{trainer.step}')
        self.handler_during_fit = signal.getsignal(signal.SIGINT)
        if trainer.step == self.raise_at:
            raise RuntimeError('boom at step %d' % trainer.step)
        if trainer.step == self.stop_at:
            trainer.request_stop('paused')
        if trainer.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)

    def on_epoch_end(self, trainer, epoch, finished):
        self.events.append(f'epoch_end{epoch}')

    def on_fit_end(self, trainer):
        self.events.append('fit_end')

    def close(self, trainer):
        self.events.append('close')
        if self.close_raises:
            raise OSError('close failed')


class LateClose(Hook):
    name = 'late'

    def __init__(self):
        self.closed = False

    def close(self, trainer):
        self.closed = True


@pytest.mark.slow
def test_lifecycle_on_normal_end_requested_stop_and_exception(tiny, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    rec, late = Recorder(), LateClose()
    r = run_training(_cfg(tiny, tmp_path / 'a', max_steps=2), hooks=[rec, late], log=lambda *a, **k: None)
    assert (r.steps, r.stop_reason, r.exit_code) == (2, 'max_steps', 0)
    assert rec.events[-2:] == ['fit_end', 'close'] and late.closed
    assert rec.handler_during_fit is not handler and signal.getsignal(signal.SIGINT) is handler  # restored
    assert r.last_path == str(tmp_path / 'a' / 'tiny' / 'last.ckpt')
    assert torch.load(r.last_path, weights_only=True)['step'] == 2

    # a requested stop (what a notebook does): on_fit_end, last.ckpt, then the run continues with -w last
    rec = Recorder(stop_at=2)
    r = run_training(_cfg(tiny, tmp_path / 'b', num_epochs=1), hooks=[rec], log=lambda *a, **k: None)
    assert (r.steps, r.stop_reason) == (2, 'paused') and rec.events[-2:] == ['fit_end', 'close']
    assert torch.load(r.last_path, weights_only=True)['step'] == 2
    r = run_training(_cfg(tiny, tmp_path / 'b', num_epochs=1, weights='last'), log=lambda *a, **k: None)
    assert (r.steps, r.stop_reason, r.epoch) == (3, 'finished', 1)

    # an exception: no on_fit_end, no new checkpoint (the step-2 one of --save_interval stays), close on
    # every hook although one close raises, and the exception is the run's own
    rec, late = Recorder(raise_at=3, close_raises=True), LateClose()
    with pytest.raises(RuntimeError, match='boom at step 3'):
        run_training(_cfg(tiny, tmp_path / 'c', save_interval=2), hooks=[rec, late], log=lambda *a, **k: None)
    assert 'fit_end' not in rec.events and rec.events[-1] == 'close' and late.closed
    assert signal.getsignal(signal.SIGINT) is handler
    state = torch.load(str(tmp_path / 'c' / 'tiny' / 'last.ckpt'), weights_only=True)
    assert state['step'] == 2  # epoch 0 ends at step 3 after the failing hook: its save never happens
    assert not [p for p in os.listdir(tmp_path / 'c' / 'tiny') if p.endswith('_3.pth')]


def test_ctrl_c_stops_at_the_step_it_arrives_in(tiny, tmp_path):
    """The signal arrives during step 2 (its on_step_end): the run stops there, saves step 2, exits 130.
    Before: 'stopping after this step' and one more step (3)."""
    lines = []
    r = run_training(_cfg(tiny, tmp_path, num_epochs=3), hooks=[Recorder(signal_at=2)], log=lines.append)
    assert (r.steps, r.stop_reason, r.exit_code) == (2, 'signal', 130)
    assert torch.load(r.last_path, weights_only=True)['step'] == 2
    assert any('continue with: python train.py -p tiny -c 0 -w last' in str(s) for s in lines)


def test_a_stop_seen_before_the_last_backward_abandons_the_step():
    """Trainer level: a stop vote agreed at the sync point of a step leaves the weights and counters as
    they were (no update after the request)."""
    from efficientdet.loss import DetectionLoss
    from efficientdet.model import EfficientDetBackbone
    from efficientdet.training import Trainer, build_optimizer
    torch.manual_seed(0)
    model = EfficientDetBackbone(num_classes=3, compound_coef=0).eval()

    class Vote(Hook):
        name = 'vote'
        now = False

        def wants_stop(self, trainer):
            return self.now
    vote = Vote()
    t = Trainer(model, DetectionLoss(), build_optimizer(model, 'sgd', 0.01), hooks=[vote])
    imgs = torch.randn(1, 3, 128, 128)
    ann = torch.tensor([[[10., 20., 60., 90., 1.]]])
    assert not t.train_step(imgs, ann)['stop'] and t.step == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vote.now = True
    r = t.train_step(imgs, ann)
    assert r['stop'] and r['aborted'] and t.step == 1 and t.epoch_step == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_loader_shorter_than_an_epoch_is_an_error_naming_the_data():
    from efficientdet.training import Trainer
    model = torch.nn.Linear(1, 1)
    rec = Recorder()
    t = Trainer(model, torch.nn.Module(), torch.optim.SGD(model.parameters(), lr=0.1), hooks=[rec])
    with pytest.raises(UserError, match=r'my set ran out after 0 of the 5 steps of epoch 0'):
        t.fit([], num_epochs=3, steps_per_epoch=5, data_name='my set')  # before: looped forever
    assert rec.events == ['fit_start', 'close']


@pytest.mark.slow
def test_max_steps_zero_second_run_and_schedule_change(tiny, tmp_path):
    import train
    with pytest.raises(UserError, match='--max_steps 0 would train no step'):
        train.main(['-p', 'tiny', '--projects_dir', str(tiny / 'projects'), '--data_path', str(tiny / 'data'),
                    '--max_steps', '0', '--saved_path', str(tmp_path)])
    assert not (tmp_path / 'tiny').exists()
    run_training(_cfg(tiny, tmp_path, max_steps=2), log=lambda *a, **k: None)
    last = tmp_path / 'tiny' / 'last.ckpt'
    stamp = last.stat().st_mtime_ns
    # a second run into the same folder never replaces the first run's last.ckpt
    with pytest.raises(UserError, match=r'last\.ckpt holds the training state of an earlier run.*-w last'):
        run_training(_cfg(tiny, tmp_path, max_steps=2), log=lambda *a, **k: None)
    torch.save(torch.load(str(last), weights_only=True), str(tmp_path / 'other.ckpt'))
    with pytest.raises(UserError, match='earlier run'):  # resuming another state would replace it as well
        run_training(_cfg(tiny, tmp_path, max_steps=2, weights=str(tmp_path / 'other.ckpt')), log=print)
    with pytest.raises(UserError, match='no such training state'):
        run_training(_cfg(tiny, tmp_path / 'x', weights=str(tmp_path / 'missing.ckpt')), log=print)
    assert last.stat().st_mtime_ns == stamp
    # resuming with another --num_epochs says that the schedule changed, and how
    lines = []
    r = run_training(_cfg(tiny, tmp_path, max_steps=3, num_epochs=4, weights='last'), log=lines.append)
    assert r.steps == 3
    said = [s for s in lines if 'LR schedule changed on resume' in str(s)]
    assert len(said) == 1 and 'total steps 6 -> 12' in said[0], lines
    lines = []
    run_training(_cfg(tiny, tmp_path, max_steps=4, num_epochs=4, weights='last'), log=lines.append)
    assert not [s for s in lines if 'schedule changed' in str(s)]  # same schedule: no word
    # a resume already past --max_steps trains nothing and says so
    with pytest.raises(UserError, match='at step 4: --max_steps 4 leaves nothing to train'):
        run_training(_cfg(tiny, tmp_path, max_steps=4, num_epochs=4, weights='last'), log=print)


def test_better_is_not_claimed_for_equal_values():
    from efficientdet.training import ValidationHook, Trainer
    logs = []
    values = iter([(0.0, 0.0), (0.3, 0.2), (0.4, 0.4)])

    def candidates():
        raw, ema = next(values)
        m = {'loss': 1.0, 'cls_loss': 1.0, 'box_loss': 0.0}
        return {'raw': {'metrics': dict(m, AP=raw), 'state_dict': {}},
                'ema': {'metrics': dict(m, AP=ema), 'state_dict': {}}}
    model = torch.nn.Linear(1, 1)
    t = Trainer(model, torch.nn.Module(), torch.optim.SGD(model.parameters(), lr=0.1),
                hooks=[ValidationHook(candidates, 'map', log=logs.append)])
    for e in range(3):
        t.call('on_epoch_end', e, True)
    marked = [s for s in logs if '<- better' in s]
    assert marked == [s for s in logs if s.startswith('val epoch 1 raw')] and len(marked) == 1


# ----------------------------------------------------------------------------- the docs' example
def _doc_block(marker):
    text = open(os.path.join(ROOT, 'docs', 'training.md')).read()
    blocks = re.findall(r'```python\n(.*?)```', text, re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


def test_docs_csv_hook_example_runs(tiny, tmp_path, monkeypatch):
    """The CSV-logging hook of docs/training.md, as written there (imported as a module), added from Python."""
    import importlib.util
    (tmp_path / 'csv_log_example.py').write_text(_doc_block('class CsvLog'))
    spec = importlib.util.spec_from_file_location('csv_log_example', str(tmp_path / 'csv_log_example.py'))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    hook = example.CsvLog('metrics.csv')
    r = run_training(_cfg(tiny, tmp_path / 'out', num_epochs=2), hooks=[hook], log=lambda *a, **k: None)
    assert r.stop_reason == 'finished' and r.best_path and os.path.isfile(r.best_path)
    rows = list(csv.DictReader(open(tmp_path / 'metrics.csv')))
    assert [int(row['epoch']) for row in rows] == [0, 1] and [int(row['step']) for row in rows] == [3, 6]
    assert all(float(row['value']) > 0 and row['source'] in ('raw', 'ema') for row in rows)  # val loss


# ----------------------------------------------------------------------------- exact resume with workers
@pytest.mark.slow
def test_resume_with_workers_and_a_save_interval_save_is_exact(tiny, tmp_path):
    """-n 2: 6 straight steps == a run that crashed at step 5 (its last.ckpt: the --save_interval save at
    step 4, mid-epoch) resumed with -w last. The augmentation of every image is seeded by its place in
    the data order, not by the worker that loads it."""
    kw = dict(num_workers=2, num_epochs=2, scale_range=(0.5, 1.5), bn_images=0)
    straight = run_training(_cfg(tiny, tmp_path / 'a', **kw), log=lambda *a, **k: None)
    with pytest.raises(RuntimeError, match='boom'):
        run_training(_cfg(tiny, tmp_path / 'b', save_interval=2, **kw), hooks=[Recorder(raise_at=5)],
                     log=lambda *a, **k: None)
    saved = torch.load(str(tmp_path / 'b' / 'tiny' / 'last.ckpt'), weights_only=True)
    assert (saved['step'], saved['epoch'], saved['epoch_step']) == (4, 1, 1)
    assert (tmp_path / 'b' / 'tiny' / 'efficientdet-d0_0_2.pth').is_file()  # --save_interval weights
    assert (tmp_path / 'b' / 'tiny' / 'efficientdet-d0_1_4.pth').is_file()
    resumed = run_training(_cfg(tiny, tmp_path / 'b', weights='last', **kw), log=lambda *a, **k: None)
    assert straight.steps == resumed.steps == 6
    a = torch.load(straight.last_path, weights_only=True)
    b = torch.load(resumed.last_path, weights_only=True)
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k
    for k, v in a['ema']['model'].items():
        assert torch.equal(v, b['ema']['model'][k]), k


# ----------------------------------------------------------------------------- resume errors
def _cli(argv, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, [ln for ln in err if ln.startswith('error:')], err


@pytest.mark.slow
def test_every_resume_error_exits_2_with_one_line(tiny, tmp_path, capsys):
    run_training(_cfg(tiny, tmp_path / 'src', max_steps=1), log=lambda *a, **k: None)
    good = torch.load(str(tmp_path / 'src' / 'tiny' / 'last.ckpt'), weights_only=True)
    assert good['epoch_step'] == 1  # mid-epoch

    def argv(state, name, *extra):
        path = tmp_path / f'{name}.ckpt'
        torch.save(state, str(path))
        return ['-p', 'tiny', '--projects_dir', str(tiny / 'projects'), '--data_path', str(tiny / 'data'), '-c', '0',
                '--image_size', '128', '--batch_size', '2', '-n', '0', '--no_map', '--saved_path',
                str(tmp_path / name), '--log_path', str(tmp_path / 'logs'), '-w', str(path), *extra]
    bad_model = copy.deepcopy(good)
    bad_model['model']['classifier.header.pointwise_conv.conv.weight'] = torch.zeros(1)
    bad_opt = copy.deepcopy(good)
    bad_opt['optimizer']['param_groups'] = bad_opt['optimizer']['param_groups'][:1]
    newer = dict(good, version=99)
    cases = [
        (good['model'], 'plain', [], 'is not a training state written by train.py'),
        (bad_model, 'model', [], 'the saved model does not fit this one'),
        (bad_opt, 'optim', [], 'the optimizer state does not fit'),
        (good, 'accumulate', ['--accumulate', '2'], 'stopped mid-epoch with --accumulate 1; resume with --accumulate 1'),
        (newer, 'newer', [], 'training state version 99 is newer'),
    ]
    for state, name, extra, needle in cases:
        code, errors, err = _cli(argv(state, name, *extra), capsys)
        assert code == 2 and len(errors) == 1 and needle in errors[0], (name, err)
        assert not any('Traceback' in ln for ln in err)
    # an older (version 1) file still resumes: EMA, schedule and best value at the top level
    old = copy.deepcopy(good)
    hooks = old.pop('hooks')
    old.update(version=1, ema=hooks['ema'], scheduler=hooks['lr_schedule'], best_metric=None)
    old.pop('rng_per_rank')
    import train
    assert train.main(argv(old, 'v1', '--max_steps', '2', '--num_epochs', '2')) == 0
    assert torch.load(str(tmp_path / 'v1' / 'tiny' / 'last.ckpt'), weights_only=True)['step'] == 2


def test_a_training_set_smaller_than_one_step_is_refused(tiny, tmp_path):
    """6 images, batch 8 (or batch 4 with --accumulate 2 on them): one line naming the count, no run."""
    with pytest.raises(UserError, match='the training set has 6 images per epoch, fewer than one step of 8'):
        run_training(_cfg(tiny, tmp_path / 'a', batch_size=8), log=lambda *a, **k: None)
    with pytest.raises(UserError, match='fewer than one step of 8'):
        run_training(_cfg(tiny, tmp_path / 'b', batch_size=8, accumulate=2), log=lambda *a, **k: None)
    assert not (tmp_path / 'a' / 'tiny' / 'last.ckpt').exists()
