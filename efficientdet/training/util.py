"""Small helpers shared by the training modules."""
from __future__ import annotations

from typing import Tuple

import torch.distributed as dist
from torch import nn

__all__ = ['unwrap_model', 'dist_info']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel wrappers."""
    while hasattr(model, 'module') and isinstance(model.module, nn.Module):
        model = model.module
    return model


def dist_info() -> Tuple[int, int]:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
