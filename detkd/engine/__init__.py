"""Training: distillation inside Ultralytics' loop."""

from detkd.engine.api import distill

__all__ = ["distill"]
