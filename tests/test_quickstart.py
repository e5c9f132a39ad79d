"""The README's main job runs end to end (with a one-epoch budget) and prints the three-model COCO table."""

import csv
import json
import math

from detkd.evaluation import COCO_METRICS

MODELS = ["teacher", "student_alone", "student_distilled"]


def test_quickstart_smoke(run_detkd, tmp_path):
    proc = run_detkd(
        "quickstart", "--dir", tmp_path / "qs", "--epochs", "1", "--train", "32", "--val", "16", timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the printed table: one column per model, the 12 COCO numbers each, finite, the ones saved in results.json
    lines = proc.stdout[proc.stdout.index("\nmetric") + 1 :].splitlines()
    assert lines[0].split() == ["metric", *MODELS]
    printed = {row.split()[0]: [float(v) for v in row.split()[-3:]] for row in lines[1 : 1 + len(COCO_METRICS)]}
    assert list(printed) == list(COCO_METRICS)
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert list(results) == MODELS
    for i, model in enumerate(MODELS):
        assert all(math.isfinite(printed[k][i]) and printed[k][i] == round(results[model][k], 4) for k in COCO_METRICS)
        assert 0.0 <= results[model]["AP"] <= 1.0

    # the distilled student really distilled: its distillation terms were logged, finite, every epoch
    assert (tmp_path / "qs" / "student_distilled" / "distill.yaml").is_file()
    with open(tmp_path / "qs" / "student_distilled" / "results.csv", newline="") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    assert len(rows) == 1 and all(math.isfinite(float(rows[0][f"train/kd_{t}"])) for t in ("cls", "box"))
    assert float(rows[0]["train/kd_cls"]) > 0
