"""Small helpers shared by the training modules."""
from __future__ import annotations

from torch import nn

from ..distributed import dist_info

__all__ = ['unwrap_model', 'dist_info']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel wrappers."""
    while hasattr(model, 'module') and isinstance(model.module, nn.Module):
        model = model.module
    return model
