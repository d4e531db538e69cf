"""Runtimes for exported models (``--backend``), and process-wide CPU tuning.

The runtimes live in ``efficientdet.runtimes`` (one module per target); this module is their
short public face: ``load_backend(name, path)`` and the runtime classes. A runtime takes a
normalised NCHW float batch and returns ``(None, regression [B, A, 4] (ty, tx, th, tw), scores,
anchors [1, A, 4] (y1, x1, y2, x2) input pixels)``, ``scores`` being the classification [B, A, C]
after sigmoid or a :class:`~efficientdet.postprocess.BestClass`; ``Detector``, ``run_coco_eval``
and ``benchmark.py`` take it in place of the PyTorch model.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .runtimes import BACKENDS, Runtime, load_runtime
from .runtimes.onnxruntime_backend import OnnxRuntimeModel
from .runtimes.openvino_backend import OpenVINOModel
from .runtimes.torchscript import TorchScriptModel

__all__ = ['OnnxRuntimeModel', 'OpenVINOModel', 'TorchScriptModel', 'load_backend', 'tune_cpu_allocator',
           'BACKENDS', 'Runtime']


def load_backend(backend: str, path: str, threads: Optional[int] = None, device: str = 'cpu',
                 providers: Optional[Sequence[str]] = None, half: bool = False) -> Runtime:
    """The runtime for ``--backend`` on an exported file; UserError for 'torch' or unknown names."""
    return load_runtime(backend, path, threads=threads, device=device, providers=providers, half=half)


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Process-wide (the library never calls it; ``benchmark.py`` does by default on CPU): keep
    freed memory inside the process instead of returning it to the OS (glibc ``mallopt``
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). Large activations are then reused instead of being
    page-faulted in afresh on every call, which costs ~20% of D3's CPU latency on a VM; the price
    is that the resident memory stays at its peak. Call it once at start-up, before building the
    model. Returns False where it does not apply (not glibc)."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library('c')
    if not name or not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok_mmap = libc.mallopt(m_mmap_threshold, int(threshold_bytes)) == 1
        ok_trim = libc.mallopt(m_trim_threshold, int(threshold_bytes)) == 1
        return ok_mmap or ok_trim
    except (OSError, AttributeError):
        return False
