"""Model configurations, as data: one row per compound coefficient (D0 … D7, D7x).

Numbers follow the official google/automl EfficientDet ``hparams_config.py`` and the
EfficientNet builder. Nothing here branches on the variant; the model reads these tables.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np

# Official aspect ratios as (x, y) multipliers: 1, sqrt(2) wide, sqrt(2) tall.
OFFICIAL_RATIOS: Tuple[Tuple[float, float], ...] = (
    (1.0, 1.0), (2 ** 0.5, 2 ** -0.5), (2 ** -0.5, 2 ** 0.5))
# Yet-Another-EfficientDet-Pytorch's rounded approximation (measured: moves anchors by up to 5.8 px).
ZYLO117_RATIOS: Tuple[Tuple[float, float], ...] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
DEFAULT_SCALES: Tuple[float, ...] = (2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0))
# Input normalisation of the official models (RGB, 0-1 scale).
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

COMPAT_MODES = ('official', 'zylo117')

# TF BatchNormalization(momentum=0.99) == torch BatchNorm2d(momentum=0.01).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
FUSION_EPS = 1e-4


@dataclass(frozen=True)
class EfficientNetParams:
    width: float
    depth: float
    drop_connect_rate: float = 0.2


EFFICIENTNET_PARAMS = {
    0: EfficientNetParams(1.0, 1.0), 1: EfficientNetParams(1.0, 1.1),
    2: EfficientNetParams(1.1, 1.2), 3: EfficientNetParams(1.2, 1.4),
    4: EfficientNetParams(1.4, 1.8), 5: EfficientNetParams(1.6, 2.2),
    6: EfficientNetParams(1.8, 2.6), 7: EfficientNetParams(2.0, 3.1),
}


@dataclass(frozen=True)
class BlockArgs:
    """One EfficientNet stage before width/depth scaling."""
    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_ch: int
    out_ch: int
    se_ratio: float = 0.25


EFFICIENTNET_STAGES: Tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16), BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40), BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112), BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)
# Backbone features handed to the BiFPN: the outputs of these stages (strides 8, 16, 32).
FEATURE_STAGES: Tuple[int, ...] = (2, 4, 6)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding (official ``round_filters``)."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class EfficientDetConfig:
    compound_coef: int
    name: str
    backbone_coef: int
    fpn_num_filters: int
    fpn_cell_repeats: int
    box_class_repeats: int
    input_size: int
    anchor_scale: float
    max_level: int = 7
    min_level: int = 3
    fusion: str = 'fast'  # 'fast' (fast normalised fusion) or 'sum'

    @property
    def levels(self) -> List[int]:
        return list(range(self.min_level, self.max_level + 1))

    @property
    def backbone_channels(self) -> List[int]:
        width = EFFICIENTNET_PARAMS[self.backbone_coef].width
        return [round_filters(EFFICIENTNET_STAGES[s].out_ch, width) for s in FEATURE_STAGES]

    @property
    def size_divisor(self) -> int:
        return 2 ** self.max_level


CONFIGS = {
    0: EfficientDetConfig(0, 'efficientdet-d0', 0, 64, 3, 3, 512, 4.0),
    1: EfficientDetConfig(1, 'efficientdet-d1', 1, 88, 4, 3, 640, 4.0),
    2: EfficientDetConfig(2, 'efficientdet-d2', 2, 112, 5, 3, 768, 4.0),
    3: EfficientDetConfig(3, 'efficientdet-d3', 3, 160, 6, 4, 896, 4.0),
    4: EfficientDetConfig(4, 'efficientdet-d4', 4, 224, 7, 4, 1024, 4.0),
    5: EfficientDetConfig(5, 'efficientdet-d5', 5, 288, 7, 4, 1280, 4.0),
    6: EfficientDetConfig(6, 'efficientdet-d6', 6, 384, 8, 5, 1280, 4.0, fusion='sum'),
    7: EfficientDetConfig(7, 'efficientdet-d7', 6, 384, 8, 5, 1536, 5.0, fusion='sum'),
    8: EfficientDetConfig(8, 'efficientdet-d7x', 7, 384, 8, 5, 1536, 4.0, max_level=8, fusion='sum'),
}


# A variant is keyed by an int for D0-D7x (0-8, 8 = D7x) and by a name for the Lite family.
Variant = Union[int, str]
LITE_VARIANTS: Tuple[str, ...] = ('lite0', 'lite1', 'lite2', 'lite3', 'lite3x', 'lite4')
VARIANT_HELP = '0-8 (EfficientDet D0-D7, 8 = D7x; also d0..d7, d7x) or lite0, lite1, lite2, lite3, lite3x, lite4'


def parse_variant(value: Union[int, str]) -> Variant:
    """``0``, ``'0'``, ``'d0'``, ``'efficientdet-d7x'``, ``'lite3x'`` … → the variant key
    (int 0-8 or a Lite name). Raises ValueError naming the accepted values."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        key: Variant = int(value)
    else:
        text = str(value).strip().lower()
        for prefix in ('efficientdet-', 'efficientdet_', 'tf_efficientdet_'):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if text == 'd7x':
            key = 8
        elif re.fullmatch(r'd?[0-8]', text):
            key = int(text.lstrip('d'))
        else:
            key = text
    if key in CONFIGS or key in LITE_VARIANTS:
        return key
    raise ValueError(f'unknown EfficientDet variant {value!r}: use {VARIANT_HELP}')


def variant_tag(key: Variant) -> str:
    """Short name used in file names and messages: ``d0`` … ``d7``, ``d7x``, ``lite0`` …"""
    key = parse_variant(key)
    if isinstance(key, str):
        return key
    return 'd7x' if key == 8 else f'd{key}'


def get_config(compound_coef: Variant) -> EfficientDetConfig:
    key = parse_variant(compound_coef)
    if key not in CONFIGS:
        raise ValueError(f'variant {compound_coef!r} has no configuration: use {VARIANT_HELP}')
    return CONFIGS[key]


def as_hw(size) -> Tuple[int, int]:
    """``512`` or ``(H, W)`` → ``(H, W)`` as positive ints (ValueError otherwise)."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f'input size must be positive, got {size!r}')
    return h, w


def check_image_size(height: int, width: int, compound_coef: int) -> None:
    """Raise ValueError unless H and W are positive multiples of 2**max_level."""
    div = get_config(compound_coef).size_divisor
    for name, v in (('height', height), ('width', width)):
        if v <= 0 or v % div:
            raise ValueError(
                f'image {name} {v} is not a multiple of {div} (required by D{compound_coef} with '
                f'levels up to P{get_config(compound_coef).max_level}); pick e.g. '
                f'{max(div, (v + div - 1) // div * div)}')


def ratios_for(compat: str, ratios: Sequence[Sequence[float]] | None) -> Tuple[Tuple[float, float], ...]:
    if ratios is not None:
        return tuple((float(a), float(b)) for a, b in ratios)
    return ZYLO117_RATIOS if compat == 'zylo117' else OFFICIAL_RATIOS
