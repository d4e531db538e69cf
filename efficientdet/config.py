"""Model configurations, as data: one row per variant (D0 … D7, D7x keyed 0-8; EfficientDet-Lite0 …
Lite4 keyed 'lite0' … 'lite4', 'lite3x').

Numbers follow the official google/automl EfficientDet ``hparams_config.py``, the EfficientNet
builder and the EfficientNet-Lite builder. Nothing here branches on the variant; the model reads
these tables.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

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
# EfficientDet-Lite: official mean_rgb 127, stddev_rgb 128 on the 0-255 scale, i.e.
# (pixel - 127) / 128, written on the 0-1 scale like every other mean/std here.
LITE_MEAN: Tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: Tuple[float, float, float] = (128.0 / 255.0,) * 3
ACTIVATIONS = ('swish', 'relu6')

COMPAT_MODES = ('official', 'zylo117')

# TF BatchNormalization(momentum=0.99) == torch BatchNorm2d(momentum=0.01).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
FUSION_EPS = 1e-4


@dataclass(frozen=True)
class EfficientNetParams:
    """One EfficientNet backbone: width/depth multipliers, stochastic-depth rate (training only),
    squeeze-excitation or not, and whether stem and head are left unscaled (``fix_head_stem``:
    stem 32 channels, first and last stage repeats not depth-scaled; the official Lite builder)."""
    width: float
    depth: float
    drop_connect_rate: float = 0.2
    se: bool = True
    fix_head_stem: bool = False


# EfficientDet's backbones B0-B7. The official EfficientDet turns stochastic depth off for B0
# (``survival_prob = 0.0`` when the backbone name contains 'b0'); B1-B7 keep the builder's 0.8.
EFFICIENTNET_PARAMS = {
    0: EfficientNetParams(1.0, 1.0, 0.0), 1: EfficientNetParams(1.0, 1.1),
    2: EfficientNetParams(1.1, 1.2), 3: EfficientNetParams(1.2, 1.4),
    4: EfficientNetParams(1.4, 1.8), 5: EfficientNetParams(1.6, 2.2),
    6: EfficientNetParams(1.8, 2.6), 7: EfficientNetParams(2.0, 3.1),
}
# Official efficientnet_lite_builder: same width/depth pairs as B0-B4, no SE, ReLU6 (set per
# detector config), fix_head_stem, survival_prob 0.8.
EFFICIENTNET_LITE_PARAMS = {
    i: EfficientNetParams(w, d, 0.2, se=False, fix_head_stem=True)
    for i, (w, d) in enumerate(((1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8)))
}
BACKBONES: Dict[str, EfficientNetParams] = {
    **{f'efficientnet-b{i}': p for i, p in EFFICIENTNET_PARAMS.items()},
    **{f'efficientnet-lite{i}': p for i, p in EFFICIENTNET_LITE_PARAMS.items()},
}
STEM_CHANNELS = 32


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
class StageSpec:
    """One backbone stage after scaling: ``in_ch`` is what its first block really receives."""
    in_ch: int
    out_ch: int
    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    se_ratio: Optional[float]  # None: no squeeze-excitation


def stem_channels(backbone: str) -> int:
    p = BACKBONES[backbone]
    return STEM_CHANNELS if p.fix_head_stem else round_filters(STEM_CHANNELS, p.width)


def backbone_stages(backbone: str) -> List[StageSpec]:
    """The seven scaled stages of an official backbone name (``'efficientnet-b3'``,
    ``'efficientnet-lite3'``), as the official builder builds them: channels rounded with the
    width, repeats ceil-scaled with the depth except the first and last stage when
    ``fix_head_stem``; the first block of stage 0 takes the stem's channels."""
    p = BACKBONES[backbone]
    out: List[StageSpec] = []
    prev = stem_channels(backbone)
    last = len(EFFICIENTNET_STAGES) - 1
    for i, st in enumerate(EFFICIENTNET_STAGES):
        fixed = p.fix_head_stem and i in (0, last)
        out_ch = round_filters(st.out_ch, p.width)
        out.append(StageSpec(prev, out_ch, st.repeats if fixed else round_repeats(st.repeats, p.depth),
                             st.kernel, st.stride, st.expand_ratio, st.se_ratio if p.se else None))
        prev = out_ch
    return out


@dataclass(frozen=True)
class EfficientDetConfig:
    """One variant. ``backbone_coef`` is the index within the backbone's family (B0-B7 or
    Lite0-Lite4); ``backbone`` is the official backbone name. ``act`` is the activation of the
    whole network (backbone, BiFPN, heads); ``mean``/``std`` the default input normalisation
    (RGB, 0-1 scale; see :func:`resolve_normalization`)."""
    compound_coef: Union[int, str]
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
    backbone: str = ''    # official name; '' -> 'efficientnet-b{backbone_coef}'
    act: str = 'swish'    # 'swish' or 'relu6'
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if not self.backbone:
            object.__setattr__(self, 'backbone', f'efficientnet-b{self.backbone_coef}')
        if self.backbone not in BACKBONES or self.act not in ACTIVATIONS:
            raise ValueError(f'{self.name}: unknown backbone {self.backbone!r} or activation {self.act!r}')

    @property
    def is_lite(self) -> bool:
        return self.backbone.startswith('efficientnet-lite')

    @property
    def levels(self) -> List[int]:
        return list(range(self.min_level, self.max_level + 1))

    @property
    def backbone_params(self) -> EfficientNetParams:
        return BACKBONES[self.backbone]

    @property
    def backbone_stages(self) -> List[StageSpec]:
        return backbone_stages(self.backbone)

    @property
    def backbone_channels(self) -> List[int]:
        stages = self.backbone_stages
        return [stages[s].out_ch for s in FEATURE_STAGES]

    @property
    def size_divisor(self) -> int:
        """Sizes that are multiples of this halve exactly down to the top level (the defaults);
        any other size the official model accepts works too (:func:`check_image_size`)."""
        return 2 ** self.max_level


def _lite(i: int, backbone: int, image: int, filters: int, cells: int, heads: int,
          anchor_scale: float, suffix: str = '') -> EfficientDetConfig:
    """Official ``efficientdet_lite_param_dict`` row (``lite_common_param``: sum fusion, ReLU6,
    mean_rgb 127 / stddev_rgb 128)."""
    key = f'lite{i}{suffix}'
    return EfficientDetConfig(key, f'efficientdet-{key}', backbone, filters, cells, heads, image, anchor_scale,
                              fusion='sum', backbone=f'efficientnet-lite{backbone}', act='relu6',
                              mean=LITE_MEAN, std=LITE_STD)


CONFIGS: Dict[Union[int, str], EfficientDetConfig] = {
    0: EfficientDetConfig(0, 'efficientdet-d0', 0, 64, 3, 3, 512, 4.0),
    1: EfficientDetConfig(1, 'efficientdet-d1', 1, 88, 4, 3, 640, 4.0),
    2: EfficientDetConfig(2, 'efficientdet-d2', 2, 112, 5, 3, 768, 4.0),
    3: EfficientDetConfig(3, 'efficientdet-d3', 3, 160, 6, 4, 896, 4.0),
    4: EfficientDetConfig(4, 'efficientdet-d4', 4, 224, 7, 4, 1024, 4.0),
    5: EfficientDetConfig(5, 'efficientdet-d5', 5, 288, 7, 4, 1280, 4.0),
    6: EfficientDetConfig(6, 'efficientdet-d6', 6, 384, 8, 5, 1280, 4.0, fusion='sum'),
    7: EfficientDetConfig(7, 'efficientdet-d7', 6, 384, 8, 5, 1536, 5.0, fusion='sum'),
    8: EfficientDetConfig(8, 'efficientdet-d7x', 7, 384, 8, 5, 1536, 4.0, max_level=8, fusion='sum'),
    'lite0': _lite(0, 0, 320, 64, 3, 3, 3.0),
    'lite1': _lite(1, 1, 384, 88, 4, 3, 3.0),
    'lite2': _lite(2, 2, 448, 112, 5, 3, 3.0),
    'lite3': _lite(3, 3, 512, 160, 6, 4, 4.0),
    'lite3x': _lite(3, 3, 640, 200, 6, 4, 3.0, suffix='x'),
    'lite4': _lite(4, 4, 640, 224, 7, 4, 4.0),
}


# A variant is keyed by an int for D0-D7x (0-8, 8 = D7x) and by a name for the Lite family.
Variant = Union[int, str]
LITE_VARIANTS: Tuple[str, ...] = ('lite0', 'lite1', 'lite2', 'lite3', 'lite3x', 'lite4')
# Every variant key in a stable order (never ``sorted(CONFIGS)``: the keys mix int and str).
VARIANTS: Tuple[Variant, ...] = tuple(range(9)) + LITE_VARIANTS
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
    if key in CONFIGS:
        return key
    raise ValueError(f'unknown EfficientDet variant {value!r}: use {VARIANT_HELP}')


def variant_tag(key: Variant) -> str:
    """Short name used in file names and messages: ``d0`` … ``d7``, ``d7x``, ``lite0`` …"""
    key = parse_variant(key)
    if isinstance(key, str):
        return key
    return 'd7x' if key == 8 else f'd{key}'


def resolve_variant(variant: Union[Variant, str]) -> Variant:
    """The variant key (int 0-8 or a Lite name) of ``variant``; UserError naming ``-c`` otherwise."""
    from .errors import UserError
    try:
        key = parse_variant(variant)
        get_config(key)
    except ValueError as e:
        raise UserError(f'-c {variant}: {e}') from None
    return key


def get_config(compound_coef: Variant) -> EfficientDetConfig:
    """The configuration of a variant (any spelling ``parse_variant`` accepts)."""
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


def feature_sizes(height: int, width: int, max_level: int) -> List[Tuple[int, int]]:
    """(H, W) of levels 0 … max_level as the official ``get_feat_sizes``: level 0 is the image,
    each next level ``ceil(size / 2)`` (what stride-2 "SAME" convs and pools produce)."""
    sizes = [(int(height), int(width))]
    for _ in range(max_level):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def check_image_size(height: int, width: int, compound_coef: Variant) -> None:
    """Raise ValueError for the input sizes the official model cannot run, and only those.

    Any H, W >= 1 works (features ``ceil(size / 2)`` per level, static "SAME" paddings, nearest
    up-sampling and max-pool down-sampling to the actual level sizes) except where one side of a
    level below the top has shrunk to 1 while the other has not: the official resampling then
    neither pools nor up-samples ("Incompatible Resampling"). Multiples of ``2**max_level``
    (128; 256 for D7x) are the defaults and always valid."""
    cfg = get_config(compound_coef)
    for name, v in (('height', height), ('width', width)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f'image {name} must be a whole number >= 1, got {v!r}')
    sizes = feature_sizes(height, width, cfg.max_level)
    for level in range(cfg.min_level, cfg.max_level):
        h, w = sizes[level]
        if (h == 1) != (w == 1):
            div = cfg.size_divisor
            fix = tuple(max(div, (v + div - 1) // div * div) for v in (height, width))
            raise ValueError(
                f'image {height}x{width} is too elongated for {cfg.name}: level P{level} would be {h}x{w}, '
                f'and the official model cannot down-sample a map that is 1 pixel on one side only '
                f'(P{level + 1} would need {(h + 1) // 2}x{(w + 1) // 2}); use a less elongated size, '
                f'e.g. {fix[0]}x{fix[1]}')


def resolve_normalization(variant: Union[Variant, Any], mean: Optional[Sequence[float]] = None,
                          std: Optional[Sequence[float]] = None
                          ) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """The input normalisation (RGB mean, std on the 0-1 scale) to use with ``variant``.

    ``variant``: a variant key, or a model (anything with ``compound_coef``): a model built by
    ``build_model`` carries ``input_mean`` / ``input_std``, what its weights expect (e.g. 0.5 / 0.5
    for effdet's AdvProp ports), which then replace the variant's default.
    ``mean``/``std`` None → that default (ImageNet for D0-D7x; (pixel - 127) / 128 for
    EfficientDet-Lite, as the official Lite models). Given values are used as they are, with one
    exception: ImageNet's mean and std (the default of every project file, and what
    ``projects/coco.yml`` / ``shape.yml`` carry for the D models) given together stand for "the
    default", so a Lite model (or AdvProp weights) gets the normalisation its weights expect.
    To normalise such a model some other way, give values that are not exactly ImageNet's."""
    model = variant if hasattr(variant, 'compound_coef') else None
    cfg = get_config(model.compound_coef if model is not None else variant)
    default_mean = tuple(float(v) for v in getattr(model, 'input_mean', None) or cfg.mean)
    default_std = tuple(float(v) for v in getattr(model, 'input_std', None) or cfg.std)
    m = default_mean if mean is None else tuple(float(v) for v in mean)
    s = default_std if std is None else tuple(float(v) for v in std)
    if _same_values(m, IMAGENET_MEAN) and _same_values(s, IMAGENET_STD):
        m, s = default_mean, default_std
    return tuple(m), tuple(s)  # type: ignore[return-value]


def _same_values(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-9 for x, y in zip(a, b))


def ratios_for(compat: str, ratios: Sequence[Sequence[float]] | None) -> Tuple[Tuple[float, float], ...]:
    if ratios is not None:
        return tuple((float(a), float(b)) for a, b in ratios)
    return ZYLO117_RATIOS if compat == 'zylo117' else OFFICIAL_RATIOS
