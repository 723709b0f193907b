"""Gossip channels this router has no application for ("surrogates").

A Weave mesh may carry channels we don't implement; we must still pass them on so
Weave's own applications keep working across pyweave peers. Identical periodic gossip
seen within one gossip interval is passed on only once, or it would circulate forever
(mesh's surrogateGossiper: FNV-64a of the payload plus a byte comparison). Broadcasts
are always passed on (the broadcast tree already delivers each one once); unicasts
addressed to us are dropped.

One deliberate difference from mesh: Go forgets old payloads only when a new one
arrives, so a payload repeated after a quiet spell longer than the interval is still
suppressed there; here it is passed on again once the interval has passed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
    """Opaque gossip passed on unchanged: one message per payload, in order."""

    payloads: tuple[bytes, ...]

    @classmethod
    def of(cls, payload: bytes) -> RawGossip:
        return cls((bytes(payload),))

    def encode(self) -> list[bytes]:
        return list(self.payloads)

    def merge(self, other: GossipData) -> GossipData:
        # Opaque messages cannot be combined: keep them all (mesh does the same).
        assert isinstance(other, RawGossip)
        return RawGossip(self.payloads + other.payloads)


class SurrogateGossiper:
    """The application behind a channel we don't know. `now` is the clock: the mesh
    sets it before each call (sans-IO), or pass `clock` to have it read on each call."""

    def __init__(self, interval: float, clock: Callable[[], float] | None = None) -> None:
        self._interval = interval
        self._seen: OrderedDict[tuple[int, bytes], float] = OrderedDict()
        self._clock = clock
        self.now = 0.0

    def gossip(self) -> GossipData | None:
        return None

    def on_gossip(self, payload: bytes) -> GossipData | None:
        now = self._clock() if self._clock is not None else self.now
        payload = bytes(payload)
        key = (fnv64a(payload), payload)
        seen = self._seen.get(key)
        if seen is not None and now - seen < self._interval:
            return None
        self._seen[key] = now
        self._seen.move_to_end(key)
        # Oldest first: forget what is older than the interval, and never hold too much.
        while self._seen:
            oldest_key, oldest = next(iter(self._seen.items()))
            if len(self._seen) <= _MAX_REMEMBERED and now - oldest < self._interval:
                break
            del self._seen[oldest_key]
        return RawGossip.of(payload)

    def remembered(self) -> int:
        """How many recent payloads are held for de-duplication."""
        return len(self._seen)

    def on_gossip_broadcast(self, src: int, payload: bytes) -> GossipData | None:
        return RawGossip.of(payload)

    def on_gossip_unicast(self, src: int, payload: bytes) -> list[Action]:
        return []
