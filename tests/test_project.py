"""Project yml loading and the restricted arithmetic parser."""
import math
import os

import pytest
from hypothesis import given, settings, strategies as st

from efficientdet.errors import UserError
from efficientdet.project import PACKAGE_PROJECTS_DIR, load_project, parse_arith

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTS = os.path.join(ROOT, 'projects')
SQRT2 = math.sqrt(2.0)


def write(tmp_path, text, name='p.yml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BASE = "project_name: demo\ntrain_set: train\nval_set: val\nobj_list: ['a', 'b']\n"


def test_coco_project_official_anchors_and_classes():
    p = load_project('coco', PROJECTS)
    assert p.project_name == 'coco' and (p.train_set, p.val_set) == ('train2017', 'val2017')
    assert len(p.obj_list) == 90 and len(set(n for n in p.obj_list if n)) == 80  # official 90-slot label map
    assert p.obj_list[:3] == ['person', 'bicycle', 'car'] and p.obj_list[-1] == 'toothbrush'
    assert p.anchors_scales == pytest.approx([2 ** (k / 3) for k in range(3)], abs=1e-12)
    # official ratios: sqrt(2) wide / tall, not Yet-Another's (1.4, 0.7)
    flat = [v for r in p.anchors_ratios for v in r]
    assert flat == pytest.approx([1, 1, SQRT2, 1 / SQRT2, 1 / SQRT2, SQRT2], abs=1e-12)
    assert p.mean == pytest.approx([0.485, 0.456, 0.406]) and p.std == pytest.approx([0.229, 0.224, 0.225])


def test_coco_names_match_the_coco_category_order():
    import json
    from conftest import need_shared
    ann = need_shared('data', 'coco_tiny', 'annotations', 'instances_val2017.json')
    cats = json.load(open(ann))['categories']
    slots = [''] * 90  # class index = category id - 1; unused ids are '' placeholders
    for c in cats:
        slots[c['id'] - 1] = c['name']
    assert load_project('coco', PROJECTS).obj_list == slots


def test_shape_project():
    p = load_project('shape', PROJECTS)
    assert (p.project_name, p.train_set, p.val_set) == ('shape', 'train', 'val')
    assert p.obj_list == ['rectangle', 'circle', 'triangle'] and p.num_classes == 3
    assert list(p.anchors_ratios[1]) == pytest.approx([SQRT2, 1 / SQRT2])


def test_load_by_path_and_defaults(tmp_path):
    p = load_project(write(tmp_path, BASE))
    assert p.num_gpus == 1 and p.mean == pytest.approx([0.485, 0.456, 0.406])
    assert list(p.anchors_ratios[2]) == pytest.approx([1 / SQRT2, SQRT2])
    assert p.path == str(tmp_path / 'p.yml')


def test_real_yaml_lists_are_accepted(tmp_path):
    text = BASE + "anchors_scales: [1.0, '2 ** 0.5', 2]\nanchors_ratios: [[1, 1], [2.0, 0.5], '(0.5, 2 ** 1)']\n"
    p = load_project(write(tmp_path, text))
    assert p.anchors_scales == pytest.approx([1.0, SQRT2, 2.0])
    assert p.anchors_ratios == [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0)]


def test_yet_another_ratios_and_placeholders_still_load(tmp_path):
    text = ("project_name: coco\ntrain_set: train2017\nval_set: val2017\nnum_gpus: 4\n"
            "anchors_scales: '[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]'\n"
            "anchors_ratios: '[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]'\n"
            "obj_list: ['person', 'bicycle', '', 'car']\n")
    p = load_project(write(tmp_path, text))
    assert p.anchors_ratios == [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]
    assert p.obj_list == ['person', 'bicycle', '', 'car'] and p.num_gpus == 4


def test_missing_project_lists_available(tmp_path):
    (tmp_path / 'alpha.yml').write_text(BASE)
    with pytest.raises(UserError) as e:
        load_project('nosuch', str(tmp_path))
    msg = str(e.value)
    assert 'nosuch' in msg and 'alpha' in msg and 'shape' in msg  # packaged projects are listed too
    assert os.path.isdir(PACKAGE_PROJECTS_DIR)


@pytest.mark.parametrize('text,field', [
    ("train_set: t\nval_set: v\nobj_list: [a]\n", 'project_name'),
    ("project_name: x\nval_set: v\nobj_list: [a]\n", 'train_set'),
    ("project_name: x\ntrain_set: t\nval_set: v\n", 'obj_list'),
    (BASE + "mean: [0.5, 0.5]\n", 'mean'),
    (BASE + "std: [0.2, 0.0, 0.2]\n", 'std'),
    (BASE + "num_gpus: two\n", 'num_gpus'),
    (BASE + "anchors_scales: 'abs(2)'\n", 'anchors_scales'),
    (BASE + "anchors_ratios: '[(1.0, 1.0), (2.0,)]'\n", 'anchors_ratios'),
    (BASE + "anchors_ratios: '[(1.0, -1.0)]'\n", 'anchors_ratios'),
    (BASE.replace("['a', 'b']", "['a', 'a']"), 'obj_list'),
    (BASE.replace("['a', 'b']", "['a', 3]"), 'obj_list'),
    (BASE.replace("['a', 'b']", "a"), 'obj_list'),
])
def test_missing_or_mistyped_fields_name_the_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_project(path)
    assert field in str(e.value) and path in str(e.value)


def test_not_yaml_or_not_mapping(tmp_path):
    with pytest.raises(UserError, match='not valid YAML'):
        load_project(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(UserError, match='mapping'):
        load_project(write(tmp_path, "- 1\n- 2\n"))


def test_yaml_is_loaded_safely(tmp_path):
    with pytest.raises(UserError):
        load_project(write(tmp_path, BASE + "mean: !!python/object/apply:os.getcwd []\n"))


@pytest.mark.parametrize('expr,value', [
    ('[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]', [1.0, 2 ** (1 / 3), 2 ** (2 / 3)]),
    ('[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]', [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]),
    ('[(1.0, 1.0), (2 ** 0.5, 2 ** -0.5), (2 ** -0.5, 2 ** 0.5)]',
     [(1.0, 1.0), (SQRT2, 1 / SQRT2), (1 / SQRT2, SQRT2)]),
    ('-(3 - 5) * +2 / 8', 0.5),
    ('2 ** 3 ** 2', 512.0),
    ('((1,), [])', ((1.0,), [])),
])
def test_parse_arith_accepts(expr, value):
    def same(a, b):
        if isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return isinstance(a, float) and abs(a - b) <= 1e-12 * max(1.0, abs(b))
    assert same(parse_arith(expr, 'f'), value)


@pytest.mark.parametrize('expr', [
    "__import__('os')", "__import__('os').system('true')", 'x', 'abs(-1)', '(1).real', '[1][0]', '2**10**10',
    '10 ** 400', '1e400', '1 / 0', "'a'", 'True', '1j', '(-8) ** (1 / 3)', '1 if 1 else 2', 'lambda: 1',
    '1 < 2', '1 // 2', '5 % 2', '1 << 2', '[x for x in []]', '{1: 2}', '', '1,, 2', '[1] * 3', '(' * 500 + ')' * 500,
])
def test_parse_arith_rejects(expr):
    with pytest.raises(UserError) as e:
        parse_arith(expr, 'anchors_scales', 'projects/p.yml')
    assert 'projects/p.yml' in str(e.value) and 'anchors_scales' in str(e.value)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('0123456789.+-*/() [],eExj_a')), max_size=40))
def test_parse_arith_only_raises_user_error(expr):
    try:
        out = parse_arith(expr, 'f')
    except UserError:
        return
    assert isinstance(out, (float, list, tuple))


def _tree():
    leaf = st.floats(min_value=0.0, max_value=100.0, allow_nan=False).map(lambda v: ('num', round(v, 3)))
    return st.recursive(leaf, lambda kids: st.one_of(
        st.tuples(st.sampled_from(['+', '-', '*']), kids, kids),
        st.tuples(st.just('neg'), kids)), max_leaves=8)


def _render(t):
    if t[0] == 'num':
        return repr(t[1])
    if t[0] == 'neg':
        return f'-({_render(t[1])})'
    return f'({_render(t[1])} {t[0]} {_render(t[2])})'


def _value(t):
    if t[0] == 'num':
        return t[1]
    if t[0] == 'neg':
        return -_value(t[1])
    a, b = _value(t[1]), _value(t[2])
    return a + b if t[0] == '+' else a - b if t[0] == '-' else a * b


@settings(max_examples=40, deadline=None)
@given(_tree())
def test_parse_arith_matches_direct_arithmetic(tree):
    assert parse_arith(_render(tree), 'f') == pytest.approx(_value(tree), rel=1e-12, abs=1e-9)


def test_scale_range_field(tmp_path):
    """``scale_range`` (the official jitter_min / jitter_max) defaults to [0.1, 2.0]; a bad value
    names the field and what is allowed."""
    assert load_project(write(tmp_path, BASE)).scale_range == (0.1, 2.0)
    assert load_project(write(tmp_path, BASE + 'scale_range: [0.5, 1.5]\n')).scale_range == (0.5, 1.5)
    assert load_project(write(tmp_path, BASE + 'scale_range: [1, 1]\n')).scale_range == (1.0, 1.0)
    for bad in ('[1.5, 0.5]', '[0, 1]', '0.5', '[0.5]', "['a', 1]", '[.nan, 1]'):
        with pytest.raises(UserError, match=r"p\.yml: field 'scale_range' must be two numbers \[min, max\]"):
            load_project(write(tmp_path, BASE + f'scale_range: {bad}\n'))


@pytest.mark.parametrize('key,means', [
    ('jitter_min', 'scale_range'), ('jitter_max', 'scale_range'), ('num_classes', 'obj_list'),
    ('label_map', 'obj_list'), ('aspect_ratios', 'anchors_ratios'), ('mean_rgb', 'mean'),
])
def test_official_tf_names_say_the_field_that_means_the_same(tmp_path, key, means):
    base = 'project_name: x\ntrain_set: a\nval_set: b\nobj_list: [a]\n'
    with pytest.raises(UserError, match=rf"unknown field '{key}' \(an official TF name\); here that is {means}"):
        load_project(write(tmp_path, base + f'{key}: 0.5\n'))


def test_unknown_field_is_an_error_with_or_without_a_close_match(tmp_path):
    base = 'project_name: x\ntrain_set: a\nval_set: b\nobj_list: [a]\n'
    with pytest.raises(UserError, match=r"unknown field 'val_sett'; did you mean 'val_set'\?"):
        load_project(write(tmp_path, base + 'val_sett: c\n'))
    with pytest.raises(UserError, match=r"unknown field 'colour'; \(fields: project_name, "):
        load_project(write(tmp_path, base + 'colour: red\n'))
