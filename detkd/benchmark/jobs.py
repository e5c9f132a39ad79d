"""Benchmark jobs: one training (or evaluation) per (method, seed), each in its own process, cached when done.

Each run trains in a fresh process (``python -m detkd.benchmark run-one JOB.json``), so a crash costs one run and
peak memory is that run's own. A finished run leaves ``run.json`` beside its Ultralytics files and is skipped
next time while its :class:`Job` is unchanged: the Job's fields are the cache key, so renaming or reordering them
makes every earlier run look unfinished.

A profile with ``data.labeled`` splits its training images once per output folder (:func:`split_labeled`): the
labeled part is a data set of its own, the rest a folder of images without labels; the teacher's pseudo-labels of
those (for ``data: labeled+pseudo``) are made once per teacher and confidence (:meth:`Bench.prepare_pseudo`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from detkd.backbone_pretrain import CropsPretraining, pretrain_backbone, resnet_of
from detkd.benchmark.profiles import CROPS_BACKBONE, DataSpec, Method, Profile, method_recipe
from detkd.config import load_recipe
from detkd.errors import DetkdError
from detkd.utils import read_results, save_json, write_text


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
        """What the run leaves: Ultralytics' ``weights/best.pt``, a torchvision teacher's ``teacher.pt``
        (:mod:`detkd.teacher_train`), or the given checkpoint of a job that only evaluates."""
        if self.train is None:
            return Path(self.model)
        return Path(self.run_dir) / ("teacher.pt" if _torchvision_arch(self.model) else "weights/best.pt")

    def finished(self) -> dict | None:
        """The run record if this job completed with exactly these settings."""
        record_file = Path(self.run_dir) / "run.json"
        if not record_file.is_file():
            return None
        record = json.loads(record_file.read_text())
        return record if self.same_as(record.get("job")) else None

    def same_as(self, saved: dict | None) -> bool:
        """Whether ``saved`` (a job as a run wrote it) is this job. Its recipe is read again by today's code first, so
        that a recipe key added since, at its default, does not make a finished run look like another job's."""
        if not isinstance(saved, dict):
            return False
        if isinstance(saved.get("recipe"), dict):
            try:
                saved = {**saved, "recipe": load_recipe(None, saved["recipe"]).to_dict()}
            except DetkdError:
                return False
        return json.loads(json.dumps(saved)) == json.loads(json.dumps(asdict(self)))


@dataclass
class Bench:
    """A profile bound to an output folder: its data, its teacher, and the job of any (method, seed)."""

    profile: Profile
    out: Path
    data_yaml: Path  # the labeled training images (with ``data.labeled``: its labeled part)
    eval_data: Path  # the COCO val json of synthetic data, else the data yaml (its val split)
    teacher: Job
    all_data: Path | None = None  # with ``data.labeled``: every training image, fully labeled
    unlabeled: list[Path] = field(default_factory=list)  # with ``data.labeled``: the unlabeled images' sources

    @classmethod
    def prepare(cls, profile: Profile, out: str | os.PathLike) -> Bench:
        """Generate the synthetic data and split off the unlabeled images if needed (once per output folder), and
        plan the teacher. Without its own ``teacher.data``, the teacher trains on the students' labeled images."""
        out = Path(out).resolve()
        data_yaml, eval_data = _prepare_data(profile.data, out)
        all_data, unlabeled = None, []
        if profile.data.labeled is not None:
            all_data = data_yaml
            data_yaml, folder = split_labeled(all_data, profile.data.labeled, out / "data")
            unlabeled = [folder, *([_prepare_footage(profile.data, out)] if profile.data.footage else [])]
        teacher_data = data_yaml if profile.teacher.data is None else _prepare_data(profile.teacher.data, out)[0]
        teacher = _teacher_job(profile, out, teacher_data, eval_data)
        return cls(profile, out, data_yaml, eval_data, teacher, all_data, unlabeled)

    def job(self, method: Method, seed: int) -> Job:
        """The run of ``method`` at ``seed``: the same training keys for every method, plus what the method adds."""
        p = self.profile
        run_dir = self.out / "runs" / f"{method.name}_s{seed}"
        data = self.train_data(method)
        train = _train_args(p, data, seed, run_dir, method.epochs or p.budget.epochs) | (method.train or {})
        recipe = None
        if method.kind == "builtin":
            train.update(distill_model=str(self.teacher.checkpoint), dis=6.0 if method.dis is None else method.dis)
        elif method.kind == "detkd":
            unlabeled = [str(u) for u in self.unlabeled] if method.data == "labeled" else None
            teacher = str(self.teacher.checkpoint)
            recipe = method_recipe(method, teacher, p.student, str(data), unlabeled).to_dict()
        return Job(method.name, seed, str(run_dir), p.student, train, recipe, str(self.eval_data), p.budget.imgsz)

    def train_data(self, method: Method) -> Path:
        """The data yaml ``method`` trains on (see :class:`~detkd.benchmark.profiles.Method`'s ``data``)."""
        if method.data == "all":
            return self.all_data
        if method.data == "labeled+pseudo":
            return self.pseudo_data(method.pseudo_threshold)
        return self.data_yaml

    def pseudo_data(self, conf: float) -> Path:
        """The data yaml of the labeled images and the unlabeled ones labeled by the teacher at ``conf``: one per
        teacher, unlabeled images, confidence and inference size (made by :meth:`prepare_pseudo`)."""
        key = _digest(self.teacher.run_dir, [str(u) for u in self.unlabeled], conf, self.profile.budget.imgsz)
        return self.out / "pseudo" / f"conf{conf:g}_{key}" / "data.yaml"

    def prepare_pseudo(self, conf: float) -> Path:
        """Label the unlabeled images with the (finished) teacher, as ``detkd pseudo-label`` does, in a child
        process (its output in ``pseudo_label.log``); then write the data yaml whose train images are the labeled
        ones and the pseudo-labeled ones (Ultralytics reads a list of folders). Skipped when done before."""
        data = self.pseudo_data(conf)
        if data.is_file():  # written last
            return data
        folder, b = data.parent, self.profile.budget
        shutil.rmtree(folder, ignore_errors=True)  # a cut labeling starts over
        folder.mkdir(parents=True)
        log(f"pseudo-labeling {', '.join(map(str, self.unlabeled))} with the teacher at conf {conf:g} in {folder}")
        command = [sys.executable, "-m", "detkd.cli", "pseudo-label", "--teacher", str(self.teacher.checkpoint)]
        command += ["--source", *map(str, self.unlabeled), "--out", str(folder / "set"), "--conf", str(conf)]
        command += ["--imgsz", str(b.imgsz), "--batch", str(b.batch)]
        command += [] if b.device is None else ["--device", str(b.device)]
        with open(folder / "pseudo_label.log", "w") as output:
            code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode
        if code:
            raise DetkdError(f"{folder / 'pseudo_label.log'}: pseudo-labeling failed (exit {code})")
        labeled = yaml.safe_load(self.data_yaml.read_text())  # written by split_labeled: images/{train,val}
        pseudo = yaml.safe_load((folder / "set" / "data.yaml").read_text())
        if list(pseudo["names"].values()) != list(labeled["names"].values()):
            raise DetkdError(
                f"{self.teacher.checkpoint}: the teacher's classes {list(pseudo['names'].values())} are not the "
                f"data's {list(labeled['names'].values())}: its pseudo-labels cannot join the labeled images"
            )
        merged = {
            "train": [str(self.data_yaml.parent / labeled["train"]), str(folder / "set" / "images")],
            "val": str(self.data_yaml.parent / labeled["val"]),
            "names": labeled["names"],
        }
        write_text(data, yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
        return data

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

        log(f"generating {s.train} + {s.val} synthetic scenes at {s.imgsz} px in {root}")
        generate_synthetic(root, s.train, s.val, seed=s.seed, cfg=SynthConfig(imgsz=s.imgsz))
    return root / "data.yaml", root / "annotations" / "instances_val.json"


def split_labeled(data_yaml: Path, fraction: float, folder: Path) -> tuple[Path, Path]:
    """The first ``fraction`` of ``data_yaml``'s training images (by path: synthetic scenes 0, 1, ...) with their
    labels, and its val split, as a data set of their own; the other training images in a folder ``unlabeled/``
    beside it without any label file, so that nothing can read their labels. Made once (``data.yaml`` written
    last); returns that data yaml and the unlabeled folder."""
    from detkd.data.yolo import load_yolo, write_yolo

    train = load_yolo(data_yaml, "train")
    n = round(fraction * len(train.images))
    if not 0 < n < len(train.images):
        raise DetkdError(
            f"{data_yaml}: a labeled fraction of {fraction:g} of {len(train.images)} training images "
            f"leaves {'none labeled' if n == 0 else 'none unlabeled'}"
        )
    root = folder / f"{data_yaml.parent.name}_labeled{n}_{_digest(str(data_yaml))}"
    if not (root / "data.yaml").is_file():
        log(f"splitting {data_yaml}: {n} labeled training images, {len(train.images) - n} unlabeled, in {root}")
        kept = {im.id for im in train.images[:n]}
        labeled = replace(
            train, images=train.images[:n], annotations=[a for a in train.annotations if a.image_id in kept]
        )
        replace(train, images=train.images[n:], annotations=[]).with_images_in(root, "unlabeled")
        write_yolo({"train": labeled, "val": load_yolo(data_yaml, "val")}, root)
    return root / "data.yaml", root / "unlabeled"


def _prepare_footage(spec: DataSpec, out: Path) -> Path:
    """The profile's synthetic footage (an MP4, its ground truth beside it, read by nothing here), made once."""
    s, f = spec.synthetic, spec.footage
    video = out / "data" / f"footage_{f.frames}f_{f.fps:g}fps_{s.imgsz}px_s{s.seed}.mp4"
    if not video.is_file():  # written atomically
        from detkd.data.footage import write_footage

        log(f"writing {f.frames} frames of synthetic footage at {s.imgsz} px to {video}")
        write_footage(video, f.frames, s.imgsz, f.fps, s.seed)
    return video


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
    # in the key only when set (earlier teachers keep theirs): a file with its time (it may be rewritten), the crops
    # pretraining with its settings
    crops = CropsPretraining(resnet_of(_torchvision_arch(t.model)), seed=seed) if t.backbone == CROPS_BACKBONE else None
    if crops:
        backbone = [t.backbone, crops.to_dict()]
    else:
        backbone = [t.backbone, Path(t.backbone).stat().st_mtime] if t.backbone else []
    batch = b.batch if t.batch is None else t.batch
    key = _digest(str(data_yaml), t.model, t.epochs, b.imgsz, batch, seed, b.train, *backbone)
    run_dir = out / "teacher" / f"{Path(t.model.replace(':', '_')).stem}_e{t.epochs}_{key}"
    train = _train_args(profile, data_yaml, seed, run_dir, t.epochs) | {"batch": batch}
    # pretrained by the teacher's job and kept beside its run: a teacher run cut in its first epoch starts over
    # without it
    if crops:
        weights = out / "teacher" / f"crops_{crops.arch}_{_digest(crops.to_dict())}.pt"
        train |= {"backbone": str(weights), "crops": crops.to_dict()}
    elif backbone:
        train |= {"backbone": t.backbone}
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
    from ultralytics import YOLO

    from detkd.engine import distill
    from detkd.ultralytics_internals import training_finished

    if arch := _torchvision_arch(job.model):  # resumes from its own weights/last.pt
        from detkd.teacher_train import train_teacher

        a = job.train
        keys = {k: a[k] for k in ("epochs", "imgsz", "batch", "workers", "seed")}
        backbone, device = a.get("backbone"), a.get("device")
        if "crops" in a and not Path(backbone).is_file():  # the file is written once it is trained
            pretrain_backbone(backbone, CropsPretraining(**a["crops"]), workers=a["workers"], device=device)
        return train_teacher(arch, a["data"], out=job.run_dir, device=device, backbone=backbone, **keys)
    run_dir = Path(job.run_dir)
    last = run_dir / "weights" / "last.pt"
    if last.is_file() and training_finished(last):  # kept by the parent: this job, cut after training ended
        return run_dir / "weights" / "best.pt"
    if last.is_file():  # kept by the parent: this very job, cut part-way
        if job.recipe is not None:
            return distill(resume=str(run_dir))
        model = YOLO(str(last))
        model.train(resume=True)
    elif job.recipe is not None:
        return distill(load_recipe(None, job.recipe), **job.train)
    else:
        model = YOLO(job.model)
        model.train(**job.train)
    return Path(model.trainer.best)


def _torchvision_arch(model: str) -> str | None:
    """The architecture of a ``torchvision:ARCH`` teacher, else None (an Ultralytics model)."""
    from detkd.adapters.torchvision import NAME_PREFIX

    return model.removeprefix(NAME_PREFIX) if model.startswith(NAME_PREFIX) else None


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
    """Epochs, seconds per epoch (Ultralytics' ``time`` column is cumulative, and starts again when a run resumes)
    and mAP50-95 per epoch."""
    cols = read_results(results_csv)
    if not cols:
        return {"epochs": 0, "time_per_epoch_s": None, "map_per_epoch": []}
    epochs = len(cols["time"])
    return {
        "epochs": epochs,
        "time_per_epoch_s": round(_seconds_spent(cols["time"]) / epochs, 2),
        "map_per_epoch": cols["metrics/mAP50-95(B)"],
    }


def _seconds_spent(times: list[float]) -> float:
    """The training time behind a cumulative ``time`` column whose clock restarts on resume."""
    return sum(t - before if t >= before else t for before, t in zip([0.0, *times], times))


def run_in_child(job: Job, threads: int | None = None) -> int:
    """Run ``job`` in a fresh process, its output in ``run_dir/bench.log``. A run of this same job that was cut after
    an epoch (its ``last.pt`` saved) resumes from there; anything else half-done is started over. ``threads``: the
    CPU threads it may use (a share of the cores when runs go side by side)."""
    run_dir = Path(job.run_dir)
    job_file = run_dir / "job.json"
    resumable = (
        job.train is not None
        and (run_dir / "weights" / "last.pt").is_file()
        and job_file.is_file()
        and job.same_as(json.loads(job_file.read_text()))
    )
    if not resumable:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing of another job's run (weights, logs) may be taken
        run_dir.mkdir(parents=True)
        save_json(asdict(job), job_file)
    env = os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(run_dir / "bench.log", "a" if resumable else "w") as output:
        command = [sys.executable, "-m", "detkd.benchmark", "run-one", str(job_file)]
        return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env).returncode


def log(message: str) -> None:
    """Progress of the benchmark, on stdout as it happens (runs take minutes)."""
    print(message, flush=True)
