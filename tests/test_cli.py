"""The ``detkd`` command's exit status and error line, run as a user runs it: a fresh process, another folder.

0 on success, 1 for ``data check`` with errors, 2 for bad input, which is one line on stderr and no traceback.
"""

from __future__ import annotations

import pytest


def _one_error_line(proc) -> str:
    """The single ``detkd: error: ...`` line of a refused command (no traceback, nothing else)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("detkd: error: "), proc.stderr[-2000:]
    return lines[0][len("detkd: error: ") :]


def test_data_check_exits_0_on_clean_data_and_1_on_errors(run_detkd, yolo_yaml):
    clean = run_detkd("data", "check", yolo_yaml)
    assert clean.returncode == 0, clean.stderr
    assert f"{yolo_yaml}: OK" in clean.stdout

    (yolo_yaml.parent / "labels" / "train" / "t1.txt").write_text("7 0.5 0.5 0.2 0.2\n")  # class 7 of 2 names
    broken = run_detkd("data", "check", yolo_yaml)
    assert broken.returncode == 1, broken.stderr
    assert "t1.txt" in broken.stdout and "Traceback" not in broken.stdout + broken.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "nope.yaml", "teacher=t.pt"], "nope.yaml: recipe not found (built-in recipes: frcnn, recommended, "),
        (["train", "recomended"], "recomended: neither a recipe file nor a built-in recipe (built-in recipes: "),
        (["benchmark", "--profile", "nope"], "nope: neither a benchmark profile file nor a built-in benchmark "),
        (["data", "check", "missing.yaml"], "missing.yaml"),
    ],
    ids=["recipe-path", "recipe-name", "profile-name", "data-path"],
)
def test_bad_input_exits_2_with_one_line(run_detkd, args, message):
    assert _one_error_line(run_detkd(*args)).startswith(message)


def test_a_built_in_recipe_is_found_by_name(run_detkd):
    """``recommended`` is found from any folder: the command gets as far as asking for the data."""
    assert "'data' is not set" in _one_error_line(run_detkd("train", "recommended", "teacher=t.pt"))
