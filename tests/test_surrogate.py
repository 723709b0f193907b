"""The surrogate gossiper that relays channels this router has no application for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router import ratelog, surrogate
from router.surrogate import (
    _MAX_PENDING,
    _MAX_PENDING_BYTES,
    MAX_CHANNEL_NAME,
    RawGossip,
    SurrogateGossiper,
    SurrogateTable,
)

INTERVAL = 30.0


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


def test_payloads_differing_in_one_byte_are_not_duplicates() -> None:
    g = SurrogateGossiper(INTERVAL)
    assert g.on_gossip(b"one") is not None
    assert g.on_gossip(b"onf") is not None
    assert g.on_gossip(b"one") is None
    assert g.remembered() == 2


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


def test_a_big_payload_is_remembered_by_a_fixed_size_digest() -> None:
    g = SurrogateGossiper(INTERVAL)
    big = b"x" * 1_000_000
    assert g.on_gossip(big) is not None
    assert g.on_gossip(bytes(big)) is None
    (key,) = g._seen
    assert len(key) == 16  # not the payload itself


def test_pending_relayed_gossip_is_bounded_newest_kept() -> None:
    before = ratelog.REJECTS.counts[("gossip", "relay_backlog")]
    data = RawGossip.of(b"0")
    for i in range(1, 200):
        merged = data.merge(RawGossip.of(str(i).encode()))
        assert isinstance(merged, RawGossip)
        data = merged
    assert len(data.payloads) == _MAX_PENDING
    assert data.payloads[-1] == b"199" and data.payloads[0] == str(200 - _MAX_PENDING).encode()
    assert ratelog.REJECTS.counts[("gossip", "relay_backlog")] - before == 200 - _MAX_PENDING
    # By bytes too, but the newest payload is always kept, however big.
    half = RawGossip.of(b"a" * (_MAX_PENDING_BYTES // 2 + 1))
    assert half.merge(half).encode() == half.encode()
    huge = RawGossip.of(b"h" * (_MAX_PENDING_BYTES + 1))
    assert RawGossip.of(b"small").merge(huge).encode() == huge.encode()


# ---------------------------------------------------------------- the table


def test_table_charges_each_connection_for_its_own_channels() -> None:
    t = SurrogateTable(INTERVAL, per_connection=3)
    for name in ("a", "b", "c"):
        assert t.gossiper("stranger", name, 0.0) is not None
    assert t.gossiper("stranger", "d", 0.0) is None  # its budget is spent
    assert t.gossiper("stranger", "a", 0.0) is not None  # what it holds still works
    assert t.gossiper("honest", "d", 0.0) is not None  # another's budget is its own
    assert t.gossiper("honest", "a", 0.0) is t.gossiper("stranger", "a", 0.0)  # shared de-duplication
    assert t.charged("stranger") == {"a", "b", "c"} and t.charged("honest") == {"a", "d"}
    assert t.channels() == {"a", "b", "c", "d"} and t.charges() == 5


def test_table_charges_lapse_after_the_quiet_time() -> None:
    t = SurrogateTable(INTERVAL, per_connection=2, quiet=90.0)
    g = t.gossiper("stranger", "a", 0.0)
    assert g is not None and g.on_gossip(b"p") is not None
    assert t.gossiper("stranger", "b", 0.0) is not None
    assert t.gossiper("honest", "a", 50.0) is not None
    t.expire(89.9)
    assert t.charged("stranger") == {"a", "b"}
    t.expire(90.0)
    assert t.charged("stranger") == set()
    assert t.channels() == {"a"}  # still carried by the honest connection
    assert t.remembered() == 1
    assert t.gossiper("stranger", "c", 90.0) is not None  # its budget is whole again
    t.expire(140.0)
    assert t.channels() == {"c"} and t.remembered() == 0


def test_table_refreshing_a_charge_keeps_it() -> None:
    t = SurrogateTable(INTERVAL, per_connection=1, quiet=90.0)
    for now in range(0, 1000, 30):
        assert t.gossiper("honest", "app", float(now)) is not None
    assert t.charged("honest") == {"app"}


def test_table_forget_releases_a_closed_connection() -> None:
    t = SurrogateTable(INTERVAL, per_connection=4)
    for name in ("a", "b"):
        t.gossiper("gone", name, 0.0)
    t.gossiper("stays", "b", 0.0)
    t.forget("gone")
    t.forget("never seen")
    assert t.channels() == {"b"} and t.charges() == 1


def test_table_refuses_names_too_long_to_keep() -> None:
    t = SurrogateTable(INTERVAL)
    assert t.gossiper("c", "n" * (MAX_CHANNEL_NAME + 1), 0.0) is None
    assert t.gossiper("c", "n" * MAX_CHANNEL_NAME, 0.0) is not None
    assert t.charges() == 1


@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.text(max_size=4), st.binary(max_size=4), st.floats(0, 100)),
        max_size=300,
    )
)
def test_table_never_exceeds_its_bound(events: list[tuple[int, str, bytes, float]]) -> None:
    per_conn = 4
    t = SurrogateTable(INTERVAL, per_connection=per_conn, quiet=3 * INTERVAL)
    now = 0.0
    for conn, name, payload, dt in events:
        now += dt
        g = t.gossiper(conn, name, now)
        if g is not None:
            g.on_gossip(payload)
        assert all(len(t.charged(c)) <= per_conn for c in range(5))
        assert len(t) <= 5 * per_conn
        assert t.remembered() <= len(t) * surrogate._MAX_REMEMBERED
        # Nothing held that no connection has used within the quiet time.
        assert all(now - last < t.quiet for last in t._charges.values())
