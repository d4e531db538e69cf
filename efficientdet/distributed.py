"""torch.distributed for the scripts: the process group from torchrun's environment, each rank's
shard of a dataset, and gathering Python objects from every rank.

One process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) is the degenerate case of every function
here: ``init_from_env`` starts nothing, ``shard`` is everything, ``gather_objects`` is
``[obj]``; so callers have one code path for one process and for many.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

__all__ = ['DistContext', 'init_from_env', 'dist_info', 'is_main_process', 'shard_indices', 'gather_objects',
           'broadcast_object', 'broadcast_tensors', 'PROCESS_GROUP_TIMEOUT']

#: How long a collective waits for the other processes. Every rank takes part in validation now,
#: so the waits are short; the bound only matters when a process hangs without exiting (a process
#: that exits is noticed at once by gloo and by torchrun, which stops the others).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its machine,
    the ``device`` it computes on, and whether this call started the process group (then
    :meth:`close` ends it)."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    started: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """End the process group when this context started it (no collective: safe after an error)."""
        if self.started and dist.is_initialized():
            dist.destroy_process_group()


def dist_info() -> tuple:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and without torch.distributed)."""
    return dist_info()[0] == 0


def init_from_env(device: Union[str, int, torch.device, None] = None) -> DistContext:
    """The process group of a torchrun launch (``WORLD_SIZE`` > 1): NCCL and ``cuda:LOCAL_RANK``
    when CUDA is available, else gloo on the CPU. ``device`` (a ``--device`` value) chooses: a CPU
    device means gloo on the CPU; ``cuda`` means each rank's own GPU; ``cuda:N`` (or N) that GPU.
    One process: rank 0 of 1 on ``device`` (default ``cuda:0`` when available, else the CPU). A
    group already initialised is used as it is."""
    from .devices import parse_device
    world = int(os.environ.get('WORLD_SIZE', '1'))
    asked = parse_device(device)
    if world <= 1 and not dist.is_initialized():
        return DistContext(0, 1, 0, asked)
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if asked.type == 'cuda':
        explicit = device is not None and asked.index is not None
        dev, backend = (asked if explicit else torch.device('cuda', local_rank)), 'nccl'
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device('cpu'), 'gloo'
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        started = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, started)


def shard_indices(n: int, rank: Optional[int] = None, world: Optional[int] = None) -> List[int]:
    """This rank's share of ``range(n)``: every ``world``-th index from ``rank`` (balanced to within
    one item; no padding, so every item is seen exactly once over all ranks)."""
    r, w = dist_info()
    rank = r if rank is None else int(rank)
    world = w if world is None else int(world)
    return list(range(rank, n, world))


def gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order, on every rank (``all_gather_object``: picklable
    objects, works on gloo and NCCL); ``[obj]`` without a process group. A collective."""
    _, world = dist_info()
    if world <= 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects); ``obj`` itself without a process
    group. A collective."""
    _, world = dist_info()
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def broadcast_tensors(tensors: List[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place, on every rank) with rank ``src``'s values; no-op without a
    process group. Tensors on the CPU under NCCL travel through the current CUDA device."""
    _, world = dist_info()
    if world <= 1:
        return
    nccl = dist.get_backend() == 'nccl'
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for t in tensors:  # one broadcast per dtype and device, not one per tensor
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (_, device), group in groups.items():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        if nccl and device.type != 'cuda':
            flat = flat.cuda()
        dist.broadcast(flat, src)
        flat = flat.to(device)
        start = 0
        for t in group:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
