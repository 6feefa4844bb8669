"""bandgate: a flow-control daemon for LLM inference traffic (the runtime layer).

Decides *if* and *when* each inference request may go to a backend: strict priority between
bands, fairness between flows inside a band, per-flow ordering (FCFS, EDF), byte capacity limits,
TTLs, cancellation, and dispatch gated by a global concurrency budget. It is the Flow Control
layer of the Gateway API Inference Extension (Go), rebuilt as a multi-process sharded daemon::

 clients ──(unix socket, framed msgpack)──► shard worker 0..N-1  (band queues, dispatch loop)
    │                                           ▲     │ writes its own stats and lease rows
    └──hello/control──► coordinator ◄───────────┘     ▼
                        owns: config, band & flow tables, shard table  ── SHARED MEMORY ──
                        supervises every process, serves control.sock
                             ▲
                GC process ──┘ two-phase removal of idle flows and bands, by MESSAGES only

Modules:

- in the caller's process: :mod:`runtime.client` (``Client``, ``AsyncClient``);
- processes: :mod:`runtime.coordinator` (with :mod:`runtime.metrics`), :mod:`runtime.shard_worker`,
  :mod:`runtime.gc_worker`; and the optional :mod:`runtime.gateway` (with
  :mod:`runtime.detector`) and :mod:`runtime.top`;
- pure logic, unit-tested without processes: :mod:`runtime.registry`, :mod:`runtime.shard_state`,
  :mod:`runtime.policies`, the GC planner and removal machine in :mod:`runtime.gc_worker`;
- :mod:`runtime.config` (every ``BANDGATE_*`` variable), :mod:`runtime.validation`,
  :mod:`runtime.outcome`, :mod:`runtime.supervision`, :mod:`runtime.logsetup`.
"""

from runtime.client import Admission, AsyncAdmission, AsyncClient, Client
from runtime.outcome import BandgateError, DaemonUnavailable, Outcome

__all__ = [
    "Admission",
    "AsyncAdmission",
    "AsyncClient",
    "BandgateError",
    "Client",
    "DaemonUnavailable",
    "Outcome",
]
