"""Benchmark profiles: every distillation method against the student alone, at one budget, over seeds.

A profile (``configs/benchmarks/{quick,cpu,gpu}.yaml``) declares the data (built-in synthetic scenes or a YOLO data
yaml), the teacher (trained once and cached, or a checkpoint), the student, the budget (epochs, image size, batch)
and the methods: ``alone`` (the baseline), ``builtin`` (Ultralytics' ``distill_model=``/``dis=``) and ``detkd`` (a
recipe and/or ``distill:``/``init:`` overrides). Every method gets the same data, augmentation and budget; only
the seeds may differ per method (more seeds where the comparison matters most).

Each (method, seed) trains in its own process (``python -m detkd.benchmark run-one JOB.json``), so a crash costs
one run and peak memory is that run's own. A finished run leaves ``run.json`` beside its Ultralytics files and is
skipped next time, so a cut benchmark resumes where it stopped. After every run the report is rewritten:
``results.json``, ``results.md`` and the plots ``map_vs_epoch.png`` and ``gains.png``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from detkd.config import Recipe, build_dataclass, load_recipe
from detkd.errors import DetkdError
from detkd.evaluation import COCO_METRICS, save_json
from detkd.safe_load import TRUST_HELP, trust_checkpoints

PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs" / "benchmarks"
TABLE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
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

# --- profiles ------------------------------------------------------------------------------------------------


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
    model: str = "yolov8s.yaml"  # trained by the benchmark for ``epochs`` at the budget's image size and batch
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
    recipe: str | None = None  # detkd: recipe file (relative to the profile's folder); default: no distillation
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

    @property
    def baseline(self) -> str | None:
        """The student alone: what gains, the teacher gap and time ratios are measured against."""
        return next((m.name for m in self.methods if m.kind == "alone"), None)


def profile_path(name_or_path: str | os.PathLike) -> Path:
    """``quick`` names ``configs/benchmarks/quick.yaml``; anything with a suffix or a slash is a path."""
    text = str(name_or_path)
    if Path(text).suffix or os.sep in text or "/" in text:
        return Path(text)
    return PROFILES_DIR / f"{text}.yaml"


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load and check a profile; relative paths in it are resolved against its folder. Errors name file and key."""
    path = profile_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise DetkdError(f"{path}: benchmark profile not found (built-in profiles: {known})")
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


def _resolve_paths(profile: Profile, base: Path) -> None:
    for data in (profile.data, profile.teacher.data):
        if data is not None:
            data.yaml = _resolve(base, data.yaml)
    profile.teacher.checkpoint = _resolve(base, profile.teacher.checkpoint)
    for m in profile.methods:
        m.recipe = _resolve(base, m.recipe)
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


# --- jobs: one training (or evaluation) in its own process ---------------------------------------------------


@dataclass
class Job:
    """One run; ``run.json`` in ``run_dir`` marks it done, and is trusted only while the job is unchanged."""

    method: str
    seed: int
    run_dir: str
    model: str  # the config to train, or (``train`` None) the checkpoint to evaluate
    train: dict[str, Any] | None  # Ultralytics training keys
    recipe: dict[str, Any] | None  # detkd recipe: trains through detkd.engine.distill
    eval_data: str  # COCO json or YOLO data yaml
    eval_imgsz: int

    @property
    def checkpoint(self) -> Path:
        return Path(self.run_dir) / "weights" / "best.pt" if self.train is not None else Path(self.model)

    def finished(self) -> dict | None:
        """The run record if this job completed with exactly these settings."""
        record_file = Path(self.run_dir) / "run.json"
        if not record_file.is_file():
            return None
        record = json.loads(record_file.read_text())
        return record if record.get("job") == json.loads(json.dumps(asdict(self))) else None


@dataclass
class Bench:
    """A profile bound to an output folder: its data, its teacher, and the job of any (method, seed)."""

    profile: Profile
    out: Path
    data_yaml: Path
    eval_data: Path  # the COCO val json of synthetic data, else the data yaml (its val split)
    teacher: Job

    @classmethod
    def prepare(cls, profile: Profile, out: str | os.PathLike) -> Bench:
        """Generate the synthetic data if needed (once per output folder) and plan the teacher."""
        out = Path(out).resolve()
        data_yaml, eval_data = _prepare_data(profile.data, out)
        teacher_data = data_yaml if profile.teacher.data is None else _prepare_data(profile.teacher.data, out)[0]
        return cls(profile, out, data_yaml, eval_data, _teacher_job(profile, out, teacher_data, eval_data))

    def job(self, method: Method, seed: int) -> Job:
        """The run of ``method`` at ``seed``: the same training keys for every method, plus what the method adds."""
        p = self.profile
        run_dir = self.out / "runs" / f"{method.name}_s{seed}"
        train = _train_args(p, self.data_yaml, seed, run_dir, p.budget.epochs)
        recipe = None
        if method.kind == "builtin":
            train.update(distill_model=str(self.teacher.checkpoint), dis=6.0 if method.dis is None else method.dis)
        elif method.kind == "detkd":
            recipe = method_recipe(method, str(self.teacher.checkpoint), p.student, str(self.data_yaml)).to_dict()
        return Job(method.name, seed, str(run_dir), p.student, train, recipe, str(self.eval_data), p.budget.imgsz)

    def finished_runs(self) -> list[dict]:
        """Every finished run of the profile's methods, any seed, whose settings match the profile's."""
        runs = []
        for m in self.profile.methods:
            for record_file in sorted((self.out / "runs").glob(f"{m.name}_s*/run.json")):
                seed = json.loads(record_file.read_text()).get("seed")
                if isinstance(seed, int) and (record := self.job(m, seed).finished()) is not None:
                    runs.append(record)
        return runs


def _prepare_data(spec: DataSpec, out: Path) -> tuple[Path, Path]:
    """The data yaml to train on and what to evaluate on: the COCO val json of synthetic scenes (generated once
    per output folder), else the data yaml (its val split)."""
    s = spec.synthetic
    if s is None:
        return Path(spec.yaml), Path(spec.yaml)
    root = out / "data" / f"synth_{s.train}_{s.val}_{s.imgsz}px_s{s.seed}"
    if not (root / "data.yaml").is_file():  # written last: its presence means a complete set
        from detkd.data.synth import SynthConfig, generate_synthetic

        _log(f"generating {s.train} + {s.val} synthetic scenes at {s.imgsz} px in {root}")
        generate_synthetic(root, s.train, s.val, seed=s.seed, cfg=SynthConfig(imgsz=s.imgsz))
    return root / "data.yaml", root / "annotations" / "instances_val.json"


def _train_args(profile: Profile, data_yaml: Path, seed: int, run_dir: Path, epochs: int) -> dict[str, Any]:
    b = profile.budget
    args = {
        **b.train,
        "data": str(data_yaml),
        "epochs": epochs,
        "imgsz": b.imgsz,
        "batch": b.batch,
        "workers": b.workers,
        "seed": seed,
        "project": str(run_dir.parent),
        "name": run_dir.name,
        "exist_ok": True,
        "plots": False,
    }
    return args if b.device is None else {**args, "device": b.device}


def _teacher_job(profile: Profile, out: Path, data_yaml: Path, eval_data: Path) -> Job:
    """Train the teacher on ``data_yaml`` (cached under ``out/teacher``, keyed by data, model, epochs and budget),
    or only evaluate a given checkpoint; either is evaluated on the students' ``eval_data``."""
    t, b, seed = profile.teacher, profile.budget, profile.seeds[0]
    if t.checkpoint:
        ckpt = Path(t.checkpoint)
        run_dir = out / "teacher" / f"{ckpt.stem}_{_digest(str(ckpt.resolve()), ckpt.stat().st_mtime)}"
        return Job("teacher", seed, str(run_dir), str(ckpt), None, None, str(eval_data), b.imgsz)
    key = _digest(str(data_yaml), t.model, t.epochs, b.imgsz, b.batch, seed, b.train)
    run_dir = out / "teacher" / f"{Path(t.model).stem}_e{t.epochs}_{key}"
    train = _train_args(profile, data_yaml, seed, run_dir, t.epochs)
    return Job("teacher", seed, str(run_dir), t.model, train, None, str(eval_data), b.imgsz)


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_job(job: Job) -> dict:
    """Train (unless the job only evaluates), measure, evaluate with COCO; write ``run.json``. In the child."""
    from detkd.evaluation import evaluate_checkpoint
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    start = time.time()
    best = _train(job) if job.train is not None else job.checkpoint
    memory = _peak_memory()
    run_dir = Path(job.run_dir)
    device = (job.train or {}).get("device")
    metrics = evaluate_checkpoint(best, job.eval_data, job.eval_imgsz, run_dir / "coco_metrics.json", device=device)
    curve = read_curve(run_dir / "results.csv") if job.train is not None else {}
    record = {
        "method": job.method,
        "seed": job.seed,
        "checkpoint": str(best),
        "metrics": metrics,
        **curve,
        **memory,
        "wall_s": round(time.time() - start, 1),
        "job": asdict(job),
    }
    save_json(record, run_dir / "run.json")
    return record


def _train(job: Job) -> Path:
    if job.recipe is not None:
        from detkd.engine import distill

        return distill(load_recipe(None, job.recipe), **job.train)
    from ultralytics import YOLO

    model = YOLO(job.model)
    model.train(**job.train)
    return Path(model.trainer.best)


def _peak_memory() -> dict[str, Any]:
    """Peak memory of this process's training: CUDA allocations on a GPU, resident set size on a CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "memory": "cuda"}
    try:
        import resource
    except ImportError:  # Windows
        return {"peak_memory_mb": None, "memory": "rss"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1), "memory": "rss"}


def read_curve(results_csv: Path) -> dict[str, Any]:
    """Epochs, seconds per epoch (Ultralytics' ``time`` column is cumulative) and mAP50-95 per epoch."""
    with open(results_csv, newline="") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        return {"epochs": 0, "time_per_epoch_s": None, "map_per_epoch": []}
    return {
        "epochs": len(rows),
        "time_per_epoch_s": round(float(rows[-1]["time"]) / len(rows), 2),
        "map_per_epoch": [float(r["metrics/mAP50-95(B)"]) for r in rows],
    }


def _spawn(job: Job) -> int:
    """Run ``job`` in a fresh process, its output in ``run_dir/bench.log``; a half-done run is started over."""
    run_dir = Path(job.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # Ultralytics would append to an old results.csv
    run_dir.mkdir(parents=True)
    job_file = save_json(asdict(job), run_dir / "job.json")
    with open(run_dir / "bench.log", "w") as log:
        command = [sys.executable, "-m", "detkd.benchmark", "run-one", str(job_file)]
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


# --- the benchmark -------------------------------------------------------------------------------------------


def run_benchmark(
    profile: Profile,
    out: str | os.PathLike,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    command: str = "",
) -> dict:
    """Run the profile's (selected) methods and seeds that have not finished; rewrite the report after each run.

    ``methods`` picks methods by name, ``seeds`` replaces every method's seeds. Returns the report; runs that
    failed are listed in its ``failed`` entry (their logs in ``run_dir/bench.log``).
    """
    unknown = sorted(set(methods or []) - {m.name for m in profile.methods})
    if unknown:
        known = ", ".join(m.name for m in profile.methods)
        raise DetkdError(f"profile {profile.name}: no method named {', '.join(unknown)} (methods: {known})")
    bench = Bench.prepare(profile, out)
    jobs = [
        bench.job(m, seed)
        for m in profile.methods
        if not methods or m.name in methods
        for seed in (seeds or m.seeds or profile.seeds)
    ]
    todo = [j for j in [bench.teacher, *jobs] if j.finished() is None]
    _log(f"{profile.name}: {len(jobs)} runs, {len(todo)} to do, in {bench.out}")
    start, failed = time.time(), []
    for i, job in enumerate(todo, 1):
        what = f"[bench {i}/{len(todo)}] " + ("teacher" if job is bench.teacher else f"{job.method} seed {job.seed}")
        _log(f"{what} ... ({(time.time() - start) / 60:.1f} min elapsed)")
        t = time.time()
        code = _spawn(job)
        record = job.finished()
        if record is None and job is bench.teacher:
            raise DetkdError(f"{job.run_dir}: the teacher failed (exit {code}; see bench.log there)")
        if record is None:
            _log(f"{what}: FAILED (exit {code}), see {Path(job.run_dir) / 'bench.log'}")
            failed.append(job.run_dir)
        else:
            _log(f"{what}: AP {record['metrics']['AP']:.4f} in {(time.time() - t) / 60:.1f} min")
        write_report(build_report(bench, command, failed), bench.out)
    report = write_report(build_report(bench, command, failed), bench.out)
    _log(f"done in {(time.time() - start) / 60:.1f} min: {bench.out / 'results.md'}")
    return report


# --- aggregation and report ----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def gap_closed(ap: float, alone_ap: float, teacher_ap: float) -> float | None:
    """(AP − AP_alone) / (AP_teacher − AP_alone): the fraction of the teacher–student gap closed; None if the
    teacher is not better than the student alone."""
    return (ap - alone_ap) / (teacher_ap - alone_ap) if teacher_ap > alone_ap else None


def summarise(runs: list[dict], order: list[str], baseline: str | None, teacher_ap: float | None) -> list[dict]:
    """Per method with runs (in ``order``): COCO metrics as mean ± std over seeds, AP gain over the baseline, the
    fraction of the teacher–student gap closed, seconds per epoch as a ratio to the baseline's, peak memory (the
    largest over seeds) and the mean mAP curve."""
    rows = [_summarise_method(name, [r for r in runs if r["method"] == name]) for name in order]
    rows = [r for r in rows if r is not None]
    base = next((r for r in rows if r["method"] == baseline), None)
    for row in rows:
        ap, tpe = row["metrics"]["AP"]["mean"], row["time_per_epoch_s"]
        base_ap, base_tpe = (base["metrics"]["AP"]["mean"], base["time_per_epoch_s"]) if base else (None, None)
        row["gain_AP"] = None if base_ap is None else ap - base_ap
        row["gap_closed"] = None if None in (base_ap, teacher_ap) else gap_closed(ap, base_ap, teacher_ap)
        row["time_ratio"] = tpe / base_tpe if tpe and base_tpe else None
    return rows


def _summarise_method(name: str, runs: list[dict]) -> dict | None:
    if not runs:
        return None
    times = [r["time_per_epoch_s"] for r in runs if r.get("time_per_epoch_s")]
    memory = [r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb") is not None]
    curves = [r["map_per_epoch"] for r in runs if r.get("map_per_epoch")]
    length = min((len(c) for c in curves), default=0)
    return {
        "method": name,
        "seeds": sorted(r["seed"] for r in runs),
        "metrics": {k: mean_std([r["metrics"][k] for r in runs]) for k in COCO_METRICS},
        "time_per_epoch_s": statistics.fmean(times) if times else None,
        "peak_memory_mb": max(memory, default=None),
        "memory": runs[0].get("memory"),
        "map_per_epoch": [statistics.fmean(c[e] for c in curves) for e in range(length)],
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    from detkd.runtime import cpu_threads
    from detkd.ultralytics_internals import cpu_name, ultralytics_offline

    ultralytics_offline()  # sets the torch threads that every run uses
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": cpu_threads(), "torch_threads": torch.get_num_threads(), "device": gpu or cpu_name()}


def build_report(bench: Bench, command: str = "", failed: Sequence[str] = ()) -> dict:
    """Everything finished so far in the bench's output folder, summarised."""
    profile, teacher = bench.profile, bench.teacher.finished()
    runs = bench.finished_runs()
    methods = summarise(runs, [m.name for m in profile.methods], profile.baseline, teacher and teacher["metrics"]["AP"])
    kinds = {m.name: m.kind for m in profile.methods}
    return {
        "profile": profile.name,
        "command": command,
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "data": asdict(profile.data),
        "budget": asdict(profile.budget),
        "student": profile.student,
        "teacher": {**asdict(profile.teacher), "metrics": teacher and teacher["metrics"]},
        "baseline": profile.baseline,
        "methods": [{**row, "kind": kinds[row["method"]]} for row in methods],
        "runs": [{k: v for k, v in r.items() if k != "job"} for r in runs],
        "failed": list(failed),
    }


def write_report(report: dict, out: Path) -> dict:
    """``results.json`` (atomically), then ``results.md``, ``map_vs_epoch.png`` and ``gains.png``."""
    save_json(report, out / "results.json")
    _write_text(out / "results.md", format_markdown(report))
    plot_map_vs_epoch(report["methods"], out / "map_vs_epoch.png")
    plot_gains(report["methods"], report["baseline"], out / "gains.png")
    return report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pm(stat: dict[str, float | None]) -> str:
    """``mean ± std``; ``n/a`` for COCO's -1 (no object of that size in the set)."""
    if stat["mean"] < 0:
        return "n/a"
    return f"{stat['mean']:.4f} ± " + ("—" if stat["std"] is None else f"{stat['std']:.4f}")


def _cell(value: float | None, fmt: str, unit: str = "") -> str:
    return "—" if value is None else format(value, fmt) + unit


def format_markdown(report: dict) -> str:
    """A header (command, date, machine, data, budget, teacher and baseline AP), then one row per method."""
    m, b, d, teacher = report["machine"], report["budget"], report["data"], report["teacher"]
    s = d["synthetic"]
    data = f"synthetic scenes, {s['train']} train / {s['val']} val at {s['imgsz']} px" if s else d["yaml"]
    teacher_name = teacher["checkpoint"] or f"{teacher['model']} ({teacher['epochs']} epochs)"
    teacher_ap = _cell(teacher["metrics"] and teacher["metrics"]["AP"], ".4f")
    base = next((r for r in report["methods"] if r["method"] == report["baseline"]), None)
    memory = "CUDA allocated" if any(r["memory"] == "cuda" for r in report["methods"]) else "resident set size"
    lines = [
        f"# detkd benchmark: {report['profile']}",
        "",
        f"`{report['command']}` ({report['date']})",
        "",
        f"- machine: {m['cpus']} CPUs, {m['torch_threads']} torch threads, {m['device']}",
        f"- data: {data}; budget: {b['epochs']} epochs at {b['imgsz']} px, batch {b['batch']}; student "
        f"{report['student']}",
        f"- teacher {teacher_name}: AP {teacher_ap}; baseline ({report['baseline']}): AP "
        + (_pm(base["metrics"]["AP"]) if base else "—"),
        "",
        "| method | AP | AP50 | AP75 | APs | APm | APl | seeds | gap closed | time/epoch | peak mem (MB) |",
        "|---|" + "---|" * 10,
    ]
    for r in report["methods"]:
        gap = r["gap_closed"] and 100 * r["gap_closed"]
        cells = [
            r["method"],
            *(_pm(r["metrics"][k]) for k in TABLE_METRICS),
            str(len(r["seeds"])),
            _cell(gap, ".1f", " %"),
            _cell(r["time_ratio"], ".2f", "×"),
            _cell(r["peak_memory_mb"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "COCO metrics as mean ± std over seeds (— for one seed). Gap closed: (AP − AP_alone) / (AP_teacher − "
        "AP_alone). Time/epoch: wall time per epoch (training and validation) over the baseline's. Peak memory: "
        f"{memory} of the training process (data-loading workers not included), the largest over seeds.",
    ]
    if report["failed"]:
        lines += ["", "Failed runs (see bench.log in each): " + ", ".join(report["failed"])]
    return "\n".join(lines) + "\n"


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def plot_map_vs_epoch(methods: list[dict], path: Path) -> None:
    """COCO-style mAP50-95 from Ultralytics' validation each epoch, mean over seeds, one line per method."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    colors = matplotlib.colormaps["tab20"].colors  # dark shades, then light dashed: the default cycle repeats at 10
    for i, r in enumerate(methods):
        if r["map_per_epoch"]:
            epochs = range(1, len(r["map_per_epoch"]) + 1)
            style = {"color": colors[2 * i % 20 + i // 10 % 2], "linestyle": "-" if i < 10 else "--"}
            ax.plot(epochs, r["map_per_epoch"], marker="o", markersize=3, label=r["method"], **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="mAP50-95 (validation, mean over seeds)", title="mAP vs epoch")
    if ax.lines:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_gains(methods: list[dict], baseline: str | None, path: Path) -> None:
    """COCO AP gain over the baseline per method, error bars the method's std over seeds."""
    fig, ax = _figure(max(5.0, 0.8 * len(methods) + 2), 4.5)
    rows = [r for r in methods if r["gain_AP"] is not None]
    errors = [r["metrics"]["AP"]["std"] or 0.0 for r in rows]
    bars = ax.bar([r["method"] for r in rows], [r["gain_AP"] for r in rows], yerr=errors, capsize=4)
    ax.bar_label(bars, fmt="%+.4f", fontsize="small", padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel=f"AP − AP of {baseline or 'baseline'}", title="COCO AP gain over the student alone")
    ax.tick_params(axis="x", labelrotation=30)
    fig.savefig(path, dpi=120)


def _log(message: str) -> None:
    print(message, flush=True)


# --- command line --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detkd benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", required=True, help="quick, cpu, gpu (configs/benchmarks/) or a profile .yaml")
    p.add_argument("--out", help="output folder (default: runs/bench/<profile>); rerun to resume")
    p.add_argument("--teacher", help="teacher checkpoint to use instead of training the profile's")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="run only these methods (the report keeps all)")
    p.add_argument(
        "--seeds", nargs="+", type=int, metavar="SEED", help="seeds for every method (replaces the profile's)"
    )
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    return p


def _command_line() -> str:
    """The command as typed: ``python tools/benchmark.py ...`` or ``detkd benchmark ...``."""
    first = sys.argv[0]
    return shlex.join(["python", first, *sys.argv[1:]] if first.endswith(".py") else [Path(first).name, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    """``detkd benchmark`` and ``tools/benchmark.py``: 0 when every run finished, 1 if some failed, 2 on errors."""
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile)
        if args.teacher:
            if not Path(args.teacher).is_file():
                raise DetkdError(f"{args.teacher}: teacher checkpoint not found")
            profile.teacher.checkpoint = str(Path(args.teacher).resolve())
        out = args.out or Path("runs") / "bench" / profile.name
        with trust_checkpoints(args.trust_checkpoint):  # its runs inherit it
            report = run_benchmark(profile, out, args.methods, args.seeds, command=_command_line())
    except DetkdError as e:
        print(f"detkd: error: {e}", file=sys.stderr)
        return 2
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["run-one"]:  # the child process of one run (see _spawn)
        run_job(Job(**json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    sys.exit(main())
