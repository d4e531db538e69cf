"""Runtimes for exported models, with the calling contract of ``EfficientDetBackbone``.

``OnnxRuntimeModel(path)(x)`` and ``TorchScriptModel(path)(x)`` take a normalised NCHW batch
(float tensor) and return ``(None, regression [B, A, 4] (ty, tx, th, tw), classification [B, A, C]
after sigmoid, anchors [1, A, 4] (y1, x1, y2, x2) input pixels)`` as torch tensors, so
``efficientdet.detector.Detector`` and the scripts can use them in place of the PyTorch model
(``--backend onnxruntime`` / ``--backend torchscript``). The input H x W must be the exported one
(``.image_size``).

ONNX files exported ``--with-nms`` are run with :meth:`OnnxRuntimeModel.run` (outputs by name);
calling them like a backbone raises UserError.

TorchScript archives are loaded with ``torch.jit.load``: only load files you trust.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import UserError

__all__ = ['OnnxRuntimeModel', 'TorchScriptModel', 'load_backend', 'tune_cpu_allocator', 'BACKENDS']

BACKENDS = ('torch', 'onnxruntime', 'torchscript')
Output = Tuple[None, torch.Tensor, torch.Tensor, torch.Tensor]


def _parse_meta(meta: Dict[str, str]) -> Dict[str, object]:
    out: Dict[str, object] = dict(meta)
    for key in ('image_size', 'obj_list', 'mean', 'std'):
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except ValueError:
                pass
    for key in ('compound_coef', 'num_classes', 'max_det', 'pre_nms_topk'):
        if key in meta:
            try:
                out[key] = int(meta[key])
            except ValueError:
                pass
    for key in ('with_nms', 'channels_last'):
        if key in meta:
            out[key] = meta[key] == 'true'
    return out


class _Runtime:
    """Shared conveniences so a runtime can stand where an ``nn.Module`` is expected."""
    meta: Dict[str, object]
    image_size: Optional[Tuple[int, int]]

    def eval(self) -> '_Runtime':
        return self

    def to(self, *args, **kwargs) -> '_Runtime':
        return self

    @property
    def num_classes(self) -> Optional[int]:
        n = self.meta.get('num_classes')
        return int(n) if n is not None else None

    @property
    def compound_coef(self) -> Optional[int]:
        c = self.meta.get('compound_coef')
        return int(c) if c is not None else None

    def _check_input(self, x: torch.Tensor, path: str) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise UserError(f'{path}: expects a [B, 3, H, W] batch, got shape {tuple(x.shape)}')
        if self.image_size is not None and tuple(x.shape[-2:]) != tuple(self.image_size):
            raise UserError(f'{path} was exported for {self.image_size[0]}x{self.image_size[1]} inputs, got '
                            f'{x.shape[-2]}x{x.shape[-1]}; use --image_size {self.image_size[0]} or re-export '
                            'at the size you need')


class OnnxRuntimeModel(_Runtime):
    """onnxruntime CPU session on an exported ``.onnx`` file.

    ``threads``: intra-op threads (None: onnxruntime's default, all cores); inter-op 1,
    sequential execution, graph optimisation level ORT_ENABLE_ALL. ``spin=False`` (default) lets
    idle intra-op threads sleep instead of spinning after each run, so they do not take the
    cores from the preprocessing and NMS around the call (measured: D0 end2end preprocess
    ~4.5 -> ~2 ms on 2 cores).
    """

    def __init__(self, path: str, threads: Optional[int] = None, providers: Optional[List[str]] = None,
                 spin: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError('--backend onnxruntime needs the onnxruntime package: pip install onnxruntime') from None
        if not os.path.isfile(path):
            raise UserError(f'{path}: no such ONNX file; export one with python -m efficientdet.export onnx ... -o {path}')
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads:
            so.intra_op_num_threads = int(threads)
        if not spin:  # idle workers sleep: they would otherwise spin through our pre/post-processing
            so.add_session_config_entry('session.intra_op.allow_spinning', '0')
        try:
            self.session = ort.InferenceSession(path, so, providers=providers or ['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
            raise UserError(f'{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})') from None
        self.path = path
        self.meta = _parse_meta(dict(self.session.get_modelmeta().custom_metadata_map))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = inp.shape
        self.image_size = (int(shape[2]), int(shape[3])) if all(isinstance(s, int) for s in shape[2:4]) else None
        self.with_nms = 'boxes' in self.output_names and 'regression' not in self.output_names
        self.device = torch.device('cpu')

    def run(self, x: torch.Tensor) -> Dict[str, np.ndarray]:
        """All outputs by name, as numpy arrays."""
        self._check_input(x, self.path)
        arr = np.ascontiguousarray(x.detach().to('cpu', torch.float32).numpy())
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: arr})))

    def __call__(self, x: torch.Tensor) -> Output:
        if self.with_nms:
            raise UserError(f'{self.path} was exported --with-nms (outputs boxes/scores/labels); use its .run() '
                            'or export without --with-nms for the Detector / --backend onnxruntime')
        out = self.run(x)
        try:
            reg, cls, anc = (torch.from_numpy(out[k]) for k in ('regression', 'classification', 'anchors'))
        except KeyError:
            raise UserError(f'{self.path}: outputs {self.output_names} are not regression/classification/anchors; '
                            'export it with python -m efficientdet.export onnx') from None
        return None, reg, cls, anc


class TorchScriptModel(_Runtime):
    """A TorchScript file from ``python -m efficientdet.export torchscript`` (returns
    ``(regression, classification, anchors)``), run under ``torch.inference_mode``.

    ``threads`` sets torch's intra-op threads (process-wide). Inputs are moved to ``device`` and
    made channels_last when the file was traced that way.
    """

    def __init__(self, path: str, threads: Optional[int] = None, device: str = 'cpu'):
        if not os.path.isfile(path):
            raise UserError(f'{path}: no such TorchScript file; export one with python -m efficientdet.export '
                            f'torchscript ... -o {path}')
        if threads:
            torch.set_num_threads(int(threads))
        files = {'meta.json': ''}
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
                warnings.simplefilter('ignore', DeprecationWarning)
                self.module = torch.jit.load(path, map_location=device, _extra_files=files)
        except (RuntimeError, ValueError) as e:
            raise UserError(f'{path}: not a loadable TorchScript file ({str(e).splitlines()[0]})') from None
        self.module.eval()
        self.path = path
        self.device = torch.device(device)
        try:
            self.meta = _parse_meta(json.loads(files['meta.json'] or '{}'))
        except ValueError:
            self.meta = {}
        size = self.meta.get('image_size')
        self.image_size = (int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else None
        self.channels_last = bool(self.meta.get('channels_last', False))

    def __call__(self, x: torch.Tensor) -> Output:
        self._check_input(x, self.path)
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            reg, cls, anc = self.module(x)
        return None, reg, cls, anc


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Process-wide (the library never calls it; ``benchmark.py`` does by default on CPU): keep
    freed memory inside the process instead of returning it to the OS (glibc ``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). Large activations are then reused
    instead of being page-faulted in afresh on every call, which costs ~20% of D3's CPU latency on
    a VM; the price is that the resident memory stays at its peak. Call it once at start-up,
    before building the model. Returns False where it does not apply (not glibc)."""
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


def load_backend(backend: str, path: str, threads: Optional[int] = None, device: str = 'cpu'):
    """``OnnxRuntimeModel`` or ``TorchScriptModel`` for ``--backend``; UserError for other names."""
    if backend == 'onnxruntime':
        if device not in ('cpu', None):
            raise UserError('--backend onnxruntime runs on the CPU here; use --device cpu')
        return OnnxRuntimeModel(path, threads)
    if backend == 'torchscript':
        return TorchScriptModel(path, threads, device)
    raise UserError(f'--backend {backend!r}: choose onnxruntime or torchscript for an exported file '
                    '(torch runs the .pth checkpoint directly)')
