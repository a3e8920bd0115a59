"""The report: ``results.json``, ``results.md`` and PNG plots, all from the same rows."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from benchmarks.common import Row, Stat

REPORT_KEYS = ("machine", "settings", "started", "seconds", "load_average_at_end", "rows", "extra")


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _verdict(row: Row) -> str:
    return "—" if row.met is None else ("met" if row.met else "**missed**")


def breakdown_table(data: dict[str, Any]) -> list[str]:
    """The exit breakdown (``benchmarks.exit_profile``) as a markdown table, in milliseconds."""
    stages = {k: _stat(v) for k, v in data["stages"].items()}
    total, raw = _stat(data["total"]), _stat(data["raw"])
    lines = [
        f"SIGTERM → exit of a {data['mb']:g} MB state, stage by stage (median [min, max] of"
        f" {total.n} traced runs; ms):",
        "",
        "| stage | ms | share of the exit |",
        "|---|---|---|",
    ]

    def ms(stat: Stat) -> str:
        def one(seconds: float) -> str:
            return f"{seconds * 1000:.0f}" if abs(seconds) >= 0.01 else f"{seconds * 1000:.1f}"

        if stat.n == 0:
            return "-"
        return one(stat.median) if stat.n == 1 else f"{one(stat.median)} [{one(stat.min)}, {one(stat.max)}]"

    for name, stat in stages.items():
        share = stat.median / total.median if total.median else float("nan")
        lines.append(f"| {name} | {ms(stat)} | {share:.0%} |")
    lines += [
        f"| **SIGTERM → exit** | {ms(total)} | 100% |",
        f"| os.write + fsync of the same bytes (reference) | {ms(raw)} | — |",
        "",
    ]
    return lines


def markdown(report: dict[str, Any], rows: list[Row], extra: dict[str, Any] | None = None) -> str:
    machine = report["machine"]
    lines = [
        "# lightning-grid benchmarks",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gb']:.0f} GB RAM,"
        f" disk {machine['disk']}; Python {machine['python']}, torch {machine['torch']},"
        f" lightning {machine['lightning']}. Load average (1/5/15 min) at start"
        f" {'/'.join(f'{v:.1f}' for v in machine['load_average_at_start'])}, at end"
        f" {'/'.join(f'{v:.1f}' for v in report['load_average_at_end'])}.",
        f"Preset `{report['settings']['name']}`, {report['settings']['reps']} repetitions per figure;"
        f" run took {report['seconds']:.0f} s. Values: median [min, max].",
        "",
        "| figure | case | value | compared with | baseline | ratio | target | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        baseline = row.baseline.fmt() + f" {row.unit}" if row.baseline is not None else "—"
        ratio = row.ratio.fmt() if row.ratio is not None else "—"
        lines.append(
            f"| {row.figure} | {row.case} | {row.value.fmt()} {row.unit} | {row.baseline_label} | {baseline}"
            f" | {ratio} | {row.target} | {_verdict(row)} |"
        )
    notes = [f"- {row.figure}, {row.case}: {row.notes}" for row in rows if row.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines.append("")
    if extra and "exit_breakdown" in extra:
        lines += breakdown_table(extra["exit_breakdown"])
    return "\n".join(lines)


def _stat(d: Any) -> Stat:
    return d if isinstance(d, Stat) else Stat(**d)


def plots(extra: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def errs(stats: list[Stat]) -> list[list[float]]:
        return [[s.median - s.min for s in stats], [s.max - s.median for s in stats]]

    def save(fig: Any, name: str) -> None:
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "sigterm_curve" in extra:
        curve = extra["sigterm_curve"]
        mb = [c["mb"] for c in curve]
        exits = [_stat(c["exit"]) for c in curve]
        raws = [_stat(c["raw"]) for c in curve]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(
            mb, [s.median for s in exits], yerr=errs(exits), marker="o", capsize=3, label="SIGTERM → exit"
        )
        ax.errorbar(
            mb, [s.median for s in raws], yerr=errs(raws), marker="s", capsize=3, label="raw write + fsync"
        )
        ax.plot(mb, [1.15 * s.median + 0.3 for s in raws], "k--", label="target: 1.15 × raw + 0.3 s")
        ax.set_xscale("log")
        ax.set_xlabel("checkpoint size (MB)")
        ax.set_ylabel("seconds")
        ax.set_title("SIGTERM → process exit")
        ax.legend()
        save(fig, "sigterm_to_exit.png")
    if "resume_curve" in extra:
        curve = extra["resume_curve"]
        resume = [_stat(s) for s in curve["resume"]]
        cold = _stat(curve["cold"])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(
            curve["positions"],
            [s.median for s in resume],
            yerr=errs(resume),
            marker="o",
            capsize=3,
            label="relaunch → first new step",
        )
        ax.axhline(cold.median, color="grey", label="cold start → first step")
        ax.axhline(1.5 * cold.median, color="k", linestyle="--", label="target: 1.5 × cold start")
        ax.set_xlabel("position in the epoch (%)")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.set_title("Resume overhead")
        ax.legend()
        save(fig, "resume_overhead.png")
    if "throughput" in extra:
        data = {k: _stat(v) for k, v in extra["throughput"].items()}
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(data)
        ax.bar(names, [data[n].median for n in names], yerr=errs([data[n] for n in names]), capsize=3)
        ax.set_ylabel("steps / s")
        ax.set_title("Steady-state throughput (interleaved runs)")
        save(fig, "throughput.png")
    if "wall" in extra:
        wall = extra["wall"]
        measured = [_stat(s) for s in wall["measured"]]
        predicted = [_stat(s) for s in wall["predicted"]]
        k = wall["k"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(
            k, [s.median for s in measured], yerr=errs(measured), marker="o", capsize=3, label="measured"
        )
        ax.plot(k, [s.median for s in predicted], "k--", marker="x", label="uninterrupted + k × restart")
        ax.set_xlabel("simulated preemptions k")
        ax.set_ylabel("total wall time (s)")
        ax.set_title("Wall time under preemptions")
        ax.legend()
        save(fig, "wall_time.png")
    return written


def write(out: str, report: dict[str, Any], rows: list[Row], extra: dict[str, Any]) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    data = dict(report, rows=[jsonable(r) for r in rows], extra=jsonable(extra))
    json_path = os.path.join(out, "results.json")
    with open(json_path, "w") as handle:
        json.dump(data, handle, indent=2)
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as handle:
        handle.write(markdown(report, rows, extra))
    pngs = plots(extra, out)
    return {"json": json_path, "markdown": md_path, **{os.path.basename(p): p for p in pngs}}
