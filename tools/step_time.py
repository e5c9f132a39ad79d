#!/usr/bin/env python
"""What one distillation training step costs in time and memory, as ratios measured on one machine.

Time, in one process on the same batches, the three workloads in turn on each batch and the median step of each:
(a) a plain student step (forward, Ultralytics' loss, backward, optimizer step), (b) a teacher forward alone,
(c) a distillation step with a recipe's losses, and within (c) the distillation terms' own forward. Prints (c)/(a)
and (c)/((a)+(b)): what distillation adds beyond the teacher forward it cannot avoid, and where that remainder goes.

The student is built from its config: a recipe's ``init`` (the recommended recipe's weight selection) runs once
before training and costs nothing per step, so it is not applied here.

Peak memory of the same three workloads, each in a fresh process (CPU: the process's peak resident set size
above what it held before the models were built; CUDA: peak allocated bytes): (c)/((a)+(b)).

    python tools/step_time.py [--recipe recommended | PATH.yaml] [--teacher yolov8s.yaml | t.pt]
                              [--student yolov8n.yaml] [--imgsz 160] [--batch 16] [--steps 20] [--device cpu]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from detkd.adapters import UltralyticsAdapter, create_teacher
from detkd.config import load_recipe
from detkd.distiller import Distiller
from detkd.engine.criterion import DistillationCriterion
from detkd.ultralytics_internals import ultralytics_offline

WORKLOADS = ("plain", "teacher", "distilled")


def _batch(n: int, imgsz: int, nc: int, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    per_image = 8
    xy = torch.rand(n * per_image, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(n * per_image, 2, generator=g) * 0.15 + 0.02
    batch = {
        "img": torch.rand(n, 3, imgsz, imgsz, generator=g),
        "bboxes": torch.cat((xy, wh), 1),
        "cls": torch.randint(0, nc, (n * per_image, 1), generator=g).float(),
        "batch_idx": torch.arange(n).repeat_interleave(per_image).float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


class Setup:
    """Student, teacher, distillation criterion and optimizer, built as the trainer builds them."""

    def __init__(self, args: argparse.Namespace):
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel

        torch.manual_seed(0)
        if args.teacher.endswith(".pt"):
            self.teacher = create_teacher(args.teacher, args.device)
        else:
            teacher_model = DetectionModel(args.teacher, nc=args.nc, verbose=False).eval().requires_grad_(False)
            teacher_model.names = {i: f"class{i}" for i in range(args.nc)}
            self.teacher = UltralyticsAdapter(teacher_model.to(args.device))
        # the student learns the teacher's classes, numbered 0 ... nc-1 (a torchvision teacher's start at 1)
        names = dict(enumerate(self.teacher.names.values()))
        self.nc = len(names)
        student = DetectionModel(args.student, nc=self.nc, verbose=False).to(args.device)
        student.names, student.args = names, get_cfg()
        self.student, self.s_adapter = student, UltralyticsAdapter(student)
        recipe = load_recipe(args.recipe)
        self.distiller = Distiller(recipe.distill, self.s_adapter, self.teacher).to(args.device)
        self.task = student.init_criterion()
        self.criterion = DistillationCriterion(self.task, self.s_adapter, self.teacher, self.distiller)
        params = list(student.parameters()) + list(self.distiller.parameters())
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        student.train()

    def step(self, loss_fn):
        def run(batch):
            self.optimizer.zero_grad()
            loss, _ = loss_fn(self.student(batch["img"]), batch)
            loss.sum().backward()
            self.optimizer.step()

        return run

    def workload(self, name: str):
        if name == "plain":
            return self.step(self.task)
        if name == "teacher":
            return lambda b: self.teacher(b["img"])
        return self.step(self.criterion)

    def count_terms_time(self) -> list[float]:
        """Collects the seconds spent computing the distillation terms inside the criterion, one entry per call."""
        spent: list[float] = []
        forward = self.distiller.forward

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = forward(*args, **kwargs)
            spent.append(time.perf_counter() - t)
            return out

        self.distiller.forward = timed
        return spent


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _timed_interleaved(workloads: dict, batches: list, device: str) -> dict[str, float]:
    """Median seconds per step of each workload, run in turn on every batch (the order rotating), so that the
    machine's drift and other load hit all of them alike; the first batch is a warm-up."""
    names = list(workloads)
    for fn in workloads.values():
        fn(batches[0])
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, b in enumerate(batches[1:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            _sync(device)
            t = time.perf_counter()
            workloads[name](b)
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_memory(args: argparse.Namespace, workload: str) -> float:
    """Peak memory (MB) of ``workload`` in this process, above what the process held before building models."""
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb("VmRSS")
    setup = Setup(args)
    batches = [_batch(args.batch, args.imgsz, setup.nc, i, args.device) for i in range(3)]
    run = setup.workload(workload)
    for b in batches:
        run(b)
    _sync(args.device)
    if args.device != "cpu":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return _rss_mb("VmHWM") - base


def _memory_in_child(workload: str) -> float:
    """Each workload in a fresh process, so that one's allocations cannot hide or inflate another's peak."""
    command = [sys.executable, __file__, *sys.argv[1:], "--memory-of", workload]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recommended", help="a built-in recipe's name or a recipe file")
    p.add_argument("--teacher", default="yolov8s.yaml", help="checkpoint, or a config for an untrained teacher")
    p.add_argument("--student", default="yolov8n.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nc", type=int, default=8, help="classes, for a teacher built from a config")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--memory-of", choices=WORKLOADS, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args()

    ultralytics_offline()
    if args.memory_of:
        print(json.dumps({"peak_mb": measure_memory(args, args.memory_of)}))
        return
    setup = Setup(args)
    batches = [_batch(args.batch, args.imgsz, setup.nc, i, args.device) for i in range(args.steps + 1)]
    terms = setup.count_terms_time()
    median = _timed_interleaved({w: setup.workload(w) for w in WORKLOADS}, batches, args.device)
    plain, teacher_fwd, distilled = (median[w] for w in WORKLOADS)
    terms_fwd = statistics.median(terms[1:])  # the warm-up step's excluded
    rest = distilled - plain - teacher_fwd - terms_fwd
    memory = {w: _memory_in_child(w) for w in WORKLOADS}

    print(
        f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, imgsz {args.imgsz}, "
        f"{args.steps} steps, student {args.student}, teacher {args.teacher}, recipe {args.recipe}"
    )
    print(f"plain student step      {plain * 1000:8.1f} ms    peak memory {memory['plain']:8.0f} MB")
    print(f"teacher forward         {teacher_fwd * 1000:8.1f} ms    peak memory {memory['teacher']:8.0f} MB")
    print(f"distillation step       {distilled * 1000:8.1f} ms    peak memory {memory['distilled']:8.0f} MB")
    print(f"  = plain + teacher forward + terms forward {terms_fwd * 1000:.1f} ms + the rest {rest * 1000:.1f} ms")
    print(f"time:   distillation / plain                       {distilled / plain:.2f}x")
    print(f"time:   distillation / (plain + teacher forward)   {distilled / (plain + teacher_fwd):.2f}x")
    memory_ratio = memory["distilled"] / (memory["plain"] + memory["teacher"])
    print(f"memory: distillation / (plain + teacher forward)   {memory_ratio:.2f}x")


if __name__ == "__main__":
    main()
