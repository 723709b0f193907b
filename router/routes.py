"""Route computation over a topology snapshot (weave-net.md §2.8), sans-IO.

Every peer runs the same breadth-first search with each layer sorted by peer name, so
peers with the same view of the topology compute consistent routes and broadcast trees.
Two flavours of every table: over connections that are established and symmetric (both
ends list each other as established) for data, and over all connections for gossip.

The links of each flavour are collected into sets once per snapshot, so the searches do
no per-link lookups; and one search from a broadcast's origin yields every peer's hops.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Protocol

from router.peername import UNKNOWN_PEER_NAME
from router.topology import Peer

# Gossip goes to min(FACTOR * log2(#peers), #neighbours) neighbours.
GOSSIP_FANOUT_FACTOR = 2

# Peer name -> the peers it has a usable connection to (see `usable_links`).
Links = Mapping[int, frozenset[int]]

_NO_LINKS: frozenset[int] = frozenset()


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


def usable_links(peers: Mapping[int, Peer], established_and_symmetric: bool) -> dict[int, frozenset[int]]:
    """`connected_peers` of every peer we hold an entry for, as sets.

    Built once per snapshot so that searches do no per-link lookups, and can find a
    peer's unreached neighbours with one set operation.
    """
    if not established_and_symmetric:
        return {name: frozenset(peer.connections) for name, peer in peers.items()}
    established = {
        name: {remote for remote, conn in peer.connections.items() if conn.established}
        for name, peer in peers.items()
    }
    return {name: _listing_back(peer.name, established[name], established) for name, peer in peers.items()}


def _listing_back(
    name: int, remotes: AbstractSet[int], established: Mapping[int, AbstractSet[int]]
) -> frozenset[int]:
    """Those of `remotes` that list an established connection to `name`."""
    return frozenset([remote for remote in remotes if name in established.get(remote, _NO_LINKS)])


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
    return _next_hops(peers, usable_links(peers, established_and_symmetric), start, stop_at)


def _next_hops(
    peers: Mapping[int, Peer], links: Links, start: int, stop_at: int | None = None
) -> tuple[bool, dict[int, int]]:
    """`bfs_routes` over `usable_links`."""
    routes: dict[int, int] = {start: UNKNOWN_PEER_NAME}
    layer = [start]
    while layer:
        following: list[int] = []
        for current in sorted(layer):
            if current == stop_at:
                return True, routes
            fresh = links.get(current, _NO_LINKS).difference(routes)
            if not fresh:
                continue
            # Entered in the order `current` lists them, as a search walking its
            # connections would: the table's iteration order stays the same too.
            found = [remote for remote in peers[current].connections if remote in fresh]
            if current == start:  # start's neighbours are their own next hops
                routes.update(zip(found, found, strict=True))
            else:
                routes.update(dict.fromkeys(found, routes[current]))
            following += found
        layer = following
    return False, routes


def broadcast_hops(
    peers: Mapping[int, Peer], ourself: int, origin: int, established_and_symmetric: bool
) -> list[int]:
    """Neighbours to pass a broadcast from `origin` on to, in name order.

    Run the origin's search until it reaches us: our neighbours it has not already
    reached are ours to serve. With a stable topology every peer gets each broadcast once.
    """
    links = usable_links(peers, established_and_symmetric)
    return _broadcast_tree(links, origin, stop_at=ourself).get(ourself, [])


def _broadcast_tree(links: Links, origin: int, stop_at: int | None = None) -> dict[int, list[int]]:
    """{peer: its `broadcast_hops` for `origin`} for every peer that has some.

    When the origin's search expands a peer, the neighbours it has not reached yet are
    exactly that peer's hops, so one search serves every peer (up to `stop_at`). A peer
    we hold no entry for has no links, which covers an unknown origin or peer.
    """
    children: dict[int, list[int]] = {}
    reached = {origin}
    layer = [origin]
    while layer:
        following: list[int] = []
        for current in sorted(layer):
            mine = links.get(current, _NO_LINKS)
            if not reached.issuperset(mine):  # cheaper than a difference that is mostly empty
                fresh = mine - reached
                children[current] = sorted(fresh)
                reached |= fresh
                following += fresh
            if current == stop_at:
                return children
        layer = following
    return children


class Routes:
    """All routing tables for one peer, computed from one snapshot of the topology.

    Both flavours of links are collected once; broadcast hops per origin, and for
    `broadcast_via` the origin's whole tree, are computed on first use and cached.
    """

    def __init__(self, ourself: int, peers: Mapping[int, Peer]) -> None:
        self._ourself = ourself
        self._links = {flavour: usable_links(peers, flavour) for flavour in (True, False)}
        self.unicast: Mapping[int, int] = _next_hops(peers, self._links[True], ourself)[1]
        self.unicast_all: Mapping[int, int] = _next_hops(peers, self._links[False], ourself)[1]
        self._broadcast: dict[tuple[int, bool], list[int]] = {}
        self._via: dict[int, dict[int, list[int]]] = {}

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
        tree = self._via.get(origin)
        if tree is None:
            tree = self._via[origin] = _broadcast_tree(self._links[True], origin)
        return tree.get(hop, [])

    def broadcast_all(self, origin: int) -> list[int]:
        """Where to send a gossip broadcast from `origin` (any link)."""
        return list(self._broadcast_hops(origin, False))

    def _broadcast_hops(self, origin: int, established_and_symmetric: bool) -> list[int]:
        key = (origin, established_and_symmetric)
        hops = self._broadcast.get(key)
        if hops is None:
            # The search can stop once it has expanded us.
            tree = _broadcast_tree(self._links[established_and_symmetric], origin, stop_at=self._ourself)
            hops = self._broadcast[key] = tree.get(self._ourself, [])
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
