"""Two in-memory pyweave ends running the handshake against each other."""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import GobLimitError, WireError
from router.gob import STRING, STRING_MAP, encode, encode_uint
from router.handshake import (
    ERR_EXPECTED_CRYPTO,
    ERR_EXPECTED_NO_CRYPTO,
    FailureReason,
    Handshake,
    HandshakeFailure,
    HandshakeState,
    PeerIdentity,
    decode_features,
    encode_features,
    make_features,
    parse_features,
)
from router.protocol import MAX_HANDSHAKE_FRAME_SIZE, FrameReader, frame
from router.session_crypto import V1_MAX_TYPES, FrameCodec, GobFrameCodec, derive_session_key
from tests.gobflood import FIRST_ID, definition_flood

A = PeerIdentity(0x02AA00000001, "host-a", 1111, 17)
B = PeerIdentity(0x02AA00000002, "host-b", 2222, 4095)


@dataclass
class End:
    hs: Handshake
    after: list[bytes] = field(default_factory=list)  # frames to send once complete
    frames: list[bytes] = field(default_factory=list)  # frames received after the handshake
    failure: HandshakeFailure | None = None
    inbox: bytes = b""


def pump(
    a: Handshake, b: Handshake, chunk: int | None = None, after: tuple[list[bytes], list[bytes]] = ([], [])
):
    """Run both ends to the end, delivering `chunk` bytes at a time (None = all there is).

    Each end sends its `after` frames as soon as it completes, like Weave sending
    gossip straight after the handshake, so they can share a read with the features.
    """
    ends = [End(a, list(after[0])), End(b, list(after[1]))]
    ends[1].inbox = a.initiate()
    ends[0].inbox = b.initiate()
    for _ in range(100_000):
        progressed = False
        for i, end in enumerate(ends):
            peer = ends[1 - i]
            if not end.inbox or end.failure is not None:
                continue
            size = len(end.inbox) if chunk is None else chunk
            data, end.inbox = end.inbox[:size], end.inbox[size:]
            progressed = True
            if end.hs.complete:
                end.frames += end.hs.codec.feed(data)
                continue
            try:
                peer.inbox += end.hs.receive_data(data)
            except HandshakeFailure as exc:
                end.failure = exc
                peer.inbox += exc.unsent
                continue
            if end.hs.complete:
                end.frames += end.hs.codec.feed(b"")  # whatever came with the features
                for payload in end.after:
                    peer.inbox += end.hs.codec.encode_frame(payload)
        if not progressed:
            return ends
    raise AssertionError("handshake did not settle")


def both_complete(ends: list[End]) -> None:
    for end in ends:
        assert end.failure is None, end.failure
        assert end.hs.state is HandshakeState.COMPLETE


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("password", [None, b"s3cret"])
def test_two_ends_agree(password: bytes | None, chunk: int | None) -> None:
    a = Handshake(True, A, 0x1234, password, overlays=["fastdp", "sleeve"])
    b = Handshake(False, B, 0xFFFF_0000_FFFF_0000, password, overlays=["sleeve"])
    early = ([b"\x04from a", b"\x00"], [b"\x07\x00\x01", b"\x00" * 3000])
    ends = pump(a, b, chunk, early)
    both_complete(ends)
    assert a.version == b.version == 2
    assert a.remote.name == B.name and a.remote.nickname == "host-b"
    assert (a.remote.uid, a.remote.short_id, a.remote.conn_id) == (2222, 4095, 0xFFFF_0000_FFFF_0000)
    assert b.remote.overlays == ("fastdp", "sleeve") and a.remote.overlays == ("sleeve",)
    assert b.remote.raw == a.features
    assert a.conn_uid == b.conn_uid == 0x1234 ^ 0xFFFF_0000_FFFF_0000
    assert a.codec.encrypted is b.codec.encrypted is (password is not None)
    if password is None:
        assert a.session_key is None and b.session_key is None
    else:
        assert a.session_key == b.session_key and a.session_key is not None
        assert a.overlay_session_key == a.session_key  # nobody trusts anybody
    # Frames sent right after completion were handed to the codec, whatever the chunking.
    assert ends[0].frames == early[1] and ends[1].frames == early[0]
    # And the codecs keep working in both directions.
    for i in range(5):
        assert b.codec.feed(a.codec.encode_frame(bytes([4, i]))) == [bytes([4, i])]
        assert a.codec.feed(b.codec.encode_frame(bytes([5, i]))) == [bytes([5, i])]


def test_wire_layout_with_an_injected_key() -> None:
    key = nacl.public.PrivateKey(bytes(range(1, 33)))
    hs = Handshake(True, A, 5, b"pw", private_key=key)
    assert hs.initiate() == b"weave\x01\x02"
    assert hs.receive_data(b"weave\x01\x02") == b"\x01" + bytes(key.public_key)
    assert hs.public_key == bytes(key.public_key)
    plain = Handshake(True, A, 5, private_key=key)  # no password: the key is not used
    plain.initiate()
    assert plain.receive_data(b"weave\x01\x02") == b"\x00"
    assert plain.public_key is None


def test_mismatched_passwords_fail_cleanly_on_both_sides() -> None:
    ends = pump(Handshake(True, A, 1, b"one"), Handshake(False, B, 2, b"two"))
    for end in ends:
        assert end.failure is not None and end.failure.reason is FailureReason.DECRYPTION_FAILED
        assert "password" in str(end.failure) and "Unable to decrypt" in str(end.failure)
        assert end.failure.retryable
        assert end.hs.state is HandshakeState.FAILED and end.hs.error is end.failure


@pytest.mark.parametrize("password_on_dialler", [True, False])
def test_password_on_one_side_only(password_on_dialler: bool) -> None:
    a = Handshake(True, A, 1, b"pw" if password_on_dialler else None)
    b = Handshake(False, B, 2, None if password_on_dialler else b"pw")
    ends = pump(a, b)
    with_pw, without_pw = (ends[0], ends[1]) if password_on_dialler else (ends[1], ends[0])
    assert with_pw.failure is not None and without_pw.failure is not None
    assert with_pw.failure.reason is FailureReason.EXPECTED_CRYPTO
    assert str(with_pw.failure) == ERR_EXPECTED_CRYPTO
    assert without_pw.failure.reason is FailureReason.EXPECTED_NO_CRYPTO
    assert str(without_pw.failure) == ERR_EXPECTED_NO_CRYPTO


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("password", [None, b"pw"])
def test_v1_fallback(password: bytes | None, chunk: int | None) -> None:
    a = Handshake(True, A, 77, password, overlays=["sleeve"], extra_features={"X": "y"})
    b = Handshake(False, B, 88, password, max_version=1)
    early = ([b"\x04gossip"], [b"\x00", b"\x06" * 500])
    ends = pump(a, b, chunk, early)
    both_complete(ends)
    assert a.version == b.version == 1
    assert isinstance(a.codec, GobFrameCodec) and a.codec.encrypted is (password is not None)
    # v1 carries only the five v1 features (plus the key), in clear.
    assert b.remote.raw == {
        k: a.features[k] for k in ("ConnID", "Name", "NickName", "PeerNameFlavour", "UID")
    }
    assert b.remote.short_id is None and b.remote.overlays is None and b.remote.trusted is False
    assert a.conn_uid == b.conn_uid == 77 ^ 88
    assert a.session_key == b.session_key
    assert ends[0].frames == early[1] and ends[1].frames == early[0]
    assert b.codec.feed(a.codec.encode_frame(b"more")) == [b"more"]


def test_v1_intro_bytes() -> None:
    key = nacl.public.PrivateKey(bytes(range(32)))
    hs = Handshake(True, A, 9, b"pw", max_version=1, private_key=key, overlays=["sleeve"])
    assert hs.initiate() == b"weave\x01\x01"
    intro = hs.receive_data(b"weave\x01\x02")
    expected = {k: hs.features[k] for k in ("Name", "NickName", "UID", "ConnID", "PeerNameFlavour")}
    expected["PublicKey"] = bytes(key.public_key).hex()
    assert decode_features(intro) == expected
    assert intro == encode_features(expected)


def v1_peer_intro(features: dict[str, str]) -> bytes:
    return b"weave\x01\x01" + encode(features, STRING_MAP)


@pytest.mark.parametrize(
    "password,public_key,reason",
    [
        (b"pw", None, FailureReason.EXPECTED_CRYPTO),
        (None, "00" * 32, FailureReason.EXPECTED_NO_CRYPTO),
        (b"pw", "xyz", FailureReason.BAD_PUBLIC_KEY),
        (b"pw", "00" * 31, FailureReason.BAD_PUBLIC_KEY),
    ],
)
def test_v1_crypto_mismatches(password: bytes | None, public_key: str | None, reason: FailureReason) -> None:
    features = make_features(B, 3)
    if public_key is not None:
        features["PublicKey"] = public_key
    hs = Handshake(False, A, 4, password)
    hs.initiate()
    with pytest.raises(HandshakeFailure) as info:
        hs.receive_data(v1_peer_intro(features))
    assert info.value.reason is reason


def test_version_ranges_that_do_not_overlap() -> None:
    ends = pump(Handshake(True, A, 1, min_version=2), Handshake(False, B, 2, max_version=1))
    assert ends[0].failure is not None and ends[1].failure is not None
    assert str(ends[0].failure) == "remote version range [1,1] is incompatible with ours [2,2]"
    assert str(ends[1].failure) == "remote version range [2,2] is incompatible with ours [1,1]"
    assert ends[0].failure.reason is ends[1].failure.reason is FailureReason.VERSION_MISMATCH
    with pytest.raises(ValueError):
        Handshake(True, A, 1, max_version=3)


def test_name_collision_is_never_retried() -> None:
    twin = PeerIdentity(A.name, "impostor", A.uid + 1)
    ends = pump(Handshake(True, A, 1), Handshake(False, twin, 2))
    for end in ends:
        assert end.failure is not None and end.failure.reason is FailureReason.NAME_COLLISION
        assert not end.failure.retryable
        assert "peer names collision" in str(end.failure) and "02:aa:00:00:00:01" in str(end.failure)


def test_connection_to_ourself_is_never_retried() -> None:
    ends = pump(Handshake(True, A, 1), Handshake(False, A, 2))
    for end in ends:
        assert end.failure is not None and end.failure.reason is FailureReason.CONNECT_TO_SELF
        assert not end.failure.retryable
        assert str(end.failure) == "cannot connect to ourself"


def v2_peer(features: dict[str, str]) -> bytes:
    return b"weave\x01\x02\x00" + frame(encode_features(features))


def receive(data: bytes, password: bytes | None = None) -> Handshake:
    hs = Handshake(False, A, 1, password)
    hs.initiate()
    hs.receive_data(data)
    return hs


@pytest.mark.parametrize("missing", ["PeerNameFlavour", "Name", "NickName", "UID", "ConnID"])
def test_missing_feature(missing: str) -> None:
    features = make_features(B, 2)
    del features[missing]
    with pytest.raises(HandshakeFailure, match=f"^Field {missing} is missing$") as info:
        receive(v2_peer(features))
    assert info.value.reason is FailureReason.MISSING_FEATURE and info.value.retryable


def test_optional_features_may_be_absent() -> None:
    features = {k: v for k, v in make_features(B, 2).items() if k not in ("ShortID", "Trusted", "Overlays")}
    remote = receive(v2_peer(features)).remote
    assert (remote.short_id, remote.trusted, remote.overlays) == (None, False, None)


def test_bad_flavour() -> None:
    features = make_features(B, 2)
    features["PeerNameFlavour"] = "hash"
    with pytest.raises(HandshakeFailure, match=r"Peer name flavour mismatch \(ours: 'mac', theirs: 'hash'\)"):
        receive(v2_peer(features))


@pytest.mark.parametrize(
    "key,value",
    [
        ("Name", "zz:zz:zz:zz:zz:zz"),
        ("Name", "02:aa:00:00:00"),
        ("Name", "02:aa:00-00:00:02"),
        ("ShortID", "4096"),
        ("ShortID", "-1"),
        ("ShortID", ""),
        ("UID", "+5"),
        ("UID", "18446744073709551616"),
        ("UID", " 5"),
        ("ConnID", "1_000"),
        ("ConnID", "٣"),  # a non-ASCII digit
        ("Trusted", "yes"),
    ],
)
def test_feature_values_that_do_not_parse(key: str, value: str) -> None:
    features = make_features(B, 2)
    features[key] = value
    with pytest.raises(HandshakeFailure) as info:
        parse_features(features)
    assert info.value.reason is FailureReason.BAD_FEATURE_VALUE and key in str(info.value)


@pytest.mark.parametrize(
    "key,value,field_name,parsed",
    [
        ("Trusted", "T", "trusted", True),
        ("Trusted", "0", "trusted", False),
        ("Name", "02-AA-00-00-00-05", "name", 0x02AA00000005),
        ("UID", "18446744073709551615", "uid", (1 << 64) - 1),
        ("ShortID", "0007", "short_id", 7),
        ("Overlays", "fastdp  sleeve", "overlays", ("fastdp", "sleeve")),
    ],
)
def test_feature_values_go_accepts(key: str, value: str, field_name: str, parsed: object) -> None:
    features = make_features(B, 2)
    features[key] = value
    assert getattr(parse_features(features), field_name) == parsed


def test_trust_decides_the_overlay_key() -> None:
    a = Handshake(True, A, 1, b"pw", trusted_remote=True)
    b = Handshake(False, B, 2, b"pw", trusted_remote=True)
    both_complete(pump(a, b))
    assert a.remote.trusted and b.remote.trusted and not a.untrusted
    assert a.overlay_session_key is None and a.session_key is not None
    c = Handshake(True, A, 1, b"pw", trusted_remote=True)
    d = Handshake(False, B, 2, b"pw", trusted_remote=False)
    both_complete(pump(c, d))
    assert c.untrusted and d.untrusted and c.overlay_session_key == d.overlay_session_key is not None


def test_extra_features_are_sent_but_never_override() -> None:
    a = Handshake(True, A, 1, extra_features={"SuperFrames": "1", "Name": "ignored"})
    b = Handshake(False, B, 2)
    both_complete(pump(a, b))
    assert b.remote.raw["SuperFrames"] == "1" and b.remote.name == A.name


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"GET / HTTP/1.1\r\n", FailureReason.BAD_HEADER),
        (b"weavX\x01\x02", FailureReason.BAD_HEADER),
        (b"weave\x03\x04", FailureReason.VERSION_MISMATCH),
        (b"weave\x01\x02\x02", FailureReason.BAD_ENCRYPTION_FLAG),
        (b"weave\x01\x02\x00" + (10 * 1024 * 1024 + 1).to_bytes(4, "big"), FailureReason.MALFORMED_FEATURES),
        (b"weave\x01\x02\x00" + frame(b"\x03\x0c\x00\x01"), FailureReason.MALFORMED_FEATURES),
        (b"weave\x01\x02\x00" + frame(encode("str", STRING)), FailureReason.MALFORMED_FEATURES),
        (b"weave\x01\x02\x00" + frame(b""), FailureReason.MALFORMED_FEATURES),
    ],
)
def test_malformed_input(data: bytes, reason: FailureReason) -> None:
    with pytest.raises(HandshakeFailure) as info:
        receive(data)
    assert info.value.reason is reason


def test_bad_header_is_rejected_at_the_first_wrong_byte() -> None:
    hs = Handshake(False, A, 1)
    hs.initiate()
    assert hs.receive_data(b"wea") == b""
    with pytest.raises(HandshakeFailure, match="not recognised"):
        hs.receive_data(b"t")


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(HandshakeFailure) as info:
        receive(b"weave\x01\x02\x01" + bytes(32), password=b"pw")
    assert info.value.reason is FailureReason.BAD_PUBLIC_KEY


def test_api_misuse_and_sticky_failure() -> None:
    hs = Handshake(True, A, 1)
    with pytest.raises(RuntimeError):
        hs.receive_data(b"weave")
    hs.initiate()
    with pytest.raises(RuntimeError):
        hs.initiate()
    for attribute in ("remote", "codec", "session_key", "conn_uid"):
        with pytest.raises(RuntimeError, match="not complete"):
            getattr(hs, attribute)
    with pytest.raises(RuntimeError, match="not negotiated"):
        _ = hs.version
    with pytest.raises(HandshakeFailure) as first:
        hs.receive_data(b"nope!!!")
    with pytest.raises(HandshakeFailure) as again:
        hs.receive_data(b"weave\x01\x02")
    assert again.value is first.value and again.value.unsent == b""
    done = receive(v2_peer(make_features(B, 2)))
    assert isinstance(done.codec, FrameCodec)
    with pytest.raises(RuntimeError, match="feed further data to the codec"):
        done.receive_data(b"\x00")


def test_identity_validation() -> None:
    with pytest.raises(ValueError, match="48 bits"):
        PeerIdentity(1 << 48, "x", 1)
    with pytest.raises(ValueError):
        PeerIdentity(1, "x", 1 << 64)
    with pytest.raises(ValueError):
        PeerIdentity(1, "x", 1, 4096)
    with pytest.raises(ValueError):
        Handshake(True, A, -1)


def test_features_frame_is_sealed_when_encrypted() -> None:
    key = nacl.public.PrivateKey(bytes(range(32)))
    hs = Handshake(True, A, 1, b"pw")
    hs.initiate()
    hs.receive_data(b"weave\x01\x02")
    sent = hs.receive_data(b"\x01" + bytes(key.public_key))
    (sealed,) = FrameReader().feed(sent)
    assert hs.public_key is not None
    peer = FrameCodec(derive_session_key(hs.public_key, key, b"pw"), outbound=False)
    (plain,) = peer.feed(sent)
    assert len(sealed) == len(plain) + 16
    assert decode_features(plain) == hs.features


def test_a_failing_end_still_hands_over_what_it_owes_the_peer() -> None:
    a, b = Handshake(True, A, 1, b"one"), Handshake(False, B, 2, b"two")
    header_a, header_b = a.initiate(), b.initiate()
    flag_key_b = b.receive_data(header_a)
    flag_key_a = a.receive_data(header_b)
    features_b = b.receive_data(flag_key_a)
    with pytest.raises(HandshakeFailure) as info:
        a.receive_data(flag_key_b + features_b)
    # `a` wrote its sealed features before reading b's, as a Go peer does concurrently.
    assert len(FrameReader().feed(info.value.unsent)) == 1
    with pytest.raises(HandshakeFailure) as other:
        b.receive_data(info.value.unsent)
    assert other.value.reason is info.value.reason is FailureReason.DECRYPTION_FAILED


# ------------------------------------------------- issue 12, defect 6: pre-handshake bounds
# Weave's features frames are 170-190 bytes in every capture; the post-handshake limit
# (10 MiB) let a stranger make us buffer 10 MiB before it had proved anything.

PEER_KEY = nacl.public.PrivateKey(bytes(range(1, 33)))


@pytest.mark.parametrize("password", [None, b"pw"])
def test_an_oversized_v2_features_prefix_fails_before_the_body(password: bytes | None) -> None:
    flag = b"\x00" if password is None else b"\x01" + bytes(PEER_KEY.public_key)
    prefix = (MAX_HANDSHAKE_FRAME_SIZE + 1).to_bytes(4, "big")
    hs = Handshake(False, A, 1, password)
    hs.initiate()
    hs.receive_data(b"weave\x01\x02" + flag)
    with pytest.raises(HandshakeFailure, match="exceeds") as info:
        hs.receive_data(prefix)  # just the 4-byte prefix: no body was needed to refuse it
    assert info.value.reason is FailureReason.MALFORMED_FEATURES
    # A frame of the limit's size is still waited for.
    ok = Handshake(False, A, 1, password)
    ok.initiate()
    ok.receive_data(b"weave\x01\x02" + flag + MAX_HANDSHAKE_FRAME_SIZE.to_bytes(4, "big"))
    assert ok.state is HandshakeState.AWAIT_FEATURES


def test_an_oversized_v1_gob_message_fails_before_the_body() -> None:
    hs = Handshake(False, A, 1)
    hs.initiate()
    with pytest.raises(HandshakeFailure, match="exceeds") as info:
        hs.receive_data(b"weave\x01\x01" + encode_uint(MAX_HANDSHAKE_FRAME_SIZE + 1))
    assert info.value.reason is FailureReason.MALFORMED_FEATURES


@pytest.mark.parametrize("password", [None, b"pw"])
def test_v1_definitions_before_the_features_are_bounded(password: bytes | None) -> None:
    hs = Handshake(False, A, 1, password)
    hs.initiate()
    with pytest.raises(HandshakeFailure, match="type definitions") as info:
        hs.receive_data(b"weave\x01\x01" + definition_flood(5000))
    assert info.value.reason is FailureReason.MALFORMED_FEATURES


def test_v1_definition_budget_spans_the_handshake_and_the_connection() -> None:
    # With a password the features are in clear and later definitions are never sealed,
    # so a peer with the wrong password could otherwise pile them up for good.
    features = make_features(B, 3)
    features["PublicKey"] = bytes(PEER_KEY.public_key).hex()
    hs = Handshake(False, A, 4, b"pw")
    hs.initiate()
    hs.receive_data(v1_peer_intro(features))  # one definition: map[string]string
    assert hs.complete and hs.codec.encrypted
    hs.codec.feed(definition_flood(V1_MAX_TYPES - 2, first=FIRST_ID + 20))
    with pytest.raises(GobLimitError):
        hs.codec.feed(definition_flood(2, first=FIRST_ID + 40))


@settings(max_examples=300, deadline=2000)
@given(st.sampled_from([b"weave\x01\x01", b"weave\x01\x02\x00", b"weave\x01\x02\x01"]), st.binary(max_size=2000))
def test_arbitrary_bytes_after_the_header_fail_cleanly(header: bytes, data: bytes) -> None:
    password = b"pw" if header.endswith(b"\x01\x02\x01") else None
    if password is not None:
        header += bytes(PEER_KEY.public_key)
    hs = Handshake(False, A, 1, password)
    hs.initiate()
    try:
        hs.receive_data(header + data)
        if hs.complete:
            hs.codec.feed(b"")
    except WireError:
        pass


@pytest.mark.parametrize("version", [1, 2])
def test_big_messages_right_after_the_features_keep_the_connection_limit(version: int) -> None:
    # The handshake's cap is for the handshake only: gossip sent in the same read as the
    # features (Weave does that) may be as large as any later message.
    big = b"\x04" + bytes(200_000)
    features = make_features(B, 3)
    if version == 1:
        data = v1_peer_intro(features) + GobFrameCodec().encode_frame(big)
    else:
        data = v2_peer(features) + FrameCodec().encode_frame(big)
    hs = receive(data)
    assert hs.complete and hs.version == version
    assert hs.codec.feed(b"") == [big]
