"""A student's initial weights from another model, with a report of where every tensor came from.

Three kinds of source, each with its own explicit mapping rule (:func:`transfer_weights`):

``classifier``
    An Ultralytics classification model of the student's family (``yolov8n-cls`` for ``yolov8n``): its backbone
    (every layer before ``Classify``) is the detection backbone, so ``model.{i}.*`` maps to ``model.{i}.*``, copied,
    or weight-selected from a larger scale. The ``Classify`` head and everything after the backbone are not mapped.
``detector``
    A detection model of the same architecture trained on other classes or another domain: every tensor whose name
    and shape match, box branch (``cv2``, ``one2one_cv2``) and DFL included. The class-prediction convs (the last
    conv of ``cv3`` / ``one2one_cv3``, ``nc`` outputs) are re-initialised unless both predict the same class names;
    the hidden class-branch layers are copied when they fit, re-initialised when their width, which ``Detect`` sizes
    from ``nc`` (:func:`~detkd.ultralytics_internals.class_branch_width`), changed with it.
``larger``
    A larger model of the same family (``yolov8s`` or ``yolov8m`` for ``yolov8n``): weight selection as in Xu et al.,
    "Initializing Models with Larger Ones", ICLR 2024 (https://arxiv.org/abs/2311.18823), see :func:`select_weight`;
    the class-prediction convs follow the ``detector`` rule.

Nothing that does not fit is copied: a tensor is ``copied`` (same name and shape), ``selected`` (weight selection),
``reinitialized`` (it has a counterpart that must not be used: a class head for other classes) or ``skipped`` (no
usable counterpart, with the reason). Both the last two keep the student's own initialisation.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from detkd import ultralytics_internals as internals
from detkd.adapters.ultralytics import load_ultralytics_model
from detkd.errors import DetkdError
from detkd.utils import atomic_write, save_json

KINDS = ("auto", "classifier", "detector", "larger")
ACTIONS = ("copied", "selected", "reinitialized", "skipped")
NOT_IN_BACKBONE = "not in the classification backbone"


@dataclass
class TensorRow:
    """What happened to one tensor of the student's state dict."""

    name: str
    action: str  # one of ACTIONS
    reason: str
    shape: tuple[int, ...]
    numel: int
    parameter: bool  # an nn.Parameter (else a buffer: BN statistics, counters)
    source_shape: tuple[int, ...] | None = None  # the source tensor of the same name, where there is one


@dataclass
class UnusedRow:
    """A source tensor that initialised nothing."""

    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class TransferReport:
    """Every student tensor's origin, and the source tensors left unused.

    Counts are over the student's state dict (parameters and buffers); :attr:`fraction_from_source` is over its
    parameters only (``named_parameters()``, DFL's fixed projection included), since buffers are not learnt.
    """

    kind: str
    source: str
    student: str
    rows: list[TensorRow]
    unused: list[UnusedRow] = field(default_factory=list)

    def names(self, action: str) -> list[str]:
        """The student tensors (parameters and buffers) that had ``action``."""
        return [r.name for r in self.rows if r.action == action]

    @property
    def counts(self) -> dict[str, int]:
        """Tensors per action; they add up to the number of tensors in the student's state dict."""
        counts = Counter(r.action for r in self.rows)
        return {a: counts[a] for a in ACTIONS}

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Parameter elements per action."""
        return {a: sum(r.numel for r in self.rows if r.parameter and r.action == a) for a in ACTIONS}

    @property
    def fraction_from_source(self) -> float:
        """Share of the student's parameter elements that were copied or selected from the source."""
        per_action = self.parameter_counts
        total = sum(per_action.values())
        return (per_action["copied"] + per_action["selected"]) / total if total else 0.0

    @property
    def transferred(self) -> set[str]:
        """Parameter names copied or selected: the layers a recipe may freeze as "transferred"."""
        return {r.name for r in self.rows if r.parameter and r.action in ("copied", "selected")}

    def format(self, examples: int = 3, max_reasons: int = 8) -> str:
        """A table of actions, then each reason for reinitialising, skipping or leaving unused, with examples."""
        counts, params = self.counts, self.parameter_counts
        total = sum(params.values()) or 1
        lines = [
            f"transfer ({self.kind}): {self.source} -> {self.student}",
            f"  {'action':<15}{'tensors':>8}{'parameters':>13}{'share':>8}",
        ]
        for action in ACTIONS:
            lines.append(f"  {action:<15}{counts[action]:>8}{params[action]:>13,}{params[action] / total:>8.1%}")
        lines.append(f"  {'total':<15}{len(self.rows):>8}{sum(params.values()):>13,}{1:>8.0%}")
        student = {r.name for r in self.rows}
        groups = [(f"{r.action}: {r.reason}", r.name) for r in self.rows if r.action in ("reinitialized", "skipped")]
        groups += [(f"source only, unused: {r.reason}", r.name) for r in self.unused if r.name not in student]
        by_reason: dict[str, list[str]] = {}
        for reason, name in groups:
            by_reason.setdefault(reason, []).append(name)
        for reason, names in list(by_reason.items())[:max_reasons]:
            modules = list(dict.fromkeys(re.sub(r"\.(conv|bn)$", "", n.rsplit(".", 1)[0]) for n in names))
            more = ", ..." if len(modules) > examples else ""
            lines.append(f"  {reason}: {len(names)} tensors ({', '.join(modules[:examples])}{more})")
        if len(by_reason) > max_reasons:
            lines.append(f"  ... {len(by_reason) - max_reasons} more reasons: see the JSON report")
        lines.append(
            f"  {self.fraction_from_source:.1%} of the student's parameters come from the source "
            "(buffers such as BN statistics are listed, not counted)"
        )
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The whole report as plain JSON types."""
        return {
            "kind": self.kind,
            "source": self.source,
            "student": self.student,
            "counts": self.counts,
            "parameters": {**self.parameter_counts, "total": sum(self.parameter_counts.values())},
            "fraction_from_source": self.fraction_from_source,
            "transferred": sorted(self.transferred),
            "tensors": [asdict(r) for r in self.rows],
            "unused_source_tensors": [asdict(r) for r in self.unused],
        }


def report_path(checkpoint: str | os.PathLike) -> Path:
    """Where :func:`transfer` writes the report of ``checkpoint``: beside it, ``<stem>.transfer.json``."""
    return Path(checkpoint).with_suffix(".transfer.json")


# weight selection


def even_indices(n_source: int, n_student: int) -> torch.Tensor:
    """``n_student`` evenly spaced indices into ``n_source``: Xu et al.'s uniform element selection.

    When ``n_student`` divides ``n_source`` it is the exact stride ``arange(n_student) * (n_source // n_student)``:
    the step-r selection of a concatenation of equally scaled channel groups is then the concatenation of each
    group's step-r selection, so a layer reads exactly the channels its producer kept. Otherwise it is
    ``linspace(0, n_source - 1, n_student)`` rounded, and that consistency between layers is only approximate.
    """
    if n_source % n_student == 0:
        return torch.arange(n_student) * (n_source // n_student)
    return torch.linspace(0, n_source - 1, n_student).round().long()


@dataclass(frozen=True)
class _Layout:
    """A channel dimension made of repeated groups of segments, which selection must not mix.

    C2f's ``cv2`` reads ``2 + n`` concatenated blocks of ``c`` channels: a shallower student takes the source's first
    blocks (``first``), as Xu et al. take the first layers of a deeper stage. Attention's ``qkv`` writes per head the
    segments ``q, k, v``: the student's heads are evenly chosen source heads, each segment selected on its own.
    """

    groups: tuple[tuple[int, ...], ...]
    first: bool

    def indices(self, student: _Layout) -> torch.Tensor | None:
        """The source indices of the student's channels; None when the student has more groups or larger ones."""
        if len(student.groups) > len(self.groups):
            return None
        pick = (
            torch.arange(len(student.groups)) if student.first else even_indices(len(self.groups), len(student.groups))
        )
        starts = torch.tensor([0, *(sum(g) for g in self.groups)]).cumsum(0).tolist()
        parts = []
        for group, j in zip(student.groups, pick.tolist()):
            offset = starts[j]
            for n_student, n_source in zip(group, self.groups[j]):
                if n_student > n_source:
                    return None
                parts.append(offset + even_indices(n_source, n_student))
                offset += n_source
        return torch.cat(parts)


def _channel_layout(modules: dict[str, nn.Module], conv: str, side: str) -> _Layout | None:
    """The group structure of the ``side`` ("in"/"out") channels of the Ultralytics ``Conv`` at path ``conv``."""
    parent_path, _, child = conv.rpartition(".")
    parent = modules.get(parent_path)
    groups = internals.channel_groups(parent, child, side) if parent is not None else None
    return _Layout(*groups) if groups else None


def _tensor_layout(modules: dict[str, nn.Module], name: str, dim: int) -> _Layout | None:
    """The layout of dimension ``dim`` of tensor ``name``: a Conv's weight (out, in) and its BN's vectors (out)."""
    path = name.rpartition(".")[0]
    conv, _, part = path.rpartition(".")
    side = {("conv", 0): "out", ("conv", 1): "in", ("bn", 0): "out"}.get((part, dim))
    return _channel_layout(modules, conv, side) if side else None


def select_weight(
    source: torch.Tensor,
    shape: torch.Size,
    name: str = "",
    source_modules: dict[str, nn.Module] | None = None,
    student_modules: dict[str, nn.Module] | None = None,
) -> tuple[torch.Tensor | None, str]:
    """Weight selection (Xu et al., ICLR 2024): the evenly spaced sub-tensor of ``source`` with the student's shape.

    Each dimension the student has fewer of is reduced with :func:`even_indices`; kernel dimensions must match.
    Where the modules are given, dimensions with a group layout (C2f block concatenations, attention heads) are
    selected group by group (:class:`_Layout`), so that a shallower student's C2f reads the blocks it has.

    Normalisation layers follow the paper's (and its code's) rule for every component: a BN's weight, bias,
    running mean and running variance are selected with the indices of the channels they normalise, so each kept
    channel keeps its own statistics. No rescaling: every YOLO conv is followed by BN, which renormalises the
    reduced fan-in in training. Returns ``(tensor, "")`` or ``(None, why it cannot be selected)``.
    """
    if source.dim() != len(shape) or source.shape[2:] != shape[2:]:
        return None, "shape differs (kernel or rank)"
    value = source
    for dim, (n_source, n_student) in enumerate(zip(source.shape, shape)):
        layouts = [_tensor_layout(m, name, dim) if m else None for m in (source_modules, student_modules)]
        if None not in layouts:
            index = layouts[0].indices(layouts[1])
            if index is None:
                return None, "channel groups (blocks or heads) do not fit in the source's"
        elif n_source == n_student:
            continue
        elif n_source < n_student:
            return None, "smaller in the source"
        else:
            index = even_indices(n_source, n_student)
        value = value.index_select(dim, index.to(value.device))
    return value, ""


# mapping rules


def _label(model: nn.Module) -> str:
    """How messages name a model: its checkpoint path, else its config file, else its class."""
    return internals.model_source(model) or type(model).__name__


def _layers(model: nn.Module) -> nn.Module:
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not len(layers):
        raise DetkdError(f"{_label(model)}: not an Ultralytics YOLO model (no layer sequence)")
    return layers


def _types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in _layers(model)]


def _first_difference(a: list[str], b: list[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _family_error(source: nn.Module, student: nn.Module, at: int) -> DetkdError:
    src, dst = _types(source), _types(student)
    what = [t[at] if at < len(t) else "the end" for t in (src, dst)]
    show = [" ".join(t[: at + 1]) + (" ..." if len(t) > at + 1 else "") for t in (src, dst)]
    return DetkdError(
        f"{_label(source)}: not the student's model family: layer {at} is {what[0]}, not {what[1]} "
        f"({show[0]} vs {show[1]} in {_label(student)})"
    )


def _head_signature(head: nn.Module) -> str:
    end2end = ", end-to-end" if internals.is_end_to_end(head) else ""
    return f"{type(head).__name__}(reg_max={head.reg_max}{end2end})"


def _check_family(source: nn.Module, student: nn.Module, classifier: bool) -> int:
    """Compare layer types position by position; return how many leading layers map ``model.{i}`` to ``model.{i}``.

    A classifier's backbone must match the student's first layers, except that its last layer may differ: the YOLO11
    and YOLO26 classifiers end in C2PSA where their detectors put SPPF first; that layer is then left unused.
    """
    src, dst = _types(source), _types(student)
    if classifier:
        backbone = len(src) - 1
        common = _first_difference(src[:backbone], dst)
        if common < backbone - 1:
            raise _family_error(source, student, common)
        return common
    if src != dst:
        raise _family_error(source, student, _first_difference(src, dst))
    src_head, dst_head = _head_signature(_layers(source)[-1]), _head_signature(_layers(student)[-1])
    if src_head != dst_head:
        raise DetkdError(f"{_label(source)}: incompatible detection head: {src_head} vs the student's {dst_head}")
    return len(dst)


class _Plan:
    """The state dicts and module maps of source and student, and the rules that decide each student tensor."""

    def __init__(self, source: nn.Module, student: nn.Module):
        from ultralytics.nn.modules.head import Classify, Detect

        self.source, self.student = source, student
        self.src_sd, self.dst_sd = source.state_dict(), student.state_dict()
        self.src_modules, self.dst_modules = dict(source.named_modules()), dict(student.named_modules())
        self.parameters = {n for n, _ in student.named_parameters()}
        self.is_classifier = isinstance(_layers(source)[-1], Classify)
        head = _layers(student)[-1]
        if not isinstance(head, Detect):
            raise DetkdError(
                f"{_label(student)}: the student must be a detection model (its last layer is {type(head).__name__})"
            )
        if getattr(source, "is_fused", lambda: False)():
            raise DetkdError(f"{_label(source)}: fused for inference (no BatchNorm); give the training checkpoint")
        self.mapped = _check_family(source, student, self.is_classifier)
        h = len(_layers(student)) - 1
        branches = [(f"model.{h}.{path}.", seq) for path, seq in internals.class_branches(head)]
        self.class_branch = tuple(prefix for prefix, _ in branches)
        self.class_convs = tuple(f"{prefix}{len(seq) - 1}." for prefix, seq in branches)

    # class head

    def class_reason(self) -> str | None:
        """Why the class-prediction convs cannot come from the source; None when it predicts the same classes."""
        src_names, dst_names = dict(self.source.names), dict(self.student.names)
        if len(src_names) != len(dst_names):
            return f"class head (nc {len(src_names)} -> {len(dst_names)})"
        return None if src_names == dst_names else "class head (other class names)"

    def branch_width_reason(self) -> str | None:
        """Why the hidden class-branch layers cannot be copied: Detect sizes them from ``nc``."""
        src_c3, dst_c3 = (internals.class_branch_width(_layers(m)[-1]) for m in (self.source, self.student))
        return None if src_c3 == dst_c3 else f"class branch width follows nc (c3 {src_c3} -> {dst_c3})"

    def in_class_branch(self, name: str) -> bool:
        return name.startswith(self.class_branch)

    # kinds

    def resolve_kind(self, kind: str) -> str:
        """The kind to apply: ``kind`` when the source can be one, or for ``auto`` what the source is."""
        allowed = ("auto", "classifier") if self.is_classifier else ("auto", "detector", "larger")
        if kind not in allowed:
            what = "a classification" if self.is_classifier else "a detection"
            raise DetkdError(f"{_label(self.source)}: {what} model cannot be a '{kind}' source")
        if self.is_classifier:
            return "classifier"
        return kind if kind != "auto" else self.detection_kind()

    def detection_kind(self) -> str:
        """``detector`` when every tensor outside the class branch has the student's shape, ``larger`` when every
        one is at least as large (a wider or deeper model of the family)."""
        body = [n for n in self.dst_sd if not self.in_class_branch(n)]
        src_body = [n for n in self.src_sd if not self.in_class_branch(n)]
        if set(body) == set(src_body) and all(self.src_sd[n].shape == self.dst_sd[n].shape for n in body):
            return "detector"
        for n in body:
            src, dst = self.src_sd.get(n), self.dst_sd[n]
            if src is not None and (src.dim() != dst.dim() or any(a < b for a, b in zip(src.shape, dst.shape))):
                raise DetkdError(
                    f"{_label(self.source)}: neither the student's architecture nor a larger model of its family: "
                    f"{n} is {tuple(src.shape)} in the source, {tuple(dst.shape)} in the student"
                )
        return "larger"

    # rules

    def decide(self, name: str, kind: str) -> tuple[str, str, torch.Tensor | None]:
        """``(action, reason, value)`` for student tensor ``name``; value is what to write (copied or selected)."""
        layer = int(name.split(".")[1])
        if layer >= self.mapped:
            return "skipped", NOT_IN_BACKBONE, None
        if name.startswith(self.class_convs) and (reason := self.class_reason()):
            return "reinitialized", reason, None
        if kind == "detector" and self.in_class_branch(name) and (reason := self.branch_width_reason()):
            return "reinitialized", reason, None
        return self.match(name, select=kind != "detector")

    def match(self, name: str, select: bool) -> tuple[str, str, torch.Tensor | None]:
        """The general rule: same name, same module types, then same shape (copy) or larger shape (select)."""
        src, dst = self.src_sd.get(name), self.dst_sd[name]
        if src is None:
            return "skipped", "not in the source", None
        if differs := self.module_difference(name):
            return "skipped", differs, None
        if src.shape == dst.shape:
            return "copied", "same name and shape", src
        if not select:
            return "skipped", "shape differs", None
        value, why = select_weight(src, dst.shape, name, self.src_modules, self.dst_modules)
        return ("selected", "weight selection", value) if value is not None else ("skipped", why, None)

    def module_difference(self, name: str) -> str | None:
        """A module on the tensor's path that has another type in the source (a C3k where the student has a
        Bottleneck): its tensors may share names and even shapes by accident, never meaning."""
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            path = ".".join(parts[:i])
            a, b = self.src_modules.get(path), self.dst_modules.get(path)
            if a is not None and b is not None and type(a) is not type(b):
                return f"{path} is {type(a).__name__} in the source, {type(b).__name__} in the student"
        return None

    def unused(self, rows: list[TensorRow]) -> list[UnusedRow]:
        """Source tensors that initialised nothing, with the student row's reason or the source's own."""
        used = {r.name for r in rows if r.action in ("copied", "selected")}
        by_name = {r.name: r.reason for r in rows}
        head = len(_layers(self.source)) - 1
        out = []
        for name, tensor in self.src_sd.items():
            if name in used:
                continue
            layer = int(name.split(".")[1])
            if self.is_classifier and layer == head:
                reason = "classification head"
            elif self.is_classifier and layer >= self.mapped:
                reason = (
                    f"layer {layer} is {_types(self.source)[layer]} here, {_types(self.student)[layer]} in the student"
                )
            else:
                reason = by_name.get(name, "not in the student")
            out.append(UnusedRow(name, tuple(tensor.shape), reason))
        return out


def transfer_weights(source: nn.Module, student: nn.Module, kind: str = "auto") -> TransferReport:
    """Initialise ``student`` (in place) from ``source`` by the rules of ``kind``; report every tensor.

    ``source`` is an Ultralytics ``ClassificationModel`` or ``DetectionModel``, ``student`` a ``DetectionModel``;
    ``kind`` is ``auto`` (what the source is), ``classifier``, ``detector`` or ``larger`` (see the module doc).
    The student keeps its own values wherever the report says reinitialized or skipped; class names are compared
    through ``model.names`` to decide whether the class-prediction convs may be taken.
    """
    if kind not in KINDS:
        raise DetkdError(f"{_label(source)}: unknown transfer kind '{kind}' (one of {', '.join(KINDS)})")
    internals.ultralytics_offline()
    plan = _Plan(source, student)
    kind = plan.resolve_kind(kind)
    rows = []
    with torch.no_grad():
        for name, tensor in plan.dst_sd.items():
            action, reason, value = plan.decide(name, kind)
            if value is not None:
                tensor.copy_(value.to(tensor.dtype))
            src = plan.src_sd.get(name)
            rows.append(
                TensorRow(
                    name,
                    action,
                    reason,
                    tuple(tensor.shape),
                    tensor.numel(),
                    name in plan.parameters,
                    tuple(src.shape) if src is not None else None,
                )
            )
    return TransferReport(kind, _label(source), _label(student), rows, plan.unused(rows))


def transfer_problem(source: str | os.PathLike, student: str | os.PathLike, kind: str = "auto") -> str | None:
    """Why ``student`` (a config or checkpoint) cannot start from the checkpoint ``source`` by ``kind``, or None
    when it can: :func:`transfer_weights` tried on a scratch copy of the student, so that a run learns it before
    training, by the very rules training will apply."""
    from ultralytics.nn.modules.head import Classify

    try:
        with internals.quiet_ultralytics():  # a check: the models it builds are not the run's, their summaries noise
            model = load_model(source)
            # a classifier names no detection classes; their count does not decide what transfers (its head never does)
            names = {0: "object"} if isinstance(_layers(model)[-1], Classify) else None
            transfer_weights(model, _build_student(student, names, model, seed=0), kind)
    except DetkdError as e:
        return " ".join(str(e).split())  # one line, whatever a wrapped exception's text held
    return None


# files


def load_model(path: str | os.PathLike, role: str = "source") -> nn.Module:
    """An Ultralytics checkpoint's model whose layers detkd can map (see :func:`_layers`)."""
    model = load_ultralytics_model(path, role=role)
    _layers(model)
    return model


def _read_names(names, data: str | os.PathLike | None) -> dict[int, str] | None:
    if names is not None:
        return (
            dict(enumerate(names)) if isinstance(names, (list, tuple)) else {int(k): str(v) for k, v in names.items()}
        )
    if data is not None:
        from detkd.data.yolo import read_data_yaml

        return read_data_yaml(data).names
    return None


def _build_student(student: str | os.PathLike, names: dict[int, str] | None, source: nn.Module, seed: int) -> nn.Module:
    """The student: built from its config, or a checkpoint's model (kept when its classes are the ones asked for,
    else rebuilt from its config for the new classes). Class names: ``names``, else the student checkpoint's, else a
    detection source's."""
    from ultralytics.nn.modules.head import Classify
    from ultralytics.nn.tasks import DetectionModel

    is_config = Path(student).suffix in {".yaml", ".yml"}
    model = None if is_config else load_model(student, role="student")
    names = names or (dict(model.names) if model is not None else None)
    if names is None and isinstance(_layers(source)[-1], Classify):
        raise DetkdError(f"{_label(source)}: a classifier does not name the detection classes: give the data (--data)")
    names = names or dict(source.names)
    if model is not None and dict(model.names) == names:
        return model
    cfg = student if is_config else model.yaml
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = DetectionModel(deepcopy(cfg) if isinstance(cfg, dict) else str(cfg), nc=len(names), verbose=False)
        except (FileNotFoundError, KeyError, ValueError, TypeError) as e:  # TypeError: a config Ultralytics refuses
            raise DetkdError(f"{student}: cannot build a model from this config ({type(e).__name__}: {e})") from e
    model.names = names
    return model


def _save_checkpoint(model: nn.Module, out: Path, report: TransferReport, data: str | os.PathLike | None) -> Path:
    """An Ultralytics checkpoint as the trainer writes one, plus detkd's provenance."""
    summary = {k: v for k, v in report.to_json().items() if k not in ("tensors", "unused_source_tensors")}
    train_args = {"task": "detect", **({"data": str(data)} if data else {})}
    ckpt = internals.checkpoint_dict(model, train_args, detkd_transfer=summary)
    return atomic_write(out, lambda tmp: torch.save(ckpt, tmp))


def transfer(
    source: str | os.PathLike,
    student: str | os.PathLike,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    kind: str = "auto",
    names: list[str] | dict[int, str] | None = None,
    seed: int = 0,
) -> TransferReport:
    """Write ``out``: a detection checkpoint of ``student`` initialised from the checkpoint ``source``.

    ``student`` is a model config (``yolov8n.yaml``) or a detection checkpoint. The student's classes come from
    ``names``, else ``data`` (a YOLO data yaml), else the student checkpoint, else a detection source. ``out`` loads
    with ``ultralytics.YOLO(out)`` and trains with detkd or ``YOLO(out).train(data=...)``; the report is returned and
    saved beside it (:func:`report_path`). ``seed`` fixes the student's own initialisation.
    """
    source_model = load_model(source, role="source")
    student_model = _build_student(student, _read_names(names, data), source_model, seed)
    report = transfer_weights(source_model, student_model, kind)
    report.source, report.student = str(source), str(student)
    _save_checkpoint(student_model, Path(out), report, data)
    save_json(report.to_json(), report_path(out))
    return report
