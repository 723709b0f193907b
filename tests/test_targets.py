"""The connection maker's bookkeeping (router/targets.py): what to dial and when."""

from __future__ import annotations

import ipaddress
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.targets import (
    BACKOFF_FACTOR,
    BUSY_HOST_RECHECK,
    DISCOVERY_DEFER,
    DISCOVERY_DEFER_SHORT,
    INITIAL_INTERVAL,
    LONG_LIVED,
    MAX_DISCOVERED,
    MAX_INTERVAL,
    ConnectionMaker,
    PeerAddress,
    TargetState,
    discovery_delay,
    normalise_address,
    valid_hostname,
)

A = "10.0.0.1:6783"
B = "10.0.0.2:6783"
C = "10.0.0.3:6783"


def _target(maker: ConnectionMaker, address: str):  # type: ignore[no-untyped-def]
    found = [t for t in maker.targets() if t.address == address]
    assert found, f"no target {address}"
    return found[0]


def _addresses(maker: ConnectionMaker) -> list[str]:
    return [t.address for t in maker.targets()]


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected", "host", "port"),
    [
        ("10.0.0.1", "10.0.0.1:6783", "10.0.0.1", 6783),
        (" 10.0.0.1 ", "10.0.0.1:6783", "10.0.0.1", 6783),
        ("10.0.0.1:7000", "10.0.0.1:7000", "10.0.0.1", 7000),
        ("10.0.0.1:07000", "10.0.0.1:7000", "10.0.0.1", 7000),
        ("host.example", "host.example:6783", "host.example", 6783),
        ("host.example.:1", "host.example.:1", "host.example.", 1),
        ("a-b.c9:65535", "a-b.c9:65535", "a-b.c9", 65535),
        ("a" * 63 + ".x", "a" * 63 + ".x:6783", "a" * 63 + ".x", 6783),
        ("[::1]:7000", "[::1]:7000", "::1", 7000),
        ("[fd00:0::1]", "[fd00::1]:6783", "fd00::1", 6783),
        ("fd00::1", "[fd00::1]:6783", "fd00::1", 6783),
        ("[fe80::1%eth0]:1", "[fe80::1%eth0]:1", "fe80::1%eth0", 1),
    ],
)
def test_normalise_address(text: str, expected: str, host: str, port: int) -> None:
    addr = normalise_address(text)
    assert addr == expected
    assert isinstance(addr, PeerAddress) and (addr.host, addr.port) == (host, port)


def test_normalise_address_default_port() -> None:
    assert normalise_address("10.0.0.1", 9999) == "10.0.0.1:9999"


@pytest.mark.parametrize(
    "text",
    [
        "", "  ", ":6783", "10.0.0.1:", "10.0.0.1:x", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:+80",
        "10.0.0.1:٣", "10.0.0.1: 80", "10.0.0.1:99999999999999999999",
        # Issue 12: what made getaddrinfo raise UnicodeError (IDNA) and killed the daemon.
        "a" * 64 + ":6783", "\xff", "\udcff", "\u2603", "ÿ.example", "b\xfccher.example",
        "a" * 250 + ".example", ("a." * 127) + "ab", "x" * 10_000,
        "-host", "host-", "ho_st", "host..example", ".host", "host name", "host\x00", "ho%st",
        "1.2.3", "999.1.1.1", "10.0.0.1.", "[10.0.0.1]:80", "[::1", "[::1]x", "[host]:80", "::1:80:x",
        "10.0.0.1%eth0", "fe80::1%", "fe80::1%a/b", "[::1]:0",
    ],
)
def test_normalise_address_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="peer address"):
        normalise_address(text)


def test_hostname_limits() -> None:
    assert valid_hostname("a" * 63)
    assert not valid_hostname("a" * 64)
    name = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
    assert len(name) == 253 and valid_hostname(name) and valid_hostname(name + ".")
    assert not valid_hostname(name + "a")


def _check_parsed(addr: PeerAddress) -> None:
    assert isinstance(addr, PeerAddress)
    assert 1 <= addr.port <= 65535
    host = addr.host
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        assert valid_hostname(host), host
        assert addr == f"{host}:{addr.port}"
    else:
        assert addr in (f"{host}:{addr.port}", f"[{host}]:{addr.port}")
    # What the dialler hands to getaddrinfo encodes without error (IDNA included).
    host.partition("%")[0].encode("idna")
    # Canonical: parsing the result again gives the same address.
    assert normalise_address(addr) == addr


_ADDRESS_ALPHABET = st.sampled_from("abz09-.:[]%_ \xff\u2603")


@given(
    st.one_of(
        st.text(),
        st.binary().map(lambda b: b.decode("latin-1")),
        st.text(_ADDRESS_ALPHABET, max_size=80),
        st.builds(lambda h, p: f"{h}:{p}", st.text(_ADDRESS_ALPHABET, max_size=70), st.integers(-5, 70000)),
        st.ip_addresses().map(str),
        st.builds(lambda ip, p: f"[{ip}]:{p}", st.ip_addresses(v=6), st.integers(0, 65536)),
    ),
    st.integers(1, 65535),
)
def test_any_text_is_a_valid_address_or_a_value_error(text: str, default_port: int) -> None:
    try:
        addr = normalise_address(text, default_port)
    except ValueError as exc:
        assert "peer address" in str(exc)
        return
    _check_parsed(addr)


# ---------------------------------------------------------------- dialling


def test_direct_target_is_due_at_once_and_only_once() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A], now=10.0)
    assert maker.next_wakeup() == 10.0
    assert maker.due(10.0) == [A]
    t = _target(maker, A)
    assert t.state is TargetState.CONNECTING and t.attempts == 1
    assert maker.due(11.0) == []  # a dial is in progress
    assert maker.next_wakeup() is None


def test_connected_target_is_not_dialled() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A], now=0.0)
    maker.due(0.0)
    maker.connected(A, 1.0)
    t = _target(maker, A)
    assert t.state is TargetState.CONNECTED and t.last_error == ""
    assert maker.due(1000.0) == []
    assert maker.next_wakeup() is None


def test_due_skips_addresses_already_connected_and_inbound_hosts() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A, B, "10.0.0.3:7000"], now=0.0)
    due = maker.due(0.0, skip_hosts={"10.0.0.2", "10.0.0.3"}, connected={A})
    # B is at an IP we have an inbound connection from (default port: assumed the same
    # peer); the non-default port is a different router and still dialled.
    assert due == ["10.0.0.3:7000"]
    assert _target(maker, A).state is TargetState.WAITING
    assert _target(maker, B).state is TargetState.WAITING
    # Skipped targets are looked at again later, not in a busy loop.
    assert maker.next_wakeup() == BUSY_HOST_RECHECK
    assert maker.due(0.5) == []
    assert sorted(maker.due(BUSY_HOST_RECHECK)) == [A, B]


def test_due_skips_an_inbound_ipv6_host() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    v6 = normalise_address("[fd00::2]")
    maker.add_direct([v6], now=0.0)
    assert maker.due(0.0, skip_hosts={"fd00::2"}) == []
    assert maker.due(BUSY_HOST_RECHECK) == [v6]


def test_due_limit_takes_the_longest_waiting_first() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A], now=5.0)
    maker.add_direct([B], now=1.0)
    maker.add_direct([C], now=3.0)
    assert maker.due(10.0, limit=2) == [B, C]
    assert _target(maker, A).state is TargetState.WAITING  # still due, not lost
    assert maker.due(10.0, limit=2) == [A]


# ---------------------------------------------------------------- backoff


def _fail_repeatedly(maker: ConnectionMaker, addr: str, times: int, start: float = 0.0) -> list[float]:
    """Dial and fail `times` times, each retry as soon as it is due; returns the delays."""
    now = start
    delays = []
    for _ in range(times):
        assert maker.due(now) == [addr]
        maker.failed(addr, now, "connection refused")
        t = _target(maker, addr)
        assert t.state is TargetState.RETRYING and t.last_error == "connection refused"
        delays.append(t.try_after - now)
        assert maker.due(t.try_after - 1e-6) == [], "due before its retry time"
        now = t.try_after
    return delays


def test_backoff_schedule_with_a_seeded_rng() -> None:
    seed = 1234
    maker = ConnectionMaker(rng=random.Random(seed))
    maker.add_direct([A], now=0.0)
    delays = _fail_repeatedly(maker, A, 12)
    # The same seed gives the same jitter draws: delay_k = i_k * (0.5 + r_k),
    # i_0 = 2 s, i_{k+1} = min(1.5 i_k, 360 s).
    rng = random.Random(seed)
    interval = INITIAL_INTERVAL
    for k, delay in enumerate(delays):
        assert delay == pytest.approx(interval * (0.5 + rng.random())), f"retry {k}"
        interval = min(interval * BACKOFF_FACTOR, MAX_INTERVAL)
    assert _target(maker, A).attempts == 12


def test_first_retry_is_between_one_and_three_seconds() -> None:
    for seed in range(200):
        maker = ConnectionMaker(rng=random.Random(seed))
        maker.add_direct([A], now=5.0)
        (delay,) = _fail_repeatedly(maker, A, 1, start=5.0)
        assert 1.0 <= delay < 3.0


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=40))
def test_jitter_bounds(seed: int, failures: int) -> None:
    maker = ConnectionMaker(rng=random.Random(seed))
    maker.add_direct([A], now=0.0)
    delays = _fail_repeatedly(maker, A, failures)
    for k, delay in enumerate(delays):
        interval = min(INITIAL_INTERVAL * BACKOFF_FACTOR**k, MAX_INTERVAL)
        assert interval / 2 <= delay < interval * 1.5 + 1e-9


def test_backoff_is_capped_at_six_minutes() -> None:
    maker = ConnectionMaker(rng=random.Random(7))
    maker.add_direct([A], now=0.0)
    # 2 * 1.5^k passes 360 s after 13 steps.
    capped_after = math.ceil(math.log(MAX_INTERVAL / INITIAL_INTERVAL, BACKOFF_FACTOR))
    delays = _fail_repeatedly(maker, A, capped_after + 10)
    assert _target(maker, A).interval == MAX_INTERVAL == 360.0
    for delay in delays[capped_after:]:
        assert 180.0 <= delay < 540.0
    assert max(delays) < 540.0


def test_retry_now_when_gossip_reports_a_new_or_restarted_peer() -> None:
    maker = ConnectionMaker(rng=random.Random(3))
    maker.add_direct([A], now=0.0)
    _fail_repeatedly(maker, A, 8)
    t = _target(maker, A)
    now = t.try_after - 20.0
    assert maker.due(now) == []
    maker.retry_now({A, "10.9.9.9:6783"}, now)  # an unknown address is ignored
    assert maker.due(now) == [A]
    # The backoff starts again from the beginning.
    maker.failed(A, now, "refused")
    assert 1.0 <= _target(maker, A).try_after - now < 3.0
    assert _addresses(maker) == [A]


def test_retry_now_leaves_connecting_and_connected_targets_alone() -> None:
    maker = ConnectionMaker(rng=random.Random(3))
    maker.add_direct([A, B], now=0.0)
    maker.due(0.0)
    maker.connected(B, 0.5)
    maker.retry_now({A, B}, 1.0)
    assert _target(maker, A).state is TargetState.CONNECTING
    assert _target(maker, B).state is TargetState.CONNECTED
    assert maker.due(1.0) == []


def test_retry_now_revives_a_permanently_failed_target() -> None:
    # e.g. a peer-name collision that went away: the peer was restarted with a new identity.
    maker = ConnectionMaker(rng=random.Random(3))
    maker.add_direct([A], now=0.0)
    maker.due(0.0)
    maker.failed(A, 0.0, "peer names collision", permanent=True)
    maker.retry_now({A}, 50.0)
    assert maker.due(50.0) == [A]


def test_long_lived_connection_is_retried_at_once() -> None:
    maker = ConnectionMaker(rng=random.Random(5))
    maker.add_direct([A], now=0.0)
    _fail_repeatedly(maker, A, 6)  # a grown interval
    now = _target(maker, A).try_after
    assert maker.due(now) == [A]
    maker.connected(A, now)
    end = now + LONG_LIVED + 1.0
    maker.failed(A, end, "connection reset")
    t = _target(maker, A)
    assert t.state is TargetState.RETRYING and t.try_after == end
    assert t.interval == INITIAL_INTERVAL
    assert maker.due(end) == [A]


def test_short_lived_connection_backs_off() -> None:
    maker = ConnectionMaker(rng=random.Random(5))
    maker.add_direct([A], now=0.0)
    maker.due(0.0)
    maker.connected(A, 0.0)
    maker.failed(A, LONG_LIVED - 1.0, "connection reset")
    t = _target(maker, A)
    assert t.try_after > LONG_LIVED - 1.0
    assert maker.due(LONG_LIVED - 1.0) == []


def test_permanent_failure_is_never_retried() -> None:
    maker = ConnectionMaker(rng=random.Random(5))
    maker.add_direct([A], now=0.0)
    maker.due(0.0)
    maker.failed(A, 0.0, "cannot connect to ourself", permanent=True)
    t = _target(maker, A)
    assert t.state is TargetState.FAILED and t.last_error == "cannot connect to ourself"
    assert maker.due(1e9) == []
    assert maker.next_wakeup() is None


def test_next_wakeup_is_the_earliest_retry() -> None:
    maker = ConnectionMaker(rng=random.Random(9))
    maker.add_direct([A, B], now=0.0)
    maker.due(0.0)
    maker.failed(A, 0.0, "x")
    maker.failed(B, 0.0, "y")
    assert maker.next_wakeup() == min(_target(maker, A).try_after, _target(maker, B).try_after)


def test_failure_of_an_unknown_target_is_ignored() -> None:
    maker = ConnectionMaker(rng=random.Random(9))
    maker.failed(A, 0.0, "x")
    maker.connected(A, 0.0)
    assert maker.targets() == []


# ---------------------------------------------------------------- connect / replace / forget


def test_connect_replace_drops_other_direct_targets() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A, B], now=0.0)
    maker.due(0.0)
    maker.connected(A, 0.0)
    maker.add_direct([C], now=1.0, replace=True)
    assert maker.direct_targets() == [C]
    # A's connection stays up (no longer a direct target); B, not connected, is gone.
    assert _addresses(maker) == [A, C]
    assert _target(maker, A).state is TargetState.CONNECTED and not _target(maker, A).direct


def test_connect_without_replace_adds() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A], now=0.0)
    maker.add_direct([B, A], now=0.0)
    assert maker.direct_targets() == [A, B]


def test_connect_promotes_a_discovered_target() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.set_discovered({A}, 0.0)
    assert maker.direct_targets() == []
    maker.add_direct([A], now=0.0)
    assert maker.direct_targets() == [A]
    maker.set_discovered(set(), 1.0)  # no longer discovered, but direct now
    assert _addresses(maker) == [A]


def test_forget_removes_direct_targets_only() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A, B], now=0.0)
    maker.set_discovered({C}, 0.0)
    maker.forget([A, C, "10.9.9.9:6783"])
    assert maker.direct_targets() == [B]
    assert _addresses(maker) == [B, C]
    assert maker.due(0.0) == [B, C]


# ---------------------------------------------------------------- discovery


def test_discovered_targets_come_and_go_with_gossip() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A], now=0.0)
    maker.set_discovered({B, C}, 1.0)
    assert _addresses(maker) == [A, B, C]
    assert maker.direct_targets() == [A]
    assert sorted(maker.due(1.0)) == [A, B, C]
    maker.connected(B, 1.5)
    maker.failed(C, 1.5, "refused")
    # Gossip no longer mentions B or C: the undialled one is dropped, the connected kept.
    maker.set_discovered(set(), 2.0)
    assert _addresses(maker) == [A, B]


def test_discovered_targets_are_bounded() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A], now=0.0)
    flood = {f"10.2.{i // 250}.{i % 250 + 1}:6783" for i in range(MAX_DISCOVERED + 10)}
    assert maker.set_discovered(flood, 0.0) == 10
    assert len(maker.targets()) == MAX_DISCOVERED + 1  # the direct one is not counted
    assert maker.set_discovered(flood, 1.0) == 10  # the same ones kept, the same left out
    assert maker.set_discovered({B}, 2.0) == 0
    assert _addresses(maker) == [A, B]


def test_rediscovery_does_not_reset_backoff() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.set_discovered({B}, 0.0)
    maker.due(0.0)
    maker.failed(B, 0.0, "refused")
    before = _target(maker, B).try_after
    maker.set_discovered({B}, 0.5)
    assert _target(maker, B).try_after == before
    assert maker.due(0.5) == []


def test_discovery_off_ignores_gossip() -> None:
    maker = ConnectionMaker(rng=random.Random(1), discovery=False)
    maker.add_direct([A], now=0.0)
    maker.set_discovered({B, C}, 0.0)
    assert _addresses(maker) == [A]
    assert maker.due(0.0) == [A]
    maker.retry_now({B}, 0.0)
    assert _addresses(maker) == [A]


def test_deferred_discovery_waits_for_the_other_side() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.set_discovered({B, C}, 10.0, {C: DISCOVERY_DEFER})
    assert maker.due(10.0) == [B]
    assert maker.next_wakeup() == 10.0 + DISCOVERY_DEFER
    # The peer at C dialled us meanwhile: gossip no longer suggests C, so it is dropped.
    maker.set_discovered({B}, 10.5, {C: DISCOVERY_DEFER})
    assert _addresses(maker) == [B]
    # Had it not, we dial it ourselves once the deferral is over.
    maker.set_discovered({B, C}, 11.0, {C: DISCOVERY_DEFER})
    assert maker.due(11.0 + DISCOVERY_DEFER - 0.01) == []
    assert maker.due(11.0 + DISCOVERY_DEFER) == [C]


def test_defer_applies_to_new_discovered_targets_only() -> None:
    maker = ConnectionMaker(rng=random.Random(1))
    maker.add_direct([A], now=0.0)
    maker.set_discovered({A, B}, 0.0)
    maker.set_discovered({A, B}, 0.0, {A: DISCOVERY_DEFER, B: DISCOVERY_DEFER})  # already known: unchanged
    assert sorted(maker.due(0.0)) == [A, B]


def test_who_dials_a_discovered_peer() -> None:
    me, lower, higher = 50, 10, 90
    # Before we have joined, and for peers that were there when we joined: at once.
    assert discovery_delay(lower, me, first_seen=5.0, joined_at=None) == 0.0
    assert discovery_delay(higher, me, first_seen=None, joined_at=4.0) == 0.0
    assert discovery_delay(higher, me, first_seen=4.0, joined_at=4.0) == 0.0
    # A newcomer knew of us on joining and dials us; if it sees us as a newcomer too,
    # the higher-named of the two goes first.
    assert discovery_delay(higher, me, first_seen=4.1, joined_at=4.0) == DISCOVERY_DEFER
    assert discovery_delay(lower, me, first_seen=4.1, joined_at=4.0) == DISCOVERY_DEFER_SHORT
    assert DISCOVERY_DEFER_SHORT < DISCOVERY_DEFER
