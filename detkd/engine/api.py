"""``detkd.engine.distill``: one call from a recipe to a trained student checkpoint; ``detkd.engine.resume``
continues a killed run."""

from __future__ import annotations

import os
from pathlib import Path

from detkd.config import RECIPE_KEYS, Recipe, check_training_keys, load_recipe
from detkd.errors import DetkdError


def distill(recipe: Recipe | str | os.PathLike | None = None, **overrides) -> Path:
    """Train ``recipe.student`` on ``recipe.data`` with transfer and/or distillation; returns ``best.pt``.

    ``recipe`` is a recipe file, a :class:`~detkd.config.Recipe` or ``None`` (the defaults). ``overrides`` are
    recipe keys (``teacher=``, ``distill=``) or Ultralytics training keys (``epochs=3``, ``imgsz=160``,
    ``project=``, ``name=`` ...), merged by one rule whatever the recipe is (deeply: see
    :func:`~detkd.config.load_recipe`). ``resume=RUN_DIR`` continues a killed run instead (:func:`resume`). The
    teacher and the data set are checked before any model is built; broken data is refused with its report.
    """
    if run := overrides.pop("resume", None):
        if recipe is not None:
            raise DetkdError(f"resume={run}: a resumed run keeps its saved recipe; give no recipe ({recipe}) with it")
        return resume(run, **overrides)
    recipe = load_recipe(recipe, overrides)
    if not recipe.data:
        raise DetkdError("recipe: 'data' is not set (give data=path/to/data.yaml)")
    if recipe.distills and not recipe.teacher:
        raise DetkdError("recipe: 'teacher' is not set (give teacher=path/to/teacher.pt)")
    if recipe.teacher and not recipe.distills:
        raise DetkdError("recipe: a teacher is set but 'distill' has no loss with a weight > 0")
    if not recipe.teacher and not recipe.init.source:
        raise DetkdError("recipe: nothing to do beyond plain training (set a teacher, or init.source to transfer)")

    from detkd.adapters import teacher_family
    from detkd.data import check_dataset
    from detkd.engine.trainer import trainer_for
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.safe_load import trust_checkpoints

    if recipe.teacher:
        teacher_family(recipe.teacher)  # a missing file or an unknown kind fails here, before any model is built
    if recipe.init.source and not Path(recipe.init.source).is_file():
        raise DetkdError(f"{recipe.init.source}: init.source checkpoint not found (detkd never downloads weights)")
    check_dataset(recipe.data).raise_if_errors()
    with trust_checkpoints(recipe.trust_checkpoints):
        if Path(recipe.student).suffix in {".yaml", ".yml"}:
            from ultralytics import YOLO

            model = YOLO(recipe.student)
        else:
            model = load_yolo_checkpoint(recipe.student)
        model.train(trainer=trainer_for(recipe), data=str(recipe.data), **recipe.train)
    return Path(model.trainer.best)


def resume(run: str | os.PathLike, **overrides) -> Path:
    """Continue a killed run (its folder, or its ``weights/last.pt``) with the recipe and distiller state saved
    beside it.

    A resumed run keeps its saved recipe (``distill.yaml``): recipe keys (``teacher=``, ``distill=`` ...) are
    refused. Ultralytics training keys are checked, then handed to Ultralytics' resume, which applies the ones it
    allows on resume (``device``, ``batch``, ``workers``, ``imgsz``, ``plots`` ...: to continue on another device or
    in less memory) and warns that it ignores the others (``epochs``, ``lr0`` ...).
    """
    if not isinstance(run, (str, os.PathLike)):
        raise DetkdError(f"resume={run!r}: give the run folder (or its weights/last.pt) to resume")
    if given := sorted(k for k in overrides if k in RECIPE_KEYS):
        raise DetkdError(
            f"resume={run}: a resumed run keeps its saved recipe (distill.yaml); given: {', '.join(given)} "
            "(start a new run to change them)"
        )
    check_training_keys(overrides, f"resume={run}")
    from detkd.engine.trainer import trainer_for
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.safe_load import trust_checkpoints

    last = Path(run)
    if last.is_dir():  # the run folder
        last = last / "weights" / "last.pt"
    recipe_file = last.parent.parent / "distill.yaml"
    if not recipe_file.is_file():
        raise DetkdError(f"{recipe_file}: no distillation recipe beside {last} (not a detkd run, or not started)")
    recipe = load_recipe(recipe_file)
    with trust_checkpoints(recipe.trust_checkpoints):
        model = load_yolo_checkpoint(last)
        model.train(trainer=trainer_for(recipe), resume=str(last), **overrides)
    return Path(model.trainer.best)
