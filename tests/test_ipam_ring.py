"""Ring CRDT, space and address helpers: each merge rule and error, plus properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam_crdt.address import CIDR, Range, biggest_cidr_range, ip_str, parse_ip
from ipam_crdt.errors import (
    DifferentRange,
    DifferentSeeds,
    EntryInMyRange,
    InconsistentEntry,
    InvalidMergeResult,
    InvalidRequest,
    IPAMError,
    NewerVersion,
    RingNotSorted,
    RingStateError,
    TokenOutOfRange,
    TokenRepeated,
    TooMuchFreeSpace,
)
from ipam_crdt.ring import UNKNOWN_PEER, Entry, Ring
from ipam_crdt.space import RangeSet, Space
from router.errors import WireError

A, B, C, D = 0x0A, 0x0B, 0x0C, 0x0D
START, END = parse_ip("10.0.0.0"), parse_ip("10.0.1.0")  # 256 addresses


def ip(text: str) -> int:
    return parse_ip(text)


def ring(peer: int, *entries: Entry, seeds: tuple[int, ...] = ()) -> Ring:
    return Ring(START, END, peer, entries, seeds)


def never(_ranges: list[Range]) -> bool:
    return False


def always(_ranges: list[Range]) -> bool:
    return True


def E(last_octet: int, peer: int, version: int = 0, free: int = 0) -> Entry:
    return Entry(START + last_octet, peer, version, free)


# ------------------------------------------------------------------ addresses


def test_cidr_parsing_and_ranges() -> None:
    c = CIDR.parse("10.32.0.0/12")
    assert (c.size, str(c), str(c.range())) == (1 << 20, "10.32.0.0/12", "10.32.0.0-10.47.255.255")
    assert c.host_range() == Range(c.addr + 1, c.addr + c.size - 1)
    assert CIDR.parse("10.2.3.4/24").range() == Range(ip("10.2.3.0"), ip("10.2.4.0"))
    for bad in ("10.0.0.0", "10.0.0.0/33", "10.0.0/8", "x/8", "10.0.0.0/-1"):
        with pytest.raises(InvalidRequest):
            CIDR.parse(bad)
    with pytest.raises(InvalidRequest, match="bits after network prefix"):
        CIDR.parse_subnet("10.0.0.1/24")
    with pytest.raises(InvalidRequest, match="smaller than minimum size 4"):
        CIDR.parse_subnet("10.0.0.0/31")
    assert Range(ip("10.0.0.0"), ip("10.0.1.0")).as_cidr_string() == "10.0.0.0/24"
    assert Range(ip("10.0.0.0"), ip("10.0.0.3")).as_cidr_string() == "10.0.0.0-10.0.0.2"


@given(st.integers(0, 5000), st.integers(0, 5000))
def test_biggest_cidr_range_is_the_lowest_largest_aligned_block(a: int, b: int) -> None:
    r = Range(min(a, b), max(a, b))
    got = biggest_cidr_range(r)
    if r.size == 0:
        assert got.size == 0
        return
    best = max(
        (size for size in (1 << k for k in range(14)) if any(s % size == 0 for s in range(r.start, r.end - size + 1))),
    )
    lowest = next(s for s in range(r.start, r.end - best + 1) if s % best == 0)
    assert got == Range(lowest, lowest + best)


# ------------------------------------------------------------------ claim_for_peers


def test_claim_for_peers_halves_recursively() -> None:
    r = ring(A)
    r.claim_for_peers([A, B, C])
    assert r.entries == [E(0, A, 0, 128), E(128, B, 0, 64), E(192, C, 0, 64)]
    assert r.seeds == [A, B, C]
    with pytest.raises(RingStateError):
        r.claim_for_peers([A])


@given(st.integers(2, 12), st.lists(st.integers(1, 2**48 - 1), min_size=1, max_size=40, unique=True))
def test_claim_for_peers_covers_the_ring_in_cidr_blocks(prefix_bits: int, peers: list[int]) -> None:
    size = 1 << prefix_bits
    r = Ring(0, size, peers[0])
    r.claim_for_peers(sorted(peers))
    r.check()
    tokens = [e.token for e in r.entries] + [size]
    for e, nxt in zip(r.entries, tokens[1:], strict=True):
        block = nxt - e.token
        assert block & (block - 1) == 0 and e.token % block == 0
        assert e.free == block
    assert len({e.peer for e in r.entries}) == min(len(peers), size)


# ------------------------------------------------------------------ grants


def test_grant_inside_a_range_inserts_two_tokens() -> None:
    r = ring(A, E(0, A, 3, 256))
    r.grant_range_to_host(START + 64, START + 128, B)
    assert r.entries == [E(0, A, 4, 64), E(64, B, 0, 64), E(128, A, 0, 128)]
    r.check()


def test_grant_at_an_existing_token_and_up_to_the_end() -> None:
    r = ring(A, E(0, A, 0, 128), E(128, A, 5, 128))
    r.grant_range_to_host(START + 128, END, B)
    # The token at 128 changes hands; the end of the ring wraps to the token at 0.
    assert r.entries == [E(0, A, 0, 128), E(128, B, 6, 128)]


def test_grant_spanning_tokens_hands_them_over() -> None:
    r = ring(A, E(0, A, 0, 64), E(64, A, 0, 64), E(128, A, 0, 128))
    r.grant_range_to_host(START + 32, START + 160, B)
    assert r.entries == [E(0, A, 1, 32), E(32, B, 0, 32), E(64, B, 1, 64), E(128, B, 1, 32), E(160, A, 0, 96)]
    # One range per entry, as Weave reports them.
    assert r.owned_ranges(B) == [Range(START + 32, START + 64), Range(START + 64, START + 128),
                                 Range(START + 128, START + 160)]


def test_grant_preconditions() -> None:
    r = ring(A, E(0, A, 0, 128), E(128, B, 0, 128))
    with pytest.raises(RingStateError, match="do not own"):
        r.grant_range_to_host(START + 100, START + 200, C)
    with pytest.raises(RingStateError):
        r.grant_range_to_host(START + 10, START + 10, C)
    with pytest.raises(RingStateError):
        ring(A).grant_range_to_host(START, START + 1, C)


# ------------------------------------------------------------------ merge rules


def test_merge_copies_tokens_only_they_have() -> None:
    mine = ring(A, E(0, A, 1, 128))
    # Our range [0, 256) is split at 128 by B: allowed because we have no allocations there.
    assert mine.merge(ring(B, E(0, A, 1, 128), E(128, B, 0, 128)), never) is True
    assert mine.entries == [E(0, A, 1, 128), E(128, B, 0, 128)]


def test_merge_into_empty_ring_adopts_everything() -> None:
    mine = ring(A)
    theirs = ring(B, E(0, A, 0, 128), E(128, B, 0, 128), seeds=(A, B))
    assert mine.merge(theirs, always) is True
    assert mine.entries == theirs.entries and mine.seeds == [A, B]
    assert mine.merge(theirs, always) is False  # idempotent


def test_foreign_token_in_our_range_with_allocations_is_refused() -> None:
    mine = ring(A, E(0, A, 1, 100), E(128, B, 0, 128))
    theirs = ring(C, E(0, A, 1, 60), E(64, C, 0, 64), E(128, B, 0, 128))
    with pytest.raises(EntryInMyRange, match=r"Peer 00:00:00:00:00:0c says it owns the IP range from 10\.0\.0\.64"):
        mine.merge(theirs, always)
    assert mine.entries == [E(0, A, 1, 100), E(128, B, 0, 128)]  # untouched
    # The same at the tail of the list (no token of ours after it).
    tail = ring(A, E(0, B, 0, 128), E(128, A, 1, 100))
    with pytest.raises(EntryInMyRange):
        tail.merge(ring(C, E(0, B, 0, 128), E(128, A, 1, 70), E(200, C, 0, 56)), always)
    # Without allocations the split is accepted and our free count is clamped.
    assert mine.merge(theirs, never) is True
    assert mine.entries == [E(0, A, 1, 64), E(64, C, 0, 64), E(128, B, 0, 128)]


def test_higher_version_wins() -> None:
    mine = ring(A, E(0, A, 0, 128), E(128, B, 1, 128))
    assert mine.merge(ring(B, E(0, A, 0, 128), E(128, B, 2, 100)), always) is True
    assert mine.entries[1] == E(128, B, 2, 100)
    # An older version changes nothing.
    assert mine.merge(ring(B, E(0, A, 0, 128), E(128, B, 1, 128)), always) is False
    assert mine.entries[1] == E(128, B, 2, 100)


def test_same_version_conflict_on_our_entry_with_allocations() -> None:
    mine = ring(A, E(0, A, 2, 128), E(128, B, 0, 128))
    theirs = ring(B, E(0, C, 2, 128), E(128, B, 0, 128))
    with pytest.raises(
        InconsistentEntry,
        match=r"Inconsistent entries for 10\.0\.0\.0: owned by 00:00:00:00:00:0a but incoming message says "
        r"00:00:00:00:00:0c",
    ):
        mine.merge(theirs, always)


def test_same_version_conflict_tie_breaks_on_free() -> None:
    # Not ours, or no allocations: the entry with more free space wins, on both sides.
    left = ring(A, E(0, A, 0, 128), E(128, B, 3, 10))
    right = ring(C, E(0, A, 0, 128), E(128, C, 3, 20))
    a, c = Ring(START, END, A, left.entries), Ring(START, END, C, right.entries)
    assert a.merge(right, never) is True
    assert c.merge(left, never) is False
    assert a.entries == c.entries == [E(0, A, 0, 128), E(128, C, 3, 20)]


def test_newer_version_of_our_entry_handing_it_away() -> None:
    mine = ring(A, E(0, A, 1, 128), E(128, B, 0, 128))
    theirs = ring(B, E(0, B, 101, 128), E(128, B, 0, 128))
    with pytest.raises(
        NewerVersion,
        match=r"Received update for IP range I own at 10\.0\.0\.0 v1: incoming message says owner "
        r"00:00:00:00:00:0b v101",
    ):
        mine.merge(theirs, always)
    # With no allocations there, we accept it (Weave's repair of #3310-style conflicts).
    assert mine.merge(theirs, never) is True
    assert mine.entries[0] == E(0, B, 101, 128)


def test_newer_version_still_naming_us_is_reimposed() -> None:
    mine = ring(A, E(0, A, 1, 128), E(128, B, 0, 128))
    theirs = ring(B, E(0, A, 7, 5), E(128, B, 0, 128))
    assert mine.merge(theirs, always) is True
    assert mine.entries[0] == E(0, A, 8, 128)


def test_different_seeds_and_ranges() -> None:
    mine = ring(A, E(0, A, 0, 256), seeds=(A,))
    with pytest.raises(DifferentSeeds) as info:
        mine.merge(ring(B, E(0, B, 0, 256), seeds=(B,)), never)
    assert info.value.received == [B] and info.value.ours == [A]
    assert isinstance(info.value, WireError)
    other = Ring(START, END + 256, B, [Entry(START, B, 0, 512)])
    with pytest.raises(DifferentRange, match="Received range differs from ours"):
        mine.merge(other, never)
    # No seeds on one side is fine.
    assert ring(A).merge(ring(B, E(0, B, 0, 256)), never) is True


@pytest.mark.parametrize(
    ("entries", "error", "message"),
    [
        ((E(128, B), E(0, B)), RingNotSorted, "Ring not sorted"),
        ((E(0, B), E(0, C)), TokenRepeated, "Token appears twice in ring"),
        ((Entry(END, B),), TokenOutOfRange, "Token is out of range"),
        ((Entry(START - 1, B), E(0, B)), TokenOutOfRange, "Token is out of range"),
        ((E(0, B, 0, 129), E(128, C, 0, 0)), TooMuchFreeSpace,
         r"Entry 10\.0\.0\.0-10\.0\.0\.128 reporting too much free space: 129 > 128"),
    ],
)  # fmt: skip
def test_received_ring_must_be_valid(entries: tuple[Entry, ...], error: type[Exception], message: str) -> None:
    mine = ring(A)
    with pytest.raises(error, match=message):
        mine.merge(Ring(START, END, B, entries), never)
    assert mine.entries == []


def test_merge_result_must_be_valid() -> None:
    # Their entry at 64 reports 64 free (true for their ring); our extra token at 100 shrinks it.
    mine = ring(A, E(0, B, 0, 64), E(100, A, 0, 156))
    theirs = ring(B, E(0, B, 0, 64), E(64, B, 0, 64), E(128, A, 0, 128))
    with pytest.raises(InvalidMergeResult, match="Merge of incoming data causes: Entry 10.0.0.64-10.0.0.100"):
        mine.merge(theirs, never)


# ------------------------------------------------------------------ other operations


def test_report_free_bumps_versions_and_joins_a_wrapped_range() -> None:
    r = ring(A, E(64, B, 0, 64), E(128, A, 0, 192))
    # Our entry at 128 wraps round to 64; owned_ranges splits it at the origin.
    assert r.owned_ranges() == [Range(START, START + 64), Range(START + 128, END)]
    assert r.report_free({START: 60, START + 128: 100}) is True
    assert r.entries[1] == E(128, A, 1, 160)
    assert r.report_free({START: 60, START + 128: 100}) is False
    with pytest.raises(RingStateError):
        r.report_free({START + 64: 1})


def test_transfer_adds_100_to_versions() -> None:
    r = ring(A, E(0, A, 1, 64), E(64, B, 3, 64), E(128, B, 4, 128))
    assert r.transfer(B, A) == [Range(START + 64, START + 128), Range(START + 128, END)]
    assert r.entries == [E(0, A, 1, 64), E(64, A, 103, 64), E(128, A, 104, 128)]
    assert r.transfer(C, A) == []


def test_owner_and_range_info() -> None:
    r = ring(A, E(16, B, 2), E(128, C, 5))
    assert r.owner(START) == C and r.owner(START + 16) == B and r.owner(START + 200) == C
    assert ring(A).owner(START) == UNKNOWN_PEER
    with pytest.raises(RingStateError):
        r.owner(END)
    info = [(i.peer, i.range.start - START, i.range.size, i.version) for i in r.all_range_info()]
    assert info == [(B, 16, 112, 2), (C, 0, 16, 5), (C, 128, 128, 5)]
    assert r.peer_names() == {B, C}
    assert r.pick_peer_for_transfer(lambda p: p == C) == C
    assert r.pick_peer_for_transfer(lambda p: False) == UNKNOWN_PEER


def test_choose_peers_to_ask_for_space() -> None:
    r = ring(A, E(0, A, 0, 64), E(64, B, 0, 0), E(128, C, 0, 10), E(192, D, 0, 60))
    # Our own and empty entries are never chosen; only entries overlapping the range count.
    assert set(r.choose_peers_to_ask_for_space(START, END, random.Random(1))) == {C, D}
    assert r.choose_peers_to_ask_for_space(START + 128, START + 192, random.Random(1)) == [C]
    assert r.choose_peers_to_ask_for_space(START, START + 128, random.Random(1)) == []
    heavy_first = sum(
        r.choose_peers_to_ask_for_space(START, END, random.Random(seed))[0] == D for seed in range(200)
    )
    assert 150 < heavy_first < 200  # weighted by free space times a random factor


# ------------------------------------------------------------------ CRDT convergence


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 5), st.integers(5, 60))
def test_replicas_converge_under_owner_only_changes(seed: int, n: int, steps: int) -> None:
    rng = random.Random(seed)
    peers = list(range(1, n + 1))
    base = Ring(START, END, peers[0])
    base.claim_for_peers(peers)
    replicas = {p: base.copy(p) for p in peers}
    for _ in range(steps):
        p = rng.choice(peers)
        r = replicas[p]
        action = rng.random()
        owned = [x for x in r.owned_ranges() if x.size > 1]
        if action < 0.4 and owned:
            chunk = rng.choice(owned)
            cut = rng.randrange(chunk.start + 1, chunk.end)
            r.grant_range_to_host(cut, chunk.end, rng.choice([q for q in peers if q != p]))
        elif action < 0.7 and r.owned_ranges():
            r.report_free({x.start: rng.randrange(0, x.size + 1) for x in r.owned_ranges()})
        else:
            q = rng.choice(peers)
            r.merge(replicas[q], never)
    for _ in range(2):
        for p in peers:
            for q in peers:
                replicas[p].merge(replicas[q], never)
    states = {replicas[p].state() for p in peers}
    assert len(states) == 1
    # Ownership still tiles the ring exactly.
    total = sum(x.size for p in peers for x in replicas[p].owned_ranges(p))
    assert total == END - START


# ------------------------------------------------------------------ space


def test_space_allocates_lowest_first_and_frees() -> None:
    s = Space()
    s.add_ranges([Range(100, 110), Range(50, 52)])
    assert [s.allocate(Range(0, 1000)) for _ in range(3)] == [50, 51, 100]
    assert s.allocate(Range(105, 106)) == 105
    assert s.allocate(Range(0, 50)) is None
    assert (s.num_used(), s.num_free()) == (4, 8)
    s.release(51)
    assert s.allocate(Range(0, 1000)) == 51
    with pytest.raises(IPAMError, match="is not ours"):
        s.release(60)
    with pytest.raises(IPAMError, match="not free to claim"):
        s.claim(100)
    s.claim(109)
    assert s.is_used(109) and s.num_free_in_range(Range(100, 110)) == 7
    assert s.owned_ranges() == [Range(50, 52), Range(100, 110)]


def test_space_donation_gives_the_biggest_block_but_at_most_half() -> None:
    s = Space()
    s.add_ranges([Range(0, 64)])
    assert s.donate(Range(0, 64)) == Range(32, 64)  # 64 > 64/2: upper half
    assert s.donate(Range(0, 8)) == Range(4, 8)
    s.claim(0)
    # Free [1, 4) and [8, 32) (27): the biggest aligned block [16, 32) exceeds half: upper half.
    assert s.donate(Range(0, 64)) == Range(24, 32)
    # Free [1, 4) and [8, 24) (19): the lowest biggest aligned block is [8, 16), not over half.
    assert s.donate(Range(0, 64)) == Range(8, 16)
    assert s.donate(Range(40, 50)) is None
    assert s.owned_ranges() == [Range(0, 4), Range(16, 24)]


def test_space_donation_tie_goes_to_the_later_chunk() -> None:
    s = Space()
    s.add_ranges([Range(0, 4), Range(8, 12)])
    assert s.donate(Range(0, 16)) == Range(8, 12)


def test_space_update_ranges_follows_the_ring() -> None:
    s = Space()
    s.update_ranges([Range(0, 10)])
    s.claim(3)
    s.update_ranges([Range(0, 5), Range(20, 30)])
    assert list(s.free) == [Range(0, 3), Range(4, 5), Range(20, 30)]
    assert s.is_used(3)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 20)), max_size=40))
def test_range_set_matches_a_set_model(ops: list[tuple[bool, int, int]]) -> None:
    rs, model = RangeSet(), set()
    for add, start, length in ops:
        if add:
            rs.add(start, start + length)
            model |= set(range(start, start + length))
        else:
            rs.subtract(start, start + length)
            model -= set(range(start, start + length))
        ranges = list(rs)
        assert all(a.end < b.start for a, b in zip(ranges, ranges[1:], strict=False))  # coalesced
        assert {x for r in ranges for x in range(r.start, r.end)} == model
        assert rs.total() == len(model)
        assert all(rs.contains(x) == (x in model) for x in range(-1, 82))
        window = Range(10, 40)
        assert {x for r in rs.within(window) for x in range(r.start, r.end)} == {x for x in model if 10 <= x < 40}


def test_printing() -> None:
    assert ip_str(ip("10.1.2.3")) == "10.1.2.3"
    assert "10.0.0.0->00:00:00:00:00:0a v1" in repr(ring(A, E(0, A, 1, 3)))
