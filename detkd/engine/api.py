"""``detkd.distill``: one call from a recipe to a trained student checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from detkd.config import Recipe, load_recipe
from detkd.errors import DetkdError


def distill(recipe: Recipe | str | os.PathLike | None = None, **overrides) -> Path:
    """Train ``recipe.student`` with ``recipe.teacher`` on ``recipe.data``; returns the path of ``best.pt``.

    ``overrides`` are recipe keys (``teacher=``, ``distill=``) or Ultralytics training keys (``epochs=3``,
    ``imgsz=160``, ``project=``, ``name=`` ...). The data set is checked first and refused with its report.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        recipe = load_recipe(None, {**recipe.to_dict(), **overrides})
    if not recipe.teacher:
        raise DetkdError("recipe: 'teacher' is not set (give teacher=path/to/teacher.pt)")
    if not recipe.data:
        raise DetkdError("recipe: 'data' is not set (give data=path/to/data.yaml)")

    from detkd.data import check_dataset
    from detkd.engine.trainer import trainer_for
    from detkd.evaluation import load_yolo_checkpoint

    if not Path(recipe.teacher).is_file():
        raise DetkdError(f"{recipe.teacher}: teacher checkpoint not found (detkd never downloads weights)")
    check_dataset(recipe.data).raise_if_errors()
    if Path(recipe.student).suffix in {".yaml", ".yml"}:
        from ultralytics import YOLO

        model = YOLO(recipe.student)
    else:
        model = load_yolo_checkpoint(recipe.student)
    model.train(trainer=trainer_for(recipe), data=str(recipe.data), **recipe.train)
    return Path(model.trainer.best)
