"""sleeve.ipfrag: ICMP "fragmentation needed" replies and IPv4 fragmentation."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import WireError
from sleeve.ipfrag import (
    BadIPv4,
    dont_fragment,
    frag_needed_reply,
    fragment_frame,
    internet_checksum,
    ipv4_packet_length,
    is_ipv4,
)
from sleeve.wire import decode_packet
from tests.captures import udp_packets

MAC_A = bytes.fromhex("a28fc1300e6f")
MAC_B = bytes.fromhex("1ac0a882b216")
IP_A = bytes([10, 40, 1, 1])
IP_B = bytes([10, 40, 1, 2])


def make_frame(
    payload: bytes,
    *,
    options: bytes = b"",
    df: bool = False,
    mf: bool = False,
    offset: int = 0,
    ident: int = 0x1234,
    proto: int = 17,
    padding: int = 0,
) -> bytes:
    """An Ethernet + IPv4 frame, checksummed with dpkt's (independent) implementation."""
    assert len(options) % 4 == 0
    header_len = 20 + len(options)
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | offset // 8
    header = bytearray(
        struct.pack(
            ">BBHHHBBH4s4s",
            0x40 | header_len // 4,
            0,
            header_len + len(payload),
            ident,
            flags,
            64,
            proto,
            0,
            IP_A,
            IP_B,
        )
    )
    header += options
    header[10:12] = struct.pack(">H", dpkt.in_cksum(bytes(header)))
    return MAC_B + MAC_A + b"\x08\x00" + bytes(header) + payload + bytes(padding)


def ip_fields(frame: bytes) -> dict:
    ip = frame[14:]
    header_len = (ip[0] & 15) * 4
    total, ident, flags = struct.unpack_from(">HHH", ip, 2)
    return {
        "header": ip[:header_len],
        "payload": ip[header_len:total],
        "total": total,
        "id": ident,
        "mf": bool(flags & 0x2000),
        "df": bool(flags & 0x4000),
        "offset": (flags & 0x1FFF) * 8,
        "trailing": len(ip) - total,
    }


def reassemble(frames: list[bytes]) -> tuple[bytes, bool]:
    """Payload and final MF of a set of fragments (checks they tile without gaps or overlaps)."""
    parts = sorted((ip_fields(f) for f in frames), key=lambda f: f["offset"])
    data = bytearray()
    start = parts[0]["offset"]
    for part in parts:
        assert part["offset"] == start + len(data)
        data += part["payload"]
    return bytes(data), parts[-1]["mf"]


# Options: a copied one (LSRR-like type 0x83) and a non-copied one (record route, type 7), each 8 bytes.
COPIED = bytes([0x83, 7, 4]) + bytes(4) + b"\x01"
NOT_COPIED = bytes([7, 7, 4]) + bytes(4) + b"\x01"
options_st = st.sampled_from(
    [b"", COPIED, NOT_COPIED, COPIED + NOT_COPIED, NOT_COPIED + COPIED, b"\x01\x01\x01\x00"]
)


# ---------------------------------------------------------------- checksum and readers


@given(st.binary(max_size=300))
def test_checksum_matches_dpkt(data: bytes) -> None:
    assert internet_checksum(data) == dpkt.in_cksum(data)
    assert internet_checksum(memoryview(data)) == dpkt.in_cksum(data)


def test_readers_on_capture_frames() -> None:
    request, reply = (decode_packet(p.payload)[1][0][2] for p in udp_packets("plain-ping.pcap"))
    assert is_ipv4(request) and is_ipv4(reply)
    assert dont_fragment(request) and not dont_fragment(reply)
    assert ipv4_packet_length(request) == 84
    ipv6 = bytes.fromhex("333300000016029800000002") + b"\x86\xdd" + bytes(60)
    arp = MAC_A + MAC_B + b"\x08\x06" + bytes(28)
    for frame in (ipv6, arp, bytes(22), b"\x00" * 12 + b"\x08\x00" + b"\x60" + bytes(19)):
        assert not is_ipv4(frame) and not dont_fragment(frame)


# ---------------------------------------------------------------- ICMP fragmentation needed


def check_frag_needed(frame: bytes, mtu: int) -> None:
    reply = frag_needed_reply(frame, mtu)
    assert reply[0:6] == frame[6:12] and reply[6:12] == frame[0:6] and reply[12:14] == b"\x08\x00"
    ip = reply[14:]
    assert internet_checksum(ip[:20]) == 0
    eth = dpkt.ethernet.Ethernet(reply)
    pkt = eth.data
    assert isinstance(pkt, dpkt.ip.IP)
    assert pkt.src == frame[30:34] and pkt.dst == frame[26:30] and pkt.p == 1 and pkt.len == len(ip)
    icmp = ip[20:]
    assert internet_checksum(icmp) == 0
    assert icmp[0] == 3 and icmp[1] == 4 and icmp[4:6] == b"\x00\x00"
    assert struct.unpack(">H", icmp[6:8])[0] == mtu
    header_len = (frame[14] & 15) * 4
    total = ipv4_packet_length(frame)
    assert icmp[8:] == frame[14 : 14 + min(total, header_len + 8)]


def test_frag_needed_for_captured_ping() -> None:
    request = bytes(decode_packet(udp_packets("plain-ping.pcap")[0].payload)[1][0][2])
    check_frag_needed(request, 1376)
    reply = dpkt.ethernet.Ethernet(frag_needed_reply(request, 1376))
    assert reply.data.data.type == 3 and reply.data.data.code == 4
    # The quoted header is the request's: the sender can match it to its socket.
    assert bytes(reply.data.data.data)[4:24] == request[14:34]


@given(st.binary(max_size=3000), options_st, st.integers(68, 1500), st.integers(0, 30))
@settings(max_examples=100)
def test_frag_needed_property(payload: bytes, options: bytes, mtu: int, padding: int) -> None:
    check_frag_needed(make_frame(payload, options=options, df=True, padding=padding), mtu)


def test_frag_needed_rejects_bad_input() -> None:
    with pytest.raises(BadIPv4):
        frag_needed_reply(MAC_A + MAC_B + b"\x86\xdd" + bytes(60), 1400)
    with pytest.raises(ValueError):
        frag_needed_reply(make_frame(bytes(100), df=True), 0x10000)


# ---------------------------------------------------------------- fragmentation


@given(
    st.binary(min_size=1, max_size=5000),
    options_st,
    st.integers(68, 1500),
    st.integers(0, 30),
)
@settings(max_examples=150)
def test_fragments_fit_and_reassemble(payload: bytes, options: bytes, mtu: int, padding: int) -> None:
    frame = make_frame(payload, options=options, padding=padding)
    fragments = fragment_frame(frame, mtu)
    original = ip_fields(frame)
    if original["total"] <= mtu:
        assert fragments == [frame[: 14 + original["total"]]]
        return
    assert len(fragments) >= 2
    for i, frag in enumerate(fragments):
        fields = ip_fields(frag)
        assert frag[:14] == frame[:14]
        assert fields["total"] <= mtu and fields["trailing"] == 0
        assert internet_checksum(fields["header"]) == 0
        assert fields["offset"] % 8 == 0 and not fields["df"]
        assert fields["mf"] == (i < len(fragments) - 1)
        assert fields["id"] == original["id"]
        assert fields["header"][8:10] == original["header"][8:10]  # TTL, protocol
        assert fields["header"][12:20] == original["header"][12:20]
        if i == 0:
            assert fields["header"][20:] == options
        else:
            assert fields["header"][20:] == (COPIED if COPIED in options else b"")
        parsed = dpkt.ip.IP(frag[14:])
        assert parsed.sum == struct.unpack(">H", fields["header"][10:12])[0]
    data, last_mf = reassemble(fragments)
    assert data == payload and not last_mf


@given(st.binary(min_size=200, max_size=3000), st.integers(68, 600), st.booleans())
@settings(max_examples=60)
def test_refragmenting_a_fragment_keeps_offsets_and_mf(payload: bytes, mtu: int, more_follow: bool) -> None:
    """A fragment at offset 1480 (MF set unless it is the tail) split again for a smaller MTU."""
    frame = make_frame(payload, offset=1480, mf=more_follow)
    fragments = fragment_frame(frame, mtu)
    data, last_mf = reassemble(fragments)
    assert data == payload and last_mf == more_follow
    assert ip_fields(fragments[0])["offset"] == 1480
    assert all(ip_fields(f)["mf"] for f in fragments[:-1])


def test_fragment_rejects() -> None:
    with pytest.raises(ValueError, match="DF"):
        fragment_frame(make_frame(bytes(2000), df=True), 1400)
    with pytest.raises(ValueError, match="at least 68"):
        fragment_frame(make_frame(bytes(2000)), 60)
    truncated = make_frame(bytes(100))[:-10]
    with pytest.raises(BadIPv4, match="total length"):
        fragment_frame(truncated, 68)
    with pytest.raises(BadIPv4):
        fragment_frame(MAC_A + MAC_B + b"\x08\x06" + bytes(28), 68)
    bad_options = make_frame(bytes(2000), options=bytes([0x83, 9, 0, 0]))
    with pytest.raises(BadIPv4, match="option"):
        fragment_frame(bad_options, 600)
    assert issubclass(BadIPv4, WireError)
