"""Shutdown is bounded: a stuck process is killed after BANDGATE_SHUTDOWN_TIMEOUT, or at once on a
second signal; either way nothing is left behind (the fixture checks)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def _freeze_a_shard(d) -> int:
    with d.client() as c:
        pid = c.stats()["shards"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # it will not answer Shutdown
    return pid


def test_a_stuck_shard_is_killed_after_the_shutdown_timeout(start_daemon):
    d = start_daemon(SHUTDOWN_TIMEOUT="1s")
    _freeze_a_shard(d)
    d.proc.send_signal(signal.SIGTERM)
    try:
        assert d.proc.wait(20) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon did not stop after its shutdown timeout:\n{d.log()}")
    assert "did not stop in time; killing" in d.log()


def test_a_second_signal_forces_the_stop(start_daemon):
    d = start_daemon(SHUTDOWN_TIMEOUT="1h")
    _freeze_a_shard(d)
    d.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutdown started" in d.log(), what="shutdown under way")
    d.proc.send_signal(signal.SIGINT)
    try:
        assert d.proc.wait(20) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second signal did not force the stop:\n{d.log()}")
    assert "second signal: forcing shutdown" in d.log()
