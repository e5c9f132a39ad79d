"""One view of any detector for distillation: neck features, dense head outputs, anchors."""

from detkd.adapters.teachers import TEACHER_FAMILIES, create_teacher, teacher_family
from detkd.adapters.ultralytics import UltralyticsAdapter, detect_head, load_teacher, load_ultralytics_model
from detkd.adapters.view import DetectorAdapter, DetectorView

__all__ = [
    "TEACHER_FAMILIES",
    "DetectorAdapter",
    "DetectorView",
    "UltralyticsAdapter",
    "create_teacher",
    "detect_head",
    "load_teacher",
    "load_ultralytics_model",
    "teacher_family",
]
