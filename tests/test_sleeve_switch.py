"""sleeve.switch: MAC learning and where frames go, over a fixed route table."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router import ratelog
from sleeve.switch import MacTable, Switch

US, B, C, D = 1, 2, 3, 4
MAC_LOCAL = bytes.fromhex("0a0000000001")
MAC_B = bytes.fromhex("0a00000000b0")
MAC_C = bytes.fromhex("0a00000000c0")
BCAST = b"\xff" * 6


class Routes:
    """Line US - B - C, and D a direct neighbour of us."""

    def next_hop(self, dest: int) -> int | None:
        return {US: 0, B: B, C: B, D: D}.get(dest)

    def broadcast(self, origin: int) -> list[int]:
        return {US: [B, D], B: [D], C: [D], D: [B]}[origin]

    def broadcast_via(self, hop: int, origin: int) -> list[int]:
        return {(B, US): [C], (D, US): []}[(hop, origin)]


def frame(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x08\x00" + bytes(46)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Switch, Clock]:
    clock = Clock()
    return Switch(US, Routes, clock), clock


def test_broadcast_and_unknown_go_over_our_broadcast_tree() -> None:
    switch, _ = make()
    assert switch.from_local(frame(BCAST, MAC_LOCAL)) == [(B, B), (D, D)]
    assert switch.from_local(frame(MAC_C, MAC_LOCAL)) == [(B, B), (D, D)]


def test_learnt_remote_mac_goes_along_the_unicast_route() -> None:
    switch, _ = make()
    deliver, hops = switch.from_peer(B, C, US, frame(BCAST, MAC_C))
    assert deliver and hops == [(D, D)]  # C's broadcast tree, as we see it
    assert switch.from_local(frame(MAC_C, MAC_LOCAL)) == [(B, C)]


def test_local_destination_is_left_to_the_bridge() -> None:
    switch, _ = make()
    switch.from_local(frame(BCAST, MAC_LOCAL))
    assert switch.from_local(frame(MAC_LOCAL, MAC_B)) == []


def test_frames_for_others_are_relayed_not_delivered() -> None:
    switch, _ = make()
    deliver, hops = switch.from_peer(D, D, C, frame(MAC_C, bytes.fromhex("0a00000000d0")))
    assert not deliver and hops == [(B, C)]


def test_relay_back_to_the_sender_is_dropped() -> None:
    switch, _ = make()
    deliver, hops = switch.from_peer(B, D, C, frame(MAC_C, MAC_B))
    assert not deliver and hops == []


def test_unicast_to_a_known_local_mac_is_not_flooded_on() -> None:
    switch, _ = make()
    switch.from_local(frame(BCAST, MAC_LOCAL))
    deliver, hops = switch.from_peer(B, B, US, frame(MAC_LOCAL, MAC_B))
    assert deliver and hops == []


def test_stp_frames_stay_home() -> None:
    switch, _ = make()
    assert switch.from_local(frame(bytes.fromhex("0180c2000000"), MAC_LOCAL)) == []


def test_mac_entries_expire_and_moves_are_reported() -> None:
    table = MacTable(expiry=10)
    assert table.learn(MAC_B, B, 0.0) is None
    assert table.lookup(MAC_B, 5.0) == B
    assert table.learn(MAC_B, C, 6.0) == B
    assert table.lookup(MAC_B, 17.0) is None
    assert table.expire(17.0) == 1 and len(table) == 0
    table.learn(MAC_C, C, 0.0)
    table.forget_peer(C)
    assert table.lookup(MAC_C, 0.0) is None


def test_kernel_reached_neighbours_get_no_sleeve_copy_but_their_children_do() -> None:
    switch, _ = make()
    switch.kernel_peers = frozenset({B, D})
    # B is reached by the kernel; C (B's child in our tree) gets a copy addressed to it, via B.
    assert switch.from_local(frame(BCAST, MAC_LOCAL)) == [(B, C)]
    switch.kernel_peers = frozenset({D})
    assert switch.from_local(frame(BCAST, MAC_LOCAL)) == [(B, B)]


def test_group_source_addresses_are_not_learnt() -> None:
    table = MacTable()
    assert table.learn(BCAST, B, 0.0) is None
    assert table.lookup(BCAST, 0.0) is None and len(table) == 0


def test_expired_macs_are_swept() -> None:
    switch, clock = make()
    switch.from_peer(B, B, US, frame(BCAST, MAC_B))
    clock.now = 10_000.0
    assert switch.expire_macs() == 1 and len(switch.macs) == 0


def _mac(i: int) -> bytes:
    return bytes((0x02,)) + i.to_bytes(5, "big")


def test_remote_macs_are_bounded_and_local_ones_still_learnt() -> None:
    # A peer (or, on a plain sleeve, anyone who writes a known peer's name into a datagram)
    # could fill the table with made-up source MACs for the whole expiry time.
    table = MacTable(max_remote=100)
    counted = ratelog.REJECTS.counts[("sleeve", "mac_table_full")]
    for i in range(1000):
        table.learn(_mac(i), B, 1.0)
    assert len(table) == 100 and table.refused == 900
    assert ratelog.REJECTS.counts[("sleeve", "mac_table_full")] == counted + 900  # in /metrics
    assert table.lookup(_mac(0), 1.0) == B  # what was learnt first stays
    assert table.lookup(_mac(999), 1.0) is None  # unknown: the frame is flooded, still delivered
    table.learn(MAC_LOCAL, US, 1.0, local=True)
    assert table.lookup(MAC_LOCAL, 1.0) == US
    table.learn(_mac(0), C, 2.0)  # a known MAC may still move
    assert table.lookup(_mac(0), 2.0) == C


def test_a_full_table_makes_room_once_entries_expire() -> None:
    table = MacTable(expiry=10, max_remote=10)
    for i in range(10):
        table.learn(_mac(i), B, 0.0)
    table.learn(_mac(50), B, 5.0)
    assert table.lookup(_mac(50), 5.0) is None
    table.learn(_mac(51), B, 20.0)  # the old ones have expired: swept, and room again
    assert table.lookup(_mac(51), 20.0) == B and len(table) == 1


def test_a_mac_flood_costs_no_sweep_per_frame() -> None:
    table = MacTable(max_remote=1000)
    sweeps = 0
    original = table.expire

    def counting(now: float) -> int:
        nonlocal sweeps
        sweeps += 1
        return original(now)

    table.expire = counting  # type: ignore[method-assign]
    for i in range(20_000):
        table.learn(_mac(i), B, 1.0 + i * 1e-5)  # 0.2 s of flood
    assert sweeps <= 1


def test_switch_learns_remote_macs_within_the_bound() -> None:
    switch, _ = make()
    switch.macs = MacTable(max_remote=5)
    for i in range(50):
        switch.from_peer(B, B, US, frame(BCAST, _mac(i)))
    switch.from_local(frame(BCAST, MAC_LOCAL))
    assert len(switch.macs) == 6 and switch.macs.lookup(MAC_LOCAL, 0.0) == US


def test_default_table_is_bounded() -> None:
    switch, _ = make()
    for i in range(150_000):
        switch.from_peer(B, B, US, frame(BCAST, _mac(i)))
    assert len(switch.macs) <= 100_000


_OPS = st.lists(
    st.tuples(st.sampled_from(["remote", "local", "expire", "forget"]), st.integers(0, 40), st.integers(0, 3)),
    max_size=200,
)


@given(_OPS)
def test_table_never_exceeds_its_bounds(ops: list[tuple[str, int, int]]) -> None:
    table = MacTable(expiry=5, max_remote=8, max_local=4)
    now = 0.0
    for op, mac, peer in ops:
        now += 0.5
        if op == "remote":
            table.learn(_mac(mac), B + peer, now)
        elif op == "local":
            table.learn(_mac(mac), US, now, local=True)
        elif op == "expire":
            table.expire(now)
        else:
            table.forget_peer(B + peer)
        remote = sum(1 for _, _, local in table._macs.values() if not local)
        assert remote <= 8 and len(table) - remote <= 4
        assert table._counts == [remote, len(table) - remote]
