"""A fake vLLM: an OpenAI-compatible backend whose load the test controls.

Runs in its own process (``python -m tests.fakes.vllm --port P``, which prints
``fake-vllm ready url=http://127.0.0.1:P`` once it serves) or in the test process, in a thread
with its own event loop (:class:`FakeVLLM`). Peers: the gateway under test (or a benchmark
client), which sends it chat completions and scrapes its ``/metrics``; the test, through
``/control``.

Endpoints:
- ``POST /v1/chat/completions``: a chat completion, streamed (SSE chunks, ``data: [DONE]``) or not,
  in the shapes the ``openai`` SDK parses. The reply's content is ``"echo: <last user message>"``.
  Before answering it waits ``delay`` seconds and, while ``hold`` is set, until it is cleared; a
  stream sends ``chunks`` content chunks ``chunk_interval`` seconds apart.
- ``GET /v1/models``: one model, ``fake-model``.
- ``GET /metrics``: vLLM's exposition (``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, and ``vllm:gpu_cache_usage_perc`` or, with
  ``kv_name="kv_cache_usage_perc"``, the newer ``vllm:kv_cache_usage_perc``). Waiting is
  ``waiting + max(0, active - max_running)``: requests beyond ``max_running`` count as queued, as
  in vLLM; ``fail_metrics`` makes it answer 500.
- ``POST /control`` sets any of ``waiting``, ``kv``, ``kv_name``, ``fail_metrics``, ``delay``,
  ``hold``, ``chunks``, ``chunk_interval``, ``max_running``; ``POST /control/reset`` clears the
  counters; ``GET /control`` returns the settings and the counters: ``seen`` (requests
  received), ``active`` (being answered), ``completed``, ``disconnects`` (clients gone before the
  end), ``scrapes`` and ``log`` (per request, in arrival order: the ``x-test-id``,
  ``x-gateway-inference-fairness-id`` and ``x-gateway-inference-priority`` headers and the model).

Invariant: ``active`` is decremented on every path out of a completion handler (end, error,
client disconnect), so a test can wait for it to reach 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import sys
import threading
import time
import urllib.request
from typing import Any

from aiohttp import web

__all__ = ["FakeVLLM", "make_app"]

MODEL = "fake-model"
SETTINGS = (
    "waiting",
    "kv",
    "kv_name",
    "fail_metrics",
    "delay",
    "hold",
    "chunks",
    "chunk_interval",
    "max_running",
)


class _State:
    def __init__(self) -> None:
        self.settings: dict[str, Any] = {
            "waiting": 0,
            "kv": 0.0,
            "kv_name": "gpu_cache_usage_perc",
            "fail_metrics": False,
            "delay": 0.0,
            "hold": False,
            "chunks": 3,
            "chunk_interval": 0.0,
            "max_running": 1_000_000,
        }
        self.released = asyncio.Event()
        self.released.set()
        self.ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        self.seen = 0
        self.active = 0
        self.completed = 0
        self.disconnects = 0
        self.scrapes = 0
        self.log: list[dict[str, Any]] = []

    def counters(self) -> dict[str, Any]:
        return {
            **self.settings,
            "seen": self.seen,
            "active": self.active,
            "completed": self.completed,
            "disconnects": self.disconnects,
            "scrapes": self.scrapes,
            "log": list(self.log),
        }


STATE: web.AppKey[_State] = web.AppKey("state", _State)


def _chunk(cid: str, created: int, delta: dict[str, Any], finish: str | None) -> bytes:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.json()
    state.seen += 1
    state.active += 1
    state.log.append(
        {
            "id": request.headers.get("x-test-id", ""),
            "flow": request.headers.get("x-gateway-inference-fairness-id", ""),
            "priority": request.headers.get("x-gateway-inference-priority", ""),
            "model": body.get("model", ""),
        }
    )
    finished = False
    try:
        settings = state.settings
        if settings["delay"]:
            await asyncio.sleep(float(settings["delay"]))
        await state.released.wait()
        messages = body.get("messages") or [{"content": ""}]
        text = f"echo: {messages[-1].get('content', '')}"
        cid = f"chatcmpl-{next(state.ids)}"
        created = int(time.time())
        if not body.get("stream"):
            words = len(text.split())
            reply = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": body.get("model", MODEL),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": words,
                    "total_tokens": 1 + words,
                },
            }
            finished = True
            return web.json_response(reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk(cid, created, {"role": "assistant", "content": ""}, None))
        n = max(1, int(settings["chunks"]))
        size = -(-len(text) // n)
        for i in range(n):
            if i and settings["chunk_interval"]:
                await asyncio.sleep(float(settings["chunk_interval"]))
            await resp.write(
                _chunk(cid, created, {"content": text[i * size : (i + 1) * size]}, None)
            )
        await resp.write(_chunk(cid, created, {}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        finished = True
        return resp
    finally:
        state.active -= 1
        if finished:
            state.completed += 1
        else:
            state.disconnects += 1


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}],
        }
    )


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.scrapes += 1
    settings = state.settings
    if settings["fail_metrics"]:
        return web.Response(status=500, text="metrics unavailable\n")
    running = min(state.active, int(settings["max_running"]))
    waiting = float(settings["waiting"]) + max(0, state.active - int(settings["max_running"]))
    kv_name = f"vllm:{settings['kv_name']}"
    label = f'{{model_name="{MODEL}"}}'
    text = (
        "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{label} {float(running)}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{label} {waiting}\n"
        f"# HELP {kv_name} KV-cache usage. 1 means 100 percent usage.\n"
        f"# TYPE {kv_name} gauge\n"
        f"{kv_name}{label} {float(settings['kv'])}\n"
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{finished_reason="stop",model_name="{MODEL}"}} {float(state.completed)}\n'
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def _control_get(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].counters())


async def _control_set(request: web.Request) -> web.Response:
    state = request.app[STATE]
    update = await request.json()
    unknown = sorted(set(update) - set(SETTINGS))
    if unknown:
        return web.json_response({"error": f"unknown settings {unknown}"}, status=400)
    state.settings.update(update)
    if "hold" in update:
        if update["hold"]:
            state.released.clear()
        else:
            state.released.set()
    return web.json_response(state.counters())


async def _control_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.reset()
    return web.json_response(state.counters())


def make_app() -> web.Application:
    """The fake's aiohttp application (fresh state)."""
    app = web.Application()
    app[STATE] = _State()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/control", _control_get)
    app.router.add_post("/control", _control_set)
    app.router.add_post("/control/reset", _control_reset)
    return app


async def _start(host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(
        make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])


class FakeVLLM:
    """The fake served from a thread of the test process, on an ephemeral loopback port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-vllm", daemon=True
        )
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeVLLM:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(_start(self.host, 0), self._loop)
        self._runner, self.port = fut.result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> FakeVLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def control(self, **settings: Any) -> dict[str, Any]:
        """Changes settings (see the module docstring); returns settings and counters."""
        return _post(f"{self.url}/control", settings)

    def reset(self) -> dict[str, Any]:
        """Clears the counters and the log."""
        return _post(f"{self.url}/control/reset", {})

    def state(self) -> dict[str, Any]:
        """The settings and the counters."""
        with urllib.request.urlopen(f"{self.url}/control", timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


async def _serve(host: str, port: int) -> None:
    runner, bound = await _start(host, port)
    print(f"fake-vllm ready url=http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.fakes.vllm [--host H] [--port P]``: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.vllm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = an ephemeral port")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
