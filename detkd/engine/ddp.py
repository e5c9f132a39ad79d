"""What Ultralytics' multi-GPU (DDP) training does not carry or reduce for detkd's trainer, in one place.

Ultralytics trains on several GPUs by starting a generated script once per GPU ("rank") with
``torch.distributed.run`` (``ultralytics.utils.dist``) and wrapping only the student in
``DistributedDataParallel``. Three things of detkd's would not follow:

- **The recipe.** The trainer class carries it (:func:`detkd.engine.trainer.trainer_for` makes a class per recipe).
  Ultralytics 8.4.190 cloudpickles the class, recipe included, into the rank's script; Ultralytics 8.4.0 writes
  ``from detkd.engine.trainer import DetkdTrainer`` instead, which is the class without a recipe. Both lines are
  within detkd's pin, so the launching trainer also puts the recipe itself, as JSON, in an environment variable
  every rank inherits (:func:`recipe_for_ranks`), and a trainer class without a recipe reads it
  (:func:`recipe_of_this_rank`). The recipe itself rather than a file path: nothing to clean up, nothing Ultralytics
  can delete first (it empties the run folder before the launch), nothing to go stale.
- **The distiller's initial weights.** Ultralytics seeds each rank differently, so each rank builds different
  connectors; DDP broadcasts rank 0's student at start, :func:`broadcast_from_first_rank` does the same for the
  distiller.
- **The distiller's gradients.** Its loss terms are computed inside the student's (DDP) forward, but its parameters
  are not the student's, so DDP does not average them. :func:`average_gradients` does, once per optimizer step. Not
  by wrapping the distiller in a second DDP: it runs inside the student's DDP forward, its attributes and
  checkpoint keys would sit behind ``.module``, and a DDP reducer hangs when ranks disagree about which parameters
  took part (a term dropped as non-finite on one rank only). Its parameters are few (connectors, MGD/FGD blocks),
  so one all-reduce of them all per step costs nothing next to the student's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from detkd.config import Recipe, load_recipe
from detkd.errors import DetkdError

RECIPE_VARIABLE = "DETKD_DDP_RECIPE"


@contextmanager
def recipe_for_ranks(recipe: Recipe) -> Iterator[None]:
    """While the launching process starts the ranks, ``recipe`` is in :data:`RECIPE_VARIABLE` (which they inherit);
    the variable is restored afterwards."""
    previous = os.environ.get(RECIPE_VARIABLE)
    os.environ[RECIPE_VARIABLE] = json.dumps(recipe.to_dict())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RECIPE_VARIABLE, None)
        else:
            os.environ[RECIPE_VARIABLE] = previous


def recipe_of_this_rank() -> Recipe:
    """The recipe the launching process left for this rank (checked again, as any recipe)."""
    text = os.environ.get(RECIPE_VARIABLE)
    if text is None:
        raise DetkdError(
            "DetkdTrainer has no recipe: make the trainer class with detkd.engine.trainer.trainer_for(recipe)"
        )
    return load_recipe(None, json.loads(text))


def _world_size() -> int:
    """Number of ranks of the initialised process group; 1 without one (single-process training)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_first_rank(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, as DDP does for the module it wraps."""
    if _world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.detach(), src=0)


def average_gradients(module: nn.Module) -> None:
    """Average ``module``'s gradients over the ranks, as DDP averages the student's, in one all-reduce.

    Call it on every rank after the backward passes of an optimizer step and before the step (and before the AMP
    scaler unscales: a non-finite gradient of one rank then reaches all of them, so they all skip the same step).
    A parameter without a gradient on some ranks counts as zero there, as DDP counts a parameter a rank did not
    use; one without a gradient on every rank keeps none, so the optimizer skips it as it would in one process.
    """
    world = _world_size()
    params = [p for p in module.parameters() if p.requires_grad]
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*(g.flatten() for g in grads), used])
    dist.all_reduce(flat)  # sum over the ranks
    sums, used_anywhere = flat[: -len(params)], flat[-len(params) :] > 0
    for p, total, anywhere in zip(params, sums.split([p.numel() for p in params]), used_anywhere.tolist()):
        if anywhere:
            p.grad = (total / world).view_as(p).to(p.dtype)
