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
