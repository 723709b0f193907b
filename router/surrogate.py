"""Gossip channels this router has no application for ("surrogates").

A Weave mesh may carry channels we don't implement; we must still pass them on so
Weave's own applications keep working across pyweave peers. Identical periodic gossip
seen within one gossip interval is passed on only once, or it would circulate forever.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from router.gossip_api import Action, GossipData

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MAX_REMEMBERED = 4096


def fnv64a(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass(frozen=True)
class RawGossip:
    """Opaque gossip passed on unchanged."""

    payload: bytes

    def encode(self) -> list[bytes]:
        return [self.payload]

    def merge(self, other: GossipData) -> GossipData:
        return other


class SurrogateGossiper:
    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._seen: OrderedDict[tuple[int, bytes], float] = OrderedDict()
        self.now = 0.0

    def gossip(self) -> GossipData | None:
        return None

    def on_gossip(self, payload: bytes) -> GossipData | None:
        key = (fnv64a(payload), payload)
        seen = self._seen.get(key)
        if seen is not None and self.now - seen < self._interval:
            return None
        self._seen[key] = self.now
        self._seen.move_to_end(key)
        while len(self._seen) > _MAX_REMEMBERED:
            self._seen.popitem(last=False)
        return RawGossip(payload)

    def on_gossip_broadcast(self, src: int, payload: bytes) -> GossipData | None:
        return RawGossip(payload)

    def on_gossip_unicast(self, src: int, payload: bytes) -> list[Action]:
        return []
