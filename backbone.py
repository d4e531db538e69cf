"""Top-level entry point kept for Yet-Another-EfficientDet-Pytorch users:
``from backbone import EfficientDetBackbone``."""
from efficientdet.model import EfficientDetBackbone

__all__ = ['EfficientDetBackbone']
