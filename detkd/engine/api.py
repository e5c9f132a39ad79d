"""``detkd.engine.distill``: one call from a recipe to a trained student checkpoint; ``detkd.engine.resume``
continues a killed run."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from detkd.config import INIT_FROM_TEACHER, RECIPE_KEYS, InitConfig, Recipe, check_training_keys, load_recipe
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
    if recipe.teacher_weights and not recipe.teacher:
        raise DetkdError("recipe: 'teacher_weights' is set without a 'teacher' (give teacher=torchvision:ARCH)")
    if recipe.teacher and not recipe.distills and recipe.init.source != INIT_FROM_TEACHER:
        raise DetkdError("recipe: a teacher is set but 'distill' has no loss with a weight > 0")
    if recipe.init.source == INIT_FROM_TEACHER and not recipe.teacher:
        raise DetkdError("recipe: 'init.source: teacher' starts the student from the teacher's weights: set 'teacher'")
    if recipe.unlabeled and not recipe.teacher:
        raise DetkdError("recipe: unlabeled images learn only from a teacher: set 'teacher' and 'distill' terms")
    if not recipe.teacher and not recipe.init.source:
        raise DetkdError("recipe: nothing to do beyond plain training (set a teacher, or init.source to transfer)")
    if recipe.chain:
        if not recipe.teacher:
            raise DetkdError("recipe: a 'chain' of teacher assistants needs a 'teacher' to start from")
        return _distill_chain(recipe)

    from detkd.data import check_dataset
    from detkd.engine.trainer import trainer_for
    from detkd.evaluation import load_yolo_checkpoint
    from detkd.safe_load import trust_checkpoints

    recipe = resolve_teacher(recipe)  # a bad teacher or init source fails here, before any model is built
    if not recipe.distills and not recipe.init.source:  # an optional init was dropped, and nothing else is asked
        raise DetkdError(
            "recipe: nothing to do beyond plain training: 'distill' has no loss with a weight > 0 and the optional "
            "init was dropped (see the line above)"
        )
    check_dataset(recipe.data).raise_if_errors()
    frames = None
    if recipe.unlabeled:  # unreadable files are named and skipped; videos are sampled into their cache here
        from detkd.data.frames import collect_frames

        u = recipe.unlabeled
        frames = collect_frames(u.source, u.every, u.dedupe, u.cache)
    with trust_checkpoints(recipe.trust_checkpoints):
        if Path(recipe.student).suffix in {".yaml", ".yml"}:
            from ultralytics import YOLO

            model = YOLO(recipe.student)
        else:
            model = load_yolo_checkpoint(recipe.student)
        model.train(trainer=trainer_for(recipe, frames), data=str(recipe.data), **recipe.train)
    return Path(model.trainer.best)


def resolve_teacher(recipe: Recipe) -> Recipe:
    """The recipe with its teacher checked and its ``init`` resolved (:func:`_resolve_init`), as training will use
    it: also what :mod:`detkd.diagnose` measures."""
    from detkd.adapters import check_teacher

    if recipe.teacher:
        check_teacher(recipe.teacher, recipe.teacher_weights)
    return _resolve_init(recipe)


def _resolve_init(recipe: Recipe) -> Recipe:
    """Check that ``init`` can give the student weights, before training: a dry run of the transfer
    (:func:`detkd.transfer.transfer_problem`). ``init.source: teacher`` selects them from the teacher's, which needs a
    YOLO checkpoint of the student's family. When the source cannot give them, an ``optional`` init (the recommended
    recipe's, so that it serves any teacher) is dropped with one line saying why, and the student starts as it would
    without it; else the reason is the error. An optional init also leaves a student checkpoint's own weights alone:
    they were given, and are not overwritten unasked."""
    from ultralytics.utils import LOGGER

    from detkd.adapters.ultralytics import is_ultralytics_checkpoint
    from detkd.safe_load import trust_checkpoints
    from detkd.transfer import transfer_problem

    source, student, optional = recipe.init_checkpoint, recipe.student, recipe.init.optional
    from_teacher = recipe.init.source == INIT_FROM_TEACHER
    if not source:
        return recipe
    if from_teacher and not (Path(source).is_file() and is_ultralytics_checkpoint(source)):
        reason = f"{source} is not an Ultralytics checkpoint (weight selection needs a YOLO of the student's family)"
    elif not Path(source).is_file():
        reason = f"{source}: init.source checkpoint not found (detkd never downloads weights)"
    elif optional and Path(student).suffix not in {".yaml", ".yml"}:
        reason = f"the student {student} brings weights of its own, which are kept (init.optional=false replaces them)"
    else:
        with trust_checkpoints(recipe.trust_checkpoints):
            reason = transfer_problem(source, student, recipe.init.kind)
    if reason is None:
        return recipe
    if not optional:
        raise DetkdError(
            f"recipe: 'init.source: teacher' cannot give the student weights: {reason}" if from_teacher else reason
        )
    LOGGER.warning(f"detkd: the student starts without transferred weights (init.optional): {reason}")
    return replace(recipe, init=InitConfig())


def _distill_chain(recipe: Recipe) -> Path:
    """Teacher assistants (Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI 2020): when
    the teacher is much larger than the student, models of intermediate size bridge the gap. Each model of
    ``recipe.chain`` is distilled from the one before it (the first from the teacher) with the recipe's
    distillation, transfer and budget, in a run named ``<name>_assistant<i>``; then the student from the last.
    A stage that finished with the same recipe is reused and a killed one resumed, so a cut chain continues."""
    from ultralytics.cfg import get_cfg, get_save_dir

    teacher, name = recipe.teacher, recipe.train.get("name") or "chain"
    for i, assistant in enumerate(recipe.chain, 1):
        train = {**recipe.train, "name": f"{name}_assistant{i}", "exist_ok": True}
        # resolved first, as distill() will: the stage's saved recipe is the resolved one
        stage = resolve_teacher(replace(recipe, chain=[], student=assistant, teacher=teacher, train=train))
        recipe = replace(recipe, teacher_weights=None)  # the next stages learn from an assistant's checkpoint
        run = get_save_dir(get_cfg(overrides={**train, "task": "detect", "mode": "train"}))
        state = _stage_state(run, stage)
        if state is None:
            shutil.rmtree(run, ignore_errors=True)  # another recipe's run: nothing of it may be resumed
        teacher = str(run / "weights" / "best.pt" if state == "done" else resume(run) if state else distill(stage))
    return distill(replace(recipe, chain=[], teacher=teacher))


def _stage_state(run: Path, stage: Recipe) -> str | None:
    """``done`` when ``run`` finished ``stage`` (same recipe, training ended), ``cut`` when it was killed after an
    epoch, None when it has not run with this recipe."""
    from detkd.ultralytics_internals import training_finished

    saved, last = run / "distill.yaml", run / "weights" / "last.pt"
    if not saved.is_file() or not last.is_file() or load_recipe(saved).to_dict() != stage.to_dict():
        return None
    return "done" if training_finished(last) else "cut"


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
