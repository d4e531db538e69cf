"""Target 'torchscript': the fused model traced at one H x W (``torch.jit``), run by libtorch.

Files return ``(regression, scores, labels, anchors)`` (head 'best', default) or ``(regression,
classification, anchors)`` (head 'full'); metadata in the archive's ``extra/meta.json``.
TorchScript archives are loaded with ``torch.jit.load``: only load files you trust.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..ckpt.files import atomic_write
from ..errors import UserError
from .base import (ExportWrapper, Runtime, SizeLike, Target, add_head_argument, check_export_size, export_metadata,
                   head_outputs, parse_meta, register_target, verify_export)
from .onnx_graph import quiet_export

__all__ = ['TorchScriptModel', 'TARGET']


class TorchScriptModel(Runtime):
    """A TorchScript file from ``python -m efficientdet.export torchscript``, run under
    ``torch.inference_mode`` (contract: ``efficientdet.runtimes.base``). ``threads`` sets torch's
    intra-op threads (process-wide). Inputs are moved to ``device`` and made channels_last when the
    file was traced that way."""

    name = 'torchscript'

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
            self.meta = parse_meta(json.loads(files['meta.json'] or '{}'))
        except ValueError:
            self.meta = {}
        size = self.meta.get('image_size')
        self.image_size = (int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else None
        self.channels_last = bool(self.meta.get('channels_last', False))
        self.output_names = list(head_outputs(str(self.meta.get('head', 'full'))))

    def run(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """All outputs by name, as torch tensors on ``device``."""
        self.check_input(x)
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return dict(zip(self.output_names, self.module(x)))


class _TorchScriptTarget(Target):
    name = 'torchscript'
    export_format = 'torchscript'
    suffix = '.pt'

    def add_export_arguments(self, p: argparse.ArgumentParser) -> None:
        add_head_argument(p)
        p.add_argument('--no_channels_last', '--no-channels_last', dest='channels_last', action='store_false',
                       help='trace in NCHW-contiguous layout (default: channels_last, faster on CPU)')
        p.add_argument('--no_freeze', '--no-freeze', dest='freeze', action='store_false',
                       help='do not torch.jit.freeze')

    def export_options(self, args: argparse.Namespace) -> Dict[str, Any]:
        return {k: getattr(args, k) for k in ('head', 'channels_last', 'freeze')}

    def export(self, model: nn.Module, path: str, image_size: Optional[SizeLike] = None, verify: bool = True,
               atol: float = 1e-4, fuse: bool = True, head: str = 'best', channels_last: bool = True,
               freeze: bool = True, obj_list: Optional[Sequence[str]] = None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Dict[str, float]:
        """Trace the (fused) model at one H x W; ``freeze`` inlines the weights (torch.jit.freeze).
        Verified by reloading and comparing with the eager model. Returns {output: max |diff|}."""
        from ..fuse import fuse_model
        size = check_export_size(model, image_size)
        model = model.eval()
        net = fuse_model(model, channels_last=channels_last, image_size=size, fast=False) if fuse else model
        wrapper = ExportWrapper(net, size, head, obj_list).eval()
        p = next(model.parameters())
        x = torch.randn(1, 3, *size, device=p.device, dtype=p.dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with quiet_export(), torch.no_grad():
            traced = torch.jit.trace(wrapper, (x,), check_trace=False)
            if freeze:
                traced = torch.jit.freeze(traced)
        meta = export_metadata(model, size, head, obj_list, mean, std, {'channels_last': str(bool(channels_last)).lower()})
        with quiet_export():  # torch.jit.save's deprecation notice
            atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files={'meta.json': json.dumps(meta)}))
        if not verify:
            return {}
        return verify_export(path, TorchScriptModel(path, device=str(p.device)), model, size, atol)

    def export_to_run(self, model: nn.Module, path: str, image_size: SizeLike, device: torch.device,
                      fuse: bool = True, verify: bool = False, channels_last: bool = True,
                      **metadata: Any) -> Dict[str, float]:
        """Traced on ``device`` (a CUDA trace runs on CUDA), in the memory layout asked for."""
        return self.export(model.to(device), path, image_size, fuse=fuse, verify=verify, channels_last=channels_last,
                           **metadata)

    def load(self, path: str, threads: Optional[int] = None, device: str = 'cpu',
             providers: Optional[Sequence[str]] = None, half: bool = False) -> TorchScriptModel:
        return TorchScriptModel(path, threads, device)


TARGET = register_target(_TorchScriptTarget())
