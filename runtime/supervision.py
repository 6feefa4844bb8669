"""What the coordinator hands to a child process, and how children are started.

Runs in the coordinator (spawning) and in every child (``main(spec)``). Children are started with
an explicit ``spawn`` context (never fork: the coordinator runs an event loop and threads), get
plain data only (a :class:`ChildSpec`), ignore SIGINT (the coordinator owns Ctrl-C) and ask the
kernel to SIGTERM them when the coordinator dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the
coordinator leaves no orphan. Their link to the coordinator closing is the second, portable signal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import signal
from typing import Any

import msgspec
import multiprocess  # type: ignore[import-untyped]

__all__ = ["ChildSpec", "ExitCode", "child_setup", "context"]

_PR_SET_PDEATHSIG = 1


class ExitCode(enum.IntEnum):
    """Exit codes of bandgate processes."""

    OK = 0
    ERROR = 1
    CONFIG_ERROR = 2
    BOOT_ERROR = 3
    SHM_ERROR = 4
    ALREADY_RUNNING = 5


class ChildSpec(msgspec.Struct, frozen=True):
    """Everything a shard worker or the GC process needs, as plain data."""

    role: str  # "shard" | "gc"
    shard_id: int
    run_id: str
    token: str
    config: bytes  # msgpack of runtime.config.Config
    internal_path: str
    shm_name: str
    budget_name: str
    coordinator_pid: int


def context() -> Any:
    """The one multiprocessing context bandgate uses."""
    return multiprocess.get_context("spawn")


def child_setup(spec: ChildSpec) -> None:
    """First thing a child does: die with the coordinator, leave Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The coordinator may have died between fork and prctl: then we were re-parented already.
    if os.getppid() != spec.coordinator_pid:
        os._exit(ExitCode.ERROR)
