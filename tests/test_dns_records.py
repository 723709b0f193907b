"""weaveDNS records: the CRDT merge, tombstones, origin override, purge and peer removal."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import WireError
from router.gossip_api import SendBroadcast
from weavedns.records import Nameserver, NameserverGossip, broadcast_actions, merge_entries, supersedes
from weavedns.wire import (
    GOSSIP_WINDOW,
    TOMBSTONE_TIMEOUT,
    ClockSkewError,
    Entry,
    GossipMessage,
    decode_gossip,
    encode_gossip,
    parse_addr,
)

US = 0x029900000001
PEER_B = 0x029900000002
PEER_C = 0x029900000003
STRANGER = 0x0299000000FF
NOW = 1_795_241_052


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_ns(clock: Clock | None = None, known: frozenset[int] = frozenset({US, PEER_B, PEER_C})) -> Nameserver:
    return Nameserver(US, lambda p: p in known, clock or Clock())


def payload(*entries: Entry, timestamp: int = NOW) -> bytes:
    return encode_gossip(GossipMessage(timestamp, tuple(entries)))


def ip(text: str) -> int:
    return parse_addr(text)


def entry(host: str = "alpha.weave.local.", origin: int = PEER_B, cid: str = "c1", addr: str = "10.40.0.1",
          version: int = 0, tombstone: int = 0) -> Entry:
    return Entry(host, origin, cid, ip(addr), version, tombstone)


# ----------------------------------------------------------------- local changes


def test_add_lookup_case_insensitive_and_delta() -> None:
    ns = make_ns()
    delta = ns.add_entry("Alpha.weave.local.", "c1", ip("10.40.0.1"))
    assert [e.key for e in delta.entries] == [("Alpha.weave.local.", US, "c1", ip("10.40.0.1"))]
    assert ns.lookup("alpha.WEAVE.local.") == (ip("10.40.0.1"),)
    assert ns.addresses(b"alpha.weave.local.") == (ip("10.40.0.1"),)
    assert ns.lookup("beta.weave.local.") == ()
    assert ns.hostname_for(ip("10.40.0.1")) == "Alpha.weave.local."
    assert ns.local_live_count() == 1


def test_delete_tombstones_and_readd_revives() -> None:
    clock = Clock()
    ns = make_ns(clock)
    ns.add_entry("beta.weave.local.", "cont21", ip("10.40.64.1"))
    clock.now += 1
    delta = ns.delete(hostname="beta.weave.local.")
    assert delta is not None
    [dead] = delta.entries
    assert (dead.version, dead.tombstone) == (1, NOW + 1)
    assert ns.lookup("beta.weave.local.") == ()
    assert ns.hostname_for(ip("10.40.64.1")) is None
    assert ns.delete(hostname="beta.weave.local.") is None  # already gone: nothing to broadcast
    [back] = ns.add_entry("beta.weave.local.", "cont21", ip("10.40.64.1")).entries
    assert (back.version, back.tombstone) == (2, 0)
    assert ns.lookup("beta.weave.local.") == (ip("10.40.64.1"),)


def test_delete_matches_fields_and_only_our_entries() -> None:
    ns = make_ns()
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    ns.add_entry("a.weave.local.", "c2", ip("10.0.0.2"))
    ns.add_entry("b.weave.local.", "c1", ip("10.0.0.3"))
    ns.on_gossip(payload(entry("a.weave.local.", PEER_B, "c1", "10.0.0.9")))
    delta = ns.delete(container_id="c1")
    assert delta is not None
    assert sorted(e.hostname for e in delta.entries) == ["a.weave.local.", "b.weave.local."]
    # Peer B's entry with the same container id is not ours to delete.
    assert ns.lookup("a.weave.local.") == (ip("10.0.0.2"), ip("10.0.0.9"))
    assert ns.delete(addr=ip("10.0.0.2")) is not None
    assert ns.lookup("a.weave.local.") == (ip("10.0.0.9"),)
    assert ns.container_died("nope") is None


def test_container_died_tombstones_its_entries() -> None:
    ns = make_ns()
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    ns.add_entry("a2.weave.local.", "c1", ip("10.0.0.1"))
    delta = ns.container_died("c1")
    assert delta is not None and len(delta) == 2
    assert all(e.tombstone == NOW for e in ns.entries())


# ----------------------------------------------------------------- merge rules


def test_higher_version_wins_then_larger_tombstone() -> None:
    ns = make_ns()
    assert ns.on_gossip(payload(entry(version=1))) is not None
    assert ns.on_gossip(payload(entry(version=0, tombstone=NOW))) is None  # lower version loses
    assert ns.lookup("alpha.weave.local.") == (ip("10.40.0.1"),)
    delta = ns.on_gossip(payload(entry(version=1, tombstone=NOW)))  # equal version, larger tombstone
    assert delta is not None and delta.entries[0].tombstone == NOW
    assert ns.lookup("alpha.weave.local.") == ()
    assert ns.on_gossip(payload(entry(version=1, tombstone=NOW - 5))) is None
    assert ns.on_gossip(payload(entry(version=2))) is not None  # revived by its origin
    assert ns.lookup("alpha.weave.local.") == (ip("10.40.0.1"),)


def test_supersedes_is_lexicographic_on_version_then_tombstone() -> None:
    a = entry(version=1, tombstone=5)
    assert supersedes(entry(version=2), a)
    assert supersedes(entry(version=1, tombstone=6), a)
    assert not supersedes(entry(version=1, tombstone=5), a)
    assert not supersedes(entry(version=0, tombstone=99), a)


HOSTS = st.sampled_from(["a.weave.local.", "A.weave.local.", "b.weave.local."])
ENTRIES = st.builds(
    Entry,
    hostname=HOSTS,
    origin=st.sampled_from([PEER_B, PEER_C]),
    container_id=st.sampled_from(["c1", "c2"]),
    addr=st.sampled_from([ip("10.0.0.1"), ip("10.0.0.2")]),
    version=st.integers(0, 3),
    tombstone=st.sampled_from([0, NOW - 10, NOW]),
)
BATCHES = st.lists(ENTRIES, max_size=8).map(lambda es: list(merge_entries({}, es).values()))


def absorb(*batches: list[Entry]) -> list[Entry]:
    ns = make_ns()
    for batch in batches:
        ns.on_gossip(payload(*batch))
    return ns.entries()


@settings(max_examples=60, deadline=None)
@given(BATCHES, BATCHES, BATCHES)
def test_merge_is_commutative_associative_idempotent(a: list[Entry], b: list[Entry], c: list[Entry]) -> None:
    assert absorb(a, b) == absorb(b, a)
    assert absorb(a, b, c) == absorb(c, b, a) == absorb(b, c, a)
    assert absorb(a, a) == absorb(a)
    # The GossipData merge (what the mesh does with pending data) is the same join.
    ga, gb = NameserverGossip(1, a), NameserverGossip(2, b)
    assert ga.merge(gb).entries == gb.merge(ga).entries
    assert ga.merge(gb).timestamp == 2
    assert absorb(ga.merge(gb).entries) == absorb(a, b)


@settings(max_examples=40, deadline=None)
@given(BATCHES, BATCHES)
def test_delta_from_on_gossip_brings_a_peer_up_to_date(a: list[Entry], b: list[Entry]) -> None:
    first = make_ns()
    first.on_gossip(payload(*a))
    delta = first.on_gossip(payload(*b))
    second = make_ns()
    second.on_gossip(payload(*a))
    if delta is not None:
        second.on_gossip(delta.encode()[0])
    assert second.entries() == first.entries()


def test_full_gossip_replicates_state() -> None:
    ns = make_ns()
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    ns.add_entry("b.weave.local.", "c2", ip("10.0.0.2"))
    ns.delete(hostname="b.weave.local.")
    [data] = ns.gossip().encode()
    other = Nameserver(PEER_B, lambda p: True, Clock())
    assert other.on_gossip(data) is not None
    assert other.entries() == ns.entries()
    assert other.on_gossip(data) is None  # nothing new the second time


def test_empty_state_still_gossips_like_weave() -> None:
    ns = make_ns()
    [data] = ns.gossip().encode()
    assert decode_gossip(data) == GossipMessage(NOW, ())


def test_broadcast_returns_what_was_received_even_if_known() -> None:
    ns = make_ns()
    data = payload(entry(), timestamp=NOW - 3)
    first = ns.on_gossip_broadcast(PEER_B, data)
    again = ns.on_gossip_broadcast(PEER_B, data)
    assert first is not None and again is not None
    assert again.entries == [entry()] and again.timestamp == NOW - 3
    assert ns.on_gossip_unicast(PEER_B, data) == []


def test_entries_from_unknown_peers_are_dropped() -> None:
    ns = make_ns()
    assert ns.on_gossip(payload(entry(origin=STRANGER))) is None
    assert ns.on_gossip_broadcast(PEER_B, payload(entry(origin=STRANGER))) is None
    assert len(ns) == 0
    delta = ns.on_gossip(payload(entry(origin=STRANGER), entry(origin=PEER_C)))
    assert delta is not None and [e.origin for e in delta.entries] == [PEER_C]


# ----------------------------------------------------------------- our own origin


def test_incoming_newer_version_of_our_entry_is_overridden() -> None:
    ns = make_ns()
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    forged = entry("a.weave.local.", US, "c1", "10.0.0.1", version=5, tombstone=NOW)
    ns.on_gossip(payload(forged))
    [ours] = ns.entries()
    assert (ours.version, ours.tombstone) == (6, 0)
    assert ns.lookup("a.weave.local.") == (ip("10.0.0.1"),)
    [bcast] = ns.take_broadcasts()
    assert bcast.entries == [ours]
    assert ns.take_broadcasts() == []


def test_equal_version_different_tombstone_is_overridden() -> None:
    clock = Clock()
    ns = make_ns(clock)
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    clock.now += 1
    ns.delete(container_id="c1")  # ours: version 1, tombstoned
    ns.on_gossip(payload(entry("a.weave.local.", US, "c1", "10.0.0.1", version=1, tombstone=0)))
    [ours] = ns.entries()
    assert (ours.version, ours.tombstone) == (2, NOW + 1)
    assert len(ns.take_broadcasts()) == 1


def test_same_or_older_copy_of_our_entry_is_not_overridden() -> None:
    ns = make_ns()
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    ns.on_gossip(payload(entry("a.weave.local.", US, "c1", "10.0.0.1", version=0)))
    assert ns.take_broadcasts() == []
    assert ns.entries()[0].version == 0


def test_unknown_live_entry_claiming_us_is_tombstoned() -> None:
    ns = make_ns()
    ns.on_gossip(payload(entry("ghost.weave.local.", US, "old", "10.0.0.7", version=3)))
    [ghost] = ns.entries()
    assert (ghost.version, ghost.tombstone) == (4, NOW)
    assert ns.lookup("ghost.weave.local.") == ()
    assert [b.entries for b in ns.take_broadcasts()] == [[ghost]]
    # An already-dead one is simply stored, nothing to correct.
    ns.on_gossip(payload(entry("ghost2.weave.local.", US, "old", "10.0.0.8", version=1, tombstone=NOW - 9)))
    assert ns.take_broadcasts() == []


def test_overrides_go_to_the_broadcast_callback_when_given() -> None:
    sent: list[NameserverGossip] = []
    ns = Nameserver(US, lambda p: True, Clock(), on_broadcast=sent.append)
    ns.on_gossip(payload(entry("ghost.weave.local.", US, "old", "10.0.0.7")))
    assert [len(d) for d in sent] == [1] and ns.take_broadcasts() == []
    [action] = broadcast_actions(sent[0], None)
    assert isinstance(action, SendBroadcast)
    assert decode_gossip(action.payload).entries == tuple(sent[0].entries)
    assert broadcast_actions(None, NameserverGossip(NOW)) == []


# ----------------------------------------------------------------- purge, peers, views


def test_tombstones_purged_after_thirty_minutes() -> None:
    clock = Clock()
    ns = make_ns(clock)
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    ns.add_entry("b.weave.local.", "c2", ip("10.0.0.2"))
    ns.delete(hostname="a.weave.local.")
    clock.now += TOMBSTONE_TIMEOUT
    assert ns.purge_tombstones() == 0  # exactly the timeout: kept
    clock.now += 1
    assert ns.purge_tombstones() == 1
    assert [e.hostname for e in ns.entries()] == ["b.weave.local."]


def test_peer_gone_removes_its_entries() -> None:
    ns = make_ns()
    ns.on_gossip(payload(entry("a.weave.local.", PEER_B), entry("a.weave.local.", PEER_C, addr="10.0.0.3")))
    assert ns.lookup("a.weave.local.") == (ip("10.40.0.1"), ip("10.0.0.3"))
    assert ns.peer_gone(PEER_B) == 1
    assert ns.lookup("a.weave.local.") == (ip("10.0.0.3"),)
    assert ns.peer_gone(PEER_B) == 0


def test_version_counter_tracks_visible_changes() -> None:
    ns = make_ns()
    v0 = ns.version
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))
    v1 = ns.version
    assert v1 != v0
    ns.add_entry("a.weave.local.", "c1", ip("10.0.0.1"))  # no change
    ns.on_gossip(payload(entry("a.weave.local.", US, "c1", "10.0.0.1")))  # same data
    assert ns.version == v1
    ns.delete(hostname="a.weave.local.")
    assert ns.version != v1


def test_reverse_lookup_takes_first_live_entry_in_storage_order() -> None:
    ns = make_ns()
    ns.on_gossip(payload(
        entry("zeta.weave.local.", PEER_B, addr="10.0.0.5"),
        entry("Beta.weave.local.", PEER_C, addr="10.0.0.5"),
        entry("alpha.weave.local.", PEER_C, addr="10.0.0.5", version=1, tombstone=NOW),
    ))
    assert ns.hostname_for(ip("10.0.0.5")) == "Beta.weave.local."
    ns.peer_gone(PEER_C)
    assert ns.hostname_for(ip("10.0.0.5")) == "zeta.weave.local."


def test_lookup_order_is_storage_order_and_duplicates_collapse() -> None:
    ns = make_ns()
    ns.on_gossip(payload(
        entry("x.weave.local.", PEER_C, "c9", "10.0.0.3"),
        entry("x.weave.local.", PEER_B, "c2", "10.0.0.2"),
        entry("X.weave.local.", PEER_B, "c1", "10.0.0.2"),
    ))
    assert ns.lookup("x.weave.local.") == (ip("10.0.0.2"), ip("10.0.0.3"))
    assert [(e.origin, e.container_id) for e in ns.entries()] == [(PEER_B, "c1"), (PEER_B, "c2"), (PEER_C, "c9")]


# ----------------------------------------------------------------- bad gossip


@pytest.mark.parametrize("skew", [GOSSIP_WINDOW + 1, -GOSSIP_WINDOW - 1])
def test_clock_skew_beyond_window_rejected(skew: int) -> None:
    ns = make_ns()
    with pytest.raises(ClockSkewError, match="clock skew"):
        ns.on_gossip(payload(entry(), timestamp=NOW + skew))
    assert len(ns) == 0


@pytest.mark.parametrize("skew", [GOSSIP_WINDOW, -GOSSIP_WINDOW])
def test_clock_skew_at_window_accepted(skew: int) -> None:
    assert make_ns().on_gossip(payload(entry(), timestamp=NOW + skew)) is not None


def test_duplicate_entries_rejected() -> None:
    data = encode_gossip(GossipMessage(NOW, (entry(), dataclasses.replace(entry(), version=1))))
    with pytest.raises(WireError, match="duplicate"):
        make_ns().on_gossip(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_raises_only_wire_errors(data: bytes) -> None:
    ns = make_ns()
    try:
        ns.on_gossip(data)
    except WireError:
        pass
    assert all(isinstance(e, Entry) for e in ns.entries())


def test_truncations_of_a_real_payload_raise_wire_errors() -> None:
    data = payload(entry(), entry("b.weave.local."))
    for cut in range(1, len(data)):
        with pytest.raises(WireError):
            make_ns().on_gossip(data[:cut])


def test_gossip_goes_out_in_weaves_case_sensitive_order() -> None:
    a1 = entry("a.weave.local.", PEER_B, "c1", "10.0.0.2")
    a2 = entry("a.weave.local.", PEER_B, "c1", "10.0.0.9")
    a3 = entry("a.weave.local.", PEER_B, "c2", "10.0.0.1")
    a4 = entry("a.weave.local.", PEER_C, "c0", "10.0.0.1")
    upper = entry("B.weave.local.", PEER_C)
    lower = entry("b.weave.local.", PEER_B)
    expected = [upper, a1, a2, a3, a4, lower]  # Go compares bytes: "B" < "a" < "b"
    for order in (expected[::-1], [a3, lower, a1, upper, a4, a2]):
        assert list(decode_gossip(payload(*order)).entries) == expected
        assert NameserverGossip(NOW, order).encode() == [payload(*expected)]
    # Storage (and the API listing) is case-insensitive instead.
    ns = make_ns()
    ns.on_gossip(payload(*expected))
    assert ns.entries() == [a1, a2, a3, a4, lower, upper]


def test_origin_beyond_48_bits_is_just_an_unknown_peer() -> None:
    ns = make_ns()
    assert ns.on_gossip(payload(entry(origin=(1 << 64) - 1), entry(origin=PEER_B))) is not None
    assert [e.origin for e in ns.entries()] == [PEER_B]
