"""Gossip channels this router has no application for ("surrogates").

A Weave mesh may carry channels we don't implement; we must still pass them on so
Weave's own applications keep working across pyweave peers. Identical periodic gossip
seen within one gossip interval is passed on only once, or it would circulate forever
(mesh's surrogateGossiper: FNV-64a of the payload plus a byte comparison; here a 128-bit
BLAKE2b digest stands for the bytes, so what is remembered has a fixed size however big
the payload). Broadcasts are always passed on (the broadcast tree already delivers each
one once); unicasts addressed to us are dropped. Neither needs any state here.

One deliberate difference from mesh: Go forgets old payloads only when a new one
arrives, so a payload repeated after a quiet spell longer than the interval is still
suppressed there; here it is passed on again once the interval has passed.

Channel names come from peers, so the state they create is bounded and expires
(:class:`SurrogateTable`). Mesh keeps one surrogate per channel name for all
connections, which let one stranger fill its table; here each channel a connection
carries is charged to that connection (for relayed gossip: the connection it arrived
on, not the peer that made it up), at most MAX_CHANNELS_PER_CONNECTION of them. Gossip
on one more is dropped and counted, and the connection stays up: it may only be relaying
someone else's names. A charge lapses when its connection carries no gossip on that
channel for QUIET_INTERVALS gossip intervals (a live Weave application gossips every
interval, so its slot is kept), or when the connection closes; a channel no connection
is charged for is forgotten with what it remembered. The de-duplication state of a
channel is shared by the connections charged for it, as gossip that comes back over
another connection must still be recognised.

What this cannot prevent: neighbour gossip is passed on in the relaying router's name,
so the names a stranger makes up count against the budget of each honest connection
they are relayed over. Such a link may then refuse channels new to it (dropped and
counted) until the stranger stops and its names expire; it keeps the channels it already
carries (they are refreshed), channels this router implements are never affected, and
broadcasts and unicasts of unknown channels are always relayed.

Worst case, with the defaults: each channel remembers at most _MAX_REMEMBERED (256)
digests of about 150 bytes each (digest, time and OrderedDict entry, measured on
CPython 3.11), under 40 KiB, and a name of at most MAX_CHANNEL_NAME (256) characters;
each connection is charged for at most 16 channels, so under 0.7 MiB per connection;
with the mesh's connection limit (200 by default) at most 3200 channels, about 125 MiB,
which takes 200 authenticated connections all flooding made-up names and payloads. Relayed
gossip waiting for a slow neighbour is bounded too, per channel (RawGossip.merge: the
newest _MAX_PENDING payloads within _MAX_PENDING_BYTES, or the newest alone if larger).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from router import ratelog
from router.gossip_api import Action, GossipData

log = logging.getLogger(__name__)

# Payload digests remembered per channel for de-duplication. More distinct payloads
# than this within one interval only means an old duplicate may be passed on again
# (the neighbours still recognise it).
_MAX_REMEMBERED = 256
# Relayed gossip waiting for one neighbour, per channel (see RawGossip.merge).
_MAX_PENDING = 64
_MAX_PENDING_BYTES = 1 << 20
MAX_CHANNELS_PER_CONNECTION = 16
QUIET_INTERVALS = 3
MAX_CHANNEL_NAME = 256


def payload_digest(data: bytes) -> bytes:
    """What stands for a payload in the de-duplication memory: fixed size, and no one
    can make two payloads that share it (mesh's FNV-64a needs the bytes kept as well,
    and costs a Python loop per byte here)."""
    return hashlib.blake2b(data, digest_size=16).digest()


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
        """Both, in order: opaque messages cannot be combined (mesh keeps them all).

        This is what waits for a neighbour that is slow to take it, so only the newest
        _MAX_PENDING payloads, _MAX_PENDING_BYTES together, are kept (the newest one
        always); the rest are dropped and counted, as a full send queue drops."""
        assert isinstance(other, RawGossip)
        payloads = self.payloads + other.payloads
        keep, size = 0, 0
        for payload in reversed(payloads):
            if keep and (keep == _MAX_PENDING or size + len(payload) > _MAX_PENDING_BYTES):
                break
            keep += 1
            size += len(payload)
        if keep < len(payloads):
            ratelog.reject(
                log, "gossip", "relay_backlog",
                "dropping %d relayed gossip messages a slow neighbour has not taken yet",
                len(payloads) - keep,
            )
            payloads = payloads[-keep:]
        return RawGossip(payloads)


class SurrogateGossiper:
    """The application behind a channel we don't know. `now` is the clock: the mesh
    sets it before each call (sans-IO), or pass `clock` to have it read on each call."""

    def __init__(self, interval: float, clock: Callable[[], float] | None = None) -> None:
        self._interval = interval
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._clock = clock
        self.now = 0.0

    def gossip(self) -> GossipData | None:
        return None

    def on_gossip(self, payload: bytes) -> GossipData | None:
        now = self._clock() if self._clock is not None else self.now
        payload = bytes(payload)
        key = payload_digest(payload)
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


class SurrogateTable:
    """The surrogates of unknown channels, each charged to the connections that carry
    its gossip (see the module docstring). Sans-IO: `now` is passed in; a connection is
    any hashable the caller uses for it."""

    def __init__(
        self,
        interval: float,
        per_connection: int = MAX_CHANNELS_PER_CONNECTION,
        quiet: float | None = None,
    ) -> None:
        self.interval = interval
        self.per_connection = per_connection
        self.quiet = QUIET_INTERVALS * interval if quiet is None else quiet
        self._gossipers: dict[str, SurrogateGossiper] = {}
        # (connection, channel) -> when that connection last carried gossip on it,
        # least recently first, so expiry only looks at the front.
        self._charges: OrderedDict[tuple[Hashable, str], float] = OrderedDict()
        self._by_connection: dict[Hashable, set[str]] = {}
        self._holders: dict[str, int] = {}

    def gossiper(self, conn: Hashable, channel: str, now: float) -> SurrogateGossiper | None:
        """The surrogate for gossip on `channel` that arrived on `conn`, charging `conn`
        for it; None if `conn` is already charged for as many channels as it may be, or
        the name is too long to keep: the caller drops the gossip."""
        self.expire(now)
        key = (conn, channel)
        if key in self._charges:
            self._charges[key] = now
            self._charges.move_to_end(key)
        else:
            names = self._by_connection.get(conn)
            if len(channel) > MAX_CHANNEL_NAME or (names is not None and len(names) >= self.per_connection):
                return None
            self._charges[key] = now
            self._by_connection.setdefault(conn, set()).add(channel)
            self._holders[channel] = self._holders.get(channel, 0) + 1
        gossiper = self._gossipers.get(channel)
        if gossiper is None:
            gossiper = self._gossipers[channel] = SurrogateGossiper(self.interval)
        gossiper.now = now
        return gossiper

    def expire(self, now: float) -> None:
        """Lapse every charge whose connection has been quiet on its channel too long."""
        while self._charges:
            (conn, channel), last = next(iter(self._charges.items()))
            if now - last < self.quiet:
                break
            self._release(conn, channel)

    def forget(self, conn: Hashable) -> None:
        """`conn` closed: lapse all its charges."""
        for channel in list(self._by_connection.get(conn, ())):
            self._release(conn, channel)

    def _release(self, conn: Hashable, channel: str) -> None:
        del self._charges[(conn, channel)]
        names = self._by_connection[conn]
        names.discard(channel)
        if not names:
            del self._by_connection[conn]
        holders = self._holders[channel] - 1
        if holders:
            self._holders[channel] = holders
        else:
            del self._holders[channel]
            del self._gossipers[channel]

    def channels(self) -> set[str]:
        """The unknown channels currently relayed."""
        return set(self._gossipers)

    def charged(self, conn: Hashable) -> set[str]:
        """The channels `conn` is charged for."""
        return set(self._by_connection.get(conn, ()))

    def charges(self) -> int:
        """(connection, channel) pairs held."""
        return len(self._charges)

    def remembered(self) -> int:
        """Payload digests held, over all channels."""
        return sum(g.remembered() for g in self._gossipers.values())

    def __contains__(self, channel: object) -> bool:
        return channel in self._gossipers

    def __len__(self) -> int:
        return len(self._gossipers)
