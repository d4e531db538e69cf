"""This project's key layout, identical to Yet-Another-EfficientDet-Pytorch's
(``backbone_net.model._blocks.0…``, ``bifpn.0.conv6_up…``, ``regressor…``, ``classifier…``):
nothing to convert."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from ...config import Variant, get_config
from ..files import StateDict
from . import CheckpointView, Layout, register_layout

PREFIXES = ('backbone_net.', 'bifpn.', 'regressor.', 'classifier.')
SIGNATURE = dict(
    fpn_channels=('shape0', r'regressor\.conv_list\.0\.pointwise_conv\.conv\.weight'),
    cells=('count', r'bifpn\.(\d+)\.'),
    head_repeats=('count', r'regressor\.conv_list\.(\d+)\.'),
    levels=('count', r'regressor\.bn_list\.(\d+)\.'),
    stem=('shape0', r'backbone_net\.model\._conv_stem\.conv\.weight'),
    blocks=('count', r'backbone_net\.model\._blocks\.(\d+)\.'),
    backbone_out=('last_shape0', r'backbone_net\.model\._blocks\.(\d+)\._project_conv\.conv\.weight'),
    se=('flag', r'backbone_net\.model\._blocks\.\d+\.', r'backbone_net\.model\._blocks\.\d+\._se_reduce\.'),
)


def has_our_keys(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(PREFIXES) for k in sd)


class Ours(Layout):
    name = 'ours'
    title = 'this project / Yet-Another-EfficientDet-Pytorch'
    loaded_as = 'this project / Yet-Another keys'
    signature = SIGNATURE
    class_bias = 'classifier.header.pointwise_conv.conv.bias'
    order = 30

    def claims(self, sd: Mapping[str, Any]) -> bool:
        return has_our_keys(sd)

    def to_ours(self, sd: StateDict, variant: Variant) -> Tuple[StateDict, Dict[str, str]]:
        return dict(sd), {}

    def origin(self, ck: CheckpointView) -> str:
        cands = ck.candidates
        if cands and all(get_config(c).is_lite for c in cands):  # Yet-Another has no Lite variants
            return 'this project (full training checkpoint)' if ck.training is not None else 'this project'
        if ck.training is not None:
            return 'this project (full training checkpoint)'
        return 'this project or Yet-Another-EfficientDet-Pytorch (identical key layout)'


OURS = register_layout(Ours())
