"""Distillation recipes: typed, loaded from YAML, validated with errors that name the file and the bad key.

A recipe says who teaches whom on what data (``teacher``, ``student``, ``data``), how long (``train``: any
Ultralytics training keys, passed through), and what is distilled (``distill``: feature, logit and box losses
with weights, class mapping and a weight schedule). ``detkd train RECIPE key=value ...`` overrides any of it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detkd.errors import DetkdError

FEATURE_LOSSES = ("fitnet", "cwd", "pkd", "mgd", "fgd", "sl2")
CONNECTORS = ("conv", "conv_bn", "mlp")
LOCATIONS = ("all", "teacher", "positives")


@dataclass
class FeatureLossConfig:
    """One feature-imitation loss on the neck levels (P3, P4, P5 = 0, 1, 2)."""

    loss: Literal["fitnet", "cwd", "pkd", "mgd", "fgd", "sl2"] = "cwd"
    weight: float = 1.0
    levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    connector: Literal["conv", "conv_bn", "mlp"] = "conv_bn"  # student -> teacher channels (not MGD/FGD: own align)
    params: dict[str, Any] = field(default_factory=dict)  # loss-specific, e.g. {tau: 1.0} for CWD


@dataclass
class LogitLossConfig:
    """Soft-target distillation of the per-class sigmoid scores."""

    weight: float = 0.0
    temperature: float = 1.0
    locations: Literal["all", "teacher", "positives"] = "teacher"
    qfl_beta: float | None = None


@dataclass
class BoxLossConfig:
    """LD on DFL distributions when both heads have them (same reg_max); decoded-box GIoU + L1 otherwise."""

    weight: float = 0.0
    temperature: float = 10.0  # LD temperature
    locations: Literal["all", "teacher", "positives"] = "teacher"
    l1_weight: float = 1.0  # decoded-box L1 relative to GIoU (decoded-box mode only)


@dataclass
class ScheduleConfig:
    """Distillation weight over training: linear warm-up, optional decay, and a plain finish."""

    warmup_epochs: float = 0.0
    decay: Literal["none", "linear", "cosine"] = "none"
    stop_last_epochs: int = 0


@dataclass
class DistillConfig:
    feature: list[FeatureLossConfig] = field(default_factory=list)
    logit: LogitLossConfig = field(default_factory=LogitLossConfig)
    box: BoxLossConfig = field(default_factory=BoxLossConfig)
    class_map: dict[str, str] | None = None  # student class name -> teacher class name; default: by equal names
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class InitConfig:
    """Where the student's weights start: transferred from ``source`` (see :mod:`detkd.transfer`)."""

    source: str | None = None  # classification or detection checkpoint
    kind: Literal["auto", "classifier", "detector", "larger"] = "auto"
    freeze_epochs: int = 0  # transferred tensors stay fixed (BN statistics included) for this many epochs
    lr_mult: float = 1.0  # learning-rate multiplier for transferred tensors once they train


@dataclass
class Recipe:
    teacher: str | None = None  # local Ultralytics checkpoint
    student: str = "yolov8n.yaml"  # model config (from scratch) or checkpoint
    data: str | None = None  # YOLO data yaml
    train: dict[str, Any] = field(default_factory=dict)  # Ultralytics training keys, passed through
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # load checkpoints that reference more than Ultralytics checkpoints hold (they can run code), see detkd.safe_load
    trust_checkpoints: bool = False

    @property
    def distills(self) -> bool:
        d = self.distill
        return bool(d.feature) or d.logit.weight > 0 or d.box.weight > 0

    def to_dict(self) -> dict:
        """The recipe as plain data; ``trust_checkpoints`` only when set, so that recipes saved before the key
        existed (benchmark runs, ``distill.yaml``) still compare equal."""
        out = dataclasses.asdict(self)
        if not self.trust_checkpoints:
            del out["trust_checkpoints"]
        return out


def build_dataclass(cls, value, where: str, source: str):
    """Build dataclass ``cls`` from a mapping, checking every key and type; ``where`` is the dotted key path."""
    hints = typing.get_type_hints(cls)
    if not isinstance(value, dict):
        raise DetkdError(f"{source}: '{where}' must be a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in names:
            expected = ", ".join(sorted(names))
            raise DetkdError(f"{source}: unknown key '{_join(where, key)}' (expected one of: {expected})")
    return cls(**{k: _coerce(hints[k], v, _join(where, k), source) for k, v in value.items()})


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(hint, value, where: str, source: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, source)
    if origin is Literal:
        if value not in args:
            raise DetkdError(f"{source}: '{where}' must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if dataclasses.is_dataclass(args[0]) and isinstance(value, dict):
            value = [value]  # a single loss may be written without the list
        if not isinstance(value, list):
            raise DetkdError(f"{source}: '{where}' must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DetkdError(f"{source}: '{where}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is Any or isinstance(value, hint):
        return value
    raise DetkdError(f"{source}: '{where}' must be {hint.__name__}, got {value!r}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a nested dict; values parsed as YAML (``epochs=3`` is an int)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise DetkdError(f"command line: expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


_TOP_LEVEL = {f.name for f in dataclasses.fields(Recipe)}


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Load a recipe file (or the defaults) and apply overrides.

    Overrides name recipe keys (``teacher=t.pt``, ``distill.logit.weight=2``); any other top-level key is an
    Ultralytics training key (``epochs=3`` → ``train.epochs``).
    """
    source = str(path) if path else "recipe"
    raw: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise DetkdError(f"{path}: recipe not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise DetkdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(raw, dict):
            raise DetkdError(f"{path}: a recipe must be a mapping of keys")
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key in [k for k in extra if k not in _TOP_LEVEL]:
        extra.setdefault("train", {})[key] = extra.pop(key)
    return build_dataclass(Recipe, _merge(raw, extra), "", source)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path
