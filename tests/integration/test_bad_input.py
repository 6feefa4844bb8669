"""Bad input on the shard and control sockets: a clear error, one log line, nobody else hurt.

A raw socket speaks to ``<socket_dir>/shard-0.sock`` and ``<socket_dir>/control.sock`` without
the client library. For every malformed or invalid message the daemon answers an ``ErrorReply``
frame where it can, closes that connection only, logs one line for it, and keeps serving: a
well-behaved client's queued request stays queued and is dispatched afterwards.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable

import msgspec
import pytest

from ipc import codec
from ipc.framing import HEADER, frame
from ipc.messages import (
    Ack,
    Cancel,
    Decided,
    ErrorReply,
    GetStats,
    Hello,
    JsonReply,
    OutcomeCode,
    Provision,
    Reconcile,
    Release,
    ScaleShards,
    ShardHello,
    Submit,
    Vote,
)
from runtime import Admission, Client, Outcome
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

SHARD_LOG = "closing client connection"
CONTROL_LOG = "closing control connection"
MAX_FRAME = 65536  # BANDGATE_MAX_FRAME default


def raw_submit(req_id: int, flow_id: str, priority: int, byte_size: int, ttl: float) -> bytes:
    """A Submit frame, built without the client library's validation."""
    return frame(codec.encode(Submit(req_id, flow_id, priority, byte_size, ttl)))


class Raw:
    """One raw connection; ``exchange`` sends bytes and reads every frame until EOF."""

    def __init__(self, path: str, decode: Callable[[bytes], object]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decode = decode
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self, timeout: float = 15.0) -> object | None:
        """The next frame, decoded, or None at EOF."""
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 4:
                (size,) = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 4 + size:
                    data, self.buf = self.buf[4 : 4 + size], self.buf[4 + size :]
                    return self.decode(data)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self.buf, f"connection closed inside a frame: {self.buf!r}"
                return None
            self.buf += chunk

    def until_eof(self, timeout: float = 15.0) -> list[object]:
        out = []
        while (msg := self.recv_frame(timeout)) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


class Setup:
    """A daemon with one unit held and one well-behaved request queued behind it."""

    def __init__(self, start_daemon: Callable[..., object]) -> None:
        self.d = start_daemon(SHARDS=1, MAX_INFLIGHT=1)
        self.shard_path = os.path.join(self.d.socket_dir, "shard-0.sock")
        self.control_path = os.path.join(self.d.socket_dir, "control.sock")
        self.client = Client(self.d.socket_dir)
        self.holder = self.client.admit("holder", 0)
        assert self.holder.dispatched
        self.result: list[Admission] = []
        self.waiter = threading.Thread(
            target=lambda: self.result.append(self.client.admit("good", 0, byte_size=42)),
            daemon=True,
        )
        self.waiter.start()
        wait_until(lambda: self.client.stats()["len"] == 1, what="good request queued")
        self.pids = {r["id"]: r["pid"] for r in self.client.stats()["shards"]}
        self.shard_errors = 0
        self.control_errors = 0

    def log_count(self, needle: str) -> int:
        return sum(needle in line for line in self.d.log().splitlines())

    def expect_logged(self, shard: int = 0, control: int = 0, timeout: float = 10.0) -> None:
        self.shard_errors += shard
        self.control_errors += control
        want = (self.shard_errors, self.control_errors)
        wait_until(
            lambda: (self.log_count(SHARD_LOG), self.log_count(CONTROL_LOG)) == want,
            timeout=timeout,
            what=f"{want} error lines in the daemon log",
        )

    def shard(self) -> Raw:
        return Raw(self.shard_path, codec.shard_to_client)

    def control(self) -> Raw:
        return Raw(self.control_path, codec.from_coordinator)

    def _bad(self, conn: Raw, data: bytes, code: str) -> ErrorReply:
        """Send ``data``; expect exactly one error frame with ``code``, then the close."""
        try:
            conn.send(data)
            replies = conn.until_eof()
        finally:
            conn.close()
        assert len(replies) == 1 and type(replies[0]) is ErrorReply, replies
        assert replies[0].code == code, replies[0]
        assert replies[0].reason
        return replies[0]

    def bad_shard(self, data: bytes, code: str) -> ErrorReply:
        reply = self._bad(self.shard(), data, code)
        self.expect_logged(shard=1)
        return reply

    def bad_control(self, data: bytes, code: str) -> ErrorReply:
        reply = self._bad(self.control(), data, code)
        self.expect_logged(control=1)
        return reply

    def check_unharmed(self) -> None:
        """The good request is still queued, the daemon still whole; then it is dispatched."""
        s = self.client.stats()
        assert s["len"] == 1 and s["bytes"] == 42 and s["inflight"] == 1, s
        assert {r["id"]: r["pid"] for r in s["shards"]} == self.pids, "a shard was restarted"
        assert s["restarts"] == {"shard_restarts": 0, "gc_restarts": 0}
        assert self.d.proc.poll() is None
        assert not self.result, "the good request was decided early"
        self.holder.release()
        self.waiter.join(15)
        assert self.result and self.result[0].outcome is Outcome.DISPATCHED, self.result
        self.result[0].release()
        wait_until(lambda: self.client.stats()["inflight"] == 0, what="unit returned")
        # and new clients are still served
        with Client(self.d.socket_dir) as other:
            assert other.admit("after", 0).dispatched

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def setup(start_daemon):
    s = Setup(start_daemon)
    yield s
    s.close()


def test_bad_frames_and_messages_on_a_shard_socket(setup):
    garbage = random.Random(20240601).randbytes(512)
    assert HEADER.unpack_from(garbage)[0] > MAX_FRAME  # deterministic: an oversize prefix
    setup.bad_shard(garbage, "bad_frame")
    # a complete frame of random bytes (not msgpack of any message)
    setup.bad_shard(frame(random.Random(7).randbytes(64)), "bad_message")
    r = setup.bad_shard(b"\xff\xff\xff\xff" + b"x" * 100, "bad_frame")
    assert str(MAX_FRAME) in r.reason
    setup.bad_shard(HEADER.pack(MAX_FRAME + 1), "bad_frame")
    setup.bad_shard(frame(b""), "bad_message")
    # well-formed msgpack, unknown tag / wrong channel / wrong field types
    setup.bad_shard(frame(msgspec.msgpack.encode(["zz", 1])), "bad_message")
    setup.bad_shard(frame(msgspec.msgpack.encode({"t": "s", "id": 1})), "bad_message")
    setup.bad_shard(frame(codec.encode(Hello(1))), "bad_message")
    setup.bad_shard(frame(msgspec.msgpack.encode(["s", "one", "f", 0, 0, 0.0])), "bad_message")
    setup.bad_shard(frame(msgspec.msgpack.encode(["s", 1, "f", True, 0, 0.0])), "bad_message")
    # a flow id that is not UTF-8: fixarray(6) "s" 1 str(2)=ff fe 0 0 float64(0.0)
    bad_utf8 = b"\x96\xa1s\x01\xa2\xff\xfe\x00\x00\xcb" + b"\x00" * 8
    setup.bad_shard(frame(bad_utf8), "bad_message")
    setup.check_unharmed()


def test_invalid_submits_on_a_shard_socket(setup):
    cases = [
        (raw_submit(1, "", 0, 0, 0.0), "flow_id"),
        (raw_submit(1, "f" * 1025, 0, 0, 0.0), "flow_id"),
        (raw_submit(1, "é" * 600, 0, 0, 0.0), "flow_id"),
        (raw_submit(1, "f", 0, -1, 0.0), "byte_size"),
        (raw_submit(1, "f", 0, 2**63 - 1, 0.0), "byte_size"),
        (raw_submit(1, "f", 2**40, 0, 0.0), "priority"),
        (raw_submit(1, "f", -(2**31) - 1, 0, 0.0), "priority"),
        (raw_submit(1, "f", 0, 0, -1.0), "ttl"),
        (raw_submit(1, "f", 0, 0, float("nan")), "ttl"),
        (raw_submit(1, "f", 0, 0, float("inf")), "ttl"),
    ]
    for data, field in cases:
        r = setup.bad_shard(data, "bad_submit")
        assert field in r.reason, (field, r)
    # none of them created a flow, a band or a queued item
    s = setup.client.stats()
    assert s["flows"] == 2 and s["len"] == 1, s  # holder's and good's flows only
    setup.check_unharmed()


def test_duplicate_id_and_garbage_after_valid_requests_withdraw_them(setup):
    # a valid request queued, then the same id again: the connection is dropped and the
    # request it had queued is withdrawn (its client broke the protocol and is gone)
    conn = setup.shard()
    try:
        conn.send(raw_submit(7, "dup", 0, 10, 0.0))
        wait_until(lambda: setup.client.stats()["len"] == 2, what="valid request queued")
        conn.send(raw_submit(7, "dup", 0, 10, 0.0))
        replies = conn.until_eof()
    finally:
        conn.close()
    assert [type(m) for m in replies] == [ErrorReply] and replies[0].code == "duplicate_id"
    setup.expect_logged(shard=1)
    wait_until(lambda: setup.client.stats()["len"] == 1, what="its queued request withdrawn")
    # a valid request, then garbage on the same connection
    conn = setup.shard()
    try:
        conn.send(raw_submit(1, "then-garbage", 0, 10, 0.0))
        wait_until(lambda: setup.client.stats()["len"] == 2, what="valid request queued")
        conn.send(b"\xff\xff\xff\xff")
        replies = conn.until_eof()
    finally:
        conn.close()
    assert [type(m) for m in replies] == [ErrorReply] and replies[0].code == "bad_frame"
    setup.expect_logged(shard=1)
    wait_until(lambda: setup.client.stats()["len"] == 1, what="its queued request withdrawn")
    assert setup.client.stats()["bytes"] == 42
    setup.check_unharmed()


def test_release_and_cancel_of_unknown_ids_are_harmless(setup):
    conn = setup.shard()
    try:
        # releasing ids this connection was never given must not hand out units
        for i in range(50):
            conn.send(frame(codec.encode(Release(1000 + i))))
            conn.send(frame(codec.encode(Cancel(2000 + i))))
        conn.send(raw_submit(1, "probe", 0, 1, 0.0))
        wait_until(lambda: setup.client.stats()["len"] == 2, what="probe queued behind the unit")
        s = setup.client.stats()
        assert s["inflight"] == 1, s
        # cancelling a real request of this connection works, and is answered once
        conn.send(frame(codec.encode(Cancel(1))))
        msg = conn.recv_frame()
        assert type(msg) is Decided and msg.id == 1
        assert msg.outcome == OutcomeCode.EVICTED_CANCELLED
        conn.send(frame(codec.encode(Cancel(1))))  # again: a no-op, no second answer
        conn.send(frame(codec.encode(Release(1))))  # never dispatched: no unit to return
        wait_until(lambda: setup.client.stats()["len"] == 1, what="probe withdrawn")
    finally:
        conn.close()
    assert setup.log_count(SHARD_LOG) == 0
    setup.check_unharmed()


def test_bad_input_on_the_control_socket(setup):
    garbage = random.Random(20240601).randbytes(512)
    setup.bad_control(garbage, "bad_frame")
    setup.bad_control(frame(random.Random(7).randbytes(64)), "bad_message")
    setup.bad_control(b"\xff\xff\xff\xff", "bad_frame")
    setup.bad_control(frame(msgspec.msgpack.encode(["zz"])), "bad_message")
    setup.bad_control(raw_submit(1, "f", 0, 0, 0.0), "bad_message")  # a shard message
    # internal messages are refused on the control socket, whatever they carry
    setup.bad_control(frame(codec.encode(ShardHello("not-the-token", 0, 1))), "unexpected_message")
    setup.bad_control(frame(codec.encode(Provision(1, "sneaky", 5))), "unexpected_message")
    setup.bad_control(frame(codec.encode(Vote(1, 0, True))), "unexpected_message")
    s = setup.client.stats()
    assert 5 not in s["bands"] and s["flows"] == 2
    # a good control connection still works, including several requests on one connection
    conn = setup.control()
    try:
        conn.send(frame(codec.encode(GetStats())) * 3)
        for _ in range(3):
            assert type(conn.recv_frame()) is JsonReply
    finally:
        conn.close()
    setup.check_unharmed()


def test_invalid_control_requests_are_refused_not_applied(setup):
    """Requests the library would refuse are refused by the daemon too, and not applied."""
    conn = setup.control()
    try:
        conn.send(frame(codec.encode(ScaleShards(0))))
        reply = conn.recv_frame()
        assert type(reply) is Ack and not reply.ok and reply.reason, reply
        conn.send(frame(codec.encode(Reconcile((2**40,)))))
        reply = conn.recv_frame()
        assert type(reply) is Ack and not reply.ok and "priority" in reply.reason, reply
    finally:
        conn.close()
    s = setup.client.stats()
    assert 2**40 not in s["bands"], "a band outside the int32 priority range was created"
    assert len(s["shards"]) == 1
    # more desired bands than BANDGATE_MAX_BANDS (256) can hold: a clear refusal through the
    # library (ValueError from the Ack), not a dropped connection, and nothing half-applied
    with pytest.raises(ValueError, match="BANDGATE_MAX_BANDS"):
        setup.client.reconcile_priorities(range(1000, 1300))
    assert len(setup.client.stats()["bands"]) == len(s["bands"])
    setup.check_unharmed()


def test_truncated_frame_then_close_is_logged(setup):
    for path in (setup.shard_path, setup.control_path):
        conn = Raw(path, codec.shard_to_client)
        conn.send(raw_submit(1, "cut", 0, 0, 0.0)[:-3])
        conn.close()
        conn = Raw(path, codec.shard_to_client)
        conn.send(b"\x00\x00")  # half a length prefix
        conn.close()
    # every bad connection leaves one line in the log, even one that closed mid-frame
    setup.expect_logged(shard=2, control=2, timeout=5)
    setup.check_unharmed()
