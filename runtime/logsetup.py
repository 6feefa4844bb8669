"""Per-process logging: one format for every bandgate process, with its role in each line.

Runs in every daemon process. INFO is for lifecycle (spawn, reap, band provisioned or removed,
drain); DEBUG for each GC cycle; nothing per request above DEBUG.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup"]

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup(level: str, process_name: str) -> None:
    import multiprocess  # type: ignore[import-untyped]

    multiprocess.current_process().name = process_name
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Python's logging reads processName from the stdlib multiprocessing module.
    import multiprocessing

    multiprocessing.current_process().name = process_name
