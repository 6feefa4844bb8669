"""Every process a benchmark starts, and the guarantee that it stops them all.

Runs in the orchestrator (``python -m bench``). Four kinds of child, each a context manager whose
``__exit__`` stops it on success and on failure:

- :class:`Daemon` — ``python -m runtime serve`` in a fresh socket directory;
- :class:`EchoServer` — the raw echo baseline (:mod:`bench._echo`);
- :class:`RedisServer` — a real ``redis-server`` on a Unix socket, no persistence;
- :class:`Worker` — a load generator (:mod:`bench._loadgen`) driven by JSON lines.

Every child is also recorded in ``_LIVE`` and stopped by an ``atexit`` hook and by the SIGTERM
handler :func:`install_signal_handlers` installs, so an interrupted run (Ctrl-C, a timeout, an
exception) leaves no process, socket directory or shared-memory segment behind. Children are
stopped by their own pid (and a daemon's descendants by theirs, found with psutil), never by
name.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench._harness import REPO, log

__all__ = [
    "PROBLEMS",
    "STOP_TIMEOUT",
    "ChildError",
    "Daemon",
    "EchoServer",
    "RedisServer",
    "Worker",
    "cpu_seconds",
    "install_signal_handlers",
    "redis_server_path",
]

STOP_TIMEOUT = 15.0
"""Seconds a child gets to exit after SIGTERM before it is killed."""

READY_TIMEOUT = 30.0
"""Seconds a child gets to print its ready line."""

_LIVE: set[_Child] = set()

PROBLEMS: list[str] = []
"""Things a child did wrong that are not measurements (leaks, bad exit codes); reported at the end."""


class ChildError(RuntimeError):
    """A child failed to start, answered nonsense, or died."""


def _stop_all() -> None:
    for child in list(_LIVE):
        with contextlib.suppress(Exception):
            child.stop()


atexit.register(_stop_all)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit so every ``finally`` runs and children stop."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment without BANDGATE_* (the daemon rejects unknown names), plus
    ``extra`` and the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BANDGATE_")}
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.update(extra)
    return env


class _Child:
    """A subprocess with a line reader on its stdout and stderr kept in a temp file."""

    name = "child"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr_path: str | None = None
        self._stderr_file: Any = None
        self._reader: threading.Thread | None = None

    def _spawn(self, argv: list[str], env: dict[str, str], *, stdin: bool = False) -> None:
        fd, self._stderr_path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".err")
        self._stderr_file = os.fdopen(fd, "w+")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            env=env,
            cwd=REPO,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C in the terminal reaches us, not our children
        )
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{self.name}-stdout")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def readline(self, timeout: float) -> str:
        """Next stdout line; ChildError on EOF or timeout."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(
                f"{self.name}: no output within {timeout:.0f}s{self.stderr_tail()}"
            ) from None
        if line is None:
            code = self.proc.wait(5) if self.proc else None
            raise ChildError(f"{self.name}: exited (code {code}){self.stderr_tail()}")
        return line

    def wait_for(self, word: str, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.01, deadline - time.monotonic()))
            if word in line:
                return line

    def stderr_tail(self, n: int = 25) -> str:
        if not self._stderr_path:
            return ""
        try:
            text = Path(self._stderr_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return ("\n--- stderr ---\n" + "\n".join(text[-n:])) if text else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> int | None:
        """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL it and its descendants."""
        proc = self.proc
        if proc is None:
            return None
        kids = self.descendants()
        code = proc.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(
                    f"{self.name} pid={proc.pid} ignored SIGTERM for {STOP_TIMEOUT:.0f}s; killing it"
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                code = proc.wait(5)
        # Descendants that outlived their parent (they should not) are ours to end.
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                if kid.is_running():
                    kid.kill()
        if kids:
            psutil.wait_procs(kids, timeout=5)
        _LIVE.discard(self)
        self.proc = None
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        return code

    def cleanup_files(self) -> None:
        if self._stderr_path:
            with contextlib.suppress(OSError):
                os.unlink(self._stderr_path)

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.cleanup_files()


def _daemon_variables() -> frozenset[str]:
    """The ``BANDGATE_*`` names this checkout's daemon accepts (it rejects any other)."""
    try:
        from runtime.config import VARIABLES
    except ImportError:
        return frozenset()
    return frozenset(v.name for v in VARIABLES)


# -- the daemon ----------------------------------------------------------------------------------
class Daemon(_Child):
    """``python -m runtime serve`` with ``BANDGATE_*`` settings, in a fresh socket directory."""

    name = "daemon"

    def __init__(self, **settings: object) -> None:
        super().__init__()
        self.settings = {f"BANDGATE_{k.upper()}": str(v) for k, v in settings.items()}
        self.settings.setdefault("BANDGATE_LOG_LEVEL", "WARNING")
        if "BANDGATE_METRICS_ADDR" in _daemon_variables():
            # No scraper here, and a fixed default port would stop a second daemon starting.
            self.settings.setdefault("BANDGATE_METRICS_ADDR", "0")
        self.socket_dir = tempfile.mkdtemp(prefix="bgb-", dir="/tmp")
        self._procs: dict[int, psutil.Process] = {}
        self._client: Any = None
        self.exit_code: int | None = None
        self.run_id = ""

    def __enter__(self) -> Daemon:
        t0 = time.monotonic()
        try:
            env = _env({**self.settings, "BANDGATE_SOCKET_DIR": self.socket_dir})
            self._spawn([sys.executable, "-m", "runtime", "serve"], env)
            self.wait_for("ready")
            self._read_run_id()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None
            self.exit_code = self.stop()
            if self.exit_code not in (0, None):
                log(f"daemon exited with code {self.exit_code}{self.stderr_tail()}")
                PROBLEMS.append(f"daemon exited with code {self.exit_code}")
            self._check_leaks()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.cleanup_files()

    def _read_run_id(self) -> None:
        """The run id the coordinator wrote into its lock file (names its /dev/shm objects)."""
        with contextlib.suppress(OSError, IndexError):
            text = Path(self.socket_dir, "bandgate.lock").read_text().split()
            self.run_id = text[1]

    def _check_leaks(self) -> None:
        """After a stop, nothing of this daemon may remain in /dev/shm or its socket directory."""
        if not self.run_id:
            return
        left = sorted(
            glob.glob(f"/dev/shm/bandgate.{self.run_id}.*")
            + glob.glob(f"/dev/shm/sem.bandgate.{self.run_id}.*")
        )
        socks = sorted(glob.glob(os.path.join(self.socket_dir, "*.sock")))
        if left or socks:
            msg = f"daemon run {self.run_id} left {left + socks} after exiting; removed them"
            log("LEAK: " + msg)
            PROBLEMS.append(msg)
            for path in left + socks:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def processes(self) -> list[psutil.Process]:
        """The coordinator and every descendant (shards, GC, helpers), cached across calls."""
        current = [psutil.Process(self.pid), *self.descendants()]
        for p in current:
            self._procs.setdefault(p.pid, p)
        return [self._procs[p.pid] for p in current]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds summed over every daemon process."""
        return cpu_seconds(self.processes())

    def rss_bytes(self) -> dict[str, int]:
        """Resident and unique memory summed over every daemon process."""
        rss = uss = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                info = p.memory_full_info()
                rss += info.rss
                uss += info.uss
        return {"rss": rss, "uss": uss, "processes": len(self._procs)}

    def stats(self) -> dict[str, Any]:
        """The daemon's statistics, through one blocking client kept open until exit."""
        if self._client is None:
            from runtime import Client

            self._client = Client(self.socket_dir)
        return dict(self._client.stats())


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# -- the raw echo baseline -----------------------------------------------------------------------
class EchoServer(_Child):
    """The raw echo server of :mod:`bench._echo` on a fresh Unix socket."""

    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bgb-echo-", dir="/tmp")
        self.path = os.path.join(self.dir, "echo.sock")
        self._ps: psutil.Process | None = None

    def __enter__(self) -> EchoServer:
        try:
            self._spawn([sys.executable, "-m", "bench._echo", self.path], _env({}))
            self.wait_for("ready")
            self._ps = psutil.Process(self.pid)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.cleanup_files()

    def cpu_seconds(self) -> float:
        return cpu_seconds([self._ps]) if self._ps else 0.0


# -- redis ---------------------------------------------------------------------------------------
def redis_server_path() -> str | None:
    """Path of ``redis-server`` (PATH, then /usr/sbin and /usr/bin), or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in (
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
        "/usr/local/bin/redis-server",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class RedisServer(_Child):
    """A throw-away ``redis-server``: Unix socket only, no persistence, stopped on exit."""

    name = "redis"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bgb-redis-", dir="/tmp")
        self.path = os.path.join(self.dir, "redis.sock")
        self._ps: psutil.Process | None = None

    def __enter__(self) -> RedisServer:
        exe = redis_server_path()
        if exe is None:
            raise ChildError("redis-server not found (install it: apt-get install -y redis-server)")
        try:
            argv = [
                exe,
                "--port", "0",
                "--unixsocket", self.path,
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--dir", self.dir,
                "--loglevel", "warning",
                "--protected-mode", "no",
            ]  # fmt: skip
            self._spawn(argv, _env({}))
            self._wait_ping()
            self._ps = psutil.Process(self.pid)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ping(self) -> None:
        import socket

        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ChildError(
                    f"redis-server exited (code {self.proc.returncode}){self.stderr_tail()}"
                )
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(self.path)
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise ChildError(f"redis-server did not answer PING{self.stderr_tail()}")

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.cleanup_files()

    def cpu_seconds(self) -> float:
        return cpu_seconds([self._ps]) if self._ps else 0.0


# -- load generators -----------------------------------------------------------------------------
class Worker(_Child):
    """A :mod:`bench._loadgen` process: one JSON command per line in, one JSON reply per line out."""

    name = "worker"

    def __init__(self, index: int = 0) -> None:
        super().__init__()
        self.index = index
        self.name = f"worker-{index}"
        self._ps: psutil.Process | None = None

    def __enter__(self) -> Worker:
        try:
            self._spawn([sys.executable, "-m", "bench._loadgen"], _env({}), stdin=True)
            self.wait_for("ready")
            self._ps = psutil.Process(self.pid)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ChildError(f"{self.name}: cannot send ({exc}){self.stderr_tail()}") from exc

    def recv(self, timeout: float = 120.0) -> dict[str, Any]:
        line = self.readline(timeout)
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise ChildError(f"{self.name}: not JSON: {line[:200]!r}{self.stderr_tail()}") from None
        if "error" in reply:
            raise ChildError(f"{self.name}: {reply['error']}{self.stderr_tail()}")
        return reply

    def call(self, cmd: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        self.send(cmd)
        return self.recv(timeout)

    def stop(self) -> int | None:
        proc = self.proc
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            # Ask politely first: the worker closes its connections and exits.
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write('{"cmd": "quit"}\n')
                proc.stdin.flush()
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        return super().stop()

    def cpu_seconds(self) -> float:
        return cpu_seconds([self._ps]) if self._ps else 0.0
