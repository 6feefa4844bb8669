"""THE wire protocol: every message that crosses a process boundary.

Runs in every process. There is one tagged union per channel, each decoded by one typed decoder
(:mod:`ipc.codec`):

- ``ClientToShard`` / ``ShardToClient``: the hot path (a client's connection to a shard socket).
- ``ToCoordinator`` / ``FromCoordinator``: the control socket (clients, the CLI) and the internal
  socket (shard workers and the GC process, which authenticate with the run's token).

Schema-evolution rules (msgspec): every Struct is ``array_like`` for speed, so fields are never
reordered or removed; a new field is appended at the end and has a default. ``PROTOCOL_VERSION``
changes when a peer of another version could misread a message.

Outcome codes on the wire are :class:`OutcomeCode` ints; ``RETRY`` never reaches a user: it tells
the client library to resubmit elsewhere (the shard is draining or stopping).
"""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "Ack",
    "Cancel",
    "ClearSaturation",
    "ClientToShard",
    "Commit",
    "Decided",
    "EntityKind",
    "ErrorReply",
    "FromCoordinator",
    "GcHello",
    "GetBands",
    "GetStats",
    "Hello",
    "JsonReply",
    "OutcomeCode",
    "Prepare",
    "PrepareSent",
    "Provision",
    "Provisioned",
    "Reconcile",
    "Release",
    "ReportSaturation",
    "Retire",
    "ScaleShards",
    "SetDraining",
    "ShardDrained",
    "ShardHello",
    "ShardInfo",
    "ShardToClient",
    "Shutdown",
    "Submit",
    "ToCoordinator",
    "Topology",
    "TopologyChanged",
    "Vote",
]

PROTOCOL_VERSION = 1


class OutcomeCode(enum.IntEnum):
    """GIE's QueueOutcome values, plus RETRY (internal: resubmit on another shard)."""

    RETRY = 0
    DISPATCHED = 1
    REJECTED_CAPACITY = 2
    REJECTED_OTHER = 3
    EVICTED_TTL = 4
    EVICTED_CANCELLED = 5
    EVICTED_OTHER = 6


class EntityKind(enum.IntEnum):
    """What a two-phase removal is about."""

    FLOW = 1
    BAND = 2


class _Msg(msgspec.Struct, array_like=True, frozen=True, tag_field="t"):
    pass


# --- client <-> shard (hot path) -------------------------------------------------------------
class Submit(_Msg, frozen=True, tag="s"):
    """Ask for admission. ``id`` is unique per connection; ``ttl`` 0 means the daemon default."""

    id: int
    flow_id: str
    priority: int
    byte_size: int
    ttl: float


class Cancel(_Msg, frozen=True, tag="c"):
    """Withdraw a queued request (a no-op if it already has its outcome)."""

    id: int


class Release(_Msg, frozen=True, tag="r"):
    """Return the concurrency unit of a dispatched request (idempotent)."""

    id: int


class Decided(_Msg, frozen=True, tag="d"):
    """The one outcome of a Submit. ``flow_slot`` lets the client pick shards by flow bytes."""

    id: int
    outcome: int
    reason: str
    queued: float
    flow_slot: int = -1


class ErrorReply(_Msg, frozen=True, tag="e"):
    """The peer broke the protocol; the connection is closed after this frame."""

    code: str
    reason: str


ClientToShard = Submit | Cancel | Release
ShardToClient = Decided | ErrorReply


# --- control socket (clients, CLI) ----------------------------------------------------------
class Hello(_Msg, frozen=True, tag="hello"):
    protocol: int


class ShardInfo(msgspec.Struct, array_like=True, frozen=True):
    id: int
    path: str
    state: str  # "active" | "draining"
    pid: int


class Topology(_Msg, frozen=True, tag="topology"):
    """Reply to Hello (and pushed as TopologyChanged): where the shards are."""

    protocol: int
    shm_name: str
    epoch: int
    shards: tuple[ShardInfo, ...]
    max_flows: int


class TopologyChanged(_Msg, frozen=True, tag="topology_changed"):
    epoch: int


class GetStats(_Msg, frozen=True, tag="get_stats"):
    pass


class GetBands(_Msg, frozen=True, tag="get_bands"):
    pass


class ScaleShards(_Msg, frozen=True, tag="scale_shards"):
    n: int


class Reconcile(_Msg, frozen=True, tag="reconcile"):
    priorities: tuple[int, ...]


class ReportSaturation(_Msg, frozen=True, tag="report_saturation"):
    """An external saturation source (the gateway's detector) grants dispatch credit.

    The daemon dispatches at most ``allowance`` more requests, counted over all shards from now,
    and none once ``valid_for`` seconds pass without a newer report (stale fails closed).
    """

    allowance: int
    valid_for: float


class ClearSaturation(_Msg, frozen=True, tag="clear_saturation"):
    """The external saturation source is going away: gate dispatch by the budget alone again."""


class JsonReply(_Msg, frozen=True, tag="json"):
    """A reply whose body is a JSON document (stats, bands)."""

    body: bytes


class Ack(_Msg, frozen=True, tag="ack"):
    ok: bool
    reason: str = ""


# --- internal socket: shard workers ---------------------------------------------------------
class ShardHello(_Msg, frozen=True, tag="shard_hello"):
    token: str
    shard_id: int
    pid: int


class Provision(_Msg, frozen=True, tag="provision"):
    """A shard asks for the slots of a flow (and its band), creating them just in time.

    It is also how a shard re-resolves a flow or band it has fenced: the coordinator revives a
    retiring entity (and aborts its removal everywhere) or allocates a new generation.
    """

    req: int
    flow_id: str
    priority: int


class Provisioned(_Msg, frozen=True, tag="provisioned"):
    req: int
    ok: bool
    reason: str
    flow_id: str
    priority: int
    flow_slot: int = -1
    flow_gen: int = 0
    band_slot: int = -1
    band_gen: int = 0
    band_capacity: int = 0
    band_name: str = ""


class Vote(_Msg, frozen=True, tag="vote"):
    """A shard's answer to Prepare: yes means it fenced (kind, slot, gen) and holds nothing in it."""

    txn: int
    shard_id: int
    yes: bool
    reason: str = ""


class ShardDrained(_Msg, frozen=True, tag="shard_drained"):
    """A draining shard has nothing queued and no unit outstanding; it may be stopped."""

    shard_id: int


# --- internal socket: GC process ------------------------------------------------------------
class GcHello(_Msg, frozen=True, tag="gc_hello"):
    token: str
    pid: int


class Retire(_Msg, frozen=True, tag="retire"):
    """Phase 1: mark an idle entity RETIRING (only if it is still ACTIVE at ``gen`` and idle)."""

    txn: int
    kind: int
    slot: int
    gen: int


class Prepare(_Msg, frozen=True, tag="prepare"):
    """Phase 2a (GC -> coordinator -> every shard): vote, and fence on yes."""

    txn: int
    kind: int
    slot: int
    gen: int


class PrepareSent(_Msg, frozen=True, tag="prepare_sent"):
    """Coordinator -> GC: Prepare went to these shards (or nowhere, with a reason)."""

    txn: int
    ok: bool
    shard_ids: tuple[int, ...]
    reason: str = ""


class Commit(_Msg, frozen=True, tag="commit"):
    """Phase 2b: free the entity everywhere. Refused by the coordinator if it was revived."""

    txn: int
    kind: int
    slot: int
    gen: int


class Abort(_Msg, frozen=True, tag="abort"):
    """Phase 2b (or a revival): unfence and keep the entity ACTIVE. Idempotent."""

    txn: int
    kind: int
    slot: int
    gen: int


# --- coordinator -> shard ---------------------------------------------------------------------
class SetDraining(_Msg, frozen=True, tag="set_draining"):
    pass


class Shutdown(_Msg, frozen=True, tag="shutdown"):
    reason: str


ToCoordinator = (
    Hello
    | GetStats
    | GetBands
    | ScaleShards
    | Reconcile
    | ReportSaturation
    | ClearSaturation
    | ShardHello
    | Provision
    | Vote
    | ShardDrained
    | GcHello
    | Retire
    | Prepare
    | Commit
    | Abort
)
FromCoordinator = (
    Topology
    | TopologyChanged
    | JsonReply
    | Ack
    | ErrorReply
    | Provisioned
    | Prepare
    | Commit
    | Abort
    | SetDraining
    | Shutdown
    | PrepareSent
    | Vote
)
