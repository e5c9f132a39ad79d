"""Benchmark report: runs aggregated over seeds against the baseline and the teacher, as JSON, markdown and plots.

After every run the report is rewritten: ``results.json``, ``results.md``, ``map_vs_epoch.png`` and ``gains.png``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from detkd.benchmark.jobs import Bench
from detkd.benchmark.profiles import describe_method
from detkd.evaluation import COCO_METRICS
from detkd.utils import save_json, write_text

TABLE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def gap_closed(ap: float, alone_ap: float, teacher_ap: float) -> float | None:
    """(AP − AP_alone) / (AP_teacher − AP_alone): the fraction of the teacher–student gap closed; None if the
    teacher is not better than the student alone."""
    return (ap - alone_ap) / (teacher_ap - alone_ap) if teacher_ap > alone_ap else None


def summarise(
    runs: list[dict], order: list[str], baseline: str | None, teacher_ap: float | None, ceiling: str | None = None
) -> list[dict]:
    """Per method with runs (in ``order``): COCO metrics as mean ± std over seeds, AP gain over the baseline (of the
    means, and paired: seed by seed where both ran), the gain in standard deviations of the baseline's AP over seeds
    (with 2 seeds or more of each: how far outside the baseline's seed noise it lies), the fraction of the
    teacher–student gap closed, the wall time of a run as a ratio to the baseline's (a method may train other epochs
    than the baseline: see :class:`~detkd.benchmark.profiles.Method`), peak memory (the largest over seeds)
    and the mean mAP curve. With a ``ceiling`` method (the student on every image fully labeled, in a profile that
    hides some labels), the fraction of the baseline–ceiling difference recovered, as the gap closed is computed."""
    rows = [_summarise_method(name, [r for r in runs if r["method"] == name]) for name in order]
    rows = [r for r in rows if r is not None]
    base = next((r for r in rows if r["method"] == baseline), None)
    top = next((r["metrics"]["AP"]["mean"] for r in rows if r["method"] == ceiling), None)
    for row in rows:
        ap, run_time = row["metrics"]["AP"]["mean"], row["time_per_run_s"]
        base_ap, base_time = (base["metrics"]["AP"]["mean"], base["time_per_run_s"]) if base else (None, None)
        row["gain_AP"] = None if base_ap is None else ap - base_ap
        base_std = base and base["metrics"]["AP"]["std"]
        row["gain_sigma"] = row["gain_AP"] / base_std if base_std and len(row["seeds"]) > 1 else None
        paired = sorted(set(row["ap_by_seed"]) & set(base["ap_by_seed"])) if base else []
        row["paired_gains_AP"] = {seed: row["ap_by_seed"][seed] - base["ap_by_seed"][seed] for seed in paired}
        row["gap_closed"] = None if None in (base_ap, teacher_ap) else gap_closed(ap, base_ap, teacher_ap)
        row["labels_recovered"] = None if None in (base_ap, top) else gap_closed(ap, base_ap, top)
        row["time_ratio"] = run_time / base_time if run_time and base_time else None
    return rows


def _summarise_method(name: str, runs: list[dict]) -> dict | None:
    if not runs:
        return None
    times = [r["time_per_epoch_s"] for r in runs if r.get("time_per_epoch_s")]
    run_times = [r["time_per_epoch_s"] * r["epochs"] for r in runs if r.get("time_per_epoch_s") and r.get("epochs")]
    memory = [r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb") is not None]
    curves = [r["map_per_epoch"] for r in runs if r.get("map_per_epoch")]
    length = min((len(c) for c in curves), default=0)
    return {
        "method": name,
        "seeds": sorted(r["seed"] for r in runs),
        "ap_by_seed": {r["seed"]: r["metrics"]["AP"] for r in sorted(runs, key=lambda r: r["seed"])},
        "metrics": {k: mean_std([r["metrics"][k] for r in runs]) for k in COCO_METRICS},
        "time_per_epoch_s": statistics.fmean(times) if times else None,
        "time_per_run_s": statistics.fmean(run_times) if run_times else None,
        "peak_memory_mb": max(memory, default=None),
        "memory": runs[0].get("memory"),
        "map_per_epoch": [statistics.fmean(c[e] for c in curves) for e in range(length)],
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    from detkd.runtime import cpu_threads
    from detkd.ultralytics_internals import cpu_name, ultralytics_offline

    ultralytics_offline()  # sets the torch threads that every run uses

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": cpu_threads(), "torch_threads": torch.get_num_threads(), "device": gpu or cpu_name()}


def build_report(bench: Bench, command: str = "", failed: Sequence[str] = ()) -> dict:
    """Everything finished so far in the bench's output folder, summarised."""
    profile, teacher = bench.profile, bench.teacher.finished()
    runs = bench.finished_runs()
    teacher_ap = teacher and teacher["metrics"]["AP"]
    methods = summarise(runs, [m.name for m in profile.methods], profile.baseline, teacher_ap, profile.ceiling)
    about = {
        m.name: {"kind": m.kind, "data": m.data, "what": describe_method(m, profile.student), "chain": m.chain or []}
        for m in profile.methods
    }
    return {
        "profile": profile.name,
        "command": command,
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "data": asdict(profile.data),
        "budget": asdict(profile.budget),
        "student": profile.student,
        "teacher": {**asdict(profile.teacher), "metrics": teacher and teacher["metrics"]},
        "baseline": profile.baseline,
        "ceiling": profile.ceiling,
        "methods": [{**row, **about[row["method"]]} for row in methods],
        "runs": [{k: v for k, v in r.items() if k != "job"} for r in runs],
        "failed": list(failed),
    }


def write_report(report: dict, out: Path) -> dict:
    """``results.json`` (atomically), then ``results.md``, ``map_vs_epoch.png`` and ``gains.png``."""
    save_json(report, out / "results.json")
    write_text(out / "results.md", format_markdown(report))
    plot_map_vs_epoch(report["methods"], out / "map_vs_epoch.png")
    plot_gains(report["methods"], report["baseline"], out / "gains.png")
    return report


def _pm(stat: dict[str, float | None]) -> str:
    """``mean ± std``; ``n/a`` for COCO's -1 (no object of that size in the set)."""
    if stat["mean"] < 0:
        return "n/a"
    return f"{stat['mean']:.4f} ± " + ("—" if stat["std"] is None else f"{stat['std']:.4f}")


def _cell(value: float | None, fmt: str, unit: str = "") -> str:
    return "—" if value is None else format(value, fmt) + unit


def format_markdown(report: dict) -> str:
    """A header (command, date, machine, data, budget, teacher and baseline AP), then one row per method."""
    m, b, d, teacher = report["machine"], report["budget"], report["data"], report["teacher"]
    s = d["synthetic"]
    data = f"synthetic scenes, {s['train']} train / {s['val']} val at {s['imgsz']} px" if s else d["yaml"]
    if d.get("labeled"):
        footage = d.get("footage")
        data += f", {100 * d['labeled']:g} % of train labeled, the rest unlabeled" + (
            f" with {footage['frames']} frames of synthetic footage at {footage['fps']:g} fps" if footage else ""
        )
    teacher_name = teacher["checkpoint"] or f"{teacher['model']} ({teacher['epochs']} epochs)"
    teacher_ap = _cell(teacher["metrics"] and teacher["metrics"]["AP"], ".4f")
    base = next((r for r in report["methods"] if r["method"] == report["baseline"]), None)
    memory = "CUDA allocated" if any(r["memory"] == "cuda" for r in report["methods"]) else "resident set size"
    ceiling = report.get("ceiling")
    recovered = ceiling is not None
    lines = [
        f"# detkd benchmark: {report['profile']}",
        "",
        f"`{report['command']}` ({report['date']})",
        "",
        f"- machine: {m['cpus']} CPUs, {m['torch_threads']} torch threads, {m['device']}",
        f"- data: {data}; budget: {b['epochs']} epochs at {b['imgsz']} px, batch {b['batch']}"
        + "".join(f", {k}={v}" for k, v in b.get("train", {}).items())
        + f"; student {report['student']}",
        f"- teacher {teacher_name}: AP {teacher_ap}; baseline ({report['baseline']}): AP "
        + (_pm(base["metrics"]["AP"]) if base else "—"),
        *_trained_on(report["methods"]),
        "",
        "| method | AP | AP50 | AP75 | APs | APm | APl | seeds | AP gain (per seed) | gain/σ | gap closed "
        + ("| labels recovered " if recovered else "")
        + "| time/run | peak mem (MB) |",
        "|---|" + "---|" * (13 if recovered else 12),
    ]
    for r in report["methods"]:
        gap = r["gap_closed"] and 100 * r["gap_closed"]
        cells = [
            r["method"],
            *(_pm(r["metrics"][k]) for k in TABLE_METRICS),
            str(len(r["seeds"])),
            _gains(r, report["baseline"]),
            _cell(r["gain_sigma"], ".1f"),
            _cell(gap, ".1f", " %"),
            *([_cell(r.get("labels_recovered") and 100 * r["labels_recovered"], ".1f", " %")] if recovered else []),
            _cell(r["time_ratio"], ".2f", "×"),
            _cell(r["peak_memory_mb"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "COCO metrics as mean ± std over seeds (— for one seed). AP gain: the method's mean AP minus the "
        "baseline's, then (in brackets) seed by seed where both ran. Gain/σ: the gain over the standard deviation of "
        "the baseline's AP over its seeds (2 or more seeds of each). Gap closed: (AP − AP_alone) / (AP_teacher − "
        "AP_alone). Time/run: wall time of a run (training and validation) over the baseline's; per epoch the same, "
        "where a method trains the baseline's epochs"
        + (
            " (a chain's counts its student's epochs only, not its assistants' training before them)"
            if any(r.get("chain") for r in report["methods"])
            else ""
        )
        + ". Peak memory: "
        f"{memory} of the training process (data-loading workers not included), the largest over seeds."
        + (
            f" Labels recovered: (AP − AP_{report['baseline']}) / (AP_{ceiling} − AP_{report['baseline']}), the "
            "share of what the hidden labels are worth that the method gets back without them."
            if recovered
            else ""
        ),
    ]
    described = [f"- {r['method']}: {r['what']}" for r in report["methods"] if r.get("what")]
    lines += ["", "Methods:", *described] if described else []
    if report["failed"]:
        lines += ["", "Failed runs (see bench.log in each): " + ", ".join(report["failed"])]
    return "\n".join(lines) + "\n"


def _gains(row: dict, baseline: str) -> str:
    if row["gain_AP"] is None or row["method"] == baseline:
        return "—"
    paired = ", ".join(f"{g:+.4f}" for g in row["paired_gains_AP"].values())
    return f"{row['gain_AP']:+.4f}" + (f" ({paired})" if paired else "")


def _trained_on(methods: list[dict]) -> list[str]:
    """Where methods train on different data (a profile with ``data.labeled``), which data each one had."""
    if all(r.get("data", "labeled") == "labeled" for r in methods):
        return []
    return ["- trained on: " + "; ".join(f"{r['method']}: {r['data']}" for r in methods)]


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def curve_axis(methods: list[dict]) -> tuple[str, list[list[float]]]:
    """The x values of each method's mAP curve: its epochs, or, where methods train different numbers of epochs (a
    method on more images matching the others' iterations), the share of its run each epoch ends, in %."""
    n = [len(r["map_per_epoch"]) for r in methods]
    if len(set(n) - {0}) <= 1:
        return "epoch", [list(range(1, k + 1)) for k in n]
    return "% of the run", [[100 * e / k for e in range(1, k + 1)] for k in n]


def plot_map_vs_epoch(methods: list[dict], path: Path) -> None:
    """COCO-style mAP50-95 from Ultralytics' validation each epoch, mean over seeds, one line per method."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    colors = matplotlib.colormaps["tab20"].colors  # dark shades, then light dashed: the default cycle repeats at 10
    label, xs = curve_axis(methods)
    for i, (r, x) in enumerate(zip(methods, xs, strict=True)):
        if r["map_per_epoch"]:
            style = {"color": colors[2 * i % 20 + i // 10 % 2], "linestyle": "-" if i < 10 else "--"}
            ax.plot(x, r["map_per_epoch"], marker="o", markersize=3, label=r["method"], **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=label, ylabel="mAP50-95 (validation, mean over seeds)", title=f"mAP vs {label}")
    if ax.lines:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_gains(methods: list[dict], baseline: str | None, path: Path) -> None:
    """COCO AP gain over the baseline per method, error bars the method's std over seeds."""
    fig, ax = _figure(max(5.0, 0.8 * len(methods) + 2), 4.5)
    rows = [r for r in methods if r["gain_AP"] is not None]
    errors = [r["metrics"]["AP"]["std"] or 0.0 for r in rows]
    bars = ax.bar([r["method"] for r in rows], [r["gain_AP"] for r in rows], yerr=errors, capsize=4)
    ax.bar_label(bars, fmt="%+.4f", fontsize="small", padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel=f"AP − AP of {baseline or 'baseline'}", title="COCO AP gain over the student alone")
    ax.tick_params(axis="x", labelrotation=30)
    fig.savefig(path, dpi=120)
