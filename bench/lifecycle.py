"""Scenario ``lifecycle``: what creating flows and bands costs, and how fast idle ones are collected.

Part 1, creation latency: one admission at a time, in turn: (a) to a flow that exists, (b) to a
new flow in an existing band (the shard asks the coordinator to provision the flow just in time),
(c) to a new flow at a new priority (the coordinator also provisions a dynamic band). Reported:
p50/p99 of each, and the ratios (b)/(a) and (c)/(a).

Part 2, churn: requesters admit to novel flows for a while (every tenth at a novel priority, so
also novel bands) while flows and bands expire after a short idle time
(``BANDGATE_FLOW_GC_TIMEOUT``/``BANDGATE_BAND_GC_TIMEOUT``); the daemon's statistics are polled.
Two rounds, each followed by a wait until everything idle is collected. Reported: flows and bands
created and collected per second, live flows and bands over time (plot), how long the backlog of
idle ones takes to be collected after the churn stops, every admission's outcome (any outcome
but ``dispatched`` would be a lost request), and the daemon's memory (RSS and USS summed over its
processes) before, at the peak, and after each round's collection. Growth in round 1 that round 2
does not repeat is the allocator keeping freed memory; growth in every round would be a leak.
"""

from __future__ import annotations

import time
from typing import Any

from bench._harness import Context, Result, log, plotting, print_table, save_plot
from bench._procs import Daemon, Worker
from bench._run import START_MARGIN, timed, untimed

NAME = "lifecycle"


def params(quick: bool) -> dict[str, Any]:
    return {
        "shards": 2,
        "flow_gc_timeout": "50ms",
        "band_gc_timeout": "100ms",
        "gc_interval": "10ms",
        "max_bands": 4096,
        "creation_ops": 900 if quick else 9000,
        "churn_requesters": 16,
        "churn_s": 2.0 if quick else 10.0,
        "churn_rounds": 2,
        "new_band_every": 10,
        "settle_timeout_s": 15.0,
        "poll_s": 0.2,
    }


def run(ctx: Context) -> Result:
    p = params(ctx.quick)
    res = Result(NAME, p)
    samples: list[dict[str, Any]] = []
    with (
        Daemon(
            shards=p["shards"],
            max_inflight=0,
            flow_gc_timeout=p["flow_gc_timeout"],
            band_gc_timeout=p["band_gc_timeout"],
            gc_interval=p["gc_interval"],
            max_bands=p["max_bands"],
        ) as daemon,
        Worker(0) as w,
    ):
        w.call(
            {"cmd": "connect", "name": "bg", "kind": "bandgate", "socket_dir": daemon.socket_dir}
        )
        # -- part 1 ----------------------------------------------------------------------------
        log(f"lifecycle: creation latency, {p['creation_ops']} admissions")
        untimed(
            w,
            "bg",
            [
                {
                    "count": 1,
                    "flows": {"kind": "lifecycle", "prefix": "warm", "band_base": 10_000_000},
                }
            ],
            ops=90,
            record=(),
        )
        creation = untimed(
            w,
            "bg",
            [{"count": 1, "flows": {"kind": "lifecycle", "prefix": "lc", "band_base": 20_000_000}}],
            ops=p["creation_ops"],
        )
        lat = {k: creation.lat(k) for k in ("existing", "new_flow", "new_band")}
        # -- part 2 ----------------------------------------------------------------------------
        base = _settle(daemon, {}, p["settle_timeout_s"])
        mem_before = daemon.rss_bytes()
        st0 = daemon.stats()
        t_start = time.monotonic()
        peak = dict(mem_before)

        def poll() -> None:
            st = daemon.stats()
            m = daemon.rss_bytes()
            peak["rss"] = max(peak["rss"], m["rss"])
            peak["uss"] = max(peak["uss"], m["uss"])
            samples.append(
                {
                    "t": time.monotonic() - t_start,
                    "flows": st["flows"],
                    "bands": len(st["bands"]),
                    "flows_removed": st["gc"]["flows_removed"] - st0["gc"]["flows_removed"],
                    "bands_removed": st["gc"]["bands_removed"] - st0["gc"]["bands_removed"],
                    "rss_mib": m["rss"] / 2**20,
                }
            )

        rounds: list[dict[str, Any]] = []
        for r in range(p["churn_rounds"]):
            log(
                f"lifecycle: churn round {r + 1}/{p['churn_rounds']}, {p['churn_requesters']} "
                f"requesters on novel flows for {p['churn_s']}s"
            )
            st1 = daemon.stats()
            t_round = time.monotonic() - t_start + START_MARGIN
            churn = timed(
                [w], "bg",
                [{"count": p["churn_requesters"], "flows": {"kind": "novel", "prefix": f"churn{r}", "new_band_every": p["new_band_every"], "band_base": 100_000_000 * (r + 1)}}],
                duration=p["churn_s"], warmup=0.0, record=("flows",), tick=poll, tick_every=p["poll_s"],
            )  # fmt: skip
            st2 = daemon.stats()
            t_churn_end = time.monotonic()
            after = _settle(daemon, base, p["settle_timeout_s"], tick=poll)
            settle_s = time.monotonic() - t_churn_end
            st3 = daemon.stats()
            created = churn.total_ops  # every admission of the churn made a new flow
            rounds.append(
                {
                    "round": r + 1,
                    "t0": t_round,
                    "flows_created": created,
                    "flows_created_per_s": churn.ops / churn.seconds,
                    "flows_collected_per_s": _gc(st2, st1, "flows_removed") / churn.seconds,
                    "bands_created": churn.labels_total.get("new_band", 0),
                    "bands_collected_per_s": _gc(st2, st1, "bands_removed") / churn.seconds,
                    "collected_flows": _gc(st3, st1, "flows_removed"),
                    "collected_bands": _gc(st3, st1, "bands_removed"),
                    "settle_s": settle_s,
                    "live_flows_after": after.get("flows"),
                    "live_bands_after": after.get("bands"),
                    "not_dispatched": churn.ops - churn.dispatched,
                    "rss_after_mib": daemon.rss_bytes()["rss"] / 2**20,
                    "uss_after_mib": daemon.rss_bytes()["uss"] / 2**20,
                }
            )  # fmt: skip
        mem_after = daemon.rss_bytes()

    rows_lat = [{"request": k, **v} for k, v in lat.items()]
    e = lat["existing"]
    for k in ("new_flow", "new_band"):
        rows_lat.append(
            {
                "request": f"ratio {k}/existing",
                **{m: lat[k][m] / e[m] for m in ("mean_us", "p50_us", "p90_us", "p99_us")},
            }
        )
    print_table(
        "lifecycle: admit -> outcome (µs) of a request that creates its flow / band, vs one that does not",
        ["request", "n", "mean_us", "p50_us", "p90_us", "p99_us", "max_us"],
        rows_lat,
    )
    print_table(
        "lifecycle: churn (novel flows; every tenth at a novel priority), per round",
        [k for k in rounds[0] if k != "t0"],
        rounds,
    )
    created_flows = sum(r["flows_created"] for r in rounds)
    created_bands = sum(r["bands_created"] for r in rounds)
    collected_flows = sum(r["collected_flows"] for r in rounds)
    collected_bands = sum(r["collected_bands"] for r in rounds)
    churn_row = {
        "flows_created_per_s": _mean(rounds, "flows_created_per_s"),
        "flows_collected_per_s": _mean(rounds, "flows_collected_per_s"),
        "bands_collected_per_s": _mean(rounds, "bands_collected_per_s"),
        "settle_s": max(r["settle_s"] for r in rounds),
        "not_dispatched": sum(r["not_dispatched"] for r in rounds),
    }
    mem_rows = [
        {"when": "before churn", "rss_mib": mem_before["rss"] / 2**20, "uss_mib": mem_before["uss"] / 2**20},
        {"when": "peak", "rss_mib": peak["rss"] / 2**20, "uss_mib": peak["uss"] / 2**20},
    ] + [
        {"when": f"after round {r['round']} + collection", "rss_mib": r["rss_after_mib"], "uss_mib": r["uss_after_mib"]}
        for r in rounds
    ]  # fmt: skip
    print_table(
        "lifecycle: daemon memory, summed over its processes (MiB)",
        ["when", "rss_mib", "uss_mib"],
        mem_rows,
    )
    res.rows = (
        rows_lat
        + [{"churn": True, **r} for r in rounds]
        + [{"memory": True, **m} for m in mem_rows]
    )
    res.figures = {
        "existing_p50_us": e["p50_us"],
        "new_flow_p50_us": lat["new_flow"]["p50_us"],
        "new_band_p50_us": lat["new_band"]["p50_us"],
        "new_flow_ratio_p50": lat["new_flow"]["p50_us"] / e["p50_us"],
        "new_band_ratio_p50": lat["new_band"]["p50_us"] / e["p50_us"],
        "new_flow_ratio_p99": lat["new_flow"]["p99_us"] / e["p99_us"],
        "new_band_ratio_p99": lat["new_band"]["p99_us"] / e["p99_us"],
        "flows_created_per_s": churn_row["flows_created_per_s"],
        "flows_collected_per_s": churn_row["flows_collected_per_s"],
        "bands_collected_per_s": churn_row["bands_collected_per_s"],
        "collected_vs_created_flows": collected_flows / created_flows if created_flows else None,
        "collected_vs_created_bands": collected_bands / created_bands if created_bands else None,
        "settle_s": churn_row["settle_s"],
        "memory_after_vs_before_rss": mem_after["rss"] / mem_before["rss"],
        "memory_after_vs_before_uss": mem_after["uss"] / mem_before["uss"],
        # growth of the second round over the first: ~1 means the first round's growth was
        # the allocator keeping freed memory, not state that leaks with every flow
        "memory_round2_vs_round1_rss": rounds[-1]["rss_after_mib"] / rounds[0]["rss_after_mib"],
        "not_dispatched": churn_row["not_dispatched"],
    }
    if ctx.plots:
        _plot(ctx, res, samples, [(r["t0"], r["t0"] + p["churn_s"]) for r in rounds])
    return res


def _gc(after: dict[str, Any], before: dict[str, Any], counter: str) -> int:
    """Increase of one of the daemon's GC counters between two ``stats()``."""
    return int(after["gc"][counter] - before["gc"][counter])


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _settle(
    daemon: Daemon, base: dict[str, int], timeout: float, tick: Any = None
) -> dict[str, int]:
    """Wait until the live flows and bands are back to ``base`` (or stop changing)."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    stable = 0
    while time.monotonic() < deadline:
        st = daemon.stats()
        now = {"flows": st["flows"], "bands": len(st["bands"])}
        if tick:
            tick()
        if base and now["flows"] <= base["flows"] and now["bands"] <= base["bands"]:
            return now
        stable = stable + 1 if now == last else 0
        if not base and stable >= 3:
            return now
        last = now
        time.sleep(0.1)
    return last


def _plot(
    ctx: Context, res: Result, samples: list[dict[str, Any]], spans: list[tuple[float, float]]
) -> None:
    plt = plotting()
    if plt is None or not samples:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ts = [s["t"] for s in samples]
    ax1.plot(ts, [s["flows"] for s in samples], label="live flows")
    ax1.plot(ts, [s["bands"] for s in samples], label="live bands")
    for i, (a, b) in enumerate(spans):
        for ax in (ax1, ax2):
            ax.axvspan(
                a, b, color="grey", alpha=0.12, label="churn" if i == 0 and ax is ax1 else None
            )
    ax1.set_xlabel("s")
    ax1.set_title("live flows and bands")
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    ax2.plot(ts, [s["flows_removed"] for s in samples], label="flows collected (cumulative)")
    ax2.plot(ts, [s["bands_removed"] for s in samples], label="bands collected (cumulative)")
    ax2b = ax2.twinx()
    ax2b.plot(
        ts, [s["rss_mib"] for s in samples], color="black", linestyle="--", label="daemon RSS (MiB)"
    )
    ax2b.set_ylabel("MiB")
    ax2.set_xlabel("s")
    ax2.set_title("garbage collection under churn")
    ax2.legend(loc="upper left", fontsize=8)
    ax2b.legend(loc="lower right", fontsize=8)
    ax2.grid(True, alpha=0.3)
    save_plot(fig, ctx, res, NAME)


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main([NAME, *sys.argv[1:]]))
