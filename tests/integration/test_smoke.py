from __future__ import annotations

import pytest

from runtime import Outcome

pytestmark = pytest.mark.integration


def test_admit_dispatch_release(start_daemon):
    d = start_daemon(SHARDS=2, MAX_INFLIGHT=2)
    assert "ready" in d.ready_line and d.socket_dir in d.ready_line
    with d.client() as c:
        a = c.admit("tenant-a", 10, byte_size=5)
        assert a.outcome is Outcome.DISPATCHED and a.dispatched and a.reason == ""
        assert c.stats()["inflight"] == 1
        a.release()
        a.release()
        from tests.conftest import wait_until

        wait_until(lambda: c.stats()["inflight"] == 0, what="inflight back to 0")
