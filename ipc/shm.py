"""The shared-memory segment: POSIX shm (posix_ipc) mapped with mmap.

Runs in every process: the coordinator creates and unlinks (once, and only it); shard workers
and the GC process attach read-write / read-only; clients attach read-only. We do not use
``multiprocessing.shared_memory``: on 3.11/3.12 it registers attached segments with the resource
tracker, which can unlink a live segment when an attaching process exits (cpython gh-82300).
"""

from __future__ import annotations

import mmap
import os
from typing import final

import posix_ipc  # type: ignore[import-not-found]

from ipc import shm_layout as L
from ipc.errors import SegmentError

__all__ = ["Segment"]


@final
class Segment:
    """A mapped segment with its :class:`~ipc.shm_layout.Layout` and an int64 word view."""

    def __init__(self, name: str, mm: mmap.mmap, layout: L.Layout, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self.layout = layout
        self.owner = owner
        self.words = memoryview(mm).cast("q")

    @classmethod
    def create(
        cls, name: str, layout: L.Layout, *, mode: int = 0o600, gid: int = -1, coord_pid: int = 0
    ) -> Segment:
        """Create (exclusively) and initialise the segment; the caller must :meth:`unlink` it."""
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=layout.size_bytes)
        except posix_ipc.ExistentialError as exc:
            raise SegmentError(f"shared memory {name} already exists") from exc
        try:
            # The mode given at creation is filtered by the umask: set it (and the group) exactly.
            os.fchmod(shm.fd, mode)
            if gid >= 0:
                os.fchown(shm.fd, -1, gid)
            mm = mmap.mmap(shm.fd, layout.size_bytes)
        finally:
            shm.close_fd()
        seg = cls(name, mm, layout, owner=True)
        w = seg.words
        w[L.H_VERSION] = L.VERSION
        w[L.H_MAX_SHARDS] = layout.max_shards
        w[L.H_MAX_BANDS] = layout.max_bands
        w[L.H_MAX_FLOWS] = layout.max_flows
        w[L.H_COORD_PID] = coord_pid
        for s in range(layout.max_shards):
            w[layout.stats_row(s) + L.S_TOP_WAITING] = L.NO_PRIORITY
        w[L.H_MAGIC] = L.MAGIC  # last: a reader that sees the magic sees an initialised header
        return seg

    @classmethod
    def attach(cls, name: str, *, readonly: bool = False) -> Segment:
        """Map an existing segment and check its header."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise SegmentError(f"shared memory {name} does not exist") from exc
        except posix_ipc.PermissionsError as exc:
            raise SegmentError(f"no permission to open shared memory {name}") from exc
        try:
            size = shm.size
            if size < L.HEADER_WORDS * 8:
                raise SegmentError(f"shared memory {name} is too small ({size} bytes)")
            access = mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE
            mm = mmap.mmap(shm.fd, size, access=access)
        finally:
            shm.close_fd()
        w = memoryview(mm).cast("q")
        if w[L.H_MAGIC] != L.MAGIC or w[L.H_VERSION] != L.VERSION:
            w.release()
            mm.close()
            raise SegmentError(f"shared memory {name} is not a bandgate segment of this version")
        layout = L.Layout(int(w[L.H_MAX_SHARDS]), int(w[L.H_MAX_BANDS]), int(w[L.H_MAX_FLOWS]))
        w.release()
        if layout.size_bytes > size:
            mm.close()
            raise SegmentError(f"shared memory {name} is smaller than its header says")
        return cls(name, mm, layout, owner=False)

    def zero(self, start: int, count: int) -> None:
        """Set ``count`` words from word ``start`` to 0 (one memset, not a Python loop)."""
        self._mm[start * 8 : (start + count) * 8] = bytes(count * 8)

    def close(self) -> None:
        """Unmap (idempotent). Views handed out earlier must not be used afterwards."""
        if self._mm.closed:
            return
        self.words.release()
        self._mm.close()

    def unlink(self) -> None:
        """Remove the name (owner only, once, at shutdown); existing mappings stay valid."""
        unlink_segment(self.name)


def unlink_segment(name: str) -> bool:
    """Remove a segment by name; False if it did not exist."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
