"""Peer (b): the Redis gate a Python team builds when it needs priority admission across processes.

The design, as a competent team would write it with redis-py's asyncio client:

- one sorted set holds the waiting requests, scored ``-priority * 1e12 + seq`` so ``ZPOPMIN``
  yields the highest priority first and FCFS within a priority (across flows: the same order as
  bandgate's ``global-strict`` fairness with ``fcfs`` ordering);
- a counter holds the units in flight (a counting semaphore with limit ``limit``);
- ``ADMIT`` is one Lua script (atomic on the server): enqueue, then while a unit is free pop the
  best waiter, take a unit for it and wake it by ``LPUSH`` to its own grant list. If the caller's
  own request is popped, the script says so and the caller proceeds with no second round trip;
  otherwise the caller waits in ``BLPOP`` on its grant list (one pooled connection per waiter);
- ``RELEASE`` is one Lua script: give the unit back, then pop and wake waiters the same way;
- a waiter whose ``BLPOP`` times out (TTL) withdraws with ``ZREM``; if it lost the race with a
  grant it consumes the grant and releases the unit, so no unit ever leaks.

It is a real cross-process gate: any number of client processes share one Redis.
"""

from __future__ import annotations

import itertools
import os
import secrets
from typing import Any, final

__all__ = ["RedisAdmission", "RedisGate"]

# KEYS: queue zset, inflight counter, seq counter. ARGV: limit, priority, member, grant prefix.
_ADMIT = """
local seq = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], -tonumber(ARGV[2]) * 1e12 + seq, ARGV[3])
local limit = tonumber(ARGV[1])
local inflight = tonumber(redis.call('GET', KEYS[2]) or '0')
local mine = 0
while limit == 0 or inflight < limit do
  local top = redis.call('ZPOPMIN', KEYS[1])
  if #top == 0 then break end
  inflight = inflight + 1
  if top[1] == ARGV[3] then mine = 1 else redis.call('LPUSH', ARGV[4] .. top[1], '1') end
end
redis.call('SET', KEYS[2], inflight)
return mine
"""

# KEYS: queue zset, inflight counter. ARGV: limit, grant prefix.
_RELEASE = """
local limit = tonumber(ARGV[1])
local inflight = tonumber(redis.call('GET', KEYS[2]) or '0') - 1
if inflight < 0 then inflight = 0 end
while limit == 0 or inflight < limit do
  local top = redis.call('ZPOPMIN', KEYS[1])
  if #top == 0 then break end
  inflight = inflight + 1
  redis.call('LPUSH', ARGV[2] .. top[1], '1')
end
redis.call('SET', KEYS[2], inflight)
return inflight
"""


@final
class RedisAdmission:
    __slots__ = ("_gate", "_released", "outcome", "queued_seconds")

    def __init__(self, gate: RedisGate, outcome: str) -> None:
        self._gate = gate
        self.outcome = outcome
        self.queued_seconds = 0.0
        self._released = outcome != "dispatched"

    @property
    def dispatched(self) -> bool:
        return self.outcome == "dispatched"

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self._gate._release()


@final
class RedisGate:
    """A priority admission gate shared through one Redis server.

    Args:
        path: the server's Unix socket.
        limit: units of concurrency (0 = no limit).
        name: key prefix; every client process of one gate uses the same name.
    """

    def __init__(self, path: str, limit: int, name: str = "gate") -> None:
        import redis.asyncio as aioredis

        self.limit = limit
        self._pool = aioredis.ConnectionPool(
            connection_class=aioredis.UnixDomainSocketConnection, path=path, max_connections=4096
        )
        self._r = aioredis.Redis(connection_pool=self._pool)
        self._keys_admit = [f"{name}:queue", f"{name}:inflight", f"{name}:seq"]
        self._keys_release = self._keys_admit[:2]
        self._grant = f"{name}:grant:"
        self._admit = self._r.register_script(_ADMIT)
        self._release_script = self._r.register_script(_RELEASE)
        self._client = f"{os.getpid()}.{secrets.token_hex(3)}."
        self._ids = itertools.count()

    async def admit(
        self, flow_id: str, priority: int = 0, *, byte_size: int = 0, ttl: float | None = None
    ) -> RedisAdmission:
        member = self._client + str(next(self._ids))
        mine = await self._admit(
            keys=self._keys_admit, args=[self.limit, priority, member, self._grant]
        )
        if mine:
            return RedisAdmission(self, "dispatched")
        grant_key = self._grant + member
        got = await self._r.blpop([grant_key], timeout=ttl or 0)
        if got is not None:
            return RedisAdmission(self, "dispatched")
        # Timed out: withdraw; if a grant raced us, take it and hand the unit back.
        if await self._r.zrem(self._keys_admit[0], member) == 0:
            await self._r.blpop([grant_key], timeout=1)
            await self._release()
        return RedisAdmission(self, "evicted_ttl")

    async def _release(self) -> None:
        await self._release_script(keys=self._keys_release, args=[self.limit, self._grant])

    async def stats(self) -> dict[str, Any]:
        inflight = await self._r.get(self._keys_admit[1])
        return {"inflight": int(inflight or 0), "len": await self._r.zcard(self._keys_admit[0])}

    async def close(self) -> None:
        await self._r.aclose()
        await self._pool.disconnect()
