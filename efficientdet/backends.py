"""Alias module, kept for users' code: the runtimes live in ``efficientdet.runtimes`` (one module per
target; ``load_runtime``), the CPU tuning in ``efficientdet.runtimes.tuning``. The package itself
never imports this module.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .runtimes import Runtime, backend_names, load_runtime
from .runtimes.onnxruntime_backend import OnnxRuntimeModel
from .runtimes.openvino_backend import OpenVINOModel
from .runtimes.torchscript import TorchScriptModel
from .runtimes.tuning import tune_cpu_allocator

__all__ = ['OnnxRuntimeModel', 'OpenVINOModel', 'TorchScriptModel', 'load_backend', 'tune_cpu_allocator',
           'BACKENDS', 'Runtime']


def load_backend(backend: str, path: str, threads: Optional[int] = None, device: str = 'cpu',
                 providers: Optional[Sequence[str]] = None, half: bool = False) -> Runtime:
    """``efficientdet.runtimes.load_runtime``."""
    return load_runtime(backend, path, threads=threads, device=device, providers=providers, half=half)


def __getattr__(name: str):
    if name == 'BACKENDS':
        return backend_names()
    raise AttributeError(name)
