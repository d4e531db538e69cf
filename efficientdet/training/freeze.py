"""Freezing: parameters by name (the official ``var_freeze_expr``), heads-only, frozen BatchNorm.

A frozen parameter has ``requires_grad=False`` and is left out of the optimizer, so it stays
bit-identical. A module all of whose parameters are frozen runs in eval mode during training (its
BN statistics do not move and drop-connect is off), so a frozen backbone is frozen entirely;
``freeze_bn`` puts every BatchNorm layer in eval mode (statistics fixed; their affine
parameters still train unless frozen by name).
"""
from __future__ import annotations

import re
from typing import List

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserError
from .util import unwrap_model

__all__ = ['HEAD_ONLY_EXPR', 'freeze_parameters', 'freeze_for_head_only', 'frozen_modules', 'set_train_mode']

HEAD_ONLY_EXPR = r'(backbone_net|bifpn)\.'


def freeze_parameters(model: nn.Module, expr: str) -> List[str]:
    """Freeze every parameter whose name matches ``expr`` from its start (``re.match``, as the
    official ``var_freeze_expr``), e.g. ``'backbone_net'`` or ``'(backbone_net|bifpn\\.[0-2]\\.)'``.
    Returns the frozen names; a pattern that is invalid or matches nothing is a :class:`UserError`."""
    try:
        pattern = re.compile(expr)
    except re.error as e:
        raise UserError(f'--freeze {expr!r} is not a valid regular expression ({e})') from None
    m = unwrap_model(model)
    names = [n for n, p in m.named_parameters() if pattern.match(n)]
    if not names:
        tops = sorted({n.split('.')[0] for n, _ in m.named_parameters()})
        raise UserError(f'--freeze {expr!r} matches no parameter name (matched from the start); names begin '
                        f'with {", ".join(tops)}, e.g. --freeze backbone_net')
    params = dict(m.named_parameters())
    for n in names:
        params[n].requires_grad_(False)
    return names


def freeze_for_head_only(model: nn.Module) -> List[str]:
    """Freeze ``backbone_net`` and ``bifpn`` (``--head_only`` == ``--freeze '(backbone_net|bifpn)\\.'``);
    returns the frozen module names. Their BatchNorms stay in eval mode (:func:`set_train_mode`)."""
    m = unwrap_model(model)
    for name in ('backbone_net', 'bifpn'):
        if getattr(m, name, None) is None:
            raise UserError(f'--head_only needs a model with .{name}; {type(m).__name__} has none')
    freeze_parameters(m, HEAD_ONLY_EXPR)
    return ['backbone_net', 'bifpn']


def frozen_modules(model: nn.Module) -> List[str]:
    """The outermost sub-modules (not the model itself) that have parameters, all of them frozen."""
    m = unwrap_model(model)
    out: List[str] = []
    for name, mod in m.named_modules():
        if not name or any(name.startswith(o + '.') for o in out):
            continue
        params = list(mod.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out


def set_train_mode(model: nn.Module, head_only: bool = False, freeze_bn: bool = False) -> None:
    """``model.train()``, then eval mode for every fully frozen sub-module (see
    :func:`frozen_modules`; with ``head_only`` these are the backbone and the BiFPN) and, with
    ``freeze_bn``, for every BatchNorm layer."""
    model.train()
    m = unwrap_model(model)
    for name in frozen_modules(m):
        m.get_submodule(name).eval()
    if head_only:
        m.backbone_net.eval()
        m.bifpn.eval()
    if freeze_bn:
        for mod in m.modules():
            if isinstance(mod, _BatchNorm):
                mod.eval()
