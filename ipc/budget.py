"""The global concurrency budget: a counting POSIX semaphore (a counter, never a mutex).

Runs in shard workers (take a unit to dispatch, give it back on release) and the coordinator
(creates it with ``BANDGATE_MAX_INFLIGHT`` units, gives back a dead shard's units, unlinks it).

Invariant: the semaphore's value + the sum of every shard's ``S_HELD`` word == the limit, except
for the few bytecodes between a successful ``sem_trywait`` and the shard's store to its own
``S_HELD`` word (and between that store and ``sem_post`` on release). A shard killed inside that
window leaks (or over-returns) one unit; the coordinator logs the discrepancy it can see when it
reconciles a dead shard's units. There is no lock whose holder can die holding it: a dead shard's
units are returned by the coordinator from the shard's ``S_HELD`` word.
"""

from __future__ import annotations

import os
from typing import final

import posix_ipc  # type: ignore[import-not-found]

__all__ = ["Budget"]

SEM_DIR = "/dev/shm/"


@final
class Budget:
    """``limit`` units shared by every shard; ``limit == 0`` means no limit (no semaphore)."""

    def __init__(self, name: str, limit: int, sem: object | None, owner: bool) -> None:
        self.name = name
        self.limit = limit
        self._sem = sem
        self.owner = owner
        self.unlimited = sem is None

    @classmethod
    def create(cls, name: str, limit: int, *, mode: int = 0o600, gid: int = -1) -> Budget:
        if limit == 0:
            return cls(name, 0, None, owner=True)
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=limit)
        # Linux keeps a named semaphore as /dev/shm/sem.<name>; its creation mode was filtered by
        # the umask, so set it (and the group) exactly.
        path = SEM_DIR + "sem." + name.lstrip("/")
        if os.path.exists(path):
            os.chmod(path, mode)
            if gid >= 0:
                os.chown(path, -1, gid)
        return cls(name, limit, sem, owner=True)

    @classmethod
    def attach(cls, name: str, limit: int) -> Budget:
        if limit == 0:
            return cls(name, 0, None, owner=False)
        return cls(name, limit, posix_ipc.Semaphore(name), owner=False)

    def try_acquire(self) -> bool:
        """Take one unit without blocking; False if none is free."""
        sem = self._sem
        if sem is None:
            return True
        try:
            sem.acquire(0)  # type: ignore[attr-defined]
        except posix_ipc.BusyError:
            return False
        return True

    def release(self, n: int = 1) -> None:
        sem = self._sem
        if sem is None:
            return
        for _ in range(n):
            sem.release()  # type: ignore[attr-defined]

    @property
    def free(self) -> int:
        """Units free right now (a snapshot)."""
        sem = self._sem
        if sem is None:
            return 0
        return int(sem.value)  # type: ignore[attr-defined]

    def close(self) -> None:
        sem = self._sem
        if sem is not None:
            sem.close()  # type: ignore[attr-defined]

    def unlink(self) -> None:
        unlink_budget(self.name)


def unlink_budget(name: str) -> bool:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        return False
    return True
