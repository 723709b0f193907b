"""Forwarding decisions of the sleeve, sans-IO: which peers a frame goes to.

A learning switch over peers (weave-net.md §3.1): source MACs of frames read from the
TAP are ours, source MACs of frames received from a peer belong to the peer that
captured them. A known destination goes along the unicast route to its peer; broadcast,
multicast and unknown destinations go along our broadcast tree. A frame carries its
capturing peer (src) and final peer (dst); a flooded frame is addressed to each next hop,
which delivers it locally and passes it on along the capturing peer's broadcast tree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from router import ratelog

log = logging.getLogger(__name__)

MAC_EXPIRY = 600.0
# A /12 of containers fits with room to spare; each entry costs ~200 bytes.
MAX_REMOTE_MACS = 65536
MAX_LOCAL_MACS = 8192
SWEEP_INTERVAL = 1.0
STP_MAC = bytes.fromhex("0180c2000000")


class RouteTable(Protocol):
    def next_hop(self, dest: int) -> int | None: ...

    def broadcast(self, origin: int) -> list[int]: ...

    def broadcast_via(self, hop: int, origin: int) -> list[int]: ...


# (next hop, destination peer) pairs
Hops = list[tuple[int, int]]


class MacTable:
    """MAC -> peer, with expiry. Entries are refreshed by every frame they send.

    Bounded: source MACs come from frames anyone can make up (a container on our bridge,
    a peer, or on a plain sleeve whoever writes a known peer's name into a datagram), so
    remote and local MACs each have a ceiling. A new MAC over the ceiling is not learnt
    (counted in `refused`): frames to it are flooded, so they still arrive, and what was
    learnt earlier keeps working. A full table is swept for expired entries at most once
    a second, so a flood of new MACs costs no scan per frame.
    """

    def __init__(
        self, expiry: float = MAC_EXPIRY, max_remote: int = MAX_REMOTE_MACS, max_local: int = MAX_LOCAL_MACS
    ) -> None:
        self.expiry = expiry
        self.refused = 0
        self._limits = (max_remote, max_local)
        self._counts = [0, 0]  # remote, local
        # mac -> (peer, last seen, learnt from our bridge)
        self._macs: dict[bytes, tuple[int, float, bool]] = {}
        self._last_sweep = float("-inf")

    def learn(self, mac: bytes, peer: int, now: float, local: bool = False) -> int | None:
        """Record `mac` at `peer`; returns the peer it moved from, if it moved. A group
        address is never a source, so it is not learnt."""
        if mac[0] & 1:
            return None
        old = self._macs.get(mac)
        if old is None or old[2] != local:
            if self._counts[local] >= self._limits[local] and not self._make_room(local, now):
                self.refused += 1
                kind = "local" if local else "remote"
                ratelog.reject(
                    log, "sleeve", "mac_table_full", "sleeve: %s MAC table full (%d); not learning new ones",
                    kind, self._limits[local],
                )
                return None
            self._counts[local] += 1
            if old is not None:
                self._counts[old[2]] -= 1
        self._macs[mac] = (peer, now, local)
        if old is not None and old[0] != peer and now - old[1] <= self.expiry:
            return old[0]
        return None

    def _make_room(self, local: bool, now: float) -> bool:
        if now - self._last_sweep < SWEEP_INTERVAL:
            return False
        self._last_sweep = now
        self.expire(now)
        return self._counts[local] < self._limits[local]

    def lookup(self, mac: bytes, now: float) -> int | None:
        entry = self._macs.get(mac)
        if entry is None or now - entry[1] > self.expiry:
            return None
        return entry[0]

    # These run on the control side while the data path threads learn: they iterate over
    # a snapshot (list() of a dict's items is one step under the GIL) and tolerate races.
    def forget_peer(self, peer: int) -> None:
        for mac, (owner, _, _) in list(self._macs.items()):
            if owner == peer:
                self._drop(mac)

    def expire(self, now: float) -> int:
        stale = [m for m, (_, seen, _) in list(self._macs.items()) if now - seen > self.expiry]
        for mac in stale:
            self._drop(mac)
        return len(stale)

    def _drop(self, mac: bytes) -> None:
        entry = self._macs.pop(mac, None)
        if entry is not None:
            self._counts[entry[2]] -= 1

    def __len__(self) -> int:
        return len(self._macs)


class Switch:
    """Decides where frames go. `routes` is read on every call, so the owner may swap it."""

    def __init__(self, ourself: int, routes: Callable[[], RouteTable], clock: Callable[[], float]) -> None:
        self.ourself = ourself
        self.macs = MacTable()
        self._routes = routes
        self._clock = clock
        self.moved = 0
        # Neighbours the kernel (fastdp) floods our bridge's broadcasts to by itself.
        self.kernel_peers: frozenset[int] = frozenset()

    def expire_macs(self) -> int:
        """Drop MACs unseen for MAC_EXPIRY (lookups already ignore them; this frees them)."""
        return self.macs.expire(self._clock())

    def _flood(self, origin: int, exclude: int | None = None) -> Hops:
        return [(hop, hop) for hop in self._routes().broadcast(origin) if hop != exclude]

    def _flood_local(self) -> Hops:
        """Our own broadcast: to each neighbour in our tree, except that a neighbour the
        kernel reaches gets nothing from us; its children in the tree get a copy each,
        addressed to them (relayed, not delivered, on the way), and pass it on."""
        kernel = self.kernel_peers
        if not kernel:
            return self._flood(self.ourself)
        routes = self._routes()
        out: Hops = []
        for hop in routes.broadcast(self.ourself):
            if hop not in kernel:
                out.append((hop, hop))
                continue
            for child in routes.broadcast_via(hop, self.ourself):
                via = routes.next_hop(child)
                if via:
                    out.append((via, child))
        return out

    def from_local(self, frame: bytes | memoryview) -> Hops:
        """A frame captured from our bridge: the (next hop, destination peer) to send it to."""
        now = self._clock()
        dst_mac = bytes(frame[0:6])
        self.macs.learn(bytes(frame[6:12]), self.ourself, now, local=True)
        if dst_mac[0] & 1:
            if dst_mac == STP_MAC:
                return []
            return self._flood_local()
        peer = self.macs.lookup(dst_mac, now)
        if peer is None:
            return self._flood_local()
        if peer == self.ourself:
            return []  # the bridge delivers it; we saw it because the bridge flooded it
        hop = self._routes().next_hop(peer)
        return [(hop, peer)] if hop else []

    def from_peer(self, sender: int, src: int, dst: int, frame: bytes | memoryview) -> tuple[bool, Hops]:
        """A frame received from neighbour `sender`, captured at `src` for `dst`.

        Returns (deliver to our bridge, where to relay it).
        """
        now = self._clock()
        if src != self.ourself:
            moved_from = self.macs.learn(bytes(frame[6:12]), src, now)
            if moved_from is not None:
                self.moved += 1
                mac = bytes(frame[6:12]).hex(":")
                log.debug("sleeve: MAC %s moved from peer %x to %x", mac, moved_from, src)
        if dst != self.ourself:
            hop = self._routes().next_hop(dst)
            return False, ([(hop, dst)] if hop and hop != sender else [])
        dst_mac = bytes(frame[0:6])
        if not dst_mac[0] & 1 and self.macs.lookup(dst_mac, now) == self.ourself:
            return True, []
        # Broadcast, multicast, or a destination its capturer did not know: deliver here
        # and pass on along the capturer's broadcast tree.
        return True, self._flood(src, exclude=sender)
