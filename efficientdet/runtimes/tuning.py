"""Process-wide CPU tuning for inference (``benchmark.py`` applies it by default on a CPU)."""
from __future__ import annotations

import sys

__all__ = ['tune_cpu_allocator']


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
