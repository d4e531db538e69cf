"""Project files (``projects/<name>.yml``): dataset names, class list, normalisation and anchors.

The format is Yet-Another-EfficientDet-Pytorch's, read with ``yaml.safe_load``. Anchor fields may be
strings holding arithmetic such as ``'[2 ** 0, 2 ** (1.0 / 3.0)]'``; they are evaluated by
:func:`parse_arith`, a small whitelist interpreter over the ``ast`` of the expression (numbers,
``+ - * / **``, unary signs, parentheses, lists and tuples) — never by ``eval``.
"""
from __future__ import annotations

import ast
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from .config import DEFAULT_SCALES, IMAGENET_MEAN, IMAGENET_STD, OFFICIAL_RATIOS
from .errors import UserError


# Packaged projects, used when the requested projects_dir does not hold the file.
PACKAGE_PROJECTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'projects')

Arith = Union[float, List['Arith'], Tuple['Arith', ...]]

KNOWN_FIELDS = ('project_name', 'train_set', 'val_set', 'num_gpus', 'mean', 'std', 'anchors_scales',
                'anchors_ratios', 'obj_list', 'dataset_format', 'scale_range')
# Official training scale jitter (hparams ``jitter_min``, ``jitter_max``).
OFFICIAL_SCALE_RANGE = (0.1, 2.0)
# The official hparams names (google/automl ``hparams_config.py``) a project file may hold by habit,
# and the field or option that means the same here.
OFFICIAL_NAMES = {
    'jitter_min': "scale_range: [min, max] (the official jitter_min, jitter_max)",
    'jitter_max': "scale_range: [min, max] (the official jitter_min, jitter_max)",
    'num_classes': 'obj_list (the class count is its length)',
    'label_map': 'obj_list (class names in class-index order)',
    'aspect_ratios': 'anchors_ratios',
    'num_scales': 'anchors_scales (the scales themselves, e.g. [2 ** 0, 2 ** (1 / 3), 2 ** (2 / 3)])',
    'anchor_scale': 'the variant (-c) fixes the anchor scale; anchors_scales are the per-octave scales',
    'mean_rgb': 'mean (RGB on the 0-1 scale: the official 0-255 values divided by 255)',
    'stddev_rgb': 'std (RGB on the 0-1 scale: the official 0-255 values divided by 255)',
    'image_size': 'the --image_size option of the scripts',
    'training_file_pattern': 'train_set (a folder name under {data_path}/{project_name}/)',
    'val_file_pattern': 'val_set (a folder name under {data_path}/{project_name}/)',
    'input_rand_hflip': 'nothing: training flips horizontally with probability 0.5',
}

_MAX_EXPR_CHARS = 4096
_MAX_EXPONENT = 1024.0
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a ** b,
}
_SYMBOL = {ast.Add: '+', ast.Sub: '-', ast.Mult: '*', ast.Div: '/', ast.Pow: '**'}


def parse_arith(expr: str, field: str, path: str = '<string>') -> Arith:
    """Evaluate a plain arithmetic expression: numbers, ``+ - * / **``, unary ``+``/``-``,
    parentheses, lists ``[...]`` and tuples ``(...)``. Numbers come back as floats.

    Anything else (names, calls, attributes, subscripts, strings, exponents above 1024, results
    that overflow or are not real) raises :class:`UserError` naming ``path`` and ``field``.
    """
    where = f'{path}: field {field!r}'
    if not isinstance(expr, str):
        raise UserError(f'{where} must be a string with an arithmetic expression, got {type(expr).__name__}')
    if len(expr) > _MAX_EXPR_CHARS:
        raise UserError(f'{where} is longer than {_MAX_EXPR_CHARS} characters; write plain numbers instead')
    try:
        tree = ast.parse(expr.strip(), mode='eval')
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UserError(f'{where}: {expr!r} is not a valid arithmetic expression ({type(e).__name__}); '
                        'use numbers, + - * / **, parentheses, [lists] and (tuples)') from None
    try:
        return _eval_node(tree.body, where)
    except RecursionError:
        raise UserError(f'{where}: expression is nested too deeply') from None


def _eval_node(node: ast.AST, where: str) -> Arith:
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f'{where}: only numbers are allowed, found {v!r}')
        try:
            out = float(v)
        except OverflowError:
            raise UserError(f'{where}: number {v} is too large') from None
        return _finite(out, where)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _number(_eval_node(node.operand, where), where)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a = _number(_eval_node(node.left, where), where)
        b = _number(_eval_node(node.right, where), where)
        if isinstance(node.op, ast.Pow) and abs(b) > _MAX_EXPONENT:
            raise UserError(f'{where}: exponent {b:g} is too large (at most {_MAX_EXPONENT:g})')
        try:
            out = _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError:
            raise UserError(f'{where}: division by zero') from None
        except OverflowError:
            raise UserError(f'{where}: {a:g} {_SYMBOL[type(node.op)]} {b:g} overflows') from None
        if isinstance(out, complex):
            raise UserError(f'{where}: {a:g} ** {b:g} is not a real number')
        return _finite(float(out), where)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_eval_node(e, where) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f'name {node.id!r}'
    elif isinstance(node, ast.Call):
        what = 'function call'
    elif isinstance(node, ast.Attribute):
        what = f'attribute access .{node.attr}'
    elif isinstance(node, (ast.BinOp, ast.UnaryOp)):
        what = f'operator {type(node.op).__name__}'
    raise UserError(f'{where}: {what} is not allowed; use numbers, + - * / **, parentheses, [lists] and (tuples)')


def _number(v: Arith, where: str) -> float:
    if not isinstance(v, float):
        raise UserError(f'{where}: arithmetic on a list or tuple is not allowed')
    return v


def _finite(v: float, where: str) -> float:
    if not math.isfinite(v):
        raise UserError(f'{where}: result {v} is not finite')
    return v


@dataclass
class Project:
    """A loaded ``projects/<name>.yml``.

    ``anchors_ratios`` are (x, y) multipliers as in the official ``aspect_ratios`` pairs;
    ``obj_list`` holds class names in class-index order ('' entries are placeholders, kept so
    Yet-Another's 90-entry COCO list keeps its indices).
    """
    project_name: str
    train_set: str
    val_set: str
    num_gpus: int
    mean: List[float]
    std: List[float]
    anchors_scales: List[float]
    anchors_ratios: List[Tuple[float, float]]
    obj_list: List[str]
    path: str
    extra: Dict[str, Any] = field(default_factory=dict)
    dataset_format: str = 'coco'
    scale_range: Tuple[float, float] = OFFICIAL_SCALE_RANGE

    @property
    def num_classes(self) -> int:
        return len(self.obj_list)


def available_projects(projects_dir: str) -> List[str]:
    """Project names (file stems) found in ``projects_dir`` (and the packaged projects folder)."""
    names = set()
    for d in (projects_dir, PACKAGE_PROJECTS_DIR):
        if os.path.isdir(d):
            names.update(os.path.splitext(f)[0] for f in os.listdir(d) if f.endswith(('.yml', '.yaml')))
    return sorted(names)


def resolve_project_path(name_or_path: str, projects_dir: str = 'projects') -> str:
    """Path of a project file given a name (``coco``) or a path (``my/proj.yml``)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UserError('no project given; pass -p NAME (a file projects/NAME.yml)')
    candidates = []
    if name_or_path.endswith(('.yml', '.yaml')) or os.sep in name_or_path or '/' in name_or_path:
        candidates.append(name_or_path)
    for d in (projects_dir, PACKAGE_PROJECTS_DIR):
        candidates += [os.path.join(d, name_or_path + '.yml'), os.path.join(d, name_or_path + '.yaml')]
    for c in candidates:
        if os.path.isfile(c):
            return c
    avail = available_projects(projects_dir)
    listing = ', '.join(avail) if avail else 'none'
    raise UserError(f'project {name_or_path!r} not found (looked for {candidates[0]}); available projects in '
                    f'{projects_dir}: {listing}. Create {os.path.join(projects_dir, name_or_path + ".yml")} '
                    'or pass -p with one of those names')


def load_project(name_or_path: str, projects_dir: str = 'projects') -> Project:
    """Load and validate a project yml (by name from ``projects_dir`` or by path).

    Required fields: project_name, train_set, val_set, obj_list. Optional: num_gpus (1),
    mean/std (ImageNet, RGB), anchors_scales / anchors_ratios (official values), dataset_format
    (coco, voc or yolo; default coco), scale_range ([min, max] of the training scale jitter, the
    official ``jitter_min``/``jitter_max``; default [0.1, 2.0]).
    """
    path = resolve_project_path(name_or_path, projects_dir)
    try:
        with open(path, 'r', encoding='utf-8') as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None) or getattr(e, 'context_mark', None)
        where = f'{path}:{mark.line + 1}:{mark.column + 1}' if mark is not None else path
        what = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise UserError(f'{where}: not valid YAML: {what}') from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'cannot read project file {path}: {e}') from None
    if not isinstance(raw, dict):
        raise UserError(f'{path} must be a YAML mapping of fields (project_name, train_set, val_set, obj_list, ...)')
    # an unknown field would otherwise be ignored and its default used silently
    extra = {k: v for k, v in raw.items() if k not in KNOWN_FIELDS}
    for key in extra:
        if str(key) in OFFICIAL_NAMES:
            raise UserError(f'{path}: unknown field {key!r} (an official TF name); here that is '
                            f'{OFFICIAL_NAMES[str(key)]}')
        close = difflib.get_close_matches(str(key), KNOWN_FIELDS, n=1, cutoff=0.6)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise UserError(f'{path}: unknown field {key!r}; {hint}(fields: {", ".join(KNOWN_FIELDS)})')

    def req_str(key: str) -> str:
        if key not in raw or raw[key] is None:
            raise UserError(f'{path}: required field {key!r} is missing')
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v).strip() == '':
            raise UserError(f'{path}: field {key!r} must be a non-empty string, got {v!r}')
        return str(v)

    project_name = req_str('project_name')
    train_set = req_str('train_set')
    val_set = req_str('val_set')
    num_gpus = raw.get('num_gpus', 1)
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0:
        raise UserError(f'{path}: field \'num_gpus\' must be a whole number >= 0, got {num_gpus!r}')
    mean = _float_list(raw.get('mean', list(IMAGENET_MEAN)), 'mean', path, length=3)
    std = _float_list(raw.get('std', list(IMAGENET_STD)), 'std', path, length=3)
    if any(s <= 0 for s in std):
        raise UserError(f'{path}: field \'std\' must be positive, got {std}')
    scales = _float_list(raw.get('anchors_scales', list(DEFAULT_SCALES)), 'anchors_scales', path)
    if not scales or any(s <= 0 for s in scales):
        raise UserError(f'{path}: field \'anchors_scales\' must be a non-empty list of positive numbers, got {scales}')
    ratios = _ratio_list(raw.get('anchors_ratios', [list(r) for r in OFFICIAL_RATIOS]), path)
    obj_list = _obj_list(raw.get('obj_list'), path)
    dataset_format = raw.get('dataset_format', 'coco')
    from .data.formats import format_names  # the registry of formats is the one list of names
    if not isinstance(dataset_format, str) or dataset_format.strip().lower() not in format_names():
        raise UserError(f'{path}: field \'dataset_format\' must be one of {", ".join(format_names())}, '
                        f'got {dataset_format!r}')
    scale_range = check_scale_range(raw.get('scale_range', list(OFFICIAL_SCALE_RANGE)), f'{path}: field \'scale_range\'')
    return Project(project_name, train_set, val_set, num_gpus, mean, std, scales, ratios, obj_list,
                   os.path.abspath(path), extra, dataset_format.strip().lower(), scale_range)


def check_scale_range(value: Any, where: str) -> Tuple[float, float]:
    """``[min, max]`` of the random resize factor of training augmentation: 0 < min <= max."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value))
    if not ok or not 0 < value[0] <= value[1]:
        raise UserError(f'{where} must be two numbers [min, max] with 0 < min <= max (the official jitter is '
                        f'[0.1, 2.0]; [1, 1] turns scale jitter off), got {value!r}')
    return float(value[0]), float(value[1])


def _arith_field(value: Any, key: str, path: str) -> Any:
    """A field that may be an arithmetic string, a list of strings/numbers, or plain numbers."""
    if isinstance(value, str):
        return parse_arith(value, key, path)
    if isinstance(value, (list, tuple)):
        return [_arith_field(v, key, path) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f'{path}: field {key!r} holds {value!r}; use numbers or an arithmetic string')
    v = float(value)
    if not math.isfinite(v):
        raise UserError(f'{path}: field {key!r} holds a non-finite number {value!r}')
    return v


def _float_list(value: Any, key: str, path: str, length: Optional[int] = None) -> List[float]:
    v = _arith_field(value, key, path)
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, float) for x in v):
        raise UserError(f'{path}: field {key!r} must be a list of numbers, got {value!r}')
    if length is not None and len(v) != length:
        raise UserError(f'{path}: field {key!r} must have {length} numbers (R, G, B), got {len(v)}')
    return [float(x) for x in v]


def _ratio_list(value: Any, path: str) -> List[Tuple[float, float]]:
    v = _arith_field(value, 'anchors_ratios', path)
    ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, float) and x > 0 for x in r) for r in v)
    if not ok:
        raise UserError(f'{path}: field \'anchors_ratios\' must be a non-empty list of (x, y) pairs of positive '
                        f'numbers such as \'[(1.0, 1.0), (2 ** 0.5, 2 ** -0.5)]\', got {value!r}')
    return [(float(r[0]), float(r[1])) for r in v]


def _obj_list(value: Any, path: str) -> List[str]:
    if value is None:
        raise UserError(f'{path}: required field \'obj_list\' is missing (the class names, in class-index order)')
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f'{path}: field \'obj_list\' must be a non-empty list of class names, got {value!r}')
    names: List[str] = []
    for i, n in enumerate(value):
        if not isinstance(n, str):
            raise UserError(f'{path}: obj_list[{i}] is {n!r} ({type(n).__name__}); class names must be strings '
                            '(quote it in the YAML)')
        names.append(n)
    dups = sorted({n for n in names if n and names.count(n) > 1})
    if dups:
        raise UserError(f'{path}: obj_list repeats class name(s) {dups}; each class must appear once')
    if not any(names):
        raise UserError(f'{path}: obj_list has no non-empty class names')
    return names
