"""``detkd.distill``: one call from a recipe to a trained student checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from detkd.config import Recipe, load_recipe
from detkd.errors import DetkdError


def distill(recipe: Recipe | str | os.PathLike | None = None, **overrides) -> Path:
    """Train ``recipe.student`` on ``recipe.data`` with transfer and/or distillation; returns ``best.pt``.

    ``overrides`` are recipe keys (``teacher=``, ``distill=``) or Ultralytics training keys (``epochs=3``,
    ``imgsz=160``, ``project=``, ``name=`` ...). The data set is checked first and refused with its report.
    """
    if overrides.get("resume"):
        return resume(overrides["resume"])
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        recipe = load_recipe(None, {**recipe.to_dict(), **overrides})
    if not recipe.data:
        raise DetkdError("recipe: 'data' is not set (give data=path/to/data.yaml)")
    if recipe.distills and not recipe.teacher:
        raise DetkdError("recipe: 'teacher' is not set (give teacher=path/to/teacher.pt)")
    if recipe.teacher and not recipe.distills:
        raise DetkdError("recipe: a teacher is set but 'distill' has no loss with a weight > 0")
    if not recipe.teacher and not recipe.init.source:
        raise DetkdError("recipe: nothing to do beyond plain training (set a teacher, or init.source to transfer)")

    from detkd.data import check_dataset
    from detkd.engine.trainer import trainer_for
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.safe_load import trust_checkpoints

    for role, path in (("teacher", recipe.teacher), ("init.source", recipe.init.source)):
        if path and not Path(path).is_file():
            raise DetkdError(f"{path}: {role} checkpoint not found (detkd never downloads weights)")
    check_dataset(recipe.data).raise_if_errors()
    with trust_checkpoints(recipe.trust_checkpoints):
        if Path(recipe.student).suffix in {".yaml", ".yml"}:
            from ultralytics import YOLO

            model = YOLO(recipe.student)
        else:
            model = load_yolo_checkpoint(recipe.student)
        model.train(trainer=trainer_for(recipe), data=str(recipe.data), **recipe.train)
    return Path(model.trainer.best)


def resume(last: str | os.PathLike) -> Path:
    """Continue a killed run from its ``last.pt``, with the recipe and distiller state saved beside it."""
    from detkd.engine.trainer import trainer_for
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.safe_load import trust_checkpoints

    last = Path(last)
    if last.is_dir():  # the run folder
        last = last / "weights" / "last.pt"
    recipe_file = last.parent.parent / "distill.yaml"
    if not recipe_file.is_file():
        raise DetkdError(f"{recipe_file}: no distillation recipe beside {last} (not a detkd run, or not started)")
    recipe = load_recipe(recipe_file)
    with trust_checkpoints(recipe.trust_checkpoints):
        model = load_yolo_checkpoint(last)
        model.train(trainer=trainer_for(recipe), resume=str(last))
    return Path(model.trainer.best)
