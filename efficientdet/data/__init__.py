"""Data: dataset formats (COCO json, Pascal VOC, YOLO), the one annotation validator and category
rule, the dataset with official-style transforms and a user-transform hook, collate/loader,
synthetic shapes, checker (with anchor fit) and converter."""
from .annotations import (CROWD_CLASS, ISSUES, CategoryMap, CocoIndex, Issues, index_coco, load_coco_json,
                          resolve_categories)
from .dataset import CocoDataset, DetectionDataset, build_dataloader, build_dataset, collate_fn
from .formats import FORMATS, DatasetFormat, SplitData, get_format, load_split, project_split, register_format
from .images import load_image_checked
from .transforms import DetectionTransform, albumentations_transform, hflip, letterbox_scale, resize_and_crop

__all__ = ['CROWD_CLASS', 'ISSUES', 'CategoryMap', 'CocoIndex', 'Issues', 'index_coco', 'load_coco_json',
           'resolve_categories', 'CocoDataset', 'DetectionDataset', 'build_dataloader', 'build_dataset',
           'collate_fn', 'FORMATS', 'DatasetFormat', 'SplitData', 'get_format', 'load_split', 'project_split',
           'register_format', 'load_image_checked', 'DetectionTransform', 'albumentations_transform', 'hflip',
           'letterbox_scale', 'resize_and_crop']
