"""Headline figures of a results directory as one Markdown table (``python -m bench summary``).

Reads ``<out>/<scenario>.json`` for every scenario present and prints one row per headline:
what was measured, bandgate's figure, the baseline measured in the same run, and the ratio.
With ``write_readme`` the table (with the commit, CPU and command) replaces the block between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in ``bench/README.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench._harness import fmt

README = Path(__file__).resolve().parent / "README.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"

Row = tuple[str, str, Any, str, Any]  # scenario, figure, bandgate, baseline, ratio


class _Figures(dict[str, Any]):
    """Figures of one result file; a key that an older result lacks reads as None ("-")."""

    def __missing__(self, key: str) -> None:
        return None


def _x(v: Any) -> str:
    return "-" if v is None else f"{fmt(v)}x"


def _rows(docs: dict[str, dict[str, Any]]) -> list[Row]:
    # fmt: off
    rows: list[Row] = []
    if d := docs.get("latency"):
        f = _Figures(d["figures"])
        rows += [
            ("latency", "p50 admit -> outcome, one at a time (µs)", fmt(f["bandgate_p50_us"]), f"raw echo {fmt(f['echo_p50_us'])}", _x(f["ratio_p50"])),
            ("latency", "p99 admit -> outcome, one at a time (µs)", fmt(f["bandgate_p99_us"]), f"raw echo {fmt(f['echo_p99_us'])}", _x(f["ratio_p99"])),
        ]
    if d := docs.get("throughput"):
        f = _Figures(d["figures"])
        rows += [
            ("throughput", "admissions/s at 64 concurrent, 1 client proc", fmt(f["bandgate_adm_per_s_at_64"]), f"raw echo {fmt(f['echo_adm_per_s_at_64'])}", _x(f["ratio_at_64"])),
            ("throughput", "admissions/s at 64 concurrent, 2 client procs", "", "raw echo, same", _x(f.get("ratio_at_64_two_processes"))),
            ("throughput", "daemon CPU µs per admission at 64 (all processes)", fmt(f["daemon_cpu_us_per_admission_at_64"]), f"echo server {fmt(f['echo_cpu_us_per_admission_at_64'])}", _x(f["cpu_ratio_at_64"])),
            ("throughput", "peak admissions/s", f"{fmt(f['bandgate_peak_adm_per_s'])} ({f['bandgate_peak_at']})", "", ""),
        ]
    if d := docs.get("saturated"):
        f = _Figures(d["figures"])
        h = f["headline_point"] or {}
        point = ", ".join(f"{k}={v}" for k, v in h.items())
        rows += [
            ("saturated", f"dispatches/s ({point})", fmt(f["dispatch_per_s"]), f"raw echo at W={h.get('W')}", _x(f["ratio_vs_echo"])),
            ("saturated", "dispatches/s over the whole grid (min .. max)", f"{fmt(f['dispatch_per_s_min'])} .. {fmt(f['dispatch_per_s_max'])}", "", ""),
            ("saturated", "10,000 flows vs 10 (geo. mean of d/s ratios)", "", "10 flows", _x(f["flows_10000_vs_10"])),
            ("saturated", "8 bands vs 1 (geo. mean of d/s ratios)", "", "1 band", _x(f["bands_8_vs_1"])),
            ("saturated", f"backlog drain of {fmt(f['drain_n'])} (dispatches/s)", fmt(f["drain_per_s"]), "GIE bound ~1,000/s/shard", _x(f["drain_ratio_vs_gie_bound"])),
            ("saturated", "backlog drain vs the in-process gate", "", "in-process drain", _x(f["drain_ratio_vs_inproc"])),
        ]
    if d := docs.get("fairness"):
        f = _Figures(d["figures"])
        rows += [
            ("fairness", f"Jain's index of share / max-min share ({f['headline_run']})", fmt(f["jain"]), f"global-strict {fmt(f['global_strict_jain'])}", ""),
            ("fairness", f"worst flow's share / its max-min share ({f['headline_run']})", fmt(f["worst_vs_fair"]), f"global-strict {fmt(f['global_strict_worst_vs_fair'])}", ""),
            ("fairness", "Jain / worst flow vs max-min, round-robin on 2 shards", f"{fmt(f['jain_2_shards'])} / {fmt(f['worst_vs_fair_2_shards'])}", "", ""),
            ("fairness", "priority inversions across 2 shards (certain)", f"{fmt(f['certain_inversions'])} of {fmt(f['lo_dispatches'])} lo dispatches", f"hi waited {fmt(f['hi_waited'])} times", fmt(f["inversion_rate"])),
        ]
    if d := docs.get("lifecycle"):
        f = _Figures(d["figures"])
        rows += [
            ("lifecycle", "p50 of a request creating its flow (µs)", fmt(f["new_flow_p50_us"]), f"existing flow {fmt(f['existing_p50_us'])}", _x(f["new_flow_ratio_p50"])),
            ("lifecycle", "p50 of a request creating its band (µs)", fmt(f["new_band_p50_us"]), f"existing flow {fmt(f['existing_p50_us'])}", _x(f["new_band_ratio_p50"])),
            ("lifecycle", "flows collected/s under churn", fmt(f["flows_collected_per_s"]), f"created {fmt(f['flows_created_per_s'])}/s", _x(f["collected_vs_created_flows"])),
            ("lifecycle", "bands collected/s under churn", fmt(f["bands_collected_per_s"]), "bands created", _x(f["collected_vs_created_bands"])),
            ("lifecycle", "daemon RSS after churn + collection", "", "before churn", _x(f["memory_after_vs_before_rss"])),
            ("lifecycle", "daemon RSS after a 2nd churn round", "", "after the 1st", _x(f["memory_round2_vs_round1_rss"])),
            ("lifecycle", "admissions lost under churn (not dispatched)", fmt(f["not_dispatched"]), "", ""),
        ]
    if d := docs.get("shards"):
        f = _Figures(d["figures"])
        rows += [
            ("shards", "dispatches/s, 2 shards", fmt(f["dispatch_per_s_2_shards"]), f"1 shard {fmt(f['dispatch_per_s_1_shard'])}", _x(f["ratio_2_vs_1"])),
            ("shards", "daemon CPU µs per dispatch, 2 shards", fmt(f["daemon_cpu_us_2_shards"]), f"1 shard {fmt(f['daemon_cpu_us_1_shard'])}", _x(f["cpu_ratio_2_vs_1"])),
        ]
    if d := docs.get("peers"):
        f = _Figures(d["figures"])
        rows.append(("peers", "saturated dispatches/s vs in-process gate (no IPC)", fmt(f.get("bandgate_dispatch_per_s")), f"in-process {fmt(f.get('in_process_dispatch_per_s'))}", _x(f.get("saturated_dispatch_ratio_vs_in_process"))))
        if f.get("redis_skipped"):
            rows.append(("peers", "Redis gate", "skipped", "redis-server not installed", ""))
        else:
            rows += [
                ("peers", "saturated dispatches/s vs Redis gate", fmt(f.get("bandgate_dispatch_per_s")), f"redis {fmt(f.get('redis_dispatch_per_s'))}", _x(f.get("saturated_dispatch_ratio_vs_redis"))),
                ("peers", "saturated p99 latency vs Redis gate", "", "redis", _x(f.get("saturated_p99_ratio_vs_redis"))),
                ("peers", "one-at-a-time dispatches/s vs Redis gate", "", "redis", _x(f.get("single_dispatch_ratio_vs_redis"))),
                ("peers", "CPU per dispatch (server + client), saturated, vs Redis", "", "redis", _x(f.get("saturated_cpu_ratio_vs_redis"))),
            ]
    # fmt: on
    return rows


def summary(out: Path, *, write_readme: bool = False) -> str:
    from bench.__main__ import SCENARIOS

    docs: dict[str, dict[str, Any]] = {}
    for name in SCENARIOS:
        path = out / f"{name}.json"
        if path.exists():
            docs[name] = json.loads(path.read_text())
    if not docs:
        return f"no results in {out}"
    first = next(iter(docs.values()))
    m = first["machine"]
    commits = sorted({d["commit"] for d in docs.values()})
    modes = sorted({d["mode"] for d in docs.values()})
    cmds = sorted({d.get("command", "") for d in docs.values()})
    head = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['os']}. "
        f"Commit: {', '.join(commits)}. Mode: {', '.join(modes)}. "
        f"Command: `{cmds[0] if len(cmds) == 1 else '; '.join(cmds)}`.",
        "",
        "| scenario | figure | bandgate | baseline (same run) | ratio |",
        "|---|---|---:|---|---:|",
    ]
    body = [f"| {s} | {what} | {v} | {base} | {r} |" for s, what, v, base, r in _rows(docs)]
    text = "\n".join(head + body)
    if write_readme:
        readme = README.read_text()
        if BEGIN in readme and END in readme:
            pre, rest = readme.split(BEGIN, 1)
            _, post = rest.split(END, 1)
            README.write_text(f"{pre}{BEGIN}\n{text}\n{END}{post}")
    return text
