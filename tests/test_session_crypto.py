"""Session key, nonces and the v1/v2 connection codecs."""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import GobError, GobLimitError, ProtocolError, WireError
from router.gob import BYTES, STRING_MAP, Decoder, encode
from router.protocol import MAX_FRAME_SIZE
from router.session_crypto import (
    SEAL_OVERHEAD,
    V1_MAX_DEFINITION_BYTES,
    V1_MAX_TYPES,
    FrameCodec,
    GobFrameCodec,
    GobMessageSplitter,
    TcpOpener,
    TcpSealer,
    derive_session_key,
    tcp_nonce,
    udp_nonce,
    v1_stream_decoder,
)
from tests.gobflood import FIRST_ID, definition_flood, slice_definition, wide_struct_definition

KEY = bytes(range(32))


def pair(key: bytes | None = KEY) -> tuple[FrameCodec, FrameCodec]:
    return FrameCodec(key, outbound=True), FrameCodec(key, outbound=False)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# ---------------------------------------------------------------- nonces


def test_tcp_nonce_layout() -> None:
    assert tcp_nonce(True, 0) == bytes([0xC0]) + bytes(23)
    assert tcp_nonce(False, 0) == bytes([0x40]) + bytes(23)
    nonce = tcp_nonce(True, 0x0102030405060708)
    assert len(nonce) == 24
    assert nonce[0] == 0x80 | 0x40
    assert nonce[1:16] == bytes(15)
    assert nonce[16:] == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert tcp_nonce(False, 1)[23] == 1 and tcp_nonce(False, 256)[22:] == b"\x01\x00"
    with pytest.raises(ValueError):
        tcp_nonce(True, 1 << 64)


def test_udp_nonce_layout() -> None:
    seq = bytes.fromhex("8000000000000005")  # DF flag and sequence number 5
    assert udp_nonce(True, seq) == bytes([0x80]) + bytes(15) + seq
    assert udp_nonce(False, seq) == bytes(16) + seq
    with pytest.raises(ValueError):
        udp_nonce(True, b"\x00" * 7)


# ---------------------------------------------------------------- session key


def test_session_key_definition_and_symmetry() -> None:
    a, b = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    key_a = derive_session_key(bytes(b.public_key), a, b"pw")
    key_b = derive_session_key(bytes(a.public_key), bytes(b), b"pw")
    assert key_a == key_b and len(key_a) == 32
    precomputed = nacl.bindings.crypto_box_beforenm(bytes(b.public_key), bytes(a))
    assert key_a == hashlib.sha256(precomputed + b"pw").digest()
    assert derive_session_key(bytes(b.public_key), a, b"other") != key_a


def test_unusable_public_keys() -> None:
    priv = nacl.public.PrivateKey.generate()
    with pytest.raises(ProtocolError, match="low-order"):
        derive_session_key(bytes(32), priv, b"pw")
    with pytest.raises(ProtocolError, match="31 bytes"):
        derive_session_key(bytes(31), priv, b"pw")


# ---------------------------------------------------------------- sealing


def test_frames_are_secretboxes_with_counter_nonces() -> None:
    dialler, _ = pair()
    first = dialler.encode_frame(b"\x04hello")
    second = dialler.encode_frame(b"\x04hello")
    assert first[:4] == (6 + SEAL_OVERHEAD).to_bytes(4, "big")
    assert first[4:] == nacl.bindings.crypto_secretbox(b"\x04hello", tcp_nonce(True, 0), KEY)
    assert second[4:] == nacl.bindings.crypto_secretbox(b"\x04hello", tcp_nonce(True, 1), KEY)
    _, listener = pair()
    reply = listener.encode_frame(b"x")
    assert reply[4:] == nacl.bindings.crypto_secretbox(b"x", tcp_nonce(False, 0), KEY)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=40),
    st.lists(st.integers(min_value=0, max_value=20_000), max_size=30),
    st.booleans(),
)
def test_round_trip_both_directions(
    script: list[tuple[bool, bytes]], cuts: list[int], encrypted: bool
) -> None:
    dialler, listener = pair(KEY if encrypted else None)
    wire = {True: b"", False: b""}
    sent: dict[bool, list[bytes]] = {True: [], False: []}
    for from_dialler, payload in script:
        codec = dialler if from_dialler else listener
        wire[from_dialler] += codec.encode_frame(payload)
        sent[from_dialler].append(payload)
    got_by_listener = [f for c in chunks(wire[True], cuts) for f in listener.feed(c)]
    got_by_dialler = [f for c in chunks(wire[False], cuts) for f in dialler.feed(c)]
    assert got_by_listener == sent[True]
    assert got_by_dialler == sent[False]
    assert dialler.encrypted is encrypted and listener.encrypted is encrypted


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=50), min_size=1, max_size=5), st.data())
def test_any_tampering_is_detected(payloads: list[bytes], data: st.DataObject) -> None:
    dialler, listener = pair()
    frames = [dialler.encode_frame(p) for p in payloads]
    index = data.draw(st.integers(0, len(frames) - 1))
    body = bytearray(frames[index])
    pos = data.draw(st.integers(4, len(body) - 1))
    body[pos] ^= data.draw(st.integers(1, 255))
    frames[index] = bytes(body)
    for f in frames[:index]:
        listener.feed(f)
    with pytest.raises(ProtocolError, match="Unable to decrypt"):
        listener.feed(frames[index])


def test_reorder_replay_and_loss_are_detected() -> None:
    dialler, _ = pair()
    a, b, c = (dialler.encode_frame(bytes([i])) for i in range(3))
    _, listener = pair()
    with pytest.raises(ProtocolError):
        listener.feed(b + a)  # reordered
    _, listener = pair()
    assert listener.feed(a) == [b"\x00"]
    with pytest.raises(ProtocolError):
        listener.feed(a)  # replayed
    _, listener = pair()
    assert listener.feed(a) == [b"\x00"]
    with pytest.raises(ProtocolError):
        listener.feed(c)  # b was lost


def test_wrong_polarity_or_key_fails() -> None:
    frame = FrameCodec(KEY, outbound=True).encode_frame(b"m")
    with pytest.raises(ProtocolError):
        FrameCodec(KEY, outbound=True).feed(frame)  # both ends think they dialled
    with pytest.raises(ProtocolError):
        FrameCodec(bytes(32), outbound=False).feed(frame)
    assert FrameCodec(KEY, outbound=False).feed(frame) == [b"m"]


def test_errors_are_sticky_and_failed_opens_do_not_advance() -> None:
    dialler, listener = pair()
    good = dialler.encode_frame(b"ok")
    with pytest.raises(ProtocolError):
        listener.feed(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ProtocolError):
        listener.feed(good)  # the stream is out of sync for good
    opener = TcpOpener(KEY, outbound=False)
    sealed = TcpSealer(KEY, outbound=True).seal(b"z")
    with pytest.raises(ProtocolError):
        opener.open(b"\x00" * 20)
    with pytest.raises(ProtocolError, match="shorter than the MAC"):
        opener.open(b"\x00" * 5)
    assert opener.seq == 0 and opener.open(sealed) == b"z" and opener.seq == 1


def test_limits_and_queued_bytes() -> None:
    codec = FrameCodec()
    with pytest.raises(ValueError):
        codec.encode_frame(bytes(MAX_FRAME_SIZE + 1))
    sender, receiver = pair()
    with pytest.raises(ValueError):
        sender.encode_frame(bytes(MAX_FRAME_SIZE - SEAL_OVERHEAD + 1))
    assert receiver.feed(sender.encode_frame(b"next")) == [b"next"]  # no nonce was used up
    assert len(FrameCodec(KEY).encode_frame(bytes(MAX_FRAME_SIZE - SEAL_OVERHEAD))) == MAX_FRAME_SIZE + 4
    with pytest.raises(ProtocolError, match="exceeds maximum size"):
        FrameCodec().feed((MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
    codec = FrameCodec()
    codec.queue(b"\x00\x00\x00\x01A\x00\x00")
    assert codec.feed(b"") == [b"A"]
    assert codec.feed(b"\x00\x01B") == [b"B"]
    with pytest.raises(ValueError):
        TcpSealer(b"short", True)


# ---------------------------------------------------------------- protocol v1 codec


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.binary(max_size=200), max_size=20), st.lists(st.integers(0, 5000), max_size=20), st.booleans()
)
def test_v1_round_trip(payloads: list[bytes], cuts: list[int], encrypted: bool) -> None:
    key = KEY if encrypted else None
    sender, receiver = GobFrameCodec(key, outbound=False), GobFrameCodec(key, outbound=True)
    wire = b"".join(sender.encode_frame(p) for p in payloads)
    assert [f for c in chunks(wire, cuts) for f in receiver.feed(c)] == payloads


def test_v1_messages_are_gob_byte_slices() -> None:
    codec = GobFrameCodec()
    assert codec.encode_frame(b"\x00") == bytes.fromhex("040a000100")
    assert codec.encode_frame(b"abc") == encode(b"abc", BYTES)
    sealed = GobFrameCodec(KEY, outbound=True).encode_frame(b"abc")
    assert sealed == encode(nacl.bindings.crypto_secretbox(b"abc", tcp_nonce(True, 0), KEY), BYTES)


def test_v1_keeps_definitions_of_the_stream() -> None:
    # A definition message followed by a []byte value on the same stream.
    defs_and_map = encode({"a": "b"}, STRING_MAP)
    splitter = GobMessageSplitter()
    definition = splitter.feed(defs_and_map)[0]
    decoder = v1_stream_decoder()  # as the handshake hands it over, holding the definition
    decoder.feed(definition)
    decoder.consume_definitions()
    codec = GobFrameCodec(decoder=decoder)
    assert codec.feed(encode(b"hi", BYTES)) == [b"hi"]
    late = GobFrameCodec()
    assert late.feed(definition + encode(b"yo", BYTES)) == [b"yo"]
    with pytest.raises(GobError):
        GobFrameCodec().feed(encode({"a": "b"}, STRING_MAP))  # a map is not a message


def test_v1_bad_streams() -> None:
    with pytest.raises(WireError, match="empty gob message"):
        GobFrameCodec().feed(b"\x00")
    with pytest.raises(ProtocolError, match="exceeds maximum size"):
        GobFrameCodec(max_message_size=10).feed(b"\x20")
    codec = GobFrameCodec()
    assert codec.feed(b"\xfe\x01") == []  # an incomplete length prefix just waits
    with pytest.raises(GobError, match="out of range"):
        GobFrameCodec().feed(b"\xf0")


# Issue 12, defect 6: a v1 peer's type definitions were kept without limit (and, with a
# password, before anything was decrypted: gob definitions are outside the secretbox).


@pytest.mark.parametrize("key", [None, KEY])
def test_v1_definition_flood_is_cut_off_within_the_first_read(key: bytes | None) -> None:
    codec = GobFrameCodec(key)
    flood = definition_flood(20_000)
    reads = 0
    with pytest.raises(GobLimitError, match="type definitions"):
        for start in range(0, len(flood), 65536):
            reads += 1
            codec.feed(flood[start : start + 65536])
    assert reads == 1
    assert codec.definition_count == V1_MAX_TYPES
    with pytest.raises(GobLimitError):  # the stream stays refused
        codec.feed(b"")


def test_v1_definition_bytes_are_bounded_before_decryption() -> None:
    codec = GobFrameCodec(KEY)
    wide = wide_struct_definition(FIRST_ID, 300)
    assert len(wide) < V1_MAX_DEFINITION_BYTES < 3 * len(wide) * V1_MAX_TYPES
    with pytest.raises(GobLimitError, match="bytes"):
        for i in range(3 * V1_MAX_TYPES):
            codec.feed(wide_struct_definition(FIRST_ID + i, 300))
    assert codec.definition_bytes <= V1_MAX_DEFINITION_BYTES


def test_v1_definitions_are_parsed_once_not_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = 0
    original = Decoder._read_definition

    def counting(self: Decoder, type_id: int) -> None:
        nonlocal parsed
        parsed += 1
        original(self, type_id)

    monkeypatch.setattr(Decoder, "_read_definition", counting)
    sender, receiver = GobFrameCodec(KEY, outbound=True), GobFrameCodec(KEY, outbound=False)
    wire = definition_flood(V1_MAX_TYPES) + b"".join(sender.encode_frame(b"%d" % i) for i in range(300))
    frames = [f for start in range(0, len(wire), 100) for f in receiver.feed(wire[start : start + 100])]
    assert frames == [b"%d" % i for i in range(300)]
    assert parsed == V1_MAX_TYPES


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=10), st.booleans(), st.booleans())
def test_v1_arbitrary_streams_raise_only_wire_errors(
    data: bytes, cuts: list[int], encrypted: bool, with_definition: bool
) -> None:
    codec = GobFrameCodec(KEY if encrypted else None)
    if with_definition:
        data = slice_definition(FIRST_ID) + data
    try:
        for piece in chunks(data, cuts):
            codec.feed(piece)
    except WireError:
        pass


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=10), st.booleans())
def test_v2_arbitrary_streams_raise_only_wire_errors(data: bytes, cuts: list[int], encrypted: bool) -> None:
    codec = FrameCodec(KEY if encrypted else None)
    try:
        for piece in chunks(data, cuts):
            codec.feed(piece)
    except WireError:
        pass
