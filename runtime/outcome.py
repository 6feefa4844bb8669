"""Outcomes and the errors a caller of the client library can see.

Runs in client processes (and the daemon, for reasons). ``Outcome`` values are GIE's
``QueueOutcome`` names in snake case; :data:`OUTCOME_BY_CODE` maps the wire codes of
:class:`ipc.messages.OutcomeCode`.
"""

from __future__ import annotations

import enum

from ipc.messages import OutcomeCode

__all__ = ["OUTCOME_BY_CODE", "BandgateError", "DaemonUnavailable", "Outcome"]


class Outcome(enum.StrEnum):
    """The one outcome of an admission."""

    DISPATCHED = "dispatched"
    REJECTED_CAPACITY = "rejected_capacity"
    REJECTED_OTHER = "rejected_other"
    EVICTED_TTL = "evicted_ttl"
    EVICTED_CANCELLED = "evicted_cancelled"
    EVICTED_OTHER = "evicted_other"


OUTCOME_BY_CODE: dict[int, Outcome] = {
    OutcomeCode.DISPATCHED: Outcome.DISPATCHED,
    OutcomeCode.REJECTED_CAPACITY: Outcome.REJECTED_CAPACITY,
    OutcomeCode.REJECTED_OTHER: Outcome.REJECTED_OTHER,
    OutcomeCode.EVICTED_TTL: Outcome.EVICTED_TTL,
    OutcomeCode.EVICTED_CANCELLED: Outcome.EVICTED_CANCELLED,
    OutcomeCode.EVICTED_OTHER: Outcome.EVICTED_OTHER,
}


class BandgateError(Exception):
    """Root of bandgate's client-side errors."""


class DaemonUnavailable(BandgateError):
    """No daemon answers at the socket directory (not started, stopped, or not ours)."""
