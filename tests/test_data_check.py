"""Broken datasets: CocoDataset skips and counts, ``python -m efficientdet.data.check`` lists and exits 1/2."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from efficientdet.data import CocoDataset
from efficientdet.data.check import main as check_main
from efficientdet.data.dataset import build_dataloader
from efficientdet.data.shapes import CLASSES, generate_split
from efficientdet.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64

EXPECTED = dict(missing_image=1, corrupt_image=1, bad_box=2, unknown_category=1, annotation_missing_fields=1,
                duplicate_image_id=1, duplicate_annotation_id=1, unknown_image=1, image_without_annotations=1)


def make_set(base, name, n_train=10, n_val=3, seed=0):
    root = base / name
    generate_split(str(root), 'train', n_train, SIZE, seed)
    generate_split(str(root), 'val', n_val, SIZE, seed)
    projects = base / 'projects'
    projects.mkdir(exist_ok=True)
    (projects / f'{name}.yml').write_text(
        f"project_name: {name}\ntrain_set: train\nval_set: val\nobj_list: {list(CLASSES)}\n")
    return root


def ann_path(root, split='train'):
    return root / 'annotations' / f'instances_{split}.json'


def break_set(root):
    """One of each problem in the train split, each on a different image / annotation."""
    path = ann_path(root)
    data = json.loads(path.read_text())
    by_img = {}
    for a in data['annotations']:
        by_img.setdefault(a['image_id'], []).append(a)
    multi = [i for i in sorted(by_img) if len(by_img[i]) >= 2]  # images keeping a box after one is broken
    assert len(multi) >= 4, 'seed gives too few multi-object images'
    imgs = {im['id']: im for im in data['images']}
    (root / 'train' / imgs[1]['file_name']).write_bytes(b'\xff\xd8 this is not a jpeg' * 10)   # corrupt
    os.remove(root / 'train' / imgs[2]['file_name'])                                            # missing
    others = [i for i in multi if i not in (1, 2)]
    by_img[others[0]][0]['bbox'][2] = -5.0                                                      # negative w
    by_img[others[0]][1]['bbox'] = [SIZE + 10.0, 5.0, 10.0, 10.0]                              # outside
    by_img[others[1]][0]['category_id'] = 99                                                    # unknown cat
    del by_img[others[2]][0]['bbox']                                                           # missing field
    by_img[others[3]][0]['id'] = by_img[others[3]][1]['id']                                    # duplicate ann id
    data['annotations'].append(dict(id=10 ** 6, image_id=4242, category_id=1, bbox=[1, 1, 9, 9]))  # unknown image
    lonely = [i for i in sorted(imgs) if i not in (1, 2) and i not in others[:4]][0]
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] != lonely]          # no boxes
    data['images'].append(dict(imgs[lonely]))                                                   # duplicate id
    path.write_text(json.dumps(data))
    return data


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    clean = make_set(base, 'clean')
    broken = make_set(base, 'broken')
    data = break_set(broken)
    return base, clean, broken, data


def test_dataset_counts_every_problem(sets):
    _, _, broken, data = sets
    ds = CocoDataset(str(broken), 'train', list(CLASSES), SIZE)
    assert len(ds) == 9  # 10 images, one file missing (duplicate entry skipped)
    st = ds.stats
    for k, v in EXPECTED.items():
        if k != 'corrupt_image':
            assert st[k] == v, k
    assert st['corrupt_image'] == 0  # found lazily, when the image is loaded
    corrupt_idx = ds.image_ids.index(1)
    item = ds[corrupt_idx]
    assert item['image_id'] == ds.image_ids[corrupt_idx + 1]  # the next readable image stands in
    assert ds.stats['corrupt_image'] == 1
    ds[corrupt_idx]
    assert ds.stats['corrupt_image'] == 1  # counted once per image
    line = ds.summary()
    assert '\n' not in line and 'corrupt_image=1' in line and 'bad_box=2' in line and 'missing_image=1' in line
    n_boxes = sum(len(ds[i]['annot']) for i in range(len(ds)) if ds.image_ids[i] != 1)
    assert n_boxes == st['boxes'] - len(ds.annotations(corrupt_idx)[0])


def test_corrupt_images_counted_from_workers(sets):
    _, _, broken, _ = sets
    ds = CocoDataset(str(broken), 'train', list(CLASSES), SIZE)
    ids = [i for b in build_dataloader(ds, 3, num_workers=1) for i in b['image_id']]
    assert len(ids) == len(ds) and 1 not in ids
    assert ds.stats['corrupt_image'] == 1  # seen by the worker, visible in the main process


def test_clean_set_and_check_in_process(sets, capsys):
    base, clean, _, _ = sets
    ds = CocoDataset(str(clean), 'val', list(CLASSES), SIZE)
    assert all(v == 0 for k, v in ds.stats.items() if k not in ('images', 'boxes', 'crowd'))
    args = ['--data_path', str(base), '--projects_dir', str(base / 'projects')]
    assert check_main(['-p', 'clean'] + args) == 0
    assert 'result: clean' in capsys.readouterr().out
    assert check_main(['-p', 'broken'] + args) == 1
    out = capsys.readouterr().out
    for k, v in EXPECTED.items():
        assert f'{k}: {v} ' in out, k
    assert out.count('e.g.') >= len(EXPECTED)


def test_notes_do_not_fail_the_check(sets, tmp_path):
    base, clean, _, _ = sets
    root = tmp_path / 'notes'
    shutil.copytree(clean, root)
    shutil.copy(base / 'projects' / 'clean.yml', tmp_path / 'notes.yml')
    yml = tmp_path / 'notes.yml'
    yml.write_text(yml.read_text().replace('project_name: clean', 'project_name: notes'))
    data = json.loads(ann_path(root).read_text())
    data['annotations'] = [a for a in data['annotations'] if a['image_id'] != 1]  # a negative image
    data['images'][1]['height'] = 2 * SIZE                                          # wrong size in the json
    ann_path(root).write_text(json.dumps(data))
    assert check_main(['-p', str(yml), '--data_path', str(tmp_path)]) == 0
    ds = CocoDataset(str(root), 'train', list(CLASSES), SIZE)
    s = ds[1]
    assert s['orig_size'] == (SIZE, SIZE) and s['scale'] == 1.0 and ds.stats['size_mismatch'] == 1
    assert ds.stats['image_without_annotations'] == 1 and len(ds[0]['annot']) == 0
    assert 'nothing skipped' in ds.summary()


@pytest.mark.parametrize('mutate,match', [
    (lambda p: p.write_text('{"images": [1, 2'), 'not a JSON file'),
    (lambda p: p.write_text('[]'), 'not a COCO instances annotation file'),
    (lambda p: p.write_text('{"images": [], "annotations": []}'), 'categories'),
    (lambda p: p.write_text(json.dumps(dict(images=[], annotations=[], categories=[dict(id=1, name='square')]))),
     'square'),
    (lambda p: os.remove(p), 'instances_train.json'),
])
def test_structural_problems_are_user_errors(sets, tmp_path, mutate, match):
    _, clean, _, _ = sets
    root = tmp_path / 'x'
    shutil.copytree(clean, root)
    mutate(ann_path(root))
    with pytest.raises(UserError, match=match) as e:
        CocoDataset(str(root), 'train', list(CLASSES), SIZE)
    assert 'instances_train.json' in str(e.value)


def run_check(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run([sys.executable, '-m', 'efficientdet.data.check', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_check_cli_exit_codes(sets, tmp_path):
    base, clean, broken, _ = sets
    common = ['--data_path', str(base), '--projects_dir', str(base / 'projects')]
    r = run_check('-p', 'broken', *common)
    assert r.returncode == 1, r.stderr
    assert 'corrupt_image: 1' in r.stdout and 'missing_image: 1' in r.stdout and 'training would skip' in r.stdout
    bad = tmp_path / 'bad'
    shutil.copytree(clean, bad)
    ann_path(bad, 'val').write_text('not json at all')
    shutil.copy(base / 'projects' / 'clean.yml', tmp_path / 'bad.yml')
    (tmp_path / 'bad.yml').write_text((tmp_path / 'bad.yml').read_text().replace('clean', 'bad'))
    r = run_check('-p', str(tmp_path / 'bad.yml'), '--data_path', str(tmp_path))
    assert r.returncode == 2 and 'not a JSON file' in r.stderr and 'Traceback' not in r.stderr
    assert 'instances_val.json' in r.stderr
