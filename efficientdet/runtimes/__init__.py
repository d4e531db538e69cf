"""Deploy targets and runtimes, one module per target behind one interface (``base.Target``).

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

A new target (TensorRT, TFLite ...) is one new module defining ``TARGET`` and one line in
``_MODULES``: ``python -m efficientdet.export``, ``--backend`` in the scripts, ``benchmark.py`` and
``Detector.from_exported`` pick it up from here. Modules are imported on first use, so a
target's optional packages are needed only when it is used.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Sequence, Tuple

from ..errors import UserError
from .base import Runtime, Target

__all__ = ['BACKENDS', 'EXPORT_FORMATS', 'get_target', 'target_for_format', 'load_runtime', 'Runtime', 'Target']

_MODULES: Dict[str, str] = {
    'torch': 'eager',
    'onnxruntime': 'onnxruntime_backend',
    'openvino': 'openvino_backend',
    'torchscript': 'torchscript',
    'litert': 'litert_backend',
}
_FORMATS: Dict[str, str] = {'onnx': 'onnxruntime', 'torchscript': 'torchscript', 'openvino': 'openvino',
                            'tflite': 'litert'}
BACKENDS: Tuple[str, ...] = tuple(_MODULES)
EXPORT_FORMATS: Tuple[str, ...] = tuple(_FORMATS)


def get_target(name: str) -> Target:
    """The target called ``name`` (a ``--backend`` value); UserError listing them otherwise."""
    if name not in _MODULES:
        raise UserError(f'--backend {name!r}: choose one of {", ".join(BACKENDS)}')
    return importlib.import_module(f'{__name__}.{_MODULES[name]}').TARGET


def target_for_format(fmt: str) -> Target:
    """The target that writes ``python -m efficientdet.export FMT`` files."""
    if fmt not in _FORMATS:
        raise UserError(f'export format {fmt!r}: choose one of {", ".join(EXPORT_FORMATS)}')
    return get_target(_FORMATS[fmt])


def load_runtime(backend: str, path: str, threads: Optional[int] = None, device: str = 'cpu',
                 providers: Optional[Sequence[str]] = None, half: bool = False) -> Runtime:
    """Run an exported file with ``backend`` ('onnxruntime', 'openvino', 'torchscript');
    ``half``: reduced-precision compute where the backend has it (openvino: bfloat16 or float16)."""
    if backend == 'torch':
        raise UserError('--backend torch runs the .pth checkpoint directly (-w); the other backends run an '
                        'exported file')
    if providers and backend != 'onnxruntime':
        raise UserError('--providers is for --backend onnxruntime')
    target = get_target(backend)
    if half and not target.supports_half:
        half_ok = ', '.join(['torch'] + [n for n in BACKENDS if n != 'torch' and get_target(n).supports_half])
        raise UserError(f'--half: --backend {backend} runs the exported file in the precision it was exported with; '
                        f'--half applies to {half_ok}')
    return target.load(path, threads=threads, device=device, providers=providers, half=half)
