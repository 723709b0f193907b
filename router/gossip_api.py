"""The contract between the mesh and the applications that gossip over it.

Weave's mesh model: each named channel ("topology", "IPallocation", "nameserver") has an
application behind it. The application is sans-IO: the mesh hands it bytes and it answers
with state to pass on and messages to send; the daemon's services do the sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class GossipData(Protocol):
    """State to gossip: the full state, or a delta."""

    def encode(self) -> list[bytes]:
        """One payload per gossip message (Weave's channels always produce one)."""
        ...

    def merge(self, other: GossipData) -> GossipData:
        """Combine with other pending data for the same destination."""
        ...


@dataclass(frozen=True)
class SendUnicast:
    """Send `payload` on this channel to peer `dst` (relayed hop by hop)."""

    dst: int
    payload: bytes


@dataclass(frozen=True)
class SendBroadcast:
    """Send `payload` to every peer over the broadcast tree."""

    payload: bytes


Action = SendUnicast | SendBroadcast


class Gossiper(Protocol):
    """The application side of one gossip channel.

    Every handler may raise router.errors.WireError for input it rejects; the mesh then
    logs the reason and drops the connection the message came from, as Weave does.
    """

    def gossip(self) -> GossipData | None:
        """The complete state, sent periodically and to new peers."""
        ...

    def on_gossip(self, payload: bytes) -> GossipData | None:
        """Merge periodic/neighbour gossip; return what was new (to pass on), or None."""
        ...

    def on_gossip_broadcast(self, src: int, payload: bytes) -> GossipData | None:
        """Merge a broadcast; return the delta, or None."""
        ...

    def on_gossip_unicast(self, src: int, payload: bytes) -> list[Action]:
        """Handle a message addressed to us; return messages to send in reply."""
        ...
