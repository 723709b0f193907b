"""Unicast and broadcast routes over a topology snapshot (weave-net.md §2.8)."""

from __future__ import annotations

import math
import random
from collections import Counter, deque

from hypothesis import given, settings
from hypothesis import strategies as st

from router.routes import GOSSIP_FANOUT_FACTOR, Routes, bfs_routes, broadcast_hops, random_neighbours
from router.topology import ConnectionSummary, Peer, Peers, PeerSummary

A, B, C, D, E = (0x02_00_00_00_00_00 + i for i in range(1, 6))


def topology(links: dict[int, dict[int, bool]]) -> dict[int, Peer]:
    """{peer: {remote: established}} -> peers, every listed peer with an entry."""
    names = set(links) | {r for conns in links.values() for r in conns}
    return {
        n: Peer(
            n,
            f"p{n & 0xFF}",
            100 + (n & 0xFF),
            1,
            connections={r: ConnectionSummary(r, "", False, est) for r, est in links.get(n, {}).items()},
        )
        for n in names
    }


def symmetric(edges: list[tuple[int, int]], established: bool = True) -> dict[int, dict[int, bool]]:
    links: dict[int, dict[int, bool]] = {}
    for a, b in edges:
        links.setdefault(a, {})[b] = established
        links.setdefault(b, {})[a] = established
    return links


def test_line_routes_via_the_middle() -> None:
    peers = topology(symmetric([(A, B), (B, C)]))
    routes = Routes(A, peers)
    assert dict(routes.unicast) == {A: 0, B: B, C: B}
    assert dict(routes.unicast_all) == {A: 0, B: B, C: B}
    assert routes.next_hop(C) == B
    assert routes.next_hop(D) is None
    assert Routes(C, peers).next_hop(A) == B
    assert Routes(B, peers).next_hop(A) == A


def test_line_broadcast_tree() -> None:
    peers = topology(symmetric([(A, B), (B, C)]))
    assert Routes(A, peers).broadcast(A) == [B]
    assert Routes(B, peers).broadcast(A) == [C]
    assert Routes(C, peers).broadcast(A) == []
    assert Routes(B, peers).broadcast(B) == [A, C]
    assert Routes(B, peers).broadcast(D) == []  # unknown origin


def test_asymmetric_link_is_only_in_unicast_all() -> None:
    links = symmetric([(A, B)])
    links[B][C] = True  # C does not list B
    links[C] = {}
    routes = Routes(A, topology(links))
    assert C not in routes.unicast
    assert routes.next_hop_all(C) == B
    assert Routes(B, topology(links)).broadcast(B) == [A]
    assert Routes(B, topology(links)).broadcast_all(B) == [A, C]


def test_link_must_be_established_at_both_ends() -> None:
    for est_ab, est_ba in ((False, True), (True, False), (False, False)):
        links = {A: {B: est_ab}, B: {A: est_ba}}
        routes = Routes(A, topology(links))
        assert dict(routes.unicast) == {A: 0}, (est_ab, est_ba)
        assert dict(routes.unicast_all) == {A: 0, B: B}
        assert routes.broadcast(A) == []
        assert routes.broadcast_all(A) == [B]


def test_connection_to_an_unknown_peer_counts_only_for_all_routes() -> None:
    peers = topology(symmetric([(A, B)]))
    peers[B] = Peer(B, connections={A: ConnectionSummary(A, established=True), E: ConnectionSummary(E)})
    assert E not in peers
    routes = Routes(A, peers)
    assert routes.next_hop_all(E) == B
    assert routes.next_hop(E) is None


def test_equal_length_paths_go_via_the_lowest_name() -> None:
    # A-C, A-B, C-D, B-D: D is two hops away either way; B < C wins, whatever the
    # order connections were listed in.
    links = {A: {C: True, B: True}, B: {D: True, A: True}, C: {A: True, D: True}, D: {C: True, B: True}}
    assert Routes(A, topology(links)).next_hop(D) == B
    assert Routes(D, topology(links)).next_hop(A) == B


def test_bfs_stop_at_reports_what_was_reached() -> None:
    peers = topology(symmetric([(A, B), (A, C), (B, D), (C, D)]))
    found, reached = bfs_routes(peers, A, True, stop_at=C)
    assert found
    assert set(reached) == {A, B, C, D}  # B is expanded before C
    assert broadcast_hops(peers, C, A, True) == []
    assert broadcast_hops(peers, B, A, True) == [D]
    found, _ = bfs_routes(peers, A, True, stop_at=E)
    assert not found


def test_routes_compute_from_a_peers_model() -> None:
    model = Peers(A, "a", 1, 1, rng=random.Random(0))
    model.register_remote(B, "b", 2, 2)
    model.add_connection(B, "10.0.0.2:6783", outbound=True, established=True)
    model.apply_update([(PeerSummary(B, "b", 2, 3), [ConnectionSummary(A, established=True)])])
    routes = Routes.compute(model)
    assert routes.ourself == A
    assert routes.next_hop(B) == B


# ---------------------------------------------------------------- properties


@st.composite
def graphs(draw: st.DrawFn, connected: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    n = draw(st.integers(1, 12))
    names = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    edges = set()
    if connected:
        edges |= {(names[draw(st.integers(0, i - 1))], names[i]) for i in range(1, n)}
    pairs = st.tuples(st.sampled_from(names), st.sampled_from(names))
    edges |= {(a, b) for a, b in draw(st.lists(pairs, max_size=2 * n)) if a != b}
    return names, sorted(edges)


def components(names: list[int], edges: list[tuple[int, int]]) -> dict[int, set[int]]:
    adj: dict[int, set[int]] = {n: set() for n in names}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    out: dict[int, set[int]] = {}
    for n in names:
        if n in out:
            continue
        seen, todo = {n}, [n]
        while todo:
            for m in adj[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        for m in seen:
            out[m] = seen
    return out


def deliveries(all_routes: dict[int, Routes], origin: int, use_all: bool) -> Counter[int]:
    """Flood one broadcast from `origin`: every peer forwards it along its own tree."""
    received: Counter[int] = Counter()
    todo = deque([origin])
    while todo:
        at = todo.popleft()
        hops = all_routes[at].broadcast_all(origin) if use_all else all_routes[at].broadcast(origin)
        for hop in hops:
            received[hop] += 1
            assert received[hop] <= 1, f"{hop} got the broadcast from {origin} twice"
            todo.append(hop)
    return received


@given(graphs(connected=False), st.data())
@settings(max_examples=150, deadline=None)
def test_broadcast_reaches_each_peer_exactly_once(graph: tuple, data: st.DataObject) -> None:
    names, directed_edges = graph
    edges = sorted({(min(a, b), max(a, b)) for a, b in directed_edges})
    # Non-established links split the data graph; broadcast_all still uses them.
    unestablished = data.draw(st.sets(st.sampled_from(edges))) if edges else set()
    links = symmetric([e for e in edges if e not in unestablished])
    for a, b in unestablished:
        links.setdefault(a, {})[b] = False
        links.setdefault(b, {})[a] = False
    peers = topology(links)
    for n in names:
        peers.setdefault(n, Peer(n, uid=1))
    all_routes = {n: Routes(n, peers) for n in names}
    data_parts = components(names, [e for e in edges if e not in unestablished])
    any_parts = components(names, edges)
    for origin in names:
        got = deliveries(all_routes, origin, use_all=False)
        assert set(got) == data_parts[origin] - {origin}
        got_all = deliveries(all_routes, origin, use_all=True)
        assert set(got_all) == any_parts[origin] - {origin}


def bfs_distances(links: dict[int, dict[int, bool]], start: int) -> dict[int, int]:
    dist = {start: 0}
    todo = deque([start])
    while todo:
        at = todo.popleft()
        for nxt in links.get(at, {}):
            if nxt not in dist:
                dist[nxt] = dist[at] + 1
                todo.append(nxt)
    return dist


@given(graphs(connected=False), st.booleans())
@settings(max_examples=150, deadline=None)
def test_all_peers_agree_on_unicast_paths(graph: tuple, directed: bool) -> None:
    """Following each peer's own next hop leads to the destination along a shortest path."""
    names, edges = graph
    if directed:  # some connections listed by one end only: only unicast_all can use them
        links: dict[int, dict[int, bool]] = {}
        for a, b in edges:
            links.setdefault(a, {})[b] = True
    else:
        links = symmetric(edges)
    peers = topology(links)
    for n in names:
        peers.setdefault(n, Peer(n, uid=1))
    all_routes = {n: Routes(n, peers) for n in names}
    symmetric_links = {a: {b: True for b in bs if a in links.get(b, {})} for a, bs in links.items()}
    for src in names:
        for table, graph_links in (("unicast", symmetric_links), ("unicast_all", links)):
            dist = bfs_distances(graph_links, src)
            assert set(getattr(all_routes[src], table)) == set(dist)
            for dst in dist:
                at, hops = src, 0
                while at != dst:
                    at = getattr(all_routes[at], table)[dst]
                    hops += 1
                assert hops == dist[dst]


# ---------------------------------------------------------------- gossip fan-out


def star_with_a_tail(leaves: int, tail: int) -> dict[int, Peer]:
    """A has `leaves` direct neighbours 1..leaves; neighbour 1 leads on to a chain of `tail`."""
    edges = [(A, i) for i in range(1, leaves + 1)]
    chain = [1] + [1000 + i for i in range(tail)]
    edges += list(zip(chain, chain[1:], strict=False))
    return topology(symmetric(edges))


def test_random_neighbours_size_and_distinctness() -> None:
    peers = star_with_a_tail(20, 100)
    routes = Routes(A, peers)
    expected = min(int(GOSSIP_FANOUT_FACTOR * math.log2(len(routes.unicast_all))), 20)
    rng = random.Random(1)
    for _ in range(50):
        chosen = random_neighbours(routes, None, rng)
        assert len(chosen) == len(set(chosen)) == expected
        assert set(chosen) <= set(range(1, 21))


def test_random_neighbours_favours_bottleneck_links_and_skips_the_source() -> None:
    routes = Routes(A, star_with_a_tail(20, 100))
    rng = random.Random(2)
    picks: Counter[int] = Counter()
    trials = 300
    for _ in range(trials):
        chosen = routes.random_neighbours(5, rng)
        assert 5 not in chosen
        picks.update(chosen)
    assert picks[1] == trials  # 101 destinations behind it: (almost) always chosen
    assert max(picks[i] for i in range(2, 21)) < trials * 0.9


def test_random_neighbours_small_meshes() -> None:
    routes = Routes(A, topology(symmetric([(A, B)])))
    assert random_neighbours(routes, None, random.Random(0)) == [B]
    assert random_neighbours(routes, B, random.Random(0)) == []
    alone = Routes(A, {A: Peer(A, uid=1)})
    assert random_neighbours(alone, None, random.Random(0)) == []
