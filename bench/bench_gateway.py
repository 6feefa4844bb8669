"""Added latency of ``bandgate gateway``: a chat completion straight to the backend vs through it.

Standalone script (``python bench/bench_gateway.py [--quick]``), run from the repository. It
starts, in this order, a daemon (``bandgate serve``, one shard, the default budget), the fake
vLLM of the tests (``tests/fakes/vllm.py``, answering at once), and a gateway in front of it (its
saturation detector on unless ``--no-detector``), each as its own process; then one client in
this process sends non-streamed chat completions one at a time over keep-alive connections,
alternating blocks of ``--block`` requests straight to the backend and through the gateway so
that drift in the machine's speed hits both paths alike. It prints p50/p99/mean of both and the
difference (the gateway's added latency: admission through the daemon + one more HTTP hop), and
writes ``bench/results/gateway.json`` (scenario, mode, params, machine, commit, command, figures,
rows, notes). Everything it starts it stops, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench._harness import commit, machine, percentile  # noqa: E402

RESULTS = REPO / "bench" / "results"
BODY = json.dumps(
    {"model": "fake-model", "messages": [{"role": "user", "content": "How far is the moon?"}]}
).encode()


class Proc:
    """A child process that prints a line containing ``ready`` once it serves."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline()
        if "ready" not in self.ready:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n{log.read_text()[-2000:]}")

    def url(self) -> str:
        return self.ready.split("url=" if "url=" in self.ready else "listen=", 1)[1].split()[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def _one(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    return time.perf_counter() - started


async def measure(
    direct: str, gateway: str, n: int, warmup: int, block: int
) -> dict[str, list[float]]:
    """Latencies (seconds) of ``n`` requests on each path, in alternating blocks."""
    out: dict[str, list[float]] = {"direct": [], "gateway": []}
    urls = {"direct": direct + "/v1/chat/completions", "gateway": gateway + "/v1/chat/completions"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for name in urls:
            for _ in range(warmup):
                await _one(session, urls[name])
        while len(out["gateway"]) < n:
            for name in urls:
                for _ in range(min(block, n - len(out[name]))):
                    out[name].append(await _one(session, urls[name]))
    return out


def _summary(values: list[float]) -> dict[str, float]:
    s = sorted(v * 1e6 for v in values)
    return {
        "p50_us": round(percentile(s, 50), 1),
        "p99_us": round(percentile(s, 99), 1),
        "mean_us": round(sum(s) / len(s), 1),
        "n": len(s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=3000, help="requests per path (default 3000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="unmeasured requests per path first"
    )
    parser.add_argument("--block", type=int, default=100, help="requests per alternating block")
    parser.add_argument("--quick", action="store_true", help="300 requests per path (a smoke run)")
    parser.add_argument(
        "--no-detector", action="store_true", help="run the gateway without its detector"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    n = 300 if args.quick else args.requests
    warmup = min(args.warmup, 50) if args.quick else args.warmup

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bgbench-gw-", dir="/tmp"))
    socket_dir = tmp / "sock"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BANDGATE_")}
    env.update({"BANDGATE_SOCKET_DIR": str(socket_dir), "PYTHONUNBUFFERED": "1"})
    daemon_env = {**env, "BANDGATE_SHARDS": "1", "BANDGATE_METRICS_ADDR": "0"}
    procs: list[Proc] = []
    try:
        procs.append(
            Proc(
                "daemon", [sys.executable, "-m", "runtime", "serve"], daemon_env, tmp / "daemon.log"
            )
        )
        backend = Proc(
            "backend",
            [sys.executable, "-m", "tests.fakes.vllm", "--port", "0"],
            env,
            tmp / "backend.log",
        )
        procs.append(backend)
        gw_argv = [
            sys.executable,
            "-m",
            "runtime.gateway",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            backend.url(),
        ]
        if args.no_detector:
            gw_argv.append("--no-detector")
        gateway = Proc("gateway", gw_argv, env, tmp / "gateway.log")
        procs.append(gateway)
        lat = asyncio.run(measure(backend.url(), gateway.url(), n, warmup, args.block))
    finally:
        for proc in reversed(procs):
            proc.stop()
        for name in ("daemon.log", "backend.log", "gateway.log"):
            with contextlib.suppress(FileNotFoundError):
                (tmp / name).unlink()
        with contextlib.suppress(OSError):
            socket_dir.rmdir()
        with contextlib.suppress(OSError):
            tmp.rmdir()

    direct, via = _summary(lat["direct"]), _summary(lat["gateway"])
    figures = {
        "direct_p50_us": direct["p50_us"],
        "direct_p99_us": direct["p99_us"],
        "gateway_p50_us": via["p50_us"],
        "gateway_p99_us": via["p99_us"],
        "added_p50_us": via["p50_us"] - direct["p50_us"],
        "added_p99_us": via["p99_us"] - direct["p99_us"],
        "ratio_p50": via["p50_us"] / direct["p50_us"],
        "ratio_p99": via["p99_us"] / direct["p99_us"],
    }
    print(f"{'path':<10} {'p50 µs':>10} {'p99 µs':>10} {'mean µs':>10} {'n':>7}")
    for name, s in (("direct", direct), ("gateway", via)):
        print(
            f"{name:<10} {s['p50_us']:>10.0f} {s['p99_us']:>10.0f} {s['mean_us']:>10.0f} {s['n']:>7}"
        )
    print(
        f"added by the gateway: p50 {figures['added_p50_us']:.0f} µs, "
        f"p99 {figures['added_p99_us']:.0f} µs"
    )
    doc: dict[str, Any] = {
        "scenario": "gateway",
        "mode": "quick" if args.quick else "full",
        "params": {
            "requests_per_path": n,
            "warmup_per_path": warmup,
            "block": args.block,
            "detector": not args.no_detector,
            "shards": 1,
            "concurrency": 1,
            "request": "non-streamed chat completion, fake vLLM answering at once",
        },
        "machine": machine(),
        "commit": commit(),
        "command": " ".join(
            ["python", "bench/bench_gateway.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "figures": {k: round(v, 3) for k, v in figures.items()},
        "rows": [{"path": "direct", **direct}, {"path": "gateway", **via}],
        "notes": [
            "One client, one request at a time, keep-alive connections, loopback; blocks of "
            "requests alternate between the two paths.",
            "added = gateway minus direct, per percentile: admission through the daemon "
            "(Unix sockets) plus the gateway's HTTP hop.",
            f"1-minute load average before the run: {load_before:.2f} on "
            f"{machine()['cores']} usable cores (other work inflates the tails).",
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gateway.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(doc, indent=2) + "\n")
    tmp_path.replace(path)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
