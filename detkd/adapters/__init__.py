"""One view of any detector for distillation: neck features, dense head outputs, anchors."""

from detkd.adapters.ultralytics import UltralyticsAdapter, detect_head, load_teacher, load_ultralytics_model
from detkd.adapters.view import DetectorView

__all__ = ["DetectorView", "UltralyticsAdapter", "detect_head", "load_teacher", "load_ultralytics_model"]
