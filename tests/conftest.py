import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(ROOT, '..', 'shared'))
FIXTURES = os.path.join(SHARED, 'fixtures')
COCO_TINY = os.path.join(SHARED, 'data', 'coco_tiny')
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


# CI sets this: a test that would skip for a missing optional dependency (openvino, albumentations,
# matplotlib, the converters ...), a missing oneDNN path or missing reference data fails instead, so a
# broken install cannot pass as skips. Only skips for hardware this machine lacks (skip_hardware) pass.
STRICT = os.environ.get('EFFICIENTDET_STRICT_TESTS', '') not in ('', '0')
HARDWARE = 'hardware: '


def skip_hardware(reason: str) -> None:
    """Skip for hardware this machine lacks (a GPU, a CPU feature): allowed under the strict CI flag."""
    pytest.skip(HARDWARE + reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not getattr(report, 'wasxfail', None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if HARDWARE not in reason:
            report.outcome = 'failed'
            report.longrepr = (f'skipped under EFFICIENTDET_STRICT_TESTS=1 (CI installs every optional dependency '
                               f'and has ../shared): {reason}')


def run_isolated(func, *args):
    """``func(*args)`` in a fresh Python process (spawn), its result or exception handed back: for
    native runtimes (OpenVINO's int8 kernels, NNCF) whose threads and global state must not outlive a
    test in the long-lived pytest process. ``func`` must be a module-level function."""
    import multiprocessing as mp
    with mp.get_context('spawn').Pool(1) as pool:
        return pool.apply(func, args)


def need_shared(*parts: str) -> str:
    """Path under ../shared, or skip the test saying why."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'reference data {path} is absent (../shared is only present beside a CI/dev checkout)')
    return path


def load_npz(*parts: str) -> dict:
    with np.load(need_shared(*parts), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope='session')
def tf_d0():
    return load_npz('fixtures', 'tf_d0', 'tf_outputs.npz')


@pytest.fixture(scope='session')
def zylo_d0():
    return load_npz('fixtures', 'zylo117_d0', 'zylo117_outputs.npz')


@pytest.fixture(scope='module')
def one_thread():
    """Small tensors: one thread is faster and immune to OpenMP spin-waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pycocotools_coco(data: dict):
    """A plain pycocotools COCO over a deep copy of ``data``: the reference path, deliberately not
    going through this project's loaders."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    c = COCO()
    c.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


TINY_PROJECT_YML = """project_name: tiny
train_set: train
val_set: val
num_gpus: 1
obj_list: ['rectangle', 'circle', 'triangle']
"""


def make_tiny_project(root, n_train: int = 6, n_val: int = 2, size: int = 128) -> str:
    """A generated shapes project 'tiny' under ``root``: ``projects/tiny.yml`` and
    ``data/tiny/{train,val}`` (``n_train`` / ``n_val`` images of ``size`` px, seed 0). Returns
    ``root`` as a string (the folder to run the scripts from)."""
    from efficientdet.data import shapes
    root = str(root)
    shapes.generate_split(os.path.join(root, 'data', 'tiny'), 'train', n_train, size, seed=0)
    shapes.generate_split(os.path.join(root, 'data', 'tiny'), 'val', n_val, size, seed=0)
    os.makedirs(os.path.join(root, 'projects'), exist_ok=True)
    with open(os.path.join(root, 'projects', 'tiny.yml'), 'w') as f:
        f.write(TINY_PROJECT_YML)
    return root
