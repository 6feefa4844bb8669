"""Access control: owner-only sockets and shared memory; BANDGATE_SOCKET_GROUP opens them to a group.

The tests run as root, which bypasses permission checks, so every "another user" check runs in a
forked child that drops to ``nobody`` (uid 65534) first. The child is forked (not exec'd) because
the interpreter of the venv lives under ``/root`` (mode 0700), which ``nobody`` cannot execute; it
therefore only uses modules the parent imported already.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import select
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import posix_ipc  # type: ignore[import-untyped]
import pytest

import runtime.client as client_mod
from runtime import Client, DaemonUnavailable, Outcome
from tests.conftest import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user"),
]

NOBODY_UID = 65534
NOBODY_GID = 65534


def _nobody_ok() -> None:
    try:
        pwd.getpwuid(NOBODY_UID)
        grp.getgrgid(NOBODY_GID)
    except KeyError:
        pytest.skip("no uid/gid 65534 on this machine")


def run_as(
    uid: int, gid: int, groups: list[int], fn: Callable[[], Any], timeout: float = 15.0
) -> Any:
    """Run ``fn`` in a forked child with the given credentials; return its JSON-able result.

    An exception in the child comes back as ``{"raised": "<ExcType>", "message": ...}``.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                result: Any = fn()
            except BaseException as exc:
                result = {"raised": type(exc).__name__, "message": str(exc)}
            data = json.dumps(result).encode()
            view = memoryview(data)
            while view:
                n = os.write(w, view)
                view = view[n:]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"child running as uid {uid} did not finish within {timeout}s")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed before reporting"
    return json.loads(b"".join(chunks))


def run_id(socket_dir: str) -> str:
    """The daemon's run id, from its lock file (``<pid> <run_id>``)."""
    return Path(socket_dir, "bandgate.lock").read_text().split()[1]


def kernel_objects(socket_dir: str) -> tuple[str, str]:
    rid = run_id(socket_dir)
    return f"/dev/shm/bandgate.{rid}.shm", f"/dev/shm/sem.bandgate.{rid}.budget"


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def sockets(socket_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(socket_dir) if n.endswith(".sock"))


def test_owner_only_modes(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=2)
    with d.client() as c:
        c.scale_shards(3)  # a shard started at run time gets the same modes
        wait_until(
            lambda: sum(s["state"] == "active" for s in c.stats()["shards"]) == 3,
            what="third shard active",
        )
    st = os.stat(d.socket_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    names = sockets(d.socket_dir)
    expected = {"control.sock", "internal.sock"} | {
        f"{kind}-{i}.sock" for kind in ("shard", "wake") for i in range(3)
    }
    assert expected <= set(names), names
    for name in names:
        path = os.path.join(d.socket_dir, name)
        assert stat.S_ISSOCK(os.stat(path).st_mode), name
        assert mode(path) == 0o600, f"{name} has mode {mode(path):o}"
    assert mode(os.path.join(d.socket_dir, "bandgate.lock")) == 0o600
    seg, sem = kernel_objects(d.socket_dir)
    for path in (seg, sem):
        assert os.path.exists(path), path
        assert mode(path) == 0o600, f"{path} has mode {mode(path):o}"
        assert os.stat(path).st_uid == os.getuid()


def _probe_as_other(socket_dir: str, shm: str, sem: str) -> Callable[[], dict[str, str]]:
    """What an unrelated user meets at each door (evaluated in the child)."""

    def probe() -> dict[str, str]:
        out: dict[str, str] = {}
        for name in ("control.sock", "shard-0.sock", "internal.sock"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.path.join(socket_dir, name))
                out[name] = "connected"
            except OSError as exc:
                out[name] = type(exc).__name__
            finally:
                s.close()
        try:
            Client(socket_dir).close()
            out["client"] = "connected"
        except DaemonUnavailable:
            out["client"] = "DaemonUnavailable"
        except Exception as exc:
            out["client"] = type(exc).__name__
        try:
            posix_ipc.SharedMemory(shm).close_fd()
            out["shm"] = "opened"
        except posix_ipc.PermissionsError:
            out["shm"] = "PermissionsError"
        try:
            posix_ipc.Semaphore(sem).close()
            out["sem"] = "opened"
        except posix_ipc.PermissionsError:
            out["sem"] = "PermissionsError"
        return out

    return probe


def test_other_user_cannot_connect(start_daemon):
    _nobody_ok()
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)
    seg, sem = kernel_objects(d.socket_dir)
    shm_name, sem_name = "/" + os.path.basename(seg), "/" + os.path.basename(sem)[len("sem.") :]
    with d.client() as c:  # warm every import the child needs
        c.admit("warm", 0).release()
    result = run_as(NOBODY_UID, NOBODY_GID, [], _probe_as_other(d.socket_dir, shm_name, sem_name))
    assert result == {
        "control.sock": "PermissionError",
        "shard-0.sock": "PermissionError",
        "internal.sock": "PermissionError",
        "client": "DaemonUnavailable",
        "shm": "PermissionsError",
        "sem": "PermissionsError",
    }
    # Even with the directory opened up, the sockets and objects themselves refuse.
    os.chmod(d.socket_dir, 0o711)
    try:
        result = run_as(
            NOBODY_UID, NOBODY_GID, [], _probe_as_other(d.socket_dir, shm_name, sem_name)
        )
    finally:
        os.chmod(d.socket_dir, 0o700)
    assert result["control.sock"] == "PermissionError"
    assert result["shard-0.sock"] == "PermissionError"
    assert result["internal.sock"] == "PermissionError"
    assert result["client"] == "DaemonUnavailable"
    # The daemon still serves its owner.
    with d.client() as c:
        assert c.admit("owner", 0).outcome is Outcome.DISPATCHED


def _group_gid() -> int:
    _nobody_ok()
    return NOBODY_GID


def test_socket_group_modes(start_daemon):
    gid = _group_gid()
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=2, SOCKET_GROUP=grp.getgrgid(gid).gr_name)
    st = os.stat(d.socket_dir)
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_gid == gid
    for name in ("control.sock", "shard-0.sock", "shard-1.sock"):
        path = os.path.join(d.socket_dir, name)
        assert mode(path) == 0o660, f"{name} has mode {mode(path):o}"
    # The internal socket stays owner-only: only the daemon's own processes use it.
    assert mode(os.path.join(d.socket_dir, "internal.sock")) == 0o600
    seg, _ = kernel_objects(d.socket_dir)
    assert mode(seg) & 0o007 == 0, f"segment is world-accessible: {mode(seg):o}"


def test_socket_group_ownership(start_daemon):
    gid = _group_gid()
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=2, SOCKET_GROUP=str(gid))
    wrong = {}
    for name in ("control.sock", "shard-0.sock", "shard-1.sock"):
        path = os.path.join(d.socket_dir, name)
        if os.stat(path).st_gid != gid:
            wrong[name] = os.stat(path).st_gid
    seg, _ = kernel_objects(d.socket_dir)
    if os.stat(seg).st_gid != gid or not mode(seg) & 0o040:
        wrong[seg] = (os.stat(seg).st_gid, oct(mode(seg)))
    assert not wrong, f"not group-accessible by gid {gid}: {wrong}"


def _admit_as_member(socket_dir: str) -> Callable[[], dict[str, Any]]:
    def admit() -> dict[str, Any]:
        client_mod.RESUBMIT_TIMEOUT = 3.0  # do not wait 10 s for an unreachable shard
        with Client(socket_dir) as c:
            adm = c.admit("group-member", 0, ttl=5.0)
            adm.release()
            return {"outcome": adm.outcome.value, "reason": adm.reason}

    return admit


def test_socket_group_member_is_served(start_daemon):
    gid = _group_gid()
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2, SOCKET_GROUP=str(gid))
    with d.client() as c:
        c.admit("warm", 0).release()
    result = run_as(NOBODY_UID, NOBODY_GID, [gid], _admit_as_member(d.socket_dir))
    assert result == {"outcome": "dispatched", "reason": ""}


def test_socket_group_non_member_refused(start_daemon):
    gid = _group_gid()
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2, SOCKET_GROUP=str(gid))
    with d.client() as c:
        c.admit("warm", 0).release()
    other_gid = next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, gid))
    seg, sem = kernel_objects(d.socket_dir)
    shm_name, sem_name = "/" + os.path.basename(seg), "/" + os.path.basename(sem)[len("sem.") :]
    result = run_as(
        NOBODY_UID, other_gid, [other_gid], _probe_as_other(d.socket_dir, shm_name, sem_name)
    )
    for door in ("control.sock", "shard-0.sock", "internal.sock"):
        assert result[door] == "PermissionError", result
    assert result["client"] == "DaemonUnavailable"
    assert result["shm"] == "PermissionsError"
    assert result["sem"] == "PermissionsError"


def test_refused_daemon_does_not_open_the_directory(start_daemon):
    """A second ``serve`` with another BANDGATE_SOCKET_GROUP must not loosen the live daemon's dir."""
    gid = _group_gid()
    d = start_daemon(SHARDS=1, MAX_INFLIGHT=2)
    second = start_daemon(wait=False, socket_dir=d.socket_dir, SOCKET_GROUP=str(gid))
    wait_until(lambda: second.proc.poll() is not None, timeout=15, what="second daemon to exit")
    assert second.proc.returncode == 5
    st = os.stat(d.socket_dir)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o700, os.getgid())
