"""The ``unlabeled`` benchmark profile: the labeled / unlabeled split of the training images, the data and recipe of
each method's jobs, and one tiny benchmark of it through the real machinery (≈ 1 min on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from detkd.benchmark import Bench, Footage, SyntheticData, load_profile, main
from detkd.benchmark.jobs import split_labeled
from detkd.config import load_recipe
from detkd.data.yolo import label_file, load_yolo
from detkd.errors import DetkdError

# the split


def _boxes(ds) -> dict[str, list]:
    """Each image's file name and its (category, box) pairs, whatever the ids."""
    by_image = ds.annotations_by_image()
    return {Path(im.file_name).name: sorted((a.category_id, a.bbox) for a in by_image[im.id]) for im in ds.images}


def test_split_keeps_the_first_images_labeled_and_the_rest_without_labels(synth_data, tmp_path):
    labeled_yaml, unlabeled = split_labeled(synth_data, 0.25, tmp_path)
    full, labeled = _boxes(load_yolo(synth_data, "train")), _boxes(load_yolo(labeled_yaml, "train"))
    assert sorted(labeled) == [f"train_{i:06d}.jpg" for i in range(4)]  # the first 4 of 16 scenes
    assert all(labeled[name] == full[name] for name in labeled) and sum(map(len, labeled.values())) > 0
    assert _boxes(load_yolo(labeled_yaml, "val")) == _boxes(load_yolo(synth_data, "val"))  # val unchanged

    images = sorted(p.name for p in unlabeled.iterdir())
    assert images == [f"train_{i:06d}.jpg" for i in range(4, 16)]
    labels = sorted(p.name for p in (labeled_yaml.parent / "labels" / "train").iterdir())
    assert labels == [f"train_{i:06d}.txt" for i in range(4)]  # the labeled ones' only
    assert not any(label_file(p).exists() or p.with_suffix(".txt").exists() for p in unlabeled.iterdir())
    assert (unlabeled / images[0]).read_bytes() == (synth_data.parent / "images/train" / images[0]).read_bytes()

    stamp = labeled_yaml.stat().st_mtime_ns
    assert split_labeled(synth_data, 0.25, tmp_path) == (labeled_yaml, unlabeled)  # made once
    assert labeled_yaml.stat().st_mtime_ns == stamp
    again, elsewhere = split_labeled(synth_data, 0.25, tmp_path / "other")
    assert sorted(p.name for p in elsewhere.iterdir()) == images and _boxes(load_yolo(again, "train")) == labeled


def test_a_split_that_leaves_one_side_empty_is_an_error(synth_data, tmp_path):
    with pytest.raises(DetkdError, match=r"data.yaml: a labeled fraction of 0.01 of 16 training images leaves none"):
        split_labeled(synth_data, 0.01, tmp_path)


# the profile and its jobs


@pytest.fixture
def small_unlabeled_bench(tmp_path) -> Bench:
    """The shipped profile with its data made tiny (16 + 8 scenes at 64 px, 4 footage frames); nothing trains."""
    profile = load_profile("unlabeled")
    profile.data.synthetic = SyntheticData(train=16, val=8, imgsz=64, seed=0)
    profile.data.footage = Footage(frames=4, fps=5)
    profile.teacher.data.synthetic = SyntheticData(train=16, val=8, imgsz=64, seed=1)
    return Bench.prepare(profile, tmp_path)


def test_unlabeled_profile_gives_each_method_its_data_and_recipe(small_unlabeled_bench):
    bench = small_unlabeled_bench
    profile = bench.profile
    assert profile.baseline == "alone"
    seeds = {m.name: m.seeds or profile.seeds for m in profile.methods}
    assert seeds == {"alone": [0, 1, 2], "distilled": [0, 1, 2], "distilled+unlabeled": [0, 1, 2],
                     "distilled+unlabeled+pseudo": [0, 1, 2], "pseudo": [0], "ceiling": [0, 1, 2]}  # fmt: skip
    jobs = {m.name: bench.job(m, 0) for m in profile.methods}
    data = {name: job.train["data"] for name, job in jobs.items()}
    labeled, everything = str(bench.data_yaml), str(bench.all_data)
    assert labeled != everything and len(load_yolo(labeled, "train").images) == 2  # 15 % of 16 scenes
    assert everything.endswith("synth_16_8_64px_s0/data.yaml") and len(load_yolo(everything, "train").images) == 16
    assert data == {
        "alone": labeled,
        "distilled": labeled,
        "distilled+unlabeled": labeled,
        "distilled+unlabeled+pseudo": labeled,
        "pseudo": str(bench.pseudo_data(0.5)),
        "ceiling": everything,
    }
    assert jobs["alone"].recipe is None and jobs["pseudo"].recipe is None and jobs["ceiling"].recipe is None

    recommended = load_recipe("recommended").to_dict()["distill"]
    teacher = str(bench.teacher.checkpoint)
    distilled, with_unlabeled = jobs["distilled"].recipe, jobs["distilled+unlabeled"].recipe
    assert distilled["distill"] == recommended == with_unlabeled["distill"] and "unlabeled" not in distilled
    assert distilled["teacher"] == teacher == with_unlabeled["teacher"] and with_unlabeled["data"] == labeled
    unlabeled = with_unlabeled["unlabeled"]
    assert unlabeled["source"] == [str(p) for p in bench.unlabeled] and unlabeled["ratio"] == 1.0
    folder, video = bench.unlabeled
    assert len(list(folder.iterdir())) == 14 and video.suffix == ".mp4" and video.is_file()
    assert unlabeled["pseudo"] is None  # (c) distils only: the task loss stays the labeled images'
    with_boxes = jobs["distilled+unlabeled+pseudo"].recipe
    assert with_boxes["unlabeled"] == unlabeled | {"pseudo": {"conf": 0.5, "weight": 1.0}}
    assert with_boxes["distill"] == recommended

    # the teacher trains on other scenes than the students', so it never saw a label of their unlabeled images
    assert bench.teacher.train["data"].endswith("synth_16_8_64px_s1/data.yaml")
    # the same budget for every method, in iterations: those on more images train fewer epochs
    own = {name: {k: j.train.get(k) for k in ("epochs", "close_mosaic", "warmup_epochs")} for name, j in jobs.items()}
    default = {"epochs": 100, "close_mosaic": None, "warmup_epochs": None}  # Ultralytics': 10 and 3 (18 iterations)
    assert own == {
        **dict.fromkeys(("alone", "distilled", "distilled+unlabeled", "distilled+unlabeled+pseudo"), default),
        "pseudo": {"epochs": 13, "close_mosaic": 1, "warmup_epochs": 0.39},  # 46 batches an epoch: 18 iterations
        "ceiling": {"epochs": 16, "close_mosaic": 2, "warmup_epochs": 0.47},  # 38: 18
    }
    shared = [{k: v for k, v in j.train.items() if k not in ("name", "data", *own["pseudo"])} for j in jobs.values()]
    assert all(s == shared[0] for s in shared) and shared[0]["nbs"] == 16  # one optimizer step a batch


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: {labeled: 1.0}\nmethods: [{name: a, kind: alone}]", "'data.labeled' is 1: no training image"),
        ("data: {labeled: 0}\nmethods: [{name: a, kind: alone}]", "'data.labeled' must be > 0"),
        ("methods: [{name: a, kind: alone, data: all}]", "'methods[0]' (a): 'data: all' needs the profile's"),
        ("methods: [{name: a, kind: alone, data: some}]", "'methods[0].data' must be one of labeled, all, labeled+p"),
        ("data: {labeled: 0.5}\nmethods: [{name: a, kind: alone, pseudo_conf: 0.3}]", "'pseudo_conf' is for 'data:"),
        ("methods: [{name: a, kind: alone, unlabeled: {source: x}}]", "'unlabeled' is for kind 'detkd' only"),
        ("methods: [{name: x, recipe: recommended, unlabeled: {source: unlabeled}}]", "needs the profile's 'data.l"),
        (
            "data: {labeled: 0.5}\n"
            "methods: [{name: x, data: all, recipe: recommended, unlabeled: {source: unlabeled}}]",
            "the method's 'data: labeled'",
        ),
        ("data: {footage: {frames: 10}}\nmethods: [{name: a, kind: alone}]", "'data.footage' is unlabeled synthetic"),
        ("teacher: {data: {labeled: 0.5}}\nmethods: [{name: a, kind: alone}]", "'teacher.data' trains the teacher"),
        (
            "data: {labeled: 0.5}\nmethods: [{name: a, kind: alone}, {name: b, kind: alone}]",
            "more than one of kind 'alone' on data 'labeled'",
        ),
        (
            "data: {labeled: 0.5}\nmethods: [{name: a, kind: alone, data: all}, {name: b, kind: alone, data: all}]",
            "more than one of kind 'alone' on data 'all' (the one ceiling)",
        ),
    ],
)
def test_a_bad_unlabeled_profile_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DetkdError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_several_alone_methods_on_different_data_keep_one_baseline(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "data: {labeled: 0.5}\nmethods: [{name: ceiling, kind: alone, data: all}, {name: a, kind: alone},\n"
        "  {name: p, kind: alone, data: labeled+pseudo}]"
    )
    profile = load_profile(path)
    assert profile.baseline == "a" and profile.methods[2].pseudo_threshold == 0.5


# end to end: the labeled part, the unlabeled folder and footage, the teacher's pseudo-labels, the ceiling


def test_tiny_unlabeled_benchmark_runs_every_kind_of_data_and_reports(teacher_checkpoint, tmp_path, capsys):
    profile = tmp_path / "tiny.yaml"
    profile.write_text(
        "data: {synthetic: {train: 16, val: 8, imgsz: 64, seed: 0}, labeled: 0.25, footage: {frames: 6, fps: 5}}\n"
        "budget: {epochs: 1, imgsz: 64, batch: 8, workers: 0}\n"
        "methods:\n"
        "  - {name: alone, kind: alone}\n"
        "  - {name: distilled+unlabeled, recipe: recommended, unlabeled: {source: unlabeled, ratio: 1.0}}\n"
        "  - {name: pseudo, kind: alone, data: labeled+pseudo, pseudo_conf: 0.001}\n"  # an untrained teacher: ≈ 0.0016
        "  - {name: ceiling, kind: alone, data: all}\n"
    )
    out = tmp_path / "out"
    args = ["--profile", str(profile), "--out", str(out), "--teacher", str(teacher_checkpoint)]
    assert main(args) == 0
    assert "tiny: 4 runs, 5 to do" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert report["failed"] == [] and report["baseline"] == "alone"
    assert [(m["method"], m["data"]) for m in report["methods"]] == [
        ("alone", "labeled"),
        ("distilled+unlabeled", "labeled"),
        ("pseudo", "labeled+pseudo"),
        ("ceiling", "all"),
    ]
    md = (out / "results.md").read_text()
    assert "25 % of train labeled, the rest unlabeled with 6 frames of synthetic footage at 5 fps" in md
    assert all(f"| {m['method']} | " in md for m in report["methods"])
    assert "| labels recovered |" in md and "Labels recovered: (AP − AP_alone) / (AP_ceiling − AP_alone)" in md
    assert report["ceiling"] == "ceiling"
    ceiling = next(m for m in report["methods"] if m["method"] == "ceiling")
    alone = next(m for m in report["methods"] if m["method"] == "alone")
    if ceiling["metrics"]["AP"]["mean"] > alone["metrics"]["AP"]["mean"]:  # 1 epoch may leave it no better
        assert ceiling["labels_recovered"] == pytest.approx(1.0) and alone["labels_recovered"] == 0

    def trained_on(method: str) -> str:
        return yaml.safe_load((out / "runs" / f"{method}_s0" / "args.yaml").read_text())["data"]

    assert trained_on("ceiling").endswith("synth_16_8_64px_s0/data.yaml")
    assert "_labeled4_" in trained_on("alone") and trained_on("distilled+unlabeled") == trained_on("alone")

    # (c): 12 unlabeled scenes and the footage's frames join the batches; their terms have their own columns
    log = (out / "runs" / "distilled+unlabeled_s0" / "bench.log").read_text()
    assert "unlabeled frames: " in log and ": images, 12 read, 12 taken" in log and "footage_6f_5fps_64px_s0.mp4" in log
    assert "train/kd_cls_u" in (out / "runs" / "distilled+unlabeled_s0" / "results.csv").read_text().splitlines()[0]

    # (d): the teacher labeled the same unlabeled images once; the student trained on them and the labeled ones
    merged = Path(trained_on("pseudo"))
    pseudo_report = json.loads((merged.parent / "set" / "pseudo_labels.json").read_text())
    frames = [s for s in pseudo_report["sources"] if s["kind"] == "video"][0]["taken"]
    assert pseudo_report["images"] == 12 + frames and frames > 0 and sum(pseudo_report["boxes"].values()) > 0
    assert yaml.safe_load(merged.read_text())["train"][1] == str(merged.parent / "set" / "images")
    stamp = merged.stat().st_mtime_ns

    assert main(args) == 0  # nothing left: no run starts and the pseudo-labels are not made again
    assert "4 runs, 0 to do" in capsys.readouterr().out and merged.stat().st_mtime_ns == stamp
