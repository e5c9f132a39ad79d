"""Benchmark profiles: what a benchmark compares, at which budget, over which seeds; loaded and checked.

A profile (built-in ones in ``detkd/configs/benchmarks/``, found by name: ``quick``, ``cpu``, ``gpu``, ...) declares
the data (built-in synthetic scenes or a YOLO data yaml), the teacher (trained once and cached, or a checkpoint),
the student, the budget (epochs, image size, batch) and the methods: ``alone`` (the baseline), ``builtin``
(Ultralytics' ``distill_model=``/``dis=``) and ``detkd`` (a recipe and/or ``distill:``/``init:``/``unlabeled:``
overrides). Every method gets the same data, augmentation and budget; only the seeds may differ per method (more
seeds where the comparison matters most), and a method that trains on more images than the others may say its own
``epochs`` (and ``train`` keys such as ``close_mosaic``) so that it gets the same number of optimizer iterations.

With ``data.labeled`` only that fraction of the training images keeps its labels (the rest, and optional synthetic
``footage``, are the unlabeled images), and a method says what it trains on (``data``): the labeled part (the
default), ``all`` training images fully labeled (the ceiling), or ``labeled+pseudo`` (the labeled part and the
unlabeled images labeled by the teacher); a detkd recipe reaches the unlabeled images as ``unlabeled: {source:
unlabeled}``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detkd.backbone_pretrain import resnet_of
from detkd.config import (
    AT_LEAST_ONE,
    CONFIGS_DIR,
    INIT_FROM_TEACHER,
    POSITIVE,
    PROBABILITY,
    PseudoConfig,
    Recipe,
    build_dataclass,
    config_file,
    load_recipe,
)
from detkd.errors import DetkdError

PROFILES_DIR = CONFIGS_DIR / "benchmarks"
# ``init: {source: teacher}`` transfers from the benchmark's teacher: resolved here, since a method that only
# transfers has no teacher in its recipe
TEACHER_PLACEHOLDER = INIT_FROM_TEACHER
CROPS_BACKBONE = "crops"  # ``teacher: {backbone: crops}``: a ResNet the benchmark pretrains on object crops
UNLABELED_PLACEHOLDER = "unlabeled"  # ``unlabeled: {source: unlabeled}``: the benchmark's unlabeled images
PSEUDO_CONF = PseudoConfig().conf  # a teacher detection scoring this or more is a pseudo-label (as in recipes)
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
class Footage:
    """Synthetic traffic footage (:func:`detkd.data.footage.write_footage`, ``detkd synth --video``) at the scenes'
    size and seed: more unlabeled frames, from a static camera."""

    frames: int = field(default=300, metadata=AT_LEAST_ONE)
    fps: float = field(default=15.0, metadata=POSITIVE)


@dataclass
class DataSpec:
    synthetic: SyntheticData | None = None  # the default when ``yaml`` is not given
    yaml: str | None = None  # any YOLO data yaml (relative to the profile's folder); evaluated on its val split
    # The fraction of the training images (the first, by path: synthetic scenes 0, 1, ...) that keeps its labels;
    # the others become unlabeled images, in a folder without labels (see detkd.benchmark.jobs)
    labeled: float | None = field(default=None, metadata=PROBABILITY)
    footage: Footage | None = None  # more unlabeled images (synthetic data with ``labeled`` only)


@dataclass
class TeacherSpec:
    # trained by the benchmark for ``epochs`` at the budget's image size and batch: an Ultralytics model config, or
    # torchvision:ARCH, a torchvision two-stage detector trained by detkd.teacher_train (from scratch, or ``backbone``)
    model: str = "yolov8s.yaml"
    epochs: int = 30
    batch: int | None = field(default=None, metadata=AT_LEAST_ONE)  # default: the budget's
    checkpoint: str | None = None  # use this checkpoint instead of training one
    # Its own training data (default: the students'). A teacher that has seen more data than its student stays
    # clearly better than the student can become, as a fine-tuned pretrained teacher does; synthetic scenes are a
    # pure function of (seed, split, index), so a larger set with the same seed holds the students' scenes.
    data: DataSpec | None = None
    # torchvision:ARCH with a ResNet backbone: start it from these classifier weights (``detkd teacher train
    # --backbone-weights``), or from a classifier the benchmark first trains on synthetic object crops (``crops``:
    # detkd.backbone_pretrain, the ImageNet stand-in where none can be had)
    backbone: str | None = None


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
    unlabeled: dict[str, Any] | None = None  # detkd: overrides of the recipe's unlabeled section (source: unlabeled)
    chain: list[str] | None = None  # detkd: teacher assistants between the teacher and the student (a recipe's chain)
    # What it trains on: the profile's labeled training images; with ``data.labeled`` also ``all`` of them, fully
    # labeled, or ``labeled+pseudo``: the labeled ones and the unlabeled ones labeled by the teacher at pseudo_conf
    data: Literal["labeled", "all", "labeled+pseudo"] = "labeled"
    pseudo_conf: float | None = field(default=None, metadata=PROBABILITY)  # default: PSEUDO_CONF
    seeds: list[int] | None = None  # default: the profile's seeds
    # The budget's, unless said: a method on more images (``all``, ``labeled+pseudo``) matches the others' optimizer
    # iterations with fewer epochs, and their warm-up and mosaic-free iterations with a smaller ``warmup_epochs`` and
    # ``close_mosaic`` in ``train``
    epochs: int | None = field(default=None, metadata=AT_LEAST_ONE)
    train: dict[str, Any] | None = None  # more Ultralytics training keys for this method, over ``budget.train``

    @property
    def pseudo_threshold(self) -> float:
        """The teacher score from which its detections label the unlabeled images (``data: labeled+pseudo``)."""
        return PSEUDO_CONF if self.pseudo_conf is None else self.pseudo_conf


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
        """The student alone on the labeled images: what gains, the teacher gap and time ratios are measured
        against."""
        return next((m.name for m in self.methods if m.kind == "alone" and m.data == "labeled"), None)

    @property
    def ceiling(self) -> str | None:
        """The student alone on every training image fully labeled, in a profile that hides some labels: what a
        method's recovery of the hidden labels' worth is measured against."""
        return next((m.name for m in self.methods if m.kind == "alone" and m.data == "all"), None)


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
    if profile.teacher.backbone != CROPS_BACKBONE:
        profile.teacher.backbone = _resolve(base, profile.teacher.backbone)
    for m in profile.methods:
        m.recipe = _resolve_recipe(base, m.recipe)
        if m.init and m.init.get("source"):
            m.init["source"] = _resolve(base, m.init["source"])
        if m.unlabeled and isinstance(source := m.unlabeled.get("source"), (str, list)):
            sources = [source] if isinstance(source, str) else source
            m.unlabeled["source"] = [s if s == UNLABELED_PLACEHOLDER else _resolve(base, str(s)) for s in sources]


def _check_data(data: DataSpec, source: str, key: str) -> None:
    if data.yaml and data.synthetic:
        raise DetkdError(f"{source}: '{key}' has both 'synthetic' and 'yaml' (choose one)")
    if data.labeled == 1:
        raise DetkdError(f"{source}: '{key}.labeled' is 1: no training image would be left unlabeled")
    if data.footage and (data.yaml or data.labeled is None):
        raise DetkdError(
            f"{source}: '{key}.footage' is unlabeled synthetic footage: it needs synthetic data with '{key}.labeled'"
        )
    if data.yaml is None:
        data.synthetic = data.synthetic or SyntheticData()
    elif not Path(data.yaml).is_file():
        raise DetkdError(f"{source}: '{key}.yaml' file not found: {data.yaml}")


def _check_profile(profile: Profile, source: str) -> None:
    teacher = profile.teacher
    _check_data(profile.data, source, "data")
    if teacher.data is not None:
        _check_data(teacher.data, source, "teacher.data")
        if teacher.data.labeled is not None or teacher.data.footage is not None:
            raise DetkdError(
                f"{source}: 'teacher.data' trains the teacher on labeled images only (no 'labeled' or 'footage' there)"
            )
    if teacher.checkpoint and not Path(teacher.checkpoint).is_file():
        raise DetkdError(f"{source}: 'teacher.checkpoint' file not found: {teacher.checkpoint}")
    from detkd.adapters import torchvision  # torch and torchvision: only for a profile that loads

    if teacher.model.startswith(torchvision.NAME_PREFIX):
        try:
            torchvision.check_architecture(teacher.model.removeprefix(torchvision.NAME_PREFIX))
        except DetkdError as e:
            raise DetkdError(f"{source}: 'teacher.model' {e}") from None
    if teacher.backbone and not teacher.model.startswith(torchvision.NAME_PREFIX):
        raise DetkdError(f"{source}: 'teacher.backbone' is for a torchvision:ARCH teacher")
    if teacher.backbone == CROPS_BACKBONE and not teacher.checkpoint:
        try:
            resnet_of(teacher.model.removeprefix(torchvision.NAME_PREFIX))
        except DetkdError as e:
            raise DetkdError(f"{source}: 'teacher.backbone: {CROPS_BACKBONE}': {e}") from None
    elif teacher.backbone and not teacher.checkpoint and not Path(teacher.backbone).is_file():
        raise DetkdError(
            f"{source}: 'teacher.backbone' file not found: {teacher.backbone} (make one with detkd teacher backbone "
            f"--out FILE, or say '{CROPS_BACKBONE}' for the benchmark to make it)"
        )
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
        _check_method(m, f"{source}: 'methods[{i}]' ({m.name})", labeled=profile.data.labeled is not None)
    if sum(m.kind == "alone" and m.data == "labeled" for m in profile.methods) > 1:
        raise DetkdError(f"{source}: 'methods' has more than one of kind 'alone' on data 'labeled' (the one baseline)")
    if sum(m.kind == "alone" and m.data == "all" for m in profile.methods) > 1:
        raise DetkdError(f"{source}: 'methods' has more than one of kind 'alone' on data 'all' (the one ceiling)")


def _check_method(m: Method, where: str, labeled: bool) -> None:
    if m.seeds is not None and not m.seeds:
        raise DetkdError(f"{where}: 'seeds' is empty")
    if reserved := sorted(set(m.train or {}) & _SET_BY_THE_BENCHMARK):
        raise DetkdError(f"{where}: 'train.{reserved[0]}' is set by the benchmark (use the method's or budget keys)")
    if m.dis is not None and m.kind != "builtin":
        raise DetkdError(f"{where}: 'dis' is for kind 'builtin' only")
    extra = [k for k in ("recipe", "distill", "init", "unlabeled", "chain") if getattr(m, k) is not None]
    if extra and m.kind != "detkd":
        raise DetkdError(f"{where}: '{extra[0]}' is for kind 'detkd' only")
    if m.data != "labeled" and not labeled:
        raise DetkdError(f"{where}: 'data: {m.data}' needs the profile's 'data.labeled' (the unlabeled part)")
    if m.pseudo_conf is not None and m.data != "labeled+pseudo":
        raise DetkdError(f"{where}: 'pseudo_conf' is for 'data: labeled+pseudo' only")
    if m.kind == "detkd":
        try:
            recipe = method_recipe(m, teacher="teacher.pt", student="yolov8n.yaml", data="data.yaml")
        except DetkdError as e:
            raise DetkdError(f"{where}: {e}") from e
        if not recipe.distills and not recipe.init.source:
            raise DetkdError(f"{where}: the recipe neither distills nor transfers (set 'distill' or 'init.source')")
        wants_unlabeled = recipe.unlabeled is not None and UNLABELED_PLACEHOLDER in recipe.unlabeled.source
        if wants_unlabeled and not (labeled and m.data == "labeled"):
            raise DetkdError(
                f"{where}: 'unlabeled.source: {UNLABELED_PLACEHOLDER}' is the benchmark's unlabeled images: it needs "
                "the profile's 'data.labeled' and the method's 'data: labeled'"
            )


def method_recipe(method: Method, teacher: str, student: str, data: str, unlabeled: list[str] | None = None) -> Recipe:
    """The detkd recipe of a method, with the benchmark's teacher, student, data and unlabeled images (in place of
    ``unlabeled: {source: unlabeled}``); its own ``train`` keys are dropped so that the budget is the profile's
    alone."""
    overrides = {k: v for k in ("distill", "init", "unlabeled", "chain") if (v := getattr(method, k)) is not None}
    recipe = load_recipe(method.recipe, overrides)
    if recipe.init.source == TEACHER_PLACEHOLDER:
        recipe.init.source = teacher
    if recipe.unlabeled and unlabeled:
        given = recipe.unlabeled.source
        recipe.unlabeled.source = [s for g in given for s in (unlabeled if g == UNLABELED_PLACEHOLDER else [g])]
    recipe.teacher = teacher if recipe.distills else None
    recipe.student, recipe.data, recipe.train = student, data, {}
    return recipe


def describe_method(method: Method, student: str) -> str:
    """What a method trains, in words, for the report: a method's name alone does not say it (``recommended`` in a
    profile is the recipe's distillation terms; the shipped recipe also starts from the teacher's weights), nor
    where its budget differs from the profile's."""
    own = [f"{method.epochs} epochs"] if method.epochs is not None else []
    own += [f"{k}={v}" for k, v in (method.train or {}).items()]
    return _what_it_trains(method, student) + (f" ({', '.join(own)})" if own else "")


def _what_it_trains(method: Method, student: str) -> str:
    if method.kind == "alone":
        return "the student alone" + {
            "all": ", on every training image, fully labeled",
            "labeled+pseudo": f", on the labeled images and the teacher's detections (≥ {method.pseudo_threshold:g}) "
            "on the unlabeled ones",
        }.get(method.data, "")
    if method.kind == "builtin":
        return f"Ultralytics' built-in distillation (distill_model=, dis={6.0 if method.dis is None else method.dis:g})"
    r = method_recipe(method, TEACHER_PLACEHOLDER, student, "data.yaml", unlabeled=[UNLABELED_PLACEHOLDER])
    d = r.distill
    terms = [f"{f.loss} ×{f.weight:g}" + (" (backbone)" if f.from_ == "backbone" else "") for f in d.feature]
    terms += [f"soft class targets ×{d.logit.weight:g}"] if d.logit.weight > 0 else []
    terms += [f"box distillation ×{d.box.weight:g}"] if d.box.weight > 0 else []
    second = [(w, what) for w, what in ((d.second_stage.cls_weight, "class"), (d.second_stage.box_weight, "box")) if w]
    terms += [f"second-stage {what} ×{w:g}" for w, what in second]  # the teacher's RoI head on the student's boxes
    if second:
        c = d.second_stage
        where = f"top {c.topk} + positives" if c.positives else f"top {c.topk}, positives left out"
        how = [", IoU-aware class targets"] if c.iou_aware else []
        how += [", class term weighted by the teacher's confidence"] if c.teacher_weighted else []
        terms[-1] += f" ({where}{''.join(how)})"
    if d.second_stage.dense == "aligned" and (d.logit.weight > 0 or d.box.weight > 0):
        terms[-1] += " (on the teacher's dense verdict kept at the cells TAL gives its detections)"
    terms += [f"the teacher's missed boxes (≥ {d.pseudo.conf:g})"] if d.pseudo is not None else []
    text = " + ".join(terms) or "no distillation"
    gates = {c.gate for c in (d.logit, d.box) if c.gate != "none"}
    text += f", gate {', '.join(sorted(gates))}" if gates else ""
    text += f", {d.schedule.decay} decay" if d.schedule.decay != "none" else ""
    text += f", off for the last {d.schedule.stop_last_epochs} epochs" if d.schedule.stop_last_epochs else ""
    if r.init.source == TEACHER_PLACEHOLDER:
        text += "; starts from the teacher's weights (weight selection)"
    elif r.init.source:  # the run folder names a checkpoint better than its file name (best.pt)
        text += f"; starts from {'/'.join(Path(r.init.source).parts[-3:])} ({r.init.kind})"
    text += f"; through {' → '.join(Path(c).stem for c in r.chain)}" if r.chain else ""
    if r.unlabeled is not None:
        text += f"; with unlabeled images ({r.unlabeled.ratio:g} per labeled one"
        pseudo = r.unlabeled.pseudo
        text += f"; boxes: the teacher's detections ≥ {pseudo.conf:g})" if pseudo is not None else ")"
    return text
