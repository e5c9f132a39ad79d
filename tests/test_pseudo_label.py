"""``detkd pseudo-label``: a teacher's detections on frames become a YOLO data set that ``detkd data check`` passes."""

import json
from pathlib import Path

import cv2
from test_unlabeled import _scenes, write_video

from detkd.evaluation import checkpoint_detections
from detkd.pseudo_label import REPORT


def test_pseudo_labels_are_a_data_set_that_passes_the_check(run_detkd, teacher_checkpoint, tmp_path):
    folder = tmp_path / "footage"
    folder.mkdir()
    for i, scene in enumerate(_scenes(3, seed=3)):
        cv2.imwrite(str(folder / f"f{i}.png"), scene)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n")
    write_video(tmp_path / "clip.avi", _scenes(2, seed=4), repeats=3)  # 6 frames, 2 distinct

    # an untrained teacher scores ~1e-3: a low threshold turns its best guesses into boxes
    args = ["--teacher", teacher_checkpoint, "--source", "footage", "clip.avi", "--out", "pl", "--imgsz", "64"]
    done = run_detkd("pseudo-label", *args, "--conf", "0.001", "--every", "1")
    assert done.returncode == 0, done.stderr
    assert "broken.png" in done.stdout and "1 unreadable (skipped)" in done.stdout
    assert "6 read, 2 taken, 4 skipped as near-duplicates" in done.stdout

    out = tmp_path / "pl"
    report = json.loads((out / REPORT).read_text())
    labels = sorted((out / "labels").glob("*.txt"))
    lines = [line.split() for f in labels for line in f.read_text().splitlines()]
    assert report["images"] == len(labels) == len(list((out / "images").glob("*"))) == 3 + 2
    assert sum(report["boxes"].values()) == len(lines) > 0
    assert {n: sum(h) for n, h in report["score_histograms"].items()} == report["boxes"]
    assert all(0 <= float(v) <= 1 for line in lines for v in line[1:])
    assert (out / "scores.png").stat().st_size > 0
    assert [o["image"] for o in report["origins"]] == [f"images/{p.name}" for p in sorted((out / "images").iterdir())]

    check = run_detkd("data", "check", "pl/data.yaml")
    assert check.returncode == 0 and ": OK" in check.stdout, check.stdout

    # --conf drops what scores below it: this untrained teacher's scores are all near 1e-3
    images = [str(p) for p in sorted((out / "images").iterdir())]
    scores = [s for d in checkpoint_detections(teacher_checkpoint, images, imgsz=64)[1] for s in d.scores.tolist()]
    assert len(scores) == len(lines) and max(scores) < 0.01
    high = run_detkd("pseudo-label", *args[:5], "--out", "pl_high", "--imgsz", "64", "--every", "1", "--conf", "0.01")
    assert high.returncode == 0, high.stderr
    kept = json.loads((tmp_path / "pl_high" / REPORT).read_text())
    assert sum(kept["boxes"].values()) == 0 and kept["empty_images"] == kept["images"] == 5

    again = run_detkd("pseudo-label", *args)  # never over a previous set
    assert (
        again.returncode == 2
        and again.stderr.strip() == "detkd: error: pl: not empty (pseudo-labels go into a new or empty folder)"
    )


def test_a_missing_teacher_is_one_line_before_any_frame_is_read(run_detkd, tmp_path):
    done = run_detkd("pseudo-label", "--teacher", "t.pt", "--source", "nowhere", "--out", "pl")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("detkd: error: t.pt: teacher checkpoint not found")
    assert not Path(tmp_path / "pl").exists()
