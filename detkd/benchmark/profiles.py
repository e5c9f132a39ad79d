"""Benchmark profiles: what a benchmark compares, at which budget, over which seeds; loaded and checked.

A profile (built-in ones in ``detkd/configs/benchmarks/``, found by name: ``quick``, ``cpu``, ``gpu``, ...) declares
the data (built-in synthetic scenes or a YOLO data yaml), the teacher (trained once and cached, or a checkpoint),
the student, the budget (epochs, image size, batch) and the methods: ``alone`` (the baseline), ``builtin``
(Ultralytics' ``distill_model=``/``dis=``) and ``detkd`` (a recipe and/or ``distill:``/``init:`` overrides). Every
method gets the same data, augmentation and budget; only the seeds may differ per method (more seeds where the
comparison matters most).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detkd.config import CONFIGS_DIR, Recipe, build_dataclass, config_file, load_recipe
from detkd.errors import DetkdError

PROFILES_DIR = CONFIGS_DIR / "benchmarks"
TEACHER_PLACEHOLDER = "teacher"  # ``init: {source: teacher}`` transfers from the benchmark's teacher
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # method names become folder names
_SET_BY_THE_BENCHMARK = {
    "data",
    "epochs",
    "imgsz",
    "batch",
    "workers",
    "device",
    "seed",
    "project",
    "name",
    "exist_ok",
    "distill_model",
    "dis",
    "resume",
}  # Ultralytics keys that budget.train may not set


@dataclass
class SyntheticData:
    """Built-in synthetic scenes (:func:`detkd.data.synth.generate_synthetic`), generated once per output folder."""

    train: int = 1000
    val: int = 200
    imgsz: int = 160
    seed: int = 0


@dataclass
class DataSpec:
    synthetic: SyntheticData | None = None  # the default when ``yaml`` is not given
    yaml: str | None = None  # any YOLO data yaml (relative to the profile's folder); evaluated on its val split


@dataclass
class TeacherSpec:
    # trained by the benchmark for ``epochs`` at the budget's image size and batch: an Ultralytics model config, or
    # torchvision:ARCH, a torchvision two-stage detector trained from scratch by detkd.teacher_train
    model: str = "yolov8s.yaml"
    epochs: int = 30
    checkpoint: str | None = None  # use this checkpoint instead of training one
    # Its own training data (default: the students'). A teacher that has seen more data than its student stays
    # clearly better than the student can become, as a fine-tuned pretrained teacher does; synthetic scenes are a
    # pure function of (seed, split, index), so a larger set with the same seed holds the students' scenes.
    data: DataSpec | None = None


@dataclass
class Budget:
    """What every method gets alike."""

    epochs: int = 30
    imgsz: int = 160
    batch: int = 16
    workers: int = 2
    device: Any = None  # Ultralytics' device (None: its choice)
    train: dict[str, Any] = field(default_factory=dict)  # more Ultralytics training keys, for every method


@dataclass
class Method:
    name: str = ""
    kind: Literal["alone", "builtin", "detkd"] = "detkd"
    dis: float | None = None  # builtin: Ultralytics' distillation weight (default 6.0)
    recipe: str | None = None  # detkd: recipe file (relative to the profile's folder) or built-in name; default: none
    distill: dict[str, Any] | None = None  # detkd: overrides of the recipe's distill section
    init: dict[str, Any] | None = None  # detkd: overrides of the recipe's init section (source: teacher allowed)
    seeds: list[int] | None = None  # default: the profile's seeds


@dataclass
class Profile:
    name: str = ""  # default: the file's stem
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: str = "yolov8n.yaml"
    budget: Budget = field(default_factory=Budget)
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[Method] = field(default_factory=list)
    # Runs side by side (after the teacher): on a GPU machine whose CPU cores, not the GPU, bound small runs
    # (augmentation); each run gets an equal share of the cores. 1 on small CPUs, where runs would only fight.
    parallel: int = 1

    @property
    def baseline(self) -> str | None:
        """The student alone: what gains, the teacher gap and time ratios are measured against."""
        return next((m.name for m in self.methods if m.kind == "alone"), None)


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load and check a profile (a path, or a built-in name: ``cpu``); relative paths in it are resolved against its
    folder, a recipe may also be a built-in name. Errors name file and key."""
    path = config_file(name_or_path, PROFILES_DIR, "benchmark profile")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DetkdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    profile = build_dataclass(Profile, raw, "", str(path))
    profile.name = profile.name or path.stem
    _resolve_paths(profile, path.parent)
    _check_profile(profile, str(path))
    return profile


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None or value == TEACHER_PLACEHOLDER or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _resolve_recipe(base: Path, value: str | None) -> str | None:
    """A recipe file relative to the profile's folder (``../recommended.yaml``), else a built-in name is kept as it
    is for :func:`~detkd.config.load_recipe` (``recipe: recommended``)."""
    if value is None or Path(value).suffix or "/" in value or os.sep in value or (base / value).is_file():
        return _resolve(base, value)
    return value


def _resolve_paths(profile: Profile, base: Path) -> None:
    for data in (profile.data, profile.teacher.data):
        if data is not None:
            data.yaml = _resolve(base, data.yaml)
    profile.teacher.checkpoint = _resolve(base, profile.teacher.checkpoint)
    for m in profile.methods:
        m.recipe = _resolve_recipe(base, m.recipe)
        if m.init and m.init.get("source"):
            m.init["source"] = _resolve(base, m.init["source"])


def _check_data(data: DataSpec, source: str, key: str) -> None:
    if data.yaml and data.synthetic:
        raise DetkdError(f"{source}: '{key}' has both 'synthetic' and 'yaml' (choose one)")
    if data.yaml is None:
        data.synthetic = data.synthetic or SyntheticData()
    elif not Path(data.yaml).is_file():
        raise DetkdError(f"{source}: '{key}.yaml' file not found: {data.yaml}")


def _check_profile(profile: Profile, source: str) -> None:
    teacher = profile.teacher
    _check_data(profile.data, source, "data")
    if teacher.data is not None:
        _check_data(teacher.data, source, "teacher.data")
    if teacher.checkpoint and not Path(teacher.checkpoint).is_file():
        raise DetkdError(f"{source}: 'teacher.checkpoint' file not found: {teacher.checkpoint}")
    from detkd.adapters import torchvision  # torch and torchvision: only for a profile that loads

    if teacher.model.startswith(torchvision.NAME_PREFIX):
        try:
            torchvision.check_architecture(teacher.model.removeprefix(torchvision.NAME_PREFIX))
        except DetkdError as e:
            raise DetkdError(f"{source}: 'teacher.model' {e}") from None
    if reserved := sorted(set(profile.budget.train) & _SET_BY_THE_BENCHMARK):
        raise DetkdError(f"{source}: 'budget.train.{reserved[0]}' is set by the benchmark (use budget/teacher keys)")
    if not profile.seeds:
        raise DetkdError(f"{source}: 'seeds' is empty")
    if not profile.methods:
        raise DetkdError(f"{source}: 'methods' is empty")
    names = [m.name for m in profile.methods]
    for i, m in enumerate(profile.methods):
        if not _NAME.match(m.name):
            raise DetkdError(f"{source}: 'methods[{i}].name' must be letters, digits, _ - . or +, got {m.name!r}")
        if m.name in names[:i]:
            raise DetkdError(f"{source}: 'methods[{i}].name' {m.name!r} is already used by an earlier method")
        _check_method(m, f"{source}: 'methods[{i}]' ({m.name})")
    if sum(m.kind == "alone" for m in profile.methods) > 1:
        raise DetkdError(f"{source}: 'methods' has more than one of kind 'alone' (the one baseline)")


def _check_method(m: Method, where: str) -> None:
    if m.seeds is not None and not m.seeds:
        raise DetkdError(f"{where}: 'seeds' is empty")
    if m.dis is not None and m.kind != "builtin":
        raise DetkdError(f"{where}: 'dis' is for kind 'builtin' only")
    extra = [k for k in ("recipe", "distill", "init") if getattr(m, k) is not None]
    if extra and m.kind != "detkd":
        raise DetkdError(f"{where}: '{extra[0]}' is for kind 'detkd' only")
    if m.kind == "detkd":
        try:
            recipe = method_recipe(m, teacher="teacher.pt", student="yolov8n.yaml", data="data.yaml")
        except DetkdError as e:
            raise DetkdError(f"{where}: {e}") from e
        if not recipe.distills and not recipe.init.source:
            raise DetkdError(f"{where}: the recipe neither distills nor transfers (set 'distill' or 'init.source')")


def method_recipe(method: Method, teacher: str, student: str, data: str) -> Recipe:
    """The detkd recipe of a method, with the benchmark's teacher, student and data; its own ``train`` keys are
    dropped so that the budget is the profile's alone."""
    overrides = {k: v for k in ("distill", "init") if (v := getattr(method, k)) is not None}
    recipe = load_recipe(method.recipe, overrides)
    if recipe.init.source == TEACHER_PLACEHOLDER:
        recipe.init.source = teacher
    recipe.teacher = teacher if recipe.distills else None
    recipe.student, recipe.data, recipe.train = student, data, {}
    return recipe
