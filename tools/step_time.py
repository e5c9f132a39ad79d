#!/usr/bin/env python
"""What one distillation training step costs, as ratios measured in one process on one machine.

Times, on the same batches: (a) a plain student step (forward, Ultralytics' loss, backward, optimizer step),
(b) a teacher forward alone, (c) a distillation step with a recipe's losses. Prints (c)/(a), and (c)/((a)+(b)):
how much distillation adds beyond the teacher forward it cannot avoid.

    python tools/step_time.py [--recipe configs/recommended.yaml] [--teacher yolov8s.yaml | t.pt]
                              [--student yolov8n.yaml] [--imgsz 160] [--batch 16] [--steps 20]
"""

import argparse
import time

import torch

from detkd.adapters.ultralytics import UltralyticsAdapter, load_teacher
from detkd.config import load_recipe
from detkd.distiller import Distiller
from detkd.engine.criterion import DistillationCriterion
from detkd.runtime import ultralytics_offline


def _batch(n: int, imgsz: int, nc: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    per_image = 8
    xy = torch.rand(n * per_image, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(n * per_image, 2, generator=g) * 0.15 + 0.02
    return {
        "img": torch.rand(n, 3, imgsz, imgsz, generator=g),
        "bboxes": torch.cat((xy, wh), 1),
        "cls": torch.randint(0, nc, (n * per_image, 1), generator=g).float(),
        "batch_idx": torch.arange(n).repeat_interleave(per_image).float(),
    }


def _timed(fn, batches) -> float:
    fn(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches[1:]:
        fn(b)
    return (time.perf_counter() - t) / (len(batches) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="configs/recommended.yaml")
    p.add_argument("--teacher", default="yolov8s.yaml", help="checkpoint, or a config for an untrained teacher")
    p.add_argument("--student", default="yolov8n.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nc", type=int, default=8, help="classes, for a teacher built from a config")
    args = p.parse_args()

    ultralytics_offline()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    if args.teacher.endswith(".pt"):
        teacher_model = load_teacher(args.teacher)
    else:
        teacher_model = DetectionModel(args.teacher, nc=args.nc, verbose=False).eval().requires_grad_(False)
        teacher_model.names = {i: f"class{i}" for i in range(args.nc)}
    names = dict(teacher_model.names)  # the student learns the teacher's classes
    args.nc = len(names)
    student = DetectionModel(args.student, nc=args.nc, verbose=False)
    student.names, student.args = names, get_cfg()
    teacher, s_adapter = UltralyticsAdapter(teacher_model), UltralyticsAdapter(student)
    recipe = load_recipe(args.recipe)
    distiller = Distiller(
        recipe.distill, s_adapter.channels, s_adapter.strides, names, teacher.channels, teacher.strides, teacher.names
    )
    task = student.init_criterion()
    criterion = DistillationCriterion(task, s_adapter, teacher, distiller)
    params = list(student.parameters()) + list(distiller.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    batches = [_batch(args.batch, args.imgsz, args.nc, i) for i in range(args.steps + 1)]
    student.train()

    def step(loss_fn):
        def run(batch):
            optimizer.zero_grad()
            loss, _ = loss_fn(student(batch["img"]), batch)
            loss.sum().backward()
            optimizer.step()

        return run

    plain = _timed(step(task), batches)
    teacher_fwd = _timed(lambda b: teacher(b["img"]), batches)
    distilled = _timed(step(criterion), batches)
    print(
        f"threads {torch.get_num_threads()}, batch {args.batch}, imgsz {args.imgsz}, {args.steps} steps, "
        f"student {args.student}, teacher {args.teacher}, recipe {args.recipe}"
    )
    print(f"plain student step      {plain * 1000:8.1f} ms")
    print(f"teacher forward         {teacher_fwd * 1000:8.1f} ms")
    print(f"distillation step       {distilled * 1000:8.1f} ms")
    print(f"distillation / plain                       {distilled / plain:.2f}x")
    print(f"distillation / (plain + teacher forward)   {distilled / (plain + teacher_fwd):.2f}x")


if __name__ == "__main__":
    main()
