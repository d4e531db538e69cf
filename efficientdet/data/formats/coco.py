"""COCO json (Yet-Another-EfficientDet-Pytorch's layout).

``{root}/{split}/*.jpg`` and ``{root}/annotations/instances_{split}.json``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..annotations import Issues, load_coco_json
from . import DatasetFormat, SplitData, register_format


class CocoFormat(DatasetFormat):
    name = 'coco'
    layout = '{root}/{split}/*.jpg and {root}/annotations/instances_{split}.json'

    def paths(self, root_dir: str, split: str) -> tuple:
        """(annotation json, image folder) of a split."""
        return (os.path.join(root_dir, 'annotations', f'instances_{split}.json'), os.path.join(root_dir, split))

    def read(self, root_dir: str, split: str, obj_list: Optional[Sequence[str]], issues: Issues,
             require_images: bool = True) -> SplitData:
        self.check_root(root_dir, split)
        ann_file, image_dir = self.paths(root_dir, split)
        self.need(ann_file, root_dir, split)
        found = self.need(image_dir, root_dir, split, folder=True, required=require_images)
        return SplitData(load_coco_json(ann_file), image_dir, ann_file, issues, images_found=found)


COCO_FORMAT = register_format(CocoFormat())
