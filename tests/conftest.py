"""Shared fixtures: real daemons started and stopped by the test, with leak checks.

Every daemon a test starts is stopped by that test (SIGTERM, then SIGKILL after a bound), and the
teardown asserts that none of its processes survive and that no ``/dev/shm/bandgate.*`` object it
created and no socket file is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run stress tests in their long (soak) mode instead of the bounded CI mode",
    )


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> object:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def shm_objects() -> set[str]:
    return {
        name for name in os.listdir("/dev/shm") if name.startswith(("bandgate.", "sem.bandgate."))
    }


class Daemon:
    """A ``bandgate serve`` subprocess."""

    def __init__(self, socket_dir: str, env: dict[str, str]) -> None:
        self.socket_dir = socket_dir
        self.env = env
        self.log_path = Path(tempfile.mkstemp(prefix="bgt-log-", suffix=".log", dir="/tmp")[1])
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "serve"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self.ready_line = ""
        self.run_id = ""
        self.stdout_lines: list[str] = []
        self.children: list[psutil.Process] = []

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc.stdout is not None
        result: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout_lines.append(line)
                if "ready" in line and not result:
                    result.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while not result:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"daemon exited with {self.proc.returncode} before ready:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"daemon not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.01)
        self.ready_line = result[0]
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        with open(os.path.join(self.socket_dir, "bandgate.lock")) as f:
            self.run_id = f.read().split()[1]

    def shm_objects(self) -> set[str]:
        """This daemon's shared-memory segment and semaphore, if they exist."""
        if not self.run_id:
            return set()
        return {n for n in shm_objects() if f"bandgate.{self.run_id}." in n}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self):  # type: ignore[no-untyped-def]
        from runtime import Client

        return Client(self.socket_dir)

    def async_client(self):  # type: ignore[no-untyped-def]
        from runtime import AsyncClient

        return AsyncClient(self.socket_dir)

    def all_pids(self) -> set[int]:
        """The coordinator and every process it runs now."""
        try:
            proc = psutil.Process(self.proc.pid)
            return {self.proc.pid} | {c.pid for c in proc.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL the whole group if it does not exit in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                pytest.fail(f"daemon did not stop within {timeout}s:\n{self.log()}")
        self.close_files()
        return self.proc.returncode

    def close_files(self) -> None:
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.close_files()


def base_env(socket_dir: str, **overrides: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BANDGATE_")}
    env.update(
        {
            "BANDGATE_SOCKET_DIR": socket_dir,
            "BANDGATE_SHARDS": "1",
            "BANDGATE_MAX_INFLIGHT": "0",
            "BANDGATE_LOG_LEVEL": "INFO",
            "BANDGATE_METRICS_ADDR": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for key, value in overrides.items():
        name = key if key.startswith("BANDGATE_") else "BANDGATE_" + key.upper()
        env[name] = str(value)
    return env


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    """Start daemons with ``start_daemon(SHARDS=2, MAX_INFLIGHT=4, ...)``; all are stopped and checked.

    Keyword names are ``BANDGATE_*`` names without the prefix (any case). The teardown stops any
    daemon still running and asserts: exit code 0 for a daemon stopped here, no surviving process,
    no ``/dev/shm`` object of its run id (from its lock file), no socket file left in its directory.
    """
    daemons: list[Daemon] = []
    dirs: list[str] = []

    def start(wait: bool = True, socket_dir: str | None = None, **overrides: object) -> Daemon:
        if socket_dir is None:
            socket_dir = tempfile.mkdtemp(prefix="bgt-", dir="/tmp")
            dirs.append(socket_dir)
        daemon = Daemon(socket_dir, base_env(socket_dir, **overrides))
        daemons.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    yield start

    problems = []
    for daemon in daemons:
        pids = daemon.all_pids() | {c.pid for c in daemon.children}
        if daemon.proc.poll() is None:
            code = daemon.stop()
            if code != 0:
                problems.append(f"daemon exited {code}:\n{daemon.log()[-3000:]}")
        else:
            daemon.close_files()

        def survivors(pids: set[int] = pids) -> list[str]:
            alive = []
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
            return alive

        # Children exit on their own once the coordinator is gone; give them a moment.
        deadline = time.monotonic() + 5
        while survivors() and time.monotonic() < deadline:
            time.sleep(0.02)
        alive = survivors()
        if alive:
            for entry in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.split()[0]), signal.SIGKILL)
            problems.append(f"processes survived the daemon: {alive}")
        if os.path.isdir(daemon.socket_dir):
            socks = [n for n in os.listdir(daemon.socket_dir) if n.endswith(".sock")]
            if socks:
                problems.append(f"socket files left in {daemon.socket_dir}: {socks}")
        leaked = daemon.shm_objects()
        if leaked:
            problems.append(f"shared-memory objects left: {sorted(leaked)}")
    for daemon in daemons:
        with contextlib.suppress(FileNotFoundError):
            daemon.log_path.unlink()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if problems:
        pytest.fail("\n".join(problems))
