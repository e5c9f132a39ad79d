"""detkd: knowledge distillation and transfer for object detectors."""

from detkd.runtime import set_environment as _set_environment

_set_environment()  # before any submodule can import Ultralytics

__version__ = "0.1.0"
