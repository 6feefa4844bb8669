"""The raw echo baseline: bandgate's transport, framing and event loop, minus flow control.

What it measures: the floor under any admission through the daemon. The server is one process
running the default asyncio loop, listening on an AF_UNIX stream socket, with the daemon's own
framing (:class:`ipc.framing.FramedProtocol`) and codec (:mod:`ipc.codec`): it decodes each
``Submit`` with the shard's typed decoder and answers ``Decided(id, DISPATCHED, "", 0.0)`` at
once; ``Release`` and ``Cancel`` are decoded and dropped, as a shard's bookkeeping would be. So an
echo round trip costs what a bandgate admission costs in system calls, frames and msgpack, and
nothing for queues, policies, shared memory or the budget.

The client side (:class:`EchoClient`) drives the socket the way ``runtime.AsyncClient`` drives a
shard connection: one connection, request ids, a future per request resolved from the reply
frames, ``Release`` sent without waiting for an answer.

Run the server alone with ``python -m bench._echo <socket path>``; it prints ``ready`` and
serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import final

from ipc.codec import client_to_shard, encode, shard_to_client
from ipc.framing import FramedProtocol
from ipc.messages import Decided, OutcomeCode, Release, Submit

__all__ = ["EchoAdmission", "EchoClient", "serve"]

MAX_FRAME = 65536
"""The daemon's default frame limit (``runtime.config.DEFAULT_MAX_FRAME``)."""

_DISPATCHED = int(OutcomeCode.DISPATCHED)


class _EchoServerProtocol(FramedProtocol):
    def frames_received(self, frames: list[bytes]) -> None:
        send = self.send
        for raw in frames:
            msg = client_to_shard(raw)
            if type(msg) is Submit:
                send(encode(Decided(msg.id, _DISPATCHED, "", 0.0, 0)))
            # Release / Cancel: nothing to answer, as on a shard.


async def serve(path: str) -> None:
    """Serve echo connections on ``path`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_unix_server(lambda: _EchoServerProtocol(MAX_FRAME), path)
    print("ready", path, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- client --------------------------------------------------------------------------------------
class _EchoClientProtocol(FramedProtocol):
    def __init__(self, max_frame: int, pending: dict[int, asyncio.Future[Decided]]) -> None:
        super().__init__(max_frame)
        self.pending = pending

    def frames_received(self, frames: list[bytes]) -> None:
        pending = self.pending
        for raw in frames:
            msg = shard_to_client(raw)
            if type(msg) is Decided:
                fut = pending.pop(msg.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def on_close(self, exc: Exception | None) -> None:
        err = ConnectionError("echo server closed the connection")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()


@final
class EchoAdmission:
    """What ``admit`` returns: the same shape as ``runtime.Admission``."""

    __slots__ = ("_client", "_released", "id", "outcome", "queued_seconds")

    def __init__(self, client: EchoClient, req_id: int, decided: Decided) -> None:
        self._client = client
        self.id = req_id
        self.outcome = "dispatched" if decided.outcome == _DISPATCHED else str(decided.outcome)
        self.queued_seconds = decided.queued
        self._released = False

    @property
    def dispatched(self) -> bool:
        return self.outcome == "dispatched"

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._client._proto.send(encode(Release(self.id)))


@final
class EchoClient:
    """One connection to an echo server, used like ``runtime.AsyncClient``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pending: dict[int, asyncio.Future[Decided]] = {}
        self._next_id = 0
        self._proto: _EchoClientProtocol

    async def connect(self) -> EchoClient:
        loop = asyncio.get_running_loop()
        _, self._proto = await loop.create_unix_connection(
            lambda: _EchoClientProtocol(MAX_FRAME, self._pending), self.path
        )
        return self

    async def admit(
        self, flow_id: str, priority: int = 0, *, byte_size: int = 0, ttl: float | None = None
    ) -> EchoAdmission:
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Decided] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._proto.send(encode(Submit(rid, flow_id, priority, byte_size, ttl or 0.0)))
        return EchoAdmission(self, rid, await fut)

    async def close(self) -> None:
        self._proto.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench._echo <socket path>")
    asyncio.run(serve(sys.argv[1]))
