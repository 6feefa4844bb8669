"""Micro-benchmark of the per-flow queues and fairness policies in ``runtime.policies``.

What is measured, with 1, 100 and 10,000 flows (each flow has its own queue, prefilled with
``PREFILL`` items so that no queue runs dry):

* ``queue <kind>/<ordering>`` rows: one ``add`` of a new item to a random flow's queue, then
  one ``pop_head`` from that same queue. Every registered queue kind is run with FCFS, and
  every ordering with the queue kind it asks for (the cases of the conformance suite).
  The ``deque`` row is the baseline measured in the same run: ``collections.deque`` append
  plus popleft, the least work a FIFO can do in Python.
* ``band <fairness>/<ordering>`` rows: the per-request work of a shard's loop in one band.
  One arrival (``queue.add`` + ``policy.update``) to a random flow, then one dispatch
  (``pick``, ``pop_head``, ``update``, ``dispatched``).

One op is one add plus one pop (or one arrival plus one dispatch). Each row prints the best
ops/s over ``--repeats`` runs of ``--ops`` ops, the cost per op, and the ratio to the same row
at 1 flow (queue rows: to the deque baseline at the same flow count). The 10,000-flow rows show
whether the cost stays flat as a band grows: fairness ``pick`` and ``update`` are meant to be
O(log F), never a scan over the flows. Items are created before timing starts.

Run from the repository root: ``.venv/bin/python -m bench.bench_policies [--ops N]``. It only
prints; it writes no files.
"""

from __future__ import annotations

import argparse
import collections
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from runtime.policies import (
    FAIRNESS,
    ORDERING,
    QUEUES,
    FairnessPolicy,
    OrderingPolicy,
    SafeQueue,
    new_queue,
)

FLOW_COUNTS: Final = (1, 100, 10_000)
PREFILL: Final = 4
"""Items queued in every flow before timing, so pops never hit an empty queue."""
NO_TTL_SHARE: Final = 0.2
"""Fraction of items without a deadline, so EDF keys mix finite and infinite deadlines."""
SEED: Final = 20240601


@dataclass(frozen=True, slots=True, eq=False)
class Item:
    """A queued request with the fields the policies read."""

    seq: int
    enqueue_time: float
    byte_size: int
    deadline: float


class Flow:
    """A flow of one band, shaped as the fairness policies expect."""

    __slots__ = ("flow_id", "ordering", "queue")

    def __init__(self, flow_id: str, order: OrderingPolicy) -> None:
        self.flow_id = flow_id
        self.ordering = order
        self.queue: SafeQueue[Item] = new_queue(order)


@dataclass(frozen=True)
class Workload:
    """Pre-generated items and target flows for one flow count."""

    prefill: list[Item]
    arrivals: list[Item]
    targets: list[int]


def make_workload(flows: int, ops: int, rng: random.Random) -> Workload:
    """Items in arrival order: increasing seq and enqueue time, random TTLs and sizes."""
    items = []
    for seq in range(flows * PREFILL + ops):
        enqueue_time = seq * 1e-6
        ttl = math.inf if rng.random() < NO_TTL_SHARE else rng.uniform(0.1, 30.0)
        items.append(Item(seq, enqueue_time, rng.randrange(100, 10_000), enqueue_time + ttl))
    cut = flows * PREFILL
    return Workload(items[:cut], items[cut:], [rng.randrange(flows) for _ in range(ops)])


def run_deque(flows: int, work: Workload) -> int:
    """Baseline: deque append + popleft per op; returns elapsed ns."""
    queues = [collections.deque[Item]() for _ in range(flows)]
    for n, item in enumerate(work.prefill):
        queues[n % flows].append(item)
    start = time.perf_counter_ns()
    for item, target in zip(work.arrivals, work.targets, strict=True):
        queue = queues[target]
        queue.append(item)
        queue.popleft()
    return time.perf_counter_ns() - start


def queue_runner(kind: str, order: OrderingPolicy) -> Callable[[int, Workload], int]:
    """A runner for one queue kind with one ordering: add then pop_head per op."""
    factory = QUEUES[kind]

    def run(flows: int, work: Workload) -> int:
        queues: list[SafeQueue[Item]] = [factory(order.key) for _ in range(flows)]
        for n, item in enumerate(work.prefill):
            queues[n % flows].add(item)
        start = time.perf_counter_ns()
        for item, target in zip(work.arrivals, work.targets, strict=True):
            queue = queues[target]
            queue.add(item)
            queue.pop_head()
        return time.perf_counter_ns() - start

    return run


def band_runner(fairness_name: str, order: OrderingPolicy) -> Callable[[int, Workload], int]:
    """A runner for one fairness policy over flows with one ordering: arrival then dispatch."""

    def run(flows: int, work: Workload) -> int:
        policy: FairnessPolicy[Flow] = FAIRNESS[fairness_name]()
        band = [Flow(f"flow-{i:05d}", order) for i in range(flows)]
        for n, item in enumerate(work.prefill):
            band[n % flows].queue.add(item)
        for flow in band:
            policy.update(flow)
        start = time.perf_counter_ns()
        for item, target in zip(work.arrivals, work.targets, strict=True):
            flow = band[target]
            flow.queue.add(item)
            policy.update(flow)
            chosen = policy.pick()
            if chosen is None:
                raise RuntimeError("a band with queued items picked no flow")
            chosen.queue.pop_head()
            policy.update(chosen)
            policy.dispatched(chosen)
        return time.perf_counter_ns() - start

    return run


def best_ns(run: Callable[[int, Workload], int], flows: int, work: Workload, repeats: int) -> float:
    """Best elapsed ns per op over ``repeats`` runs, after one untimed warm-up run."""
    run(flows, work)
    return min(run(flows, work) for _ in range(repeats)) / len(work.arrivals)


def cases() -> list[tuple[str, Callable[[int, Workload], int]]]:
    """Every benchmarked row, built from the registries."""
    pairs = {(kind, "fcfs") for kind in QUEUES}
    pairs |= {(policy.queue_kind, name) for name, policy in ORDERING.items()}
    rows: list[tuple[str, Callable[[int, Workload], int]]] = [("queue deque (baseline)", run_deque)]
    rows += [(f"queue {k}/{o}", queue_runner(k, ORDERING[o])) for k, o in sorted(pairs)]
    rows += [(f"band {f}/{o}", band_runner(f, ORDERING[o])) for f in FAIRNESS for o in ORDERING]
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run every row at every flow count and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ops", type=int, default=50_000, help="ops per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; best is kept")
    args = parser.parse_args(argv)

    rng = random.Random(SEED)
    workloads = {flows: make_workload(flows, args.ops, rng) for flows in FLOW_COUNTS}
    print(
        f"bench_policies: python {platform.python_version()}, {platform.machine()}, "
        f"ops={args.ops}, repeats={args.repeats}, prefill={PREFILL}/flow"
    )
    print(f"{'row':<30} {'flows':>6} {'ops/s':>12} {'ns/op':>9} {'ratio':>14}")
    baseline: dict[int, float] = {}
    for name, run in cases():
        first: float | None = None
        for flows in FLOW_COUNTS:
            ns = best_ns(run, flows, workloads[flows], args.repeats)
            if name.startswith("queue deque"):
                baseline[flows] = ns
                ratio = ""
            elif name.startswith("queue"):
                ratio = f"{ns / baseline[flows]:.2f}x deque"
            else:
                first = ns if first is None else first
                ratio = f"{ns / first:.2f}x 1 flow"
            print(f"{name:<30} {flows:>6} {1e9 / ns:>12,.0f} {ns:>9.0f} {ratio:>14}")


if __name__ == "__main__":
    main()
