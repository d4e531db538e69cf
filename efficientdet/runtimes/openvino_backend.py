"""Target 'openvino': OpenVINO IR (``.xml`` + ``.bin``) run by the OpenVINO runtime on the CPU.

``python -m efficientdet.export openvino -o d0.xml`` writes the ONNX graph of the fused model
(``onnx_graph``) and converts it with ``openvino.convert_model`` (float32 weights kept), with the
export's metadata in the IR's ``rt_info`` (section ``efficientdet``). The runtime also runs a
``.onnx`` file from ``python -m efficientdet.export onnx`` directly.

``--int8`` quantizes the IR with NNCF post-training quantization (``nncf.quantize``, preset
MIXED), calibrated on training images of the project (``-p``, ``--data_path``, ``--calib_images``:
``runtimes.calibration``); the anchors output is a graph constant and stays float32, as does the box
decoding outside the graph. int8 pays off on CPUs with VNNI / AMX int8 instructions.

Needs the optional ``openvino`` package (``pip install openvino`` or ``pip install
.[openvino]``), and ``nncf`` for ``--int8``. Inference precision is float32 by default (OpenVINO would otherwise pick bf16 on
CPUs that have it); a network per batch size is compiled on first use of that size.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from . import onnx_graph
from .base import Runtime, SizeLike, Target, parse_meta, register_target, require
from .quiet import quiet_output

__all__ = ['OpenVINOModel', 'TARGET', 'require_openvino', 'require_nncf', 'quantize_int8', 'reduced_precision']

_META_SECTION = 'efficientdet'


def require_openvino():
    """The ``openvino`` module, or UserError saying how to install it."""
    return require('openvino', '--backend openvino', 'openvino (or pip install .[openvino])')


def _read_meta(ov_model, path: str) -> Dict[str, str]:
    if path.lower().endswith('.onnx'):  # OpenVINO does not carry ONNX metadata_props over
        try:
            import onnx
            return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        except ImportError:
            return {}
    if not ov_model.has_rt_info([_META_SECTION]):
        return {}
    section = ov_model.get_rt_info()[_META_SECTION]
    return {k: ov_model.get_rt_info([_META_SECTION, k]).astype(str) for k in section}


def reduced_precision(device: str = 'CPU') -> str:
    """The inference precision ``--half`` means on this CPU: 'bf16' where it has bfloat16
    instructions (AVX512-BF16, AMX), else 'f16' where it has float16 ones; UserError otherwise."""
    caps = require_openvino().Core().get_property(device, 'OPTIMIZATION_CAPABILITIES')
    if 'BF16' in caps:
        return 'bf16'
    if 'FP16' in caps:
        return 'f16'
    raise UserError(f'--half: this {device} has neither bfloat16 nor float16 instructions for OpenVINO '
                    f'(capabilities: {", ".join(caps)}); run without --half')


class OpenVINOModel(Runtime):
    """An OpenVINO IR (``.xml``) or ``.onnx`` file compiled for the CPU (contract:
    ``efficientdet.runtimes.base``).

    ``threads``: inference threads (None: OpenVINO's default); one stream, latency hint. The
    compiled network reads its input in B, H, W, 3 memory order (a pre-processing step of
    OpenVINO's own, so the first convolution needs no reorder): a ``torch.channels_last`` batch
    (``preprocess_batch(channels_last=True)``, what ``Detector`` gives it) is passed without a copy.
    ``precision``: 'f32' (default, same numbers as torch within 1e-4) or 'bf16' / 'f16' where the
    CPU supports them (``--half``; see :func:`reduced_precision`): about twice as fast on a CPU with
    AVX512-BF16, at a small cost in accuracy (measured in docs/benchmark.md).
    """

    name = 'openvino'
    channels_last = True  # the input layout it reads without a copy (see Detector.preprocess)

    def __init__(self, path: str, threads: Optional[int] = None, precision: str = 'f32', device: str = 'CPU'):
        ov = require_openvino()
        if not os.path.isfile(path):
            raise UserError(f'{path}: no such OpenVINO IR / ONNX file; export one with python -m efficientdet.export '
                            f'openvino ... -o {path}')
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(path)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise UserError(f'{path}: OpenVINO cannot read it ({str(e).splitlines()[0]})') from None
        self.path = path
        self.precision = precision
        self.meta = parse_meta(_read_meta(self.model, path))
        self.output_names = [o.get_any_name() for o in self.model.outputs]
        shape = self.model.inputs[0].get_partial_shape()
        hw = shape[2], shape[3]
        self.image_size = (hw[0].get_length(), hw[1].get_length()) if all(d.is_static for d in hw) else None
        self.config: Dict[str, Any] = {'PERFORMANCE_HINT': 'LATENCY', 'NUM_STREAMS': 1,
                                       'INFERENCE_PRECISION_HINT': precision}
        if threads:
            self.config['INFERENCE_NUM_THREADS'] = int(threads)
        self.ov_device = device
        self._compiled: Dict[int, Tuple[Any, Any]] = {}  # batch size -> (compiled model, infer request)
        self._constants: Dict[str, torch.Tensor] = {}  # 'anchors': a graph constant, copied out once

    def _request(self, batch: int):
        if batch not in self._compiled:
            ov = require_openvino()
            from openvino.preprocess import PrePostProcessor
            model = self.model.clone()
            if model.inputs[0].get_partial_shape()[0].is_dynamic:
                shape = model.inputs[0].get_partial_shape()
                shape[0] = batch
                model.reshape({model.inputs[0]: shape})  # a static batch: OpenVINO plans it once
            ppp = PrePostProcessor(model)  # input given as B, H, W, 3: no reorder before the first conv
            ppp.input(0).tensor().set_layout(ov.Layout('NHWC'))
            ppp.input(0).model().set_layout(ov.Layout('NCHW'))
            model = ppp.build()
            try:
                compiled = self.core.compile_model(model, self.ov_device, self.config)
            except Exception as e:
                raise UserError(f'{self.path}: OpenVINO cannot compile it for {self.ov_device} '
                                f'({str(e).splitlines()[0]})') from None
            self._compiled[batch] = (compiled, compiled.create_infer_request())
        return self._compiled[batch][1]

    def compiled_precision(self, batch: int = 1) -> str:
        """The inference precision OpenVINO compiled the network for: 'f32', 'bf16' or 'f16' (the
        names ``precision`` takes)."""
        self._request(batch)
        return self._compiled[batch][0].get_property('INFERENCE_PRECISION_HINT').get_type_name()

    def run(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """All outputs by name, as torch tensors (copies: the next call reuses OpenVINO's buffers)."""
        self.check_input(x)
        # B, H, W, 3 order; no copy when x has channels_last strides
        arr = np.ascontiguousarray(x.detach().to('cpu', torch.float32).permute(0, 2, 3, 1).numpy())
        req = self._request(arr.shape[0])
        req.infer({0: arr})
        out: Dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.output_names):
            if name in self._constants:
                out[name] = self._constants[name]
                continue
            out[name] = torch.from_numpy(np.array(req.get_output_tensor(i).data))
            if name == 'anchors':
                self._constants[name] = out[name]
        return out


def require_nncf():
    """The ``nncf`` module (OpenVINO's post-training quantization), or UserError saying how to
    install it."""
    return require('nncf', 'export openvino --int8', 'nncf (or pip install .[openvino])')


def quantize_int8(ov_model, images: Iterable[torch.Tensor], count: int):
    """``ov_model`` quantized to int8 by NNCF post-training quantization (preset MIXED: symmetric
    int8 weights, asymmetric activations, for swish's negative range), calibrated on the ``count``
    ``images`` (normalised [1, 3, H, W] each; iterated more than once). The anchors output is a
    constant of the graph: never quantized."""
    nncf = require_nncf()
    dataset = nncf.Dataset(images, lambda x: np.ascontiguousarray(x.detach().to('cpu', torch.float32).numpy()))
    with quiet_output():  # NNCF's log and progress bars
        return nncf.quantize(ov_model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=count)


class _OpenVINOTarget(Target):
    name = 'openvino'
    export_format = 'openvino'
    suffix = '.xml'
    also_reads = ('.onnx',)
    supports_half = True
    requires = ('onnx', 'openvino')

    def add_export_arguments(self, p: argparse.ArgumentParser) -> None:
        from .calibration import add_calibration_arguments
        onnx_graph.add_graph_arguments(p)
        p.add_argument('--int8', action='store_true',
                       help='int8 by NNCF post-training quantization, calibrated on --calib_images training '
                            'images of -p PROJECT; anchors and box decoding stay float32')
        add_calibration_arguments(p)

    def export_options(self, args: argparse.Namespace) -> Dict[str, Any]:
        from .calibration import calibration_from_args
        options = {k: getattr(args, k) for k in ('head', 'opset', 'dynamic_batch')}
        if args.int8:
            options.update(int8=True, calibration=calibration_from_args(args))
        return options

    def export(self, model: nn.Module, path: str, image_size: Optional[SizeLike] = None, verify: bool = True,
               atol: float = 1e-4, int8: bool = False, calibration: Any = None, **options) -> Dict[str, float]:
        """IR at ``path`` (``.xml``; the weights go to the ``.bin`` beside it), through the ONNX
        graph (options: ``onnx_graph.export_graph``'s, without NMS); checked against the eager model
        in OpenVINO unless ``verify=False``. ``int8``: quantized with NNCF on ``calibration`` (a
        ``runtimes.calibration.CalibrationSet`` or an iterable of normalised [N, 3, H, W] batches);
        the float graph is verified first, then the int8 file's differences from the eager model
        on calibration images are reported (its accuracy is measured as mAP: ``coco_eval.py``)."""
        from ..config import resolve_normalization
        from .calibration import calibration_images
        ov = require_openvino()
        if not path.lower().endswith('.xml'):
            raise UserError(f'-o {path}: an OpenVINO IR is an .xml file (its weights go to the .bin beside it)')
        if options.get('with_nms'):
            raise UserError('--with-nms is for the onnx export; OpenVINO runs the raw outputs')
        if int8 and calibration is None:
            raise UserError('--int8 calibrates on training images: pass -p PROJECT (and --data_path)')
        if int8:
            require_nncf()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        batch = 2 if options.get('dynamic_batch', True) else 1
        diffs: Dict[str, float] = {}
        images = None
        with tempfile.TemporaryDirectory(dir=folder, prefix='.export_') as tmp:
            onnx_path = os.path.join(tmp, 'graph.onnx')
            reference, names, size = onnx_graph.export_graph(model, onnx_path, image_size, **options)
            meta = _read_meta(None, onnx_path)
            ov_model = ov.convert_model(onnx_path)
            if int8:
                if verify:  # the float graph first: the conversion is exact
                    float_xml = os.path.join(tmp, 'float.xml')
                    ov.save_model(ov_model, float_xml, compress_to_fp16=False)
                    diffs = onnx_graph.verify(path, OpenVINOModel(float_xml), reference, names, size, atol, batch)
                mean, std = resolve_normalization(model, options.get('mean'), options.get('std'))
                images = calibration_images(calibration, size, mean, std)
                ov_model = quantize_int8(ov_model, images, len(images))
                meta.update({'quantization': 'int8', 'calib_images': str(len(images)), 'calib_data': images.description})
            for k, v in meta.items():
                ov_model.set_rt_info(v, [_META_SECTION, k])
            tmp_xml = os.path.join(tmp, 'model.xml')
            ov.save_model(ov_model, tmp_xml, compress_to_fp16=False)
            os.replace(tmp_xml[:-4] + '.bin', path[:-4] + '.bin')  # .bin first: the .xml names it
            os.replace(tmp_xml, path)
        if not verify:
            return diffs
        if int8:
            from .calibration import compare_quantized
            diffs.update(compare_quantized(path, OpenVINOModel(path), model, images, 'int8'))
            return diffs
        return onnx_graph.verify(path, OpenVINOModel(path), reference, names, size, atol, batch)

    def load(self, path: str, threads: Optional[int] = None, device: str = 'cpu',
             providers: Optional[Sequence[str]] = None, half: bool = False) -> OpenVINOModel:
        if device not in ('cpu', None):
            raise UserError('--backend openvino runs on the CPU here; use --device cpu')
        return OpenVINOModel(path, threads, precision=reduced_precision() if half else 'f32')


TARGET = register_target(_OpenVINOTarget())
