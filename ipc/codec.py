"""One reused encoder and one typed decoder per channel (msgspec's performance rules).

Runs in every process. Decoders reject unknown tags and wrong types with
:class:`msgspec.ValidationError` / :class:`msgspec.DecodeError`; callers turn those into an
``ErrorReply`` and close the connection.
"""

from __future__ import annotations

import msgspec

from ipc.messages import ClientToShard, FromCoordinator, ShardToClient, ToCoordinator

__all__ = [
    "DecodeError",
    "client_to_shard",
    "encode",
    "from_coordinator",
    "shard_to_client",
    "to_coordinator",
]

DecodeError = (msgspec.DecodeError, msgspec.ValidationError)

encode = msgspec.msgpack.Encoder().encode
client_to_shard = msgspec.msgpack.Decoder(ClientToShard).decode
shard_to_client = msgspec.msgpack.Decoder(ShardToClient).decode
to_coordinator = msgspec.msgpack.Decoder(ToCoordinator).decode
from_coordinator = msgspec.msgpack.Decoder(FromCoordinator).decode
