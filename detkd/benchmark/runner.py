"""Run a benchmark profile: every method against the student alone, at one budget, over seeds (``detkd benchmark``).

The runs go one at a time, each in its own process (:mod:`detkd.benchmark.jobs`); the report is rewritten after
each (:mod:`detkd.benchmark.report`), and a cut benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from detkd.benchmark.jobs import Bench, log, run_in_child
from detkd.benchmark.profiles import PROFILES_DIR, Profile, load_profile
from detkd.benchmark.report import build_report, write_report
from detkd.config import builtin_names
from detkd.errors import DetkdError


def run_benchmark(
    profile: Profile,
    out: str | os.PathLike,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    command: str = "",
) -> dict:
    """Run the profile's (selected) methods and seeds that have not finished; rewrite the report after each run.

    ``methods`` picks methods by name, ``seeds`` replaces every method's seeds. Returns the report; runs that
    failed are listed in its ``failed`` entry (their logs in ``run_dir/bench.log``).
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
    todo = [j for j in [bench.teacher, *jobs] if j.finished() is None]
    log(f"{profile.name}: {len(jobs)} runs, {len(todo)} to do, in {bench.out}")
    start, failed = time.time(), []
    for i, job in enumerate(todo, 1):
        what = f"[bench {i}/{len(todo)}] " + ("teacher" if job is bench.teacher else f"{job.method} seed {job.seed}")
        log(f"{what} ... ({(time.time() - start) / 60:.1f} min elapsed)")
        t = time.time()
        code = run_in_child(job)
        record = job.finished()
        if record is None and job is bench.teacher:
            raise DetkdError(f"{job.run_dir}: the teacher failed (exit {code}; see bench.log there)")
        if record is None:
            log(f"{what}: FAILED (exit {code}), see {Path(job.run_dir) / 'bench.log'}")
            failed.append(job.run_dir)
        else:
            log(f"{what}: AP {record['metrics']['AP']:.4f} in {(time.time() - t) / 60:.1f} min")
        write_report(build_report(bench, command, failed), bench.out)
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
        report = run_benchmark(profile, out, args.methods, args.seeds, command=_command_line())
    except DetkdError as e:
        print(f"detkd: error: {e}", file=sys.stderr)
        return 2
    return 1 if report["failed"] else 0
