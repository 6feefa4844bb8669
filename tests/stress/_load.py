"""Load generator run as a separate client process by the stress tests.

Usage: python -m tests.stress._load SOCKET_DIR SEED REQUESTS CONCURRENCY PRIORITIES FLOWS

Priorities are drawn from a window of three that slides over PRIORITIES every 50 ms, and one
request in 25 from all of them (likely hitting a flow or band the GC is removing).
Prints one JSON line: outcomes by name, and the number of admissions that returned.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter

from runtime import AsyncClient


async def main() -> None:
    socket_dir, seed, requests, concurrency, priorities, flows = sys.argv[1:7]
    rng = random.Random(int(seed))
    prios = [int(p) for p in priorities.split(",")]
    n_flows = int(flows)
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    todo = iter(range(int(requests)))

    async with AsyncClient(socket_dir) as client:

        async def worker() -> None:
            for _ in todo:
                # A window over the priorities that moves every 50 ms: bands outside it go idle
                # and are collected, then re-created when the window comes back.
                window = int(time.monotonic() * 20)
                prio = prios[(window + rng.randrange(3)) % len(prios)]
                if rng.random() < 0.04:
                    prio = rng.choice(prios)  # now and then one that is probably being retired
                flow = f"tenant-{rng.randrange(n_flows)}"
                adm = await client.admit(flow, prio, byte_size=rng.randrange(0, 2000))
                outcomes[adm.outcome.value] += 1
                if not adm.dispatched:
                    reasons[adm.reason] += 1
                if rng.random() < 0.3:
                    await asyncio.sleep(rng.random() * 0.005)
                await adm.release()
                # idle gaps let flows and bands go idle and be collected while others use them
                if rng.random() < 0.05:
                    await asyncio.sleep(rng.random() * 0.08)

        await asyncio.gather(*(worker() for _ in range(int(concurrency))))
    print(json.dumps({"outcomes": outcomes, "reasons": reasons, "total": sum(outcomes.values())}))


if __name__ == "__main__":
    asyncio.run(main())
