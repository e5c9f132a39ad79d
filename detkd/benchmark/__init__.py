"""Benchmarks: every distillation method against the student alone, at one budget, over seeds.

- :mod:`~detkd.benchmark.profiles`: what is compared (data, teacher, student, budget, methods), loaded and checked;
- :mod:`~detkd.benchmark.jobs`: one run per (method, seed) in its own process, cached when done;
- :mod:`~detkd.benchmark.report`: the runs aggregated over seeds, as JSON, markdown and plots;
- :mod:`~detkd.benchmark.runner`: runs a profile's jobs and rewrites the report after each (``detkd benchmark``).
"""

from detkd.benchmark.jobs import Bench, Job, read_curve, run_job
from detkd.benchmark.profiles import (
    PROFILES_DIR,
    Budget,
    DataSpec,
    Footage,
    Method,
    Profile,
    SyntheticData,
    TeacherSpec,
    describe_method,
    load_profile,
    method_recipe,
)
from detkd.benchmark.report import build_report, format_markdown, gap_closed, mean_std, summarise, write_report
from detkd.benchmark.runner import main, run_benchmark

__all__ = [
    "PROFILES_DIR",
    "Bench",
    "Budget",
    "DataSpec",
    "Footage",
    "Job",
    "Method",
    "Profile",
    "SyntheticData",
    "TeacherSpec",
    "build_report",
    "describe_method",
    "format_markdown",
    "gap_closed",
    "load_profile",
    "main",
    "mean_std",
    "method_recipe",
    "read_curve",
    "run_benchmark",
    "run_job",
    "summarise",
    "write_report",
]
