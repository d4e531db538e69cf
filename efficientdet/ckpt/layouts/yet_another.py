"""Yet-Another-EfficientDet-Pytorch files that show their origin: its keys are this project's, but
for the sum-fusion variants (D6, D7, D7x) it stores BiFPN fusion weights that sum fusion never
reads. Those are left out, and named; its D0-D5 files are indistinguishable from this project's
and load through :mod:`.ours`."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ...config import Variant, get_config
from ..files import StateDict
from ..signature import matching_variants
from . import CheckpointView, register_layout
from .ours import SIGNATURE, Ours, has_our_keys

# the fusion weights Yet-Another keeps in every BiFPN cell: name → number of inputs
FUSION_INPUTS = {'p6_w1': 2, 'p5_w1': 2, 'p4_w1': 2, 'p3_w1': 2, 'p4_w2': 3, 'p5_w2': 3, 'p6_w2': 3, 'p7_w2': 2}
REASON_PREFIX = 'Yet-Another BiFPN fusion weight'


def fusion_keys(variant: Variant) -> Dict[str, Tuple[int, ...]]:
    """The BiFPN fusion weights Yet-Another-EfficientDet-Pytorch stores for every cell even when
    ``variant`` (D6, D7, D7x) uses plain sum fusion, which never reads them: name → shape
    (19 values per cell, 152 for 8 cells)."""
    cfg = get_config(variant)
    return {f'bifpn.{c}.{n}': (s,) for c in range(cfg.fpn_cell_repeats) for n, s in FUSION_INPUTS.items()}


def unused_fusion(sd: Mapping[str, Any], variant: Variant) -> Dict[str, str]:
    """Key → reason for every unused fusion weight of ``variant`` that ``sd`` holds (right shape only)."""
    if get_config(variant).fusion != 'sum':
        return {}
    unused = fusion_keys(variant)
    reason = f'{REASON_PREFIX}: {get_config(variant).name} uses sum fusion, which never reads it'
    return {k: reason for k, v in sd.items() if k in unused and tuple(v.shape) == unused[k]}


class YetAnother(Ours):
    name = 'yet_another'
    title = 'Yet-Another-EfficientDet-Pytorch'
    order = 20

    def claims(self, sd: Mapping[str, Any]) -> bool:
        return has_our_keys(sd) and any(unused_fusion(sd, c) for c in matching_variants(sd, SIGNATURE))

    def to_ours(self, sd: StateDict, variant: Variant) -> Tuple[StateDict, Dict[str, str]]:
        drop = unused_fusion(sd, variant)
        return {k: v for k, v in sd.items() if k not in drop}, drop

    def describe_dropped(self, keys: List[str], reason: str) -> Optional[str]:
        if not reason.startswith(REASON_PREFIX):
            return None
        values = sum(FUSION_INPUTS.get(k.rsplit('.', 1)[-1], 0) for k in keys)
        return (f'dropped {len(keys)} Yet-Another BiFPN fusion weights bifpn.*.p{{3..7}}_w{{1,2}} ({values} values; '
                f'{reason.split(": ", 1)[1]})')

    def origin(self, ck: CheckpointView) -> str:
        found = {k: s for c in ck.candidates for k, s in fusion_keys(c).items() if k in ck.state_dict}
        values = sum(math.prod(s) for s in found.values())
        return (f'Yet-Another-EfficientDet-Pytorch (holds {len(found)} BiFPN fusion weights, {values} values, '
                'that sum fusion never reads; they are dropped when loading)')


YET_ANOTHER = register_layout(YetAnother())
