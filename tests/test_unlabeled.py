"""Unlabeled images: frames from folders and videos, the recipe section, and training on labeled + unlabeled batches."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkd.adapters.ultralytics import UltralyticsAdapter
from detkd.config import DistillConfig, FeatureLossConfig, LogitLossConfig, PseudoConfig, UnlabeledConfig, load_recipe
from detkd.data.frames import collect_frames
from detkd.distiller import Distiller
from detkd.engine.criterion import LABELED, DistillationCriterion
from detkd.errors import DetkdError
from detkd.ultralytics_internals import ultralytics_offline

ultralytics_offline()
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

NAMES = {0: "car", 1: "truck", 2: "bus"}


def write_video(path: Path, frames: list[np.ndarray], repeats: int = 1) -> Path:
    """An MJPG video of ``frames``, each written ``repeats`` times in a row (a camera that films a still scene)."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for frame in frames:
        for _ in range(repeats):
            writer.write(frame)
    writer.release()
    return path


def _scenes(n: int, seed: int = 0, size: int = 64) -> list[np.ndarray]:
    from detkd.data.synth import SynthConfig, render_scene

    return [render_scene(seed, "train", i, SynthConfig(imgsz=size))[0] for i in range(n)]


# frames


def test_video_frames_are_sampled_deduplicated_and_cached(tmp_path, monkeypatch):
    video = write_video(tmp_path / "clip.avi", _scenes(4), repeats=3)  # 12 frames, 4 distinct scenes
    every2 = collect_frames(str(video), every=2)
    (part,) = every2.parts
    # candidates 0, 2, 4, 6, 8, 10: scenes 0, 0, 1, 2, 2, 3 -> the second of each pair is a near-duplicate
    assert (part.kind, part.read, part.taken, part.duplicates) == ("video", 12, 4, 2)
    assert [Path(f).stem[-3:] for f in part.files] == ["000", "004", "006", "010"]
    assert all(cv2.imread(f).shape == (64, 64, 3) for f in part.files)
    assert "12 read, 4 taken, 2 skipped as near-duplicates" in every2.format()
    assert collect_frames(str(video), every=1, dedupe=0).parts[0].taken == 12  # dedupe 0 keeps every frame

    monkeypatch.setattr(cv2, "VideoCapture", None)  # a second run reads the cache, never the video
    assert collect_frames(str(video), every=2).files == every2.files


def test_an_unreadable_file_is_named_and_skipped(tmp_path):
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i, scene in enumerate(_scenes(3)):
        cv2.imwrite(str(folder / f"f{i}.jpg"), scene)
    (folder / "broken.jpg").write_bytes((folder / "f0.jpg").read_bytes()[:200])  # a truncated JPEG
    (folder / "notes.txt").write_text("not an image")  # not an image file: not part of the source
    bad_video = folder / "bad.mp4"
    bad_video.write_bytes(b"not a video")

    frames = collect_frames(str(folder))
    assert sorted(Path(f).name for f in frames.files) == ["f0.jpg", "f1.jpg", "f2.jpg"]
    assert sorted(Path(f).name for f in frames.unreadable) == ["bad.mp4", "broken.jpg"]
    text = frames.format()
    assert "3 taken, 1 unreadable (skipped): " in text and "broken.jpg" in text and "bad.mp4" in text


def test_a_source_without_frames_is_one_clear_error(tmp_path):
    with pytest.raises(DetkdError, match="unlabeled source not found"):
        collect_frames(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetkdError, match="no image or video files"):
        collect_frames(str(tmp_path / "empty"))


# recipe


def test_the_unlabeled_section_is_typed_and_checked():
    recipe = load_recipe(None, {"unlabeled": {"source": "footage/", "ratio": 2, "pseudo": {}}})
    assert recipe.unlabeled == UnlabeledConfig(source=["footage/"], ratio=2.0, pseudo=PseudoConfig())
    assert "unlabeled" not in load_recipe(None).to_dict()  # recipes saved before the key still compare equal
    with pytest.raises(DetkdError, match="'unlabeled.pseudo.conf' must be <= 1"):
        load_recipe(None, {"unlabeled": {"source": "f", "pseudo": {"conf": 2}}})
    with pytest.raises(DetkdError, match="'unlabeled.every' must be >= 1"):
        load_recipe(None, {"unlabeled": {"source": "f", "every": 0}})
    with pytest.raises(DetkdError, match="'unlabeled.source' is empty"):
        load_recipe(None, {"unlabeled": {"ratio": 1}})
    positives = {"logit": {"weight": 1, "locations": "positives"}}
    with pytest.raises(DetkdError, match="reads labels, which unlabeled images lack"):
        load_recipe(None, {"distill": positives, "unlabeled": {"source": "f"}})
    load_recipe(None, {"distill": positives, "unlabeled": {"source": "f", "pseudo": {}}})  # pseudo-boxes are labels


# the criterion on labeled + unlabeled batches


def _model(cfg: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(cfg, nc=len(NAMES), verbose=False)
    m.names, m.args = dict(NAMES), get_cfg()
    return m


@pytest.fixture
def pair():
    student, teacher = _model("yolov8n.yaml", 0).train(), _model("yolov8s.yaml", 1).eval().requires_grad_(False)
    return student, teacher, UltralyticsAdapter(student), UltralyticsAdapter(teacher)


def _criterion(pair, pseudo: PseudoConfig | None):
    student, _, s, t = pair
    cfg = DistillConfig(feature=[FeatureLossConfig(loss="cwd")], logit=LogitLossConfig(weight=1.0))
    unlabeled = UnlabeledConfig(source=["unused"], pseudo=pseudo)
    return DistillationCriterion(student.init_criterion(), s, t, Distiller(cfg, s, t), unlabeled)


def _batch(images: int, labeled: int) -> dict:
    torch.manual_seed(2)
    boxes = [[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.125, 0.125]][:labeled]
    return {
        "img": torch.rand(images, 3, 64, 64),
        "bboxes": torch.tensor(boxes).view(-1, 4),
        "batch_idx": torch.arange(len(boxes), dtype=torch.float),
        "cls": torch.tensor([[0.0], [2.0]][: len(boxes)]).view(-1, 1),
        LABELED: labeled,
    }


def test_unlabeled_images_add_no_task_loss_without_pseudo_boxes(pair):
    student = pair[0]
    criterion = _criterion(pair, pseudo=None)
    try:
        batch = _batch(3, labeled=0)
        loss, items = criterion(student(batch["img"]), batch)
        assert loss[:3].abs().sum().item() == 0.0  # Ultralytics' box, cls and dfl: exactly nothing to learn
        assert items["box_loss"] == items["cls_loss"] == items["dfl_loss"] == 0
        assert items["kd_cwd_u"] > 0 and items["kd_cls_u"] > 0 and items["kd_cwd"] == items["kd_cls"] == 0
        assert loss[3].item() == pytest.approx(3 * (items["kd_cwd_u"] + items["kd_cls_u"]).item(), rel=1e-5)
        loss.sum().backward()  # the distillation terms alone train the student
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    finally:
        criterion.remove()


def test_the_task_loss_of_a_mixed_batch_is_the_labeled_images_own(pair):
    student = pair[0]
    criterion = _criterion(pair, pseudo=None)
    try:
        batch = _batch(4, labeled=2)
        preds = student(batch["img"])
        loss, items = criterion(preds, batch)
        # Ultralytics' own criterion on the first two images' outputs, sliced by hand
        first_two = {
            "boxes": preds["boxes"][:2],
            "scores": preds["scores"][:2],
            "feats": [f[:2] for f in preds["feats"]],
        }
        expected, _ = student.init_criterion()(first_two, {k: v for k, v in batch.items() if k != LABELED})
        assert torch.allclose(loss[:3], expected)
        for name in ("kd_cwd", "kd_cls", "kd_cwd_u", "kd_cls_u"):
            assert items[name] > 0
        total = 2 * (items["kd_cwd"] + items["kd_cls"]) + 2 * (items["kd_cwd_u"] + items["kd_cls_u"])
        assert loss[3].item() == pytest.approx(total.item(), rel=1e-5)  # each part weighs by its images
    finally:
        criterion.remove()


def test_pseudo_boxes_give_unlabeled_images_a_task_loss(pair):
    student, teacher = pair[0], pair[1]
    # an untrained teacher scores ~1e-3 everywhere: a low threshold makes its best detections boxes
    criterion = _criterion(pair, pseudo=PseudoConfig(conf=1e-3, weight=0.5))
    try:
        batch = _batch(3, labeled=0)
        with torch.no_grad():
            top = teacher(batch["img"])[0][:, 4:].max().item()  # the teacher's best score on these images
        assert top >= 1e-3
        loss, items = criterion(student(batch["img"]), batch)
        assert loss[:3].abs().sum().item() == 0.0  # still nothing from labels
        assert items["pseudo_u"] > 0
        assert loss[3].item() == pytest.approx(
            3 * (items["kd_cwd_u"] + items["kd_cls_u"] + items["pseudo_u"]).item(), rel=1e-5
        )
        half = _criterion(pair, pseudo=PseudoConfig(conf=1e-3, weight=1.0))
        _, items_full = half(student(batch["img"]), batch)
        half.remove()
        assert items_full["pseudo_u"].item() == pytest.approx(2 * items["pseudo_u"].item(), rel=1e-4)
        none = _criterion(pair, pseudo=PseudoConfig(conf=1.0, weight=1.0))  # no detection scores 1: no boxes
        _, items_none = none(student(batch["img"]), batch)
        none.remove()
        assert items_none["pseudo_u"] > 0  # background everywhere is still a loss (the class term) ...
        assert items_none["pseudo_u"] != items_full["pseudo_u"]  # ... but not the one with boxes
    finally:
        criterion.remove()


# training


def test_a_recipe_with_unlabeled_frames_trains_and_logs_split_columns(synth_data, teacher_checkpoint, tmp_path):
    from detkd.engine import distill

    folder = tmp_path / "footage"
    folder.mkdir()
    for i, scene in enumerate(_scenes(6, seed=5)):
        cv2.imwrite(str(folder / f"f{i}.jpg"), scene)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")  # reported and skipped, never trained on
    video = write_video(tmp_path / "clip.avi", _scenes(4, seed=6), repeats=2)
    best = distill(
        None,
        teacher=str(teacher_checkpoint),
        data=str(synth_data),
        distill={"feature": [{"loss": "cwd"}], "logit": {"weight": 1.0}},
        unlabeled={"source": [str(folder), str(video)], "ratio": 0.5, "pseudo": {"conf": 0.001}},
        epochs=2,
        imgsz=64,
        batch=8,
        workers=0,
        plots=False,
        project=str(tmp_path / "runs"),
        name="u",
    )
    run = best.parent.parent
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert len(rows) == 2
    for column in ("kd_cwd", "kd_cls", "kd_cwd_u", "kd_cls_u", "pseudo_u"):
        assert all(float(r[f"train/{column}"].strip()) > 0 for r in rows), column
    trained_on = (run / "unlabeled.txt").read_text().split()
    assert len(trained_on) == 6 + 4 and not any("broken" in f for f in trained_on)  # 4 scenes, each filmed twice
    assert json.loads(json.dumps(load_recipe(run / "distill.yaml").to_dict()))["unlabeled"]["ratio"] == 0.5


def test_unlabeled_images_have_no_labels_even_beside_label_files(synth_data):
    """A labeled set's images used as unlabeled footage: their label files are never read."""
    from detkd.ultralytics_internals import build_dataloader, unlabeled_dataset

    images = sorted((synth_data.parent / "images" / "train").glob("*.jpg"))
    assert all((synth_data.parent / "labels" / "train" / f"{p.stem}.txt").stat().st_size > 0 for p in images)
    listed = synth_data.parent / "unlabeled_list.txt"
    listed.write_text("".join(f"{p}\n" for p in images))
    args = get_cfg(overrides={"imgsz": 64})
    caches = set(synth_data.parent.glob("**/*.cache"))  # a labeled run on the set may have written its own
    dataset = unlabeled_dataset(args, listed, {"names": NAMES, "nc": 3, "channels": 3}, batch=4, stride=32)
    assert len(dataset) == len(images) and set(synth_data.parent.glob("**/*.cache")) == caches  # no label scan
    batch = next(iter(build_dataloader(dataset, 4, 0, -1, "cpu")))
    assert batch["img"].shape == (4, 3, 64, 64) and batch["cls"].numel() == batch["bboxes"].numel() == 0


def test_the_unlabeled_loader_draws_other_augmentations_than_the_labeled_one(synth_data):
    """Ultralytics seeds every loader alike: the unlabeled one is built under another seed, so that its workers do
    not repeat the labeled loader's augmentation image for image, and the global random state is left as it was."""
    from ultralytics.data import build_dataloader as ultralytics_loader

    from detkd.ultralytics_internals import build_dataloader, unlabeled_dataset

    listed = synth_data.parent / "unlabeled_seeds.txt"
    listed.write_text("".join(f"{p}\n" for p in sorted((synth_data.parent / "images" / "train").glob("*.jpg"))))
    dataset = unlabeled_dataset(get_cfg(overrides={"imgsz": 64}), listed, {"names": NAMES, "nc": 3}, 4, 32)
    torch.manual_seed(7)
    labeled = ultralytics_loader(dataset, batch=4, workers=0, shuffle=True, rank=-1)
    state = torch.get_rng_state()
    unlabeled = build_dataloader(dataset, 4, 0, -1, "cpu")
    assert torch.equal(torch.get_rng_state(), state) and torch.initial_seed() == 7
    assert unlabeled.generator.initial_seed() != labeled.generator.initial_seed()  # it seeds shuffle and workers


def test_each_pass_of_the_unlabeled_loader_has_its_own_order_under_ddp():
    """A DistributedSampler shuffles by the epoch it is told; told none, every pass would repeat the first order."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, DistributedSampler

    from detkd.engine.trainer import DetkdTrainer

    sampler = DistributedSampler(list(range(32)), num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(list(range(32)), batch_size=16, sampler=sampler)
    trainer = SimpleNamespace(unlabeled_loader=loader, _unlabeled_batches=None, _unlabeled_passes=4)  # a resumed run's
    passes = [DetkdTrainer._next_unlabeled(trainer).tolist() for _ in range(3)]  # 16 of 32 on rank 0: a batch a pass
    assert sampler.epoch == 6 and trainer._unlabeled_passes == 7
    assert len({tuple(p) for p in passes}) == 3


def test_a_two_stage_teachers_detections_become_pseudo_boxes_in_student_classes():
    """A torchvision teacher has no dense head: its own final detections are the pseudo-boxes, its class-logit
    columns (1 ... K) mapped to the student's classes by name."""
    from test_torchvision_teacher import _frcnn

    from detkd.adapters import TorchvisionAdapter
    from detkd.engine.criterion import teacher_detections

    student = _model("yolov8n.yaml", 0).train()
    teacher = TorchvisionAdapter(_frcnn(seed=3), {1: "bus", 2: "car", 3: "truck"})  # another order than the student's
    s = UltralyticsAdapter(student)
    cfg = DistillConfig(feature=[FeatureLossConfig(loss="fitnet", levels=[0])])
    unlabeled = UnlabeledConfig(source=["unused"], pseudo=PseudoConfig(conf=0.01))
    criterion = DistillationCriterion(student.init_criterion(), s, teacher, Distiller(cfg, s, teacher), unlabeled)
    try:
        batch = _batch(2, labeled=0)
        found = teacher_detections(teacher, teacher(batch["img"]), batch["img"], 0.01)
        own = teacher.detections(batch["img"])
        assert [len(d["boxes"]) for d in found] == [int((d["scores"] >= 0.01).sum()) for d in own]
        assert sum(len(d["boxes"]) for d in found) > 0
        batch_idx, cls, xywh = criterion.pseudo_boxes(teacher(batch["img"]), batch["img"], 0.01)
        expected = torch.cat([d["labels"] for d in found])  # bus=1 -> 2, car=2 -> 0, truck=3 -> 1
        assert cls.view(-1).tolist() == [{1: 2, 2: 0, 3: 1}[int(c)] for c in expected]
        assert batch_idx.tolist() == [float(i) for i, d in enumerate(found) for _ in d["boxes"]]
        assert ((xywh >= 0) & (xywh <= 1)).all()
        loss, items = criterion(student(batch["img"]), batch)
        assert loss[:3].abs().sum() == 0 and items["pseudo_u"] > 0 and items["kd_fitnet_u"] > 0
    finally:
        criterion.remove()
