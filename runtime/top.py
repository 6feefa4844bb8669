"""PROCESS: ``bandgate top``, a live view of a running daemon, in the operator's terminal.

Peers: the daemon's coordinator, through a blocking :class:`~runtime.client.Client` (``stats()``
once per refresh; nothing else, so it never disturbs scheduling). It draws with :mod:`curses`
in plain text (no colour, works over SSH in any terminal curses knows) and refreshes every
``--interval`` (1 s):

- a header: queued requests and bytes, budget in use, flows, saturation gate;
- BANDS: per priority band, queued, bytes, dispatched/s, in flight, oldest wait, flows, state;
- SHARDS: per shard, the same columns (state, pid);
- BUSIEST FLOWS: the daemon's list (up to 10) of flows by queued requests;
- GC: flows and bands removed (with the change since the previous refresh), aborts, revivals,
  process restarts.

Rates (dispatched/s) are differences of the daemon's cumulative ``dispatched`` counters between
two refreshes divided by the time between them; a counter that went backwards (a band that was
collected and re-created, a shard restarted) counts from zero. Fields an older daemon does not
report show ``-``.

:mod:`curses` is imported only to draw, so building ``bandgate``'s command line (which imports
this module) works on a Python built without it, and ``--once`` too.

Invariants: ``q`` (or ``Q``), Ctrl-C, SIGTERM and SIGHUP exit with code 0 and the terminal
restored (``curses.wrapper`` undoes cbreak/noecho/keypad on every path); a daemon that stops or
restarts is shown as unavailable and picked up again, never a crash. ``--once`` prints one
screen (rates over one interval) to stdout without curses and exits: 0, or 1 if no daemon
answers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.outcome import BandgateError
from runtime.supervision import ExitCode

__all__ = ["Sample", "add_top_parser", "render", "run_top"]

DEFAULT_INTERVAL = 1.0
MAX_FLOWS_SHOWN = 10


@dataclass(frozen=True)
class Sample:
    """One stats document and the monotonic time it was taken."""

    at: float
    stats: Mapping[str, Any]


def _human_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}TB"


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    if value <= 0:
        return "0"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.1f}s"
    return f"{value / 60:.1f}m"


def _num(value: Any) -> str:
    return "-" if value is None else str(value)


def _rate(
    cur: Mapping[str, Any], prev: Mapping[str, Any] | None, identity: Sequence[str], dt: float
) -> str:
    """Dispatches per second of one row between two samples (``-`` if unknown)."""
    count = cur.get("dispatched")
    if not isinstance(count, int) or prev is None or dt <= 0:
        return "-"
    before = prev.get("dispatched")
    same = all(cur.get(k) == prev.get(k) for k in identity)
    if not isinstance(before, int) or not same or count < before:
        before = 0
    return f"{(count - before) / dt:.1f}"


def _saturation_line(sat: Mapping[str, Any] | None) -> str:
    if not sat:
        return "gate: budget"
    source = sat.get("source", "budget")
    parts = [f"gate: {source}", "SATURATED" if sat.get("saturated") else "open"]
    if sat.get("budget_free") is not None:
        parts.append(f"budget free {sat['budget_free']}")
    if source == "external":
        if sat.get("allowance_left") is not None:
            parts.append(f"allowance left {sat['allowance_left']}")
        fresh = sat.get("fresh")
        if fresh is not None:
            parts.append("report fresh" if fresh else "report STALE")
    return ", ".join(parts)


def render(cur: Sample, prev: Sample | None, width: int = 100, source: str = "") -> list[str]:
    """The screen for one refresh, as lines of at most ``width`` characters.

    Args:
        cur: The latest sample.
        prev: The sample before it (None: rates show ``-``).
        width: The terminal's width.
        source: Where the stats come from (shown in the title), e.g. the socket directory.

    Returns:
        The lines, top to bottom.
    """
    s = cur.stats
    dt = cur.at - prev.at if prev is not None else 0.0
    p = prev.stats if prev is not None else None
    lines: list[str] = []
    restarts = s.get("restarts")
    if isinstance(restarts, Mapping):
        restarts = sum(int(v) for v in restarts.values())
    title = (
        f"bandgate top  {time.strftime('%H:%M:%S')}  pid {_num(s.get('pid'))}  "
        f"gc pid {_num(s.get('gc_pid'))}  restarts {_num(restarts)}"
    )
    if source:
        title += f"  {source}"
    lines.append(title)
    limit = s.get("max_inflight")
    total_rate = "-"
    if p is not None and dt > 0:
        now_d = sum(int(b.get("dispatched", 0)) for b in s.get("bands", {}).values())
        before_d = sum(int(b.get("dispatched", 0)) for b in p.get("bands", {}).values())
        total_rate = f"{max(0, now_d - before_d) / dt:.1f}"
    lines.append(
        f"queued {_num(s.get('len'))} ({_human_bytes(s.get('bytes'))})  "
        f"inflight {_num(s.get('inflight'))}/{limit or 'unlimited'}  "
        f"flows {_num(s.get('flows'))}  dispatched/s {total_rate}  "
        f"{_saturation_line(s.get('saturation'))}"
    )
    lines.append("")
    lines.append(
        f"BANDS {'priority':>10} {'name':<14} {'state':<8} {'queued':>8} {'bytes':>9} "
        f"{'disp/s':>9} {'inflight':>8} {'oldest':>8} {'flows':>6}"
    )
    pbands = {int(k): v for k, v in (p or {}).get("bands", {}).items()}
    bands = {int(k): v for k, v in s.get("bands", {}).items()}
    for prio in sorted(bands, reverse=True):
        b = bands[prio]
        lines.append(
            f"      {prio:>10} {str(b.get('name', ''))[:14]:<14} {str(b.get('state', ''))[:8]:<8} "
            f"{_num(b.get('len')):>8} {_human_bytes(b.get('bytes')):>9} "
            f"{_rate(b, pbands.get(prio), ('generation',), dt):>9} "
            f"{_num(b.get('inflight')):>8} {_seconds(b.get('oldest_wait')):>8} "
            f"{_num(b.get('flows')):>6}"
        )
    if not bands:
        lines.append("      (no bands)")
    lines.append("")
    lines.append(
        f"SHARDS {'id':>3} {'pid':>8} {'state':<9} {'queued':>8} {'bytes':>9} {'disp/s':>9} "
        f"{'inflight':>8} {'oldest':>8}"
    )
    pshards = {sh.get("id"): sh for sh in (p or {}).get("shards", [])}
    for sh in s.get("shards", []):
        lines.append(
            f"       {_num(sh.get('id')):>3} {_num(sh.get('pid')):>8} "
            f"{str(sh.get('state', ''))[:9]:<9} {_num(sh.get('len')):>8} "
            f"{_human_bytes(sh.get('bytes')):>9} "
            f"{_rate(sh, pshards.get(sh.get('id')), ('pid',), dt):>9} "
            f"{_num(sh.get('inflight')):>8} {_seconds(sh.get('oldest_wait')):>8}"
        )
    lines.append("")
    lines.append(f"BUSIEST FLOWS {'flow':<40} {'priority':>10} {'queued':>8} {'bytes':>9}")
    flows = s.get("busiest_flows")
    if flows is None:
        lines.append("              (not reported by this daemon)")
    elif not flows:
        lines.append("              (none queued)")
    for f in (flows or [])[:MAX_FLOWS_SHOWN]:
        flow_id = str(f.get("flow_id", ""))
        if len(flow_id) > 40:
            flow_id = flow_id[:39] + "~"
        lines.append(
            f"              {flow_id:<40} {_num(f.get('priority')):>10} {_num(f.get('len')):>8} "
            f"{_human_bytes(f.get('bytes')):>9}"
        )
    lines.append("")
    gc = s.get("gc", {})
    pgc = (p or {}).get("gc", {})

    def counter(key: str) -> str:
        value = gc.get(key)
        if not isinstance(value, int):
            return "-"
        before = pgc.get(key)
        if p is None or not isinstance(before, int):
            return str(value)
        return f"{value} (+{max(0, value - before)})"

    lines.append(
        f"GC  flows removed {counter('flows_removed')}  bands removed {counter('bands_removed')}  "
        f"aborts {counter('aborts')}  revivals {counter('revivals')}"
    )
    return [line[:width] for line in lines]


class _Source:
    """The daemon connection, re-made after the daemon goes away."""

    def __init__(self, socket_dir: str | None) -> None:
        self.socket_dir = socket_dir
        self.client: Any = None

    def sample(self) -> Sample:
        from runtime.client import Client

        if self.client is None:
            self.client = Client(self.socket_dir)
        try:
            return Sample(time.monotonic(), self.client.stats())
        except (BandgateError, OSError):
            self.close()
            raise

    @property
    def label(self) -> str:
        if self.client is not None:
            return str(self.client.socket_dir)
        return self.socket_dir or ""

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None


class _Stop(Exception):
    """Raised by the SIGTERM/SIGHUP handler to leave the curses loop cleanly."""


def _draw(stdscr: Any, lines: Sequence[str], footer: str) -> None:
    import curses

    height, width = stdscr.getmaxyx()
    stdscr.erase()
    for row, line in enumerate(lines[: max(0, height - 1)]):
        with contextlib.suppress(curses.error):
            stdscr.addnstr(row, 0, line, max(0, width - 1))
    with contextlib.suppress(curses.error):
        stdscr.addnstr(height - 1, 0, footer, max(0, width - 1), curses.A_REVERSE)
    stdscr.refresh()


def _loop(stdscr: Any, source: _Source, interval: float) -> None:
    import curses

    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    stdscr.timeout(100)
    prev: Sample | None = None
    lines: list[str] = []
    next_at = 0.0
    footer = f"q: quit   refresh {interval:g}s"
    while True:
        now = time.monotonic()
        if now >= next_at:
            next_at = now + interval
            try:
                cur = source.sample()
            except (BandgateError, OSError) as exc:
                prev = None
                lines = [
                    f"bandgate top  {time.strftime('%H:%M:%S')}",
                    "",
                    f"daemon unavailable: {exc}",
                    "retrying every refresh...",
                ]
            else:
                lines = render(cur, prev, stdscr.getmaxyx()[1], source.label)
                prev = cur
            _draw(stdscr, lines, footer)
        key = stdscr.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key == curses.KEY_RESIZE:
            _draw(stdscr, lines, footer)


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def run_top(args: argparse.Namespace) -> int:
    """Runs ``bandgate top``.

    Args:
        args: The parsed arguments of the parser made by :func:`add_top_parser`.

    Returns:
        0 on ``q``, Ctrl-C or a signal; with ``--once`` 1 if no daemon answers; 2 if the
        terminal cannot be driven by curses.
    """
    source = _Source(args.socket_dir)
    interval: float = args.interval
    try:
        if args.once:
            return _once(source, interval)
        import curses

        if not sys.stdout.isatty() or not sys.stdin.isatty():
            print("bandgate top: not a terminal; use --once to print one screen", file=sys.stderr)
            return ExitCode.CONFIG_ERROR
        try:
            curses.setupterm()
        except curses.error as exc:
            print(
                f"bandgate top: terminal {os.environ.get('TERM', '')!r} unknown to curses ({exc}); "
                "set TERM (e.g. xterm or vt100) or use --once",
                file=sys.stderr,
            )
            return ExitCode.CONFIG_ERROR
        previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            curses.wrapper(_loop, source, interval)
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return ExitCode.OK
    finally:
        source.close()


def _once(source: _Source, interval: float) -> int:
    try:
        first = source.sample()
        time.sleep(interval)
        second = source.sample()
    except (BandgateError, OSError) as exc:
        print(f"bandgate top: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return ExitCode.OK
    width = shutil.get_terminal_size((200, 40)).columns if sys.stdout.isatty() else 200
    print("\n".join(render(second, first, width, source.label)))
    return ExitCode.OK


def add_top_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``top`` command to ``bandgate``'s subparsers.

    Args:
        subparsers: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``top`` parser.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "top",
        help="live view of a running daemon (q or Ctrl-C quits)",
        description="Live view of a running daemon, refreshed every second: per band and per "
        "shard queued requests, bytes, dispatched/s, in flight and oldest wait; the busiest "
        "flows; GC activity. q or Ctrl-C quits.",
    )
    parser.add_argument(
        "--socket-dir",
        help="the daemon's socket directory (default: BANDGATE_SOCKET_DIR or the default)",
    )
    parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help="seconds between refreshes (default 1)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one screen (rates over one interval) to stdout and exit",
    )
    return parser


def _positive_seconds(text: str) -> float:
    from runtime.config import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 0.1:
        raise argparse.ArgumentTypeError("the interval must be at least 0.1 s")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.top``: the same as ``bandgate top``."""
    parser = argparse.ArgumentParser(prog="bandgate")
    add_top_parser(parser.add_subparsers(dest="command", required=True))
    return run_top(parser.parse_args(["top", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
