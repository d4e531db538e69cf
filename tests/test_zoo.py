"""Released weights by name (efficientdet.zoo), all offline: a real HTTP server on 127.0.0.1 in a
thread serves small random-weight checkpoints of the publishers' layouts under their file names,
reached through EFFICIENTDET_WEIGHTS_MIRROR; a test table (EFFICIENTDET_ZOO_TABLE) lists them with
their real hashes. No test reaches the internet."""
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, need_shared
from efficientdet import EfficientDetBackbone, zoo
from efficientdet.ckpt.files import atomic_save
from efficientdet.ckpt.layouts.effdet import map_backbone_keys, state_dict_to_effdet
from efficientdet.config import IMAGENET_MEAN, IMAGENET_STD, VARIANTS, get_config, resolve_normalization
from efficientdet.errors import UserError
from efficientdet.factory import build_model
from efficientdet.zoo.__main__ import main as zoo_main

pytestmark = pytest.mark.filterwarnings('ignore:for .*copying from a non-meta parameter')
REAL_TABLE = zoo.load_table(zoo.table.DEFAULT_TABLE)


# ------------------------------------------------------------------ a real HTTP server
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        srv = self.server
        name = self.path.rsplit('/', 1)[-1]
        srv.requests.append(name)
        path = os.path.join(srv.root, name)
        if not os.path.isfile(path):
            self.send_error(404, 'Not Found')
            return
        with open(path, 'rb') as f:
            data = f.read()
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if name in srv.truncate:  # announce the whole file, send half, hang up
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        step = max(1, len(data) // 20)
        for i in range(0, len(data), step):
            self.wfile.write(data[i:i + step])
            time.sleep(srv.delay / 20)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root):
        super().__init__(('127.0.0.1', 0), _Handler)
        self.root, self.requests, self.truncate, self.delay = root, [], set(), 0.0

    @property
    def url(self):
        return f'http://127.0.0.1:{self.server_address[1]}/weights'


@pytest.fixture
def server(tmp_path):
    srv = Server(str(tmp_path / 'served'))
    os.makedirs(srv.root)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# ------------------------------------------------------------------ released-layout files and a table
def _sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """Random-weight D0 checkpoints (90 classes) in effdet's layout (named like its releases, with the
    sha256 prefix) and in Yet-Another's layout, plus a Lite0 file (another variant)."""
    root = tmp_path_factory.mktemp('released')
    torch.manual_seed(0)
    d0 = EfficientDetBackbone(num_classes=90, compound_coef=0)
    ours = {k: v.clone() for k, v in d0.state_dict().items()}
    tmp = str(root / 'effdet.tmp')
    atomic_save(state_dict_to_effdet(ours, d0), tmp)
    sha = _sha(tmp)
    effdet = str(root / f'tf_efficientdet_d0_34-{sha[:8]}.pth')
    os.replace(tmp, effdet)
    yet_another = str(root / 'efficientdet-d0.pth')
    atomic_save(ours, yet_another)
    lite0 = str(root / 'lite0.pth')
    atomic_save(EfficientDetBackbone(num_classes=90, compound_coef='lite0').state_dict(), lite0)
    return {'root': root, 'ours': ours, 'effdet': effdet, 'effdet_sha': sha, 'yet_another': yet_another,
            'lite0': lite0}


def _row(name, variant, source, file, **kw):
    return dict(name=name, variant=variant, source=source, url=f'https://example.invalid/releases/{file}',
                input_size=get_config(variant).input_size, **kw)


def _table(tmp_path, rows):
    raw = {'format': 1, 'sources': json.load(open(zoo.table.DEFAULT_TABLE))['sources'], 'weights': rows}
    path = tmp_path / 'table.json'
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.fixture
def env(tmp_path, monkeypatch, server, released):
    """TORCH_HOME in tmp, the mirror on the local server, a table of the released test files."""
    for key in ('effdet', 'yet_another'):
        shutil.copy(released[key], server.root)
    eff = os.path.basename(released['effdet'])
    ap = eff.replace('_34-', '_ap-')
    shutil.copy(released['effdet'], os.path.join(server.root, ap))
    rows = [_row('tf_efficientdet_d0', 0, 'effdet', eff, sha256_prefix=released['effdet_sha'][:8], coco=True,
                 ap_published=34.2),
            _row('tf_efficientdet_d0_ap', 0, 'effdet', ap, sha256_prefix=released['effdet_sha'][:8],
                 mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            _row('efficientdet-d0', 0, 'yet_another', 'efficientdet-d0.pth'),
            _row('tf_efficientdet_d1', 1, 'effdet', 'tf_efficientdet_d1_40-00000000.pth', sha256_prefix='00000000',
                 coco=True)]
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv(zoo.MIRROR_ENV, server.url + '/')
    monkeypatch.setenv(zoo.TABLE_ENV, _table(tmp_path, rows))
    for k in (zoo.OFFLINE_ENV, 'HF_HUB_OFFLINE'):
        monkeypatch.delenv(k, raising=False)
    return {'cache': os.path.join(str(tmp_path / 'torch_home'), 'hub', 'checkpoints'), 'effdet': eff, 'ap': ap,
            'server': server, 'table': os.environ[zoo.TABLE_ENV]}


def _cache_files(folder):
    """What a cache folder holds, lock files aside (temporaries and partial downloads included)."""
    return sorted(f for f in os.listdir(folder) if not f.endswith('.lock')) if os.path.isdir(folder) else []


def _same_weights(model, ours):
    return all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ download, cache, load
def test_download_verify_cache_and_load(env, released, capsys):
    model = build_model(weights='tf_efficientdet_d0', verbose=False)  # the name also gives the variant
    assert model.compound_coef == 0 and model.num_classes == 90 and _same_weights(model, released['ours'])
    assert env['server'].requests == [env['effdet']]
    assert _cache_files(env['cache']) == [env['effdet']]  # torch.hub's cache under TORCH_HOME, publisher's name
    assert _sha(os.path.join(env['cache'], env['effdet'])) == released['effdet_sha']
    assert env['effdet'] in capsys.readouterr().err  # says what it downloads, with a progress bar
    # the second use, by another spelling (coco + variant, the publisher's file name): no request
    for spec, variant in (('coco', 0), (env['effdet'], None), ('tf_efficientdet_d0', 'd0')):
        again = build_model(variant, weights=spec, verbose=False)
        assert _same_weights(again, released['ours'])
    assert env['server'].requests == [env['effdet']]
    assert model.weights_entry.name == 'tf_efficientdet_d0' and model.compat == 'official'


def test_yet_another_by_name_loads_in_its_own_compat_mode(env, released):
    model = build_model(weights='efficientdet-d0.pth', project='coco', verbose=False)  # its file name
    assert model.compat == 'zylo117' and model.weights_entry.source == 'yet_another'
    assert model.aspect_ratios[1] == (1.4, 0.7)  # its training ratios, though coco.yml lists the official ones
    assert _same_weights(model, released['ours'])
    explicit = build_model(weights='efficientdet-d0', compat='official', verbose=False)  # an explicit choice wins
    assert explicit.compat == 'official'
    resolved = zoo.resolve('efficientdet-d0')  # what a script's weights check hands on keeps the facts
    assert resolved.variant == 0 and build_model(weights=resolved, verbose=False).compat == 'zylo117'
    assert env['server'].requests == ['efficientdet-d0.pth']


def test_advprop_normalisation_travels_with_the_model(env):
    from efficientdet.detector import Detector
    model = build_model(weights='tf_efficientdet_d0_ap', verbose=False)
    assert model.input_mean == (0.5, 0.5, 0.5) and model.input_std == (0.5, 0.5, 0.5)
    # a project's ImageNet values (coco.yml) stand for "what the weights expect"; other values win
    assert resolve_normalization(model, IMAGENET_MEAN, IMAGENET_STD) == ((0.5,) * 3, (0.5,) * 3)
    assert resolve_normalization(model, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)) == ((0.4,) * 3, (0.2,) * 3)
    det = Detector(model, ['x'] * 90, 128, fuse=False)  # a project's ImageNet values, or none: the weights' own
    assert (det.mean, det.std) == ((0.5,) * 3, (0.5,) * 3)
    assert Detector(model, ['x'] * 90, 128, mean=IMAGENET_MEAN, std=IMAGENET_STD, fuse=False).mean == (0.5,) * 3
    plain = build_model(weights='coco', verbose=False)
    assert (plain.input_mean, plain.input_std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_detector_from_checkpoint_coco_end_to_end(env):
    from efficientdet.detector import Detector
    det = Detector.from_checkpoint('coco', compound_coef=0, image_size=128, threshold=0.0)
    assert det.model.weights_entry.name == 'tf_efficientdet_d0' and det.image_size == (128, 128)
    assert det.obj_list[0] == 'person' and det.obj_list[11] == ''  # the released weights' COCO label map
    out = det(np.full((96, 120, 3), 127, np.uint8))[0]
    assert len(out) > 0 and all(n and not n.isdigit() for n in out.class_names)


def test_wrong_hash_is_refused_and_nothing_stays(env, released):
    served = os.path.join(env['server'].root, env['effdet'])
    with open(served, 'r+b') as f:  # one byte changed on the server
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(UserError) as e:
        zoo.resolve('tf_efficientdet_d0')
    msg = str(e.value)
    dest = os.path.join(env['cache'], env['effdet'])
    assert '\n' not in msg and 'sha256' in msg and released['effdet_sha'][:8] in msg
    assert f'{env["server"].url}/{env["effdet"]}' in msg and dest in msg and 'by hand' in msg
    assert _cache_files(env['cache']) == []


@pytest.mark.parametrize('name', ['tf_efficientdet_d0', 'efficientdet-d0'])  # with and without a published hash
def test_connection_closed_mid_body_leaves_nothing(env, name):
    file = env['effdet'] if name == 'tf_efficientdet_d0' else 'efficientdet-d0.pth'
    env['server'].truncate.add(file)
    with pytest.raises(UserError) as e:
        zoo.resolve(name)
    msg = str(e.value)
    assert '\n' not in msg and 'nothing was kept' in msg and file in msg and 'by hand' in msg
    assert _cache_files(env['cache']) == []
    env['server'].truncate.clear()  # the next try succeeds and is complete
    assert _sha(zoo.resolve(name).path) == _sha(os.path.join(env['server'].root, file))


def test_http_404_and_no_network_name_the_url(env, monkeypatch):
    with pytest.raises(UserError) as e:
        zoo.resolve('coco', 1)  # listed, but the server does not have it
    msg = str(e.value)
    assert 'HTTP 404' in msg and f'{env["server"].url}/tf_efficientdet_d1_40-00000000.pth' in msg
    assert 'https://example.invalid/releases/tf_efficientdet_d1_40-00000000.pth' in msg  # where to get it by hand
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(zoo.MIRROR_ENV, f'http://127.0.0.1:{port}')
    with pytest.raises(UserError, match='no connection'):
        zoo.resolve('tf_efficientdet_d0')
    assert _cache_files(env['cache']) == []


@pytest.mark.parametrize('var', ['EFFICIENTDET_OFFLINE', 'HF_HUB_OFFLINE'])
def test_offline_never_touches_the_network(env, released, monkeypatch, var):
    monkeypatch.setenv(var, '1')
    with pytest.raises(UserError) as e:
        build_model(weights='tf_efficientdet_d0')
    msg = str(e.value)
    assert 'network is off' in msg and os.path.join(env['cache'], env['effdet']) in msg
    assert 'python -m efficientdet.zoo get tf_efficientdet_d0' in msg
    assert env['server'].requests == []
    os.makedirs(env['cache'])  # placed by hand: used, still without a request
    shutil.copy(released['effdet'], env['cache'])
    assert _same_weights(build_model(weights='coco', verbose=False), released['ours'])
    assert env['server'].requests == []


def test_cached_file_of_another_variant_is_removed(env, released):
    os.makedirs(env['cache'])
    bad = os.path.join(env['cache'], env['effdet'])
    shutil.copy(released['lite0'], bad)
    with pytest.raises(UserError) as e:
        build_model(weights='tf_efficientdet_d0')
    msg = str(e.value)
    assert 'efficientdet-lite0' in msg and 'removed from the cache' in msg and bad in msg
    assert not os.path.exists(bad)
    assert _same_weights(build_model(weights='tf_efficientdet_d0', verbose=False), released['ours'])  # fetched afresh
    # a downloaded file of another variant never enters the cache
    shutil.copy(released['lite0'], os.path.join(env['server'].root, 'efficientdet-d0.pth'))
    with pytest.raises(UserError, match=r'not the expected checkpoint \(its tensors are efficientdet-lite0'):
        zoo.resolve('efficientdet-d0')
    assert _cache_files(env['cache']) == [env['effdet']]


def test_two_processes_one_download_one_good_file(env, released, tmp_path):
    env['server'].delay = 1.0  # a slow transfer: the second process arrives while the first downloads
    code = ('import os, sys, time\n'
            'from efficientdet import zoo\n'
            'open(sys.argv[1], "w").close()\n'
            'while not all(os.path.exists(p) for p in sys.argv[2:]): time.sleep(0.01)\n'
            'ck, got = zoo.open_weights("tf_efficientdet_d0")\n'
            'print(len(ck.state_dict), got.path)\n')
    ready = [str(tmp_path / f'ready{i}') for i in range(2)]
    procs = [subprocess.Popen([sys.executable, '-c', code, ready[i], *ready], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dest = os.path.join(env['cache'], env['effdet'])
    assert [o.split() for o, _ in outs] == [[str(len(released['ours'])), dest]] * 2
    assert env['server'].requests == [env['effdet']]
    assert sum('waiting for another process' in err for _, err in outs) == 1
    assert _cache_files(env['cache']) == [env['effdet']] and _sha(dest) == released['effdet_sha']


# ------------------------------------------------------------------ names, variants, paths
def test_names_variants_and_paths(env, tmp_path, monkeypatch):
    assert zoo.is_name('coco') and zoo.is_name('tf_efficientdet_d0_ap') and zoo.is_name('efficientdet-d0.pth')
    assert not zoo.is_name('weights/nothing.pth') and not zoo.is_name(None)
    assert zoo.variant_of('tf_efficientdet_d1') == 1 and zoo.variant_of('coco') is None
    with pytest.raises(UserError, match=r'^-w coco: the released COCO weights of which variant\? pass -c'):
        zoo.lookup('coco')
    with pytest.raises(UserError, match=r'these are efficientdet-d0 weights but -c 2 \(efficientdet-d2\) was asked; '
                                        r'pass -c 0, or leave -c out'):
        build_model(2, weights='efficientdet-d0')
    with pytest.raises(UserError, match='no released COCO weights are listed for efficientdet-d3'):
        zoo.lookup('coco', 3)
    with pytest.raises(UserError, match=r'^tf_efficientdet_d00: no such checkpoint file or folder, and no released '
                                        r'weights have that name; did you '
                                        r'mean tf_efficientdet_d0\?'):
        zoo.resolve('tf_efficientdet_d00')
    # a path that exists always wins over a name, and is never fetched
    monkeypatch.chdir(tmp_path)
    atomic_save(EfficientDetBackbone(num_classes=3, compound_coef=0).state_dict(), str(tmp_path / 'efficientdet-d0'))
    assert not zoo.is_name('efficientdet-d0')
    got = zoo.resolve('efficientdet-d0')
    assert got.entry is None and got.path == 'efficientdet-d0'
    assert build_model(0, weights='efficientdet-d0', verbose=False).num_classes == 3
    assert env['server'].requests == []


def test_zoo_command_list_get_verify(env, released, tmp_path, capsys):
    assert zoo_main(['list']) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith('tf_efficientdet_d0 '))
    assert 'efficientdet-d0' in line and 'effdet' in line and '34.2' in line and line.rstrip().endswith('no')
    assert 'as published' in out and env['cache'] in out
    folder = str(tmp_path / 'offline_copy')
    assert zoo_main(['get', 'tf_efficientdet_d0', 'coco', '-c', '0', '--dir', folder]) == 0
    assert _cache_files(folder) == [env['effdet']] and env['server'].requests == [env['effdet']]
    assert zoo_main(['list', '--dir', folder]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('tf_efficientdet_d0 '))
    assert line.rstrip().endswith('yes') and 'MiB' in line
    shutil.copy(released['lite0'], os.path.join(folder, 'efficientdet-d0.pth'))  # wrong variant under a name
    assert zoo_main(['verify', '--dir', folder]) == 1
    out = capsys.readouterr().out
    assert 'tf_efficientdet_d0: ok' in out and 'efficientdet-d0: BAD, removed' in out
    assert '2 cached files checked' in out
    assert _cache_files(folder) == [env['effdet']]


# ------------------------------------------------------------------ the real table
def test_real_table_facts():
    official = {**json.load(open(need_shared('fixtures', 'official_param_counts.json'))),
                **json.load(open(need_shared('fixtures', 'official_param_counts_lite.json')))}
    table = REAL_TABLE
    names = [e.name for e in table.entries]
    assert len(names) == len(set(names)) == 30
    counts = {}
    for e in table.entries:
        if e.variant not in counts:
            with torch.device('meta'):
                counts[e.variant] = sum(p.numel() for p in EfficientDetBackbone(90, e.variant).parameters())
        assert counts[e.variant] == official[e.variant_name]['trainable'], e.name
        assert e.input_size == official[e.variant_name]['image_size'], e.name
        assert e.ap_published is not None and e.ap_official is not None  # as published by the source
        if e.source == 'effdet':  # the file name carries the first 8 hex digits of its sha256
            assert e.sha256_prefix and len(e.sha256_prefix) == 8 and e.file_name.endswith(f'-{e.sha256_prefix}.pth')
            assert e.compat == 'official' and e.url.startswith('https://github.com/rwightman/efficientdet-pytorch/')
        else:
            assert e.compat == 'zylo117' and e.file_name == f'efficientdet-d{e.variant}.pth'
        assert (e.mean is not None) == e.name.endswith('_ap') and (e.mean == (0.5,) * 3 if e.mean else True)
    for v in VARIANTS:  # coco = the effdet port of the official weights, for every variant
        coco = table.coco(v)
        assert coco is not None and coco.source == 'effdet' and coco.mean is None, v
    assert {e.variant for e in table.entries if e.source == 'yet_another'} == set(range(9))
    assert set(table.backbones) == {get_config(v).backbone for v in VARIANTS}


def test_docs_table_is_the_real_table():
    with open(os.path.join(ROOT, 'docs', 'weights.md'), encoding='utf-8') as f:
        text = f.read()
    rows = {ln.split('|')[1].strip(' `'): ln for ln in text.splitlines() if ln.startswith('| `')}
    for e in REAL_TABLE.entries:
        cells = [c.strip() for c in rows[e.name].split('|')]
        assert cells[2].endswith(f'(`-c {e.variant}`)') and cells[3] == e.source, e.name
        assert (int(cells[4]), float(cells[5]), float(cells[6])) == (e.input_size, e.ap_published, e.ap_official)
    for b in REAL_TABLE.backbones.values():
        assert f'| {b.name} | `{b.repo}` (`{b.file}`, `{b.revision}`) |' in text


# ------------------------------------------------------------------ ImageNet backbones (Hugging Face Hub)
def _hub_cache(root, backbone, model):
    """A Hugging Face cache holding timm's layout of ``model``'s backbone for ``backbone``."""
    from safetensors.torch import save_file
    row = REAL_TABLE.backbones[backbone]
    names = {}
    map_backbone_keys(names, model)
    own = model.state_dict()
    tensors = {theirs[len('backbone.'):]: own[ours].clone().contiguous() for ours, theirs in names.items()}
    tensors['classifier.weight'] = torch.zeros(1000, 1280)
    repo = os.path.join(root, 'models--' + row.repo.replace('/', '--'))
    commit = '0' * 40
    os.makedirs(os.path.join(repo, 'refs'))
    with open(os.path.join(repo, 'refs', row.revision), 'w') as f:
        f.write(commit)
    snap = os.path.join(repo, 'snapshots', commit)
    os.makedirs(snap)
    save_file(tensors, os.path.join(snap, row.file))


def test_backbone_weights_imagenet_from_the_hub_cache(tmp_path, monkeypatch):
    pytest.importorskip('huggingface_hub')
    pytest.importorskip('safetensors')
    from efficientdet.convert.backbone import load_backbone_weights
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf'))
    monkeypatch.setenv(zoo.OFFLINE_ENV, '1')  # only the cache: never the network
    monkeypatch.delenv(zoo.TABLE_ENV, raising=False)
    model = build_model(0, num_classes=3)
    with pytest.raises(UserError) as e:
        load_backbone_weights(model, 'imagenet')
    msg = str(e.value)
    assert '\n' not in msg and 'timm/tf_efficientnet_b0.aa_in1k/model.safetensors' in msg
    assert 'https://huggingface.co/timm/tf_efficientnet_b0.aa_in1k/resolve/main/model.safetensors' in msg
    torch.manual_seed(1)
    src = EfficientDetBackbone(num_classes=3, compound_coef=0)
    _hub_cache(str(tmp_path / 'hf'), 'efficientnet-b0', src)
    report = load_backbone_weights(model, 'imagenet')
    assert 'efficientnet-b0' in report and 'not used' in report
    own, ref = model.state_dict(), src.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in own if k.startswith('backbone_net.'))
    assert not torch.equal(own['classifier.header.pointwise_conv.conv.weight'],
                           ref['classifier.header.pointwise_conv.conv.weight'])  # heads keep their init


# ------------------------------------------------------------------ every script takes a name
def test_every_script_takes_a_released_name(env, tmp_path):
    """efficientdet_test.py, the video script, coco_eval.py, benchmark.py, export and train.py take
    `-w NAME` where they take a file (the name also gives the variant, `-c` left out); the file is
    downloaded once and every later use reads the cache."""
    import contextlib
    import io

    import cv2
    from conftest import ROOT, need_shared
    from efficientdet.data.shapes import generate_split
    sys.path.insert(0, ROOT)
    import benchmark
    import coco_eval
    import efficientdet_test
    import efficientdet_test_videos
    import train
    from efficientdet.export import main as export_main

    data = tmp_path / 'data'
    generate_split(str(data / 'shape'), 'val', 2, 128, seed=0)
    generate_split(str(data / 'shape'), 'train', 2, 128, seed=1)
    coco90 = tmp_path / 'coco90.yml'  # the COCO label map over coco_tiny
    coco90.write_text(open(os.path.join(ROOT, 'projects', 'coco.yml')).read().replace('project_name: coco',
                                                                                     'project_name: coco_tiny'))
    shared_data = os.path.dirname(need_shared('data', 'coco_tiny'))
    video = str(tmp_path / 'clip.mp4')
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'mp4v'), 5.0, (128, 96))
    for i in range(3):
        writer.write(np.full((96, 128, 3), 60 * i, np.uint8))
    writer.release()
    name = ['-w', 'tf_efficientdet_d0', '--image_size', '128']
    image = str(data / 'shape' / 'val' / sorted(os.listdir(data / 'shape' / 'val'))[0])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert efficientdet_test.main([image, '-p', 'coco', *name, '-o', str(tmp_path / 'out')]) == 0
        assert efficientdet_test_videos.main([video, '-p', 'coco', *name, '-o', str(tmp_path / 'v.mp4'),
                                              '--no_progress']) == 0
        assert coco_eval.main(['-p', str(coco90), *name, '--data_path', shared_data, '--max_images', '2',
                               '--output_dir', str(tmp_path / 'res'), '--no_progress']) == 0
        assert benchmark.main(['-p', 'coco', *name, '--iters', '1', '--warmup', '0', '--no-tune_malloc']) == 0
        assert export_main(['torchscript', '-p', 'coco', *name, '-o', str(tmp_path / 'm.pt')]) == 0
        assert train.main(['-p', 'shape', '-w', 'tf_efficientdet_d0', '--image_size', '128', '--data_path',
                           str(data), '--saved_path', str(tmp_path / 'ck'), '--log_path', str(tmp_path / 'logs'),
                           '--batch_size', '2', '-n', '0', '--num_epochs', '1', '--max_steps', '1', '--no_map',
                           '--save_interval', '0', '--bn_images', '0']) == 0
    assert env['server'].requests == [env['effdet']]  # one download for all six scripts
    assert os.path.isfile(tmp_path / 'm.pt') and os.listdir(tmp_path / 'ck')
