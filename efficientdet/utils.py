"""Yet-Another-EfficientDet-Pytorch compatible names: ``from efficientdet.utils import BBoxTransform,
ClipBoxes, Anchors`` keeps working. The implementations live in :mod:`efficientdet.anchors`."""
from .anchors import Anchors, BBoxTransform, ClipBoxes

__all__ = ['Anchors', 'BBoxTransform', 'ClipBoxes']
