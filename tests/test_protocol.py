"""Framing, tagged messages, gossip envelopes, overlay control, and fuzzing with real bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.errors import GobError, ProtocolError, WireError
from router.gob import BYTES, STRING, UINT, encode_stream
from router.handshake import Handshake, HandshakeFailure, PeerIdentity, decode_features, parse_features
from router.protocol import (
    GOSSIP_TAGS,
    MAX_FRAME_SIZE,
    FastdpControl,
    FrameReader,
    GossipMessage,
    OverlayControl,
    SleeveControl,
    Tag,
    decode_gossip,
    decode_pmtu,
    encode_gossip,
    encode_message,
    encode_pmtu,
    frame,
    split_message,
)
from tests.captures import tcp_streams

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# ---------------------------------------------------------------- frames


@given(st.lists(st.binary(max_size=600), max_size=30), st.lists(st.integers(0, 30_000), max_size=40))
def test_frame_reader_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    reader = FrameReader()
    got: list[bytes] = []
    for piece in chunks(stream, cuts):
        got += reader.feed(piece)
    assert got == payloads
    assert reader.buffered == 0


def test_frame_reader_keeps_partial_frames() -> None:
    reader = FrameReader()
    assert reader.feed(b"\x00\x00") == [] and reader.buffered == 2
    assert reader.feed(b"\x00\x03ab") == [] and reader.buffered == 6
    assert reader.feed(b"c\x00\x00\x00\x00\x00") == [b"abc", b""]
    assert reader.buffered == 1


def test_ten_mib_limit() -> None:
    reader = FrameReader()
    # Exactly the limit is allowed: the reader just waits for the body.
    assert reader.feed(MAX_FRAME_SIZE.to_bytes(4, "big") + b"x") == []
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="exceeds maximum size: 10485761 > 10485760"):
        reader.feed((MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError):
        reader.feed(frame(b"ok"))  # out of sync for good
    assert len(frame(bytes(MAX_FRAME_SIZE))) == MAX_FRAME_SIZE + 4
    with pytest.raises(ValueError):
        frame(bytes(MAX_FRAME_SIZE + 1))
    with pytest.raises(ProtocolError):
        FrameReader(max_size=3).feed(frame(b"four"))


def test_tagged_messages_and_unknown_tags() -> None:
    assert encode_message(Tag.HEARTBEAT) == b"\x00"
    assert split_message(b"\x00") == (Tag.HEARTBEAT, b"")
    assert split_message(b"") is None  # Weave skips blank messages
    assert split_message(b"\x2aabc") == (42, b"abc")  # unknown: representable, callers ignore it
    assert encode_message(200, b"z") == b"\xc8z"
    with pytest.raises(ValueError):
        encode_message(256)
    assert [t.value for t in Tag] == list(range(8))


# ---------------------------------------------------------------- gossip


gossip_messages = st.one_of(
    st.builds(GossipMessage, st.just(Tag.GOSSIP), st.text(max_size=20), U64, st.binary(max_size=300)),
    st.builds(
        GossipMessage, st.just(Tag.GOSSIP_BROADCAST), st.text(max_size=20), U64, st.binary(max_size=300)
    ),
    st.builds(
        GossipMessage, st.just(Tag.GOSSIP_UNICAST), st.text(max_size=20), U64, st.binary(max_size=300), U64
    ),
)


@given(gossip_messages)
def test_gossip_round_trip(msg: GossipMessage) -> None:
    body = encode_gossip(msg)
    assert decode_gossip(msg.tag, body) == msg
    assert decode_gossip(int(msg.tag), body + b"\x05\x0a\x00\x00") == msg  # trailing data ignored, as Go


def test_gossip_wire_layout() -> None:
    body = encode_gossip(GossipMessage(Tag.GOSSIP, "topology", 0x029800000002, b"\x01"))
    assert body == bytes.fromhex("0b0c0008") + b"topology" + bytes.fromhex(
        "090600fa029800000002"
    ) + bytes.fromhex("040a000101")
    unicast = encode_gossip(GossipMessage(Tag.GOSSIP_UNICAST, "c", 1, b"", 2))
    assert unicast == bytes.fromhex("040c000163") + bytes.fromhex("03060001") + bytes.fromhex(
        "03060002"
    ) + bytes.fromhex("030a0000")


def test_gossip_bad_use_and_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_gossip(GossipMessage(Tag.HEARTBEAT, "c", 1, b""))
    with pytest.raises(ValueError):
        encode_gossip(GossipMessage(Tag.GOSSIP, "c", 1, b"", dst=2))
    with pytest.raises(ValueError):
        encode_gossip(GossipMessage(Tag.GOSSIP_UNICAST, "c", 1, b""))
    with pytest.raises(ProtocolError, match="not a gossip tag"):
        decode_gossip(7, b"")
    wrong_kind = encode_stream([(5, UINT), (1, UINT), (b"", BYTES)])
    with pytest.raises(GobError, match="gossip envelope"):
        decode_gossip(4, wrong_kind)
    with pytest.raises(GobError):
        decode_gossip(4, encode_stream([("c", STRING), (1, UINT)]))  # no payload
    with pytest.raises(GobError):
        decode_gossip(5, encode_stream([("c", STRING), (1, UINT), (b"", BYTES)]))  # no destination
    with pytest.raises(GobError):
        decode_gossip(6, b"")


# ---------------------------------------------------------------- overlay control


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40))
def test_overlay_control_round_trip(forwarder: int, subtag: int, data: bytes) -> None:
    control = OverlayControl(forwarder, subtag, data)
    body = control.encode()
    assert body[:2] == bytes((forwarder, subtag))
    assert OverlayControl.decode(body) == control


def test_overlay_control_known_messages() -> None:
    assert OverlayControl(0, SleeveControl.CONNECTION_ESTABLISHED).encode() == b"\x00\x01"
    assert frame(
        encode_message(
            Tag.OVERLAY_CONTROL, OverlayControl(0, SleeveControl.PMTU_VERIFIED, encode_pmtu(1438)).encode()
        )
    ) == bytes.fromhex("00000005070003059e")
    assert decode_pmtu(b"\x05\x9e") == 1438
    assert decode_pmtu(b"\x05\x9e\xff") == 1438  # like Go, extra bytes are ignored
    assert OverlayControl(1, FastdpControl.HEARTBEAT_ACK).encode() == b"\x01\x00"
    assert int(FastdpControl.CRYPTO_INIT_SA_REMOTE) == 1
    with pytest.raises(ProtocolError):
        OverlayControl.decode(b"\x00")
    with pytest.raises(ProtocolError):
        decode_pmtu(b"\x05")
    with pytest.raises(ValueError):
        OverlayControl(256, 0).encode()
    with pytest.raises(ValueError):
        encode_pmtu(70000)


# ---------------------------------------------------------------- fuzzing with real bytes


@pytest.fixture(scope="module")
def real_streams() -> list[bytes]:
    plain = tcp_streams("plain-startup.pcap")
    ipam = tcp_streams("ipam-dns.pcap")
    return [plain[0].data, plain[1].data, ipam[0].data[:1500], tcp_streams("enc-startup.pcap")[0].data[:600]]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        pos %= len(buf) + 1
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= arg
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos : pos + arg]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


def decode_everything(payloads: list[bytes]) -> None:
    for payload in payloads:
        split = split_message(payload)
        if split is None:
            continue
        tag, body = split
        if tag in GOSSIP_TAGS:
            decode_gossip(tag, body)
        elif tag == Tag.OVERLAY_CONTROL:
            control = OverlayControl.decode(body)
            if control.subtag == SleeveControl.PMTU_VERIFIED:
                decode_pmtu(control.data)


LOCAL = PeerIdentity(0x02AA00000009, "fuzz", 9, 9)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 3), st.lists(mutation, min_size=1, max_size=4), st.integers(1, 700), st.booleans())
def test_mutated_captures_raise_only_wire_errors(
    real_streams: list[bytes], which: int, ops: list[tuple], chunk: int, password: bool
) -> None:
    data = mutate(real_streams[which], ops)

    # Framing and message decoding, message by message so one bad message does not hide the rest.
    reader = FrameReader()
    try:
        payloads = reader.feed(data[8:])
    except WireError:
        payloads = []
    for i, payload in enumerate(payloads):
        try:
            if i == 0:
                parse_features(decode_features(payload))
            else:
                decode_everything([payload])
        except WireError:
            pass

    # The whole handshake, fed in chunks, then the codec.
    hs = Handshake(False, LOCAL, 1, b"pw" if password else None, overlays=["sleeve"])
    hs.initiate()
    try:
        for pos in range(0, len(data), chunk):
            piece = data[pos : pos + chunk]
            if hs.complete:
                decode_everything(hs.codec.feed(piece))
            else:
                hs.receive_data(piece)
        if hs.complete:
            decode_everything(hs.codec.feed(b""))
    except HandshakeFailure as exc:
        assert not hs.complete and exc is hs.error
    except WireError:
        assert hs.complete, "before completion every failure is a HandshakeFailure"


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["PeerNameFlavour", "Name", "NickName", "UID", "ConnID", "ShortID", "Trusted", "Overlays"]
        ),
        st.text(max_size=25),
    )
)
def test_arbitrary_feature_maps_parse_or_fail_cleanly(features: dict[str, str]) -> None:
    try:
        remote = parse_features(features)
    except HandshakeFailure:
        return
    assert remote.nickname == features["NickName"]
    assert 0 <= remote.name < 1 << 48 and 0 <= remote.uid < 1 << 64
