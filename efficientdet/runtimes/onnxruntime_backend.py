"""Target 'onnxruntime': ``python -m efficientdet.export onnx`` files run by onnxruntime.

``--providers`` chooses onnxruntime execution providers (default CPUExecutionProvider; e.g.
CUDAExecutionProvider, TensorrtExecutionProvider where installed). Files exported ``--with-nms``
are run with :meth:`OnnxRuntimeModel.run` (outputs by name).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..postprocess import PRE_NMS_TOPK
from . import onnx_graph
from .base import Runtime, SizeLike, Target, parse_meta, register_target, require

__all__ = ['OnnxRuntimeModel', 'TARGET']


class OnnxRuntimeModel(Runtime):
    """onnxruntime session on an exported ``.onnx`` file (contract: ``efficientdet.runtimes.base``).

    ``threads``: intra-op threads (None: onnxruntime's default, all cores); inter-op 1,
    sequential execution, graph optimisation ORT_ENABLE_ALL. ``spin=False`` (default) lets idle
    intra-op threads sleep instead of spinning after each run, so they do not take the cores from
    the pre- and post-processing around the call. ``providers``: execution providers in order of
    preference (default CPU).
    """

    name = 'onnxruntime'

    def __init__(self, path: str, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 spin: bool = False):
        ort = require('onnxruntime', '--backend onnxruntime', 'onnxruntime')
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
        providers = list(providers) if providers else ['CPUExecutionProvider']
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise UserError(f'--providers {",".join(missing)}: not available in this onnxruntime (available: '
                            f'{", ".join(ort.get_available_providers())})')
        try:
            self.session = ort.InferenceSession(path, so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
            raise UserError(f'{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})') from None
        self.path = path
        self.meta = parse_meta(dict(self.session.get_modelmeta().custom_metadata_map))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = inp.shape
        self.image_size = (int(shape[2]), int(shape[3])) if all(isinstance(s, int) for s in shape[2:4]) else None
        self.device = torch.device('cpu')

    def run(self, x: torch.Tensor) -> Dict[str, np.ndarray]:
        """All outputs by name, as numpy arrays."""
        self.check_input(x)
        arr = np.ascontiguousarray(x.detach().to('cpu', torch.float32).numpy())
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: arr})))


class _OnnxRuntimeTarget(Target):
    name = 'onnxruntime'
    export_format = 'onnx'
    suffix = '.onnx'
    requires = ('onnx', 'onnxruntime')

    def add_export_arguments(self, p: argparse.ArgumentParser) -> None:
        onnx_graph.add_graph_arguments(p)
        from ..options import add_options
        p.add_argument('--with_nms', '--with-nms', dest='with_nms', action='store_true',
                       help='include decoding + per-class NMS (ONNX NonMaxSuppression); outputs boxes, '
                            'scores, labels, num_detections')
        add_options(p, 'threshold', 'iou', 'max_det', threshold=0.05, iou=0.5)
        p.add_argument('--pre_nms_topk', type=int, default=PRE_NMS_TOPK, help='candidates per image before the NMS')

    def export_options(self, args: argparse.Namespace) -> Dict[str, Any]:
        if not 0 <= args.threshold <= 1 or not 0 <= args.iou <= 1:
            raise UserError('--threshold and --iou must be between 0 and 1')
        if args.max_det < 1 or args.pre_nms_topk < 1:
            raise UserError('--max_det and --pre_nms_topk must be at least 1')
        return dict({k: getattr(args, k) for k in ('head', 'opset', 'dynamic_batch', 'with_nms', 'max_det',
                                                   'pre_nms_topk')}, score_threshold=args.threshold,
                    iou_threshold=args.iou)

    def export(self, model: nn.Module, path: str, image_size: Optional[SizeLike] = None, verify: bool = True,
               atol: float = 1e-4, **options) -> Dict[str, float]:
        """ONNX file at ``path`` (options: ``onnx_graph.export_graph``'s), checked with
        ``onnx.checker`` and against the eager model in onnxruntime unless ``verify=False``."""
        reference, names, size = onnx_graph.export_graph(model, path, image_size, **options)
        if not verify:
            return {}
        import onnx
        onnx.checker.check_model(path, full_check=True)
        batch = 2 if options.get('dynamic_batch', True) else 1
        return onnx_graph.verify(path, OnnxRuntimeModel(path), reference, names, size, atol, batch)

    def load(self, path: str, threads: Optional[int] = None, device: str = 'cpu',
             providers: Optional[Sequence[str]] = None, half: bool = False) -> OnnxRuntimeModel:
        if device not in ('cpu', None) and not providers:
            raise UserError('--backend onnxruntime: choose the device with --providers (e.g. CUDAExecutionProvider); '
                            '--device is for the torch backends')
        return OnnxRuntimeModel(path, threads, providers)


TARGET = register_target(_OnnxRuntimeTarget())
