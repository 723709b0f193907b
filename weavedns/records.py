"""weaveDNS records: the gossiped CRDT of name -> address entries (sans-IO).

Every peer holds every entry of the mesh. An entry's identity is (hostname, origin,
container, address); only its origin peer changes it, by bumping `version` (deleting
sets `tombstone` to the time of deletion). Merging keeps, per identity, the entry with
the larger (version, tombstone) — a join, so merges commute, associate and are
idempotent. Entries that claim to come from us but disagree with what we hold are
overridden with our data at a higher version and re-broadcast (weave-net.md §6).

Thread model: all mutations happen on one thread (the daemon's trio thread). DNS
server threads only call `addresses`, `hostname_for` and read `version`, which use
single dict lookups on views that are replaced entry by entry; `version` is bumped
only after the views are updated, so a reader that saw the new version never caches
the old data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from router import ratelog
from router.gossip_api import Action, SendBroadcast
from router.peername import format_peer_name
from weavedns.wire import (
    TOMBSTONE_TIMEOUT,
    Entry,
    GossipMessage,
    Key,
    decode_gossip,
    encode_gossip,
)

log = logging.getLogger(__name__)

_K = TypeVar("_K")

# Bounds on what a peer's gossip may make us hold. Versions only ever grow by one per
# change, so no honest entry comes near MAX_VERSION; the headroom keeps our own
# increments (overriding a claimed entry, deleting) inside Go's int64, which gob must
# encode: an entry at 2**63 - 1 claiming to be ours once made every later gossip of the
# full state fail to encode.
MAX_VERSION = 1 << 62
MAX_TOMBSTONE = 1 << 62
# A hostname longer than a DNS name can never be looked up; container IDs are 64 hex
# digits in Docker and short in CNI.
MAX_HOSTNAME_BYTES = 255
MAX_CONTAINER_ID_BYTES = 1024
# Entries (tombstones included) held per origin peer: honest hosts hold a few hundred
# containers; the bound keeps one peer from filling our memory with made-up ones.
MAX_ENTRIES_PER_ORIGIN = 32768

__all__ = ["Nameserver", "NameserverGossip", "broadcast_actions", "supersedes", "merge_entries", "name_key"]


def supersedes(incoming: Entry, current: Entry) -> bool:
    """True if `incoming` replaces `current` (same identity): higher version, then tombstone."""
    return (incoming.version, incoming.tombstone) > (current.version, current.tombstone)


def merge_entries(base: Mapping[Key, Entry], incoming: Iterable[Entry]) -> dict[Key, Entry]:
    """The CRDT join of a set of entries with more entries (a new dict)."""
    out = dict(base)
    for e in incoming:
        cur = out.get(e.key)
        if cur is None or supersedes(e, cur):
            out[e.key] = e
    return out


def name_key(hostname: str) -> bytes:
    """Lookup key for a hostname: UTF-8 bytes, ASCII-lowercased (DNS case rules, RFC 4343)."""
    return hostname.encode("utf-8", "surrogateescape").lower()


def storage_order(e: Entry) -> tuple[bytes, int, bytes, int, bytes]:
    """Weave's storage order: case-insensitive hostname, origin, container, address."""
    host = e.hostname.encode("utf-8", "surrogateescape")
    return (host.lower(), e.origin, e.container_id.encode("utf-8", "surrogateescape"), e.addr, host)


class NameserverGossip:
    """GossipData for the "nameserver" channel: a timestamp and a set of entries."""

    __slots__ = ("timestamp", "_entries")

    def __init__(self, timestamp: int, entries: Iterable[Entry] | Mapping[Key, Entry] = ()) -> None:
        self.timestamp = timestamp
        if isinstance(entries, Mapping):
            self._entries: dict[Key, Entry] = dict(entries)
        else:
            self._entries = merge_entries({}, entries)

    @property
    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=storage_order)

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self) -> list[bytes]:
        return [encode_gossip(GossipMessage(self.timestamp, tuple(self._entries.values())))]

    def merge(self, other: object) -> NameserverGossip:
        if not isinstance(other, NameserverGossip):
            raise TypeError(f"cannot merge nameserver gossip with {type(other).__name__}")
        return NameserverGossip(
            max(self.timestamp, other.timestamp), merge_entries(self._entries, other._entries.values())
        )

    def __repr__(self) -> str:
        return f"NameserverGossip(timestamp={self.timestamp}, entries={self.entries!r})"


def broadcast_actions(*deltas: NameserverGossip | None) -> list[Action]:
    """Mesh actions that broadcast these deltas (None: nothing to send)."""
    return [SendBroadcast(p) for d in deltas if d is not None and len(d) for p in d.encode()]


class Nameserver:
    """All DNS entries of the mesh, as one peer (`our_name`) holds them.

    Implements router.gossip_api.Gossiper for channel "nameserver". Local changes
    (`add_entry`, `delete`, `container_died`) return the delta the daemon must
    broadcast (see `broadcast_actions`). Overrides of our own entries found while
    receiving gossip go to `on_broadcast` if given, else they are queued for
    `take_broadcasts()`. `clock` gives unix seconds (injected for tests).
    """

    def __init__(
        self,
        our_name: int,
        is_known_peer: Callable[[int], bool],
        clock: Callable[[], float] = time.time,
        on_broadcast: Callable[[NameserverGossip], None] | None = None,
    ) -> None:
        self.our_name = our_name
        self._is_known_peer = is_known_peer
        self._clock = clock
        self._on_broadcast = on_broadcast
        self._entries: dict[Key, Entry] = {}
        self._per_origin: dict[int, int] = {}
        self._name_keys: dict[bytes, set[Key]] = {}
        self._addr_keys: dict[int, set[Key]] = {}
        # Published views, read by server threads.
        self._names: dict[bytes, tuple[int, ...]] = {}
        self._reverse: dict[int, str] = {}
        self._version = 0
        self._outbox: list[NameserverGossip] = []

    # ------------------------------------------------------------ views

    @property
    def version(self) -> int:
        """Changes whenever what lookups return may have changed (for answer caches)."""
        return self._version

    def addresses(self, name: bytes) -> tuple[int, ...]:
        """Live addresses for a lowercased name (see `name_key`), in storage order."""
        return self._names.get(name, ())

    def hostname_for(self, addr: int) -> str | None:
        """Hostname of the first live entry with this address, or None."""
        return self._reverse.get(addr)

    def lookup(self, hostname: str) -> tuple[int, ...]:
        return self.addresses(name_key(hostname))

    def entries(self) -> list[Entry]:
        """Every entry, tombstones included, in storage order (for the HTTP API and /report)."""
        return sorted(self._entries.values(), key=storage_order)

    def local_live_count(self) -> int:
        """Live entries we originated (the weave_dns_entries metric)."""
        return sum(1 for e in self._entries.values() if e.origin == self.our_name and e.live)

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ local changes

    def _now(self) -> int:
        return int(self._clock())

    def add_entry(
        self, hostname: str, container_id: str, addr: int, origin: int | None = None
    ) -> NameserverGossip:
        """Register hostname -> addr; re-adding a deleted entry revives it at version+1."""
        origin = self.our_name if origin is None else origin
        entry = Entry(hostname, origin, container_id, addr)
        cur = self._entries.get(entry.key)
        if cur is None:
            self._apply([entry])
        elif not cur.live:
            entry = dataclasses.replace(cur, version=cur.version + 1, tombstone=0)
            self._apply([entry])
        else:
            entry = cur
        log.info("adding entry %s (origin %s)", entry, format_peer_name(origin))
        return NameserverGossip(self._now(), [entry])

    def delete(
        self, hostname: str | None = None, container_id: str | None = None, addr: int | None = None
    ) -> NameserverGossip | None:
        """Tombstone our live entries matching every given field (None = any)."""

        def matches(e: Entry) -> bool:
            return (
                (hostname is None or e.hostname == hostname)
                and (container_id is None or e.container_id == container_id)
                and (addr is None or e.addr == addr)
            )

        return self._tombstone(matches)

    def container_died(self, container_id: str) -> NameserverGossip | None:
        return self._tombstone(lambda e: e.container_id == container_id)

    def _tombstone(self, matches: Callable[[Entry], bool]) -> NameserverGossip | None:
        now = self._now()
        dead = [
            dataclasses.replace(e, version=e.version + 1, tombstone=now)
            for e in self._entries.values()
            if e.origin == self.our_name and e.live and matches(e)
        ]
        if not dead:
            return None
        for e in dead:
            log.info("tombstoning entry %s", e)
        self._apply(dead)
        return NameserverGossip(now, dead)

    def peer_gone(self, peer: int) -> int:
        """Forget every entry `peer` originated (it was garbage-collected from the mesh)."""
        keys = [k for k, e in self._entries.items() if e.origin == peer]
        if keys:
            log.info("peer %s gone: removing %d entries", format_peer_name(peer), len(keys))
            self._remove(keys)
        return len(keys)

    def purge_tombstones(self) -> int:
        """Drop tombstones older than TOMBSTONE_TIMEOUT; call periodically."""
        now = self._now()
        keys = [k for k, e in self._entries.items() if e.tombstone and now - e.tombstone > TOMBSTONE_TIMEOUT]
        if keys:
            self._remove(keys)
        return len(keys)

    def take_broadcasts(self) -> list[NameserverGossip]:
        """Overrides of our own entries found in received gossip, to broadcast."""
        out, self._outbox = self._outbox, []
        return out

    # ------------------------------------------------------------ Gossiper

    def gossip(self) -> NameserverGossip:
        # Weave sends its (possibly empty) full state on every periodic round.
        return NameserverGossip(self._now(), self._entries)

    def on_gossip(self, payload: bytes) -> NameserverGossip | None:
        _, _, changed = self._receive(payload)
        return NameserverGossip(self._now(), changed) if changed else None

    def on_gossip_broadcast(self, src: int, payload: bytes) -> NameserverGossip | None:
        # Weave relays what it received (filtered and overridden), not just what was new,
        # so peers further down the broadcast tree get it even if we already knew it.
        timestamp, received, _ = self._receive(payload)
        return NameserverGossip(timestamp, received) if received else None

    def on_gossip_unicast(self, src: int, payload: bytes) -> list[Action]:
        return []

    def _receive(self, payload: bytes) -> tuple[int, list[Entry], list[Entry]]:
        """Decode, filter, override and merge: (sender timestamp, accepted, changed)."""
        now = self._now()
        message = decode_gossip(payload, now)
        received: list[Entry] = []
        overrides: list[Entry] = []
        for e in message.entries:
            reason = self._refusal(e)
            if reason is not None:
                ratelog.reject(log, "dns", reason, "dropping nameserver gossip entry %.300r: %s", e,
                               _REFUSALS[reason])
                continue
            if e.origin == self.our_name:
                ours = self._entries.get(e.key)
                if ours is not None:
                    newer = ours.version < e.version
                    if newer or (ours.version == e.version and ours.tombstone != e.tombstone):
                        e = dataclasses.replace(ours, version=e.version + 1)
                        overrides.append(e)
                elif e.live:
                    # Someone holds an entry of ours we no longer know: delete it everywhere.
                    e = dataclasses.replace(e, version=e.version + 1, tombstone=now)
                    overrides.append(e)
            elif not self._is_known_peer(e.origin):
                ratelog.reject(log, "dns", "gossip_unknown_origin",
                               "dropping entry %.300r from unknown peer %012x",
                               e, e.origin, level=logging.DEBUG)
                continue
            received.append(e)
        changed = self._merge(received)
        if overrides:
            ratelog.reject(log, "dns", "gossip_claims_ours", "overriding %d entries that claim to be ours",
                           len(overrides), level=logging.INFO)
            data = NameserverGossip(now, overrides)
            if self._on_broadcast is not None:
                self._on_broadcast(data)
            else:
                self._outbox.append(data)
        return message.timestamp, received, changed

    def _refusal(self, e: Entry) -> str | None:
        """Why a received entry is dropped (a constant reason), or None to take it."""
        if not (0 <= e.version <= MAX_VERSION and 0 <= e.tombstone <= MAX_TOMBSTONE):
            return "gossip_entry_range"
        if len(name_key(e.hostname)) > MAX_HOSTNAME_BYTES or not e.hostname:
            return "gossip_entry_hostname"
        if len(e.container_id.encode("utf-8", "surrogateescape")) > MAX_CONTAINER_ID_BYTES:
            return "gossip_entry_container"
        if e.key not in self._entries and self._per_origin.get(e.origin, 0) >= MAX_ENTRIES_PER_ORIGIN:
            return "gossip_entry_limit"
        return None

    # ------------------------------------------------------------ storage

    def _merge(self, incoming: Iterable[Entry]) -> list[Entry]:
        changed = []
        for e in incoming:
            cur = self._entries.get(e.key)
            if cur is None or supersedes(e, cur):
                changed.append(e)
        if changed:
            self._apply(changed)
        return changed

    def _apply(self, entries: list[Entry]) -> None:
        names: set[bytes] = set()
        addrs: set[int] = set()
        for e in entries:
            if e.key not in self._entries:
                self._per_origin[e.origin] = self._per_origin.get(e.origin, 0) + 1
            self._entries[e.key] = e
            n = name_key(e.hostname)
            self._name_keys.setdefault(n, set()).add(e.key)
            self._addr_keys.setdefault(e.addr, set()).add(e.key)
            names.add(n)
            addrs.add(e.addr)
        self._republish(names, addrs)

    def _remove(self, keys: list[Key]) -> None:
        names: set[bytes] = set()
        addrs: set[int] = set()
        for k in keys:
            e = self._entries.pop(k)
            left = self._per_origin[e.origin] - 1
            if left:
                self._per_origin[e.origin] = left
            else:
                del self._per_origin[e.origin]
            n = name_key(e.hostname)
            _discard(self._name_keys, n, k)
            _discard(self._addr_keys, e.addr, k)
            names.add(n)
            addrs.add(e.addr)
        self._republish(names, addrs)

    def _republish(self, names: set[bytes], addrs: set[int]) -> None:
        for n in names:
            live = sorted(
                (e for k in self._name_keys.get(n, ()) if (e := self._entries[k]).live), key=storage_order
            )
            found = tuple(dict.fromkeys(e.addr for e in live))
            if found:
                self._names[n] = found
            else:
                self._names.pop(n, None)
        for a in addrs:
            live = [e for k in self._addr_keys.get(a, ()) if (e := self._entries[k]).live]
            if live:
                self._reverse[a] = min(live, key=storage_order).hostname
            else:
                self._reverse.pop(a, None)
        self._version += 1


_REFUSALS = {
    "gossip_entry_range": "version or tombstone out of range",
    "gossip_entry_hostname": "hostname empty or longer than a DNS name",
    "gossip_entry_container": "container ID too long",
    "gossip_entry_limit": f"its origin already has {MAX_ENTRIES_PER_ORIGIN} entries",
}


def _discard(index: dict[_K, set[Key]], bucket_key: _K, key: Key) -> None:
    bucket = index[bucket_key]
    bucket.discard(key)
    if not bucket:
        del index[bucket_key]
