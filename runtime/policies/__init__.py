"""Dispatch policies and queues, looked up by name: the plug-in layer of a shard's dispatch loop.

Role: the port of GIE's ``framework`` plug-ins. A priority band is served by one fairness
policy (which flow next) over flows that each have an ordering policy (which item next) and a
queue that keeps the flow's items in that order::

    band ── FairnessPolicy.pick() ──► flow ── flow.queue.peek_head() ──► item
                                       └─ queue built by new_queue(flow.ordering)

Process: everything here runs inside a shard worker and belongs to that shard's loop alone (no
locks, no shared state). Policies cross process boundaries only as *names* in the
configuration; each shard builds its own instances with ``ordering``, ``fairness`` and
``new_queue``. Fairness policies keep per-band state, so every band of every shard gets a new
instance.

Registries: ``QUEUES``, ``ORDERING`` and ``FAIRNESS`` are plain dicts written out below (no
registration by import side effect). Adding an entry is all it takes for the conformance suite
(``tests/unit/test_policies.py``) and ``bench/bench_policies.py`` to cover a new plug-in.

Invariants:

* Every ``ORDERING[name].name == name`` and its ``queue_kind`` is a key of ``QUEUES``.
* Every ``FAIRNESS[name]()`` is a new, empty policy whose ``name`` is ``name``.
* An unknown name fails with ``UnknownPolicy``, which lists the valid names.

Note: the lookup functions ``ordering`` and ``fairness`` share their names with the submodules
``ordering.py`` and ``fairness.py`` and, being defined last, win as attributes of this package.
Import names from the package (``from runtime.policies import RoundRobin``) or with
``from runtime.policies.fairness import ...``; ``import runtime.policies.fairness as m`` yields
the function, not the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from runtime.policies.fairness import (
    FairnessPolicy,
    FlowView,
    GlobalStrict,
    IncompatibleOrdering,
    RoundRobin,
)
from runtime.policies.ordering import EDF, FCFS, OrderingPolicy
from runtime.policies.queues import (
    HeapQueue,
    ItemNotFound,
    KeyFn,
    ListQueue,
    QueueItem,
    QueueView,
    SafeQueue,
    SortKey,
)

__all__ = [
    "EDF",
    "FAIRNESS",
    "FCFS",
    "ORDERING",
    "QUEUES",
    "FairnessFactory",
    "FairnessPolicy",
    "FlowView",
    "GlobalStrict",
    "HeapQueue",
    "IncompatibleOrdering",
    "ItemNotFound",
    "KeyFn",
    "ListQueue",
    "OrderingPolicy",
    "QueueFactory",
    "QueueItem",
    "QueueView",
    "RoundRobin",
    "SafeQueue",
    "SortKey",
    "UnknownPolicy",
    "fairness",
    "new_queue",
    "ordering",
]

T = TypeVar("T", bound=QueueItem)
F = TypeVar("F", bound=FlowView)


class QueueFactory(Protocol):
    """A queue class: called with a sort key, returns an empty queue for any item type."""

    def __call__(self, key: Callable[[T], SortKey], /) -> SafeQueue[T]:
        """Create an empty queue ordered by ``key``."""
        ...


class FairnessFactory(Protocol):
    """A fairness policy class: called with no arguments, returns a new policy for one band."""

    def __call__(self) -> FairnessPolicy[F]:
        """Create a new policy with no flows."""
        ...


QUEUES: dict[str, QueueFactory] = {
    "list": ListQueue,
    "heap": HeapQueue,
}
"""Queue classes by kind, the value of ``OrderingPolicy.queue_kind``."""

ORDERING: dict[str, OrderingPolicy] = {
    "fcfs": FCFS(),
    "edf": EDF(),
}
"""Ordering policies by configuration name; instances are stateless and shared."""

FAIRNESS: dict[str, FairnessFactory] = {
    "global-strict": GlobalStrict,
    "round-robin": RoundRobin,
}
"""Fairness policy classes by configuration name; call one per band per shard."""


class UnknownPolicy(ValueError):
    """A policy or queue name that is not in its registry."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        """Build the message naming the bad name and the valid ones.

        Args:
            kind: what was looked up ("ordering policy", "fairness policy", "queue kind").
            name: the name that was not found.
            valid: the registry's names.
        """
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
        self.kind = kind
        self.name = name


def ordering(name: str) -> OrderingPolicy:
    """Return the shared ordering policy registered as ``name``.

    Raises:
        UnknownPolicy: ``name`` is not a key of ``ORDERING``.
    """
    try:
        return ORDERING[name]
    except KeyError:
        raise UnknownPolicy("ordering policy", name, ORDERING) from None


def fairness(name: str) -> FairnessPolicy[F]:
    """Return a new fairness policy registered as ``name``, for one band of one shard.

    Raises:
        UnknownPolicy: ``name`` is not a key of ``FAIRNESS``.
    """
    try:
        factory = FAIRNESS[name]
    except KeyError:
        raise UnknownPolicy("fairness policy", name, FAIRNESS) from None
    return factory()


def new_queue(ordering: OrderingPolicy) -> SafeQueue[T]:
    """Return an empty queue of the kind ``ordering`` needs, ordered by its key.

    Raises:
        UnknownPolicy: ``ordering.queue_kind`` is not a key of ``QUEUES``.
    """
    try:
        factory = QUEUES[ordering.queue_kind]
    except KeyError:
        raise UnknownPolicy("queue kind", ordering.queue_kind, QUEUES) from None
    return factory(ordering.key)
