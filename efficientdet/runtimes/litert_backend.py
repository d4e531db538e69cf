"""Target 'litert': LiteRT (TFLite) flatbuffers, run by the LiteRT interpreter (XNNPACK on the CPU).

``python -m efficientdet.export tflite -o model.tflite`` converts the fused inference model
(``efficientdet.fuse``, the module the ONNX export uses) with ``litert-torch`` at one H x W and
one fixed batch size (``--batch_size``, default 1). The file's input is ``images`` [B, H, W, 3]
(normalised RGB, channels last: LiteRT's own layout); its outputs are the head's only:

- head 'best' (default): ``regression`` [B, A, 4] (ty, tx, th, tw), ``scores`` [B, A] (best-class
  probability), ``labels`` [B, A] int32;
- head 'full': ``regression``, ``classification`` [B, A, C] after sigmoid.

The anchors are not in the graph: the runtime computes them from the file's metadata with the
package's own generator (``anchors.Anchors``), in float32, so a quantized file never quantizes
them; box decoding happens outside the file, in float32, as for every backend. The metadata (a
JSON entry ``efficientdet`` of the flatbuffer's ``metadata`` table: variant, input size, classes,
mean/std, head, anchor settings, batch size, quantization) makes ``-w model.tflite`` need no
other option.

Quantization (post-training, ``ai-edge-quantizer``, min/max ranges calibrated on training images
of the project: ``runtimes.calibration``): ``--int8`` is int8 weights and activations with an int8
input, ``--int16x8`` int8 weights with 16-bit activations (LiteRT runs it on its reference
kernels: it is for accelerators that take 16x8). By default the heads stay float32: the box and
class nets and what follows them (reshapes, concatenation, best class, sigmoid; :func:`head_scopes`),
while the backbone and BiFPN are integer; int8 class scores would come in 1/256 steps whose ties
reorder detections (what each choice costs on the shipped shapes model: docs/benchmark.md).
``--full_integer`` quantizes the heads too (integer-only accelerators). The runtime quantizes the input and dequantizes the outputs with the
file's own scales, so a quantized file is used exactly like a float one.

Packages: the runtime needs only ``ai-edge-litert``; exporting also needs ``litert-torch``, and
quantizing ``ai-edge-quantizer`` (``pip install .[litert]``).
"""
from __future__ import annotations

import argparse
import copy
import json
import mmap
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..ckpt.files import atomic_write
from ..errors import UserError
from .base import (HEADS, Runtime, SizeLike, Target, add_head_argument, best_real_class, check_export_size,
                   export_metadata, head_outputs, parse_meta, real_classes, register_target, require,
                   verify_export)
from .quiet import quiet_output

__all__ = ['LiteRTModel', 'LiteRTExportWrapper', 'TARGET', 'QUANTIZATIONS', 'read_metadata', 'with_metadata',
           'require_interpreter']

META_NAME = 'efficientdet'
QUANTIZATIONS = ('float32', 'int8', 'int16x8')
INSTALL = 'ai-edge-litert litert-torch ai-edge-quantizer (or pip install .[litert])'


# --------------------------------------------------------------------------- optional packages
def require_interpreter():
    """``ai_edge_litert.interpreter.Interpreter``, or UserError saying what to install."""
    return require('ai_edge_litert.interpreter', '--backend litert',
                   'ai-edge-litert (or pip install .[litert])').Interpreter


def _require(module: str, what: str):
    """``module`` imported quietly (the converter's import prints library-loading notes), or
    UserError saying what to install."""
    return require(module, what, INSTALL, quiet=True)


# --------------------------------------------------------------------------- metadata
def _schema():
    from ai_edge_litert import schema_py_generated
    return schema_py_generated


def read_metadata(data: Union[bytes, bytearray, memoryview, mmap.mmap]) -> Dict[str, str]:
    """The export's metadata (strings) from a .tflite flatbuffer; {} when it has none."""
    fb = _schema()
    try:
        if not fb.Model.ModelBufferHasIdentifier(data, 0):
            return {}
        model = fb.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() != META_NAME.encode():
                continue
            buf = model.Buffers(entry.Buffer())
            if buf.Offset() > 1:  # data stored after the flatbuffer (files over 2 GB)
                raw = bytes(data[buf.Offset():buf.Offset() + buf.Size()])
            else:
                raw = buf.DataAsNumpy().tobytes()
            return {str(k): str(v) for k, v in json.loads(raw.decode()).items()}
    except (ValueError, IndexError, AttributeError, UnicodeDecodeError):
        return {}
    return {}


def _aligned_buffer_class(fb):
    """``BufferT`` whose data vector is packed 16-byte aligned, as LiteRT's converter writes it."""

    class AlignedBuffer(fb.BufferT):
        def Pack(self, builder):
            data = None
            if self.data is not None:
                raw = np.asarray(self.data, dtype=np.uint8).tobytes()
                builder.StartVector(1, len(raw), 16)
                builder.head = builder.head - len(raw)
                builder.Bytes[builder.head:builder.head + len(raw)] = raw
                builder.vectorNumElems = len(raw)
                data = builder.EndVector()
            fb.BufferStart(builder)
            if data is not None:
                fb.BufferAddData(builder, data)
            fb.BufferAddOffset(builder, 0)
            fb.BufferAddSize(builder, 0)
            return fb.BufferEnd(builder)

    return AlignedBuffer


def with_metadata(data: Union[bytes, bytearray], meta: Dict[str, str]) -> bytes:
    """``data`` (a .tflite flatbuffer) with ``meta`` as its ``efficientdet`` metadata entry (JSON,
    replacing an earlier one). Every buffer is written inside the flatbuffer, 16-byte aligned (the
    quantizer's buffers stored after the flatbuffer are moved in: the plain layout every LiteRT
    and TFLite runtime reads); the model must stay under the flatbuffer limit of 2 GB."""
    import flatbuffers
    fb = _schema()
    view = memoryview(data)
    model = fb.ModelT.InitFromPackedBuf(bytearray(data), 0)
    aligned = _aligned_buffer_class(fb)
    buffers = []
    for b in model.buffers or []:
        nb = aligned()
        if b.offset > 1:  # stored after the flatbuffer
            nb.data = np.frombuffer(view[b.offset:b.offset + b.size], dtype=np.uint8)
        elif b.data is not None and len(b.data):
            nb.data = np.asarray(b.data, dtype=np.uint8)
        buffers.append(nb)
    payload = aligned()
    payload.data = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buffers.append(payload)
    model.buffers = buffers
    entry = fb.MetadataT()
    entry.name = META_NAME
    entry.buffer = len(buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name not in (META_NAME, META_NAME.encode())] + [entry]
    if sum(len(b.data) for b in buffers if b.data is not None) >= (1 << 31) - (1 << 24):
        raise UserError('the model is too large for one .tflite flatbuffer (2 GB)')
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b'TFL3')
    return bytes(builder.Output())


def _json_list(meta: Dict[str, Any], key: str, path: str) -> list:
    try:
        value = json.loads(meta[key]) if isinstance(meta[key], str) else meta[key]
    except (KeyError, ValueError):
        raise UserError(f'{path}: its metadata lacks {key!r}; export it with python -m efficientdet.export tflite') \
            from None
    return list(value)


# --------------------------------------------------------------------------- runtime
class LiteRTModel(Runtime):
    """A .tflite file from ``python -m efficientdet.export tflite`` run by the LiteRT interpreter
    (contract: ``efficientdet.runtimes.base``; see the module docstring).

    ``threads``: interpreter threads (None: LiteRT's default). The file has one fixed batch size
    B: a batch of another size is run in pieces of B (the last one padded). Quantized files get
    their input quantized and their outputs dequantized here, with the file's scales. Anchors
    [1, A, 4] (y1, x1, y2, x2) input pixels, float32, come from the metadata. ``content``: the
    file's bytes instead of reading ``path`` (``path`` then only names it in messages).
    """

    name = 'litert'
    channels_last = True  # reads B, H, W, 3: a channels_last batch needs no copy

    def __init__(self, path: str, threads: Optional[int] = None, content: Optional[bytes] = None):
        Interpreter = require_interpreter()
        self.path = path
        if content is None:
            if not os.path.isfile(path):
                raise UserError(f'{path}: no such .tflite file; export one with python -m efficientdet.export tflite '
                                f'... -o {path}')
            with open(path, 'rb') as f:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    raw_meta = read_metadata(mm)
        else:
            raw_meta = read_metadata(content)
        if raw_meta.get('producer') != 'efficientdet.export':
            raise UserError(f'{path}: not a .tflite file from python -m efficientdet.export tflite (no efficientdet '
                            'metadata)')
        self.meta = parse_meta(raw_meta)
        self.quantization = str(raw_meta.get('quantization', 'float32'))
        try:
            kwargs: Dict[str, Any] = {'num_threads': int(threads) if threads else None}
            with quiet_output():  # LiteRT announces its XNNPACK delegate on stderr
                if content is None:
                    self.interpreter = Interpreter(model_path=path, **kwargs)
                else:
                    self.interpreter = Interpreter(model_content=content, **kwargs)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise UserError(f'{path}: LiteRT cannot load it ({str(e).splitlines()[0]})') from None
        runner = self.interpreter.get_signature_runner()
        inputs = list(runner.get_input_details().values())
        outputs = runner.get_output_details()  # signature output name -> details (index, dtype, quantization)
        names = _json_list(raw_meta, 'outputs', path)
        if len(inputs) != 1 or len(outputs) != len(names):
            raise UserError(f'{path}: {len(inputs)} inputs and {len(outputs)} outputs, not those of an efficientdet '
                            'export')
        self._input = inputs[0]
        keys = [f'output_{i}' for i in range(len(names))]  # litert-torch's names, in the module's order
        if not all(k in outputs for k in keys):
            keys = list(outputs)
        self._outputs = [(name, outputs[k]) for name, k in zip(names, keys)]
        b, h, w, _ = (int(v) for v in self._input['shape'])
        self.batch_size = b
        self.image_size: Optional[Tuple[int, int]] = (h, w)
        self.output_names = names + ['anchors']
        self.anchors = self._anchors(raw_meta, (h, w))

    def _anchors(self, meta: Dict[str, str], size: Tuple[int, int]) -> torch.Tensor:
        from ..anchors import Anchors
        try:
            gen = Anchors(float(meta['anchor_scale']), _json_list(meta, 'anchor_levels', self.path),
                          scales=_json_list(meta, 'anchor_scales', self.path),
                          ratios=[tuple(r) for r in _json_list(meta, 'anchor_ratios', self.path)])
        except KeyError:
            raise UserError(f'{self.path}: its metadata lacks the anchor settings; re-export it') from None
        return gen.for_size(size[0], size[1], torch.device('cpu'), torch.float32)

    @staticmethod
    def _quantize(x: np.ndarray, detail: Dict[str, Any]) -> np.ndarray:
        scale, zero = detail['quantization']
        dtype = np.dtype(detail['dtype'])
        if not scale or dtype.kind == 'f':
            return x.astype(dtype, copy=False)
        info = np.iinfo(dtype)
        return np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(dtype)

    @staticmethod
    def _dequantize(q: np.ndarray, detail: Dict[str, Any]) -> np.ndarray:
        scale, zero = detail['quantization']
        if not scale or q.dtype.kind == 'f':
            return q
        return (q.astype(np.float32) - np.float32(zero)) * np.float32(scale)

    def _invoke(self, piece: np.ndarray) -> List[np.ndarray]:
        it = self.interpreter
        it.set_tensor(self._input['index'], self._quantize(piece, self._input))
        it.invoke()
        out = []
        for name, detail in self._outputs:
            value = it.get_tensor(detail['index'])
            out.append(value if name == 'labels' else self._dequantize(value, detail))
        return out

    def run(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """All outputs by name as torch tensors (labels int64), anchors included; any batch size
        (run in pieces of the file's)."""
        self.check_input(x)
        arr = np.ascontiguousarray(x.detach().to('cpu', torch.float32).permute(0, 2, 3, 1).numpy())
        n, b = arr.shape[0], self.batch_size
        pieces: List[List[np.ndarray]] = []
        for start in range(0, n, b):
            piece = arr[start:start + b]
            k = piece.shape[0]
            if k < b:  # the last piece: padded to the file's batch, the padding's outputs dropped
                piece = np.concatenate([piece, np.zeros((b - k,) + piece.shape[1:], piece.dtype)])
            pieces.append([v[:k] for v in self._invoke(piece)])
        out: Dict[str, torch.Tensor] = {}
        for i, (name, _) in enumerate(self._outputs):
            value = torch.from_numpy(np.concatenate([p[i] for p in pieces]) if len(pieces) > 1 else pieces[0][i])
            out[name] = value.long() if name == 'labels' else value
        out['anchors'] = self.anchors
        return out


# --------------------------------------------------------------------------- export
class LiteRTExportWrapper(nn.Module):
    """``model`` (eager or fused) → the file's outputs (module docstring) from a [B, H, W, 3] input;
    no anchors. head 'best': the best class among the real classes of ``obj_list``
    (``base.best_real_class``, as every exported best head)."""

    def __init__(self, model: nn.Module, head: str = 'best', obj_list: Optional[Sequence[str]] = None):
        super().__init__()
        if head not in HEADS:
            raise UserError(f'--head {head!r}: choose one of {", ".join(HEADS)}')
        self.model = model
        self.head = head
        self.real: Optional[torch.Tensor]
        self.register_buffer('real', real_classes(obj_list, model.num_classes) if head == 'best' else None)

    def forward(self, x: torch.Tensor):
        _, regression, logits, _ = self.model(x.permute(0, 3, 1, 2), return_logits=True)
        if self.head == 'full':
            return regression, torch.sigmoid(logits)
        return (regression, *best_real_class(logits, self.real))


def _anchor_metadata(model: nn.Module) -> Dict[str, str]:
    from ..anchors import Anchors
    gen = next(m for m in model.modules() if isinstance(m, Anchors))
    return {'anchor_scale': repr(gen.anchor_scale), 'anchor_levels': json.dumps(list(gen.pyramid_levels)),
            'anchor_scales': json.dumps(list(gen.scales)), 'anchor_ratios': json.dumps([list(r) for r in gen.ratios])}


def convert(model: nn.Module, image_size: Tuple[int, int], head: str = 'best', batch_size: int = 1,
            fuse: bool = True, obj_list: Optional[Sequence[str]] = None) -> bytes:
    """The float32 .tflite flatbuffer (no metadata) of ``model`` (an EfficientDetBackbone) at one
    (H, W) and batch size; ``obj_list``: its '' placeholder classes are never a best class."""
    from ..fuse import fuse_model
    litert_torch = _require('litert_torch', 'export tflite')
    p = next(model.parameters())
    if p.device.type != 'cpu' or p.dtype != torch.float32:  # converted on the CPU in float32
        model = copy.deepcopy(model).to('cpu', torch.float32)
    model = model.eval()
    net = fuse_model(model, channels_last=False, image_size=image_size, fast=False) if fuse else model
    wrapper = LiteRTExportWrapper(net, head, obj_list).eval()
    x = torch.zeros(batch_size, *image_size, 3)
    litert_torch.config.show_progress = False
    with quiet_output(), torch.no_grad():
        return bytes(litert_torch.convert(wrapper, (x,)).model_content())


def head_scopes(data: bytes, box_outputs: Sequence[int], class_outputs: Sequence[int]) -> List[str]:
    """Op scopes (ai-edge-quantizer's name of an op: its output tensor names, each followed by
    ';') of the heads in a converted graph: the ops that feed only the box outputs or only the
    class outputs (signature outputs by position): the box and class nets, the reshapes and
    concatenations after them, the best-class TopK and the sigmoid. What feeds both (backbone,
    BiFPN) is not in it."""
    fb = _schema()
    model = fb.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    producer = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        for j in range(op.OutputsLength()):
            producer[op.Outputs(j)] = i

    def feeding(outputs: Sequence[int]) -> set:
        found, todo = set(), [graph.Outputs(k) for k in outputs]
        while todo:
            i = producer.get(todo.pop())
            if i is None or i in found:
                continue
            found.add(i)
            op = graph.Operators(i)
            todo.extend(op.Inputs(j) for j in range(op.InputsLength()) if op.Inputs(j) >= 0)
        return found

    box, cls = feeding(box_outputs), feeding(class_outputs)
    scopes = []
    for i in sorted(box ^ cls):
        op = graph.Operators(i)
        names = [graph.Tensors(op.Outputs(j)).Name().decode() for j in range(op.OutputsLength())]
        scopes.append(';'.join(n for n in names if n) + ';')
    return scopes


def quantize(data: bytes, quantization: str, calibration: Iterable[np.ndarray], threads: Optional[int] = None,
             float_heads: bool = True) -> bytes:
    """``data`` (float .tflite) quantized post-training with ai-edge-quantizer: 'int8' (static int8
    weights and activations) or 'int16x8' (int8 weights, int16 activations), calibrated on
    ``calibration`` (NHWC float32 batches of the file's input shape: each batch's min/max, averaged
    over the batches, :class:`RangeMean`). ``float_heads``: the heads (:func:`head_scopes`; the
    file's first output is the regression, the others the class outputs) stay float32."""
    qz = _require('ai_edge_quantizer.quantizer', f'export tflite --{quantization}')
    import re
    from ai_edge_quantizer import algorithm_manager, calibrator, qtyping, recipe
    plan = recipe.static_wi8_ai8() if quantization == 'int8' else recipe.static_wi8_ai16()
    with quiet_output():
        signatures = require_interpreter()(model_content=data).get_signature_list()
    key = next(iter(signatures))
    input_name = signatures[key]['inputs'][0]
    threads = threads or torch.get_num_threads()
    with quiet_output():
        q = qz.Quantizer(bytearray(data), plan)
        n_out = len(signatures[key]['outputs'])
        for scope in head_scopes(data, [0], range(1, n_out)) if float_heads else ():
            q.update_quantization_recipe('^' + re.escape(scope) + '$', qtyping.TFLOperationName.ALL_SUPPORTED,
                                         algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
        # each batch's ranges on their own, then their plain mean: the quantizer's own merge across
        # samples is an exponential moving average (0.95), which the last few dozen images dominate
        ranges = RangeMean()
        for b in calibration:
            ranges.add(q.calibrate({key: [{input_name: np.ascontiguousarray(b, dtype=np.float32)}]},
                                   num_threads=threads, mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED))
        if not ranges.count:
            raise UserError(f'--{quantization}: no calibration images')
        quantized = bytes(q.quantize(_widen_constant_ranges(ranges.mean()), enable_progress_report=False)
                          .quantized_model)
    _check_scales(quantized)
    return quantized


class RangeMean:
    """The plain mean over calibration batches of each tensor's range (``{tensor: {'min', 'max'}}``
    as the quantizer's calibration gives it for one batch)."""

    def __init__(self) -> None:
        self.count = 0
        self._sums: Dict[str, Dict[str, Any]] = {}

    def add(self, qsvs: Dict[str, Dict[str, Any]]) -> None:
        self.count += 1
        for name, qsv in qsvs.items():
            if isinstance(qsv, dict) and 'min' in qsv and 'max' in qsv:
                lo, hi = np.asarray(qsv['min'], np.float64), np.asarray(qsv['max'], np.float64)
                have = self._sums.get(name)
                self._sums[name] = ({**qsv, 'min': lo, 'max': hi, 'n': 1} if have is None else
                                    {**have, 'min': have['min'] + lo, 'max': have['max'] + hi, 'n': have['n'] + 1})
            else:
                self._sums[name] = qsv

    def mean(self) -> Dict[str, Dict[str, Any]]:
        out = {}
        for name, qsv in self._sums.items():
            if isinstance(qsv, dict) and 'n' in qsv:
                n = qsv['n']
                out[name] = {k: v for k, v in qsv.items() if k != 'n'}
                out[name].update(min=(qsv['min'] / n).astype(np.float32), max=(qsv['max'] / n).astype(np.float32))
            else:
                out[name] = qsv
        return out


def _widen_constant_ranges(qsvs: Dict[str, Dict[str, Any]], eps: float = 1e-3) -> Dict[str, Dict[str, Any]]:
    """Calibration ranges (``{tensor: {'min': array, 'max': array}}``) with every range made to
    contain 0 and to be at least ``eps`` wide: a tensor that was constant on every calibration
    image (e.g. a ReLU6 output that never fires) would otherwise get a zero scale, which the
    interpreter cannot run."""
    out = {}
    for name, qsv in qsvs.items():
        if not (isinstance(qsv, dict) and 'min' in qsv and 'max' in qsv):
            out[name] = qsv
            continue
        lo = np.minimum(np.asarray(qsv['min'], dtype=np.float32), 0)
        hi = np.maximum(np.asarray(qsv['max'], dtype=np.float32), 0)
        hi = np.where(hi - lo < eps, lo + eps, hi)
        out[name] = {**qsv, 'min': lo, 'max': hi}
    return out


def _check_scales(data: bytes) -> None:
    """UserError if a quantized tensor of ``data`` has a scale that is not finite and positive."""
    fb = _schema()
    graph = fb.Model.GetRootAs(data, 0).Subgraphs(0)
    for i in range(graph.TensorsLength()):
        q = graph.Tensors(i).Quantization()
        if q is not None and q.ScaleLength():
            scale = q.ScaleAsNumpy()
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise UserError(f'quantizing gave tensor {graph.Tensors(i).Name().decode()} an invalid scale; '
                                'calibrate on more or other images (--calib_images, --data_path)')


class _LiteRTTarget(Target):
    name = 'litert'
    export_format = 'tflite'
    suffix = '.tflite'
    requires = ('ai_edge_litert', 'litert_torch', 'ai_edge_quantizer')

    def add_export_arguments(self, p: argparse.ArgumentParser) -> None:
        from .calibration import add_calibration_arguments
        from ..options import add_options
        add_head_argument(p)
        add_options(p, 'batch_size', batch_size=1)  # the file's fixed batch; the runtime runs others in pieces
        q = p.add_mutually_exclusive_group()
        q.add_argument('--int8', dest='quantization', action='store_const', const='int8', default='float32',
                       help='full-integer int8 (weights and activations), calibrated on --calib_images training '
                            'images of -p PROJECT; anchors and box decoding stay float32')
        q.add_argument('--int16x8', dest='quantization', action='store_const', const='int16x8',
                       help='int8 weights, 16-bit activations (calibrated like --int8; LiteRT runs it on its '
                            'reference kernels, for accelerators that take 16x8)')
        p.add_argument('--full_integer', action='store_true',
                       help='with --int8 / --int16x8: quantize the heads too (for integer-only accelerators); by '
                            'default the box and class nets stay float32, the backbone and BiFPN are integer')
        add_calibration_arguments(p)

    def export_options(self, args: argparse.Namespace) -> Dict[str, Any]:
        from .calibration import calibration_from_args
        options: Dict[str, Any] = {'head': args.head, 'batch_size': args.batch_size,
                                   'quantization': args.quantization, 'float_heads': not args.full_integer}
        if args.full_integer and args.quantization == 'float32':
            raise UserError('--full_integer goes with --int8 or --int16x8')
        if args.quantization != 'float32':
            options['calibration'] = calibration_from_args(args, f'--{args.quantization}')
        return options

    def export(self, model: nn.Module, path: str, image_size: Optional[SizeLike] = None, verify: bool = True,
               atol: float = 1e-4, fuse: bool = True, head: str = 'best', batch_size: int = 1,
               quantization: str = 'float32', calibration: Any = None, float_heads: bool = True,
               obj_list: Optional[Sequence[str]] = None, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None) -> Dict[str, float]:
        """Write the .tflite at ``path`` (see the module docstring). The float conversion is
        checked against the eager model (within ``atol``, a random batch of ``batch_size`` + 1,
        so the runtime's pieces are checked too) unless ``verify=False``; a quantized file is then
        compared with the eager model on calibration images and its differences reported (int8
        accuracy is measured as mAP: ``coco_eval.py --backend litert``). ``float_heads``: the box
        and class nets and what follows them stay float32 (:func:`head_scopes`); False: everything
        is quantized (``--full_integer``). ``calibration``: a
        ``runtimes.calibration.CalibrationSet`` or an iterable of normalised [N, 3, H, W] batches.
        Returns {output: max |diff|} (quantized: prefixed with the quantization)."""
        from ..config import resolve_normalization
        from .calibration import calibration_images, compare_quantized
        if quantization not in QUANTIZATIONS:
            raise UserError(f'quantization {quantization!r}: choose one of {", ".join(QUANTIZATIONS)}')
        if head not in HEADS:
            raise UserError(f'--head {head!r}: choose one of {", ".join(HEADS)}')
        if batch_size < 1:
            raise UserError(f'--batch_size {batch_size}: must be at least 1')
        if not path.lower().endswith('.tflite'):
            raise UserError(f'-o {path}: a LiteRT model is a .tflite file')
        if quantization != 'float32' and calibration is None:
            raise UserError(f'--{quantization} calibrates on training images: pass -p PROJECT (and --data_path)')
        size = check_export_size(model, image_size)
        mean, std = resolve_normalization(model, mean, std)
        extra: Dict[str, Any] = {'outputs': json.dumps(list(head_outputs(head)[:-1])), 'batch_size': batch_size,
                                 'input_layout': 'NHWC', 'quantization': 'float32', **_anchor_metadata(model)}
        meta = export_metadata(model, size, head, obj_list, mean, std, extra)
        data = with_metadata(convert(model, size, head, batch_size, fuse, obj_list), meta)
        diffs: Dict[str, float] = {}
        if verify:
            diffs = verify_export(path, LiteRTModel(path, content=data), model, size, atol, batch_size + 1)
        if quantization != 'float32':
            images = calibration_images(calibration, size, mean, std)
            nhwc = (b.permute(0, 2, 3, 1).numpy() for b in images.batches(batch_size))
            meta.update({'quantization': quantization, 'calib_images': str(len(images)),
                         'calib_data': images.description, 'float_heads': str(bool(float_heads)).lower()})
            data = with_metadata(quantize(data, quantization, nhwc, float_heads=float_heads), meta)
            if verify:
                diffs.update(compare_quantized(path, LiteRTModel(path, content=data), model, images, quantization))
        atomic_write(path, lambda f: f.write(data))
        return diffs

    def load(self, path: str, threads: Optional[int] = None, device: str = 'cpu',
             providers: Optional[Sequence[str]] = None, half: bool = False) -> LiteRTModel:
        if device not in ('cpu', None):
            raise UserError('--backend litert runs on the CPU here; use --device cpu')
        return LiteRTModel(path, threads)


TARGET = register_target(_LiteRTTarget())
