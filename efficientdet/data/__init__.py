"""Data: COCO-format dataset, official-style transforms, collate/loader, synthetic shapes, checker."""
from .dataset import (CROWD_CLASS, ISSUES, CocoDataset, Issues, build_dataloader, collate_fn, index_coco,
                      load_coco_json, load_image_checked)
from .transforms import DetectionTransform, hflip, letterbox_scale, resize_and_crop

__all__ = ['CROWD_CLASS', 'ISSUES', 'CocoDataset', 'Issues', 'build_dataloader', 'collate_fn', 'index_coco',
           'load_coco_json', 'load_image_checked', 'DetectionTransform', 'hflip', 'letterbox_scale',
           'resize_and_crop']
