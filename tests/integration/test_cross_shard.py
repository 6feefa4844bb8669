"""Shards sharing one budget: arrival order across shards at equal priority, no starvation."""

from __future__ import annotations

import threading
import time

import pytest

from ipc.messages import Decided, OutcomeCode, Release, Submit
from tests.conftest import wait_until
from tests.integration.test_core import RawShard

pytestmark = pytest.mark.integration


def test_a_release_goes_to_the_oldest_request_of_the_band_on_any_shard(start_daemon):
    # Older requests wait on shard 0, younger ones on shard 1, and the one unit is released on
    # shard 1. A shard that kept the units its own clients released would serve its younger
    # requests first, and could starve shard 0 as long as its own clients kept coming.
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=1)
    old, young = RawShard(d.socket_dir, 0), RawShard(d.socket_dir, 1)
    order: list[str] = []
    try:
        young.send(Submit(100, "holder", 0, 0, 0.0))
        held = young.recv()
        assert type(held) is Decided and held.outcome == OutcomeCode.DISPATCHED
        with d.client() as c:
            for i in range(3):
                old.send(Submit(i, f"old-{i}", 0, 10, 0.0))
                wait_until(lambda n=i + 1: c.stats()["len"] == n, what="old request queued")
            time.sleep(0.02)  # the young ones arrive well after (more than the 1 ms slack)
            for i in range(3):
                young.send(Submit(i, f"young-{i}", 0, 10, 0.0))
                wait_until(lambda n=i + 4: c.stats()["len"] == n, what="young request queued")
            lock = threading.Lock()

            def reader(conn: RawShard, label: str) -> None:
                for _ in range(3):
                    msg = conn.recv()
                    assert type(msg) is Decided and msg.outcome == OutcomeCode.DISPATCHED
                    with lock:
                        order.append(f"{label}{msg.id}")
                    conn.send(Release(msg.id))

            threads = [
                threading.Thread(target=reader, args=(old, "old"), daemon=True),
                threading.Thread(target=reader, args=(young, "young"), daemon=True),
            ]
            for t in threads:
                t.start()
            young.send(Release(100))
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads), f"stuck after {order}"
            wait_until(lambda: c.stats()["inflight"] == 0, what="every unit back")
    finally:
        old.close()
        young.close()
    assert order == ["old0", "old1", "old2", "young0", "young1", "young2"]
