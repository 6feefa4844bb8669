"""Try to break the lifecycle: bands and flows collected and re-created all the time under load.

Several client processes send requests at random priorities from a small range while the GC runs
with timeouts of tens of milliseconds, so every band is removed and revived or re-created
repeatedly as requests flow. Bounded for CI; ``--soak`` runs it for much longer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.stress]


def test_gc_churn_never_loses_or_rejects_a_request(start_daemon, soak):
    processes, requests, concurrency = (4, 100_000, 32) if soak else (3, 6_000, 16)
    d = start_daemon(
        SHARDS=2,
        MAX_INFLIGHT=8,
        BANDS="static-hi:100,static-lo:-100",
        FLOW_GC_TIMEOUT="30ms",
        BAND_GC_TIMEOUT="60ms",
        GC_INTERVAL="10ms",
        GC_PHASE_DELAY="5ms",  # random pauses between removal steps: admissions race with them
        LOG_LEVEL="WARNING",
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.stress._load",
                d.socket_dir,
                str(seed),
                str(requests),
                str(concurrency),
                "100,1,2,3,4,5,6,7,8,-100",
                "6",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(processes)
    ]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=600 if soak else 90)
            assert p.returncode == 0
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    expected = processes * requests
    total = sum(r["total"] for r in results)
    dispatched = sum(r["outcomes"].get("dispatched", 0) for r in results)
    reasons = {k: v for r in results for k, v in r["reasons"].items()}
    assert total == expected, "an admission returned no outcome"
    assert dispatched == expected, f"not every request was dispatched: {reasons}"
    with d.client() as c:
        stats = c.stats()
        daemon_dispatched = sum(s["dispatched"] for s in stats["shards"])
        assert daemon_dispatched == expected, "the daemon dispatched a request twice or lost one"
        gc = stats["gc"]
        # collection really happened during the run, repeatedly
        assert gc["bands_removed"] >= 5, gc
        assert gc["flows_removed"] >= 50, gc
        # the races were really run: requests revived retiring entities or made shards vote no
        assert gc["revivals"] + gc["aborts"] >= 5, gc
        wait_until(lambda: c.stats()["flows"] == 0, timeout=20, what="every flow collected")
        wait_until(
            lambda: set(c.stats()["bands"]) == {100, -100},
            timeout=20,
            what="only static bands left",
        )
        final = c.stats()
        assert final["len"] == 0 and final["bytes"] == 0 and final["inflight"] == 0
        print(f"stress: requests={expected} gc={final['gc']}")
