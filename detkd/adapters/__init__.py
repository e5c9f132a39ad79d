"""One view of any detector for distillation: neck features, dense head outputs, anchors (YOLO or torchvision)."""

from detkd.adapters.teachers import TEACHER_FAMILIES, check_teacher, create_teacher, teacher_family
from detkd.adapters.torchvision import TorchvisionAdapter, save_torchvision_teacher
from detkd.adapters.ultralytics import UltralyticsAdapter, detect_head, load_teacher, load_ultralytics_model
from detkd.adapters.view import DetectorAdapter, DetectorView

__all__ = [
    "TEACHER_FAMILIES",
    "DetectorAdapter",
    "DetectorView",
    "TorchvisionAdapter",
    "UltralyticsAdapter",
    "check_teacher",
    "create_teacher",
    "detect_head",
    "load_teacher",
    "load_ultralytics_model",
    "save_torchvision_teacher",
    "teacher_family",
]
