"""The scripts' one command line (efficientdet.cli): same idea, same name and help everywhere;
--image_size never swallows a positional; defaults that exist; one inference path; registries
that take a format and a runtime from outside the package."""
import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT
from efficientdet.cli import DEFAULT_PROJECT, OPTIONS, default_weights
from efficientdet.errors import UserError

sys.path.insert(0, ROOT)

# (script, how its parser is reached: the argv that makes it build the parser)
SCRIPTS = {
    'efficientdet_test': ('efficientdet_test', []),
    'efficientdet_test_videos': ('efficientdet_test_videos', ['x.mp4']),
    'coco_eval': ('coco_eval', []),
    'benchmark': ('benchmark', []),
    'train': ('train', []),
    'export': ('efficientdet.export', ['onnx', '-o', 'x.onnx']),
    'data.check': ('efficientdet.data.check', []),
    'data.convert': ('efficientdet.data.convert', ['voc', '-o', 'x.json']),
}


class _Captured(Exception):
    def __init__(self, parser, namespace):
        self.parser, self.namespace = parser, namespace


def _capture(monkeypatch, module: str, argv):
    """(parser, parsed namespace) of a script's main: stops it right after parsing its options."""
    mod = importlib.import_module(module)
    real = argparse.ArgumentParser.parse_known_args

    def grab(self, args=None, namespace=None):
        raise _Captured(self, real(self, args, namespace)[0])

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', grab)
    entry = getattr(mod, 'main')
    try:
        entry(list(argv))
    except _Captured as c:
        return c.parser, c.namespace
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', real)
    raise AssertionError(f'{module} did not parse its options')


def _actions(parser):
    """Every option action of a parser and of its sub-commands."""
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out += _actions(sub)
        elif a.option_strings and not isinstance(a, argparse._HelpAction):
            out.append(a)
    return out


@pytest.fixture(scope='module')
def parsers():
    mp = pytest.MonkeyPatch()
    try:
        return {name: _capture(mp, module, argv)[0] for name, (module, argv) in SCRIPTS.items()}
    finally:
        mp.undo()


def test_same_idea_same_name_and_help_everywhere(parsers):
    by_flag = {}
    for name, parser in parsers.items():
        for a in _actions(parser):
            assert a.help and a.help.strip(), f'{name}: {a.option_strings} has no help'
            if a.dest in OPTIONS and a.option_strings[0] in OPTIONS[a.dest].flags:
                opt = OPTIONS[a.dest]
                assert tuple(a.option_strings) == opt.flags, (name, a.option_strings)
                assert a.help == opt.help, (name, a.dest)
            for flag in a.option_strings:
                by_flag.setdefault(flag, set()).add((a.dest, name))
    for flag, uses in by_flag.items():
        dests = {d for d, _ in uses}
        assert len(dests) == 1, f'{flag} means {dests} in {sorted(n for _, n in uses)}'
    # the ideas that had several spellings are one option now, in every script that has them
    for alias, dest in (('--nms_threshold', 'iou'), ('--iou_threshold', 'iou'), ('--score_threshold', 'threshold'),
                        ('--float16', 'half'), ('--load_weights', 'weights'), ('--cuda', 'device')):
        assert {d for d, _ in by_flag.get(alias, set())} <= {dest}, alias
    used = {n for _, n in by_flag['--iou']}
    assert {'efficientdet_test', 'efficientdet_test_videos', 'coco_eval', 'benchmark', 'export'} <= used
    assert {n for _, n in by_flag['--half']} >= {'efficientdet_test', 'coco_eval', 'benchmark'}
    # one default of -p and -w in every script: the shipped project, and its weights exist
    for name, parser in parsers.items():
        for a in _actions(parser):
            if a.dest in ('project', 'weights'):
                assert a.default is None, (name, a.dest)  # None = DEFAULT_PROJECT / its default weights
    assert os.path.isfile(default_weights(DEFAULT_PROJECT, 0))  # found from any working folder


def test_help_shows_each_default_once(parsers):
    """Each option's help says its default at most once (coco_eval printed "(default: the variant's)
    (default: None)"), and never "(default: None)"."""
    for name, parser in parsers.items():
        fmt = parser._get_formatter()
        for a in _actions(parser):
            text = fmt._expand_help(a) if a.help else ''
            assert text.lower().count('default') <= 1, (name, a.option_strings, text)
            assert '(default: None)' not in text, (name, a.option_strings)
    for a in _actions(parsers['train']):  # the options that had no help
        if a.dest in ('optim', 'num_epochs', 'log_path', 'saved_path', 'seed', 'momentum', 'ema_decay',
                      'label_smoothing'):
            assert len(a.help) > 10, a.dest


@pytest.mark.parametrize('argv,size', [
    (['-w', 'd0.pth', '--image_size', '256', 'IN'], (256, 256)),
    (['--image_size', '384', '640', 'IN'], (384, 640)),
    (['IN', '--image_size', '384x640'], (384, 640)),
    (['--image_size', '384', 'IN', '--threshold', '0.3'], (384, 384)),
])
def test_image_size_never_takes_a_positional(monkeypatch, argv, size):
    _, ns = _capture(monkeypatch, 'efficientdet_test', [a if a != 'IN' else 'photo.jpg' for a in argv])
    assert ns.image_size == size and ns.images == ['photo.jpg']
    _, ns = _capture(monkeypatch, 'efficientdet_test_videos', [a if a != 'IN' else 'clip.mp4' for a in argv])
    assert ns.image_size == size and ns.source == 'clip.mp4'


@pytest.mark.parametrize('name', ['coco_eval', 'benchmark', 'train', 'export', 'data.check'])
def test_image_size_forms_in_every_script(monkeypatch, name):
    module, argv = SCRIPTS[name]
    for form in (['384', '640'], ['384x640'], ['384,640']):
        _, ns = _capture(monkeypatch, module, [*argv, '--image_size', *form])
        assert ns.image_size == (384, 640), (name, form)
    _, ns = _capture(monkeypatch, module, [*argv, '--image_size', '512'])
    assert ns.image_size == (512, 512)


def test_aliases_parse_to_the_same_option(monkeypatch):
    _, a = _capture(monkeypatch, 'coco_eval', ['--nms_threshold', '0.4', '--float16', 'True', '--score_threshold',
                                               '0.1', '--cuda', 'False', '--load_weights', 'x.pth'])
    _, b = _capture(monkeypatch, 'coco_eval', ['--iou', '0.4', '--half', '--threshold', '0.1', '--device', 'cpu',
                                               '-w', 'x.pth'])
    for k in ('iou', 'half', 'threshold', 'device', 'weights'):
        assert getattr(a, k) == getattr(b, k), k


def test_benchmark_takes_an_exported_file_with_w(tmp_path):
    """-w model.onnx with --backend onnxruntime runs the file (its classes and size from its metadata),
    like every other script; a checkpoint with an exported backend is exported to a temp dir first."""
    pytest.importorskip('onnxruntime')
    import benchmark
    from efficientdet.export import main as export_main
    onnx_path = str(tmp_path / 'd0.onnx')
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main(['onnx', '-c', '0', '--num_classes', '7', '-w', 'random', '--image_size', '128',
                            '-o', onnx_path, '--no_verify']) == 0
    out = tmp_path / 'r.json'
    with contextlib.redirect_stdout(io.StringIO()):
        assert benchmark.main(['--backend', 'onnxruntime', '-w', onnx_path, '--iters', '1', '--warmup', '0',
                               '--no-tune_malloc', '--json', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['image_size'] == [128, 128] and r['note_num_classes'] == 7 and r['note_weights'] == onnx_path
    assert 'note_export_s' not in r  # run as it is, not exported again


def _biased_placeholder_model():
    """The shipped shapes D0 with its 'circle' slot made a placeholder ('') whose class bias is raised
    by 8: nearly every anchor's top slot is then the placeholder, while the real classes still score."""
    from efficientdet.factory import build_model
    model = build_model(0, project='shape', weights=os.path.join(ROOT, 'weights', 'efficientdet-d0-shape.pth')).eval()
    obj_list = ['rectangle', '', 'triangle']
    with torch.no_grad():
        model.classifier.header.pointwise_conv.conv.bias.view(-1, 3)[:, 1] += 8.0
    return model, obj_list


def test_placeholder_classes_are_left_out_before_the_best_class():
    """Fused (the class head's bias carries the rule, fuse_model) and eager (BestClass masks): the
    best real class, the same detections, and the caller's model untouched."""
    from efficientdet.detector import Detector
    model, obj_list = _biased_placeholder_model()
    before = model.classifier.header.pointwise_conv.conv.bias.clone()
    image = (np.random.default_rng(0).random((128, 160, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # any input: how often the slot wins
    with torch.no_grad():
        logits = model(x[..., :128, :128], return_logits=True)[2]
    assert (logits.argmax(-1) == 1).float().mean() > 0.9  # the placeholder is nearly every anchor's top slot
    fused, eager = (Detector(model, obj_list, 128, threshold=0.0, iou=0.5, max_det=50, fuse=f)([image])[0]
                    for f in (True, False))
    for det in (fused, eager):
        assert len(det) == 50 and all(obj_list[c] != '' for c in det.class_ids)
    np.testing.assert_array_equal(fused.class_ids, eager.class_ids)
    np.testing.assert_allclose(fused.scores, eager.scores, atol=1e-4)
    assert torch.equal(model.classifier.header.pointwise_conv.conv.bias, before)


def test_placeholder_rule_in_exported_best_head(tmp_path):
    """An ONNX export with -p coco takes the best class among the real classes in its graph (and
    says so in its metadata); one without the class list is refused with the same project."""
    pytest.importorskip('onnxruntime')
    from efficientdet.detector import Detector
    from efficientdet.runtimes import get_target
    model, obj_list = _biased_placeholder_model()
    image = (np.random.default_rng(0).random((128, 160, 3)) * 255).astype(np.uint8)
    path = str(tmp_path / 'm.onnx')
    get_target('onnxruntime').export(model, path, 128, obj_list=obj_list)
    det = Detector.from_exported(path, threshold=0.0, iou=0.5, max_det=50)([image])[0]
    ref = Detector(model, obj_list, 128, threshold=0.0, iou=0.5, max_det=50)([image])[0]
    assert len(det) == len(ref) == 50 and all(obj_list[c] != '' for c in det.class_ids)
    np.testing.assert_allclose(det.scores, ref.scores, atol=1e-4)
    bare = str(tmp_path / 'bare.onnx')
    get_target('onnxruntime').export(model, bare, 128, verify=False)
    with pytest.raises(UserError, match='placeholder'):
        Detector.from_exported(bare, obj_list=obj_list)
    nms_path = str(tmp_path / 'nms.onnx')  # the in-graph NMS takes the same best class
    get_target('onnxruntime').export(model, nms_path, 128, obj_list=obj_list, with_nms=True, score_threshold=0.0,
                                     iou_threshold=0.5, max_det=50)
    from efficientdet.runtimes import load_runtime
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 128, 128), dtype=np.float32))
    out = load_runtime('onnxruntime', nms_path).run(x)
    n = int(out['num_detections'][0])
    assert n == 50 and not (np.asarray(out['labels'])[0, :n] == 1).any()  # never the placeholder slot


@pytest.mark.slow
def test_placeholder_rule_in_litert_best_head(tmp_path):
    """The .tflite best head leaves out the placeholder classes too (metadata and graph agree)."""
    pytest.importorskip('litert_torch')
    from efficientdet.detector import Detector
    from efficientdet.runtimes import get_target
    model, obj_list = _biased_placeholder_model()
    image = (np.random.default_rng(0).random((128, 160, 3)) * 255).astype(np.uint8)
    path = str(tmp_path / 'm.tflite')
    get_target('litert').export(model, path, 128, obj_list=obj_list)
    det = Detector.from_exported(path, backend='litert', threshold=0.0, iou=0.5, max_det=50)([image])[0]
    ref = Detector(model, obj_list, 128, threshold=0.0, iou=0.5, max_det=50)([image])[0]
    assert len(det) == len(ref) == 50 and all(obj_list[c] != '' for c in det.class_ids)
    np.testing.assert_allclose(det.scores, ref.scores, atol=1e-4)


def test_one_detection_path_for_test_script_eval_and_training(tmp_path):
    """efficientdet_test.py, coco_eval.py and training's validation (run_coco_eval on the module)
    give identical detections for the same images and settings; --debug images use the same path."""
    import coco_eval
    import efficientdet_test
    from efficientdet.data import build_dataset
    from efficientdet.data.shapes import generate_split
    from efficientdet.evaluation import run_coco_eval
    from efficientdet.factory import build_model
    from efficientdet.project import load_project
    root = tmp_path / 'data' / 'shape'
    generate_split(str(root), 'val', 3, 160, seed=3)
    weights = os.path.join(ROOT, default_weights('shape', 0))
    common = ['-p', 'shape', '-w', weights, '--image_size', '256', '--threshold', '0.05', '--iou', '0.5',
              '--device', 'cpu']
    with contextlib.redirect_stdout(io.StringIO()):
        assert efficientdet_test.main([str(root / 'val'), *common, '-o', str(tmp_path / 'out')]) == 0
        assert coco_eval.main([*common, '--data_path', str(tmp_path / 'data'), '--output_dir', str(tmp_path / 'res'),
                               '--no_progress']) == 0
    gt = json.loads((root / 'annotations' / 'instances_val.json').read_text())
    name_of = {im['id']: im['file_name'] for im in gt['images']}
    evaluated = json.loads((tmp_path / 'res' / 'shape_val_bbox_results.json').read_text())
    project = load_project('shape')
    model = build_model(0, project=project, weights=weights, image_size=256)
    dataset = build_dataset(project, 'val', (256, 256), str(tmp_path / 'data'))
    _, validated = run_coco_eval(model, dataset, score_threshold=0.05, nms_threshold=0.5, progress=False)

    def table(results):  # (image, class) in order, then [score, x, y, w, h] rows
        rows = sorted(results, key=lambda r: (name_of[r['image_id']], r['category_id'], -r['score']))
        return ([(name_of[r['image_id']], r['category_id']) for r in rows],
                np.array([[r['score'], *r['bbox']] for r in rows]))
    tested = []
    for f in sorted(os.listdir(tmp_path / 'out')):
        if f.endswith('.json'):
            rec = json.loads((tmp_path / 'out' / f).read_text())
            for d in rec['detections']:
                tested.append({'image_id': next(k for k, v in name_of.items() if v == os.path.basename(rec['image'])),
                               'category_id': d['class_id'] + 1, 'score': d['score'],
                               'bbox': [d['x1'], d['y1'], d['x2'] - d['x1'], d['y2'] - d['y1']]})
    assert len(tested) > 3
    assert evaluated == validated  # the same results, written the same way
    (keys_t, rows_t), (keys_e, rows_e) = table(tested), table(evaluated)
    assert keys_t == keys_e
    np.testing.assert_allclose(rows_t, rows_e, atol=0.011, rtol=0)  # results files: boxes to 2 decimals

    from efficientdet.detector import Detector
    from efficientdet.training import debug
    calls = []
    real = Detector.detect_prepared

    def spy(self, batch, metas):
        calls.append(len(metas))
        return real(self, batch, metas)
    Detector.detect_prepared = spy
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=__import__(
            'efficientdet.data', fromlist=['collate_fn']).collate_fn)
        debug.write_debug_images(model, loader, project.obj_list, dataset.mean, dataset.std,
                                 str(tmp_path / 'debug'), 'epoch1', limit=2)
    finally:
        Detector.detect_prepared = real
    assert calls == [2] and len(os.listdir(tmp_path / 'debug')) == 2


# ----------------------------------------------------------------------------- registries from outside
PLUGIN = '''
"""A dataset format and a runtime registered from outside the package."""
import csv, json, os
import torch
from efficientdet.data.formats import DatasetFormat, SplitData, register_format
from efficientdet.runtimes import Runtime, Target, register_target


class CsvFormat(DatasetFormat):
    name = 'toycsv'
    layout = '{root}/{split}.csv (file,x1,y1,x2,y2,class) and {root}/{split}/*.jpg'

    def read(self, root_dir, split, obj_list, issues, require_images=True):
        self.check_root(root_dir, split)
        path = os.path.join(root_dir, split + '.csv')
        self.need(path, root_dir, split)
        images, anns, ids = [], [], {}
        import cv2
        with open(path) as f:
            for row in csv.reader(f):
                name, x1, y1, x2, y2, cls = row[0], *map(float, row[1:5]), row[5]
                if name not in ids:
                    h, w = cv2.imread(os.path.join(root_dir, split, name)).shape[:2]
                    ids[name] = len(ids) + 1
                    images.append({'id': ids[name], 'file_name': name, 'height': h, 'width': w})
                anns.append({'id': len(anns) + 1, 'image_id': ids[name], 'category_id': obj_list.index(cls) + 1,
                             'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1), 'iscrowd': 0})
        cats = [{'id': i + 1, 'name': n} for i, n in enumerate(obj_list)]
        return SplitData({'images': images, 'annotations': anns, 'categories': cats},
                         os.path.join(root_dir, split), path, issues)


register_format(CsvFormat())


class ToyRuntime(Runtime):
    """A .toy file: JSON naming a checkpoint; runs it eagerly."""
    name = 'toyrt'

    def __init__(self, path):
        from efficientdet.factory import build_model
        spec = json.load(open(path))
        self.path, self.meta = path, {'num_classes': spec['num_classes'], 'compound_coef': 0,
                                      'image_size': spec['image_size'], 'head': 'full'}
        self.image_size = tuple(spec['image_size'])
        self.output_names = ['regression', 'classification', 'anchors']
        self.model = build_model(0, num_classes=spec['num_classes'], weights=spec['weights'],
                                 image_size=self.image_size)
        self.calls = 0

    def run(self, x):
        ToyTarget.calls += 1
        with torch.no_grad():
            _, reg, cls, anc = self.model(x)
        return {'regression': reg, 'classification': cls, 'anchors': anc}


class ToyTarget(Target):
    name = 'toyrt'
    suffix = '.toy'
    calls = 0

    def load(self, path, threads=None, device='cpu', providers=None, half=False):
        return ToyRuntime(path)


register_target(ToyTarget())
'''


@pytest.fixture
def registries_restored():
    """The formats, targets and plugins registered during a test are taken out afterwards (other
    tests list the built-in ones)."""
    from efficientdet import plugins
    from efficientdet.data.formats import FORMATS
    from efficientdet.runtimes.base import _TARGETS
    before = (dict(FORMATS), dict(_TARGETS), list(plugins._loaded))
    yield
    for live, saved in zip((FORMATS, _TARGETS), before[:2]):
        live.clear()
        live.update(saved)
    plugins._loaded[:] = before[2]
    sys.modules.pop('toy_plugin', None)


def test_a_format_and_a_runtime_from_outside_the_package(tmp_path, monkeypatch, registries_restored):
    import coco_eval
    import efficientdet_test
    from efficientdet.data.shapes import generate_split
    from efficientdet.plugins import ENV_VAR
    (tmp_path / 'toy_plugin.py').write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ENV_VAR, 'toy_plugin')
    # a project in the toy format: the shapes val images with a CSV of their boxes
    shapes = tmp_path / 'shapes'
    generate_split(str(shapes), 'val', 3, 128, seed=1)
    gt = json.loads((shapes / 'annotations' / 'instances_val.json').read_text())
    names = {c['id']: c['name'] for c in gt['categories']}
    root = tmp_path / 'data' / 'toyshapes'
    os.makedirs(root)
    os.rename(shapes / 'val', root / 'val')
    files = {im['id']: im['file_name'] for im in gt['images']}
    with open(root / 'val.csv', 'w') as f:
        for a in gt['annotations']:
            x, y, w, h = a['bbox']
            f.write(f'{files[a["image_id"]]},{x},{y},{x + w},{y + h},{names[a["category_id"]]}\n')
    proj = tmp_path / 'toyshapes.yml'
    proj.write_text('project_name: toyshapes\ntrain_set: val\nval_set: val\ndataset_format: toycsv\n'
                    'obj_list: [rectangle, circle, triangle]\n')
    spec = tmp_path / 'model.toy'
    spec.write_text(json.dumps({'weights': os.path.join(ROOT, default_weights('shape', 0)), 'num_classes': 3,
                                'image_size': [128, 128]}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert coco_eval.main(['-p', str(proj), '--data_path', str(tmp_path / 'data'), '--backend', 'toyrt',
                               '-w', str(spec), '--output_dir', str(tmp_path / 'res'), '--no_progress']) == 0
        assert efficientdet_test.main([str(root / 'val'), '-p', str(proj), '--backend', 'toyrt', '-w', str(spec),
                                       '-o', str(tmp_path / 'out')]) == 0
    plugin = sys.modules['toy_plugin']
    assert plugin.ToyTarget.calls >= 6  # 3 images evaluated, 3 detected
    assert 'toyshapes' in out.getvalue() and '(3 images' in out.getvalue()
    assert len([f for f in os.listdir(tmp_path / 'out') if f.endswith('.json')]) == 3
    from efficientdet.runtimes import backend_names
    assert 'toyrt' in backend_names()


def test_plugin_that_cannot_be_imported_is_one_line(monkeypatch):
    from efficientdet.plugins import ENV_VAR, load_plugins
    monkeypatch.setenv(ENV_VAR, 'no_such_plugin_module')
    with pytest.raises(UserError, match="plugin 'no_such_plugin_module' .*EFFICIENTDET_PLUGINS"):
        load_plugins()


def test_package_imports_real_modules_not_aliases():
    """The alias modules stay for users' code; the package itself never imports them."""
    import re
    pkg = os.path.join(ROOT, 'efficientdet')
    aliases = ('backends', 'checkpoint', 'engine', 'utils')
    pattern = re.compile(r'^\s*(from\s+(efficientdet|\.+)\.?(?P<a>\w+)?\s+import\s+(?P<b>[\w, ]+)|import\s+efficientdet\.'
                         r'(?P<c>\w+))', re.M)
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith('.py') or (dirpath == pkg and f[:-3] in aliases):
                continue
            text = open(os.path.join(dirpath, f)).read()
            for m in pattern.finditer(text):
                mod = m.group('a') or m.group('c')
                names = [n.strip() for n in (m.group('b') or '').split(',')]
                relative_top = dirpath == pkg or m.group(0).lstrip().startswith('from efficientdet')
                assert not (relative_top and mod in aliases), f'{dirpath}/{f}: {m.group(0).strip()}'
                if relative_top and mod is None:
                    assert not set(names) & set(aliases), f'{dirpath}/{f}: {m.group(0).strip()}'
