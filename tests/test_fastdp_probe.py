"""Probe codec (property-based) and VXLAN-path heartbeats on the real kernel."""

from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastdp import probe, vxlan
from fastdp.health import HealthMonitor, LinkState, SendAck, SendHeartbeat, Transition
from fastdp.probe import (
    ECHO_FRAME_LEN,
    ETHERTYPE,
    HEADER_LEN,
    MIN_FRAME,
    PathMtuError,
    ProbeAuthError,
    ProbeEndpoint,
    ProbeFrame,
    ProbeKind,
    ProbeMessage,
    decode_datagram,
    decode_frame,
    decode_vxlan,
    encode_datagram,
    encode_frame,
    encode_vxlan,
    frame_sender,
    heartbeat_frame_size,
    outer_packet_size,
    probe_mac,
)
from router.errors import WireError
from router.testbed import Host, Testbed
from tests.test_fastdp_vxlan import make_bridge

U64 = (1 << 64) - 1
NAME_A = 0x02_00_00_00_0A_01
NAME_B = 0x02_00_00_00_0B_02
UID = 0xFEED_F00D_0000_0001

messages = st.builds(
    ProbeMessage,
    kind=st.sampled_from(ProbeKind),
    sender=st.integers(1, (1 << 48) - 1),
    conn_uid=st.integers(0, U64),
    seq=st.integers(0, U64),
    timestamp_ns=st.integers(0, U64),
    echo_seq=st.integers(0, U64),
    echo_timestamp_ns=st.integers(0, U64),
    echo_hold_ns=st.integers(0, U64),
    ack_wanted=st.booleans(),
)
macs = st.binary(min_size=6, max_size=6)


def carried(msg: ProbeMessage, size: int) -> ProbeMessage:
    """What a frame of `size` bytes carries of `msg`: the echo part only in a heartbeat
    big enough for it, and its timestamp and hold only with an echo."""
    if msg.kind is not ProbeKind.HEARTBEAT or size < ECHO_FRAME_LEN:
        return dataclasses.replace(msg, echo_seq=0, echo_timestamp_ns=0, echo_hold_ns=0, ack_wanted=True)
    if msg.echo_seq == 0:
        return dataclasses.replace(msg, echo_timestamp_ns=0, echo_hold_ns=0)
    return msg


# --- codec -----------------------------------------------------------------------------------

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
keys = st.binary(min_size=16, max_size=64)


@given(msg=messages, dst=macs, src=macs, size=st.integers(MIN_FRAME, 9000), key=keys)
def test_frame_round_trip(msg: ProbeMessage, dst: bytes, src: bytes, size: int, key: bytes) -> None:
    frame = encode_frame(dst, src, msg, key, size)
    assert len(frame) == size
    assert frame[12:14] == ETHERTYPE.to_bytes(2, "big")
    assert frame_sender(frame) == (msg.sender, msg.conn_uid)
    assert decode_frame(frame, key) == ProbeFrame(dst, src, size, carried(msg, size))
    assert decode_frame(memoryview(frame + b"\0" * 7), key) == ProbeFrame(dst, src, size, carried(msg, size))


@given(msg=messages, dst=macs, src=macs, vni=st.integers(0, (1 << 24) - 1), size=st.integers(MIN_FRAME, 2000))
def test_datagram_round_trip(msg: ProbeMessage, dst: bytes, src: bytes, vni: int, size: int) -> None:
    data = encode_datagram(vni, dst, src, msg, KEY, size)
    assert len(data) == 8 + size
    assert data[0] == 0x08 and data[1:4] == b"\0\0\0" and data[7] == 0
    assert decode_datagram(data, KEY) == (vni, ProbeFrame(dst, src, size, carried(msg, size)))


@given(data=st.binary(max_size=300), key=keys)
def test_decode_garbage_raises_only_wire_error(data: bytes, key: bytes) -> None:
    # Random bytes never decode as a valid frame, and fail only with the module's error root.
    for decode in (decode_frame, decode_datagram):
        with pytest.raises(WireError):
            decode(data, key)
    try:
        frame_sender(data)
    except WireError:
        pass


@given(msg=messages, body=st.binary(min_size=MIN_FRAME - 16 - HEADER_LEN, max_size=200))
def test_a_well_formed_frame_with_a_made_up_mac_is_rejected(msg: ProbeMessage, body: bytes) -> None:
    # A valid header followed by anything: the last 16 bytes would have to be the MAC.
    header = encode_frame(b"\x02" * 6, b"\x04" * 6, msg, KEY, 200)[:HEADER_LEN]
    frame = bytearray(header + body + bytes(16))
    frame[20:22] = len(frame).to_bytes(2, "big")
    with pytest.raises(ProbeAuthError):
        decode_frame(frame, KEY)


@given(msg=messages, size=st.integers(MIN_FRAME, 1400))
def test_wrong_key_is_rejected(msg: ProbeMessage, size: int) -> None:
    frame = encode_frame(b"\x02" * 6, b"\x04" * 6, msg, KEY, size)
    with pytest.raises(ProbeAuthError):
        decode_frame(frame, OTHER_KEY)


@given(msg=messages, cut=st.integers(0, 199))
def test_truncated_frames_are_rejected(msg: ProbeMessage, cut: int) -> None:
    frame = encode_frame(b"\x02" * 6, b"\x04" * 6, msg, KEY, 200)
    with pytest.raises(WireError):
        decode_frame(frame[:cut], KEY)


@given(msg=messages, pos=st.integers(0, 199), flip=st.integers(1, 255))
def test_any_flipped_bit_is_rejected(msg: ProbeMessage, pos: int, flip: int) -> None:
    frame = bytearray(encode_frame(b"\x02" * 6, b"\x04" * 6, msg, KEY, 200))
    frame[pos] ^= flip
    with pytest.raises(WireError):
        decode_frame(frame, KEY)


def _frame(size: int = 100) -> bytearray:
    msg = ProbeMessage(ProbeKind.HEARTBEAT, NAME_A, UID, 1, 2)
    return bytearray(encode_frame(b"\x02" * 6, b"\x04" * 6, msg, KEY, size))


@pytest.mark.parametrize("offset,value,match", [
    (12, b"\x08\x00", "ethertype"),
    (14, b"XXXX", "magic"),
    (18, b"\x01", "version"),
    (19, b"\x03", "kind"),
    (19, b"\x00", "kind"),
    (20, (67).to_bytes(2, "big"), "below the minimum"),
    (20, (101).to_bytes(2, "big"), "truncated"),
    (20, (99).to_bytes(2, "big"), "MAC"),
    (22, b"\0" * 6, "MAC"),
    (40, b"\xff", "MAC"),
    (99, b"\0", "MAC"),
])
def test_malformed_frames(offset: int, value: bytes, match: str) -> None:
    frame = _frame()
    frame[offset:offset + len(value)] = value
    with pytest.raises(WireError, match=match):
        decode_frame(frame, KEY)


def test_version_1_frames_are_not_accepted() -> None:
    # What the unauthenticated first version sent: anyone could forge it (issue 12).
    inner = (b"\x02" * 6 + b"\x04" * 6 + ETHERTYPE.to_bytes(2, "big") + b"PWhb" + bytes([1, 1])
             + (60).to_bytes(2, "big") + NAME_A.to_bytes(6, "big") + UID.to_bytes(8, "big")
             + (1 << 63).to_bytes(8, "big") + bytes(8))
    inner += bytes(68 - len(inner))
    for key in (KEY, OTHER_KEY):
        with pytest.raises(WireError, match="version"):
            decode_frame(inner, key)
    with pytest.raises(WireError, match="version"):
        frame_sender(inner)


def test_heartbeat_echo_travels_in_what_was_padding() -> None:
    mac_a, mac_b = b"\x02" * 6, b"\x04" * 6
    echo = ProbeMessage(ProbeKind.HEARTBEAT, NAME_A, UID, 9, 2, echo_seq=7, echo_timestamp_ns=U64,
                        echo_hold_ns=150_000_000, ack_wanted=False)
    assert decode_frame(encode_frame(mac_a, mac_b, echo, KEY, 1390), KEY).message == echo
    # Zero padding reads as "ack wanted, no echo".
    plain = ProbeMessage(ProbeKind.HEARTBEAT, NAME_A, UID, 9, 2)
    frame = encode_frame(mac_a, mac_b, plain, KEY, 1390)
    assert frame[HEADER_LEN:-16] == bytes(1390 - HEADER_LEN - 16)
    assert decode_frame(frame, KEY).message == plain
    # Too small to carry the echo (or an ack): the extra fields are left out.
    small = encode_frame(mac_a, mac_b, echo, KEY, ECHO_FRAME_LEN - 1)
    assert decode_frame(small, KEY).message == plain
    with pytest.raises(ValueError):
        encode_frame(mac_a, mac_b, ProbeMessage(ProbeKind.HEARTBEAT, NAME_A, UID, 1, 2, echo_seq=U64 + 1),
                     KEY, 1390)


def test_malformed_vxlan_headers() -> None:
    good = encode_vxlan(5, b"x")
    assert decode_vxlan(good)[0] == 5
    for bad in (good[:7], b"\x00" + good[1:], b"\x08\x01" + good[2:], good[:7] + b"\x01" + good[8:],
                b"\x0c" + good[1:]):
        with pytest.raises(WireError):
            decode_vxlan(bad)


def test_encode_rejects_bad_arguments() -> None:
    msg = ProbeMessage(ProbeKind.ACK, NAME_A, UID, 1, 2)
    with pytest.raises(ValueError):
        encode_frame(b"\x02" * 5, b"\x04" * 6, msg, KEY)
    with pytest.raises(ValueError):
        encode_frame(b"\x02" * 6, b"\x04" * 6, msg, KEY, MIN_FRAME - 1)
    with pytest.raises(ValueError):
        encode_frame(b"\x02" * 6, b"\x04" * 6, msg, b"short")
    with pytest.raises(ValueError):
        encode_frame(b"\x02" * 6, b"\x04" * 6, ProbeMessage(ProbeKind.ACK, 0, UID, 1, 2), KEY)
    with pytest.raises(ValueError):
        encode_frame(b"\x02" * 6, b"\x04" * 6, ProbeMessage(ProbeKind.ACK, NAME_A, U64 + 1, 1, 2), KEY)
    with pytest.raises(ValueError):
        encode_vxlan(1 << 24, b"")


@given(name=st.integers(0, (1 << 48) - 1))
def test_probe_mac_is_local_unicast_and_stable(name: int) -> None:
    mac = probe_mac(name)
    assert len(mac) == 6 and mac[0] & 0x02 and not mac[0] & 0x01
    assert probe_mac(name) == mac
    assert mac != name.to_bytes(6, "big")


def test_sizes() -> None:
    assert heartbeat_frame_size(1376) == 1390
    assert outer_packet_size(1390) == 1426  # same as a full-size container packet's outer packet
    assert MIN_FRAME == 68 and HEADER_LEN == 52 and ECHO_FRAME_LEN == 93
    assert len({probe_mac(n) for n in range(1, 2000)}) == 1999


# --- real kernel -----------------------------------------------------------------------------


@dataclass
class Pair:
    tb: Testbed
    h1: Host
    h2: Host
    e1: ProbeEndpoint
    e2: ProbeEndpoint


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Testbed(prefix="pwf" + secrets.token_hex(2)) as tb:
        h1, h2 = tb.add_host(), tb.add_host()
        for h in (h1, h2):
            make_bridge(h.netns)
            vxlan.ensure_vxlan(netns=h.netns)
        vxlan.add_peer(h2.address, netns=h1.netns)
        vxlan.add_peer(h1.address, netns=h2.netns)
        e1 = ProbeEndpoint(NAME_A, netns=h1.netns).open()
        e2 = ProbeEndpoint(NAME_B, netns=h2.netns).open()
        try:
            yield Pair(tb, h1, h2, e1, e2)
        finally:
            e1.close()
            e2.close()


def key_for(sender: int, conn_uid: int) -> bytes | None:
    return KEY if conn_uid == UID and sender in (NAME_A, NAME_B) else None


def receive(ep: ProbeEndpoint, timeout: float = 0.5) -> list[ProbeFrame]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([ep], [], [], left)[0]:
            frames = ep.receive(key_for)
            if frames:
                return frames
    return []


def heartbeat(sender: int, seq: int) -> ProbeMessage:
    return ProbeMessage(ProbeKind.HEARTBEAT, sender, UID, seq, time.monotonic_ns())


FULL = heartbeat_frame_size(1376)


@pytest.mark.netns
def test_heartbeats_travel_the_vxlan_path_both_ways(pair: Pair) -> None:
    for src, src_ip, dst, dst_ip in ((pair.e1, pair.h1.address, pair.e2, pair.h2.address),
                                      (pair.e2, pair.h2.address, pair.e1, pair.h1.address)):
        msg = heartbeat(src.peer_name, 1)
        src.send(dst_ip, dst.peer_name, msg, KEY, FULL)
        frames = receive(dst)
        assert frames == [ProbeFrame(dst.mac, src.mac, FULL, msg)]
        # an ack goes back the same way
        ack = ProbeMessage(ProbeKind.ACK, dst.peer_name, UID, msg.seq, msg.timestamp_ns)
        dst.send(src_ip, src.peer_name, ack, KEY)
        assert receive(src) == [ProbeFrame(src.mac, dst.mac, MIN_FRAME, ack)]


@pytest.mark.netns
def test_probe_port_only_sees_its_own_frames(pair: Pair) -> None:
    # A heartbeat addressed to some other probe MAC is not delivered (no flooding to the port).
    pair.e1.send(pair.h2.address, 0x02_00_00_00_99_99, heartbeat(NAME_A, 1), KEY, FULL)
    assert receive(pair.e2, 0.3) == []
    # Garbage with our ethertype is counted and dropped.
    with vxlan.netns_context(pair.h1.netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        inner = pair.e2.mac + pair.e1.mac + ETHERTYPE.to_bytes(2, "big") + b"not a probe frame" * 4
        s.sendto(encode_vxlan(vxlan.DEFAULT_VNI, inner), (pair.h2.address, 6784))
        # wrong VNI: the receiving kernel drops it
        msg = heartbeat(NAME_A, 9)
        s.sendto(encode_datagram(vxlan.DEFAULT_VNI + 1, pair.e2.mac, pair.e1.mac, msg, KEY, 100),
                 (pair.h2.address, 6784))
        before = pair.e2.malformed, pair.e2.forged, pair.e2.unknown
        # the wrong key, and a sender (connection) with no key: counted and dropped
        s.sendto(encode_datagram(vxlan.DEFAULT_VNI, pair.e2.mac, pair.e1.mac, msg, OTHER_KEY, 100),
                 (pair.h2.address, 6784))
        other = dataclasses.replace(msg, conn_uid=UID + 1)
        s.sendto(encode_datagram(vxlan.DEFAULT_VNI, pair.e2.mac, pair.e1.mac, other, KEY, 100),
                 (pair.h2.address, 6784))
    assert receive(pair.e2, 0.3) == []
    assert (pair.e2.malformed, pair.e2.forged, pair.e2.unknown) == (before[0] + 1, before[1] + 1, before[2] + 1)


@pytest.mark.netns
def test_udp_socket_cannot_and_need_not_bind_6784(pair: Pair) -> None:
    with vxlan.netns_context(pair.h1.netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s, pytest.raises(OSError) as info:
        s.bind(("", 6784))
    assert info.value.errno == errno.EADDRINUSE
    assert pair.e1.udp_sock is not None and pair.e1.udp_sock.getsockname()[1] != 6784


@pytest.mark.netns
def test_too_small_local_mtu_fails_the_full_size_heartbeat(pair: Pair) -> None:
    pair.tb.set_mtu(pair.h1, 1300)
    try:
        with pytest.raises(PathMtuError) as info:
            pair.e1.send(pair.h2.address, NAME_B, heartbeat(NAME_A, 1), KEY, FULL)
        assert info.value.errno == errno.EMSGSIZE and "1426" in str(info.value)
        small = heartbeat(NAME_A, 2)
        pair.e1.send(pair.h2.address, NAME_B, small, KEY, 1200)
        assert [f.message for f in receive(pair.e2)] == [small]
    finally:
        pair.tb.set_mtu(pair.h1, 1500)


@pytest.mark.netns
def test_too_small_mtu_along_the_path_drops_the_full_size_heartbeat(pair: Pair) -> None:
    # Lower only the switch's port towards host2: host1 sends fine, the switch drops it.
    port = pair.h2.netns  # the switch-side veth is named after the host's namespace
    subprocess.run(["ip", "-n", pair.tb.switch_netns, "link", "set", port, "mtu", "1300"], check=True)
    try:
        pair.e1.send(pair.h2.address, NAME_B, heartbeat(NAME_A, 1), KEY, FULL)
        assert receive(pair.e2, 0.3) == []
        small = heartbeat(NAME_A, 2)
        pair.e1.send(pair.h2.address, NAME_B, small, KEY, 1200)
        assert [f.message for f in receive(pair.e2)] == [small]
    finally:
        subprocess.run(["ip", "-n", pair.tb.switch_netns, "link", "set", port, "mtu", "1500"], check=True)


@pytest.mark.netns
def test_receiving_bridge_allows_mtu_plus_18(pair: Pair) -> None:
    # Kernel fact (documented in fastdp.probe): the receiving side is lenient by a VLAN tag.
    for size, delivered in ((FULL, True), (FULL + 4, True), (FULL + 5, False)):
        msg = heartbeat(NAME_A, size)
        pair.e1.send(pair.h2.address, NAME_B, msg, KEY, size)
        assert [f.message for f in receive(pair.e2, 0.5 if delivered else 0.2)] == ([msg] if delivered else [])


def drive(pair: Pair, mons: tuple[HealthMonitor, HealthMonitor], until: float,
          stop: LinkState | None = None) -> list[tuple[int, Transition]]:
    """Run both hosts' health monitors over the real probe path until `until` (monotonic)."""
    eps = (pair.e1, pair.e2)
    ips = {NAME_A: pair.h1.address, NAME_B: pair.h2.address}
    seen: list[tuple[int, Transition]] = []

    def act(i: int, actions: list) -> None:
        ep = eps[i]
        for a in actions:
            if isinstance(a, Transition):
                seen.append((i, a))
            elif isinstance(a, SendHeartbeat):
                msg = ProbeMessage(ProbeKind.HEARTBEAT, ep.peer_name, a.conn_uid, a.seq, a.timestamp_ns)
                try:
                    ep.send(ips[a.peer], a.peer, msg, KEY, a.size)
                except OSError as e:
                    mons[i].send_failed(time.monotonic(), a.peer, a.seq, str(e))
            elif isinstance(a, SendAck):
                ep.send(ips[a.peer], a.peer, ProbeMessage(ProbeKind.ACK, ep.peer_name, a.conn_uid, a.seq,
                                                          a.timestamp_ns), KEY)

    while (now := time.monotonic()) < until:
        for i in (0, 1):
            act(i, mons[i].tick(now))
        wait = min(d for m in mons if (d := m.next_deadline()) is not None) - time.monotonic()
        ready = select.select(eps, [], [], max(0.0, min(wait, until - time.monotonic())))[0]
        for ep in ready:
            i = eps.index(ep)
            for f in ep.receive(key_for):
                m = f.message
                handler = mons[i].heartbeat_received if m.kind is ProbeKind.HEARTBEAT else mons[i].ack_received
                act(i, handler(time.monotonic(), m.sender, m.conn_uid, m.seq, m.timestamp_ns))
        if stop is not None and all(m.state(p) is stop for m, p in zip(mons, (NAME_B, NAME_A), strict=True)):
            break
    return seen


@pytest.mark.netns
def test_health_over_real_heartbeats_detects_a_blocked_port(pair: Pair) -> None:
    mons = (HealthMonitor(), HealthMonitor())
    start = time.monotonic()
    mons[0].add(NAME_B, UID, start)
    mons[1].add(NAME_A, UID, start)
    drive(pair, mons, start + 1.0, stop=LinkState.HEALTHY)
    assert mons[0].state(NAME_B) is LinkState.HEALTHY and mons[1].state(NAME_A) is LinkState.HEALTHY
    assert time.monotonic() - start < 1.0
    drive(pair, mons, time.monotonic() + 0.5)  # steady state
    assert mons[0].state(NAME_B) is LinkState.HEALTHY
    rtt = mons[0].links[NAME_B].rtt
    assert rtt is not None and rtt < 0.1

    pair.tb.block(pair.h1, pair.h2, "udp", 6784)
    try:
        broke = time.monotonic()
        seen = drive(pair, mons, broke + 3.5, stop=LinkState.UNHEALTHY)
        downs = [(i, t) for i, t in seen if t.new is LinkState.UNHEALTHY]
        assert {i for i, _ in downs} == {0, 1}
        assert all(t.at - broke < 3.0 for _, t in downs), downs
        assert all(t.reason.startswith("heartbeats lost") for _, t in downs)
    finally:
        pair.tb.unblock(pair.h1, pair.h2, "udp", 6784)
    healed = time.monotonic()
    seen = drive(pair, mons, healed + 10.0, stop=LinkState.HEALTHY)
    ups = [t for _, t in seen if t.new is LinkState.HEALTHY]
    assert len(ups) == 2 and all(t.at - healed < 10.0 for t in ups)
    assert all(t.reason.startswith("healthy again") for t in ups)


@pytest.mark.netns
def test_probe_endpoint_cleanup(pair: Pair) -> None:
    ns = pair.h1.netns
    ep = ProbeEndpoint(0x02_00_00_00_0C_03, netns=ns)
    ep.open()  # replaces the fixture's probe port (stale-port cleanup)
    ep.close()
    with vxlan.open_ipr(ns) as ipr:
        assert not ipr.link_lookup(ifname=probe.PROBE_IFNAME)
        assert not ipr.link_lookup(ifname=probe.PORT_IFNAME)
    assert not probe.remove_probe_port(ns)
    with pytest.raises(OSError):
        ep.fileno()
    pair.e1.close()  # its probe port went with the stale-port cleanup: make it anew
    pair.e1.open()
    msg = heartbeat(NAME_B, 1)
    pair.e2.send(pair.h1.address, NAME_A, msg, KEY, FULL)
    assert [f.message for f in receive(pair.e1)] == [msg]
