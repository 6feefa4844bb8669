"""bandgate's IPC layer: everything that crosses a process boundary, and no policy logic.

Processes: imported by every bandgate process and by client programs. It never imports
:mod:`runtime` (a unit test checks this with ``ast``).

- :mod:`ipc.messages` — the wire protocol (msgspec Structs, one tagged union per channel).
- :mod:`ipc.codec` — reused encoder and typed decoders.
- :mod:`ipc.framing` — 4-byte length framing over asyncio transports, bounded buffers.
- :mod:`ipc.shm_layout` / :mod:`ipc.shm` — the shared-memory segment and who writes which word.
- :mod:`ipc.budget` — the global concurrency budget (a counting semaphore).
- :mod:`ipc.names` — kernel object names, so leaks can be found and cleaned.
"""
