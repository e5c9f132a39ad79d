"""The one module that touches Ultralytics internals: its version check, and that it sits low in detkd."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detkd import ultralytics_internals as internals

# Replaces Ultralytics' version, imports the seam and prepares Ultralytics (printing which detkd modules that loaded),
# then imports further users of the seam and prepares again: the warning must still come once.
IMPORT_WITH_VERSION = textwrap.dedent(
    """
    import json, sys
    import ultralytics
    ultralytics.__version__ = sys.argv[1]
    import detkd.ultralytics_internals as internals
    internals.ultralytics_offline()
    print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.startswith("detkd"))))
    import detkd.transfer, detkd.evaluation, detkd.engine.trainer
    internals.ultralytics_offline()
    """
)


@pytest.fixture(scope="module")
def imported_with_version():
    """``{version: finished process}`` for a version outside the supported range and one inside it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for version in ("8.5.0", "8.4.3"):
        command = [sys.executable, "-c", IMPORT_WITH_VERSION, version]
        runs[version] = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert runs[version].returncode == 0, runs[version].stderr[-3000:]
    return runs


@pytest.mark.parametrize("version", ["8.4.0", "8.4.190", "8.4.999"])
def test_supported_versions_do_not_warn(version):
    assert internals.version_warning(version) is None


@pytest.mark.parametrize("version", ["8.5.0", "8.3.240", "9.0.0", "8.10.1"])
def test_other_versions_warn_naming_the_version_and_the_tested_range(version):
    message = internals.version_warning(version)
    assert f"Ultralytics {version} is installed" in message
    assert ">=8.4.0,<8.5" in message and "tested with 8.4.190" in message and "\n" not in message


def test_the_check_reads_the_installed_version(monkeypatch, caplog):
    import ultralytics

    monkeypatch.setattr(ultralytics, "__version__", "8.5.2")
    with caplog.at_level(logging.WARNING, logger="detkd"):
        internals.check_ultralytics_version()
    assert [r.getMessage() for r in caplog.records] == [internals.version_warning("8.5.2")]
    caplog.clear()
    monkeypatch.setattr(ultralytics, "__version__", internals.TESTED_VERSION)
    internals.check_ultralytics_version()
    assert caplog.records == []


def test_importing_warns_once_outside_the_range_and_never_inside(imported_with_version):
    assert imported_with_version["8.5.0"].stderr.count("detkd: warning: Ultralytics 8.5.0 is installed") == 1
    assert "detkd: warning" not in imported_with_version["8.4.3"].stderr


def test_the_seam_sits_low(imported_with_version):
    """Importing it and preparing Ultralytics loads nothing of detkd above runtime, errors, utils and safe_load."""
    line = next(x for x in imported_with_version["8.4.3"].stdout.splitlines() if x.startswith("MODULES "))
    assert set(json.loads(line[len("MODULES ") :])) == {
        "detkd",
        "detkd.errors",
        "detkd.runtime",
        "detkd.safe_load",
        "detkd.ultralytics_internals",
        "detkd.utils",
    }


def test_every_binding_of_ultralytics_torch_load_is_detkds():
    internals.ultralytics_offline()
    bound = {
        name: module.torch_load
        for name, module in sys.modules.items()
        if name.startswith("ultralytics") and hasattr(module, "torch_load")
    }
    assert {"ultralytics.utils.patches", "ultralytics.nn.tasks", "ultralytics.utils.torch_utils"} <= set(bound)
    assert {f.__module__ for f in bound.values()} == {"detkd.ultralytics_internals"}


def test_the_trainer_overrides_no_private_ultralytics_method():
    """The trainer extends Ultralytics through public hooks; a private override would break silently on a release."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from detkd.engine.trainer import DetkdTrainer

    private = [n for n in vars(DetkdTrainer) if n.startswith("_") and not n.startswith("__")]
    assert [n for n in private if hasattr(DetectionTrainer, n)] == []
