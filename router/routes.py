"""Route computation over a topology snapshot (weave-net.md §2.8), sans-IO.

Every peer runs the same breadth-first search with each layer sorted by peer name, so
peers with the same view of the topology compute consistent routes and broadcast trees.
Two flavours of every table: over connections that are established and symmetric (both
ends list each other as established) for data, and over all connections for gossip.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Protocol

from router.peername import UNKNOWN_PEER_NAME
from router.topology import Peer

# Gossip goes to min(FACTOR * log2(#peers), #neighbours) neighbours.
GOSSIP_FANOUT_FACTOR = 2


class TopologyView(Protocol):
    """What route computation reads: our name and every peer by name (e.g. a `Peers`)."""

    @property
    def name(self) -> int: ...

    @property
    def by_name(self) -> Mapping[int, Peer]: ...


def connected_peers(peers: Mapping[int, Peer], peer: Peer, established_and_symmetric: bool) -> Iterator[int]:
    """Names of the peers `peer` has a usable connection to.

    With `established_and_symmetric` a link counts only if `peer` lists it as established
    and the remote lists an established connection back; otherwise any listed connection
    counts, even to a peer we hold no entry for.
    """
    for remote_name, conn in peer.connections.items():
        if not established_and_symmetric:
            yield remote_name
            continue
        if not conn.established:
            continue
        remote = peers.get(remote_name)
        back = remote.connections.get(peer.name) if remote is not None else None
        if back is not None and back.established:
            yield remote_name


def bfs_routes(
    peers: Mapping[int, Peer],
    start: int,
    established_and_symmetric: bool,
    stop_at: int | None = None,
) -> tuple[bool, dict[int, int]]:
    """Next hops from `start`: {destination: neighbour of start}, with start -> 0.

    Each layer is expanded in name order, so a destination's next hop comes from the
    lowest-named peer of the previous layer that reaches it. With `stop_at`, the search
    ends when that peer's turn to be expanded comes; the flag says whether it did, and the
    table holds everything discovered up to then.
    """
    routes: dict[int, int] = {start: UNKNOWN_PEER_NAME}
    layer = [start]
    while layer:
        following: list[int] = []
        for current in sorted(layer):
            if current == stop_at:
                return True, routes
            peer = peers.get(current)
            if peer is None:
                continue
            for remote in connected_peers(peers, peer, established_and_symmetric):
                if remote in routes:
                    continue
                routes[remote] = remote if current == start else routes[current]
                following.append(remote)
        layer = following
    return False, routes


def broadcast_hops(
    peers: Mapping[int, Peer], ourself: int, origin: int, established_and_symmetric: bool
) -> list[int]:
    """Neighbours to pass a broadcast from `origin` on to, in name order.

    Run the origin's search until it reaches us: our neighbours it has not already
    reached are ours to serve. With a stable topology every peer gets each broadcast once.
    """
    if origin not in peers:
        return []
    found, reached = bfs_routes(peers, origin, established_and_symmetric, stop_at=ourself)
    me = peers.get(ourself)
    if not found or me is None:
        return []
    return sorted(n for n in connected_peers(peers, me, established_and_symmetric) if n not in reached)


class Routes:
    """All routing tables for one peer, computed from one snapshot of the topology.

    Broadcast hops are computed on first use per origin and cached.
    """

    def __init__(self, ourself: int, peers: Mapping[int, Peer]) -> None:
        self._ourself = ourself
        self._peers = dict(peers)
        self.unicast: Mapping[int, int] = bfs_routes(self._peers, ourself, True)[1]
        self.unicast_all: Mapping[int, int] = bfs_routes(self._peers, ourself, False)[1]
        self._broadcast: dict[tuple[int, bool], list[int]] = {}
        self._via: dict[tuple[int, int], list[int]] = {}

    @classmethod
    def compute(cls, view: TopologyView) -> Routes:
        return cls(view.name, view.by_name)

    @property
    def ourself(self) -> int:
        return self._ourself

    def next_hop(self, dest: int) -> int | None:
        """Next hop for data to `dest` (established and symmetric links); 0 for ourselves."""
        return self.unicast.get(dest)

    def next_hop_all(self, dest: int) -> int | None:
        """Next hop for gossip unicast to `dest` over any link; 0 for ourselves."""
        return self.unicast_all.get(dest)

    def broadcast(self, origin: int) -> list[int]:
        """Where to send a data broadcast from `origin` (established and symmetric links)."""
        return list(self._broadcast_hops(origin, True))

    def broadcast_via(self, hop: int, origin: int) -> list[int]:
        """Where neighbour `hop` passes on a data broadcast from `origin`: its children in
        origin's tree (used when the hop itself is reached another way, e.g. the kernel)."""
        key = (origin, hop)
        hops = self._via.get(key)
        if hops is None:
            hops = broadcast_hops(self._peers, hop, origin, True)
            self._via[key] = hops
        return hops

    def broadcast_all(self, origin: int) -> list[int]:
        """Where to send a gossip broadcast from `origin` (any link)."""
        return list(self._broadcast_hops(origin, False))

    def _broadcast_hops(self, origin: int, established_and_symmetric: bool) -> list[int]:
        key = (origin, established_and_symmetric)
        hops = self._broadcast.get(key)
        if hops is None:
            hops = broadcast_hops(self._peers, self._ourself, origin, established_and_symmetric)
            self._broadcast[key] = hops
        return hops

    def random_neighbours(self, exclude: int | None, rng: random.Random) -> list[int]:
        return random_neighbours(self, exclude, rng)


def random_neighbours(routes: Routes, exclude: int | None, rng: random.Random) -> list[int]:
    """Distinct neighbours to gossip to, at most GOSSIP_FANOUT_FACTOR * log2(#reachable peers).

    Each is drawn with probability proportional to how many destinations it is the next
    hop for (over all links), so neighbours behind bottleneck links are favoured.
    `exclude` (the gossip's sender) is never chosen.
    """
    weights = Counter(hop for hop in routes.unicast_all.values() if hop not in (UNKNOWN_PEER_NAME, exclude))
    if not weights:
        return []
    count = min(int(GOSSIP_FANOUT_FACTOR * math.log2(len(routes.unicast_all))), len(weights))
    candidates = sorted(weights)
    chosen: list[int] = []
    for _ in range(count):
        pick = rng.choices(candidates, weights=[weights[c] for c in candidates])[0]
        chosen.append(pick)
        candidates.remove(pick)
    return chosen
