"""Distillation recipes: typed, loaded from YAML, validated with errors that name the file and the bad key.

A recipe says who teaches whom on what data (``teacher``, ``student``, ``data``), how long (``train``: any
Ultralytics training keys, passed through), and what is distilled (``distill``: feature, logit and box losses
with weights, class mapping and a weight schedule). ``detkd train RECIPE key=value ...`` overrides any of it.

Everything is checked when the recipe loads, before a model is built: unknown keys and wrong types, feature loss
names and their ``params`` (from :mod:`detkd.losses.registry`), negative or non-finite weights, and the training
keys (by Ultralytics' own check).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detkd.errors import DetkdError
from detkd.losses.registry import FEATURE_LOSSES
from detkd.utils import write_text

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # built-in recipes (package data); benchmarks/: profiles

# bounds of a number, as dataclass field metadata (checked by build_dataclass)
NON_NEGATIVE = {"minimum": 0.0}
POSITIVE = {"exclusive_minimum": 0.0}
AT_LEAST_ONE = {"minimum": 1}
PROBABILITY = {"exclusive_minimum": 0.0, "maximum": 1.0}
INIT_FROM_TEACHER = "teacher"  # init.source naming the recipe's teacher (in a chain, each stage's own)


@dataclass
class FeatureLossConfig:
    """One feature-imitation loss on the neck levels (P3, P4, P5 = 0, 1, 2), or with ``from: backbone`` on the
    backbone stages that feed the neck (the student's at strides 8, 16, 32 = 0, 1, 2; a ResNet teacher's C3-C5).
    Either way a student level pairs with the teacher's level of the same stride (see :mod:`detkd.distiller`)."""

    loss: str = "cwd"  # a registered feature loss (detkd.losses.registry)
    weight: float = field(default=1.0, metadata=NON_NEGATIVE)
    levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    # which features of both detectors: the neck's levels, or the backbone's stage outputs (YAML key ``from``)
    from_: Literal["neck", "backbone"] = field(default="neck", metadata={"key": "from"})
    connector: Literal["conv", "conv_bn", "mlp"] = "conv_bn"  # student -> teacher channels (not MGD/FGD: own align)
    params: dict[str, Any] = field(default_factory=dict)  # the loss's keyword parameters, e.g. {tau: 1.0} for CWD

    def validate(self, where: str, source: str) -> None:
        """The loss is registered and ``params`` are its parameters, of their types."""
        entry = FEATURE_LOSSES.get(self.loss)
        if entry is None:
            known = ", ".join(sorted(FEATURE_LOSSES))
            raise DetkdError(f"{source}: '{_join(where, 'loss')}' must be one of {known}, got {self.loss!r}")
        for key, value in self.params.items():
            at = _join(where, f"params.{key}")
            if key not in entry.params:
                known = ", ".join(entry.params) or "none"
                raise DetkdError(f"{source}: '{at}' is not a parameter of {self.loss} (parameters: {known})")
            self.params[key] = _coerce(entry.params[key].type, value, at, source)


@dataclass
class LogitLossConfig:
    """Soft-target distillation of the per-class sigmoid scores."""

    weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    temperature: float = field(default=1.0, metadata=POSITIVE)
    locations: Literal["all", "teacher", "positives"] = "teacher"
    qfl_beta: float | None = field(default=None, metadata=NON_NEGATIVE)
    gate: Literal["none", "teacher_better"] = "none"  # teacher_better: only where the teacher beats the student


@dataclass
class BoxLossConfig:
    """LD on DFL distributions when both heads have them (same reg_max); decoded-box GIoU + L1 otherwise."""

    weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    temperature: float = field(default=10.0, metadata=POSITIVE)  # LD temperature
    locations: Literal["all", "teacher", "positives"] = "teacher"
    l1_weight: float = field(default=1.0, metadata=NON_NEGATIVE)  # decoded-box L1 relative to GIoU (decoded-box mode)
    gate: Literal["none", "teacher_better"] = "none"  # teacher_better: only where the teacher beats the student


@dataclass
class SecondStageConfig:
    """Terms in which a two-stage teacher's second stage (its RoI head) judges the student's own decoded boxes.

    At the student's assigned positives plus its ``topk`` most confident anchors per image, the teacher's RoI head
    scores each student box (``cls``: its probabilities as soft targets of the student's class sigmoids; with
    ``iou_aware``, each times the box's IoU with the teacher's refinement of it for that class) and refines it
    (``box``: the refined box as GIoU + L1 target, weighted by the teacher's confidence). See
    :mod:`detkd.losses.second_stage`. A section of its own, not ``logit``/``box``: their keys (locations,
    temperature, LD, the teacher-better gate) pair dense anchors, which a two-stage teacher has only through its
    dense verdict (the RPN's best proposal in each student cell, judged), and a single-stage teacher refuses these
    terms in one line. Logged as ``kd_rcnn_cls`` and ``kd_rcnn_box``."""

    cls_weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    box_weight: float = field(default=0.0, metadata=NON_NEGATIVE)
    l1_weight: float = field(default=1.0, metadata=NON_NEGATIVE)  # image-normalised L1 relative to GIoU
    topk: int = field(default=50, metadata=NON_NEGATIVE)  # anchors per image by the student's max class score
    iou_aware: bool = False  # class targets p·IoU, the form of the student's own (TAL) class targets
    # judge the student's assigned positives too, where its labels already give class and box targets; false: the
    # teacher speaks only at the top-k anchors the labels call background
    positives: bool = True
    # the class term weighted per box by the teacher's confidence in it (its largest non-background probability),
    # as the box term is; false: a plain mean over the judged boxes. For a teacher judging every anchor (a large
    # topk), where boxes it calls background would otherwise outnumber and dilute the ones it recognises
    teacher_weighted: bool = False
    # how distill.logit and distill.box see this teacher (its dense verdict: each student cell's best RPN proposal,
    # judged). "cells": every cell's verdict as it is, which near an object says "object" in several times as many
    # cells as a TAL-trained YOLO head does; "aligned": only at the cells Ultralytics' task-aligned assigner gives
    # the verdict's own detections (after the RoI head's NMS), each object's best cell as it is and the others
    # scaled by their alignment relative to it, background elsewhere: the sparse form of a YOLO head's scores
    dense: Literal["cells", "aligned"] = "cells"

    @property
    def active(self) -> bool:
        return self.cls_weight > 0 or self.box_weight > 0


@dataclass
class ScheduleConfig:
    """Distillation weight over training: linear warm-up, optional decay, and a plain finish."""

    warmup_epochs: float = field(default=0.0, metadata=NON_NEGATIVE)
    decay: Literal["none", "linear", "cosine"] = "none"
    stop_last_epochs: int = field(default=0, metadata=NON_NEGATIVE)


@dataclass
class PseudoConfig:
    """The teacher's confident detections as boxes for the student's task loss: on unlabeled images
    (``unlabeled.pseudo``), and on labeled ones where no label covers them (``distill.pseudo``, see
    :mod:`detkd.engine.criterion`)."""

    conf: float = field(default=0.5, metadata=PROBABILITY)  # a teacher detection scoring this or more is a box
    # the pseudo-box task loss relative to the real one (distill.pseudo: times the change the missed boxes make)
    weight: float = field(default=1.0, metadata=NON_NEGATIVE)


@dataclass
class DistillConfig:
    feature: list[FeatureLossConfig] = field(default_factory=list)
    logit: LogitLossConfig = field(default_factory=LogitLossConfig)
    box: BoxLossConfig = field(default_factory=BoxLossConfig)
    second_stage: SecondStageConfig = field(default_factory=SecondStageConfig)  # two-stage teachers only
    class_map: dict[str, str] | None = None  # student class name -> teacher class name; default: by equal names
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # the teacher's confident detections that no label overlaps (IoU < 0.5) join the labeled images' task loss
    pseudo: PseudoConfig | None = None


@dataclass
class InitConfig:
    """Where the student's weights start: transferred from ``source`` (see :mod:`detkd.transfer`)."""

    # classification or detection checkpoint, or "teacher": the recipe's teacher (weight selection from a larger model
    # of the student's family)
    source: str | None = None
    kind: Literal["auto", "classifier", "detector", "larger"] = "auto"
    # transferred tensors stay fixed (BN statistics included) for this many epochs
    freeze_epochs: int = field(default=0, metadata=NON_NEGATIVE)
    # learning-rate multiplier for transferred tensors once they train
    lr_mult: float = field(default=1.0, metadata=NON_NEGATIVE)
    # when the source cannot give the student weights (a teacher that is not a YOLO of the student's family), or the
    # student is a checkpoint with weights of its own, train without the transfer (one line says why) instead of
    # refusing; the recommended recipe's setting, so that it serves any teacher (see detkd.engine.api)
    optional: bool = False


@dataclass
class UnlabeledConfig:
    """Images without labels, trained on beside the labeled ones (see :mod:`detkd.engine.trainer`).

    They get the distillation terms only (the teacher is all they have), and with ``pseudo`` also the task loss
    against the teacher's confident detections. ``source``: folders, globs, image or video files
    (:mod:`detkd.data.frames`, which also says how ``every``, ``dedupe`` and ``cache`` sample videos).
    """

    source: list[str] = field(default_factory=list)
    every: int = field(default=1, metadata=AT_LEAST_ONE)  # one video frame in this many
    dedupe: float = field(default=2.0, metadata=NON_NEGATIVE)  # near-duplicate threshold (gray levels); 0: keep all
    cache: str | None = None  # where video frames are extracted (default: <video>.frames/ beside each video)
    ratio: float = field(default=1.0, metadata=POSITIVE)  # unlabeled images per labeled image in a batch
    pseudo: PseudoConfig | None = None

    def validate(self, where: str, source: str) -> None:
        if not self.source:
            raise DetkdError(f"{source}: '{_join(where, 'source')}' is empty (give a folder, a glob or video files)")


@dataclass
class Recipe:
    # a local checkpoint of a detector family detkd adapts, or torchvision:ARCH with teacher_weights
    # (detkd.adapters.create_teacher)
    teacher: str | None = None
    teacher_weights: str | None = None  # torchvision:ARCH's state dict file (or a weights name in torch hub's cache)
    student: str = "yolov8n.yaml"  # model config (from scratch) or checkpoint
    data: str | None = None  # YOLO data yaml
    train: dict[str, Any] = field(default_factory=dict)  # Ultralytics training keys, passed through
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # teacher assistants, largest first (yolov8m.yaml ...): each is distilled from the one before it (the first from
    # the teacher) with this recipe, and the student from the last
    chain: list[str] = field(default_factory=list)
    # load checkpoints that reference more than Ultralytics checkpoints hold (they can run code), see detkd.safe_load
    trust_checkpoints: bool = False
    unlabeled: UnlabeledConfig | None = None  # images without labels, distilled on beside the labeled ones

    def validate(self, where: str, source: str) -> None:
        """A chain's assistants are YOLO models, which have no second stage to teach the stages after the first;
        a plain finish must leave epochs to distil; terms that read labels need them on unlabeled images too: only
        pseudo-boxes can give them."""
        if self.chain and (self.distill.second_stage.active or self.distill.second_stage.dense != "cells"):
            raise DetkdError(
                f"{source}: 'distill.second_stage' needs a two-stage teacher, but the 'chain' assistants "
                f"({', '.join(self.chain)}) are YOLO models, which teach every stage after the first: distil the "
                "first assistant from the two-stage teacher in a run of its own, then chain from its best.pt with "
                "distill.logit/box"
            )
        epochs, stop = self.train.get("epochs"), self.distill.schedule.stop_last_epochs
        if self.distills and stop and isinstance(epochs, int) and stop >= epochs:
            raise DetkdError(
                f"{source}: 'distill.schedule.stop_last_epochs' ({stop}) leaves none of the {epochs} epochs distilled: "
                f"lower it (e.g. distill.schedule.stop_last_epochs={epochs // 2})"
            )
        if self.unlabeled is None or self.unlabeled.pseudo is not None:
            return
        for name, c in (("logit", self.distill.logit), ("box", self.distill.box)):
            if c.weight > 0 and (c.locations == "positives" or c.gate != "none"):
                setting = "locations: positives" if c.locations == "positives" else f"gate: {c.gate}"
                raise DetkdError(
                    f"{source}: 'distill.{name}' with {setting} reads labels, which unlabeled images lack: "
                    "set 'unlabeled.pseudo' (the teacher's confident detections become their labels) or use "
                    "locations teacher/all without a gate"
                )

    @property
    def init_checkpoint(self) -> str | None:
        """The checkpoint the student's weights start from: ``init.source``, the teacher's for ``teacher``."""
        return self.teacher if self.init.source == INIT_FROM_TEACHER else self.init.source

    @property
    def distills(self) -> bool:
        d = self.distill
        active = d.logit.weight > 0 or d.box.weight > 0 or d.second_stage.active or d.pseudo is not None
        return bool(d.feature) or active

    def to_dict(self) -> dict:
        """The recipe as plain data; keys added later (``trust_checkpoints``, ``unlabeled``, ``teacher_weights``,
        ``init.optional``, ``distill.second_stage``, ``distill.pseudo``, a feature term's ``from``) only when they
        differ from their defaults, so that recipes saved before they existed (benchmark runs and their cache keys,
        ``distill.yaml``) still compare equal. An ``init`` without a source is written as the default one: its other
        keys have nothing to act on."""
        out = _plain(self)
        for feature in out["distill"]["feature"]:
            if feature["from"] == "neck":
                del feature["from"]
        if self.distill.pseudo is None:
            del out["distill"]["pseudo"]
        if not self.trust_checkpoints:
            del out["trust_checkpoints"]
        if self.unlabeled is None:
            del out["unlabeled"]
        if self.teacher_weights is None:
            del out["teacher_weights"]
        if self.init.source is None:  # no source, no transfer: `init.source: null` turns a recipe file's off
            out["init"] = _plain(InitConfig())
        if not out["init"]["optional"]:
            del out["init"]["optional"]
        if self.distill.second_stage == SecondStageConfig():
            del out["distill"]["second_stage"]
        return out


def build_dataclass(cls, value, where: str, source: str):
    """Build dataclass ``cls`` from a mapping, checking every key, type and bound; ``where`` is the dotted key path.

    A dataclass with a ``validate(where, source)`` method checks itself after that (what a type cannot say).
    """
    hints = typing.get_type_hints(cls)
    if not isinstance(value, dict):
        raise DetkdError(f"{source}: '{where}' must be a mapping, got {type(value).__name__}")
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            expected = ", ".join(sorted(fields))
            raise DetkdError(f"{source}: unknown key '{_join(where, key)}' (expected one of: {expected})")
    kwargs = {}
    for key, raw in value.items():
        name = fields[key].name
        kwargs[name] = _coerce(hints[name], raw, _join(where, key), source)
        _check_bounds(fields[key].metadata, kwargs[name], _join(where, key), source)
    built = cls(**kwargs)
    if hasattr(built, "validate"):
        built.validate(where, source)
    return built


def _key(f: dataclasses.Field) -> str:
    """A field's key in recipe files: its name, or the ``key`` of its metadata where the word is Python's
    (``from``)."""
    return f.metadata.get("key", f.name)


def _plain(value):
    """:func:`dataclasses.asdict`, with each field under its recipe key (:func:`_key`)."""
    if dataclasses.is_dataclass(value):
        return {_key(f): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _check_bounds(bounds: typing.Mapping, value, where: str, source: str) -> None:
    if value is None:
        return
    if "minimum" in bounds and value < bounds["minimum"]:
        raise DetkdError(f"{source}: '{where}' must be >= {bounds['minimum']:g}, got {value!r}")
    if "exclusive_minimum" in bounds and value <= bounds["exclusive_minimum"]:
        raise DetkdError(f"{source}: '{where}' must be > {bounds['exclusive_minimum']:g}, got {value!r}")
    if "maximum" in bounds and value > bounds["maximum"]:
        raise DetkdError(f"{source}: '{where}' must be <= {bounds['maximum']:g}, got {value!r}")


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
        if (dataclasses.is_dataclass(args[0]) and isinstance(value, dict)) or (
            args[0] is str and isinstance(value, str)
        ):
            value = [value]  # a single loss (or text) may be written without the list
        if not isinstance(value, list):
            raise DetkdError(f"{source}: '{where}' must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DetkdError(f"{source}: '{where}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DetkdError(f"{source}: '{where}' must be a finite number, got {value!r}")
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


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, mapping into mapping at every depth; anything else (lists included) is replaced."""
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


RECIPE_KEYS = frozenset(f.name for f in dataclasses.fields(Recipe))


def builtin_names(folder: Path = CONFIGS_DIR) -> list[str]:
    """The names of the built-in configs in ``folder`` (``recommended``, ...), sorted."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def config_file(name_or_path: str | os.PathLike, folder: Path = CONFIGS_DIR, kind: str = "recipe") -> Path:
    """The file meant by a path, or by the name of a built-in config (``recommended`` → ``folder/recommended.yaml``).

    An existing file, or a text with a suffix or a slash, is a path; any other text is a built-in name. Either way a
    missing file is a one-line error that lists the built-in names.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    builtin = f"(built-in {kind}s: {', '.join(builtin_names(folder))})"
    if path.suffix or "/" in text or os.sep in text:
        raise DetkdError(f"{path}: {kind} not found {builtin}")
    path = folder / f"{text}.yaml"
    if not path.is_file():
        raise DetkdError(f"{text}: neither a {kind} file nor a built-in {kind} {builtin}")
    return path


def recipe_overrides(overrides: list[str] | dict | None) -> dict[str, Any]:
    """Overrides as recipe keys: ``key=value`` strings parsed, and every key that is not a recipe key (``epochs``,
    ``device`` ...) moved under ``train``, as an Ultralytics training key."""
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    ultralytics_keys = {k: extra.pop(k) for k in [k for k in extra if k not in RECIPE_KEYS]}
    return merge(extra, {"train": ultralytics_keys}) if ultralytics_keys else extra


def load_recipe(recipe: Recipe | str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """A recipe (a file, a :class:`Recipe`, or the defaults for ``None``) with ``overrides`` applied, checked.

    One rule for every source: overrides merge deeply (``distill={"logit": {"weight": 2}}`` changes that weight
    and keeps the rest of ``distill``); lists, such as ``distill.feature``, are replaced whole. Overrides name
    recipe keys (``teacher=t.pt``, ``distill.logit.weight=2``); any other top-level key is an Ultralytics training
    key (``epochs=3`` → ``train.epochs``).
    """
    if isinstance(recipe, Recipe):
        source, raw = "recipe", recipe.to_dict()
    elif recipe:
        path = config_file(recipe)
        source, raw = str(path), _read_recipe_file(path)
    else:
        source, raw = "recipe", {}
    loaded = build_dataclass(Recipe, merge(raw, recipe_overrides(overrides)), "", source)
    check_training_keys(loaded.train, source, "train.")
    return loaded


def _read_recipe_file(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DetkdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise DetkdError(f"{path}: a recipe must be a mapping of keys")
    return raw


# training keys that the recipe sets in its own words
_SET_BY_THE_RECIPE = {"data": "the recipe's 'data'", "model": "the recipe's 'student'", "resume": "resume=RUN_DIR"}


def check_training_keys(keys: dict[str, Any], source: str, prefix: str = "") -> None:
    """Ultralytics training keys, checked as Ultralytics checks them when training starts (names, with its
    suggestions for a misspelt one; types and ranges), so that a typo ends in one line before any model is built.

    Ultralytics' check logs its whole command-line help before raising; that is held back here (the line says it).
    """
    reserved = next((k for k in keys if k in _SET_BY_THE_RECIPE), None)
    if reserved:
        raise DetkdError(f"{source}: '{prefix}{reserved}' is set by {_SET_BY_THE_RECIPE[reserved]}")
    from detkd.ultralytics_internals import quiet_ultralytics

    with quiet_ultralytics():  # deprecation warnings still show
        from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg

        try:
            get_cfg(DEFAULT_CFG_DICT, dict(keys))
        except (SyntaxError, TypeError, ValueError) as e:
            raise DetkdError(f"{source}: {' '.join(str(e).split())}") from None


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    return write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
