"""efficientdet.factory: the one model builder and the one input-size validation."""
import numpy as np
import pytest
import torch

from conftest import need_shared
from efficientdet.errors import UserError
from efficientdet.factory import build_model, read_weights, resolve_image_size, resolve_variant

TF_D0 = ('fixtures', 'tf_d0', 'tf_weights.npz')


def test_resolve_variant_and_image_size():
    assert resolve_variant('d7x') == 8 and resolve_variant('lite3x') == 'lite3x'
    assert resolve_image_size(0) == (512, 512) and resolve_image_size('d1', (256, 384)) == (256, 384)
    assert resolve_image_size('lite0') == (320, 320) and resolve_image_size(0, 300) == (300, 300)
    with pytest.raises(UserError, match=r'^-c 9: unknown EfficientDet variant'):
        resolve_variant(9)
    with pytest.raises(UserError, match=r'^--image_size \(64, 512\): .*too elongated'):
        resolve_image_size(0, (64, 512))
    with pytest.raises(UserError, match=r'^--image_size 0:'):
        resolve_image_size(0, 0)


def test_build_model_classes_anchors_and_size():
    m = build_model('d0', project='shape', image_size=(256, 384))
    assert m.num_classes == 3 and m.image_size == (256, 384) and m.compound_coef == 0
    assert build_model(0).num_classes == 90  # nothing says otherwise: the COCO label map
    assert build_model(0, num_classes=7).num_classes == 7
    zy = build_model(0, compat='zylo117')
    assert zy.compat == 'zylo117'
    with pytest.raises(UserError, match='--compat'):
        build_model(0, compat='yet-another')
    with pytest.raises(UserError, match="num_classes=4 but project 'shape' lists 3"):
        build_model(0, project='shape', num_classes=4)


def test_build_model_loads_every_layout_and_counts_classes_from_the_file():
    path = need_shared(*TF_D0)
    m = build_model(0, weights=path, verbose=False)  # no project: the class count comes from the file
    assert m.num_classes == 90 and not m.training
    ref = build_model(0, project='coco', weights=path, verbose=False)
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(UserError) as e:
        build_model(2, weights=path)
    assert str(e.value) == (f'{path}: this file is efficientdet-d0 (from its tensor shapes) but -c 2 '
                            '(efficientdet-d2) was asked; pass -c 0')
    # fine-tuning into 3 classes keeps every other tensor
    ft = build_model(0, project='shape', weights=path, finetune=True, verbose=False)
    same = [k for k, v in ft.state_dict().items() if torch.equal(v, ref.state_dict()[k])]
    assert len(same) == len(ref.state_dict()) - 2  # all but the classifier's last conv weight and bias


def test_read_weights_tf_checkpoint_directory_needs_tensorflow(tmp_path):
    (tmp_path / 'checkpoint').write_text('model_checkpoint_path: "model"\n')
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match='needs TensorFlow'):
            read_weights(str(tmp_path))
    else:  # an empty checkpoint folder
        with pytest.raises(UserError):
            read_weights(str(tmp_path))


def test_placeholder_classes_never_reach_the_detector_output():
    """A '' slot of obj_list (COCO's unused ids) never reaches the Detector's outputs, even when the
    network scores it highest; it is left out before each anchor's best class is taken, so the
    anchors whose top slot it is keep their best real class (here c, sigmoid(2) = 0.88)."""
    from efficientdet.detector import Detector
    model = build_model(0, num_classes=3, image_size=128)
    with torch.no_grad():  # class 1 wins on every anchor
        conv = model.classifier.header.pointwise_conv.conv
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-9.0, 5.0, 2.0]).repeat(conv.bias.numel() // 3))
    image = np.full((100, 120, 3), 128, np.uint8)
    named = Detector(model, ['a', 'b', 'c'], 128, threshold=0.5, iou=0.5)(image)[0]
    assert len(named) > 0 and set(named.class_ids.tolist()) == {1} and named.class_names[0] == 'b'
    placeholder = Detector(model, ['a', '', 'c'], 128, threshold=0.5, iou=0.5)(image)[0]
    assert len(placeholder) == len(named) and set(placeholder.class_names) == {'c'}
    np.testing.assert_allclose(placeholder.scores, 1 / (1 + np.exp(-2.0)), rtol=1e-5)
