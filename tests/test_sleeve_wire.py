"""sleeve.wire: the plain sleeve packet format, batching and special frames."""

from __future__ import annotations

import socket
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import WireError
from router.peername import parse_peer_name
from sleeve.ipfrag import dont_fragment
from sleeve.wire import (
    ENCRYPTED_PACKET_OVERHEAD,
    FRAG_TEST_FRAME_LEN,
    HEARTBEAT_FRAME_LEN,
    MAX_FRAMES_PER_PACKET,
    Batcher,
    FrameTooLarge,
    MalformedPacket,
    SpecialFrame,
    classify_special,
    decode_frames,
    decode_packet,
    encode_frames,
    encode_packet,
    fragmentation_test_frame,
    heartbeat_conn_uid,
    heartbeat_frame,
    max_frame_len,
    max_udp_payload,
    overlay_mtu,
    packet_overhead,
    packet_sender,
    pmtu_probe_frame,
    probe_mtu,
)
from tests.captures import capture_path, udp_packets

PEER = [parse_peer_name(f"02:98:00:00:00:0{i}") for i in range(4)]


def sleeve_datagrams(name: str) -> list[tuple[str, str, int, bytes, bool]]:
    """(src ip, dst ip, UDP length field - 8, captured payload, outer DF) of every UDP 6783 datagram.

    The capture filter only matches first fragments, so a fragmented datagram's payload is
    shorter than the UDP length says.
    """
    out = []
    with open(capture_path(name), "rb") as fh:
        for _ts, raw in dpkt.pcap.Reader(fh):
            ip = dpkt.ethernet.Ethernet(raw).data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) and ip.data.dport == 6783:
                udp = ip.data
                out.append(
                    (
                        socket.inet_ntoa(ip.src),
                        socket.inet_ntoa(ip.dst),
                        udp.ulen - 8,
                        bytes(udp.data),
                        bool(ip.df),
                    )
                )
    return out


def frames_eq(got: list, want: list) -> bool:
    return [(s, d, bytes(f)) for s, d, f in got] == [(s, d, bytes(f)) for s, d, f in want]


# ---------------------------------------------------------------- golden: plain-ping


def test_ping_capture_decodes_to_icmp_echo_and_reencodes() -> None:
    packets = udp_packets("plain-ping.pcap")
    assert len(packets) == 2
    kinds = []
    for pkt in packets:
        sender, frames = decode_packet(pkt.payload)
        assert sender == PEER[int(pkt.src[0].rsplit(".", 1)[1])]
        assert len(frames) == 1
        src, dst, frame = frames[0]
        assert src == sender
        assert dst == PEER[int(pkt.dst[0].rsplit(".", 1)[1])]
        assert len(frame) == 98
        eth = dpkt.ethernet.Ethernet(bytes(frame))
        assert isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.icmp.ICMP)
        kinds.append(eth.data.data.type)
        # The sleeve sends a DF inner packet on the DF socket and a non-DF one on the normal socket.
        assert dont_fragment(frame) == pkt.dont_fragment
        assert classify_special(frame) is None
        assert encode_packet(sender, frames) == pkt.payload
    assert kinds == [dpkt.icmp.ICMP_ECHO, dpkt.icmp.ICMP_ECHOREPLY]


# ---------------------------------------------------------------- golden: plain-startup


def test_startup_heartbeats() -> None:
    uids: dict[frozenset[int], set[int]] = {}
    count = 0
    for src_ip, dst_ip, ulen, payload, df in sleeve_datagrams("plain-startup.pcap"):
        if len(payload) != 42:
            continue
        count += 1
        assert df and ulen == 42
        sender, frames = decode_packet(payload)
        assert sender == PEER[int(src_ip.rsplit(".", 1)[1])]
        [(src, dst, frame)] = frames
        assert (src, dst) == (sender, PEER[int(dst_ip.rsplit(".", 1)[1])])
        assert classify_special(frame) is SpecialFrame.HEARTBEAT
        uid = heartbeat_conn_uid(frame)
        assert heartbeat_frame(uid) == frame
        uids.setdefault(frozenset((src, dst)), set()).add(uid)
        assert encode_packet(sender, [(src, dst, heartbeat_frame(uid))]) == payload
    assert count == 12
    # One ConnUID per connection, the same in both directions, different per connection.
    assert len(uids) == 3 and all(len(v) == 1 for v in uids.values())
    assert len(set.union(*uids.values())) == 3
    assert 0xBFA8DB935CA788F3 in set.union(*uids.values())


def test_startup_every_whole_datagram_roundtrips() -> None:
    kinds: dict[object, int] = {}
    for _src, _dst, ulen, payload, df in sleeve_datagrams("plain-startup.pcap"):
        if ulen != len(payload):
            continue
        sender, frames = decode_packet(payload)
        assert encode_packet(sender, frames) == payload
        for src, _d, frame in frames:
            assert src == sender
            kind = classify_special(frame)
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind is SpecialFrame.PMTU_PROBE:
                assert df and len(payload) == 1472
                assert probe_mtu(frame) == 1438 == overlay_mtu(1500, encrypted=False)
                assert pmtu_probe_frame(1438) == frame
            elif kind is None:
                # Router-sent IPv6 multicast (MLD / router solicitation) from the weave bridge.
                assert not df and frame[12:14] == b"\x86\xdd" and frame[0:2] == b"\x33\x33"
    assert kinds == {SpecialFrame.HEARTBEAT: 12, SpecialFrame.PMTU_PROBE: 9, None: 9}


def test_startup_fragmentation_tests_are_truncated_first_fragments() -> None:
    seen = 0
    for _src, _dst, ulen, payload, df in sleeve_datagrams("plain-startup.pcap"):
        if ulen == len(payload):
            continue
        seen += 1
        assert not df and ulen == 6 + 14 + FRAG_TEST_FRAME_LEN
        sender = packet_sender(payload)
        src_hi, src_lo, _dh, _dl, length = struct.unpack_from(">HIHIH", payload, 6)
        assert (src_hi << 32 | src_lo) == sender and length == FRAG_TEST_FRAME_LEN
        assert payload[20:] == bytes(len(payload) - 20)
        with pytest.raises(MalformedPacket, match="truncated frame"):
            decode_packet(payload)
        # What the capture would have held without fragmentation:
        full = payload[:20] + fragmentation_test_frame()
        [(_s, _d, frame)] = decode_packet(full)[1]
        assert classify_special(frame) is SpecialFrame.FRAGMENTATION_TEST
        assert encode_packet(sender, decode_packet(full)[1]) == full
    assert seen == 6


# ---------------------------------------------------------------- overheads


def test_overheads_and_mtu() -> None:
    assert packet_overhead(False) == 6 and packet_overhead(True) == ENCRYPTED_PACKET_OVERHEAD == 30
    assert overlay_mtu(1500, False) == 1438
    assert overlay_mtu(1500, True) == 1414
    assert overlay_mtu(9000, False) == 8938
    assert max_udp_payload(1500) == 1472
    assert max_frame_len(1472, False) == 1452 == 1438 + 14
    assert max_frame_len(1472, True) == 1428 == 1414 + 14
    with pytest.raises(ValueError):
        overlay_mtu(86, True)


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than a peer name"),
        (b"\x02\x98\x00\x00\x00", "shorter than a peer name"),
        (b"\x02\x98\x00\x00\x00\x01", "no frames"),
        (bytes(6 + 10), "truncated frame header"),
        (bytes(6 + 12) + b"\x00\x00", "length 0"),
        (bytes(6 + 12) + b"\x00\x0d" + bytes(13), "length 13"),
        (bytes(6 + 12) + b"\x00\x20" + bytes(31), "truncated frame"),
        (bytes(6 + 12) + b"\x00\x0e" + bytes(14) + bytes(3), "truncated frame header"),
    ],
)
def test_malformed_packets(data: bytes, message: str) -> None:
    with pytest.raises(MalformedPacket, match=message) as info:
        decode_packet(data)
    assert isinstance(info.value, WireError)


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="48 bits"):
        encode_packet(1 << 48, [])
    with pytest.raises(ValueError, match="src peer name"):
        encode_frames([(1 << 48, 1, bytes(20))])
    with pytest.raises(ValueError, match="dst peer name"):
        encode_frames([(1, -1, bytes(20))])
    with pytest.raises(ValueError, match="16-bit length"):
        encode_frames([(1, 2, bytes(0x10000))])


# ---------------------------------------------------------------- properties

names = st.integers(0, (1 << 48) - 1)
frames_st = st.lists(st.tuples(names, names, st.binary(min_size=14, max_size=600)), min_size=1, max_size=12)


@given(names, frames_st)
def test_decode_encode_roundtrip(sender: int, frames: list) -> None:
    packet = encode_packet(sender, frames)
    got_sender, got = decode_packet(packet)
    assert got_sender == sender and frames_eq(got, frames)
    assert frames_eq(decode_frames(encode_frames(frames)), frames)
    assert encode_packet(got_sender, got) == packet


@given(st.binary(max_size=200))
def test_decode_garbage_only_raises_malformed(data: bytes) -> None:
    try:
        sender, frames = decode_packet(data)
    except MalformedPacket:
        return
    assert encode_packet(sender, frames) == data


@given(
    st.lists(st.integers(14, 3000), min_size=1, max_size=300),
    st.integers(1472, 20000),
    st.integers(1, MAX_FRAMES_PER_PACKET),
    st.booleans(),
)
@settings(max_examples=60)
def test_batcher_packs_greedily_within_limits(
    lengths: list[int], max_payload: int, max_frames: int, sealed: bool
) -> None:
    frames = [(PEER[1], PEER[i % 3 + 1], bytes([i % 256]) * n) for i, n in enumerate(lengths)]
    batcher = (
        Batcher.sealed(max_payload, max_frames=max_frames)
        if sealed
        else Batcher.plain(PEER[1], max_payload, max_frames=max_frames)
    )
    frames = [f for f in frames if batcher.fits(len(f[2]))]
    bodies = batcher.pack(frames)
    assert batcher.pending_frames == 0 and batcher.flush() is None
    got: list = []
    for i, body in enumerate(bodies):
        if sealed:
            batch = decode_frames(body)
            size = len(body) + ENCRYPTED_PACKET_OVERHEAD
        else:
            sender, batch = decode_packet(body)
            assert sender == PEER[1]
            size = len(body)
        assert size <= max_payload and 1 <= len(batch) <= max_frames
        if i + 1 < len(bodies):
            following = frames[len(got) + len(batch)]
            assert len(batch) == max_frames or size + 14 + len(following[2]) > max_payload
        got += batch
    assert frames_eq(got, frames)


def test_batcher_default_is_100_frames() -> None:
    batcher = Batcher.plain(PEER[1], 65507)
    bodies = batcher.pack([(PEER[1], PEER[2], bytes(60))] * 250)
    assert [len(decode_packet(b)[1]) for b in bodies] == [100, 100, 50]


def test_batcher_add_and_flush() -> None:
    batcher = Batcher.plain(PEER[1], 6 + 2 * (14 + 100))
    assert batcher.add(PEER[1], PEER[2], bytes(100)) is None
    assert batcher.pending_frames == 1 and batcher.pending_size == 6 + 114
    assert batcher.add(PEER[1], PEER[2], bytes(100)) is None
    first = batcher.add(PEER[1], PEER[3], bytes(50))
    assert first is not None and len(decode_packet(first)[1]) == 2
    last = batcher.flush()
    assert last is not None and decode_packet(last)[1][0][1] == PEER[3]
    with pytest.raises(FrameTooLarge):
        batcher.add(PEER[1], PEER[2], bytes(6 + 2 * 114))
    assert batcher.pending_frames == 0
    with pytest.raises(ValueError):
        Batcher(20)


# ---------------------------------------------------------------- special frames


def test_special_frames() -> None:
    hb = heartbeat_frame(0x0102030405060708)
    assert len(hb) == HEARTBEAT_FRAME_LEN and classify_special(hb) is SpecialFrame.HEARTBEAT
    assert heartbeat_conn_uid(memoryview(hb)) == 0x0102030405060708
    assert classify_special(memoryview(hb)) is SpecialFrame.HEARTBEAT
    frag = fragmentation_test_frame()
    assert len(frag) == 60001 and not any(frag)
    assert classify_special(frag) is SpecialFrame.FRAGMENTATION_TEST
    probe = pmtu_probe_frame(1414)
    assert (
        len(probe) == 1428 and classify_special(probe) is SpecialFrame.PMTU_PROBE and probe_mtu(probe) == 1414
    )
    assert classify_special(bytes(14)) is SpecialFrame.PMTU_PROBE
    for bad in (8, 60001 - 14, -1, 0x10000):
        with pytest.raises(ValueError):
            pmtu_probe_frame(bad)
    assert classify_special(bytes(13)) is None
    assert classify_special(bytes(12) + b"\x08\x00" + bytes(8)) is None
    assert classify_special(b"\x01" + bytes(21)) is None
    with pytest.raises(MalformedPacket):
        heartbeat_conn_uid(bytes(23))
    with pytest.raises(ValueError):
        heartbeat_frame(1 << 64)
