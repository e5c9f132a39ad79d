"""Training: distillation inside Ultralytics' loop."""

from detkd.engine.api import distill, resume

__all__ = ["distill", "resume"]
