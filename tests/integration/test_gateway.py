"""``bandgate gateway`` driven with the official ``openai`` SDK against the fake vLLM.

Every test starts a real daemon (``start_daemon``), a gateway process (``start_gateway``, stopped
with SIGTERM and checked to exit 0) and fake backends in the test process (``fake``), and stops
them all. The gateway's own variables go to the gateway process only, never to the daemon.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from runtime import Outcome
from runtime.config import ConfigError
from runtime.gateway import (
    Balancer,
    GatewaySettings,
    QueueEstimator,
    Upstream,
    _upstream_url,
    parse_listen,
    parse_model_priorities,
    status_for,
)
from tests.conftest import ROOT, Daemon, wait_until
from tests.fakes.vllm import FakeVLLM

pytestmark = pytest.mark.integration

FAIRNESS = "x-gateway-inference-fairness-id"
PRIORITY = "x-gateway-inference-priority"
MESSAGES = [{"role": "user", "content": "hello world"}]


# -- fixtures ------------------------------------------------------------------------------------
class Gateway:
    """A ``python -m runtime.gateway`` subprocess on an ephemeral loopback port."""

    def __init__(
        self, daemon: Daemon, upstreams: list[str], args: list[str], env: dict[str, str]
    ) -> None:
        self.log_path = Path(daemon.socket_dir + ".gateway.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        full_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BANDGATE_")}
        full_env.update({"BANDGATE_SOCKET_DIR": daemon.socket_dir, "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        cmd = [sys.executable, "-m", "runtime.gateway", "--listen", "127.0.0.1:0"]
        for url in upstreams:
            cmd += ["--upstream", url]
        self.proc = subprocess.Popen(
            cmd + args,
            env=full_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "ready" not in line:
            log = self.log()
            code = self.stop()
            pytest.fail(f"gateway did not start ({code}):\n{log}")
        self.url = line.split("listen=", 1)[1].split()[0]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def sdk(self, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key="test",
            max_retries=0,
            timeout=20.0,
            default_headers=headers or None,
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        return self.proc.returncode


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., Gateway]]:
    """``start_gateway(daemon, url, ..., args=[...], **env)``; stopped (exit 0 checked) after."""
    gateways: list[Gateway] = []

    def start(
        daemon: Daemon, *upstreams: str, args: tuple[str, ...] = (), **env: object
    ) -> Gateway:
        gw = Gateway(daemon, list(upstreams), list(args), {k: str(v) for k, v in env.items()})
        gateways.append(gw)
        return gw

    yield start
    problems = []
    for gw in gateways:
        log = gw.log()
        code = gw.stop()
        if code != 0:
            problems.append(f"gateway exited {code}:\n{log[-3000:]}")
        if "Traceback" in log:
            problems.append(f"gateway logged a traceback:\n{log[-3000:]}")
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def fake() -> Iterator[FakeVLLM]:
    with FakeVLLM() as backend:
        yield backend


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(16) as executor:
        yield executor


def chat(client: openai.OpenAI, test_id: str = "", **kwargs: Any) -> str:
    headers = {"x-test-id": test_id} if test_id else {}
    extra = kwargs.pop("extra_headers", {})
    reply = client.chat.completions.create(
        model=kwargs.pop("model", "fake-model"),
        messages=kwargs.pop("messages", MESSAGES),
        extra_headers={**headers, **extra},
        **kwargs,
    )
    return reply.choices[0].message.content or ""


def queued(daemon_client: Any) -> int:
    return int(daemon_client.stats()["len"])


# -- pure parts ----------------------------------------------------------------------------------
def test_model_priorities_parse() -> None:
    assert parse_model_priorities("") == ({}, 0)
    assert parse_model_priorities("llama-70b=10, meta/llama:8b=0,*=-5") == (
        {"llama-70b": 10, "meta/llama:8b": 0},
        -5,
    )
    assert parse_model_priorities("a=b=3") == ({"a=b": 3}, 0)
    for bad in ("llama", "=3", "a=x", "a=1,a=2", "*=1,*=2", "a=2147483648", "a=1.5"):
        with pytest.raises(ValueError, match=r"item|twice"):
            parse_model_priorities(bad)


def test_settings_from_env_and_errors() -> None:
    s = GatewaySettings.from_env(
        {
            "BANDGATE_GATEWAY_PRIORITY_HEADER": "X-Prio",
            "BANDGATE_GATEWAY_MODEL_PRIORITIES": "big=10,*=1",
            "BANDGATE_GATEWAY_TTL": "2s",
            "BANDGATE_SAT_QUEUE_DEPTH": "3",
            "BANDGATE_SHARDS": "2",  # the daemon's variables are accepted (and ignored)
        }
    )
    assert (s.priority_header, dict(s.model_priorities), s.default_priority, s.ttl) == (
        "x-prio",
        {"big": 10},
        1,
        2.0,
    )
    assert s.thresholds.queue_depth == 3
    assert (
        GatewaySettings.from_env({"BANDGATE_GATEWAY_PRIORITY_HEADER": "none"}).priority_header == ""
    )
    assert GatewaySettings.from_env({"BANDGATE_GATEWAY_TTL": "0"}).ttl is None
    for name, value in (
        ("BANDGATE_GATEWAY_TTL", "soon"),
        ("BANDGATE_GATEWAY_PRIORITY_HEADER", "x prio"),
        ("BANDGATE_GATEWAY_MODEL_PRIORITIES", "big"),
        ("BANDGATE_GATEWAY_TLL", "1s"),
        ("BANDGATE_LOG_LEVEL", "loud"),
    ):
        with pytest.raises(ConfigError, match=name):
            GatewaySettings.from_env({name: value})


def test_listen_and_upstream_parse() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen(":0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("8080", "host:", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)
    assert _upstream_url("http://vllm:8000/prefix").path == "/prefix"
    for bad in ("vllm:8000", "ftp://x", "http://x/?a=1"):
        with pytest.raises(ValueError, match="URL"):
            _upstream_url(bad)


def test_outcome_status_mapping_is_gie() -> None:
    assert status_for(Outcome.REJECTED_CAPACITY) == 429
    assert status_for(Outcome.EVICTED_TTL) == 503
    assert status_for(Outcome.EVICTED_CANCELLED) == 503
    assert status_for(Outcome.REJECTED_OTHER) == 500
    assert status_for(Outcome.EVICTED_OTHER) == 500


def test_balancer_least_inflight_ties_round_robin() -> None:
    ups = [Upstream(i, _upstream_url(f"http://127.0.0.1:{9000 + i}")) for i in range(3)]
    b = Balancer(ups)
    picks = []
    for _ in range(6):
        u = b.pick()
        assert u is not None
        picks.append(u.index)
    assert sorted(picks[:3]) == [0, 1, 2] and sorted(picks[3:]) == [0, 1, 2]
    ups[0].inflight, ups[1].inflight, ups[2].inflight = 3, 1, 2
    assert [b.pick().index for _ in range(3)] == [1, 1, 1]  # type: ignore[union-attr]
    assert b.pick(exclude=frozenset({1})).index == 2  # type: ignore[union-attr]
    assert b.pick(exclude=frozenset({0, 1, 2})) is None


def test_retry_after_estimate() -> None:
    est = QueueEstimator(None)  # type: ignore[arg-type]
    assert est.retry_after(0) == 1  # nothing known yet
    bands = {
        10: {"len": 30, "dispatched": 100, "generation": 1},
        0: {"len": 90, "dispatched": 0, "generation": 1},
    }
    est.update({"bands": bands}, 0.0)
    bands[10]["dispatched"] = 110  # 10 dispatches per second
    est.update({"bands": bands}, 1.0)
    assert est.rate == pytest.approx(10.0)
    assert est.retry_after(10) == 3  # 30 queued ahead at 10/s
    assert est.retry_after(0) == 12  # 120 at 10/s
    assert est.retry_after(20) == 1
    bands[0]["len"] = 10_000
    assert QueueEstimator.retry_after(est, 0) == 12  # estimates change only with a new sample
    est.update({"bands": bands}, 2.0)
    assert est.retry_after(0) == 60  # clamped


# -- through the gateway -------------------------------------------------------------------------
def test_chat_completions_plain_and_streamed(start_daemon, start_gateway, fake) -> None:
    d = start_daemon(MAX_INFLIGHT=4)
    gw = start_gateway(d, fake.url, args=("--no-detector",))
    client = gw.sdk(**{FAIRNESS: "tenant-a"})
    assert chat(client) == "echo: hello world"
    raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=MESSAGES)
    assert float(raw.headers["x-bandgate-queued-seconds"]) >= 0
    assert raw.parse().choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == "echo: hello world" and len(parts) >= 3
    assert [m.id for m in client.models.list()] == ["fake-model"]
    state = fake.state()
    assert state["completed"] == 3 and {e["flow"] for e in state["log"]} == {"tenant-a"}
    with d.client() as c:
        wait_until(lambda: c.stats()["inflight"] == 0, what="every unit released")
        stats = c.stats()
        assert stats["bands"][0]["dispatched"] == 3  # GET /v1/models is not admitted
    # No header: GIE's default flow.
    assert chat(gw.sdk()) == "echo: hello world"
    assert fake.state()["log"][-1]["flow"] == ""
    with d.client() as c:
        assert c.stats()["flows"] >= 2


def test_priority_order_through_the_gateway(start_daemon, start_gateway, fake, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=1)
    gw = start_gateway(
        d, fake.url, args=("--no-detector",), BANDGATE_GATEWAY_MODEL_PRIORITIES="premium=10,*=0"
    )
    client = gw.sdk()
    fake.control(hold=True)
    futures = [pool.submit(chat, client, "first")]
    wait_until(lambda: fake.state()["active"] == 1, what="the first request at the backend")
    plan = [
        ("low-1", "fake-model", {}),
        ("premium-1", "premium", {}),
        ("low-2", "fake-model", {}),
        ("header-20", "fake-model", {PRIORITY: "20"}),
        ("premium-2", "premium", {}),
        ("header-low", "premium", {PRIORITY: "-1"}),  # the header wins over the model map
    ]
    with d.client() as c:
        for n, (test_id, model, headers) in enumerate(plan, 1):
            futures.append(
                pool.submit(
                    chat, client, test_id, model=model, extra_headers={**headers, FAIRNESS: test_id}
                )
            )
            wait_until(lambda n=n: queued(c) == n, what=f"{n} requests queued")
        assert sorted(c.stats()["bands"]) == [-1, 0, 10, 20]
        fake.control(hold=False)
        assert [f.result(15) for f in futures] == ["echo: hello world"] * 7
    order = [e["id"] for e in fake.state()["log"]]
    assert order == ["first", "header-20", "premium-1", "premium-2", "low-1", "low-2", "header-low"]


def test_full_band_gets_429_with_retry_after(start_daemon, start_gateway, fake, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=1, BAND_MAX_BYTES=1000)
    gw = start_gateway(d, fake.url, args=("--no-detector",))
    client = gw.sdk()
    big = [{"role": "user", "content": "x" * 600}]
    fake.control(hold=True)
    first = pool.submit(chat, client, "first", messages=big)
    wait_until(lambda: fake.state()["active"] == 1, what="the first request at the backend")
    second = pool.submit(chat, client, "second", messages=big)
    with d.client() as c:
        wait_until(lambda: queued(c) == 1, what="the second request queued")
        # No fairness header: GIE's default flow.
        assert [f["flow_id"] for f in c.stats()["busiest_flows"]] == ["default-flow"]
    with pytest.raises(openai.RateLimitError) as info:
        chat(client, "third", messages=big)
    headers = info.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-bandgate-outcome"] == "rejected_capacity"
    assert headers["x-bandgate-reason"]
    assert info.value.status_code == 429
    assert info.value.body["type"] == "rejected_capacity"  # type: ignore[index]
    fake.control(hold=False)
    assert first.result(15) and second.result(15)
    assert [e["id"] for e in fake.state()["log"]] == ["first", "second"]


def test_ttl_eviction_gets_503_with_retry_after(start_daemon, start_gateway, fake, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=1)
    gw = start_gateway(d, fake.url, args=("--no-detector",), BANDGATE_GATEWAY_TTL="300ms")
    client = gw.sdk()
    fake.control(hold=True)
    first = pool.submit(chat, client, "first")
    wait_until(lambda: fake.state()["active"] == 1, what="the first request at the backend")
    with pytest.raises(openai.InternalServerError) as info:
        chat(client, "late")
    assert info.value.status_code == 503
    assert info.value.response.headers["x-bandgate-outcome"] == "evicted_ttl"
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
    fake.control(hold=False)
    assert first.result(15)
    assert fake.state()["seen"] == 1


def test_client_disconnect_releases_the_unit(start_daemon, start_gateway, fake, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=1)
    gw = start_gateway(d, fake.url, args=("--no-detector",))
    client = gw.sdk()
    fake.control(chunks=200, chunk_interval=0.05)  # a 10 s stream
    stream = client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    with d.client() as c:
        assert c.stats()["inflight"] == 1
        stream.close()  # the client goes away mid-stream
        wait_until(lambda: c.stats()["inflight"] == 0, what="the unit released on disconnect")
        wait_until(lambda: fake.state()["disconnects"] == 1, what="the backend sees the disconnect")
        assert fake.state()["completed"] == 0
        # The budget unit is back: the next request goes through.
        fake.control(chunks=3, chunk_interval=0.0)
        assert chat(client) == "echo: hello world"
        # A client that goes away while queued is withdrawn: never dispatched, queue empty.
        fake.control(hold=True)
        held = pool.submit(chat, client, "held")
        wait_until(lambda: fake.state()["active"] == 1, what="a request held at the backend")
        with pytest.raises(openai.APITimeoutError):
            chat(client.with_options(timeout=0.5), "impatient")
        wait_until(lambda: queued(c) == 0, what="the impatient request withdrawn")
        fake.control(hold=False)
        assert held.result(15)
        wait_until(lambda: c.stats()["inflight"] == 0, what="every unit released")
    assert "impatient" not in [e["id"] for e in fake.state()["log"]]


def test_least_inflight_balancing_and_refused_upstream(start_daemon, start_gateway, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=0)
    with FakeVLLM() as a, FakeVLLM() as b:
        # Port 9 on loopback refuses: requests routed there are retried on the others.
        gw = start_gateway(d, "http://127.0.0.1:9", a.url, b.url, args=("--no-detector",))
        client = gw.sdk()
        a.control(hold=True)
        b.control(hold=True)
        futures = [pool.submit(chat, client, f"r{i}") for i in range(4)]
        wait_until(lambda: a.state()["active"] + b.state()["active"] == 4, what="4 requests held")
        assert (a.state()["active"], b.state()["active"]) == (2, 2)
        a.control(hold=False)
        b.control(hold=False)
        assert [f.result(15) for f in futures] == ["echo: hello world"] * 4


def test_bad_priority_header_and_no_daemon(start_daemon, start_gateway, fake) -> None:
    d = start_daemon()
    gw = start_gateway(d, fake.url, args=("--no-detector",))
    with pytest.raises(openai.BadRequestError) as info:
        chat(gw.sdk(**{PRIORITY: "high"}))
    assert "x-gateway-inference-priority" in info.value.response.headers["x-bandgate-reason"]
    d.stop()
    with pytest.raises(openai.InternalServerError) as info:
        chat(gw.sdk())
    assert info.value.status_code == 503
    assert info.value.response.headers["x-bandgate-outcome"] == "unavailable"
    assert info.value.response.headers["retry-after"] == "1"
    assert fake.state()["seen"] == 0


def test_bad_variable_exits_2_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BANDGATE_")}
    env["BANDGATE_SAT_KV_CACHE"] = "80%"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.gateway", "--upstream", "http://127.0.0.1:9"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "BANDGATE_SAT_KV_CACHE='80%'" in proc.stderr


# -- saturation from the backend's metrics -------------------------------------------------------
SAT = {"BANDGATE_SAT_QUEUE_DEPTH": "2", "BANDGATE_SAT_SCRAPE_INTERVAL": "20ms"}


def test_saturation_from_metrics(start_daemon, start_gateway, fake, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=0)
    gw = start_gateway(d, fake.url, **SAT)
    client = gw.sdk()
    assert chat(client) == "echo: hello world"
    with d.client() as c:
        assert c.stats()["saturation"]["source"] == "external"
        for over in ({"waiting": 3}, {"kv": 0.95}):
            fake.control(**over)
            wait_until(lambda: c.stats()["saturation"]["saturated"], what=f"saturated by {over}")
            seen = fake.state()["seen"]
            pending = pool.submit(chat, client, f"waits for {over}")
            wait_until(lambda: queued(c) == 1, what="the request queued")
            time.sleep(0.3)  # fifteen scrapes: it must still wait
            assert queued(c) == 1 and fake.state()["seen"] == seen
            fake.control(waiting=0, kv=0.1)
            assert pending.result(15) == "echo: hello world"
    text = urllib.request.urlopen(gw.url + "/metrics", timeout=10).read().decode()
    assert f'bandgate_gateway_upstream_metrics_fresh{{upstream="{fake.url}"}} 1.0' in text
    assert "bandgate_gateway_pool_saturation" in text
    assert (
        'bandgate_gateway_admission_duration_seconds_count{model_name="fake-model",outcome="dispatched",priority="0"} 3.0'
        in text
    )


def test_no_overshoot_between_scrapes(start_daemon, start_gateway, fake, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=0)
    gw = start_gateway(d, fake.url, **SAT)
    client = gw.sdk()
    # Every request the backend holds counts as waiting, as in a vLLM with no free slot.
    fake.control(max_running=0, hold=True)
    futures = [pool.submit(chat, client, f"r{i}") for i in range(6)]
    wait_until(
        lambda: fake.state()["active"] == 3, what="queue depth 2 + 1 requests at the backend"
    )
    with d.client() as c:
        wait_until(lambda: queued(c) == 3, what="the other three queued")
        time.sleep(0.5)  # twenty-five scrapes, each seeing 3 waiting: none of them lets one more in
        assert fake.state()["active"] == 3 and queued(c) == 3
        fake.control(hold=False)
        assert [f.result(15) for f in futures] == ["echo: hello world"] * 6
        assert fake.state()["completed"] == 6


def test_stale_metrics_fail_closed(start_daemon, start_gateway, fake, pool) -> None:
    d = start_daemon(MAX_INFLIGHT=0)
    gw = start_gateway(d, fake.url, **SAT)
    client = gw.sdk()
    assert chat(client)
    fake.control(fail_metrics=True)
    with d.client() as c:
        # The last good reading stays usable for the staleness threshold, then nothing is.
        wait_until(lambda: c.stats()["saturation"]["saturated"], what="the pool saturated")
        pending = pool.submit(chat, client, "stale")
        wait_until(lambda: queued(c) == 1, what="the request queued on failing metrics")
        time.sleep(0.3)
        assert queued(c) == 1 and fake.state()["seen"] == 1
        fake.control(fail_metrics=False)
        assert pending.result(15)
        # A gateway that stops reporting (frozen) leaves the daemon failing closed.
        os.kill(gw.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: not c.stats()["saturation"]["fresh"], what="the report going stale")
            outcome: list[Any] = []
            thread = threading.Thread(target=lambda: outcome.append(c.admit("direct", ttl=0.5)))
            thread.start()
            thread.join(15)
            assert outcome[0].outcome is Outcome.EVICTED_TTL
        finally:
            os.kill(gw.proc.pid, signal.SIGCONT)
        assert chat(client) == "echo: hello world"
