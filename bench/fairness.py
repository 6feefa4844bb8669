"""Scenario ``fairness``: how fair and how strict bandgate is under saturation.

Part 1, shares (Kubernetes APF queueset-test style): one band, six flows whose demand is 1, 2,
4, 8, 16 and 32 closed-loop requesters; each dispatched request holds its unit for a fixed
service time, and the limit L is well below the total demand. The max-min fair allocation of the
L units over those demands (water-filling) is each flow's expected share of dispatches. Reported:
each flow's share against it, Jain's index of (share / fair share) over flows, the worst flow's
share / fair share, and the share of every flow over time (plot). Runs: ``round-robin`` fairness
(the fair policy) on one shard (the headline) and on two (round-robin state is per shard, as in
GIE), and for contrast ``global-strict`` (GIE's default: FCFS across flows, so a flow's share
follows its demand).

Part 2, priority inversions across shards: two shards, a ``hi`` band whose requesters often find
every unit taken, and a busier ``lo`` band. An inversion is a ``lo`` dispatch while a ``hi``
request was waiting anywhere. Counted from the client's timestamps and the daemon's
``queued_seconds``: a ``lo`` request was dispatched within [sent + queued, received]; a ``hi``
request was surely waiting within [received - queued, sent + queued]; a ``lo`` dispatch whose
whole interval lies inside some ``hi`` request's sure-waiting interval is a certain inversion.
It is a lower bound: inversions shorter than the client/daemon round trip are invisible.
"""

from __future__ import annotations

import bisect
from typing import Any

from bench._harness import (
    Context,
    Result,
    jain,
    log,
    max_min_shares,
    plotting,
    print_table,
    save_plot,
)
from bench._procs import Daemon, Worker
from bench._run import Window, timed

NAME = "fairness"


def params(quick: bool) -> dict[str, Any]:
    return {
        "limit": 16,
        "demands": [1, 2, 4, 8, 16, 32],
        "service_s": 0.01,
        # (fairness policy, shards, window seconds); the first one is the headline
        "share_runs": [
            ["round-robin", 1, 2.5 if quick else 12.0],
            ["round-robin", 2, 2.5 if quick else 12.0],
            ["global-strict", 1, 1.5 if quick else 6.0],
        ],
        "warmup_s": 0.3 if quick else 1.0,
        "bucket_s": 0.25 if quick else 1.0,
        "inversion": {
            "shards": 2,
            "hi_flows": 2,
            "hi_requesters_per_flow": 7,
            "lo_flows": 4,
            "lo_requesters_per_flow": 8,
            "service_s": 0.005,
            "window_s": 2.0 if quick else 10.0,
        },
        "bands": "hi:10,lo:0",
    }


def _share_groups(demands: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "count": d,
            "flows": {"kind": "fixed", "flow": f"d{d:02d}", "priority": 0, "byte_size": 1024},
        }
        for d in demands
    ]


def _shares(
    win: Window, demands: list[int], limit: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    fair_units = max_min_shares(demands, limit)
    total_fair = sum(fair_units)
    total = sum(win.flows.values())
    rows = []
    ratios = []
    for d, fu in zip(demands, fair_units, strict=True):
        flow = f"d{d:02d}"
        share = win.flows.get(flow, 0) / total if total else 0.0
        fair = fu / total_fair
        ratios.append(share / fair)
        rows.append(
            {
                "flow": flow,
                "demand": d,
                "dispatches": win.flows.get(flow, 0),
                "share": share,
                "fair_share": fair,
                "share_vs_fair": share / fair,
            }
        )
    figures = {
        "jain": jain(ratios),
        "worst_vs_fair": min(ratios),
        "best_vs_fair": max(ratios),
        "dispatch_per_s": win.dispatch_rate,
    }
    return rows, figures


def count_inversions(events: list[list[float]], hi: int, lo: int) -> dict[str, Any]:
    """Certain inversions: ``lo`` dispatches wholly inside a ``hi`` request's sure wait."""
    waits = []  # (start, end) where a hi request was surely queued
    for prio, t0, t1, q in events:
        if prio == hi:
            a, b = t1 - q, t0 + q
            if b > a:
                waits.append((a, b))
    waits.sort()
    starts = [a for a, _ in waits]
    # prefix max of ends, so "some wait starting before x ends after y" is one lookup
    prefix_end: list[float] = []
    m = float("-inf")
    for _, b in waits:
        m = max(m, b)
        prefix_end.append(m)
    lo_events = [(t0 + q, t1) for prio, t0, t1, q in events if prio == lo]
    certain = 0
    for c, d in lo_events:
        i = bisect.bisect_left(starts, c)
        if i and prefix_end[i - 1] > d:
            certain += 1
    hi_q = sorted(q for prio, _, _, q in events if prio == hi)
    return {
        "lo_dispatches": len(lo_events),
        "hi_dispatches": len(hi_q),
        "hi_waited": len(waits),
        "certain_inversions": certain,
        "inversion_rate": certain / len(lo_events) if lo_events else 0.0,
        "hi_queued_p50_us": hi_q[len(hi_q) // 2] * 1e6 if hi_q else None,
        "hi_queued_p99_us": hi_q[int(len(hi_q) * 0.99)] * 1e6 if hi_q else None,
    }


def run(ctx: Context) -> Result:
    p = params(ctx.quick)
    res = Result(NAME, p)
    demands, limit = p["demands"], p["limit"]
    share_rows: list[dict[str, Any]] = []
    runs: dict[str, tuple[Window, dict[str, float]]] = {}
    inv: dict[str, Any] = {}
    ip = p["inversion"]
    with Worker(0) as w:
        for policy, shards, window in p["share_runs"]:
            label = f"{policy}, {shards} shard{'s' if shards > 1 else ''}"
            with Daemon(
                shards=shards, max_inflight=limit, fairness=policy, bands=p["bands"]
            ) as daemon:
                w.call(
                    {
                        "cmd": "connect",
                        "name": label,
                        "kind": "bandgate",
                        "socket_dir": daemon.socket_dir,
                    }
                )
                log(f"fairness: shares under {label}, {window}s")
                win = timed(
                    [w], label, _share_groups(demands), duration=window, warmup=p["warmup_s"],
                    hold=p["service_s"], record=("flows", "series"), bucket=p["bucket_s"],
                )  # fmt: skip
                rows, figs = _shares(win, demands, limit)
                runs[label] = (win, figs)
                share_rows += [{"run": label, **r} for r in rows]
                if shards == ip["shards"] and not inv:
                    groups = [
                        {"count": ip["hi_requesters_per_flow"], "flows": {"kind": "fixed", "flow": f"hi-{i}", "priority": 10, "byte_size": 1024}}
                        for i in range(ip["hi_flows"])
                    ] + [
                        {"count": ip["lo_requesters_per_flow"], "flows": {"kind": "fixed", "flow": f"lo-{i}", "priority": 0, "byte_size": 1024}}
                        for i in range(ip["lo_flows"])
                    ]  # fmt: skip
                    log(f"fairness: priority inversions across {shards} shards, {ip['window_s']}s")
                    iw = timed(
                        [w], label, groups, duration=ip["window_s"], warmup=p["warmup_s"],
                        hold=ip["service_s"], record=("events",),
                    )  # fmt: skip
                    inv = count_inversions(iw.events, hi=10, lo=0)
                    inv["dispatch_per_s"] = iw.dispatch_rate
                    inv["run"] = label

    print_table(
        f"fairness: share of dispatches vs max-min fair share (limit {limit}, "
        f"service {p['service_s'] * 1e3:.0f} ms)",
        ["run", "flow", "demand", "dispatches", "share", "fair_share", "share_vs_fair"],
        share_rows,
    )
    summary_rows = [{"run": k, **v} for k, (_, v) in runs.items()]
    print_table(
        "fairness: summary",
        ["run", "jain", "worst_vs_fair", "best_vs_fair", "dispatch_per_s"],
        summary_rows,
    )
    print_table(
        "priority inversions across shards (certain = provable from client timestamps; a lower bound)",
        ["run", "lo_dispatches", "hi_dispatches", "hi_waited", "certain_inversions", "inversion_rate", "hi_queued_p50_us", "hi_queued_p99_us", "dispatch_per_s"],
        [inv],
    )  # fmt: skip
    res.rows = (
        share_rows + [{"summary": True, **r} for r in summary_rows] + [{"inversions": True, **inv}]
    )
    labels = list(runs)
    head, sharded, contrast = (runs[k][1] for k in labels)
    res.figures = {
        "headline_run": labels[0],
        "jain": head["jain"],
        "worst_vs_fair": head["worst_vs_fair"],
        "jain_2_shards": sharded["jain"],
        "worst_vs_fair_2_shards": sharded["worst_vs_fair"],
        "global_strict_jain": contrast["jain"],
        "global_strict_worst_vs_fair": contrast["worst_vs_fair"],
        "certain_inversions": inv["certain_inversions"],
        "lo_dispatches": inv["lo_dispatches"],
        "inversion_rate": inv["inversion_rate"],
        "hi_waited": inv["hi_waited"],
    }
    res.notes.append(
        "Jain's index is over each flow's (share / max-min fair share), so 1.0 means every flow "
        "got exactly its fair share; worst_vs_fair is the most short-changed flow's ratio. "
        "Demand is in closed-loop requesters, so a small flow cannot use a whole unit: between "
        "a release and its next dispatch the unit serves someone else. Round-robin state is per "
        "shard (as in GIE), so with 2 shards a flow's turns are split."
    )
    if ctx.plots:
        _plot(ctx, res, runs, demands, limit, p["bucket_s"])
    return res


def _plot(
    ctx: Context,
    res: Result,
    runs: dict[str, tuple[Window, dict[str, float]]],
    demands: list[int],
    limit: int,
    bucket: float,
) -> None:
    plt = plotting()
    if plt is None:
        res.notes.append("matplotlib missing: no plot")
        return
    fair_units = max_min_shares(demands, limit)
    fair = [u / sum(fair_units) for u in fair_units]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), sharey=True)
    for ax, (label, (win, figs)) in zip(axes, runs.items(), strict=True):
        buckets = sorted({b for c in win.series.values() for b in c})
        totals = {b: sum(c.get(b, 0) for c in win.series.values()) for b in buckets}
        for i, d in enumerate(demands):
            flow = f"d{d:02d}"
            c = win.series.get(flow, {})
            xs = [(b + 0.5) * bucket for b in buckets if totals[b]]
            ys = [c.get(b, 0) / totals[b] for b in buckets if totals[b]]
            line = ax.plot(xs, ys, "-o", markersize=3, label=f"{flow} (demand {d})")[0]
            ax.axhline(fair[i], color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_title(
            f"{label}\nJain {figs['jain']:.3f}, worst flow {figs['worst_vs_fair']:.2f}x fair",
            fontsize=10,
        )
        ax.set_xlabel("time in window (s)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("share of dispatches (dashed: max-min fair share)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(demands), fontsize=8)
    save_plot(fig, ctx, res, NAME, rect=(0, 0.07, 1, 1))


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main([NAME, *sys.argv[1:]]))
