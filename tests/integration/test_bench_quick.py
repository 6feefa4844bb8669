"""The benchmark entry point runs end to end and writes valid results; never how fast.

Runs ``python -m bench latency --quick --out <tmp>`` (the cheapest scenario: one daemon, one echo
server, one load process) in a subprocess and checks the JSON it writes and the summary it
prints. Speed is never asserted: only that the figures exist and are positive numbers.

Everything the benchmark starts, it stops; if it overruns, the test sends it SIGTERM (which the
benchmark turns into an orderly stop of its children) before killing it. The benchmark checks
that every daemon it stopped left no ``/dev/shm`` object (by the daemon's run id) and fails
otherwise; the test checks that no process it started survives and no temp dir is left.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

BUDGET = 60.0  # seconds; the scenario takes a few seconds, the margin is for a loaded machine


def _run_bench(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BANDGATE_")}
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=BUDGET)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark stops its children on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"benchmark overran {BUDGET}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _our_survivors(since: float) -> list[str]:
    """Processes the benchmark started (load workers, echo server, daemons in its temp dirs)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["create_time"] < since - 1:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if (
                "bench._loadgen" in cmd
                or "bench._echo" in cmd
                or (
                    "runtime" in cmd
                    and proc.environ().get("BANDGATE_SOCKET_DIR", "").startswith("/tmp/bgb-")
                )
            ):
                found.append(f"{proc.pid} {cmd}")
    return found


def test_latency_quick_writes_valid_json(tmp_path: Path) -> None:
    started = time.time()
    tmp_before = set(glob.glob("/tmp/bgb-*"))
    done = _run_bench(["latency", "--quick", "--no-plots", "--out", str(tmp_path)])
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "ratio bandgate/echo" in done.stdout  # the readable table was printed

    doc = json.loads((tmp_path / "latency.json").read_text())
    assert {"scenario", "params", "machine", "commit", "figures"} <= doc.keys()
    assert doc["scenario"] == "latency"
    assert doc["mode"] == "quick"
    assert {"cpu", "cores", "python"} <= doc["machine"].keys()
    assert isinstance(doc["commit"], str) and doc["commit"]
    figures = doc["figures"]
    for key in (
        "bandgate_p50_us",
        "bandgate_p99_us",
        "echo_p50_us",
        "echo_p99_us",
        "ratio_p50",
        "ratio_p99",
    ):
        value = figures[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)
    assert not list(tmp_path.glob("*.tmp"))

    summary = _run_bench(["summary", "--out", str(tmp_path)])
    assert summary.returncode == 0, summary.stderr
    assert "| latency |" in summary.stdout

    # The benchmark itself checks that each daemon it stopped left nothing in /dev/shm (by the
    # daemon's run id) and exits non-zero otherwise; here, nothing it started may still run.
    assert "LEAK" not in done.stderr, done.stderr
    assert not _our_survivors(started), "the benchmark left processes running"
    assert not (set(glob.glob("/tmp/bgb-*")) - tmp_before), "the benchmark left temp dirs behind"


def test_fairness_and_inversion_arithmetic() -> None:
    """The figures the fairness scenario reports, on hand-made inputs."""
    from bench._harness import jain, max_min_shares, percentile
    from bench.fairness import count_inversions

    assert max_min_shares([1, 2, 4, 8, 16, 32], 16) == [1, 2, 3.25, 3.25, 3.25, 3.25]
    assert max_min_shares([1, 1], 16) == [1, 1]
    assert jain([1, 1, 1, 1]) == pytest.approx(1.0)
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    # hi: sent 0, received 10, queued 8 -> surely waiting over [2, 8].
    # lo dispatched within [3.5, 5]: inside -> an inversion; lo within [7.5, 9]: not certain.
    events = [[10, 0.0, 10.0, 8.0], [0, 3.0, 5.0, 0.5], [0, 7.0, 9.0, 0.5]]
    inv = count_inversions(events, hi=10, lo=0)
    assert inv["certain_inversions"] == 1
    assert inv["lo_dispatches"] == 2
    assert inv["hi_waited"] == 1
