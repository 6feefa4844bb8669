"""``python -m bench``: run the named scenarios (all by default), print tables, write results.

Usage::

    python -m bench [SCENARIO ...] [--quick] [--out DIR] [--no-plots]
    python -m bench summary [--out DIR] [--write-readme]
    python -m bench list

``--quick`` runs every scenario on a small budget (all seven in under two minutes on a 2-core
machine); without it the full budget applies (about ten minutes). Results go to
``bench/results/<scenario>.json`` (and ``.png``) unless ``--out`` names another directory.
``summary`` prints the headline figures of the results in ``--out`` as a Markdown table;
``--write-readme`` also puts it into ``bench/README.md`` between its results markers.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
import traceback
from pathlib import Path

from bench._harness import RESULTS, Context, log

SCENARIOS = ("latency", "throughput", "saturated", "fairness", "lifecycle", "shards", "peers")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)}, or summary, or list"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small budget: every scenario in < 2 min"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="results directory (default bench/results)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--write-readme", action="store_true", help="summary: update bench/README.md"
    )
    args = parser.parse_args(argv)

    if args.scenarios == ["list"]:
        for name in SCENARIOS:
            doc = importlib.import_module(f"bench.{name}").__doc__ or ""
            print(f"{name:12} {doc.strip().splitlines()[0]}")
        return 0
    if args.scenarios == ["summary"]:
        from bench._summary import summary

        print(summary(args.out, write_readme=args.write_readme))
        return 0
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )

    from bench._procs import install_signal_handlers

    install_signal_handlers()
    _preflight(names)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    ctx = Context(
        quick=args.quick, out=args.out.resolve(), plots=not args.no_plots, command=command.strip()
    )
    ctx.out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    t_all = time.monotonic()
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        log(f"scenario {name} ({ctx.mode})")
        t0 = time.monotonic()
        try:
            res = module.run(ctx)
        except Exception:
            traceback.print_exc()
            log(f"scenario {name} FAILED")
            failed.append(name)
            continue
        res.elapsed = time.monotonic() - t0
        path = res.write(ctx)
        log(f"scenario {name} done in {res.elapsed:.1f}s -> {path}")
        print()
    from bench._procs import PROBLEMS

    for problem in PROBLEMS:
        log(f"PROBLEM: {problem}")
    log(
        f"all done in {time.monotonic() - t_all:.1f}s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    if len(names) > 1 and not failed:
        from bench._summary import summary

        print(summary(ctx.out))
    return 1 if failed or PROBLEMS else 0


def _preflight(names: list[str]) -> None:
    """Say up front what will be skipped, and how to install it."""
    import importlib.util

    from bench._procs import redis_server_path

    if importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: no plots (install: .venv/bin/pip install -e '.[bench]')")
    if "peers" in names:
        if importlib.util.find_spec("redis") is None:
            log(
                "redis-py is not installed: the Redis peer is skipped (.venv/bin/pip install -e '.[bench]')"
            )
        if redis_server_path() is None:
            log(
                "redis-server is not installed: the Redis peer is skipped (apt-get install -y redis-server, or bench/setup.sh)"
            )


if __name__ == "__main__":
    sys.exit(main())
