"""Errors of the IPC layer.

Runs in every process. Peers: ``runtime`` wraps these where they cross into the public API (a client
sees :class:`runtime.DaemonUnavailable`, never :class:`PeerGone`).
"""

from __future__ import annotations

__all__ = ["FrameTooLarge", "IPCError", "PeerGone", "ProtocolError", "SegmentError"]


class IPCError(Exception):
    """Root of every error raised by :mod:`ipc`."""


class ProtocolError(IPCError):
    """A peer sent bytes that are not a valid frame or message."""


class FrameTooLarge(ProtocolError):
    """A length prefix announced a frame over the configured limit."""


class PeerGone(IPCError):
    """The other end of a connection closed or cannot be reached."""


class SegmentError(IPCError):
    """The shared-memory segment is missing, foreign or of another layout version."""
