"""CLI: ``bandgate serve | stats | bands | shards``.

Runs in the operator's shell. ``serve`` turns the environment into a :class:`~runtime.config.Config`
(a bad variable exits non-zero with one line naming it) and runs the coordinator in the
foreground; the other commands are clients of a running daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from runtime.config import ConfigError, describe_variables, load
from runtime.gateway import add_gateway_parser, run_gateway
from runtime.supervision import ExitCode
from runtime.top import add_top_parser, run_top

SERVE_EPILOG = """\
The daemon is configured only through environment variables:

{variables}

On SIGTERM or SIGINT it stops accepting requests, gives every waiting request
evicted_other ("shutting down"), stops its processes, removes its shared memory,
semaphore and sockets, and exits 0. A second signal forces the stop.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bandgate",
        description="Flow-control daemon for LLM inference traffic: strict priority bands, "
        "fair flows, TTLs, byte limits and a global concurrency budget.",
        epilog="The daemon is configured by BANDGATE_* environment variables: "
        "see 'bandgate serve --help' for the list.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground. Prints a line containing 'ready' once it accepts requests.",
        epilog=SERVE_EPILOG.format(variables=describe_variables()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats = sub.add_parser("stats", help="show queues, bands and shards of a running daemon")
    stats.add_argument("--json", action="store_true", help="print the stats document as JSON")
    bands = sub.add_parser("bands", help="list bands (state and generation) or set the desired set")
    bands.add_argument("--json", action="store_true", help="print as JSON")
    bands_sub = bands.add_subparsers(dest="bands_command", metavar="ACTION")
    rec = bands_sub.add_parser("reconcile", help="make these priorities the desired set of bands")
    rec.add_argument("priorities", nargs="*", type=int, metavar="P")
    shards = sub.add_parser("shards", help="list shards or change how many are active")
    shards_sub = shards.add_subparsers(dest="shards_command", metavar="ACTION")
    scale = shards_sub.add_parser(
        "scale", help="set the number of active shards (extra ones drain)"
    )
    scale.add_argument("n", type=int)
    add_gateway_parser(sub)
    add_top_parser(sub)
    for p in (stats, bands, shards, rec, scale):
        # On the actions too, so `shards scale 3 --socket-dir D` works as well as the other order.
        p.add_argument(
            "--socket-dir",
            default=argparse.SUPPRESS,
            help="the daemon's socket directory (default: BANDGATE_SOCKET_DIR or the default)",
        )
    return parser


def _client(args: argparse.Namespace) -> Any:
    from runtime.client import Client

    return Client(getattr(args, "socket_dir", None))


def _print_stats(data: dict[str, Any]) -> None:
    print(
        f"queued {data['len']} ({data['bytes']} bytes)  inflight {data['inflight']}"
        f"/{data['max_inflight'] or 'unlimited'}  flows {data['flows']}  bands {len(data['bands'])}"
    )
    print()
    print(
        f"{'priority':>9} {'name':<16} {'state':<9} {'queued':>8} {'bytes':>12} {'capacity':>12} {'flows':>6} {'dispatched':>11}"
    )
    for prio, band in sorted(data["bands"].items(), key=lambda kv: -int(kv[0])):
        print(
            f"{prio:>9} {band['name']:<16} {band['state']:<9} {band['len']:>8} {band['bytes']:>12}"
            f" {band['capacity_bytes']:>12} {band['flows']:>6} {band['dispatched']:>11}"
        )
    print()
    print(
        f"{'shard':>5} {'pid':>8} {'state':<9} {'queued':>8} {'bytes':>12} {'inflight':>9} {'dispatched':>11}"
    )
    for shard in data["shards"]:
        print(
            f"{shard['id']:>5} {shard['pid']:>8} {shard['state']:<9} {shard['len']:>8} {shard['bytes']:>12}"
            f" {shard['inflight']:>9} {shard['dispatched']:>11}"
        )
    gc = data["gc"]
    print()
    print(
        f"gc: flows removed {gc['flows_removed']}, bands removed {gc['bands_removed']}, "
        f"aborts {gc['aborts']}, revivals {gc['revivals']}"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = load()
        except ConfigError as exc:
            print(f"bandgate: {exc}", file=sys.stderr)
            sys.exit(ExitCode.CONFIG_ERROR)
        from runtime import logsetup
        from runtime.coordinator import serve

        logsetup.setup(config.log_level, "coordinator")
        sys.exit(serve(config))
    if args.command == "gateway":
        sys.exit(run_gateway(args))
    if args.command == "top":
        sys.exit(run_top(args))

    from runtime.outcome import BandgateError

    try:
        with _client(args) as client:
            if args.command == "stats":
                data = client.stats()
                if args.json:
                    print(json.dumps(data, indent=2, sort_keys=True))
                else:
                    _print_stats(data)
            elif args.command == "bands":
                if args.bands_command == "reconcile":
                    client.reconcile_priorities(args.priorities)
                rows = client.bands()
                if args.json:
                    print(json.dumps(rows, indent=2))
                else:
                    print(
                        f"{'priority':>9} {'name':<16} {'state':<9} {'generation':>10} {'flows':>6}"
                    )
                    for b in rows:
                        print(
                            f"{b['priority']:>9} {b['name']:<16} {b['state']:<9} {b['generation']:>10} {b['flows']:>6}"
                        )
            elif args.command == "shards":
                if args.shards_command == "scale":
                    client.scale_shards(args.n)
                for shard in client.stats()["shards"]:
                    print(
                        f"shard {shard['id']:>3} pid {shard['pid']:>8} {shard['state']:<9} queued {shard['len']}"
                    )
    except (BandgateError, ValueError) as exc:
        print(f"bandgate: {exc}", file=sys.stderr)
        sys.exit(ExitCode.ERROR)


if __name__ == "__main__":
    main()
