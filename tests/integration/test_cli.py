"""The ``bandgate`` command line: help, configuration errors, client commands, signals.

The CLI runs as ``[sys.executable, "-m", "runtime", ...]`` (what the ``bandgate`` console script
calls) with the daemon's environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

import pytest

from runtime import Admission, Client, Outcome
from runtime.config import VARIABLES
from tests.conftest import ROOT, base_env, wait_until

pytestmark = pytest.mark.integration

COMMANDS = ("serve", "stats", "bands", "shards")
RUN_TIMEOUT = 30.0  # a bound for a hung command, not a speed assertion


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        env=env if env is not None else base_env("/nonexistent-bandgate-test-dir"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


# ---------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------


def test_help_lists_every_command_and_every_variable():
    top = cli("--help")
    assert top.returncode == 0, top.stderr
    for command in COMMANDS:
        assert command in top.stdout, command
    serve = cli("serve", "--help")
    assert serve.returncode == 0, serve.stderr
    for variable in VARIABLES:
        assert variable.name in serve.stdout, variable.name
    assert "ready" in serve.stdout and "SIGTERM" in serve.stdout
    stats = cli("stats", "--help")
    assert stats.returncode == 0 and "--json" in stats.stdout and "--socket-dir" in stats.stdout
    bands = cli("bands", "--help")
    assert bands.returncode == 0 and "reconcile" in bands.stdout
    shards = cli("shards", "--help")
    assert shards.returncode == 0 and "scale" in shards.stdout
    # no command: a usage error, not a traceback
    bare = cli()
    assert bare.returncode != 0 and "usage" in bare.stderr and "Traceback" not in bare.stderr


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "bandgate")
    if not os.path.exists(script):
        pytest.skip("no bandgate console script next to this interpreter")
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


# ---------------------------------------------------------------------------------------------
# configuration errors: exit non-zero, one stderr line naming the variable and the value
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"BANDGATE_SHARDS": "abc"}, ["BANDGATE_SHARDS", "'abc'"]),
        ({"BANDGATE_SHARDS": "0"}, ["BANDGATE_SHARDS", "'0'"]),
        ({"BANDGATE_SHRADS": "2"}, ["BANDGATE_SHRADS", "'2'", "BANDGATE_SHARDS"]),
        ({"bandgate_shards": "2"}, ["bandgate_shards", "'2'"]),
        # a band GC timeout below the flow GC timeout (5 min by default)
        (
            {"BANDGATE_BAND_GC_TIMEOUT": "1m"},
            ["BANDGATE_BAND_GC_TIMEOUT", "'1m'", "BANDGATE_FLOW_GC_TIMEOUT"],
        ),
        (
            {"BANDGATE_FLOW_GC_TIMEOUT": "10m", "BANDGATE_BAND_GC_TIMEOUT": "5m"},
            ["BANDGATE_BAND_GC_TIMEOUT", "'5m'", "BANDGATE_FLOW_GC_TIMEOUT", "'10m'"],
        ),
        ({"BANDGATE_FLOW_GC_TIMEOUT": "10 minutes"}, ["BANDGATE_FLOW_GC_TIMEOUT", "10 minutes"]),
        ({"BANDGATE_MAX_INFLIGHT": "-1"}, ["BANDGATE_MAX_INFLIGHT", "'-1'"]),
        ({"BANDGATE_FAIRNESS": "fair"}, ["BANDGATE_FAIRNESS", "'fair'"]),
        ({"BANDGATE_BANDS": "hi:10,lo:10"}, ["BANDGATE_BANDS", "hi:10,lo:10"]),
        ({"BANDGATE_SOCKET_DIR": "relative/dir"}, ["BANDGATE_SOCKET_DIR", "relative/dir"]),
        ({"BANDGATE_SOCKET_DIR": "/tmp/" + "d" * 200}, ["BANDGATE_SOCKET_DIR", "d" * 200]),
        ({"BANDGATE_SHARDS": "2\nBANDGATE_X=1"}, ["BANDGATE_SHARDS", "'2\\nBANDGATE_X=1'"]),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else None,
)
def test_bad_configuration_exits_with_one_line(env, needles):
    socket_dir = tempfile.mkdtemp(prefix="bgt-cli-", dir="/tmp")
    os.rmdir(socket_dir)  # the daemon must not even create it
    full = base_env(socket_dir)
    for key in ("BANDGATE_SHARDS", "BANDGATE_SOCKET_DIR"):
        if key in env or key.lower() in env:
            full.pop(key, None)
    full.update(env)
    r = cli("serve", env=full)
    assert r.returncode != 0
    assert r.returncode == 2, (r.returncode, r.stderr)  # ExitCode.CONFIG_ERROR
    assert "ready" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in r.stderr
    assert not os.path.exists(socket_dir)


# ---------------------------------------------------------------------------------------------
# client commands against a daemon
# ---------------------------------------------------------------------------------------------


def test_stats_bands_and_shards_commands(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1, BANDS="hi:10,lo:0")
    with d.client() as c:
        holder = c.admit("holder", 10)
        result: list[Admission] = []
        t = threading.Thread(
            target=lambda: result.append(c.admit("tenant", 0, byte_size=33)), daemon=True
        )
        t.start()
        wait_until(lambda: c.stats()["len"] == 1, what="one request queued")

        r = cli("stats", "--json", env=d.env)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert set(doc["bands"]) == {"10", "0"}  # JSON keys are strings
        assert doc["bands"]["10"]["name"] == "hi" and doc["bands"]["0"]["name"] == "lo"
        assert doc["len"] == 1 and doc["bytes"] == 33 and doc["inflight"] == 1
        assert doc["bands"]["0"]["len"] == 1 and doc["bands"]["0"]["bytes"] == 33
        assert [s["id"] for s in doc["shards"]] == [0, 1]
        assert doc["flows"] == 2

        r = cli("stats", env=d.env)
        assert r.returncode == 0, r.stderr
        for needle in ("hi", "lo", "queued", "inflight"):
            assert needle in r.stdout, needle
        assert r.stderr == ""

        # --socket-dir instead of the environment
        env = {k: v for k, v in d.env.items() if k != "BANDGATE_SOCKET_DIR"}
        r = cli("stats", "--json", "--socket-dir", d.socket_dir, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["socket_dir"] == d.socket_dir

        r = cli("bands", "--json", env=d.env)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [b["priority"] for b in rows] == [10, 0]
        assert [b["name"] for b in rows] == ["hi", "lo"]

        r = cli("bands", "reconcile", "10", "0", "7", env=d.env)
        assert r.returncode == 0, r.stderr
        assert 7 in c.stats()["bands"]

        r = cli("shards", env=d.env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("shard") == 2

        holder.release()
        t.join(15)
        assert result and result[0].dispatched
        result[0].release()


def test_client_commands_without_a_daemon():
    socket_dir = tempfile.mkdtemp(prefix="bgt-cli-", dir="/tmp")
    try:
        for args in (("stats",), ("stats", "--json"), ("bands",), ("shards",)):
            r = cli(*args, env=base_env(socket_dir))
            assert r.returncode != 0, args
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and socket_dir in lines[0], (args, r.stderr)
            assert "Traceback" not in r.stderr
    finally:
        os.rmdir(socket_dir)


# ---------------------------------------------------------------------------------------------
# one daemon per socket directory
# ---------------------------------------------------------------------------------------------


def test_second_serve_on_the_same_directory_refuses(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=0)
    before = sorted(os.listdir(d.socket_dir))
    r = cli("serve", env=d.env)
    assert r.returncode != 0
    assert r.returncode == 5, r.stderr  # ExitCode.ALREADY_RUNNING
    assert "ready" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "another bandgate daemon" in lines[0]
    assert str(d.pid) in lines[0] and d.socket_dir in lines[0]
    # the first daemon is untouched and still serves new clients
    assert d.proc.poll() is None
    assert sorted(os.listdir(d.socket_dir)) == before
    with Client(d.socket_dir) as c:
        assert c.admit("still-served", 0).dispatched


# ---------------------------------------------------------------------------------------------
# clean shutdown
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_shutdown_on_signal(start_daemon, sig):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    c = d.client()
    try:
        holder = c.admit("holder", 0)
        results: list[Admission] = []
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(c.admit(f"w{i}", i % 2, byte_size=5)),
                daemon=True,
            )
            for i in range(3)
        ]
        for i, t in enumerate(threads):
            t.start()
            wait_until(lambda i=i: c.stats()["len"] == i + 1, what=f"{i + 1} queued")
        d.proc.send_signal(sig)
        assert d.proc.wait(RUN_TIMEOUT) == 0, d.log()[-3000:]
        for t in threads:
            t.join(15)
        assert len(results) == 3
        for adm in results:
            assert adm.outcome is Outcome.EVICTED_OTHER, adm
            assert "shutting down" in adm.reason, adm.reason
        holder.release()
    finally:
        c.close()
    # everything it created is gone (the fixture checks processes, sockets and shared memory)
    assert os.listdir(d.socket_dir) == []
    assert "Traceback" not in d.log()
