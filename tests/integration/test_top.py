"""``bandgate top`` driven in a real terminal (a pseudo-terminal) against a loaded daemon.

The view runs as ``python -m runtime.top`` on the slave side of a pty (``TERM=vt100``, 40x120);
the test reads what it draws from the master side, turns cursor movements back into text well
enough to find words, sends keys, and checks the exit code and that the terminal modes are
restored. Every process it starts it stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ROOT, Daemon, wait_until

pytestmark = pytest.mark.integration

ROWS, COLS = 40, 120
_CSI = re.compile(rb"\x1b\[([0-9;?]*)([A-Za-z@])")


class Screen:
    """Just enough of a VT100 to replay what curses sends for TERM=vt100 into a grid of text."""

    def __init__(self, rows: int = ROWS, cols: int = COLS) -> None:
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0
        self.top, self.bottom = 0, rows - 1
        self.saved = (0, 0)

    def lines(self) -> list[str]:
        return ["".join(r).rstrip() for r in self.grid]

    def _blank(self, row: int, cols: range) -> None:
        for c in cols:
            self.grid[row][c] = " "

    def _linefeed(self) -> None:
        if self.row == self.bottom:
            del self.grid[self.top]
            self.grid.insert(self.bottom, [" "] * self.cols)
        else:
            self.row = min(self.rows - 1, self.row + 1)

    def _reverse_linefeed(self) -> None:
        if self.row == self.top:
            del self.grid[self.bottom]
            self.grid.insert(self.top, [" "] * self.cols)
        else:
            self.row = max(0, self.row - 1)

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?") or final in "mlhi":
            return  # modes and attributes: no effect on the text
        nums = [int(p) if p.isdigit() else 0 for p in params.split(";")] if params else []
        first = nums[0] if nums else 0
        n = first or 1
        if final in "Hf":
            col = nums[1] if len(nums) > 1 and nums[1] else 1
            self.row, self.col = min(n, self.rows) - 1, min(col, self.cols) - 1
        elif final == "A":
            self.row = max(0, self.row - n)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif final == "C":
            self.col = min(self.cols - 1, self.col + n)
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "K":
            spans = {0: range(self.col, self.cols), 1: range(self.col + 1)}
            self._blank(self.row, spans.get(first, range(self.cols)))
        elif final == "J":
            if first == 0:
                self._blank(self.row, range(self.col, self.cols))
            rows = range(self.row + 1, self.rows) if first == 0 else range(self.rows)
            for r in rows:
                self._blank(r, range(self.cols))
        elif final == "r":
            self.top = (first or 1) - 1
            self.bottom = (nums[1] if len(nums) > 1 and nums[1] else self.rows) - 1
            self.row = self.col = 0

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            byte = data[i]
            if byte == 0x1B:
                m = _CSI.match(data, i)
                if m:
                    self._csi(m.group(1).decode(), m.group(2).decode())
                    i = m.end()
                    continue
                nxt = data[i + 1 : i + 2]
                if nxt in (b"(", b")"):
                    i += 3
                    continue
                if nxt == b"7":
                    self.saved = (self.row, self.col)
                elif nxt == b"8":
                    self.row, self.col = self.saved
                elif nxt == b"M":
                    self._reverse_linefeed()
                elif nxt == b"D":
                    self._linefeed()
                i += 2
                continue
            i += 1
            if byte == 0x0D:
                self.col = 0
            elif byte == 0x0A:
                self._linefeed()
            elif byte == 0x08:
                self.col = max(0, self.col - 1)
            elif byte == 0x09:
                self.col = min(self.cols - 1, (self.col // 8 + 1) * 8)
            elif byte >= 0x20 and byte != 0x7F:
                if self.col >= self.cols:  # deferred wrap at the right margin
                    self.col = 0
                    self._linefeed()
                self.grid[self.row][self.col] = chr(byte)
                self.col += 1


class Terminal:
    """A process on a pty: its output is collected by a reader thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: size its terminal, then become the program
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
                os.chdir(ROOT)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid = pid
        self.fd = fd
        self.screen = Screen()
        self.status: int | None = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if ready:
                    data = os.read(self.fd, 65536)
                    if not data:
                        return
                    with self._lock:
                        self.screen.feed(data)
            except OSError:  # EIO: the child side closed
                return

    def text(self) -> str:
        """The screen as the terminal shows it now."""
        with self._lock:
            return "\n".join(self.screen.lines())

    def line(self, prefix: str) -> str:
        """The first line on the screen that starts with ``prefix`` ('' if none)."""
        with self._lock:
            return next((ln for ln in self.screen.lines() if ln.startswith(prefix)), "")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        pytest.fail(f"bandgate top did not exit within {timeout}s; screen:\n{self.text()[-3000:]}")

    def close(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.status = -1
        self._reader.join(5)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def top_env(daemon: Daemon) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BANDGATE_")}
    env.update({"TERM": "vt100", "LINES": str(ROWS), "COLUMNS": str(COLS), "PYTHONUNBUFFERED": "1"})
    env["BANDGATE_SOCKET_DIR"] = daemon.socket_dir
    return env


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for term in opened:
        term.close()


@pytest.fixture
def loaded(start_daemon) -> Iterator[tuple[Daemon, Any]]:
    """A 2-shard daemon with its one unit held and 4 requests queued in two bands."""
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    with d.client() as c:
        held = c.admit("holder-flow", 5)
        assert held.dispatched
        results: list[Any] = []
        threads = [
            threading.Thread(target=lambda f=f, p=p: results.append(c.admit(f, p, byte_size=2048)))
            for f, p in [("busy-flow-alpha", 10)] * 3 + [("quiet-flow-beta", 0)]
        ]
        for t in threads:
            t.start()
        wait_until(lambda: c.stats()["len"] == 4, what="4 requests queued")
        try:
            yield d, held
        finally:
            held.release()
            for _ in range(len(threads)):
                wait_until(lambda: results, what="a queued request dispatched")
                results.pop().release()
            for t in threads:
                t.join(10)


def _stats_words(text: str) -> bool:
    return all(w in text for w in ("BANDS", "SHARDS", "BUSIEST", "FLOWS", "GC", "revivals"))


def _row(term: Terminal, word: str) -> list[str]:
    """The fields of the first screen line that contains ``word``."""
    return next((ln.split() for ln in term.text().splitlines() if word in ln.split()), [])


def test_top_draws_the_live_view_and_quits_on_q(loaded, terminals) -> None:
    d, held = loaded
    before = termios.tcgetattr(sys.stdin.fileno()) if sys.stdin.isatty() else None
    term = Terminal([sys.executable, "-m", "runtime.top", "--interval", "0.5"], top_env(d))
    terminals.append(term)
    wait_until(lambda: _stats_words(term.text()), timeout=10, what="the first screen")
    lines = term.text().splitlines()
    assert lines[0].startswith("bandgate top") and f"pid {d.pid}" in lines[0]
    assert term.line("queued ").startswith("queued 4 (8.2KB)  inflight 1/1  flows 3")
    assert "gate: budget, SATURATED, budget free 0" in term.line("queued ")
    assert term.line("BANDS").split() == [
        "BANDS",
        "priority",
        "name",
        "state",
        "queued",
        "bytes",
        "disp/s",
        "inflight",
        "oldest",
        "flows",
    ]
    band10 = _row(term, "dynamic-10")
    assert band10[:5] == ["10", "dynamic-10", "dynamic", "3", "6.1KB"] and band10[-1] == "1"
    assert band10[-2].endswith(("ms", "s"))  # oldest wait
    assert _row(term, "dynamic-0")[:5] == ["0", "dynamic-0", "dynamic", "1", "2.0KB"]
    assert _row(term, "dynamic-5")[3] == "0"
    assert term.line("SHARDS").split()[1:] == [
        "id",
        "pid",
        "state",
        "queued",
        "bytes",
        "disp/s",
        "inflight",
        "oldest",
    ]
    shards = term.text().split("SHARDS", 1)[1].split("BUSIEST", 1)[0].splitlines()[1:]
    shard_rows = [ln.split() for ln in shards if ln.strip()]
    assert [r[0] for r in shard_rows] == ["0", "1"] and {r[2] for r in shard_rows} == {"active"}
    assert sum(int(r[3]) for r in shard_rows) == 4 and sum(int(r[6]) for r in shard_rows) == 1
    assert _row(term, "busy-flow-alpha")[1:] == ["10", "3", "6.1KB"]
    assert _row(term, "quiet-flow-beta")[1:] == ["0", "1", "2.0KB"]
    assert term.line("GC").startswith("GC  flows removed 0")
    assert lines[-1].startswith("q: quit")
    # While it runs the terminal is in curses' modes: no echo, no line buffering.
    lflag = termios.tcgetattr(term.fd)[3]
    assert not lflag & termios.ECHO and not lflag & termios.ICANON
    # The unit goes to band 10: its queue shrinks and a dispatch rate is drawn for it.
    held.release()

    def band10_drained_one() -> bool:
        row = _row(term, "dynamic-10")
        return row[3] == "2" and row[5] not in ("-", "0.0")  # the same refresh shows both

    wait_until(band10_drained_one, timeout=10, what="band 10 at 2 queued with a dispatch rate")
    term.send(b"q")
    assert term.wait() == 0
    lflag = termios.tcgetattr(term.fd)[3]
    assert lflag & termios.ECHO and lflag & termios.ICANON, "terminal modes not restored"
    if before is not None:
        assert termios.tcgetattr(sys.stdin.fileno()) == before


def test_top_exits_cleanly_on_ctrl_c_and_sigterm(loaded, terminals) -> None:
    d, _ = loaded
    for stop in ("ctrl-c", "sigterm"):
        term = Terminal([sys.executable, "-m", "runtime.top", "--interval", "0.2"], top_env(d))
        terminals.append(term)
        wait_until(lambda t=term: _stats_words(t.text()), timeout=10, what="the first screen")
        if stop == "ctrl-c":
            term.send(b"\x03")
        else:
            os.kill(term.pid, signal.SIGTERM)
        assert term.wait() == 0, f"{stop}: {term.text()[-500:]}"
        lflag = termios.tcgetattr(term.fd)[3]
        assert lflag & termios.ECHO and lflag & termios.ICANON, f"{stop}: modes not restored"
        assert "Traceback" not in term.text()


def test_top_survives_the_daemon_going_away(start_daemon, terminals) -> None:
    d = start_daemon()
    term = Terminal([sys.executable, "-m", "runtime.top", "--interval", "0.2"], top_env(d))
    terminals.append(term)
    wait_until(lambda: _stats_words(term.text()), timeout=10, what="the first screen")
    d.stop()
    wait_until(lambda: "daemon unavailable" in term.text(), timeout=10, what="the outage shown")
    term.send(b"q")
    assert term.wait() == 0
    assert "Traceback" not in term.text()


def test_top_once_prints_one_screen(loaded) -> None:
    d, _ = loaded
    env = top_env(d)
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.top", "--once", "--interval", "0.2"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b" not in out
    assert out.startswith("bandgate top")
    bands = out.split("BANDS", 1)[1].split("SHARDS", 1)[0].splitlines()[1:]
    band_rows = [line.split() for line in bands if line.strip()]
    assert [row[0] for row in band_rows] == ["10", "5", "0"]
    assert band_rows[0][3] == "3"  # queued in band 10
    flows = out.split("BUSIEST FLOWS", 1)[1]
    assert flows.index("busy-flow-alpha") < flows.index("quiet-flow-beta")
    assert "gate: budget, SATURATED, budget free 0" in out
    env["BANDGATE_SOCKET_DIR"] = d.socket_dir + "-nothing-here"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.top", "--once"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "no bandgate daemon" in proc.stderr
