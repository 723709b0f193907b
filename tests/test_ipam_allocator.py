"""Allocator flows on an in-memory mesh: bootstrap modes, allocation, space requests,
claims, release, rmpeer, shutdown, seed conflicts, status and bad input."""

from __future__ import annotations

import random

import pytest

from ipam_crdt import wire
from ipam_crdt.address import CIDR, Range, ip_str, parse_ip
from ipam_crdt.allocator import (
    Allocated,
    AllocateFailed,
    Allocator,
    AllocatorConfig,
    Claimed,
    ClaimFailed,
    ConsensusMode,
    ObserverMode,
    PreClaim,
    Primed,
    SeedMode,
    parse_ipalloc_init,
)
from ipam_crdt.errors import DifferentRange, DifferentSeeds, InvalidRequest, IPAMWireError, NotFound
from ipam_crdt.ring import UNKNOWN_PEER
from ipam_crdt.store import MemoryStore
from ipam_crdt.testing import SimNetwork
from router.errors import WireError
from router.gossip_api import SendBroadcast, SendUnicast

UNIVERSE = CIDR.parse("10.40.0.0/16")
P1, P2, P3, P4 = 0x020000000001, 0x020000000002, 0x020000000003, 0x020000000004


def net_of(*names: int, mode: object = None, universe: CIDR = UNIVERSE, seed: int = 1) -> SimNetwork:
    net = SimNetwork(universe, random.Random(seed))
    for n in names:
        net.add_peer(n, mode or ConsensusMode(len(names)))  # type: ignore[arg-type]
    return net


def addr(cidr: CIDR | None) -> str:
    assert cidr is not None
    return ip_str(cidr.addr)


def single(**kw: object) -> Allocator:
    config = AllocatorConfig(P1, 1, UNIVERSE, **kw)  # type: ignore[arg-type]
    return Allocator(config)


# ------------------------------------------------------------------ configuration


def test_parse_ipalloc_init() -> None:
    assert parse_ipalloc_init("consensus=3") == ConsensusMode(3)
    assert parse_ipalloc_init("consensus", target_count=3).quorum == 3
    assert parse_ipalloc_init("observer") == ObserverMode()
    assert parse_ipalloc_init("seed=02:00:00:00:00:01,02:00:00:00:00:02") == SeedMode((P1, P2))
    for bad in ("consensus=0", "consensus=x", "seed=", "seed=zz:zz", "observer=1", "other"):
        with pytest.raises(InvalidRequest, match="--ipalloc-init"):
            parse_ipalloc_init(bad)


# ------------------------------------------------------------------ bootstrap modes


def test_consensus_forms_a_ring_on_first_allocation() -> None:
    net = net_of(P1, P2, P3)
    assert all(p.alloc.status_line() == "idle" for p in net.up())  # type: ignore[union-attr]
    r = net.allocate(P1, "c1")
    assert r.pending and any(isinstance(a, SendBroadcast) for a in r.actions)
    assert net.alloc(P1).status_line() == "awaiting consensus (quorum: 2, known: 1)"
    assert net.alloc(P1).report()["Paxos"] == {"Elector": True, "KnownNodes": 1, "Quorum": 2}
    net.deliver()
    [event] = net.peers[P1].events
    assert isinstance(event, Allocated) and addr(event.cidr) == "10.40.0.1" and event.ident == "c1"
    # Free counts travel with the next periodic gossip, as in Weave.
    net.gossip_round()
    net.deliver()
    states = {p.alloc.ring.state() for p in net.up()}  # type: ignore[union-attr]
    assert len(states) == 1 and all(p.alloc.status_line() == "ready" for p in net.up())  # type: ignore[union-attr]
    # Idempotent per ident (and subnet).
    assert addr(net.allocate(P1, "c1").cidr) == "10.40.0.1"
    assert addr(net.allocate(P1, "c2").cidr) == "10.40.0.2"
    assert not net.errors


def test_pending_allocation_is_not_duplicated() -> None:
    net = net_of(P1, P2, P3)
    first = net.allocate(P1, "c1")
    again = net.allocate(P1, "c1")
    assert first.pending and again.pending
    assert len(net.alloc(P1).pending_allocates) == 1


def test_seed_mode_builds_the_same_ring_everywhere() -> None:
    net = SimNetwork(UNIVERSE, random.Random(1))
    net.add_peer(P4)  # started without a seed: waits for IPAM data
    assert net.alloc(P4).ring.is_empty() and net.alloc(P4).status_line() == "idle"
    for p in (P1, P2, P3):  # every peer given the seed list builds the same ring, seeds or not
        net.add_peer(p, SeedMode((P2, P1)))
    assert len({net.alloc(p).ring.state() for p in (P1, P2, P3)}) == 1
    assert net.alloc(P1).ring.seeds == [P1, P2] and net.alloc(P3).ring.owned_ranges() == []
    assert addr(net.allocate(P2, "c").cidr) == "10.40.128.0"  # P2's half; 10.40.128.0 is a host address
    net.deliver()  # the start-up broadcasts
    assert net.alloc(P4).ring.entries == net.alloc(P1).ring.entries
    assert not net.errors


def test_observer_gets_the_ring_from_electors() -> None:
    net = SimNetwork(UNIVERSE, random.Random(3))
    net.add_peer(P1, ConsensusMode(1))
    net.add_peer(P2, ObserverMode())
    r = net.allocate(P2, "c")
    assert r.pending and net.alloc(P2).status_line() == "priming"
    assert net.alloc(P2).report()["Paxos"] == {"Elector": False, "KnownNodes": 0, "Quorum": 0}
    net.deliver()
    net.settle(3)
    [event] = net.peers[P2].events
    assert isinstance(event, Allocated)
    assert net.alloc(P2).ring.owned_ranges()  # it was given space by P1
    assert net.alloc(P1).ring.seeds == [P1]


def test_prime_waits_for_the_ring() -> None:
    net = net_of(P1, P2)
    done = net.call(P1, lambda a: a.prime(net.now))
    assert done[0] is False  # type: ignore[index]
    net.deliver()
    assert Primed() in net.peers[P1].events
    assert net.call(P1, lambda a: a.prime(net.now))[0] is True  # type: ignore[index]


# ------------------------------------------------------------------ space requests


def test_peer_without_space_asks_a_donor() -> None:
    net = net_of(P1, P2, P3)
    net.allocate(P1, "a")
    net.deliver()
    ring = net.alloc(P3).ring
    assert not ring.owned_ranges()  # P3 was not in the agreed value
    r = net.allocate(P3, "c3")
    [request] = [a for a in r.actions if isinstance(a, SendUnicast)]
    assert isinstance(wire.decode_unicast(request.payload), wire.SpaceRequest)
    net.deliver()
    [event] = net.peers[P3].events
    assert isinstance(event, Allocated)
    assert net.alloc(P3).space.owned_ranges()
    assert net.alloc(P3).status_line() == "ready"


def test_donor_with_nothing_left_denies_and_sends_its_ring() -> None:
    tiny = CIDR.parse("10.9.0.0/30")  # 4 addresses, 2 usable
    alloc = Allocator(AllocatorConfig(P1, 1, tiny, SeedMode((P1,))))
    assert addr(alloc.allocate("a", tiny).cidr) == "10.9.0.1"
    assert addr(alloc.allocate("b", tiny).cidr) == "10.9.0.2"
    assert alloc.allocate("c", tiny).pending
    # Free space: 10.9.0.0 and 10.9.0.3 are not host addresses but still ours to give.
    actions = alloc.on_gossip_unicast(P2, wire.encode_unicast(wire.SpaceRequest(Range(parse_ip("10.9.0.1"),
                                                                                       parse_ip("10.9.0.3")))))
    kinds = [type(wire.decode_unicast(a.payload)).__name__ for a in actions if isinstance(a, SendUnicast)]
    assert kinds == ["SpaceRequestDenied", "RingUpdate"]


def test_requests_ask_only_for_usable_addresses_so_exhaustion_is_quiet() -> None:
    tiny = CIDR.parse("10.9.0.0/29")  # 8 addresses, 6 usable
    net = SimNetwork(tiny, random.Random(2))
    for p in (P1, P2):
        net.add_peer(p, SeedMode((P1, P2)))
    got = [net.allocate(p, f"c{p}{i}") for p in (P1, P2) for i in range(3)]
    net.settle(2)
    assert all(r.cidr is not None for r in got)
    r = net.allocate(P1, "one-too-many")
    requests = [wire.decode_unicast(a.payload) for a in r.actions if isinstance(a, SendUnicast)]
    # We ask for the host addresses only (Weave would ask for the whole /29)...
    assert requests == [wire.SpaceRequest(tiny.host_range())]
    # ...so the donor, whose last free address is the broadcast one, says no, and the
    # unusable addresses are not passed back and forth for ever.
    net.settle(3, max_messages=200)
    assert net.alloc(P1).pending_allocates


def test_allocation_fails_after_a_bounded_time() -> None:
    net = net_of(P1, P2, P3)
    net.allocate(P1, "a")
    net.deliver()
    net.crash(P1)
    net.crash(P2)
    r = net.allocate(P3, "c3")
    assert r.pending and net.alloc(P3).status_line() == "all IP ranges owned by unreachable peers - use 'rmpeer'"
    for _ in range(30):
        net.tick(5)
    [event] = net.peers[P3].events
    assert isinstance(event, AllocateFailed)
    assert "no free address in 10.40.0.0/16 after 120s" in event.reason
    assert "unreachable peers" in event.reason
    assert not net.alloc(P3).pending_allocates


def test_no_container_id_files_the_allocation_under_the_address() -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    r = alloc.allocate("_", UNIVERSE)
    assert addr(r.cidr) == "10.40.0.1"
    assert alloc.lookup("10.40.0.1") == [r.cidr]
    alloc.free("10.40.0.1")
    assert alloc.owned == {}


def test_subnet_allocation_and_bounds() -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    sub = CIDR.parse("10.40.7.0/24")
    assert addr(alloc.allocate("c", sub).cidr) == "10.40.7.1"
    assert alloc.allocate("c", sub).cidr == CIDR(parse_ip("10.40.7.1"), 24)
    # One address per ident and subnet: the universe contains 10.40.7.1 already.
    assert alloc.allocate("c", UNIVERSE).cidr == CIDR(parse_ip("10.40.7.1"), 24)
    assert addr(alloc.allocate("d", UNIVERSE).cidr) == "10.40.0.1"
    assert alloc.lookup("c", sub.range()) == [CIDR(parse_ip("10.40.7.1"), 24)]
    with pytest.raises(InvalidRequest, match="out of bounds"):
        alloc.allocate("c", CIDR.parse("10.99.0.0/24"))


# ------------------------------------------------------------------ claims


def test_claims() -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    outside = CIDR.parse("192.168.0.5/24")
    assert alloc.claim("x", outside).done and alloc.lookup("x") == [outside]
    mine = CIDR.parse("10.40.3.3/16")
    assert alloc.claim("c1", mine) == alloc.claim("c1", mine)  # re-claim is fine
    assert alloc.claim("c1", mine).error is None and alloc.space.is_used(mine.addr)
    r = alloc.claim("c2", mine)
    assert r.done and r.error == "address 10.40.3.3/16 is already owned by c1"
    # Allocation skips claimed addresses.
    alloc.claim("c3", CIDR.parse("10.40.0.1/16"))
    assert addr(alloc.allocate("c4", UNIVERSE).cidr) == "10.40.0.2"


def test_claim_of_an_address_another_peer_owns() -> None:
    net = net_of(P1, P2, mode=SeedMode((P1, P2)))
    theirs = CIDR.parse("10.40.200.9/16")
    r = net.claim(P1, "c", theirs)
    assert not r.done
    net.deliver()
    # P2 gives it up (it has no allocation there) and P1 records it.
    assert Claimed("c", theirs) in net.peers[P1].events
    assert net.alloc(P1).ring.owner(theirs.addr) == P1
    assert net.alloc(P2).ring.owner(theirs.addr) == P1


def test_claim_denied_when_the_owner_uses_it() -> None:
    net = net_of(P1, P2, mode=SeedMode((P1, P2)))
    used = net.allocate(P2, "theirs").cidr
    assert used is not None
    r = net.claim(P1, "c", used)
    assert not r.done
    net.deliver()
    [event] = net.peers[P1].events
    assert isinstance(event, ClaimFailed)
    assert event.reason == f"address {used} is owned by other peer {'02:00:00:00:00:02'} (p{P2})"


def test_claim_gives_up_after_bounded_attempts() -> None:
    alloc = Allocator(AllocatorConfig(P1, 1, UNIVERSE, SeedMode((P1, P2)), claim_attempts=2))
    cidr = CIDR.parse("10.40.200.1/16")
    r = alloc.claim("c", cidr, now=0)
    assert not r.done and [type(a) for a in r.actions] == [SendUnicast, SendBroadcast]  # + start-up ring
    assert [type(a) for a in alloc.tick(5)] == [SendUnicast]
    assert alloc.tick(10) == []
    [event] = alloc.drain_events()
    assert isinstance(event, ClaimFailed) and "is owned by other peer 02:00:00:00:00:02" in event.reason


def test_claim_before_the_ring_exists() -> None:
    alloc = single(bootstrap=ConsensusMode(2))
    cidr = CIDR.parse("10.40.0.9/16")
    assert alloc.claim("c", cidr, no_error_on_unknown=True).done
    r = alloc.claim("d", CIDR.parse("10.40.0.10/16"))
    assert not r.done and alloc.report()["PendingClaims"] == [
        {"Ident": "c", "CIDR": {"Addr": "10.40.0.9", "PrefixLen": 16}},
        {"Ident": "d", "CIDR": {"Addr": "10.40.0.10", "PrefixLen": 16}},
    ]


def test_pre_claims_are_applied_once_there_is_a_ring() -> None:
    store = MemoryStore()
    pre = [PreClaim("weave:expose", CIDR.parse("10.40.0.1/16"), False)]
    alloc = Allocator(AllocatorConfig(P1, 1, UNIVERSE, SeedMode((P1,)), store=store, pre_claims=pre))
    assert alloc.lookup("weave:expose") == [CIDR.parse("10.40.0.1/16")]
    assert addr(alloc.allocate("c", UNIVERSE).cidr) == "10.40.0.2"


# ------------------------------------------------------------------ release


def test_free_one_or_all() -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    a = alloc.allocate("c", UNIVERSE).cidr
    b = alloc.allocate("c", CIDR.parse("10.40.9.0/24")).cidr
    assert a is not None and b is not None
    alloc.free("c", a.addr)
    assert alloc.lookup("c") == [b]
    with pytest.raises(NotFound, match=r"Free: address 10\.40\.0\.1 not found for c"):
        alloc.free("c", a.addr)
    alloc.free("c")
    with pytest.raises(NotFound, match="Delete: no addresses for c"):
        alloc.free("c")
    assert alloc.space.num_used() == 0
    # Lowest free first again.
    assert alloc.allocate("d", UNIVERSE).cidr == a


def test_container_death_frees_after_a_grace_period() -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    alloc.allocate("c", UNIVERSE, now=100)
    alloc.allocate("k", UNIVERSE, now=100)
    alloc.container_died("c", now=100)
    alloc.container_died("k", now=100)
    alloc.container_started("k")
    alloc.tick(120)
    assert alloc.lookup("c")
    alloc.tick(140)
    assert not alloc.lookup("c") and alloc.lookup("k")
    alloc.container_destroyed("k")
    assert not alloc.lookup("k")
    alloc.allocate("old", UNIVERSE)
    alloc.allocate("live", UNIVERSE)
    alloc.prune_owned(["live"])
    assert list(alloc.owned) == ["live"]


def test_cancel_ends_pending_requests() -> None:
    alloc = single(bootstrap=ConsensusMode(2))
    assert alloc.allocate("c", UNIVERSE).pending
    alloc.cancel("c")
    assert alloc.drain_events() == [AllocateFailed("c", UNIVERSE, "Allocate request for c cancelled")]


# ------------------------------------------------------------------ peer removal


def test_rmpeer_takes_over_a_dead_peers_ranges() -> None:
    net = net_of(P1, P2, mode=SeedMode((P1, P2)))
    net.allocate(P1, "x")
    net.settle(1)
    net.remove(P2)
    gained = net.rmpeer(P1, f"p{P2}")
    assert gained == 32768
    assert net.alloc(P1).ring.peer_names() == {P1}
    assert [e.version >= 100 for e in net.alloc(P1).ring.entries] == [False, True]
    assert net.rmpeer(P1, "nobody") == 0
    assert net.rmpeer(P1, "02:00:00:00:00:01") == 0  # ourselves


def test_shutdown_hands_our_ranges_to_an_heir() -> None:
    net = net_of(P1, P2, mode=SeedMode((P1, P2)))
    net.settle(1)
    net.shutdown(P1)
    net.deliver()
    assert net.alloc(P2).ring.peer_names() == {P2}
    assert [e.version for e in net.alloc(P2).ring.entries] == [100, 0]
    assert net.alloc(P2).space.num_free() == 65536
    assert net.alloc(P1).allocate("late", UNIVERSE).error == "Allocate request for late cancelled"


def test_shutdown_cancels_pending_requests() -> None:
    net = net_of(P1, P2)
    assert net.allocate(P1, "w").pending
    net.shutdown(P1)
    assert AllocateFailed("w", UNIVERSE, "Allocate request for w cancelled") in net.peers[P1].events
    assert not net.alloc(P1).pending_allocates


# ------------------------------------------------------------------ conflicts


def test_seed_conflict_with_allocations_on_both_sides_is_reported() -> None:
    net = SimNetwork(UNIVERSE, random.Random(5))
    net.add_peer(P1, SeedMode((P1,)))
    net.add_peer(P2, SeedMode((P2,)))
    net.allocate(P1, "a")
    net.allocate(P2, "b")
    net.gossip_round()
    net.deliver()
    assert {dst for _, dst, _ in net.errors} == {P1, P2}
    assert all("IP allocation was seeded by different peers (received: [" in e for _, _, e in net.errors)
    assert "ours: [02:00:00:00:00:01(p" in [e for _, dst, e in net.errors if dst == P1][0]
    lines = net.alloc(P1).status_lines()
    assert lines[0] == "ready" and "weave reset" in lines[1]
    # Errors are WireErrors: the mesh drops the connection, the allocator carries on.
    with pytest.raises(DifferentSeeds):
        net.alloc(P1).on_gossip(net.alloc(P2).encode())
    assert net.alloc(P1).conflict is not None and net.alloc(P1).conflict.count >= 2  # type: ignore[union-attr]
    assert addr(net.allocate(P1, "more").cidr) == "10.40.0.2"


def test_seed_conflict_is_resolved_by_the_unused_side() -> None:
    net = SimNetwork(UNIVERSE, random.Random(5))
    net.add_peer(P3, SeedMode((P3,)))  # unused ring
    net.add_peer(P1, SeedMode((P1, P2)))
    net.add_peer(P2, SeedMode((P1, P2)))
    net.allocate(P1, "a")
    net.settle(3)
    # The used side never drops a connection over it: it sends its ring and P3 adopts it.
    assert not net.errors
    assert {p.alloc.ring.state() for p in net.up()} == {net.alloc(P1).ring.state()}  # type: ignore[union-attr]
    assert net.alloc(P3).ring.seeds == [P1, P2]
    assert net.allocate(P3, "c").pending  # it now asks the others for space
    net.settle(2)
    assert any(isinstance(e, Allocated) for e in net.peers[P3].events)


def test_two_unused_rings_agree_on_one() -> None:
    net = SimNetwork(UNIVERSE, random.Random(9))
    net.add_peer(P1, SeedMode((P2,)))
    net.add_peer(P2, SeedMode((P1,)))
    net.settle(4)
    assert not net.errors
    # The smaller seed list wins on both sides, so they do not swap back and forth.
    assert net.alloc(P1).ring.seeds == net.alloc(P2).ring.seeds == [P1]


def test_different_range_is_an_error() -> None:
    other = Allocator(AllocatorConfig(P2, 2, CIDR.parse("10.41.0.0/16"), SeedMode((P1,))))
    alloc = single(bootstrap=SeedMode((P1,)))
    with pytest.raises(DifferentRange, match=r"Incompatible IP allocation ranges \(received: 10\.41\.0\.0/16, "
                                             r"ours: 10\.40\.0\.0/16\)"):
        alloc.on_gossip_broadcast(P2, other.encode())
    assert "--ipalloc-range" in alloc.status_lines()[1]


def test_different_range_and_seeds_is_a_range_error_and_never_adopted() -> None:
    other = Allocator(AllocatorConfig(P2, 2, CIDR.parse("10.41.0.0/16"), SeedMode((P2,))))
    other.allocate("x", CIDR.parse("10.41.0.0/16"))
    alloc = single(bootstrap=SeedMode((P3,)))  # unused, and would lose the seed tie-break
    before = alloc.ring.state()
    with pytest.raises(DifferentRange, match="Incompatible IP allocation ranges"):
        alloc.on_gossip_broadcast(P2, other.encode())
    assert alloc.ring.state() == before


def test_rmpeer_of_a_live_peer_is_refused_where_it_has_allocations() -> None:
    net = net_of(P1, P2, mode=SeedMode((P1, P2)))
    kept = net.allocate(P2, "busy").cidr
    net.settle(1)
    net.rmpeer(P1, f"p{P2}")  # unsafe: P2 is alive
    net.deliver()
    # P2 refuses to hand over the range its container uses, and keeps its address.
    assert any("Received update for IP range I own at 10.40.128.0" in e for _, _, e in net.errors)
    assert net.alloc(P2).lookup("busy") == [kept]
    assert net.alloc(P2).ring.owner(kept.addr) == P2  # type: ignore[union-attr]


# ------------------------------------------------------------------ wire input


@pytest.mark.parametrize("payload", [b"", b"\x07", b"\x00\x01\x02", b"\x01garbage", b"\x02"])
def test_bad_unicasts_raise_wire_errors(payload: bytes) -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    with pytest.raises(IPAMWireError):
        alloc.on_gossip_unicast(P2, payload)


@pytest.mark.parametrize("payload", [b"", b"\x00", b"junk junk", wire.encode_range(Range(1, 2))[:-3]])
def test_bad_gossip_raises_wire_errors(payload: bytes) -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    with pytest.raises(WireError):
        alloc.on_gossip(payload)
    with pytest.raises(WireError):
        alloc.on_gossip_broadcast(P2, payload)


def test_invalid_ring_from_a_peer_is_refused() -> None:
    alloc = single(bootstrap=SeedMode((P1,)))
    state = wire.decode_gossip_state(alloc.encode())
    assert state.ring is not None
    bad = wire.RingData(state.ring.start, state.ring.end, P2, state.ring.entries * 2, state.ring.seeds)
    with pytest.raises(WireError, match="Ring not sorted|Token appears twice"):
        alloc.on_gossip(wire.encode_gossip_state(wire.GossipState(0, {}, None, bad)))
    too_big = wire.GossipState(0, {}, None, wire.RingData(0, 1 << 33, P2, (), ()))
    with pytest.raises(WireError, match="32 bits"):
        alloc.on_gossip(wire.encode_gossip_state(too_big))


# ------------------------------------------------------------------ gossip data and report


def test_gossip_data_encodes_latest_state() -> None:
    alloc = single(bootstrap=SeedMode((P1,)), our_nickname="wv1", now=1795241051)
    data = alloc.gossip()
    assert data.merge(alloc.gossip()) is data
    [payload] = data.encode()
    state = wire.decode_gossip_state(payload)
    assert state.now == 1795241051 and state.nicknames == {P1: "wv1"} and state.paxos is None
    assert state.ring is not None and state.ring.peer == P1
    # Before a ring exists an elector gossips its (empty) Paxos map, an observer none.
    assert wire.decode_gossip_state(single().encode()).paxos == {}
    assert wire.decode_gossip_state(single(bootstrap=ObserverMode()).encode()).paxos is None


def test_report_shape() -> None:
    alloc = single(bootstrap=SeedMode((P1,)), our_nickname="wv1")
    alloc.allocate("c", UNIVERSE)
    report = alloc.report(CIDR.parse("10.40.0.0/16"))
    assert list(report) == ["Paxos", "Range", "RangeNumIPs", "ActiveIPs", "DefaultSubnet", "Entries",
                            "PendingClaims", "PendingAllocates"]
    assert report["Entries"] == [{"Token": "10.40.0.0", "Size": 65536, "Peer": "02:00:00:00:00:01",
                                  "Nickname": "wv1", "IsKnownPeer": True, "Version": 1}]
    assert (report["ActiveIPs"], report["RangeNumIPs"], report["Paxos"]) == (1, 65536, None)


def test_unicast_ring_update_from_an_unknown_sender_is_merged() -> None:
    alloc = single()
    seeded = Allocator(AllocatorConfig(P2, 2, UNIVERSE, SeedMode((P2,))))
    msg = wire.encode_unicast(wire.RingUpdate(wire.decode_gossip_state(seeded.encode())))
    assert alloc.on_gossip_unicast(P2, msg) == []
    assert alloc.ring.state() == seeded.ring.state()
    assert alloc.ring.owner(UNIVERSE.addr) == P2 != UNKNOWN_PEER


def test_durable_before_returning() -> None:
    store = MemoryStore()
    alloc = single(bootstrap=SeedMode((P1,)), store=store)
    cidr = alloc.allocate("c", UNIVERSE).cidr
    assert store.owned["c"].cidrs == [cidr]
    again = Allocator(AllocatorConfig(P1, 99, UNIVERSE, SeedMode((P1,)), store=store))
    assert again.lookup("c") == [cidr]
    assert again.allocate("c", UNIVERSE).cidr == cidr
    assert addr(again.allocate("d", UNIVERSE).cidr) == "10.40.0.2"
