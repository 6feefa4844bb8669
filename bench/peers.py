"""Scenario ``peers``: bandgate against what a user would pick instead, on the same workload.

The same admission workload through three gates: W requesters over a concurrency limit L,
release on dispatch, Zipf over F flows at P priorities (strict priority, FCFS within a band:
``global-strict`` + ``fcfs`` everywhere, since that is the order a Redis sorted set gives):

- ``bandgate``: the daemon, one shard, over its Unix socket;
- ``in-process``: :mod:`bench._inproc`, the same policy objects in the load process's own event
  loop — no IPC at all, the ceiling a cross-process design can approach;
- ``redis``: :mod:`bench._redisgate`, Lua scripts over sorted sets and a counting semaphore in a
  real ``redis-server`` (started and stopped here), the gate a Python team builds when several
  processes must share one priority admission.

Also one admission at a time (no contention) through each, for the uncontended latency.
Reported: dispatches/s, p50/p99 admit -> outcome, CPU µs per dispatch of the gate's server
process and of the load process, and the ratios bandgate / in-process and bandgate / redis.
"""

from __future__ import annotations

from typing import Any

from bench._harness import Context, Result, log, plotting, print_table, save_plot
from bench._procs import Daemon, RedisServer, Worker, redis_server_path
from bench._run import timed

NAME = "peers"
INSTALL_HINT = (
    "apt-get install -y redis-server  (and: .venv/bin/pip install -e '.[bench]' for redis-py)"
)


def params(quick: bool) -> dict[str, Any]:
    return {
        "L": 8,
        "W": 64,
        "flows": {"kind": "zipf", "n": 10, "priorities": 2, "s": 1.1},
        "fairness": "global-strict",
        "ordering": "fcfs",
        "duration_s": 1.0 if quick else 4.0,
        "warmup_s": 0.3 if quick else 1.0,
        "single_duration_s": 0.6 if quick else 3.0,
    }


def _redis_available() -> str | None:
    """None when the Redis peer can run, else why not."""
    if redis_server_path() is None:
        return "redis-server is not installed"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis Python package is not installed"
    return None


def run(ctx: Context) -> Result:
    p = params(ctx.quick)
    res = Result(NAME, p)
    rows: list[dict[str, Any]] = []
    missing = _redis_available()
    if missing:
        res.notes.append(f"redis peer skipped: {missing}; install with: {INSTALL_HINT}")
        log(f"peers: redis peer SKIPPED ({missing}); install with: {INSTALL_HINT}")
    with (
        Worker(0) as w,
        Daemon(
            shards=1, max_inflight=p["L"], fairness=p["fairness"], ordering=p["ordering"]
        ) as daemon,
    ):
        w.call(
            {
                "cmd": "connect",
                "name": "bandgate",
                "kind": "bandgate",
                "socket_dir": daemon.socket_dir,
            }
        )
        w.call(
            {
                "cmd": "connect",
                "name": "in-process",
                "kind": "inproc",
                "limit": p["L"],
                "fairness": p["fairness"],
                "ordering": p["ordering"],
            }
        )
        gates: dict[str, Any] = {"bandgate": daemon.cpu_seconds, "in-process": lambda: 0.0}
        redis_cm = None if missing else RedisServer()
        try:
            if redis_cm is not None:
                server = redis_cm.__enter__()
                w.call(
                    {
                        "cmd": "connect",
                        "name": "redis",
                        "kind": "redis",
                        "path": server.path,
                        "limit": p["L"],
                        "key": "bench",
                    }
                )
                gates["redis"] = server.cpu_seconds
            for gate, cpu in gates.items():
                for label, count, duration in (
                    ("saturated", p["W"], p["duration_s"]),
                    ("one at a time", 1, p["single_duration_s"]),
                ):
                    log(f"peers: {gate}, {label}")
                    win = timed(
                        [w], gate, [{"count": count, "flows": p["flows"]}],
                        duration=duration, warmup=p["warmup_s"], probes={"server": cpu},
                    )  # fmt: skip
                    lat = win.lat()
                    server_us = win.cpu_us_per_op("server") if gate != "in-process" else 0.0
                    rows.append(
                        {
                            "load": label,
                            "gate": gate,
                            "dispatch_per_s": win.dispatch_rate,
                            "p50_us": lat.get("p50_us"),
                            "p99_us": lat.get("p99_us"),
                            "server_cpu_us": server_us,
                            "client_cpu_us": win.client_cpu_us_per_op,
                            "total_cpu_us": server_us + win.client_cpu_us_per_op,
                            "not_dispatched": win.ops - win.dispatched,
                        }
                    )
        finally:
            if redis_cm is not None:
                redis_cm.__exit__(None, None, None)

    def get(load: str, gate: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["load"] == load and r["gate"] == gate), None)

    ratio_rows = []
    for load in ("saturated", "one at a time"):
        b = get(load, "bandgate")
        assert b is not None
        for other in ("in-process", "redis"):
            o = get(load, other)
            if o is None:
                continue
            ratio_rows.append(
                {
                    "load": load,
                    "gate": f"ratio bandgate/{other}",
                    "dispatch_per_s": b["dispatch_per_s"] / o["dispatch_per_s"],
                    "p50_us": b["p50_us"] / o["p50_us"],
                    "p99_us": b["p99_us"] / o["p99_us"],
                    "total_cpu_us": b["total_cpu_us"] / o["total_cpu_us"],
                }
            )
    print_table(
        f"peers: W={p['W']} over L={p['L']} ('saturated') and 1 requester ('one at a time'); "
        f"CPU µs per dispatch (server = daemon / redis-server)",
        [
            "load",
            "gate",
            "dispatch_per_s",
            "p50_us",
            "p99_us",
            "server_cpu_us",
            "client_cpu_us",
            "total_cpu_us",
            "not_dispatched",
        ],
        rows + ratio_rows,
    )
    res.rows = rows + ratio_rows
    figs: dict[str, Any] = {}
    for r in ratio_rows:
        key = "saturated" if r["load"] == "saturated" else "single"
        other = r["gate"].split("/")[1].replace("-", "_")
        figs[f"{key}_dispatch_ratio_vs_{other}"] = r["dispatch_per_s"]
        figs[f"{key}_p99_ratio_vs_{other}"] = r["p99_us"]
        figs[f"{key}_cpu_ratio_vs_{other}"] = r["total_cpu_us"]
    for r in rows:
        if r["load"] == "saturated":
            figs[f"{r['gate'].replace('-', '_')}_dispatch_per_s"] = r["dispatch_per_s"]
    figs["redis_skipped"] = bool(missing)
    res.figures = figs
    if ctx.plots:
        _plot(ctx, res, rows)
    return res


def _plot(ctx: Context, res: Result, rows: list[dict[str, Any]]) -> None:
    plt = plotting()
    if plt is None:
        return
    sat = [r for r in rows if r["load"] == "saturated"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(
        [r["gate"] for r in sat],
        [r["dispatch_per_s"] for r in sat],
        color=["C0", "C2", "C3"][: len(sat)],
    )
    ax1.set_yscale("log")
    ax1.set_title("saturated: dispatches / s (log)")
    ax2.bar(
        [r["gate"] for r in sat], [r["p99_us"] for r in sat], color=["C0", "C2", "C3"][: len(sat)]
    )
    ax2.set_yscale("log")
    ax2.set_title("saturated: p99 admit -> outcome (µs, log)")
    for ax in (ax1, ax2):
        ax.grid(True, axis="y", alpha=0.3)
    save_plot(fig, ctx, res, NAME)


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main([NAME, *sys.argv[1:]]))
