"""The feature losses a recipe can name, and what each one needs: the one table that recipes, their validation and
the distiller all read.

A feature loss is registered with :func:`register_feature_loss` on its definition, and nothing else needs to change:
the recipe schema (``distill.feature[].loss``), the check of its ``params`` at recipe load, the distiller's
construction and forward, and the logged term (``kd_<name>``) all come from the entry. Two forms:

- a **function** ``f(student, teacher, *inputs, **params)``: the distiller maps the student's features to the
  teacher's channels through the recipe's ``connector`` (and resizes them to the teacher's grid) before calling it;
- an **nn.Module class** ``C(student_channels, teacher_channels, **params)`` whose ``forward(student, teacher,
  *inputs)`` aligns the student itself (MGD's generator, FGD's context blocks): one instance per feature level,
  trained with the student. It receives the student resized to the teacher's grid, at its own channels.

Both take their ``params`` as keyword arguments with defaults (the recipe's ``params:`` may set any of them, nothing
else), read from the signature with :mod:`inspect`. Other arguments must be :data:`INPUTS`, which the distiller
computes for the losses that ask for them (by parameter name). A loss may return a tensor or a dict of tensors,
whose sum is the term.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

INPUTS = {
    "gt_boxes": "ground-truth boxes per image, (K, 4) xyxy in input-image pixels",
    "image_size": "(H, W) of the input images",
    "teacher_scores": "the teacher's max class probability at each location of the level, (N, 1, H·W)",
}


class Param(NamedTuple):
    """One recipe-settable parameter of a loss: its annotated type and its default."""

    type: Any
    default: Any


@dataclass(frozen=True)
class FeatureLoss:
    """A registered feature loss: how to build and call it, and what the distiller must give it."""

    name: str
    definition: Callable  # the function, or the nn.Module class
    params: dict[str, Param]  # recipe ``params:`` keys, with types and defaults
    inputs: tuple[str, ...]  # names from INPUTS, passed as keyword arguments
    connector_at_equal_channels: bool  # functions: False when the loss compares channel-standardised maps (PKD)

    @property
    def learned(self) -> bool:
        """A module with its own parameters and channel alignment (no connector)."""
        return isinstance(self.definition, type)


FEATURE_LOSSES: dict[str, FeatureLoss] = {}


def register_feature_loss(name: str, *, connector_at_equal_channels: bool = True) -> Callable:
    """Decorator: make a loss function or module class usable as ``distill.feature[].loss: <name>``.

    ``connector_at_equal_channels=False`` lets a function loss see the raw student features when both sides have
    the same number of channels (a loss on standardised maps, such as PKD, needs no learned map then).
    """

    def register(definition: Callable) -> Callable:
        if name in FEATURE_LOSSES:
            raise ValueError(f"feature loss {name!r} is already registered ({FEATURE_LOSSES[name].definition})")
        learned = isinstance(definition, type)
        if learned and not issubclass(definition, nn.Module):
            raise TypeError(f"feature loss {name!r}: a class must be an nn.Module, got {definition}")
        if learned and not connector_at_equal_channels:
            raise TypeError(f"feature loss {name!r}: a module aligns channels itself (it has no connector)")
        if learned:
            params = _keyword_params(name, definition.__init__, skip=3)  # self, student_channels, teacher_channels
            inputs = _inputs(name, definition.forward, skip=3)  # self, student, teacher
        else:
            inputs = _inputs(name, definition, skip=2)
            params = _keyword_params(name, definition, skip=2, exclude=inputs)
        FEATURE_LOSSES[name] = FeatureLoss(name, definition, params, inputs, connector_at_equal_channels)
        return definition

    return register


def _signature(fn: Callable, skip: int) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())[skip:]


def _inputs(name: str, fn: Callable, skip: int) -> tuple[str, ...]:
    """The INPUTS a loss asks for; any other argument of the call must have a default (left to it)."""
    inputs = []
    for p in _signature(fn, skip):
        if p.name in INPUTS:
            inputs.append(p.name)
        elif p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(
                f"feature loss {name!r}: argument {p.name!r} is neither an input ({', '.join(INPUTS)}) "
                "nor has a default"
            )
    return tuple(inputs)


def _keyword_params(name: str, fn: Callable, skip: int, exclude: tuple[str, ...] = ()) -> dict[str, Param]:
    hints = typing.get_type_hints(fn)
    params = {}
    for p in _signature(fn, skip):
        if p.name in exclude:
            continue
        if p.default is inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"feature loss {name!r}: parameter {p.name!r} needs a default (recipes may omit it)")
        params[p.name] = Param(hints.get(p.name, Any), p.default)
    return params
