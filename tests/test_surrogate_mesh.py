"""Gossip on channels the router does not implement, through Mesh._dispatch: what it
costs is bounded per connection and expires, and no connection is closed for it.

The mesh is real; its connections are real Connection objects without sockets, so
what a receiver task would do with a frame (`_dispatch`, and closing the connection if
that raises a WireError) is run directly, and what would be sent is read from the
connections' queues. Time is trio's MockClock.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from router import ratelog
from router.errors import WireError
from router.handshake import RemoteFeatures
from router.mesh import GOSSIP_INTERVAL, OTHER_CHANNELS, Connection, Mesh, MeshConfig
from router.protocol import GossipMessage, Tag, decode_gossip, encode_gossip, encode_message, split_message
from router.surrogate import _MAX_REMEMBERED, MAX_CHANNEL_NAME, MAX_CHANNELS_PER_CONNECTION, QUIET_INTERVALS
from router.topology import ConnectionSummary, PeerSummary

OURS = 0x0A0000000001
STRANGER, HONEST_A, HONEST_B = 0x0A0000000002, 0x0A0000000003, 0x0A0000000004


def run(test: Callable[[trio.testing.MockClock], None]) -> None:
    """Run a synchronous test body inside trio (the mesh reads trio's clock)."""
    clock = trio.testing.MockClock()

    async def main() -> None:
        test(clock)

    trio.run(main, clock=clock)


def make_mesh(*remotes: int) -> tuple[Mesh, dict[int, Connection]]:
    mesh = Mesh(MeshConfig(name=OURS, nickname="us"), rng=random.Random(1))
    conns = {}
    for i, name in enumerate(remotes):
        conn = Connection(None, False, f"10.9.0.{i + 2}:6783", None)  # type: ignore[arg-type]
        conn.remote = RemoteFeatures(name=name, nickname=f"peer{i}", uid=i + 1, conn_id=i + 1)
        mesh._register(conn)
        conn._queue.clear()  # the full state sent on registering
        conns[name] = conn
    # Each remote says it is connected to us, so broadcasts from it have a tree.
    mesh.peers.apply_update(
        [(PeerSummary(name, f"peer{i}", i + 1, 1), [ConnectionSummary(OURS)]) for i, name in enumerate(remotes)]
    )
    mesh._topology_changed(set(remotes))
    return mesh, conns


def deliver(mesh: Mesh, conn: Connection, tag: Tag, channel: str, payload: bytes, dst: int | None = None) -> None:
    """What the connection's receiver task does with one frame."""
    body = encode_gossip(GossipMessage(tag, channel, conn.remote_name, payload, dst))
    try:
        mesh._dispatch(conn, encode_message(tag, body))
    except WireError as exc:
        conn.close(f"protocol error: {exc}")


def relayed(conn: Connection, channel: str) -> list[bytes]:
    """Payloads on `channel` waiting to be sent on `conn` (queued or pending)."""
    out = []
    for message, _ in conn._queue:
        split = split_message(message)
        assert split is not None
        msg = decode_gossip(*split)
        if msg.channel == channel:
            out.append(msg.payload)
    pending = conn._pending.get(channel)
    if pending is not None:
        out.extend(pending.encode())
    return out


def rejected_for_limit() -> int:
    return ratelog.REJECTS.counts[("gossip", "unknown_channel_limit")]


def test_a_stranger_flooding_names_does_not_cost_honest_peers_their_connections() -> None:
    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(STRANGER, HONEST_A, HONEST_B)
        stranger, a, b = conns[STRANGER], conns[HONEST_A], conns[HONEST_B]
        before = rejected_for_limit()
        for i in range(70):
            deliver(mesh, stranger, Tag.GOSSIP, f"made-up-{i}", b"junk")

        deliver(mesh, a, Tag.GOSSIP, "weave-app", b"state-1")
        assert not a._closing.is_set(), a.close_reason
        assert relayed(b, "weave-app") == [b"state-1"]
        # Beyond its budget the stranger's gossip was dropped and counted; even the stranger
        # stays connected (it may only be relaying someone else's names).
        assert rejected_for_limit() - before == 70 - MAX_CHANNELS_PER_CONNECTION
        assert not stranger._closing.is_set(), stranger.close_reason
        assert len(mesh._surrogates.charged(stranger)) == MAX_CHANNELS_PER_CONNECTION
        assert relayed(stranger, "weave-app") == [b"state-1"]
        assert relayed(a, "weave-app") == []  # never back to the sender
        # The same gossip coming back over another connection is recognised.
        deliver(mesh, b, Tag.GOSSIP, "weave-app", b"state-1")
        assert relayed(a, "weave-app") == []
        assert not b._closing.is_set()

    run(body)


def test_the_stranger_cannot_take_slots_an_honest_connection_holds() -> None:
    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(STRANGER, HONEST_A, HONEST_B)
        stranger, a, b = conns[STRANGER], conns[HONEST_A], conns[HONEST_B]
        names = [f"app-{i}" for i in range(MAX_CHANNELS_PER_CONNECTION)]
        for n in names:
            deliver(mesh, a, Tag.GOSSIP, n, b"hello")
        for round_ in range(10):  # the stranger keeps at it, over many intervals
            for i in range(100):
                deliver(mesh, stranger, Tag.GOSSIP, f"junk-{round_}-{i}", b"junk")
            for n in names:  # honest applications gossip every interval
                deliver(mesh, a, Tag.GOSSIP, n, b"round %d" % round_)
                assert relayed(b, n)[-1] == b"round %d" % round_
            clock.jump(GOSSIP_INTERVAL)
        assert mesh._surrogates.charged(a) == set(names)
        assert not a._closing.is_set() and not stranger._closing.is_set()

    run(body)


def test_quiet_channels_expire_and_free_their_memory() -> None:
    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(STRANGER, HONEST_A, HONEST_B)
        stranger, a = conns[STRANGER], conns[HONEST_A]
        for i in range(70):
            for j in range(10):
                deliver(mesh, stranger, Tag.GOSSIP, f"made-up-{i}", b"junk %d" % j)
        deliver(mesh, a, Tag.GOSSIP, "weave-app", b"state-1")
        assert len(mesh._surrogates) == MAX_CHANNELS_PER_CONNECTION + 1
        assert mesh._surrogates.remembered() == MAX_CHANNELS_PER_CONNECTION * 10 + 1
        # The honest application keeps gossiping; the stranger has gone quiet.
        for _ in range(QUIET_INTERVALS):
            clock.jump(GOSSIP_INTERVAL)
            deliver(mesh, a, Tag.GOSSIP, "weave-app", b"state-1")
        assert mesh._surrogates.channels() == {"weave-app"}
        assert mesh._surrogates.charged(stranger) == set()
        assert mesh._surrogates.remembered() == 1
        # ...and the stranger's budget is whole again.
        before = rejected_for_limit()
        for i in range(MAX_CHANNELS_PER_CONNECTION):
            deliver(mesh, stranger, Tag.GOSSIP, f"later-{i}", b"x")
        assert rejected_for_limit() == before

    run(body)


def test_a_closed_connection_frees_its_channels() -> None:
    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(STRANGER, HONEST_A)
        for i in range(5):
            deliver(mesh, conns[STRANGER], Tag.GOSSIP, f"made-up-{i}", b"junk")
        deliver(mesh, conns[HONEST_A], Tag.GOSSIP, "made-up-0", b"other")
        mesh._surrogates.forget(conns[STRANGER])  # what _run_connection does at the end
        assert mesh._surrogates.channels() == {"made-up-0"}

    run(body)


def test_broadcasts_and_unicasts_of_unknown_channels_are_relayed_without_state() -> None:
    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(STRANGER, HONEST_A, HONEST_B)
        stranger, a, b = conns[STRANGER], conns[HONEST_A], conns[HONEST_B]
        for i in range(70):
            deliver(mesh, stranger, Tag.GOSSIP, f"made-up-{i}", b"junk")
        deliver(mesh, a, Tag.GOSSIP_BROADCAST, "bcast-app", b"to all")
        assert relayed(b, "bcast-app") == [b"to all"]
        deliver(mesh, a, Tag.GOSSIP_UNICAST, "uni-app", b"to b", dst=HONEST_B)
        assert relayed(b, "uni-app") == [b"to b"]
        deliver(mesh, a, Tag.GOSSIP_UNICAST, "uni-app", b"to us", dst=OURS)
        assert "bcast-app" not in mesh._surrogates and "uni-app" not in mesh._surrogates
        assert not any(c._closing.is_set() for c in conns.values())

    run(body)


def test_a_channel_name_too_long_to_keep_is_dropped_and_counted() -> None:
    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(STRANGER, HONEST_A)
        key = ("gossip", "unknown_channel_name_too_long")
        before = ratelog.REJECTS.counts[key]
        deliver(mesh, conns[STRANGER], Tag.GOSSIP, "n" * (MAX_CHANNEL_NAME + 1), b"junk")
        assert ratelog.REJECTS.counts[key] == before + 1
        assert len(mesh._surrogates) == 0 and not conns[STRANGER]._closing.is_set()
        assert relayed(conns[HONEST_A], "n" * (MAX_CHANNEL_NAME + 1)) == []

    run(body)


def test_gossip_counters_do_not_grow_with_made_up_names() -> None:
    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(STRANGER, HONEST_A)
        for i in range(500):
            deliver(mesh, conns[STRANGER], Tag.GOSSIP_BROADCAST, f"made-up-{i}", b"junk")
        deliver(mesh, conns[STRANGER], Tag.GOSSIP, "topology", b"")
        assert set(mesh.gossip_bytes_received) <= {"topology", OTHER_CHANNELS}
        assert set(mesh.gossip_messages_received) <= {"topology", OTHER_CHANNELS}
        assert mesh.gossip_messages_received[OTHER_CHANNELS] == 500

    run(body)


def test_metric_label_of_a_channel() -> None:
    mesh, _ = make_mesh()
    mesh.add_channel("IPallocation", object())  # type: ignore[arg-type]
    assert mesh._metric_channel("topology") == "topology"
    assert mesh._metric_channel("IPallocation") == "IPallocation"
    assert mesh._metric_channel("made-up") == OTHER_CHANNELS


NAMES = st.one_of(st.sampled_from(["weave-app", "IPx", "a", "b"]), st.text(max_size=12))
EVENTS = st.lists(
    st.tuples(
        st.integers(0, 2),  # which connection (0 is the stranger; all are treated alike)
        NAMES,
        st.binary(max_size=8),
        st.floats(0, 2 * GOSSIP_INTERVAL),  # time since the previous input
        st.sampled_from([Tag.GOSSIP, Tag.GOSSIP, Tag.GOSSIP_BROADCAST]),
    ),
    max_size=150,
)


@settings(max_examples=60, deadline=None)
@given(EVENTS)
def test_surrogate_state_is_always_within_its_bound(events: list[tuple[int, str, bytes, float, Tag]]) -> None:
    names = [STRANGER, HONEST_A, HONEST_B]

    def body(clock: trio.testing.MockClock) -> None:
        mesh, conns = make_mesh(*names)
        table = mesh._surrogates
        for which, channel, payload, dt, tag in events:
            clock.jump(dt)
            deliver(mesh, conns[names[which]], tag, channel, payload)
            assert not any(c._closing.is_set() for c in conns.values())
            per_conn = [len(table.charged(c)) for c in conns.values()]
            assert max(per_conn) <= MAX_CHANNELS_PER_CONNECTION
            assert table.charges() == sum(per_conn)
            assert len(table) <= len(conns) * MAX_CHANNELS_PER_CONNECTION
            assert table.remembered() <= len(table) * _MAX_REMEMBERED
            assert len(mesh.gossip_messages_received) <= 2
        clock.jump(QUIET_INTERVALS * GOSSIP_INTERVAL + 1)  # + 1: the clock's sums are floats
        table.expire(trio.current_time())
        assert len(table) == 0 and table.remembered() == 0

    run(body)
