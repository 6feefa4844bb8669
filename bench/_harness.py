"""Shared harness of the benchmark scenarios: environment facts, statistics, tables, JSON, plots.

Runs in the parent process of ``python -m bench`` (the orchestrator). It never generates load
itself: load runs in worker processes (:mod:`bench._loadgen`) so the orchestrator's own work
(sampling CPU, printing) is not measured.

Result files: one ``<out>/<scenario>.json`` per scenario with the keys ``scenario``, ``mode``,
``params``, ``machine`` {cpu, cores, python, ...}, ``commit``, ``command``, ``figures`` (the
headline numbers, flat, each a ratio against a baseline measured in the same run where the
figure is a speed), ``rows`` (every measured point, as printed) and ``notes``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "RESULTS",
    "Context",
    "Result",
    "commit",
    "fmt",
    "jain",
    "machine",
    "max_min_shares",
    "percentile",
    "plotting",
    "print_table",
    "summarize",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclass
class Context:
    """What every scenario is given: the mode and where to write."""

    quick: bool
    out: Path
    plots: bool = True
    command: str = ""

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


@dataclass
class Result:
    """One scenario's output, written as ``<out>/<scenario>.json``."""

    scenario: str
    params: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def write(self, ctx: Context) -> Path:
        ctx.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "scenario": self.scenario,
            "mode": ctx.mode,
            "params": self.params,
            "machine": machine(),
            "commit": commit(),
            "command": ctx.command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(self.elapsed, 2),
            "figures": self.figures,
            "rows": self.rows,
            "notes": self.notes,
            "plots": self.plots,
        }
        path = ctx.out / f"{self.scenario}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(doc), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# -- environment ---------------------------------------------------------------------------------
_MACHINE: dict[str, Any] | None = None


def machine() -> dict[str, Any]:
    """CPU model, usable cores, Python and OS of this machine."""
    global _MACHINE
    if _MACHINE is None:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = os.cpu_count() or 1
        mem = None
        try:
            import psutil

            mem = round(psutil.virtual_memory().total / 2**30, 1)
        except Exception:
            pass
        _MACHINE = {
            "cpu": cpu,
            "cores": usable,
            "logical_cpus": os.cpu_count(),
            "memory_gib": mem,
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "os": f"{platform.system()} {platform.release()}",
        }
    return _MACHINE


def commit() -> str:
    """Short commit of the work tree, ``+dirty`` when it has changes, ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "runtime",
                "ipc",
                "bench",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return sha + ("+dirty" if dirty else "")


def plotting() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# -- statistics ----------------------------------------------------------------------------------
def save_plot(fig: Any, ctx: Context, res: Result, name: str, rect: Any = None) -> None:
    """Write ``fig`` as ``<out>/<name>.png``, close it and record it in the result."""
    path = ctx.out / f"{name}.png"
    if rect is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    res.plots.append(path.name)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linearly interpolated."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)


def summarize(values: Iterable[float]) -> dict[str, float]:
    """n, mean, p50, p90, p99, p99.9 and max of ``values`` (seconds in, microseconds out)."""
    s = sorted(values)
    if not s:
        return {"n": 0}
    us = 1e6
    return {
        "n": len(s),
        "mean_us": sum(s) / len(s) * us,
        "p50_us": percentile(s, 50) * us,
        "p90_us": percentile(s, 90) * us,
        "p99_us": percentile(s, 99) * us,
        "p999_us": percentile(s, 99.9) * us,
        "max_us": s[-1] * us,
    }


def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index of ``xs``: 1 when all equal, 1/n when one takes everything."""
    if not xs:
        return math.nan
    sq = sum(x * x for x in xs)
    if sq == 0:
        return math.nan
    return sum(xs) ** 2 / (len(xs) * sq)


def max_min_shares(demands: Sequence[float], capacity: float) -> list[float]:
    """Max-min fair (water-filling) allocation of ``capacity`` over ``demands``.

    Each demand gets min(demand, level), where the level is raised until the capacity is used
    up or every demand is met (Kubernetes APF's queueset tests compute expectations this way).
    """
    alloc = [0.0] * len(demands)
    remaining = float(capacity)
    open_ = sorted(range(len(demands)), key=lambda i: demands[i])
    while open_ and remaining > 1e-12:
        level = remaining / len(open_)
        i = open_[0]
        if demands[i] <= level:
            alloc[i] = float(demands[i])
            remaining -= demands[i]
            open_.pop(0)
        else:
            for j in open_:
                alloc[j] = level
            remaining = 0.0
            open_ = []
    return alloc


# -- output --------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A readable cell: thousands separators for big numbers, ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "-"
        a = abs(value)
        if a >= 10_000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a == 0:
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Print ``rows`` (dicts) as an aligned text table under ``title``; returns the text."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def log(msg: str) -> None:
    """Progress line on stderr (tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
