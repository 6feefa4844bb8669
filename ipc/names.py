"""Names of the daemon's kernel objects.

Every POSIX shared-memory segment and semaphore of one daemon instance is named
``/bandgate.<run_id>.<kind>``, so a leak is found by listing ``/dev/shm/bandgate.*`` and a later
daemon on the same socket directory can remove what a killed one left (the run id is recorded in
the directory's lock file).
"""

from __future__ import annotations

import secrets

__all__ = ["PREFIX", "budget_name", "new_run_id", "shm_name"]

PREFIX = "bandgate."


def new_run_id() -> str:
    """A fresh random run id (hex)."""
    return secrets.token_hex(6)


def shm_name(run_id: str) -> str:
    return f"/{PREFIX}{run_id}.shm"


def budget_name(run_id: str) -> str:
    return f"/{PREFIX}{run_id}.budget"
