"""Length-prefixed framing over asyncio stream transports.

Runs in every process that speaks the wire protocol: clients, shard workers, the coordinator and
the GC process. A frame is a 4-byte big-endian length followed by that many bytes of msgpack.

Invariants:
- A frame whose announced length exceeds ``max_frame`` is never buffered: the connection is
  failed with :class:`~ipc.errors.FrameTooLarge` as soon as the prefix is read, so a hostile
  length prefix costs four bytes of memory, not four gigabytes.
- :meth:`FramedProtocol.send` only appends to a per-connection buffer; the buffer is written
  once per event-loop turn (:meth:`flush`, scheduled with ``call_soon``), so a burst of replies
  produced by one ``data_received`` or one dispatch cycle costs one ``write`` system call.
- Write buffers are bounded: a peer that does not read its replies past ``max_pending`` bytes is
  disconnected rather than allowed to grow our memory.
"""

from __future__ import annotations

import abc
import asyncio
import struct

from ipc.errors import FrameTooLarge

__all__ = ["HEADER", "FramedProtocol", "frame"]

HEADER = struct.Struct(">I")
_HEADER_SIZE = HEADER.size
# A peer that leaves this many bytes of replies unread is cut off: one reply is ~40 bytes, so this
# is well over a hundred thousand outstanding outcomes.
DEFAULT_MAX_PENDING = 8 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    """Return ``payload`` with its length prefix."""
    return HEADER.pack(len(payload)) + payload


class FramedProtocol(asyncio.Protocol, abc.ABC):
    """An asyncio protocol that delivers whole frames to :meth:`frames_received`.

    Subclasses override :meth:`frames_received` (one call per ``data_received`` with every
    complete frame in it, so handlers can batch) and :meth:`on_close`.
    """

    def __init__(self, max_frame: int, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.max_frame = max_frame
        self.max_pending = max_pending
        self.transport: asyncio.Transport | None = None
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self.closed = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._inbuf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= _HEADER_SIZE:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self.max_frame:
                del buf[:]
                self.protocol_failed(
                    FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
                )
                return
            if end - pos - _HEADER_SIZE < size:
                break
            start = pos + _HEADER_SIZE
            frames.append(bytes(buf[start : start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        if frames:
            self.frames_received(frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        if self._inbuf:
            self.truncated(len(self._inbuf))
            self._inbuf.clear()
        self.on_close(exc)

    # -- for subclasses ------------------------------------------------------------------------
    @abc.abstractmethod
    def frames_received(self, frames: list[bytes]) -> None:
        """Handle every complete frame of one read, in order."""

    def on_close(self, exc: Exception | None) -> None:
        """The connection is gone (peer closed, error, or :meth:`close`)."""

    def protocol_failed(self, exc: Exception) -> None:
        """The peer broke framing; the default closes the connection."""
        self.close()

    def truncated(self, size: int) -> None:
        """The peer closed in the middle of a frame (``size`` bytes of it were received)."""

    # -- sending -------------------------------------------------------------------------------
    def send(self, payload: bytes) -> None:
        """Queue one frame; it is written at the end of this event-loop turn."""
        if self.closed:
            return
        self._out.append(HEADER.pack(len(payload)))
        self._out.append(payload)
        self._out_size += len(payload) + _HEADER_SIZE
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued frame in one call."""
        self._flush_scheduled = False
        if not self._out or self.closed or self.transport is None:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        transport = self.transport
        transport.write(data)
        if transport.get_write_buffer_size() > self.max_pending:
            # The peer does not read its replies: cut it off instead of buffering without bound.
            transport.abort()

    def close(self) -> None:
        """Flush what is queued and close the connection."""
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()
