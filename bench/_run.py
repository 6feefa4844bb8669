"""Orchestrator helpers: run one measured window on several load workers at once.

Runs in the orchestrator. :func:`timed` sends one ``phase`` command to every worker with a
common start instant on the system-wide monotonic clock, samples the CPU counters of the
processes under test exactly at the window's edges (the orchestrator is idle meanwhile), and
merges the workers' replies into one :class:`Window`.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench._harness import summarize
from bench._procs import Worker

__all__ = ["Window", "split", "timed", "untimed"]

START_MARGIN = 0.15
"""Seconds between sending a phase and its first request, so every worker has received it."""


@dataclass
class Window:
    """Merged result of one phase over every worker."""

    ops: int
    seconds: float
    total_ops: int
    outcomes: Counter[str]
    latency: dict[str, list[float]]
    flows: Counter[str] = field(default_factory=Counter)
    bands: Counter[str] = field(default_factory=Counter)
    series: dict[str, Counter[int]] = field(default_factory=dict)
    events: list[list[float]] = field(default_factory=list)
    labels_total: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0
    probe_cpu_s: dict[str, float] = field(default_factory=dict)
    unfinished: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Completed admissions per second."""
        return self.ops / self.seconds if self.seconds > 0 else math.nan

    @property
    def dispatched(self) -> int:
        return self.outcomes.get("dispatched", 0)

    @property
    def dispatch_rate(self) -> float:
        return self.dispatched / self.seconds if self.seconds > 0 else math.nan

    def lat(self, label: str | None = None) -> dict[str, float]:
        """Latency summary (µs) of one label, or of every admission."""
        if label is None:
            values = [v for vs in self.latency.values() for v in vs]
        else:
            values = self.latency.get(label, [])
        return summarize(values)

    def cpu_us_per_op(self, probe: str) -> float:
        """CPU µs of the probed processes per completed admission."""
        if not self.ops or probe not in self.probe_cpu_s:
            return math.nan
        return self.probe_cpu_s[probe] / self.ops * 1e6

    @property
    def client_cpu_us_per_op(self) -> float:
        return self.client_cpu_s / self.ops * 1e6 if self.ops else math.nan


def split(groups: Sequence[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
    """Split the requester counts of ``groups`` as evenly as possible over ``n`` workers."""
    plans: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for g in groups:
        base, extra = divmod(int(g["count"]), n)
        for i in range(n):
            c = base + (1 if i < extra else 0)
            if c:
                plans[i].append({**g, "count": c})
    return plans


def _merge(replies: list[dict[str, Any]], seconds: float) -> Window:
    win = Window(0, seconds, 0, Counter(), defaultdict(list))
    for r in replies:
        win.ops += r["ops"]
        win.total_ops += r.get("total_ops", r["ops"])
        win.labels_total.update(r.get("labels_total", {}))
        win.outcomes.update(r["outcomes"])
        for label, vs in r.get("latency", {}).items():
            win.latency[label].extend(vs)
        win.flows.update(r.get("flows", {}))
        win.bands.update(r.get("bands", {}))
        for f, c in r.get("series", {}).items():
            win.series.setdefault(f, Counter()).update({int(k): v for k, v in c.items()})
        win.events.extend(r.get("events", []))
        win.client_cpu_s += r.get("cpu_s", 0.0)
        win.unfinished += r.get("unfinished", 0)
        win.errors.extend(r.get("errors", []))
    win.latency = dict(win.latency)
    return win


def _sleep_until(t: float, tick: Callable[[], None] | None = None, every: float = 0.25) -> None:
    """Sleep until monotonic ``t``, calling ``tick`` every ``every`` seconds meanwhile."""
    next_tick = time.monotonic() + every
    while True:
        now = time.monotonic()
        d = t - now
        if d <= 0:
            return
        if tick is not None and now >= next_tick:
            tick()
            next_tick += every
            continue
        time.sleep(min(d, 0.05, max(0.0, next_tick - now) if tick else 0.05))


def timed(
    workers: Sequence[Worker],
    target: str,
    groups: Sequence[dict[str, Any]] | None = None,
    *,
    plans: list[list[dict[str, Any]]] | None = None,
    duration: float,
    warmup: float,
    hold: float = 0.0,
    record: Sequence[str] = ("latency",),
    bucket: float = 0.25,
    ttl: float | None = None,
    probes: dict[str, Callable[[], float]] | None = None,
    tick: Callable[[], None] | None = None,
    tick_every: float = 0.25,
) -> Window:
    """Run ``groups`` (split evenly) or per-worker ``plans`` for one common window.

    ``probes`` are sampled at the window's edges; ``tick`` is called every ``tick_every``
    seconds during the window (for polling the daemon's statistics).
    """
    if plans is None:
        assert groups is not None
        plans = split(groups, len(workers))
    probes = probes or {}
    start_at = time.monotonic() + START_MARGIN + warmup
    index = 0
    active: list[Worker] = []
    for w, plan in zip(workers, plans, strict=True):
        if not plan:
            continue
        w.send(
            {
                "cmd": "phase",
                "target": target,
                "groups": plan,
                "hold": hold,
                "ttl": ttl,
                "record": list(record),
                "bucket": bucket,
                "start_at": start_at,
                "warmup": warmup,
                "duration": duration,
                "index_base": index,
            }
        )
        index += sum(int(g["count"]) for g in plan)
        active.append(w)
    _sleep_until(start_at)
    before = {k: f() for k, f in probes.items()}
    _sleep_until(start_at + duration, tick, tick_every)
    after = {k: f() for k, f in probes.items()}
    replies = [w.recv(timeout=duration + 120) for w in active]
    win = _merge(replies, duration)
    win.probe_cpu_s = {k: after[k] - before[k] for k in probes}
    if win.errors:
        raise RuntimeError("requester failed:\n" + win.errors[0])
    return win


def untimed(
    worker: Worker,
    target: str,
    groups: Sequence[dict[str, Any]],
    *,
    ops: int,
    warmup_ops: int = 0,
    record: Sequence[str] = ("latency",),
    hold: float = 0.0,
) -> Window:
    """Run ``ops`` counted admissions (after ``warmup_ops`` uncounted ones) on one worker."""
    reply = worker.call(
        {
            "cmd": "phase",
            "target": target,
            "groups": list(groups),
            "ops": ops,
            "warmup_ops": warmup_ops,
            "record": list(record),
            "hold": hold,
        },
        timeout=600,
    )
    win = _merge([reply], reply["seconds"])
    if win.errors:
        raise RuntimeError("requester failed:\n" + win.errors[0])
    return win
