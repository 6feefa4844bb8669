"""Validation of one admission's fields, shared by the client library and the shard worker.

Runs in client processes (to raise ``ValueError`` for misuse before anything is sent) and in shard
workers (to refuse a raw client that skipped the library). One function, so both sides agree.
"""

from __future__ import annotations

import math

__all__ = ["MAX_BYTE_SIZE", "MAX_FLOW_ID_BYTES", "check_admission", "check_submit"]

MAX_FLOW_ID_BYTES = 1024
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_BYTE_SIZE = 2**62  # keeps every sum of sizes inside an int64 shared-memory word
MAX_TTL = 10 * 365 * 24 * 3600.0


def check_admission(flow_id: object, priority: object, byte_size: object, ttl: object) -> str:
    """Return '' if the fields are valid, else a message naming the bad field."""
    if not isinstance(flow_id, str):
        return f"flow_id must be a str, not {type(flow_id).__name__}"
    if not flow_id:
        return "flow_id must not be empty"
    if len(flow_id) > MAX_FLOW_ID_BYTES:
        return f"flow_id is longer than {MAX_FLOW_ID_BYTES} bytes of UTF-8"
    try:
        encoded = flow_id.encode("utf-8")
    except UnicodeEncodeError:
        return "flow_id must be encodable as UTF-8 (it contains a lone surrogate)"
    if len(encoded) > MAX_FLOW_ID_BYTES:
        return f"flow_id is longer than {MAX_FLOW_ID_BYTES} bytes of UTF-8"
    if type(priority) is not int:
        return f"priority must be an int, not {type(priority).__name__}"
    if not INT32_MIN <= priority <= INT32_MAX:
        return f"priority {priority} is outside the int32 range"
    if type(byte_size) is not int:
        return f"byte_size must be an int, not {type(byte_size).__name__}"
    if byte_size < 0:
        return f"byte_size must not be negative (got {byte_size})"
    if byte_size > MAX_BYTE_SIZE:
        return f"byte_size {byte_size} is larger than {MAX_BYTE_SIZE}"
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            return f"ttl must be a number of seconds, not {type(ttl).__name__}"
        if not (ttl > 0) or math.isinf(ttl) or ttl > MAX_TTL:
            return f"ttl must be > 0 seconds and finite (got {ttl!r})"
    return ""


def check_submit(msg: object) -> str:
    """Validate a decoded ``Submit`` (ttl 0 on the wire means "use the daemon default")."""
    ttl = msg.ttl  # type: ignore[attr-defined]
    return check_admission(
        msg.flow_id,  # type: ignore[attr-defined]
        msg.priority,  # type: ignore[attr-defined]
        msg.byte_size,  # type: ignore[attr-defined]
        None if ttl == 0 else ttl,
    )
