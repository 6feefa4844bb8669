"""Load generator process: closed-loop asyncio requesters against one gate, measured in a window.

Runs as ``python -m bench._loadgen``, started by the orchestrator (:class:`bench._procs.Worker`).
It prints ``ready``, then reads one JSON command per line on stdin and answers one JSON line on
stdout. Commands:

- ``connect`` {name, kind: bandgate|echo|inproc|redis, ...}: open a gate and keep it open;
- ``phase`` {target, groups, hold, ...}: run closed-loop requesters (below), reply with counts;
- ``drain`` {target, held, queued, ...}: the backlog-drain measurement;
- ``stats`` {target}: the gate's statistics;
- ``quit``: close every gate and exit.

A *requester* loops: pick a flow, ``admit``, hold the unit ``hold`` seconds (at least one
event-loop turn), ``release``. The
groups of a phase say how many requesters pick flows how (Zipf over F flows as GIE's benchmark
does, one fixed flow, novel flows, ...). Two timing modes:

- time: requesters start at ``start_at - warmup`` and stop after ``start_at + duration``
  (``time.monotonic``, the system-wide clock, so several workers share one window); only
  admissions that *complete* inside the window are counted;
- ops: requesters run ``warmup_ops`` uncounted admissions, then ``ops`` counted ones.

Every gate is driven through the same four calls (``admit``, ``.dispatched``, ``.outcome``,
``release``), so the per-admission overhead of this loop is the same for all of them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import math
import random
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

__all__ = ["gie_byte_size", "zipf_table"]

Pick = Callable[[], tuple[str, int, int, str]]


# -- workload shapes (GIE benchmark/benchmark.go) ---------------------------------------------------
def gie_byte_size(i: int) -> int:
    """GIE's request size of flow ``i``: ``100 + (uint32(i) * 2654435769 mod 9000)`` bytes."""
    return 100 + ((i * 2654435769) & 0xFFFFFFFF) % 9000


def zipf_table(n: int, s: float = 1.1, v: float = 1.0, seed: int = 1) -> list[int]:
    """Flow indices drawn from Zipf(s, v, imax=n-1), in a power-of-two table of at least 4n."""
    weights = [(v + k) ** -s for k in range(n)]
    total = sum(weights)
    cdf: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w / total
        cdf.append(acc)
    size = 1
    while size < 4 * n:
        size *= 2
    rng = random.Random(seed)
    last = n - 1
    return [min(bisect.bisect_left(cdf, rng.random()), last) for _ in range(size)]


_ZIPF_CACHE: dict[tuple[int, float], list[int]] = {}
_FLOW_CACHE: dict[tuple[int, int, str, str], list[tuple[str, int, int, str]]] = {}


def _picker(spec: dict[str, Any], index: int, shared: dict[str, Any] | None = None) -> Pick:
    """A flow chooser for requester number ``index`` (global across workers).

    ``shared`` is one dict per group of requesters in this worker (``sweep`` keeps its cursor
    there, so the group's requesters visit every flow once between them).
    """
    kind = spec["kind"]
    if kind == "sweep":
        n, prios = int(spec["n"]), int(spec.get("priorities", 1))
        prefix = spec.get("prefix", "flow-")
        cursor = (shared if shared is not None else {}).setdefault(
            "cursor", itertools.count(int(spec.get("offset", 0)))
        )

        def pick_sweep() -> tuple[str, int, int, str]:
            i = next(cursor) % n
            return f"{prefix}{i}", i % prios, gie_byte_size(i), ""

        return pick_sweep
    if kind == "zipf":
        n, prios = int(spec["n"]), int(spec.get("priorities", 1))
        prefix = spec.get("prefix", "flow-")
        key = (n, float(spec.get("s", 1.1)))
        table = _ZIPF_CACHE.get(key)
        if table is None:
            table = _ZIPF_CACHE[key] = zipf_table(n, key[1])
        mask = len(table) - 1
        # One (flow id, priority, size) per flow, built once per worker: every requester of
        # every phase shares it (1,024 requesters x 10,000 flows would otherwise take seconds).
        fkey = (n, prios, prefix, spec.get("sizes", "gie"))
        flows = _FLOW_CACHE.get(fkey)
        if flows is None:
            gie = fkey[3] == "gie"
            flows = _FLOW_CACHE[fkey] = [
                (f"{prefix}{i}", i % prios, gie_byte_size(i) if gie else 0, "") for i in range(n)
            ]
        pos = index * 9973

        def pick() -> tuple[str, int, int, str]:
            nonlocal pos
            i = table[pos & mask]
            pos += 1
            return flows[i]

        return pick
    if kind == "fixed":
        item = (
            str(spec["flow"]),
            int(spec.get("priority", 0)),
            int(spec.get("byte_size", 0)),
            str(spec.get("label", "")),
        )
        return lambda: item
    if kind == "novel":
        prefix = f"{spec.get('prefix', 'novel')}-{index}-"
        prio = int(spec.get("priority", 0))
        band_every = int(spec.get("new_band_every", 0))
        band_base = int(spec.get("band_base", 100_000)) + index * 1_000_000
        size = int(spec.get("byte_size", 1024))
        counter = 0

        def pick_novel() -> tuple[str, int, int, str]:
            nonlocal counter
            counter += 1
            if band_every and counter % band_every == 0:
                return prefix + str(counter), band_base + counter, size, "new_band"
            return prefix + str(counter), prio, size, "new_flow"

        return pick_novel
    if kind == "lifecycle":
        # existing flow, new flow in an existing band, new flow in a new band: in turn.
        prefix = f"{spec.get('prefix', 'lc')}-{index}-"
        prio = int(spec.get("priority", 0))
        band_base = int(spec.get("band_base", 100_000)) + index * 1_000_000
        size = int(spec.get("byte_size", 1024))
        labels = spec.get("labels", ["existing", "new_flow", "new_band"])
        counter = 0

        def pick_lifecycle() -> tuple[str, int, int, str]:
            nonlocal counter
            counter += 1
            label = labels[counter % len(labels)]
            if label == "existing":
                return prefix + "existing", prio, size, label
            if label == "new_flow":
                return prefix + "f" + str(counter), prio, size, label
            return prefix + "b" + str(counter), band_base + counter, size, label

        return pick_lifecycle
    raise ValueError(f"unknown flow spec kind {kind!r}")


# -- gates -----------------------------------------------------------------------------------------
class Gates:
    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.gates: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name, kind = cmd["name"], cmd["kind"]
        if kind == "bandgate":
            from runtime import AsyncClient

            gate = await self.stack.enter_async_context(AsyncClient(cmd["socket_dir"]))
        elif kind == "echo":
            from bench._echo import EchoClient

            gate = await EchoClient(cmd["path"]).connect()
            self.stack.push_async_callback(gate.close)
        elif kind == "inproc":
            from bench._inproc import InprocGate

            gate = InprocGate(
                int(cmd["limit"]), cmd.get("fairness", "global-strict"), cmd.get("ordering", "fcfs")
            )
        elif kind == "redis":
            from bench._redisgate import RedisGate

            gate = RedisGate(cmd["path"], int(cmd["limit"]), cmd.get("key", "gate"))
            self.stack.push_async_callback(gate.close)
        else:
            raise ValueError(f"unknown gate kind {kind!r}")
        self.gates[name] = gate
        self.kinds[name] = kind
        return {"ok": True}

    async def stats(self, name: str) -> dict[str, Any]:
        gate = self.gates[name]
        st = gate.stats()
        if asyncio.iscoroutine(st):
            st = await st
        return dict(st)

    async def queued(self, name: str) -> int:
        return int((await self.stats(name)).get("len", 0))


# -- phases ----------------------------------------------------------------------------------------
async def run_phase(gates: Gates, cmd: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    mono = time.monotonic
    gate = gates.gates[cmd["target"]]
    admit = gate.admit
    hold = float(cmd.get("hold", 0.0))
    ttl = cmd.get("ttl")
    record = set(cmd.get("record", ["latency"]))
    bucket = float(cmd.get("bucket", 0.25))
    base_index = int(cmd.get("index_base", 0))
    ops_mode = "ops" in cmd

    if ops_mode:
        ws, we = -math.inf, math.inf
        ops_target = int(cmd["ops"])
        warm_ops = int(cmd.get("warmup_ops", 0))
    else:
        start_at = float(cmd["start_at"])
        ws, we = start_at, start_at + float(cmd["duration"])
        first = start_at - float(cmd.get("warmup", 0.0))
        delay = first - mono()
        if delay > 0:
            await asyncio.sleep(delay)

    lat: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    labels_total: Counter[str] = Counter()  # every completed admission, in the window or not
    flows: Counter[str] = Counter()
    bands: Counter[int] = Counter()
    series: dict[str, Counter[int]] = defaultdict(Counter)
    events: list[tuple[int, float, float, float]] = []
    want_lat = "latency" in record
    want_flows = "flows" in record
    want_series = "series" in record
    want_events = "events" in record
    state = {"ops": 0, "done": 0, "total": 0, "stop": False, "first": math.inf, "last": -math.inf}
    cpu: dict[str, float] = {}
    errors: list[str] = []

    if not ops_mode:
        loop.call_at(ws, lambda: cpu.__setitem__("start", time.process_time()))
        loop.call_at(we, lambda: cpu.__setitem__("end", time.process_time()))

    async def requester(pick: Pick) -> None:
        while not state["stop"]:
            flow_id, prio, size, label = pick()
            t0 = mono()
            adm = await admit(flow_id, prio, byte_size=size, ttl=ttl)
            t1 = mono()
            state["total"] += 1
            labels_total[label] += 1
            if adm.dispatched:
                # Hold the unit for ``hold`` seconds, or at least one event-loop turn: a caller
                # always does *something* between dispatch and release, and without the turn an
                # in-process gate would run one requester to completion and never queue.
                await asyncio.sleep(hold)
                await adm.release()
            if ops_mode:
                state["done"] += 1
                if state["done"] <= warm_ops:
                    continue
                if state["ops"] >= ops_target:
                    state["stop"] = True
                    return
                if t0 < state["first"]:
                    state["first"] = t0
                    cpu.setdefault("start", time.process_time())
                state["last"] = t1
            elif t1 < ws:
                continue
            elif t1 > we:
                state["stop"] = True
                return
            state["ops"] += 1
            outcome = str(adm.outcome)
            outcomes[outcome] += 1
            if want_lat:
                lat[label].append(t1 - t0)
            if want_flows:
                flows[flow_id] += 1
                bands[prio] += 1
            if want_series:
                series[flow_id][int((t1 - ws) / bucket)] += 1
            if want_events:
                events.append((prio, t0, t1, float(adm.queued_seconds)))
            if ops_mode and state["ops"] >= ops_target:
                state["stop"] = True
                cpu["end"] = time.process_time()
                return

    tasks: list[asyncio.Task[None]] = []
    index = base_index
    for group in cmd["groups"]:
        shared: dict[str, Any] = {}
        for _ in range(int(group["count"])):
            tasks.append(asyncio.create_task(requester(_picker(group["flows"], index, shared))))
            index += 1

    # Wait for the window to close (time mode) or the ops to be done, then for stragglers.
    if not ops_mode:
        await asyncio.sleep(max(0.0, we - mono()))
        state["stop"] = True
    stop_timeout = float(cmd.get("stop_timeout", 15.0))
    done, pending = await asyncio.wait(tasks, timeout=None if ops_mode else stop_timeout)
    if ops_mode:
        done, pending = set(tasks), set()
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    for t in done:
        if t.cancelled():
            continue
        exc = t.exception()
        if exc is not None:
            errors.append("".join(traceback.format_exception(exc))[-2000:])

    if ops_mode:
        ws, we = state["first"], state["last"]
    result: dict[str, Any] = {
        "ops": state["ops"],
        "total_ops": state["total"],
        "labels_total": dict(labels_total),
        "window": [ws, we],
        "seconds": max(we - ws, 1e-9),
        "outcomes": dict(outcomes),
        "cpu_s": cpu.get("end", time.process_time()) - cpu.get("start", time.process_time()),
        "unfinished": len(pending),
        "errors": errors[:3],
        "error_count": len(errors),
    }
    if want_lat:
        result["latency"] = dict(lat)
    if want_flows:
        result["flows"] = dict(flows)
        result["bands"] = {str(k): v for k, v in bands.items()}
    if want_series:
        result["series"] = {f: {str(k): v for k, v in c.items()} for f, c in series.items()}
    if want_events:
        result["events"] = events
    return result


async def run_drain(gates: Gates, cmd: dict[str, Any]) -> dict[str, Any]:
    """Hold ``held`` units, queue ``queued`` requests behind them, release, time the drain.

    The gate's limit MUST equal ``held`` and be at least ``queued``, so the backlog can drain
    without any of it being released: the time measured is the dispatch loop's alone.
    """
    mono = time.monotonic
    name = cmd["target"]
    gate = gates.gates[name]
    n_held, n_queued = int(cmd["held"]), int(cmd["queued"])
    pick = _picker(cmd["flows"], 0)
    timeout = float(cmd.get("timeout", 60.0))

    held = await asyncio.gather(*(gate.admit(*pick()[:2], byte_size=0) for _ in range(n_held)))
    if not all(a.dispatched for a in held):
        raise RuntimeError(f"could not hold the budget: {Counter(str(a.outcome) for a in held)}")

    done_at: list[float] = []

    async def waiter(flow_id: str, prio: int, size: int) -> Any:
        adm = await gate.admit(flow_id, prio, byte_size=size)
        done_at.append(mono())
        return adm

    picks = [pick() for _ in range(n_queued)]
    tasks = [asyncio.create_task(waiter(f, p, s)) for f, p, s, _ in picks]
    t_submit = mono()
    deadline = t_submit + timeout
    while await gates.queued(name) < n_queued:
        if mono() > deadline or any(t.done() for t in tasks):
            raise RuntimeError("backlog did not build up behind the held budget")
        await asyncio.sleep(0.005)
    t_queued = mono()

    t_release = mono()
    for a in held:
        await a.release()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    t_end = max(done_at)
    outcomes = Counter(str(a.outcome) for a in results)
    for a in results:
        await a.release()
    first = min(done_at)
    return {
        "held": n_held,
        "queued": n_queued,
        "build_s": t_queued - t_submit,
        "drain_s": t_end - t_release,
        "first_s": first - t_release,
        "rate": n_queued / max(t_end - t_release, 1e-9),
        "outcomes": dict(outcomes),
    }


# -- main loop -------------------------------------------------------------------------------------
async def main() -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    gates = Gates()

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    print("ready", flush=True)
    try:
        while True:
            line = await commands.get()
            if line is None:
                break
            if not line.strip():
                continue
            cmd = json.loads(line)
            op = cmd.get("cmd")
            if op == "quit":
                break
            try:
                if op == "connect":
                    reply(await gates.connect(cmd))
                elif op == "phase":
                    reply(await run_phase(gates, cmd))
                elif op == "drain":
                    reply(await run_drain(gates, cmd))
                elif op == "stats":
                    reply(await gates.stats(cmd["target"]))
                else:
                    reply({"error": f"unknown command {op!r}"})
            except Exception as exc:
                reply({"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"})
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(gates.stack.aclose(), 10)


if __name__ == "__main__":
    asyncio.run(main())
