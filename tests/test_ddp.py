"""Multi-GPU (DDP) readiness without GPUs: the rank launch Ultralytics generates, and detkd's gradient reduction on
two CPU (gloo) processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import detkd_env
from torch import nn

from detkd.adapters.ultralytics import UltralyticsAdapter
from detkd.config import BoxLossConfig, DistillConfig, FeatureLossConfig, LogitLossConfig, load_recipe
from detkd.distiller import Distiller
from detkd.engine import ddp
from detkd.engine.criterion import DistillationCriterion
from detkd.engine.trainer import DetkdTrainer, trainer_for
from detkd.errors import DetkdError

TRAIN = {"epochs": 1, "imgsz": 64, "batch": 4, "workers": 0, "plots": False, "exist_ok": True}


def test_the_rank_script_ultralytics_generates_builds_the_trainer_with_its_recipe(
    synth_data, teacher_checkpoint, tmp_path
):
    """``trainer.train()`` of a multi-GPU run: Ultralytics writes a script, starts it with torch.distributed.run, and
    the rank process builds the trainer from what the script carries. The rank records its set-up and stops there."""
    features = [{"loss": "cwd"}]  # a term with learned connectors, on top of the recommended soft targets and LD
    recipe = load_recipe(
        "recommended", {"teacher": str(teacher_checkpoint), "data": str(synth_data), "distill": {"feature": features}}
    )
    overrides = {"model": "yolov8n.yaml", "data": str(synth_data), "project": str(tmp_path), "name": "ddp", **TRAIN}
    trainer = trainer_for(recipe)(overrides=overrides)
    record = tmp_path / "rank.json"

    def record_and_stop(rank_trainer):  # pickled into the script: runs in the rank process, once set up
        record.write_text(
            json.dumps(
                {
                    "classes": [c.__name__ for c in type(rank_trainer).__mro__],
                    "recipe": rank_trainer.recipe.to_dict(),
                    "recipe_left_by_the_launcher": json.loads(os.environ[ddp.RECIPE_VARIABLE]),
                    "teacher_device": str(next(rank_trainer.teacher.model.parameters()).device),
                    "student_criterion": type(rank_trainer.model.criterion).__name__,
                    "distiller_parameters": sum(p.numel() for p in rank_trainer.distiller.parameters()),
                }
            )
        )
        raise SystemExit(0)

    trainer.add_callback("on_train_start", record_and_stop)
    # Ultralytics starts ranks only for several CUDA devices: this CPU trainer is made the launching process of a
    # one-rank run instead, so that the same launch runs (script, torch.distributed.run, a process built from what
    # the script carries); with one rank, Ultralytics then sets it up as a single-device run (no process group)
    trainer.ddp, trainer.world_size = True, 1
    trainer.train()
    rank = json.loads(record.read_text())
    assert "DetkdTrainer" in rank["classes"]
    assert rank["recipe"] == rank["recipe_left_by_the_launcher"] == recipe.to_dict()
    assert rank["teacher_device"] == "cpu" and rank["student_criterion"] == "DistillationCriterion"
    assert rank["distiller_parameters"] > 0
    assert ddp.RECIPE_VARIABLE not in os.environ  # the launch left no trace


def test_a_rank_that_imports_the_trainer_class_by_name_gets_the_recipe_from_its_launcher(
    synth_data, teacher_checkpoint, tmp_path
):
    """Ultralytics 8.4.0's rank script imports ``module.ClassName``: for detkd's per-recipe class that is the base
    ``DetkdTrainer``, without the recipe; it reads the one the launching process left in its environment."""
    recipe = load_recipe("recommended", {"teacher": str(teacher_checkpoint), "data": str(synth_data)})
    overrides = {"model": "yolov8n.yaml", "data": str(synth_data), "project": str(tmp_path), "name": "ddp", **TRAIN}
    trainer_class = trainer_for(recipe)
    script = f"""
import json
from {trainer_class.__module__} import {trainer_class.__name__} as Trainer
trainer = Trainer(overrides={overrides!r})
print("RECIPE", json.dumps(trainer.recipe.to_dict()))
"""
    with ddp.recipe_for_ranks(recipe):
        env = detkd_env()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RECIPE ")]
    assert lines, proc.stderr[-3000:]
    assert json.loads(lines[0][7:]) == recipe.to_dict()

    with pytest.raises(DetkdError, match=r"no recipe: make the trainer class with .*trainer_for\(recipe\)"):
        DetkdTrainer(overrides=overrides)  # neither bound nor left by a launcher


# --- gradients: two gloo ranks on the halves of a batch against one process on the whole batch -------------------

NAMES = {0: "car", 1: "truck", 2: "bus"}
# Every term here is a mean over images (FitNet and CWD over each image's C·H·W or C, soft targets and LD over each
# image's anchors, all images having as many): the criterion's total, term × batch size, is then a sum over images.
DISTILL = DistillConfig(
    feature=[FeatureLossConfig(loss="fitnet", connector="conv"), FeatureLossConfig(loss="cwd", connector="conv")],
    logit=LogitLossConfig(weight=1.0, locations="all"),
    box=BoxLossConfig(weight=1.0, locations="all"),
)


def _student_and_distiller(seed: int) -> tuple[nn.Module, Distiller]:
    """A yolov8n student whose loss is the distillation criterion, and its distiller; ``seed`` sets their weights."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(1000)  # the teacher is the same checkpoint on every rank
    teacher = _with_fixed_statistics(DetectionModel("yolov8s.yaml", nc=len(NAMES), verbose=False))
    teacher.requires_grad_(False)
    teacher.names = dict(NAMES)
    torch.manual_seed(seed)
    student = _with_fixed_statistics(DetectionModel("yolov8n.yaml", nc=len(NAMES), verbose=False)).train()
    # BN layers stay in eval mode: in training mode they normalise by the batch's statistics, and a half's are not
    # the whole batch's (DDP does not sync them either). Ultralytics' own loss divides by the batch's summed target
    # scores, not a mean over images, so its gains are 0: it still runs (its assigner, the criterion's path) but
    # adds nothing to compare
    student.names, student.args = dict(NAMES), get_cfg(overrides={"box": 0.0, "cls": 0.0, "dfl": 0.0})
    for m in student.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    s, t = UltralyticsAdapter(student), UltralyticsAdapter(teacher)
    distiller = Distiller(DISTILL, s, t)
    student.criterion = DistillationCriterion(student.init_criterion(), s, t, distiller)
    return student, distiller


def _with_fixed_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, BN statistics those of the whole batch, as a trained model's are of its data (with
    an untrained model's, mean 0 and variance 1, the activations fade out and every image looks the same)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average: one batch sets them
    with torch.no_grad():
        model.train()(_batch()["img"])
    return model.eval()


def _batch(rank: int = 0, world: int = 1) -> dict:
    """Four 64-px images with five boxes (Ultralytics' batch layout), or the ``rank``-th of ``world`` equal parts."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(4, 3, 64, 64, generator=g)
    idx = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    cls = torch.tensor([[0.0], [1.0], [2.0], [0.0], [1.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.1, 0.1], [0.6, 0.4, 0.3, 0.5], [0.5] * 4, [0.3] * 4])
    n = len(img) // world
    keep = (idx >= rank * n) & (idx < (rank + 1) * n)
    return {
        "img": img[rank * n : (rank + 1) * n],
        "cls": cls[keep],
        "bboxes": boxes[keep],
        "batch_idx": idx[keep] - rank * n,
    }


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


def _tolerance(expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Equal up to float32 summation order (which differs between halves and a whole batch by up to 1e-5 of the
    largest gradient here): relative 1e-4, absolute 1e-4 of the largest gradient."""
    return {"rtol": 1e-4, "atol": 1e-4 * _flat(expected).abs().max().item()}


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank as Ultralytics' loop runs it: its own seed, the student in DDP, the loss × world size, backward;
    then detkd's broadcast (at set-up) and gradient averaging (before the optimizer step)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, distiller = _student_and_distiller(seed=rank)
        wrapped = nn.parallel.DistributedDataParallel(student, find_unused_parameters=True)  # rank 0's weights
        ddp.broadcast_from_first_rank(distiller)
        loss, _ = wrapped(_batch(rank, world))  # the student's forward computes the loss, distillation included
        (loss.sum() * world).backward()
        local = _grads(distiller)
        ddp.average_gradients(distiller)
        torch.save({"student": _grads(student), "distiller": _grads(distiller), "local": local}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_halves_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    """What is compared: the gradient of every student and distiller parameter after one backward pass.

    Each rank's loss is its criterion's total (Ultralytics' convention: mean term × the rank's batch size, here a sum
    over its images) × the world size; DDP averages the student's gradients over the ranks and
    ``ddp.average_gradients`` the distiller's, so both become the gradient of the sum over all images, which is the
    whole batch's total in one process. The ranks start from different seeds, as Ultralytics seeds them: equal
    results also mean the distiller was broadcast from rank 0.
    """
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    student, distiller = _student_and_distiller(seed=0)
    loss, _ = student(_batch())
    loss.sum().backward()
    expected = {"student": _grads(student), "distiller": _grads(distiller)}
    assert len(expected["distiller"]) == 12  # a connector (weight, bias) per level and feature term
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        for part in ("student", "distiller"):
            assert got[part].keys() == expected[part].keys()
            torch.testing.assert_close(_flat(got[part]), _flat(expected[part]), **_tolerance(expected[part]))
        # without the averaging, a rank's distiller has its own half's gradient (× 2), not the whole batch's
        local, whole = _flat(got["local"]), _flat(expected["distiller"])
        assert not torch.allclose(local, whole, **_tolerance(expected["distiller"]))
