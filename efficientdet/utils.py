"""Yet-Another-EfficientDet-Pytorch compatible names: ``from efficientdet.utils import BBoxTransform,
ClipBoxes, Anchors`` keeps working. Alias module, kept for users' code: the implementations live in
:mod:`efficientdet.anchors`, and the package itself never imports this module."""
from .anchors import Anchors, BBoxTransform, ClipBoxes

__all__ = ['Anchors', 'BBoxTransform', 'ClipBoxes']
