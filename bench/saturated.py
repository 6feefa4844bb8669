"""Scenario ``saturated``: dispatches per second with deep queues (GIE's own method), and drain.

Measured, part 1 (GIE ``benchmark/benchmark.go``, reference.md §8): W concurrent requesters
above a concurrency limit L, each releasing its unit as soon as it is dispatched (after one
event-loop turn), so the queues stay about W - L deep and every dispatch runs the fairness and
ordering policies. Flow i is ``flow-i`` at priority ``i % P`` with GIE's request size
``100 + (i * 2654435769 mod 2^32) mod 9000`` bytes, chosen by Zipf(s=1.1, v=1) over F flows;
every flow is touched once before the window so the figure is steady state, not provisioning.
Grid: L x W (W > L) x F in {10, 10000} x P in {1, 8}, one shard. Beside every W, the raw echo
server driven by W requesters (the IPC floor for the same two messages per dispatch).

Part 2, backlog drain: a daemon with limit N; hold all N units, queue N more requests behind
them (10 flows), release the N held units at once and time until the last queued request has its
outcome at the client. GIE dispatches at most one item per 1 ms cycle, so its design is bounded
near 1,000 dispatches/s per shard here; the figure is the ratio to that bound. The same drain
through the in-process gate (:mod:`bench._inproc`) is the no-IPC ceiling.
"""

from __future__ import annotations

from typing import Any

from bench._harness import Context, Result, log, plotting, print_table, save_plot
from bench._procs import Daemon, EchoServer, Worker
from bench._run import timed, untimed

NAME = "saturated"
GIE_DRAIN_BOUND = 1000.0
"""GIE: one dispatch per cycle, cycles per arrival and per 1 ms tick -> ~1,000/s per shard."""


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "L": [8],
            "W": [64],
            "F": [10, 10000],
            "P": [1, 8],
            "duration_s": 0.7,
            "warmup_s": 0.3,
            "shards": 1,
            "drain_n": 10000,
            "headline": {"L": 8, "W": 64, "F": 10, "P": 1},
        }
    return {
        "L": [1, 8, 64],
        "W": [16, 64, 256, 1024],
        "F": [10, 10000],
        "P": [1, 8],
        "duration_s": 2.0,
        "warmup_s": 0.7,
        "shards": 1,
        "drain_n": 50000,
        "headline": {"L": 8, "W": 64, "F": 10, "P": 1},
    }


def _flows(f: int, p: int) -> dict[str, Any]:
    return {"kind": "zipf", "n": f, "priorities": p, "s": 1.1}


def run(ctx: Context) -> Result:
    p = params(ctx.quick)
    res = Result(NAME, p)
    rows: list[dict[str, Any]] = []
    echo_rate: dict[int, float] = {}
    with EchoServer() as echo, Worker(0) as w:
        w.call({"cmd": "connect", "name": "echo", "kind": "echo", "path": echo.path})
        for W in sorted({W for W in p["W"] if any(W > L for L in p["L"])}):
            win = timed(
                [w],
                "echo",
                [{"count": W, "flows": _flows(10, 1)}],
                duration=p["duration_s"],
                warmup=p["warmup_s"],
            )
            echo_rate[W] = win.rate
        for L in p["L"]:
            with Daemon(shards=p["shards"], max_inflight=L, max_flows=65536) as daemon:
                name = f"bandgate-L{L}"
                w.call(
                    {
                        "cmd": "connect",
                        "name": name,
                        "kind": "bandgate",
                        "socket_dir": daemon.socket_dir,
                    }
                )
                for F in p["F"]:
                    for P in p["P"]:
                        if F > 10:
                            log(f"saturated: touching {F} flows at {P} priorities")
                            untimed(
                                w,
                                name,
                                [
                                    {
                                        "count": 64,
                                        "flows": {"kind": "sweep", "n": F, "priorities": P},
                                    }
                                ],
                                ops=F,
                                record=(),
                            )
                        for W in p["W"]:
                            if W <= L:
                                continue
                            log(f"saturated: L={L} W={W} F={F} P={P}")
                            win = timed(
                                [w], name, [{"count": W, "flows": _flows(F, P)}],
                                duration=p["duration_s"], warmup=p["warmup_s"],
                                probes={"daemon": daemon.cpu_seconds},
                            )  # fmt: skip
                            lat = win.lat()
                            rows.append(
                                {
                                    "L": L, "W": W, "F": F, "P": P,
                                    "dispatch_per_s": win.dispatch_rate,
                                    "echo_per_s": echo_rate[W],
                                    "ratio_vs_echo": win.dispatch_rate / echo_rate[W],
                                    "p50_us": lat.get("p50_us"),
                                    "p99_us": lat.get("p99_us"),
                                    "daemon_cpu_us": win.cpu_us_per_op("daemon"),
                                    "client_cpu_us": win.client_cpu_us_per_op,
                                    "not_dispatched": win.ops - win.dispatched,
                                }
                            )  # fmt: skip
        print_table(
            "saturated: W requesters over limit L, release on dispatch, one shard "
            "(p50/p99 = admit -> outcome incl. queueing; daemon_cpu_us per dispatch)",
            [
                "L",
                "W",
                "F",
                "P",
                "dispatch_per_s",
                "echo_per_s",
                "ratio_vs_echo",
                "p50_us",
                "p99_us",
                "daemon_cpu_us",
                "client_cpu_us",
                "not_dispatched",
            ],
            rows,
        )

        # -- part 2: backlog drain ---------------------------------------------------------------
        n = p["drain_n"]
        drain_rows = []
        with Daemon(shards=1, max_inflight=n) as daemon:
            w.call(
                {
                    "cmd": "connect",
                    "name": "drain",
                    "kind": "bandgate",
                    "socket_dir": daemon.socket_dir,
                }
            )
            log(f"saturated: backlog drain of {n} through bandgate")
            d = w.call(
                {"cmd": "drain", "target": "drain", "held": n, "queued": n, "flows": _flows(10, 1)},
                timeout=300,
            )
            drain_rows.append({"gate": "bandgate (1 shard)", **d})
        w.call({"cmd": "connect", "name": "inproc-drain", "kind": "inproc", "limit": n})
        d = w.call(
            {
                "cmd": "drain",
                "target": "inproc-drain",
                "held": n,
                "queued": n,
                "flows": _flows(10, 1),
            },
            timeout=300,
        )
        drain_rows.append({"gate": "in-process gate", **d})
    for r in drain_rows:
        r["ratio_vs_gie_bound"] = r["rate"] / GIE_DRAIN_BOUND
        r["dispatched"] = r["outcomes"].get("dispatched", 0)
    print_table(
        f"backlog drain: {n} queued behind a held budget of {n}, released at once "
        f"(GIE bound ~{GIE_DRAIN_BOUND:.0f}/s per shard)",
        ["gate", "queued", "dispatched", "drain_s", "first_s", "rate", "ratio_vs_gie_bound"],
        drain_rows,
    )
    res.rows = rows + [{"drain": True, **r} for r in drain_rows]
    h = p["headline"]
    head = next((r for r in rows if all(r[k] == v for k, v in h.items())), rows[0])
    bg_drain = drain_rows[0]
    res.figures = {
        "headline_point": h,
        "dispatch_per_s": head["dispatch_per_s"],
        "ratio_vs_echo": head["ratio_vs_echo"],
        "daemon_cpu_us_per_dispatch": head["daemon_cpu_us"],
        "dispatch_per_s_min": min(r["dispatch_per_s"] for r in rows),
        "dispatch_per_s_max": max(r["dispatch_per_s"] for r in rows),
        "flows_10000_vs_10": _ratio(rows, "F", 10000, 10),
        "bands_8_vs_1": _ratio(rows, "P", 8, 1),
        "drain_n": n,
        "drain_per_s": bg_drain["rate"],
        "drain_ratio_vs_gie_bound": bg_drain["rate"] / GIE_DRAIN_BOUND,
        "drain_ratio_vs_inproc": bg_drain["rate"] / drain_rows[1]["rate"],
        "not_dispatched_total": sum(r["not_dispatched"] for r in rows),
    }
    res.notes.append(
        "d/s counts dispatches completed at the client within the window; the drain rate is "
        "queued / (last outcome at the client - release of the held units)."
    )
    if ctx.plots:
        _plot(ctx, res, rows)
    return res


def _ratio(rows: list[dict[str, Any]], key: str, a: int, b: int) -> float | None:
    """Geometric mean over matching grid points of d/s(key=a) / d/s(key=b)."""
    import math

    others = [k for k in ("L", "W", "F", "P") if k != key]
    ratios = []
    for r in rows:
        if r[key] != a:
            continue
        for s in rows:
            same_point = s[key] == b and all(s[k] == r[k] for k in others)
            if same_point and r["dispatch_per_s"] > 0 and s["dispatch_per_s"] > 0:
                ratios.append(r["dispatch_per_s"] / s["dispatch_per_s"])
    if not ratios:
        return None
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios))


def _plot(ctx: Context, res: Result, rows: list[dict[str, Any]]) -> None:
    plt = plotting()
    if plt is None:
        res.notes.append("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(rows) + 3), 4.5))
    labels = [f"L{r['L']} W{r['W']}\nF{r['F']} P{r['P']}" for r in rows]
    xs = range(len(rows))
    ax.bar(
        [x - 0.2 for x in xs],
        [r["dispatch_per_s"] for r in rows],
        width=0.4,
        label="bandgate dispatches/s",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [r["echo_per_s"] for r in rows],
        width=0.4,
        label="raw echo at W",
        alpha=0.6,
    )
    ax.axhline(GIE_DRAIN_BOUND, color="red", linestyle=":", label="GIE ~1 dispatch/ms/shard")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("per second")
    ax.set_title("saturated: W requesters over limit L (release on dispatch)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    save_plot(fig, ctx, res, NAME)


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main([NAME, *sys.argv[1:]]))
