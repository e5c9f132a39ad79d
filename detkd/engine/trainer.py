"""Transfer and distillation inside Ultralytics' own training loop.

:class:`DetkdTrainer` is Ultralytics' ``DetectionTrainer`` with a recipe bound to it (:func:`trainer_for`):

- ``init:`` — the freshly built student takes weights from a source model (:mod:`detkd.transfer`); transferred
  tensors can stay frozen for the first epochs (BN statistics included) and train at a scaled learning rate.
- ``teacher:`` + ``distill:`` — it loads the frozen teacher, builds the :class:`~detkd.distiller.Distiller`,
  puts its learned parts in the optimizer, and swaps the student's criterion for
  :class:`~detkd.engine.criterion.DistillationCriterion`.
- ``unlabeled:`` — a second dataloader over the unlabeled frames (:mod:`detkd.data.frames`): Ultralytics' own
  training dataset with every label list empty (:func:`~detkd.ultralytics_internals.unlabeled_dataset`), so the
  trainer's augmentation applies, and its mosaic and mixup only ever combine unlabeled images with unlabeled ones:
  a mosaic is wholly labeled or wholly unlabeled, never partly labeled passed off as fully labeled. It is cycled
  (its own epochs are independent of the labeled set's) and each step appends ``round(ratio × batch)`` of its images
  to the labeled batch (``preprocess_batch``); the criterion splits the batch again (task loss on the labeled part,
  distillation terms on both, see :mod:`detkd.engine.criterion`). Its mosaic closes with the labeled loader's
  (``close_mosaic``). After an out-of-memory retry halves the labeled batch, the unlabeled batch keeps its size.

Everything else — augmentation, AMP, EMA, validation, ``results.csv``, plots, checkpoints — is Ultralytics' code
path, so ``best.pt``/``last.pt`` stay plain student checkpoints. The recipe, the transfer report and the
distiller's weights are saved beside them (``distill.yaml``, ``transfer.json``, ``weights/distiller.pt``) so
that a killed run resumes. On several GPUs, :mod:`detkd.engine.ddp` carries the recipe to each rank and averages
the distiller's gradients; the student is read through ``unwrap_model`` wherever DDP wraps it.

Ultralytics is extended through its public hooks only: ``setup_model`` (transfer), ``build_optimizer`` (teacher and
distiller, whose connectors train with the student), ``preprocess_batch`` (unlabeled images appended),
``optimizer_step`` (the distiller's gradients averaged across
GPUs), ``save_model`` (the distiller's state), the student's ``criterion``, and callbacks: ``on_pretrain_routine_end``
(freezing, the criterion), ``on_train_epoch_start`` and ``on_train_batch_start`` (release, schedule, frozen BN
layers kept in eval mode), ``teardown`` (the student leaves with its own criterion, also after an error). What else
it relies on is in :mod:`detkd.ultralytics_internals`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from detkd import ultralytics_internals as internals
from detkd.adapters import DetectorAdapter, UltralyticsAdapter, create_teacher
from detkd.config import Recipe, save_recipe
from detkd.data.frames import FrameSet, collect_frames
from detkd.distiller import Distiller, schedule_factor
from detkd.engine import ddp
from detkd.engine.criterion import LABELED, DistillationCriterion
from detkd.utils import atomic_write, save_json, write_text

internals.ultralytics_offline()
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.utils import LOCAL_RANK, LOGGER  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402


class DetkdTrainer(DetectionTrainer):
    """``DetectionTrainer`` + weight transfer + teacher and distiller. Bind a recipe with :func:`trainer_for`."""

    recipe: Recipe
    teacher: DetectorAdapter | None = None
    distiller: Distiller | None = None
    criterion: DistillationCriterion | None = None
    transferred: frozenset[str] = frozenset()  # student parameter names that came from the init source
    frozen = False  # transferred tensors fixed this epoch
    frozen_bn: tuple[nn.Module, ...] = ()  # BN layers kept in eval mode while they are
    frames: FrameSet | None = None  # the recipe's unlabeled frames, when the caller collected them already
    unlabeled_loader = None  # Ultralytics' InfiniteDataLoader over them
    _unlabeled_batches = None  # its current pass
    _unlabeled_passes = 0  # passes begun
    _unlabeled_mosaic_closed = False

    def __init__(self, *args, **kwargs):
        if not hasattr(self, "recipe"):  # a DDP rank that imported this class by name (see detkd.engine.ddp)
            self.recipe = ddp.recipe_of_this_rank()
        super().__init__(*args, **kwargs)
        self.add_callback("on_pretrain_routine_end", _finish_setup)
        self.add_callback("teardown", _restore_student)

    def train(self):
        with ddp.recipe_for_ranks(self.recipe) if self.ddp else nullcontext():  # self.ddp: this process starts ranks
            return super().train()

    # --- weight transfer -------------------------------------------------------------------------------------
    def setup_model(self):  # in every process that trains: a DDP rank receives the student built, or builds it
        ckpt, model = super().setup_model(), self.model
        init, report_file = self.recipe.init, Path(self.save_dir) / "transfer.json"
        if init.source and not self.resume:
            from detkd.transfer import load_model, transfer_weights

            source = self.recipe.init_checkpoint
            report = transfer_weights(load_model(source), model, init.kind)
            LOGGER.info(f"detkd: transfer from {source}\n{report.format()}")
            save_json(report.to_json(), report_file)  # a resumed run reads it back
        if init.source and report_file.exists():  # a resumed run finds what was transferred where it left it
            self.transferred = frozenset(json.loads(report_file.read_text())["transferred"])
        return ckpt

    def _set_transferred_trainable(self, trainable: bool) -> None:
        """Freeze or release transferred tensors. Ultralytics re-enables ``requires_grad`` during its set-up, so
        freezing runs after it; what it always freezes (the DFL projection) stays fixed either way. Frozen BN layers
        also keep their transferred statistics (see :func:`_keep_frozen_bn_in_eval`)."""
        student = unwrap_model(self.model)  # parameter names without DDP's "module." prefix
        for name, p in student.named_parameters():
            if name in self.transferred and not any(f in name for f in internals.ALWAYS_FROZEN):
                p.requires_grad_(trainable)
        self.frozen = not trainable
        self.frozen_bn = (
            ()
            if trainable
            else tuple(
                m
                for n, m in student.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{n}.weight" in self.transferred
            )
        )

    # --- distillation ----------------------------------------------------------------------------------------
    def build_optimizer(self, model, *args, **kwargs):
        """The optimizer of the student and the distiller's connectors. The teacher and the distiller are built here:
        the first hook of Ultralytics' set-up that sees the student on its device, on the process that trains."""
        trainable, student = model, unwrap_model(model)  # under DDP, ``model`` is the wrapper around the student
        if self.recipe.teacher and self.recipe.distills:  # a teacher may only give the weights (init.source)
            self.teacher = create_teacher(self.recipe.teacher, self.device, self.recipe.teacher_weights)
            adapter, names = UltralyticsAdapter(student), dict(self.data["names"])
            self.distiller = Distiller(self.recipe.distill, adapter, self.teacher, names).to(self.device)
            state = self.wdir / "distiller.pt"
            if self.args.resume and state.exists():
                self.distiller.load_state_dict(internals.load_checkpoint_file(state, map_location=self.device))
                LOGGER.info(f"detkd: distiller state restored from {state}")
            ddp.broadcast_from_first_rank(self.distiller)
            trainable = internals.StudentAndDistiller(student, self.distiller)
        optimizer = super().build_optimizer(trainable, *args, **kwargs)
        if self.transferred and self.recipe.init.lr_mult != 1.0:
            _scale_lr(
                optimizer,
                {id(p) for n, p in student.named_parameters() if n in self.transferred},
                self.recipe.init.lr_mult,
            )
        return optimizer

    # --- unlabeled images ------------------------------------------------------------------------------------
    def preprocess_batch(self, batch):
        """The labeled batch, then (in a run with unlabeled images) the next unlabeled batch after it."""
        if self.unlabeled_loader is not None:
            labeled = batch["img"].shape[0]
            batch = internals.concat_batches(batch, self._next_unlabeled())
            batch[LABELED] = labeled
        return super().preprocess_batch(batch)

    def _next_unlabeled(self) -> dict:
        """The unlabeled loader, cycled: a new pass (new shuffle) whenever one ends. Under DDP its sampler is told
        the pass, as Ultralytics tells the labeled loader's the epoch: a DistributedSampler shuffles by its epoch, the
        same on every rank, and would repeat one order for every pass. Like Ultralytics' it lags a pass: the loader's
        workers prefetch, so the next pass's order is drawn before the current pass ends."""
        for _ in range(2):
            if self._unlabeled_batches is None:
                if hasattr(self.unlabeled_loader.sampler, "set_epoch"):
                    self.unlabeled_loader.sampler.set_epoch(self._unlabeled_passes)
                self._unlabeled_passes += 1
                self._unlabeled_batches = iter(self.unlabeled_loader)
            try:
                return next(self._unlabeled_batches)
            except StopIteration:
                self._unlabeled_batches = None
        raise RuntimeError("the unlabeled dataloader yields no batch")  # it holds at least one image: cannot happen

    def _build_unlabeled_loader(self) -> None:
        cfg = self.recipe.unlabeled
        frames = self.frames or collect_frames(cfg.source, cfg.every, cfg.dedupe, cfg.cache)  # DDP ranks, resume
        LOGGER.info(f"detkd: {frames.format()}")
        stride = max(int(unwrap_model(self.model).stride.max()), 32)
        image_list = write_text(
            Path(self.save_dir) / "unlabeled.txt", "".join(f"{f.resolve()}\n" for f in frames.files)
        )
        batch = max(1, round(self.train_loader.batch_size * cfg.ratio))
        dataset = internals.unlabeled_dataset(self.args, image_list, self.data, batch, stride)
        self.unlabeled_loader = internals.build_dataloader(dataset, batch, self.args.workers, LOCAL_RANK, self.device)
        # a resumed run goes on with the passes' orders where the killed one was (one unlabeled batch a labeled one)
        self._unlabeled_passes = self.start_epoch * len(self.train_loader) // len(self.unlabeled_loader)
        LOGGER.info(f"detkd: {batch} unlabeled images join each batch of {self.train_loader.batch_size} labeled ones")

    def optimizer_step(self):
        if self.distiller is not None:
            ddp.average_gradients(self.distiller)  # DDP averages the student's only
        super().optimizer_step()

    def save_model(self):
        saved = super().save_model()
        if self.distiller is not None:
            state_dict = self.distiller.state_dict()
            atomic_write(self.wdir / "distiller.pt", lambda tmp: torch.save(state_dict, tmp))
        return saved


def _scale_lr(optimizer: torch.optim.Optimizer, ids: set[int], mult: float) -> None:
    """Split each parameter group into transferred and other parameters; scale the transferred group's lr.

    Runs before Ultralytics creates its scheduler, which records each group's lr as its ``initial_lr``.
    """
    groups = []
    for group in optimizer.param_groups:
        moved = [p for p in group["params"] if id(p) in ids]
        kept = [p for p in group["params"] if id(p) not in ids]
        groups.append({**group, "params": kept})
        if moved:
            groups.append({**group, "params": moved, "lr": group["lr"] * mult})
    optimizer.param_groups.clear()
    for group in groups:
        if group["params"]:
            optimizer.add_param_group(group)


def _finish_setup(trainer: DetkdTrainer) -> None:
    """After Ultralytics' set-up (EMA copied, a resumed run's state loaded): save the recipe, freeze transferred
    tensors, and give the student the distillation criterion (after the EMA copy, which keeps a plain one)."""
    save_recipe(trainer.recipe, Path(trainer.save_dir) / "distill.yaml")
    if trainer.transferred and trainer.recipe.init.freeze_epochs > trainer.start_epoch:
        trainer._set_transferred_trainable(False)
        trainer.add_callback("on_train_batch_start", _keep_frozen_bn_in_eval)
        LOGGER.info(f"detkd: transferred tensors frozen for {trainer.recipe.init.freeze_epochs} epochs")
    trainer.add_callback("on_train_epoch_start", _start_epoch)
    if trainer.teacher is not None:
        student = unwrap_model(trainer.model)
        task = student.criterion if getattr(student, "criterion", None) is not None else student.init_criterion()
        trainer.criterion = DistillationCriterion(
            task, UltralyticsAdapter(student), trainer.teacher, trainer.distiller, trainer.recipe.unlabeled
        )
        student.criterion = trainer.criterion
        trainer.add_callback("on_train_batch_start", _update_schedule)
        if trainer.recipe.unlabeled is not None:
            trainer._build_unlabeled_loader()


def _restore_student(trainer: DetkdTrainer) -> None:
    """The student leaves training with a plain criterion and the teacher's hook removed, also after an error."""
    if trainer.criterion is not None:
        trainer.criterion.remove()
        unwrap_model(trainer.model).criterion = None
    if trainer.unlabeled_loader is not None:
        trainer.unlabeled_loader.reset()  # its workers end with the run


def _keep_frozen_bn_in_eval(trainer: DetkdTrainer) -> None:
    """Ultralytics puts the whole student in train mode each epoch; frozen BN layers keep their statistics."""
    for bn in trainer.frozen_bn:
        bn.eval()


def _start_epoch(trainer: DetkdTrainer) -> None:
    trainer._batch_index = 0
    closing = trainer.args.close_mosaic and trainer.epoch >= trainer.epochs - trainer.args.close_mosaic
    if trainer.unlabeled_loader is not None and closing and not trainer._unlabeled_mosaic_closed:
        internals.close_mosaic(trainer.unlabeled_loader, trainer.args)  # as Ultralytics closes the labeled loader's
        trainer._unlabeled_batches, trainer._unlabeled_mosaic_closed = None, True
    if trainer.frozen and trainer.epoch >= trainer.recipe.init.freeze_epochs:
        trainer._set_transferred_trainable(True)
        LOGGER.info(f"detkd: transferred tensors released at epoch {trainer.epoch + 1}")
    if trainer.criterion is not None and trainer.criterion.nonfinite:  # from the epoch before
        LOGGER.warning(f"detkd: non-finite distillation terms skipped (term: batches): {trainer.criterion.nonfinite}")
        trainer.criterion.nonfinite.clear()


def _update_schedule(trainer: DetkdTrainer) -> None:
    progress = trainer.epoch + trainer._batch_index / max(len(trainer.train_loader), 1)
    trainer.criterion.factor = schedule_factor(trainer.recipe.distill.schedule, progress, trainer.epochs)
    trainer._batch_index += 1


def trainer_for(recipe: Recipe, frames: FrameSet | None = None) -> type[DetkdTrainer]:
    """A trainer class bound to ``recipe`` (Ultralytics instantiates trainers from their class), and to the
    recipe's unlabeled ``frames`` when they were collected before (else the trainer collects them)."""
    return type("DetkdTrainer", (DetkdTrainer,), {"recipe": recipe, "frames": frames})
