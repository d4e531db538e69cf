"""Alias module, kept for users' code: the training machinery under its earlier module name. It lives in
:mod:`efficientdet.training`; the package itself never imports this module."""
from .training import (STATE_FORMAT, STATE_VERSION, EpochSampler, ModelEMA, Trainer, WarmupCosine,  # noqa: F401
                       build_optimizer, build_scheduler, dist_info, freeze_for_head_only, freeze_parameters,
                       param_groups, rng_state, set_rng_state, set_train_mode, unwrap_model)

__all__ = ['param_groups', 'build_optimizer', 'WarmupCosine', 'build_scheduler', 'ModelEMA', 'Trainer',
           'EpochSampler', 'rng_state', 'set_rng_state', 'unwrap_model', 'set_train_mode', 'freeze_for_head_only',
           'freeze_parameters', 'dist_info']
