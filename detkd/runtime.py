"""Make Ultralytics offline, silent and multi-threaded before anything imports it.

Ultralytics reads its switches from the environment once, at import: ``YOLO_OFFLINE`` (no DNS probe, telemetry
or update checks), ``YOLO_AUTOINSTALL`` (no ``pip install`` behind the user's back) and ``YOLO_CONFIG_DIR``
(where ``settings.json`` and fonts live). ``detkd/__init__.py`` calls :func:`set_environment` so that every import
of detkd sets them first; :func:`ultralytics_offline` then patches what is left once Ultralytics is imported
(the font download, the settings that enable hub sync and logger integrations, the 1-thread CPU default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

from detkd.utils import atomic_write

# Integrations Ultralytics enables from settings.json; each may open connections of its own.
_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


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


def set_environment() -> None:
    """Set Ultralytics' import-time switches. Cheap: imports nothing. A value the user set is kept."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir()))
    # Ultralytics sets OMP_NUM_THREADS=1 on import when unset; torch reads it once at start-up.
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads()))


def _install_fonts(ultralytics_dir: Path) -> None:
    """Put a font where ``check_font`` looks first, so plotting never tries to download Arial.

    Matplotlib (an Ultralytics dependency) ships DejaVu Sans; it covers the glyphs Ultralytics draws.
    """
    from matplotlib import font_manager

    source = Path(font_manager.findfont("DejaVu Sans", fallback_to_default=True))
    for name in _FONTS:
        target = ultralytics_dir / name
        if not target.exists() and source.exists():
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


_done = False


def ultralytics_offline() -> None:
    """Import Ultralytics with detkd's settings; idempotent. Call before any Ultralytics work."""
    global _done
    if _done:
        return
    already_imported = "ultralytics" in sys.modules
    set_environment()
    import torch
    import ultralytics.utils as uu
    import ultralytics.utils.checks as checks
    import ultralytics.utils.torch_utils as tu

    if already_imported:  # the user imported it first: the environment came too late, patch the constants
        uu.ONLINE = checks.ONLINE = False
        uu.AUTOINSTALL = checks.AUTOINSTALL = False
        import ultralytics.utils.events as events

        events.ONLINE = False
    uu.SETTINGS.update({"sync": False, **{k: False for k in _INTEGRATIONS}})
    _install_fonts(uu.USER_CONFIG_DIR)

    # Ultralytics trains on min(8, cores - 1) threads: one thread on a 2-core machine. OMP_NUM_THREADS (set above
    # to every core unless given) wins, so runs side by side can share the cores (detkd benchmark --parallel).
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    tu.NUM_THREADS = threads
    _done = True


@contextlib.contextmanager
def quiet_ultralytics():
    """Ultralytics' info lines (model summaries, data-set scans) off inside the block, warnings kept: for commands
    whose own report is the output (``detkd diagnose``), not a training log."""
    ultralytics_offline()
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
