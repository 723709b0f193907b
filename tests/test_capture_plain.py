"""Decode every TCP message of the unencrypted real Weave 2.8 captures, and talk to them."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from router.handshake import (
    FEATURES_TYPE_ID,
    Handshake,
    HandshakeState,
    PeerIdentity,
    decode_features,
    encode_features,
    parse_features,
)
from router.peername import parse_peer_name
from router.protocol import (
    GOSSIP_TAGS,
    FrameReader,
    OverlayControl,
    SleeveControl,
    Tag,
    decode_gossip,
    decode_pmtu,
    encode_gossip,
    frame,
    split_message,
)
from tests.captures import TcpStream, tcp_streams, udp_packets
from tests.golden import FEATURES_WV2

HEADER = b"weave\x01\x02"

# gob.md §9.2: the two feature frames of the first connection, length prefix included.
GOLDEN_FEATURES_WV2 = frame(FEATURES_WV2)
GOLDEN_FEATURES_WV1 = bytes.fromhex(
    "000000ae0eff93040102ff9400010c010c0000ff9dff94000807547275737465640566616c7365084f7665726c617973"
    "06736c656576650f506565724e616d65466c61766f7572036d6163044e616d651130323a39383a30303a30303a30303a"
    "3031084e69636b4e616d650477762d310753686f72744944043337353903554944143136363838363433303732383630"
    "39333532373906436f6e6e4944143135393431333735343335363637323733353732"
)


@dataclass
class Decoded:
    stream: TcpStream
    features: dict[str, str]
    features_frame: bytes
    messages: list[bytes]


def decode_stream(stream: TcpStream) -> Decoded:
    data = stream.data
    assert data[:7] == HEADER
    assert data[7] == 0, "unencrypted capture: flag byte 0"
    reader = FrameReader()
    frames = reader.feed(data[8:])
    assert reader.buffered == 0, "the stream must end on a frame boundary"
    return Decoded(stream, decode_features(frames[0]), frames[0], frames[1:])


def kinds(messages: list[bytes]) -> Counter:
    seen: Counter = Counter()
    for payload in messages:
        split = split_message(payload)
        assert split is not None
        tag, body = split
        if tag in GOSSIP_TAGS:
            seen[(Tag(tag).name, decode_gossip(tag, body).channel)] += 1
        elif tag == Tag.OVERLAY_CONTROL:
            control = OverlayControl.decode(body)
            assert control.forwarder == 0, "sleeve is the only overlay, forwarder 0"
            seen[SleeveControl(control.subtag).name] += 1
        else:
            seen[Tag(tag).name] += 1
    return seen


@pytest.fixture(scope="module")
def plain() -> list[Decoded]:
    return [decode_stream(s) for s in tcp_streams("plain-startup.pcap")]


@pytest.fixture(scope="module")
def ipam() -> list[Decoded]:
    return [decode_stream(s) for s in tcp_streams("ipam-dns.pcap")]


def test_golden_vector_matches_capture(plain: list[Decoded]) -> None:
    assert GOLDEN_FEATURES_WV2 == plain[0].stream.data[8:184]
    assert GOLDEN_FEATURES_WV1 == plain[1].stream.data[8 : 8 + len(GOLDEN_FEATURES_WV1)]


@pytest.mark.parametrize("name,net,nick", [("plain", "98", "wv-"), ("ipam", "99", "wv")])
def test_feature_maps_hold_the_real_values(name: str, net: str, nick: str, request) -> None:
    decoded: list[Decoded] = request.getfixturevalue(name)
    assert len(decoded) == 6
    uid_of: dict[str, str] = {}
    for d in decoded:
        n = d.stream.src[0].rsplit(".", 1)[1]
        f = d.features
        assert set(f) == {
            "Name",
            "NickName",
            "ShortID",
            "UID",
            "ConnID",
            "Trusted",
            "Overlays",
            "PeerNameFlavour",
        }
        assert f["Name"] == f"02:{net}:00:00:00:0{n}"
        assert f["NickName"] == f"{nick}{n}"
        assert (f["Trusted"], f["Overlays"], f["PeerNameFlavour"]) == ("false", "sleeve", "mac")
        # One UID per router process, whichever connection it speaks on.
        assert uid_of.setdefault(f["Name"], f["UID"]) == f["UID"]
        remote = parse_features(f)
        assert remote.name == parse_peer_name(f["Name"])
        assert remote.overlays == ("sleeve",) and remote.trusted is False
        assert remote.short_id is not None and 0 <= remote.short_id < 4096
    assert len(uid_of) == 3


def test_plain_startup_message_kinds(plain: list[Decoded]) -> None:
    total: Counter = Counter()
    for d in plain:
        seen = kinds(d.messages)
        # Every connection carries a full gossip of all three channels and a sleeve set-up.
        for key in [("GOSSIP", "topology"), ("GOSSIP", "IPallocation"), ("GOSSIP", "nameserver")]:
            assert seen[key] >= 1
        for control in ("CONNECTION_ESTABLISHED", "FRAGMENTATION_RECEIVED", "PMTU_VERIFIED"):
            assert seen[control] >= 1
        total += seen
    assert total == Counter(
        {
            ("GOSSIP", "topology"): 26,
            ("GOSSIP", "IPallocation"): 6,
            ("GOSSIP", "nameserver"): 6,
            "CONNECTION_ESTABLISHED": 6,
            "FRAGMENTATION_RECEIVED": 6,
            "PMTU_VERIFIED": 9,
        }
    )


def test_ipam_dns_message_kinds(ipam: list[Decoded]) -> None:
    total: Counter = Counter()
    for d in ipam:
        total += kinds(d.messages)
    assert total[("GOSSIP_UNICAST", "IPallocation")] == 7
    assert total[("GOSSIP_BROADCAST", "IPallocation")] == 18
    assert total[("GOSSIP_BROADCAST", "nameserver")] == 8
    assert total[("GOSSIP", "topology")] == 24
    assert set(total) <= {
        ("GOSSIP", "topology"),
        ("GOSSIP", "IPallocation"),
        ("GOSSIP", "nameserver"),
        ("GOSSIP_UNICAST", "IPallocation"),
        ("GOSSIP_BROADCAST", "IPallocation"),
        ("GOSSIP_BROADCAST", "nameserver"),
        "CONNECTION_ESTABLISHED",
        "FRAGMENTATION_RECEIVED",
        "PMTU_VERIFIED",
    }


def test_gossip_envelopes_fields(plain: list[Decoded], ipam: list[Decoded]) -> None:
    for d in plain + ipam:
        sender = parse_peer_name(d.features["Name"])
        for payload in d.messages:
            tag, body = payload[0], payload[1:]
            if tag == Tag.GOSSIP:
                # Plain gossip is always sent by the peer at this end of the connection.
                assert decode_gossip(tag, body).src == sender
            elif tag == Tag.GOSSIP_UNICAST:
                msg = decode_gossip(tag, body)
                assert msg.dst is not None and msg.dst != msg.src
                assert msg.payload[0] in (0, 1, 2), "IPAM unicast starts with a raw kind byte"


def test_first_topology_gossip_matches_gob_md(plain: list[Decoded]) -> None:
    msg = decode_gossip(4, plain[0].messages[0][1:])
    assert (msg.tag, msg.channel, msg.src, msg.dst) == (Tag.GOSSIP, "topology", 0x029800000002, None)
    assert len(msg.payload) == 0x138 and msg.payload[:4] == bytes.fromhex("62ff9503")


def test_overlay_control_values(plain: list[Decoded]) -> None:
    first = plain[0].messages
    raw = [frame(m) for m in first if m[0] == Tag.OVERLAY_CONTROL]
    assert raw[:3] == [
        bytes.fromhex("00000003070001"),
        bytes.fromhex("00000003070002"),
        bytes.fromhex("00000005070003059e"),
    ]
    for d in plain:
        for payload in d.messages:
            if payload[0] == Tag.OVERLAY_CONTROL:
                control = OverlayControl.decode(payload[1:])
                assert control.encode() == payload[1:]
                if control.subtag == SleeveControl.PMTU_VERIFIED:
                    assert decode_pmtu(control.data) == 1438
                else:
                    assert control.data == b""


def test_every_gossip_envelope_reencodes_byte_identically(plain: list[Decoded], ipam: list[Decoded]) -> None:
    count = 0
    for d in plain + ipam:
        for payload in d.messages:
            if payload[0] in GOSSIP_TAGS:
                assert encode_gossip(decode_gossip(payload[0], payload[1:])) == payload[1:]
                count += 1
    assert count == 38 + 69


def test_feature_frames_reencode(plain: list[Decoded], ipam: list[Decoded]) -> None:
    for d in plain + ipam:
        # Decoded in wire order, so re-encoding in that order gives Go's exact bytes.
        assert encode_features(d.features) == d.features_frame
        # Go's map order is random: any order decodes to the same map.
        keys = list(d.features)
        random.Random(len(d.features_frame)).shuffle(keys)
        shuffled = {k: d.features[k] for k in keys}
        assert decode_features(encode_features(shuffled)) == d.features
    assert frame(encode_features(plain[0].features)) == GOLDEN_FEATURES_WV2
    assert frame(encode_features(plain[1].features)) == GOLDEN_FEATURES_WV1
    assert FEATURES_TYPE_ID == 74


def identity_of(features: dict[str, str]) -> PeerIdentity:
    return PeerIdentity(
        parse_peer_name(features["Name"]),
        features["NickName"],
        int(features["UID"]),
        int(features["ShortID"]),
    )


@pytest.mark.parametrize("capture", ["plain-startup.pcap", "ipam-dns.pcap"])
def test_pyweave_takes_the_place_of_either_end(capture: str) -> None:
    """Replay one direction of each real connection into a pyweave Handshake that plays
    the other end; it must finish and then decode every following message."""
    streams = [decode_stream(s) for s in tcp_streams(capture)]
    for ours, theirs in [(streams[i], streams[i ^ 1]) for i in range(len(streams))]:
        outbound = ours.stream.dst[1] == 6783
        hs = Handshake(
            outbound,
            identity_of(ours.features),
            int(ours.features["ConnID"]),
            overlays=["sleeve"],
        )
        sent = hs.initiate() + hs.receive_data(theirs.stream.data)
        assert hs.state is HandshakeState.COMPLETE and hs.version == 2
        # Our own bytes have the real peer's framing, and its exact feature map.
        assert sent[:8] == HEADER + b"\x00"
        assert decode_features(FrameReader().feed(sent[8:])[0]) == ours.features
        assert hs.remote.raw == theirs.features
        assert hs.remote.name == parse_peer_name(theirs.features["Name"])
        assert hs.conn_uid == int(ours.features["ConnID"]) ^ int(theirs.features["ConnID"])
        assert hs.session_key is None and hs.overlay_session_key is None
        assert hs.codec.feed(b"") == theirs.messages


def test_our_bytes_equal_wv2s_when_the_map_order_agrees(plain: list[Decoded]) -> None:
    # wv-2 happened to send its keys in the order pyweave uses.
    wv2, wv1 = plain[0], plain[1]
    hs = Handshake(True, identity_of(wv2.features), int(wv2.features["ConnID"]), overlays=["sleeve"])
    sent = hs.initiate() + hs.receive_data(wv1.stream.data[:200])
    assert sent == wv2.stream.data[:184]


def test_byte_at_a_time_replay(plain: list[Decoded]) -> None:
    wv2, wv1 = plain[0], plain[1]
    hs = Handshake(False, identity_of(wv1.features), int(wv1.features["ConnID"]), overlays=["sleeve"])
    hs.initiate()
    data = wv2.stream.data
    pos = 0
    while not hs.complete:
        hs.receive_data(data[pos : pos + 1])
        pos += 1
    assert pos == 184  # header, flag and the 176-byte features frame, nothing more
    frames: list[bytes] = []
    for i in range(pos, len(data)):
        frames += hs.codec.feed(data[i : i + 1])
    assert frames == wv2.messages


def test_conn_uid_is_the_one_in_sleeve_heartbeats(plain: list[Decoded]) -> None:
    conn_uids = set()
    for i in range(0, len(plain), 2):
        a, b = plain[i], plain[i + 1]
        hs = Handshake(a.stream.dst[1] == 6783, identity_of(a.features), int(a.features["ConnID"]))
        hs.initiate()
        hs.receive_data(b.stream.data)
        conn_uids.add(hs.conn_uid)
    heartbeats = [p.payload for p in udp_packets("plain-startup.pcap") if len(p.payload) == 42]
    assert heartbeats
    # sender(6) src(6) dst(6) len(2) then the 22-byte frame: 14 zero bytes and the ConnUID.
    assert {int.from_bytes(p[34:42], "big") for p in heartbeats} == conn_uids
