"""Run a benchmark profile: every method against the student alone, at one budget, over seeds (``detkd benchmark``).

Each run is its own process (:mod:`detkd.benchmark.jobs`): the teacher first (then its pseudo-labels, where a method
trains on them), then the students one at a time, or ``parallel`` side by side, each with an equal share of the CPU
cores (on a GPU machine, small runs are bound by the CPU's augmentation, not the GPU). The report is rewritten after
each run (:mod:`detkd.benchmark.report`), and a cut benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from detkd.benchmark.jobs import Bench, Job, log, run_in_child
from detkd.benchmark.profiles import PROFILES_DIR, Profile, load_profile
from detkd.benchmark.report import build_report, write_report
from detkd.config import builtin_names
from detkd.errors import DetkdError
from detkd.runtime import cpu_threads
from detkd.safe_load import TRUST_HELP, trust_checkpoints


def run_benchmark(
    profile: Profile,
    out: str | os.PathLike,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    command: str = "",
    parallel: int | None = None,
) -> dict:
    """Run the profile's (selected) methods and seeds that have not finished; rewrite the report after each run.

    ``methods`` picks methods by name, ``seeds`` replaces every method's seeds, ``parallel`` the profile's number of
    runs side by side. Returns the report; runs that failed are listed in its ``failed`` entry (their logs in
    ``run_dir/bench.log``).
    """
    unknown = sorted(set(methods or []) - {m.name for m in profile.methods})
    if unknown:
        known = ", ".join(m.name for m in profile.methods)
        raise DetkdError(f"profile {profile.name}: no method named {', '.join(unknown)} (methods: {known})")
    bench = Bench.prepare(profile, out)
    jobs = [
        bench.job(m, seed)
        for m in profile.methods
        if not methods or m.name in methods
        for seed in (seeds or m.seeds or profile.seeds)
    ]
    todo = [j for j in jobs if j.finished() is None]
    teacher_todo = bench.teacher.finished() is None
    parallel = max(1, min(parallel or profile.parallel, len(todo) or 1))
    side_by_side = f", {parallel} side by side" if parallel > 1 else ""
    log(f"{profile.name}: {len(jobs)} runs, {len(todo) + teacher_todo} to do{side_by_side}, in {bench.out}")
    start, failed, count = time.time(), [], len(todo) + teacher_todo
    order = [bench.teacher] * teacher_todo + todo
    labels = {
        id(job): f"[bench {i}/{count}] " + ("teacher" if job is bench.teacher else f"{job.method} seed {job.seed}")
        for i, job in enumerate(order, 1)
    }
    threads = max(1, cpu_threads() // parallel) if parallel > 1 else None

    def run(job: Job) -> tuple[Job, int, float]:
        log(f"{labels[id(job)]} ... ({(time.time() - start) / 60:.1f} min elapsed)")
        t = time.time()
        return job, run_in_child(job, None if job is bench.teacher else threads), t

    def finished(job: Job, code: int, t: float) -> None:
        record, what = job.finished(), labels[id(job)]
        if record is None and job is bench.teacher:
            raise DetkdError(f"{job.run_dir}: the teacher failed (exit {code}; see bench.log there)")
        if record is None:
            log(f"{what}: FAILED (exit {code}), see {Path(job.run_dir) / 'bench.log'}")
            failed.append(job.run_dir)
        else:
            log(f"{what}: AP {record['metrics']['AP']:.4f} in {(time.time() - t) / 60:.1f} min")
        write_report(build_report(bench, command, failed), bench.out)

    if teacher_todo:  # every student needs it: it runs first, alone
        finished(*run(bench.teacher))
    to_train = {j.method for j in todo}
    pseudo = {m.pseudo_threshold for m in profile.methods if m.data == "labeled+pseudo" and m.name in to_train}
    for conf in sorted(pseudo):  # the teacher's labels of the unlabeled images, before the runs that train on them
        bench.prepare_pseudo(conf)
    with ThreadPoolExecutor(max_workers=parallel) as pool:  # its threads only wait on child processes
        for future in as_completed([pool.submit(run, job) for job in todo]):
            finished(*future.result())
    report = write_report(build_report(bench, command, failed), bench.out)
    log(f"done in {(time.time() - start) / 60:.1f} min: {bench.out / 'results.md'}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detkd benchmark", description=__doc__.split("\n\n")[0])
    builtin = ", ".join(builtin_names(PROFILES_DIR))
    p.add_argument("--profile", required=True, help=f"a built-in profile ({builtin}) or a profile .yaml")
    p.add_argument("--out", help="output folder (default: runs/bench/<profile>); rerun to resume")
    p.add_argument("--teacher", help="teacher checkpoint to use instead of training the profile's")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="run only these methods (the report keeps all)")
    p.add_argument(
        "--seeds", nargs="+", type=int, metavar="SEED", help="seeds for every method (replaces the profile's)"
    )
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="student runs side by side, sharing the CPU cores (default: the profile's; 1 on small CPUs)",
    )
    return p


def _command_line() -> str:
    """The command as typed: ``python tools/benchmark.py ...`` or ``detkd benchmark ...``."""
    first = sys.argv[0]
    return shlex.join(["python", first, *sys.argv[1:]] if first.endswith(".py") else [Path(first).name, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    """``detkd benchmark`` and ``tools/benchmark.py``: 0 when every run finished, 1 if some failed, 2 on errors."""
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile)
        if args.teacher:
            if not Path(args.teacher).is_file():
                raise DetkdError(f"{args.teacher}: teacher checkpoint not found")
            profile.teacher.checkpoint = str(Path(args.teacher).resolve())
        out = args.out or Path("runs") / "bench" / profile.name
        with trust_checkpoints(args.trust_checkpoint):  # its runs inherit it
            report = run_benchmark(profile, out, args.methods, args.seeds, _command_line(), args.parallel)
    except DetkdError as e:
        print(f"detkd: error: {e}", file=sys.stderr)
        return 2
    return 1 if report["failed"] else 0
