"""Scenario ``latency``: what bandgate costs one request, against the IPC floor.

Measured: one admission at a time (a single requester, no concurrency limit, one shard), the
time from ``await client.admit(...)`` to its outcome, p50/p99 over many admissions; beside it the
same loop against the raw echo server of :mod:`bench._echo` (same AF_UNIX transport, same
framing, same msgpack codec, same asyncio loop, no flow control). Both run in one load-generator
process, alternating in rounds so drift on the machine hits both alike.

Headline: ``ratio_p50`` and ``ratio_p99`` = bandgate / echo, and the absolute overhead in µs.
"""

from __future__ import annotations

from bench._harness import Context, Result, log, plotting, print_table, save_plot
from bench._procs import Daemon, EchoServer, Worker
from bench._run import untimed

NAME = "latency"


def params(quick: bool) -> dict[str, object]:
    return {
        "samples_per_target": 3000 if quick else 30000,
        "rounds": 6 if quick else 10,
        "warmup_ops": 300 if quick else 2000,
        "shards": 1,
        "max_inflight": 0,
        "flow": "lat-0@0",
        "byte_size": 1024,
        "concurrency": 1,
    }


def run(ctx: Context) -> Result:
    p = params(ctx.quick)
    res = Result(NAME, p)
    rounds = int(p["rounds"])  # type: ignore[arg-type]
    per_round = int(p["samples_per_target"]) // rounds  # type: ignore[arg-type]
    group = [
        {
            "count": 1,
            "flows": {"kind": "fixed", "flow": "lat-0", "priority": 0, "byte_size": p["byte_size"]},
        }
    ]
    samples: dict[str, list[float]] = {"echo": [], "bandgate": []}
    with Daemon(shards=1, max_inflight=0) as daemon, EchoServer() as echo, Worker(0) as w:
        w.call(
            {
                "cmd": "connect",
                "name": "bandgate",
                "kind": "bandgate",
                "socket_dir": daemon.socket_dir,
            }
        )
        w.call({"cmd": "connect", "name": "echo", "kind": "echo", "path": echo.path})
        for target in samples:
            untimed(w, target, group, ops=int(p["warmup_ops"]))  # type: ignore[arg-type]
        log(f"latency: {rounds} rounds x {per_round} admissions per target")
        for r in range(rounds):
            order = ("echo", "bandgate") if r % 2 == 0 else ("bandgate", "echo")
            for target in order:
                win = untimed(w, target, group, ops=per_round)
                samples[target].extend(win.latency.get("", []))
    from bench._harness import summarize

    stats = {t: summarize(v) for t, v in samples.items()}
    rows = [{"target": t, **s} for t, s in stats.items()]
    e, b = stats["echo"], stats["bandgate"]
    ratio = {k: b[k] / e[k] for k in ("mean_us", "p50_us", "p90_us", "p99_us", "p999_us")}
    rows.append({"target": "ratio bandgate/echo", **{k: ratio.get(k) for k in b if k != "n"}})
    print_table(
        "latency: one admission at a time, admit -> outcome (µs)",
        ["target", "n", "mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"],
        rows,
    )
    res.rows = rows
    res.figures = {
        "bandgate_p50_us": b["p50_us"],
        "bandgate_p99_us": b["p99_us"],
        "echo_p50_us": e["p50_us"],
        "echo_p99_us": e["p99_us"],
        "ratio_p50": ratio["p50_us"],
        "ratio_p99": ratio["p99_us"],
        "overhead_p50_us": b["p50_us"] - e["p50_us"],
        "overhead_p99_us": b["p99_us"] - e["p99_us"],
    }
    res.notes.append(
        "Raw echo = same AF_UNIX socket, ipc.framing, ipc.codec Submit/Decided and asyncio loop, "
        "one server process, no flow control. Interleaved rounds; one load process for both."
    )
    if ctx.plots:
        _plot(ctx, res, samples)
    return res


def _plot(ctx: Context, res: Result, samples: dict[str, list[float]]) -> None:
    plt = plotting()
    if plt is None:
        res.notes.append("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for target, values in samples.items():
        s = sorted(v * 1e6 for v in values)
        n = len(s)
        ax.plot(s, [(i + 1) / n for i in range(n)], label=target)
    ax.set_xscale("log")
    ax.set_xlabel("admit -> outcome (µs, log)")
    ax.set_ylabel("fraction of admissions")
    ax.set_title("latency: one admission at a time (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_plot(fig, ctx, res, NAME)


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main([NAME, *sys.argv[1:]]))
