"""The README's main job runs end to end (with a one-epoch budget) and prints the three-model COCO table."""

import json
import subprocess
import sys


def test_quickstart_smoke(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "detkd.cli",
            "quickstart",
            "--dir",
            str(tmp_path / "qs"),
            "--epochs",
            "1",
            "--train",
            "32",
            "--val",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert set(results) == {"teacher", "student_alone", "student_distilled"}
    assert all(0.0 <= r["AP"] <= 1.0 for r in results.values())
    table = proc.stdout[proc.stdout.index("metric") :]
    assert all(name in table.splitlines()[0] for name in results) and "AR100" in table
    assert (tmp_path / "qs" / "student_distilled" / "distill.yaml").is_file()
