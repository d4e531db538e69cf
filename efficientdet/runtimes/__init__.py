"""Deploy targets and runtimes: one module per target, one registration each.

    from efficientdet.runtimes import get_target, load_runtime
    get_target('openvino').export(model, 'd0.xml')          # verified against the eager model
    runtime = load_runtime('openvino', 'd0.xml', threads=2)  # runtime(x) -> (None, reg, scores, anchors)

| name | module | files | export sub-command |
|---|---|---|---|
| torch | ``eager`` | the ``.pth`` checkpoint (``factory.build_model``) | — |
| torchscript | ``torchscript`` | ``.pt`` | ``torchscript`` |
| onnxruntime | ``onnxruntime_backend`` (graph: ``onnx_graph``) | ``.onnx`` | ``onnx`` |
| openvino | ``openvino_backend`` | ``.xml`` + ``.bin`` (or ``.onnx``) | ``openvino`` |
| litert | ``litert_backend`` | ``.tflite`` (LiteRT / TFLite) | ``tflite`` |

A target is a module defining a :class:`~.base.Target` and calling :func:`register_target` with it
(a target of another package does the same; ``efficientdet.plugins`` says how the scripts find
it). ``python -m efficientdet.export``, ``--backend`` in every script, ``benchmark.py`` and
``Detector.from_exported`` take the registered targets from here. A target imports its optional
packages when it is used, so they are needed only then.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import UserError
from .base import _TARGETS, Runtime, Target, backend_names, export_formats, refuse_compile, register_target

__all__ = ['register_target', 'backend_names', 'export_formats', 'get_target', 'target_for_format', 'load_runtime',
           'check_backend_options', 'Runtime', 'Target']


def get_target(name: str) -> Target:
    """The target called ``name`` (a ``--backend`` value); UserError listing them otherwise."""
    if name not in _TARGETS:
        raise UserError(f'--backend {name!r}: choose one of {", ".join(backend_names())}')
    return _TARGETS[name]


def target_for_format(fmt: str) -> Target:
    """The target that writes ``python -m efficientdet.export FMT`` files."""
    for target in _TARGETS.values():
        if target.export_format == fmt:
            return target
    raise UserError(f'export format {fmt!r}: choose one of {", ".join(export_formats())}')


def check_backend_options(backend: str, providers: Optional[Sequence[str]] = None, half: bool = False,
                          compile: bool = False) -> Target:
    """The one check of the options that only some backends take (``--providers``: onnxruntime;
    ``--half``: the targets that support it; ``--compile``: torch); returns the target."""
    target = get_target(backend)
    if providers and backend != 'onnxruntime':
        raise UserError('--providers is for --backend onnxruntime')
    if compile and backend != 'torch':
        refuse_compile(backend)
    if half and backend != 'torch' and not target.supports_half:
        half_ok = ', '.join(n for n, t in _TARGETS.items() if n == 'torch' or t.supports_half)
        raise UserError(f'--half: --backend {backend} runs the exported file in the precision it was exported with; '
                        f'--half applies to {half_ok}')
    return target


def load_runtime(backend: str, path: str, threads: Optional[int] = None, device: str = 'cpu',
                 providers: Optional[Sequence[str]] = None, half: bool = False) -> Runtime:
    """Run an exported file with ``backend``; ``half``: reduced-precision compute where the backend
    has it (openvino: bfloat16 or float16)."""
    if backend == 'torch':
        raise UserError('--backend torch runs the .pth checkpoint directly (-w); the other backends run an '
                        'exported file')
    target = check_backend_options(backend, providers, half)
    return target.load(path, threads=threads, device=device, providers=providers, half=half)


def __getattr__(name: str):  # the registries as they stand now, for code that read the old constants
    if name == 'BACKENDS':
        return backend_names()
    if name == 'EXPORT_FORMATS':
        return export_formats()
    raise AttributeError(name)


from . import eager, litert_backend, onnxruntime_backend, openvino_backend, torchscript  # noqa: E402,F401
