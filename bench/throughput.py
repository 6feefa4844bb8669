"""Scenario ``throughput``: how much bandgate carries with no limit, against the IPC floor.

Measured: C concurrent asyncio requesters (C in 1, 8, 64, 256, split over one or two client
processes), each looping admit -> release with no concurrency limit, one shard; admissions per
second over a fixed window, beside the raw echo server (:mod:`bench._echo`) driven by the same
requesters at the same concurrency. CPU is sampled at the window's edges: microseconds per
admission summed over every daemon process (coordinator, shard, GC), beside the echo server's,
and the load processes' own.

Headline: ``ratio_at_64`` = bandgate / echo admissions per second at C=64, one client process.
"""

from __future__ import annotations

from typing import Any

from bench._harness import Context, Result, log, plotting, print_table, save_plot
from bench._procs import Daemon, EchoServer, Worker
from bench._run import timed

NAME = "throughput"


def params(quick: bool) -> dict[str, Any]:
    return {
        "concurrency": [1, 8, 64, 256],
        "client_processes": [1, 2],
        "duration_s": 0.5 if quick else 3.0,
        "warmup_s": 0.2 if quick else 1.0,
        "shards": 1,
        "max_inflight": 0,
        "flows": {"kind": "zipf", "n": 10, "priorities": 1, "s": 1.1},
    }


def run(ctx: Context) -> Result:
    p = params(ctx.quick)
    res = Result(NAME, p)
    rows: list[dict[str, Any]] = []
    with (
        Daemon(shards=p["shards"], max_inflight=p["max_inflight"]) as daemon,
        EchoServer() as echo,
        Worker(0) as w0,
        Worker(1) as w1,
    ):
        workers = [w0, w1]
        for w in workers:
            w.call(
                {
                    "cmd": "connect",
                    "name": "bandgate",
                    "kind": "bandgate",
                    "socket_dir": daemon.socket_dir,
                }
            )
            w.call({"cmd": "connect", "name": "echo", "kind": "echo", "path": echo.path})
        probes = {"bandgate": daemon.cpu_seconds, "echo": echo.cpu_seconds}
        for nproc in p["client_processes"]:
            for c in p["concurrency"]:
                if c < nproc:
                    continue
                log(f"throughput: {nproc} process(es), concurrency {c}")
                point: dict[str, Any] = {}
                for target in ("echo", "bandgate") if c % 2 else ("bandgate", "echo"):
                    win = timed(
                        workers[:nproc],
                        target,
                        [{"count": c, "flows": p["flows"]}],
                        duration=p["duration_s"],
                        warmup=p["warmup_s"],
                        probes={target: probes[target]},
                    )
                    lat = win.lat()
                    point[target] = {
                        "processes": nproc,
                        "concurrency": c,
                        "target": target,
                        "adm_per_s": win.rate,
                        "p50_us": lat.get("p50_us"),
                        "p99_us": lat.get("p99_us"),
                        "server_cpu_us": win.cpu_us_per_op(target),
                        "client_cpu_us": win.client_cpu_us_per_op,
                        "not_dispatched": win.ops - win.dispatched,
                    }
                b, e = point["bandgate"], point["echo"]
                rows += [
                    e,
                    b,
                    {
                        "processes": nproc,
                        "concurrency": c,
                        "target": "ratio bandgate/echo",
                        "adm_per_s": b["adm_per_s"] / e["adm_per_s"],
                        "p50_us": b["p50_us"] / e["p50_us"],
                        "p99_us": b["p99_us"] / e["p99_us"],
                        "server_cpu_us": b["server_cpu_us"] / e["server_cpu_us"],
                        "client_cpu_us": b["client_cpu_us"] / e["client_cpu_us"],
                    },
                ]
    print_table(
        "throughput: admit + release, no limit (server_cpu_us = CPU µs per admission summed over "
        "every daemon process, or the echo server)",
        [
            "processes",
            "concurrency",
            "target",
            "adm_per_s",
            "p50_us",
            "p99_us",
            "server_cpu_us",
            "client_cpu_us",
            "not_dispatched",
        ],
        rows,
    )
    res.rows = rows

    def pick(nproc: int, c: int, target: str) -> dict[str, Any]:
        for r in rows:
            if r["processes"] == nproc and r["concurrency"] == c and r["target"] == target:
                return r
        return {}

    ratio64 = pick(1, 64, "ratio bandgate/echo")
    b64, e64 = pick(1, 64, "bandgate"), pick(1, 64, "echo")
    best = max((r for r in rows if r["target"] == "bandgate"), key=lambda r: r["adm_per_s"])
    res.figures = {
        "bandgate_adm_per_s_at_64": b64.get("adm_per_s"),
        "echo_adm_per_s_at_64": e64.get("adm_per_s"),
        "ratio_at_64": ratio64.get("adm_per_s"),
        "ratio_at_64_two_processes": pick(2, 64, "ratio bandgate/echo").get("adm_per_s"),
        "daemon_cpu_us_per_admission_at_64": b64.get("server_cpu_us"),
        "echo_cpu_us_per_admission_at_64": e64.get("server_cpu_us"),
        "cpu_ratio_at_64": ratio64.get("server_cpu_us"),
        "bandgate_peak_adm_per_s": best["adm_per_s"],
        "bandgate_peak_at": f"{best['processes']} proc x {best['concurrency']}",
        "not_dispatched_total": sum(r.get("not_dispatched") or 0 for r in rows),
    }
    res.notes.append(
        "One shard (the echo server is one process too). The machine has "
        "2 cores shared by the daemon, the echo server and the load processes."
    )
    if ctx.plots:
        _plot(ctx, res, rows, p)
    return res


def _plot(ctx: Context, res: Result, rows: list[dict[str, Any]], p: dict[str, Any]) -> None:
    plt = plotting()
    if plt is None:
        res.notes.append("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for nproc in p["client_processes"]:
        for target, style in (("bandgate", "-o"), ("echo", "--s")):
            pts = [
                (r["concurrency"], r["adm_per_s"])
                for r in rows
                if r["processes"] == nproc and r["target"] == target
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{target}, {nproc} client proc")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requesters")
    ax.set_ylabel("admissions / s")
    ax.set_title("throughput: admit + release, no limit")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_ylim(bottom=0)
    save_plot(fig, ctx, res, NAME)


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main([NAME, *sys.argv[1:]]))
