"""The surrogate gossiper that relays channels this router has no application for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import surrogate
from router.surrogate import RawGossip, SurrogateGossiper, fnv64a

INTERVAL = 30.0

# Go's hash/fnv golden64a vectors (fnv_test.go): what mesh's fnv.New64a() computes.
GO_GOLDEN_64A = [
    (b"", 0xCBF29CE484222325),
    (b"a", 0xAF63DC4C8601EC8C),
    (b"ab", 0x089C4407B545986A),
    (b"abc", 0xE71FA2190541574B),
]


@pytest.mark.parametrize(("data", "expected"), GO_GOLDEN_64A)
def test_fnv64a_matches_go_golden_vectors(data: bytes, expected: int) -> None:
    assert fnv64a(data) == expected


def _reference_fnv64a(data: bytes) -> int:
    h = 14695981039346656037
    for b in data:
        h ^= b
        h = (h * 1099511628211) % 2**64
    return h


@given(st.binary(max_size=256))
def test_fnv64a_is_the_64_bit_fnv1a(data: bytes) -> None:
    assert fnv64a(data) == _reference_fnv64a(data)
    assert 0 <= fnv64a(data) < 2**64


def _payloads(data: object) -> list[bytes]:
    assert isinstance(data, RawGossip)
    return data.encode()


def test_new_gossip_is_passed_on_unchanged() -> None:
    g = SurrogateGossiper(INTERVAL)
    assert _payloads(g.on_gossip(b"\x01payload")) == [b"\x01payload"]
    assert _payloads(g.on_gossip(b"other")) == [b"other"]


def test_duplicate_within_the_interval_is_dropped() -> None:
    g = SurrogateGossiper(INTERVAL)
    g.now = 100.0
    assert g.on_gossip(b"same") is not None
    for t in (100.0, 101.0, 129.9):
        g.now = t
        assert g.on_gossip(b"same") is None, f"duplicate at t={t} passed on"
    # A different payload in between is not a duplicate.
    assert g.on_gossip(b"different") is not None


def test_duplicate_after_the_interval_is_passed_on_again() -> None:
    g = SurrogateGossiper(INTERVAL)
    g.now = 100.0
    assert g.on_gossip(b"same") is not None
    g.now = 130.0
    assert _payloads(g.on_gossip(b"same")) == [b"same"]
    # ...and that re-forwarding starts a new interval.
    g.now = 140.0
    assert g.on_gossip(b"same") is None
    g.now = 160.0
    assert g.on_gossip(b"same") is not None


def test_a_dropped_duplicate_does_not_extend_the_interval() -> None:
    g = SurrogateGossiper(INTERVAL)
    g.now = 0.0
    assert g.on_gossip(b"x") is not None
    g.now = 29.0
    assert g.on_gossip(b"x") is None
    g.now = 30.0  # 30 s after the first (forwarded) copy, not after the dropped one
    assert g.on_gossip(b"x") is not None


def test_clock_callable_is_used() -> None:
    now = [0.0]
    g = SurrogateGossiper(INTERVAL, clock=lambda: now[0])
    g.now = 1e9  # ignored when a clock is given
    assert g.on_gossip(b"x") is not None
    now[0] = 10.0
    assert g.on_gossip(b"x") is None
    now[0] = 31.0
    assert g.on_gossip(b"x") is not None


def test_same_hash_different_bytes_is_not_a_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(surrogate, "fnv64a", lambda data: 42)
    g = SurrogateGossiper(INTERVAL)
    assert g.on_gossip(b"one") is not None
    assert g.on_gossip(b"two") is not None
    assert g.on_gossip(b"one") is None


def test_old_entries_are_forgotten() -> None:
    g = SurrogateGossiper(INTERVAL)
    for i in range(10):
        g.now = float(i)
        g.on_gossip(bytes([i]))
    assert g.remembered() == 10
    g.now = 100.0
    g.on_gossip(b"new")
    assert g.remembered() == 1


def test_memory_is_bounded_within_the_interval() -> None:
    g = SurrogateGossiper(INTERVAL)
    for i in range(surrogate._MAX_REMEMBERED + 100):
        assert g.on_gossip(i.to_bytes(4, "big")) is not None
    assert g.remembered() == surrogate._MAX_REMEMBERED
    # The newest are the ones kept.
    assert g.on_gossip((surrogate._MAX_REMEMBERED + 99).to_bytes(4, "big")) is None
    assert g.on_gossip((0).to_bytes(4, "big")) is not None


def test_broadcasts_are_always_passed_on() -> None:
    g = SurrogateGossiper(INTERVAL)
    for _ in range(3):
        assert _payloads(g.on_gossip_broadcast(7, b"bcast")) == [b"bcast"]
    # Broadcasts don't feed the gossip de-duplication either.
    assert g.on_gossip(b"bcast") is not None


def test_unicast_and_full_state() -> None:
    g = SurrogateGossiper(INTERVAL)
    assert g.on_gossip_unicast(7, b"for us") == []
    assert g.gossip() is None


def test_raw_gossip_merge_keeps_every_message_in_order() -> None:
    a, b, c = RawGossip.of(b"a"), RawGossip.of(b"b"), RawGossip.of(b"c")
    merged = a.merge(b).merge(c)
    assert isinstance(merged, RawGossip)
    assert merged.encode() == [b"a", b"b", b"c"]
    assert a.encode() == [b"a"]  # merging made a new value
