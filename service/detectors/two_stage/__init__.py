"""Faster R-CNN and Mask R-CNN (ResNet/ResNeXt-FPN) with MMDetection 3.x key names: see `api`."""
from .api import REGISTRY, arch_spec, build, list_archs, load_detector, num_classes_in, predict
from .config import RPNTestConfig, TwoStageTestConfig
from .decode import ImageDetections

__all__ = ["REGISTRY", "ImageDetections", "RPNTestConfig", "TwoStageTestConfig", "arch_spec", "build",
           "list_archs", "load_detector", "num_classes_in", "predict"]
