"""Hardening: fuzz the wire protocol against a live shard and coordinator.

Random frames, truncated frames, huge length prefixes, valid frames with absurd values, slow
readers that never read their replies, thousands of connections opened and dropped. Throughout,
the daemon stays up (no process restarts), each bad connection gets a clear error or is closed
(never a hang), memory stays bounded (RSS of every daemon process, generous slack) and a
well-behaved client keeps being served. Bounded in CI; ``--soak`` runs far more inputs.

The figures (inputs tried, connections opened) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import threading
import time
import typing
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec
import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ipc import codec, messages as M
from runtime import Client, Outcome
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

MAX_FRAME = 65536
INT32 = (-(2**31), 2**31 - 1)
MIB = 1024 * 1024
# RSS growth allowed per daemon process over a whole test (allocator arenas do not shrink).
RSS_SLACK = 64 * MIB
# The fuzz daemon: one shard and MAX_SHARDS=1, so ScaleShards can never start processes; a small
# band capacity so a byte_size can be rejected at once (the cheapest reply a shard can make).
FUZZ_ENV: dict[str, object] = {
    "SHARDS": 1,
    "MAX_SHARDS": 1,
    "MAX_INFLIGHT": 8,
    "MAX_FRAME": MAX_FRAME,
    "BAND_MAX_BYTES": 1000,
}
FIGURES: Counter[str] = Counter()


# -- wire helpers ---------------------------------------------------------------------------------
def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect, waiting (bounded) while the listener's backlog is full."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(path)
            break
        except BlockingIOError:  # backlog full: the daemon has not accepted yet
            if time.monotonic() > deadline:
                s.close()
                pytest.fail(f"{os.path.basename(path)} accepted no connection for {timeout}s")
            time.sleep(0.001)
    FIGURES["connections"] += 1
    return s


def request(path: str, payload: bytes, timeout: float = 5.0) -> Any:
    """One frame out, the first frame back (the connection stays open until it arrives)."""
    s = connect(path, timeout)
    try:
        s.sendall(frame(payload))
        buf = b""
        while True:
            chunk = s.recv(65536)
            assert chunk, "closed without a reply"
            buf += chunk
            frames, buf = parse_frames(buf)
            if frames:
                return frames[0]
    finally:
        s.close()


def parse_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    out = []
    pos = 0
    while len(buf) - pos >= 4:
        (size,) = struct.unpack_from(">I", buf, pos)
        if len(buf) - pos - 4 < size:
            break
        out.append(buf[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out, buf[pos:]


def exchange(path: str, chunks: list[bytes], timeout: float = 5.0) -> tuple[list[bytes], bytes]:
    """Send ``chunks``, half-close, read until the daemon closes. Fails on a hang."""
    s = connect(path, timeout)
    data = b""
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                pytest.fail(f"no EOF from {os.path.basename(path)} within {timeout}s (a hang)")
            if not chunk:
                break
            data += chunk
            if time.monotonic() > deadline:
                pytest.fail(f"{os.path.basename(path)} kept talking for {timeout}s")
    finally:
        s.close()
    return parse_frames(data)


def sent_messages(chunks: list[bytes]) -> list[Any]:
    """The client messages the shard decoded from ``chunks``, up to the first bad one."""
    frames, _ = parse_frames(b"".join(chunks))
    out = []
    for f in frames:
        if len(f) > MAX_FRAME:
            break
        try:
            out.append(codec.client_to_shard(f))
        except codec.DecodeError:
            break
    return out


def check_replies(frames: list[bytes], rest: bytes, decode: Any, who: str) -> list[Any]:
    """Every reply is a well-formed message of the channel; an ErrorReply is the last word."""
    assert rest == b"", f"{who} sent a partial frame"
    msgs = [decode(f) for f in frames]
    for i, msg in enumerate(msgs):
        if type(msg) is M.ErrorReply:
            assert i == len(msgs) - 1, f"{who} kept talking after {msg!r}"
            assert msg.code and msg.reason
    return msgs


# -- daemon observation --------------------------------------------------------------------------
def daemon_procs(d: Any) -> dict[int, psutil.Process]:
    out = {}
    for pid in d.all_pids():
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            if "resource_tracker" not in " ".join(p.cmdline()):
                out[pid] = p
    return out


def footprint(d: Any) -> dict[int, tuple[int, int]]:
    """(RSS, open fds) of every daemon process."""
    out = {}
    for pid, p in daemon_procs(d).items():
        with contextlib.suppress(psutil.NoSuchProcess):
            out[pid] = (p.memory_info().rss, p.num_fds())
    return out


def assert_bounded(d: Any, before: dict[int, tuple[int, int]], fd_slack: int = 8) -> None:
    """No daemon process leaked file descriptors or grew its RSS past the slack."""

    def settled() -> dict[int, tuple[int, int]] | None:
        now = footprint(d)
        if all(now.get(pid, (0, 0))[1] <= fds + fd_slack for pid, (_, fds) in before.items()):
            return now
        return None

    after = wait_until(settled, timeout=10, what="file descriptors back to their baseline")
    assert isinstance(after, dict)
    assert set(after) == set(before), f"daemon processes changed: {before} -> {after}"
    for pid, (rss, _) in before.items():
        grown = after[pid][0] - rss
        FIGURES["max_rss_growth_mib"] = max(FIGURES["max_rss_growth_mib"], grown // MIB)
        assert grown < RSS_SLACK, f"pid {pid} RSS grew by {grown / MIB:.1f} MiB"


def admit_release(c: Client, flow: str, priority: int = 0, **kw: Any) -> tuple[Outcome, str]:
    adm = c.admit(flow, priority, **kw)
    adm.release()
    return adm.outcome, adm.reason


def served(c: Client) -> None:
    """A well-behaved client is still served promptly (liveness bound, not a speed test)."""
    assert admit_release(c, "good-citizen", 0, ttl=5.0) == (Outcome.DISPATCHED, "")


def assert_healthy(d: Any, c: Client, pids: dict[str, Any], limit: int) -> None:
    st_ = c.stats()
    assert d.proc.poll() is None
    assert st_["restarts"] == {"shard_restarts": 0, "gc_restarts": 0}, st_["restarts"]
    assert {
        "pid": st_["pid"],
        "gc": st_["gc_pid"],
        "shards": [s["pid"] for s in st_["shards"]],
    } == pids
    wait_until(
        lambda: (s := c.stats())["len"] == 0 and s["inflight"] == 0 and s["bytes"] == 0,
        what="every fuzz request withdrawn and every unit returned",
    )
    held = [c.admit("budget-probe", 7, ttl=5.0) for _ in range(limit)]
    try:
        assert all(a.dispatched for a in held), held
        extra = c.admit("budget-probe", 7, ttl=0.2)
        extra.release()
        assert extra.outcome is Outcome.EVICTED_TTL, f"budget over-returned: {extra!r}"
    finally:
        for a in held:
            a.release()
    wait_until(lambda: c.stats()["inflight"] == 0, what="budget probe released")


def pids_of(c: Client) -> dict[str, Any]:
    st_ = c.stats()
    return {"pid": st_["pid"], "gc": st_["gc_pid"], "shards": [s["pid"] for s in st_["shards"]]}


@contextlib.contextmanager
def fuzz_daemon(start_daemon: Any, **extra: object) -> Iterator[tuple[Any, Client]]:
    d = start_daemon(**{**FUZZ_ENV, **extra})
    with d.client() as c:
        served(c)
        # The budget probe's band exists before the fuzz can fill the band table.
        assert admit_release(c, "budget-probe", 7) == (Outcome.DISPATCHED, "")
        yield d, c


# -- strategies -----------------------------------------------------------------------------------
SPECIAL_INTS = [
    0, 1, -1, 7, INT32[1], INT32[1] + 1, INT32[0], INT32[0] - 1, 2**53, 2**62, 2**62 + 1,
    2**63 - 1, -(2**63), 2**64 - 1,
]  # fmt: skip
INTS = st.one_of(
    st.sampled_from(SPECIAL_INTS), st.integers(-5, 5), st.integers(-(2**63), 2**64 - 1)
)
FLOATS = st.one_of(
    st.sampled_from(
        [0.0, -0.0, 5e-324, 1e-9, 0.5, 1.0, -1.0, 3.15e8, 3.16e8, 1e300, float("inf"), float("nan")]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXTS = st.one_of(
    st.sampled_from(["", "a", "tenant", "x" * 1024, "x" * 1025, "é" * 512, "é" * 513, "\x00"]),
    st.text(max_size=24),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    FLOATS,
    TEXTS,
    st.binary(max_size=48),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=8)),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3)), inner, max_size=4),
    ),
    max_leaves=10,
)
# Plausible values, so many frames get past validation and exercise the queues.
PLAUSIBLE = {
    "flow_id": st.sampled_from(["fz-a", "fz-b", "fz-c"]),
    "priority": st.sampled_from([0, 1, 5, -3]),
    "byte_size": st.sampled_from([0, 1, 999, 1000, 1001]),
    "ttl": st.sampled_from([0.0, 0.05, 30.0]),
    "id": st.integers(0, 40),
}


def field_strategy(name: str, tp: Any) -> st.SearchStrategy[Any]:
    if tp is int:
        base: st.SearchStrategy[Any] = INTS
    elif tp is float:
        base = FLOATS
    elif tp is str:
        base = TEXTS
    elif tp is bool:
        base = st.booleans()
    elif typing.get_origin(tp) is tuple:
        base = st.lists(INTS, max_size=6)
    else:
        base = ANY
    if name in PLAUSIBLE:
        base = st.one_of(PLAUSIBLE[name], PLAUSIBLE[name], base)
    return base


def message_strategy(union: Any) -> st.SearchStrategy[Any]:
    """A tagged array as the codec expects, with typed-but-absurd, missing, extra or wrong fields."""
    options = []
    for cls in typing.get_args(union):
        tag = cls.__struct_config__.tag
        fields = msgspec.structs.fields(cls)

        @st.composite
        def build(draw: Any, tag: str = tag, fields: Any = fields) -> list[Any]:
            values = [draw(field_strategy(f.name, f.type)) for f in fields]
            shape = draw(st.sampled_from(["typed"] * 6 + ["retyped", "short", "long"]))
            if shape == "retyped" and values:
                values[draw(st.integers(0, len(values) - 1))] = draw(ANY)
            elif shape == "short":
                values = values[: draw(st.integers(0, len(values)))]
            elif shape == "long":
                values += draw(st.lists(ANY, min_size=1, max_size=3))
            return [tag, *values]

        options.append(build())
    options.append(st.builds(lambda tag, rest: [tag, *rest], TEXTS, st.lists(ANY, max_size=4)))
    options.append(ANY)
    return st.one_of(*options)


def excluded(payload: bytes) -> bool:
    """Control requests the random search must not send to the coordinator.

    - Legitimate state changes that would starve the well-behaved client or fill the band table
      on purpose: a valid ReportSaturation (external credit mode), a valid Reconcile of more than
      a few small priorities (desired bands are never collected). Invalid ones are sent: they
      must be refused.
    """
    try:
        msg = codec.to_coordinator(payload)
    except codec.DecodeError:
        return False
    if type(msg) is M.Reconcile:
        valid = all(INT32[0] <= p <= INT32[1] for p in msg.priorities)
        return valid and (not set(msg.priorities) <= SMALL_PRIORITIES or len(msg.priorities) > 8)
    if type(msg) is M.ReportSaturation:
        return 0 <= msg.allowance <= 2**40 and 0 < msg.valid_for <= 3600
    return False


SMALL_PRIORITIES = frozenset(range(-3, 11))


@st.composite
def byte_stream(draw: Any, union: Any, filter_known: bool = False) -> list[bytes]:
    """A connection's worth of bytes, split in random chunks."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["msg"] * 6 + ["raw", "empty", "huge", "truncated", "max"]))
        if kind == "msg":
            payload = msgspec.msgpack.encode(draw(message_strategy(union)))
            if filter_known and excluded(payload):
                continue
            parts.append(frame(payload))
        elif kind == "raw":
            parts.append(frame(draw(st.binary(max_size=96))))
        elif kind == "empty":
            parts.append(frame(b""))
        elif kind == "max":  # exactly the limit: accepted as a frame, then fails to decode
            parts.append(frame(b"\xc1" * MAX_FRAME))
        elif kind == "huge":
            size = draw(
                st.sampled_from([MAX_FRAME + 1, 2**31, 2**32 - 1])
                | st.integers(MAX_FRAME + 1, 2**32 - 1)
            )
            parts.append(struct.pack(">I", size) + draw(st.binary(max_size=16)))
            break
        else:  # truncated: the connection ends inside a frame
            whole = frame(msgspec.msgpack.encode(draw(message_strategy(union))))
            parts.append(whole[: draw(st.integers(0, len(whole) - 1))])
            break
    data = b"".join(parts)
    if data and draw(st.integers(0, 9)) == 0:  # flip a byte somewhere
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=4))))
    bounds = [0, *cuts, len(data)]
    FIGURES["bytes_sent"] += len(data)
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def fuzz_settings(soak: bool, ci_examples: int) -> settings:
    return settings(
        max_examples=ci_examples * 10 if soak else ci_examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- tests ----------------------------------------------------------------------------------------
def test_fuzz_shard_socket(start_daemon, soak):
    """Random and absurd client frames against a live shard."""
    with fuzz_daemon(start_daemon) as (d, c):
        path = os.path.join(d.socket_dir, "shard-0.sock")
        pids = pids_of(c)
        before = footprint(d)
        tried = Counter[str]()

        @fuzz_settings(soak, 250)
        @given(chunks=byte_stream(M.ClientToShard))
        def one(chunks: list[bytes]) -> None:
            tried["inputs"] += 1
            frames, rest = exchange(path, chunks)
            msgs = check_replies(frames, rest, codec.shard_to_client, "shard")
            # At most one outcome per Submit (an id may be reused once its outcome is out).
            submits = Counter(m.id for m in sent_messages(chunks) if type(m) is M.Submit)
            outcomes = Counter(m.id for m in msgs if type(m) is M.Decided)
            assert all(n <= submits[i] for i, n in outcomes.items()), (submits, outcomes)
            assert all(m.outcome != M.OutcomeCode.RETRY for m in msgs if type(m) is M.Decided)
            if tried["inputs"] % 50 == 0:
                served(c)

        one()
        served(c)
        assert_healthy(d, c, pids, 8)
        assert_bounded(d, before)
        FIGURES["shard_inputs"] += tried["inputs"]
    print(f"\nfuzz shard: {tried['inputs']} inputs; figures so far {dict(FIGURES)}")


def test_fuzz_coordinator_sockets(start_daemon, soak):
    """Random and absurd frames against the control socket and the internal socket."""
    with fuzz_daemon(start_daemon) as (d, c):
        control = os.path.join(d.socket_dir, "control.sock")
        internal = os.path.join(d.socket_dir, "internal.sock")
        pids = pids_of(c)
        before = footprint(d)
        tried = Counter[str]()

        @fuzz_settings(soak, 150)
        @given(
            target=st.sampled_from(["control", "control", "internal"]),
            chunks=byte_stream(M.ToCoordinator, filter_known=True),
        )
        def one(target: str, chunks: list[bytes]) -> None:
            tried["inputs"] += 1
            frames, rest = exchange(control if target == "control" else internal, chunks)
            msgs = check_replies(frames, rest, codec.from_coordinator, target)
            crashed = [m for m in msgs if type(m) is M.ErrorReply and m.code == "internal_error"]
            assert not crashed, f"a control request raised inside the coordinator: {crashed}"
            if target == "internal":
                assert msgs == [], f"the internal socket answered a stranger: {msgs}"
            else:
                assert all(type(m) in (M.Topology, M.JsonReply, M.Ack, M.ErrorReply) for m in msgs)
            if tried["inputs"] % 50 == 0:
                served(c)

        one()
        c.reconcile_priorities([])  # undo any desired set the fuzz made
        served(c)
        assert_healthy(d, c, pids, 8)
        assert_bounded(d, before)
        st_ = c.stats()
        assert [s["state"] for s in st_["shards"]] == ["active"]
        assert st_["saturation"]["source"] == "budget", st_["saturation"]
        FIGURES["coordinator_inputs"] += tried["inputs"]
    print(f"\nfuzz coordinator: {tried['inputs']} inputs; figures so far {dict(FIGURES)}")


def test_bad_frames_get_clear_errors(start_daemon):
    """Deterministic corner cases: every one is answered and only its own connection closes."""
    with fuzz_daemon(start_daemon) as (d, c):
        shard = os.path.join(d.socket_dir, "shard-0.sock")
        control = os.path.join(d.socket_dir, "control.sock")
        pids = pids_of(c)
        enc = msgspec.msgpack.encode
        cases = [
            (shard, struct.pack(">I", 2**32 - 1), "bad_frame"),
            (shard, struct.pack(">I", MAX_FRAME + 1) + b"x" * 100, "bad_frame"),
            (shard, frame(b""), "bad_message"),
            (shard, frame(b"\xc1"), "bad_message"),
            (shard, frame(enc(["s", 1, "", 0, 0, 0.0])), "bad_submit"),
            (shard, frame(enc(["s", 1, "f", 2**31, 0, 0.0])), "bad_submit"),
            (shard, frame(enc(["s", 1, "f", 0, -1, 0.0])), "bad_submit"),
            (shard, frame(enc(["s", 1, "f", 0, 2**63 - 1, 0.0])), "bad_submit"),
            (shard, frame(enc(["s", 1, "f", 0, 0, float("nan")])), "bad_submit"),
            (shard, frame(enc(["s", 1, "f", 0, 0, float("inf")])), "bad_submit"),
            (shard, frame(enc(["s", 1, "f", 0, 0, -1.0])), "bad_submit"),
            (shard, frame(enc(["s", 1, "x" * 1025, 0, 0, 0.0])), "bad_submit"),
            (shard, frame(enc(["s", 1, "f", 0, 0, 1.0])) * 2, "duplicate_id"),
            (shard, frame(enc(["zz", 1])), "bad_message"),
            (shard, frame(enc(["hello", 1])), "bad_message"),
            (control, struct.pack(">I", 2**32 - 1), "bad_frame"),
            (control, frame(b""), "bad_message"),
            (control, frame(enc(["s", 1, "f", 0, 0, 0.0])), "bad_message"),
            (control, frame(enc(["shard_hello", "token", 0, 1])), "unexpected_message"),
            (control, frame(enc(["vote", 1, 0, True, ""])), "unexpected_message"),
        ]
        for path, data, code in cases:
            frames, rest = exchange(path, [data])
            decode = codec.shard_to_client if path == shard else codec.from_coordinator
            msgs = check_replies(frames, rest, decode, os.path.basename(path))
            assert msgs and type(msgs[-1]) is M.ErrorReply, (data[:40], msgs)
            assert msgs[-1].code == code, (data[:40], msgs[-1])
            FIGURES["deterministic_inputs"] += 1
        # Exactly MAX_FRAME is a frame (not a framing error); a lone prefix then silence is no hang.
        frames, _ = exchange(shard, [frame(b"\xc1" * MAX_FRAME)])
        assert codec.shard_to_client(frames[-1]).code == "bad_message"
        frames, _ = exchange(shard, [struct.pack(">I", 100) + b"\x96"])
        assert frames == []
        # Harmless oddities are not errors.
        frames, _ = exchange(shard, [frame(enc(["r", 2**64 - 1])), frame(enc(["c", -(2**63)]))])
        assert frames == []
        served(c)
        assert_healthy(d, c, pids, 8)


def refused(control: str, msgs: list[list[Any]]) -> dict[str, Any]:
    """Send each request on its own connection; return those NOT answered by Ack(ok=False)."""
    enc = msgspec.msgpack.encode
    problems = {}
    for msg in msgs:
        frames, rest = exchange(control, [frame(enc(msg))])
        replies = check_replies(frames, rest, codec.from_coordinator, "control")
        if not (len(replies) == 1 and type(replies[0]) is M.Ack and not replies[0].ok):
            problems[f"{msg[0]} {str(msg[1:])[:40]}"] = replies
        FIGURES["deterministic_inputs"] += 1
    return problems


def test_coordinator_refuses_absurd_reconcile(start_daemon):
    with fuzz_daemon(start_daemon) as (d, c):
        control = os.path.join(d.socket_dir, "control.sock")
        bands_before = set(c.stats()["bands"])
        problems = refused(
            control,
            [
                ["reconcile", [2**31]],
                ["reconcile", [INT32[0] - 1]],
                ["reconcile", [-(2**63)]],
                ["reconcile", [2**64 - 1]],
                ["reconcile", [0, 5, 2**40]],  # all or nothing
                ["reconcile", list(range(1000))],  # more than BANDGATE_MAX_BANDS
            ],
        )
        assert not problems, f"not refused with a clear Ack(ok=False): {problems}"
        st_ = c.stats()
        assert set(st_["bands"]) == bands_before
        assert all(b["state"] != "desired" for b in st_["bands"].values())
        # The band table still has room for a legitimate new priority.
        assert admit_release(c, "new-band", 12345) == (Outcome.DISPATCHED, "")


def test_coordinator_refuses_absurd_report_saturation(start_daemon):
    with fuzz_daemon(start_daemon) as (d, c):
        control = os.path.join(d.socket_dir, "control.sock")
        problems = refused(
            control,
            [
                ["report_saturation", -1, 1.0],
                ["report_saturation", 1, 0.0],
                ["report_saturation", 1, float("nan")],
                ["report_saturation", 1, float("inf")],
                ["report_saturation", 1, 3601.0],
                ["report_saturation", 2**64 - 1, 1.0],
                ["report_saturation", 2**63 - 1, 1.0],  # overflows once anything was dispatched
            ],
        )
        assert not problems, f"not refused with a clear Ack(ok=False): {problems}"
        assert c.stats()["saturation"]["source"] == "budget"
        served(c)


def test_slow_readers(start_daemon):
    """Clients that flood requests and never read: the daemon buffers a bounded amount, cuts off
    the worst, and keeps serving everyone else."""
    with fuzz_daemon(start_daemon) as (d, c):
        shard = os.path.join(d.socket_dir, "shard-0.sock")
        control = os.path.join(d.socket_dir, "control.sock")
        pids = pids_of(c)
        before = footprint(d)
        enc = msgspec.msgpack.encode
        # Warm the flow, so the flood is rejected at once instead of parked for provisioning.
        reply = request(shard, enc(["s", 0, "slow", 0, 2000, 0.0]))
        assert codec.shard_to_client(reply).outcome == M.OutcomeCode.REJECTED_CAPACITY
        reply_size = 4 + len(reply)
        light_n = 20_000  # under the daemon's 8 MiB per-connection limit
        heavy_n = (12 * MIB) // reply_size  # over it
        stop = threading.Event()
        latencies: list[float] = []
        errors: list[BaseException] = []

        def good_citizen() -> None:
            try:
                while not stop.is_set():
                    t0 = time.monotonic()
                    served(c)
                    latencies.append(time.monotonic() - t0)
                    time.sleep(0.01)
            except BaseException as exc:
                errors.append(exc)

        def flood(path: str, payload: bytes, n: int) -> socket.socket:
            s = connect(path, timeout=30)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            batch = b"".join(frame(payload) for _ in range(1000))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(n // 1000):
                    s.sendall(batch)
            return s

        def submit(i: int) -> bytes:
            return enc(["s", i, "slow", 0, 2000, 0.0])

        citizen = threading.Thread(target=good_citizen)
        citizen.start()
        try:
            light = []
            for _ in range(2):
                s = connect(shard, timeout=30)
                for base in range(0, light_n, 1000):
                    s.sendall(b"".join(frame(submit(i)) for i in range(base, base + 1000)))
                light.append(s)
            heavy = connect(shard, timeout=30)
            heavy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for base in range(0, heavy_n, 1000):
                    heavy.sendall(b"".join(frame(submit(i)) for i in range(base, base + 1000)))
            heavy_ctl = flood(control, enc(["hello", 1]), 150_000)
            FIGURES["slow_reader_requests"] += 2 * light_n + heavy_n + 150_000
            # The flooders are cut off, never read: the daemon stays responsive meanwhile.
            time.sleep(0.5)
            served(c)
            # A light slow reader that finally reads gets every reply.
            for s in light:
                s.shutdown(socket.SHUT_WR)
                got = drain(s)
                assert got == (light_n, True), got
                s.close()
            # The heavy ones were disconnected before all their replies were queued.
            count, _ = drain(heavy)
            heavy.close()
            assert count < heavy_n, f"a reader that never reads got {count} replies buffered"
            count_ctl, _ = drain(heavy_ctl)
            heavy_ctl.close()
            assert count_ctl < 150_000
        finally:
            stop.set()
            citizen.join(30)
        assert not errors, errors
        assert latencies and max(latencies) < 5.0
        FIGURES["slow_reader_good_requests"] += len(latencies)
        assert_healthy(d, c, pids, 8)
        assert_bounded(d, before)
    print(f"\nslow readers: {dict(FIGURES)}")


def drain(s: socket.socket, timeout: float = 20.0) -> tuple[int, bool]:
    """Read frames until EOF; (how many, whether the stream ended on a frame boundary)."""
    s.settimeout(timeout)
    n = 0
    buf = b""
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
        frames, buf = parse_frames(buf)
        n += len(frames)
    return n, buf == b""


def test_thousands_of_connections(start_daemon, soak):
    """Connections opened and dropped in every state; nothing leaks (fds, memory, units)."""
    total = 20_000 if soak else 3_000  # ~1 s per 3,000 here
    with fuzz_daemon(start_daemon) as (d, c):
        shard = os.path.join(d.socket_dir, "shard-0.sock")
        control = os.path.join(d.socket_dir, "control.sock")
        internal = os.path.join(d.socket_dir, "internal.sock")
        pids = pids_of(c)
        before = footprint(d)
        enc = msgspec.msgpack.encode
        styles = [
            b"",  # connect and drop
            struct.pack(">I", 50) + b"\x96\xa1s",  # half a frame
            frame(enc(["s", 1, "drop-q", 3, 10, 0.0])),  # a request, then vanish
            b"".join(frame(enc(["s", i, "drop-d", 3, 10, 0.0])) for i in range(12)),
            frame(enc(["s", 1, "drop-t", 3, 10, 0.01])),
        ]
        opened = 0
        batch = 250
        while opened < total:
            socks = []
            for i in range(batch):
                which = (opened + i) % 10
                path = shard if which < 7 else control if which < 9 else internal
                s = connect(path)
                data = (
                    styles[(opened + i) % len(styles)]
                    if path == shard
                    else (frame(enc(["get_stats"])) if which == 7 else b"\x00\x00")
                )
                if data:
                    with contextlib.suppress(OSError):
                        s.sendall(data)
                socks.append(s)
            for i, s in enumerate(socks):
                if i % 2:  # some abort (RST-like), some close cleanly
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            opened += batch
            served(c)
        FIGURES["dropped_connections"] += opened
        assert_healthy(d, c, pids, 8)
        assert_bounded(d, before)
    print(f"\nconnections: {dict(FIGURES)}")
