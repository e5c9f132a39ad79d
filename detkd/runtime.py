"""The process environment detkd runs in, set before anything imports Ultralytics.

Ultralytics reads its switches from the environment once, at import: ``YOLO_OFFLINE`` (no DNS probe, telemetry
or update checks), ``YOLO_AUTOINSTALL`` (no ``pip install`` behind the user's back) and ``YOLO_CONFIG_DIR``
(where ``settings.json`` and fonts live), and logs a first-run notice when that dir has no settings yet (filtered
here: see ``FIRST_RUN_NOTICE``). ``detkd/__init__.py`` calls :func:`set_environment` so that every import of detkd
sets them first; :func:`detkd.ultralytics_internals.ultralytics_offline` then patches what is left once
Ultralytics is imported (the font download, the settings that enable hub sync and logger integrations, the
1-thread CPU default, checkpoint loading).

The OpenVINO export (Ultralytics runs OpenVINO's converter, and NNCF for int8) is kept offline here too: both send
usage events to Google Analytics unless the user opted out, from a child process, and count runs in ``~/intel``;
both fall back to their no-op stubs when ``openvino_telemetry`` cannot be imported, which
:func:`set_environment` arranges.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# What Ultralytics logs the first time it is imported with a config dir that has no settings.json yet (detkd's own, on
# a fresh machine), pointing at `yolo settings`: a command that reads the user's config dir, not detkd's.
FIRST_RUN_NOTICE = "Creating new Ultralytics Settings"


def config_dir() -> Path:
    """detkd's own Ultralytics config dir, so a user's ``~/.config/Ultralytics`` is never touched.

    ``YOLO_CONFIG_DIR`` set by the user wins; else ``DETKD_HOME``; else ``$XDG_CONFIG_HOME/detkd``.
    """
    if env := os.environ.get("YOLO_CONFIG_DIR"):
        return Path(env).expanduser()
    if env := os.environ.get("DETKD_HOME"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "detkd"


def cpu_threads() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The threads detkd gives torch (and the runtime of an export): ``OMP_NUM_THREADS`` when set (so that runs side
    by side can share the cores), else every core (:func:`cpu_threads`)."""
    return int(os.environ.get("OMP_NUM_THREADS") or cpu_threads())


def set_environment() -> None:
    """Set Ultralytics' import-time switches, and keep its first-run notice quiet. Cheap: imports nothing. A value
    the user set is kept."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir()))
    # Ultralytics sets OMP_NUM_THREADS=1 on import when unset; torch reads it once at start-up.
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads()))
    # ``import openvino_telemetry`` raises ImportError from now on (a module set to None in sys.modules), so
    # OpenVINO's converter and NNCF send nothing; a process that imported it before detkd keeps it
    sys.modules.setdefault("openvino_telemetry", None)
    # the filter has to be on Ultralytics' logger before the import that logs the notice; adding it twice is a no-op
    logging.getLogger("ultralytics").addFilter(_drop_first_run_notice)


def _drop_first_run_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(FIRST_RUN_NOTICE)
