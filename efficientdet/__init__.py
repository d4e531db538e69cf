"""EfficientDet D0–D7x in PyTorch, faithful to the official TensorFlow model."""
from .config import CONFIGS, EfficientDetConfig, get_config
from .model import EfficientDetBackbone

__all__ = ['EfficientDetBackbone', 'EfficientDetConfig', 'CONFIGS', 'get_config', 'Detector', 'build_model']
__version__ = '0.1.0'


def __getattr__(name):  # lazy: the inference API pulls in OpenCV
    if name == 'Detector':
        from .detector import Detector
        return Detector
    if name == 'build_model':
        from .factory import build_model
        return build_model
    raise AttributeError(name)
