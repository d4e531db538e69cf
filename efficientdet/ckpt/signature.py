"""What tensor shapes say about a state_dict, whatever its key layout: the architecture features
(FPN width, cell count, head depth, levels, backbone stem / blocks / output width, squeeze-excite)
and the variants that have them.

A layout adapter (:mod:`efficientdet.ckpt.layouts`) says *where* each feature lives in its keys
(a :data:`SignatureSpec`); this module reads the features and compares them with every variant.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import VARIANTS, Variant, get_config, stem_channels

# feature name → (how, regex[, second regex]). ``how``:
#   'shape0' / 'shape-1': first / last dimension of the one key matching the regex;
#   'count': number of distinct first regex groups over the keys;
#   'last_shape0' / 'last_shape-1': that dimension of the highest-numbered match (group 1);
#   'flag': 1 when a key matches the second regex, 0 when keys match only the first, None when none do.
SignatureSpec = Mapping[str, Tuple[str, ...]]
FEATURES = ('fpn_channels', 'cells', 'head_repeats', 'levels', 'stem', 'blocks', 'backbone_out', 'se')


def classes_from_bias(sd: Mapping[str, Any], key: str, num_anchors: int = 9) -> Optional[int]:
    """The class count a classifier's last bias ``key`` (or ``key:0``) gives: its length is
    num_anchors x num_classes; None when ``sd`` has no such 1-d tensor or array of that length."""
    t = sd.get(key, sd.get(key + ':0'))
    shape = tuple(t.shape) if t is not None else ()
    if len(shape) != 1 or shape[0] % num_anchors:
        return None
    return int(shape[0]) // num_anchors


def _sort_key(group: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in group.split('.'))


def shape_signature(sd: Mapping[str, Any], spec: Optional[SignatureSpec]) -> Dict[str, Optional[int]]:
    """The features of :data:`FEATURES` read from the tensor shapes of ``sd`` at the places ``spec``
    names (None where the state_dict lacks them; ``{}`` without a spec). Keys may end in ``':0'``."""
    out: Dict[str, Optional[int]] = {}
    if not spec:
        return out
    keys = [k[:-2] if k.endswith(':0') else k for k in sd]
    shapes = {kk: tuple(sd[k].shape) for kk, k in zip(keys, sd)}
    for name, (how, pattern, *more) in spec.items():
        rx = re.compile(pattern)
        if how == 'flag':
            feature = re.compile(more[0])
            present = any(rx.match(k) for k in keys)
            out[name] = int(any(feature.match(k) for k in keys)) if present else None
        elif how.startswith('shape'):
            hit = next((k for k in keys if rx.fullmatch(k)), None)
            out[name] = None if hit is None or not shapes[hit] else int(shapes[hit][0 if how == 'shape0' else -1])
        elif how == 'count':
            groups = {m.group(1) for m in (rx.match(k) for k in keys) if m}
            out[name] = len(groups) or None
        else:  # last_shape*: the highest-numbered match; among its keys the last name (TF: conv2d_1 projects)
            hits = [(m.group(1), k) for m, k in ((rx.fullmatch(k), k) for k in keys) if m]
            if hits:
                last_idx = max(_sort_key(g) for g, _ in hits)
                shape = shapes[sorted(k for g, k in hits if _sort_key(g) == last_idx)[-1]]
                out[name] = int(shape[0 if how == 'last_shape0' else -1])
            else:
                out[name] = None
    return out


def expected_signature(variant: Variant) -> Dict[str, int]:
    """The features every state_dict of ``variant`` (0-8 or a Lite name) has."""
    cfg = get_config(variant)
    stages = cfg.backbone_stages
    return dict(fpn_channels=cfg.fpn_num_filters, cells=cfg.fpn_cell_repeats, head_repeats=cfg.box_class_repeats,
                levels=len(cfg.levels), stem=stem_channels(cfg.backbone), blocks=sum(s.repeats for s in stages),
                backbone_out=stages[-1].out_ch, se=int(stages[0].se_ratio is not None))


def matching_variants(sd: Mapping[str, Any], spec: Optional[SignatureSpec]) -> List[Variant]:
    """Every variant (0-8, 8 = D7x, then the Lite names) whose features agree with ``sd``'s.
    D6 and D7 have identical shapes, so a D6/D7 file gives ``[6, 7]``; ``[]``: no variant fits
    (or nothing recognisable)."""
    sig = {k: v for k, v in shape_signature(sd, spec).items() if v is not None}
    if not sig:
        return []
    return [c for c in VARIANTS if all(expected_signature(c)[k] == v for k, v in sig.items())]


def describe_variants(candidates) -> str:
    """``[3]`` → 'efficientdet-d3'; ``[6, 7]`` → 'efficientdet-d6 or efficientdet-d7'."""
    if not candidates:
        return 'no known EfficientDet variant'
    return ' or '.join(get_config(c).name for c in candidates)
