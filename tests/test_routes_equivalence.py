"""Routes computed over collected links agree exactly with the plain search they replaced.

The reference below is the straightforward algorithm (one search per table, links checked
through the peers mapping as the search walks them), kept verbatim as the oracle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from router.peername import UNKNOWN_PEER_NAME
from router.routes import Routes, bfs_routes, broadcast_hops, connected_peers, usable_links
from router.topology import ConnectionSummary, Peer

FLAVOURS = (True, False)


# ---------------------------------------------------------------- reference


def ref_connected_peers(
    peers: Mapping[int, Peer], peer: Peer, established_and_symmetric: bool
) -> Iterator[int]:
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


def ref_bfs_routes(
    peers: Mapping[int, Peer], start: int, established_and_symmetric: bool, stop_at: int | None = None
) -> tuple[bool, dict[int, int]]:
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
            for remote in ref_connected_peers(peers, peer, established_and_symmetric):
                if remote in routes:
                    continue
                routes[remote] = remote if current == start else routes[current]
                following.append(remote)
        layer = following
    return False, routes


def ref_broadcast_hops(
    peers: Mapping[int, Peer], ourself: int, origin: int, established_and_symmetric: bool
) -> list[int]:
    if origin not in peers:
        return []
    found, reached = ref_bfs_routes(peers, origin, established_and_symmetric, stop_at=ourself)
    me = peers.get(ourself)
    if not found or me is None:
        return []
    return sorted(n for n in ref_connected_peers(peers, me, established_and_symmetric) if n not in reached)


# ---------------------------------------------------------------- topologies


@st.composite
def topologies(draw: st.DrawFn) -> tuple[dict[int, Peer], list[int]]:
    """Random peers, each listing a random subset (in random order) of the known and some
    unknown peers, itself included now and then, each connection established or not; so
    links are often one-sided or established at one end only. Returns the peers and every
    name worth asking about (known, unknown, and one nobody mentions)."""
    names = draw(st.lists(st.integers(1, 60), min_size=1, max_size=14, unique=True))
    known = names[: max(1, len(names) - draw(st.integers(0, 3)))]  # the rest are unknown
    # Mostly mutual established links, so that the symmetric flavour has something to find.
    dense = draw(st.booleans())
    peers: dict[int, Peer] = {}
    for name in known:
        remotes = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
        conns = {r: ConnectionSummary(r, established=draw(st.booleans()) or dense) for r in remotes}
        peers[name] = Peer(name, uid=1, connections=conns)
    if dense:
        for name, peer in list(peers.items()):
            extra = {
                other: ConnectionSummary(other, established=True)
                for other, their in peers.items()
                if name in their.connections and other not in peer.connections and draw(st.booleans())
            }
            peers[name] = Peer(name, uid=1, connections={**peer.connections, **extra})
    absent = max(names) + 1
    return peers, [*names, absent]


@given(topologies())
@settings(max_examples=300, deadline=None)
def test_routes_match_the_reference(topology: tuple[dict[int, Peer], list[int]]) -> None:
    peers, names = topology
    via = {(hop, origin): ref_broadcast_hops(peers, hop, origin, True) for origin in names for hop in names}
    for ourself in names:
        routes = Routes(ourself, peers)
        # Same tables, in the same order.
        assert list(routes.unicast.items()) == list(ref_bfs_routes(peers, ourself, True)[1].items())
        assert list(routes.unicast_all.items()) == list(ref_bfs_routes(peers, ourself, False)[1].items())
        for origin in names:
            assert routes.broadcast(origin) == via[ourself, origin]
            assert routes.broadcast_all(origin) == ref_broadcast_hops(peers, ourself, origin, False)
            for hop in names:
                assert routes.broadcast_via(hop, origin) == via[hop, origin]
        # Cached answers are copies where they always were.
        for origin in names:
            routes.broadcast(origin).append(-1)
            routes.broadcast_all(origin).append(-1)
            assert routes.broadcast(origin) == via[ourself, origin]


@given(topologies())
@settings(max_examples=200, deadline=None)
def test_module_functions_match_the_reference(topology: tuple[dict[int, Peer], list[int]]) -> None:
    peers, names = topology
    for flavour in FLAVOURS:
        links = usable_links(peers, flavour)
        assert set(links) == set(peers)
        for peer in peers.values():
            expected = list(ref_connected_peers(peers, peer, flavour))
            assert list(connected_peers(peers, peer, flavour)) == expected
            assert links[peer.name] == set(expected)
        for start in names:
            for stop_at in (None, *names):
                found, table = bfs_routes(peers, start, flavour, stop_at)
                ref_found, ref_table = ref_bfs_routes(peers, start, flavour, stop_at)
                assert found == ref_found
                assert list(table.items()) == list(ref_table.items())
            for ourself in names:
                assert broadcast_hops(peers, ourself, start, flavour) == ref_broadcast_hops(
                    peers, ourself, start, flavour
                )


def test_broadcasts_come_from_the_snapshot_given() -> None:
    a, b, c = 1, 2, 3
    link = ConnectionSummary
    peers = {
        a: Peer(a, uid=1, connections={b: link(b, established=True)}),
        b: Peer(b, uid=1, connections={a: link(a, established=True), c: link(c, established=True)}),
        c: Peer(c, uid=1, connections={b: link(b, established=True)}),
    }
    routes = Routes(b, peers)
    peers.clear()  # the caller's mapping changes; the routes do not
    assert routes.broadcast(a) == [c]
    assert routes.broadcast_all(c) == [a]
    assert routes.broadcast_via(b, a) == [c]
    assert routes.next_hop(c) == c
