"""Framing of the real encrypted (--password) Weave 2.8 start-up capture.

The session keys were ephemeral, so only the layout and lengths can be checked.
"""

from __future__ import annotations

import pytest

from router.handshake import FailureReason, Handshake, HandshakeFailure, PeerIdentity
from router.protocol import FrameReader
from router.session_crypto import SEAL_OVERHEAD
from tests.captures import TcpStream, tcp_streams

KEY_END = 7 + 1 + 32


@pytest.fixture(scope="module")
def streams() -> list[TcpStream]:
    return tcp_streams("enc-startup.pcap")


def sealed_frames(stream: TcpStream) -> list[bytes]:
    reader = FrameReader()
    frames = reader.feed(stream.data[KEY_END:])
    assert reader.buffered == 0, f"{stream.src}: the stream must end on a frame boundary"
    return frames


def test_header_flag_and_public_key(streams: list[TcpStream]) -> None:
    assert len(streams) == 6
    keys = set()
    for s in streams:
        assert s.data[:7] == b"weave\x01\x02"
        assert s.data[7] == 1, "encrypted: flag byte 1"
        # Header and the flag+key arrive as separate writes, as mesh sends them.
        assert s.segments[:2] == [0, 7]
        keys.add(s.data[8:KEY_END])
    assert len(keys) == 6, "a fresh key pair per connection and side"


def test_every_message_is_a_length_prefixed_secretbox(streams: list[TcpStream]) -> None:
    total = 0
    for s in streams:
        frames = sealed_frames(s)
        assert all(len(f) > SEAL_OVERHEAD for f in frames)
        total += len(frames)
        # The features map, sealed: plaintext of the same size as in the plain capture.
        assert 170 <= len(frames[0]) - SEAL_OVERHEAD <= 175
        sizes = [len(f) - SEAL_OVERHEAD for f in frames[1:]]
        # Sealed sleeve control: 3 bytes (07 00 01 / 07 00 02) and 5 (07 00 03 + MTU).
        assert sizes.count(3) >= 2 and sizes.count(5) >= 1
    assert total == 11 + 10 + 13 + 10 + 13 + 9


def test_features_message_is_193_bytes(streams: list[TcpStream]) -> None:
    first = [4 + len(sealed_frames(s)[0]) for s in streams]
    assert 4 + 16 + 173 in first
    assert set(first) <= {4 + 16 + n for n in range(170, 176)}


def test_replaying_a_real_peer_reaches_its_sealed_features(streams: list[TcpStream]) -> None:
    """A pyweave end with a password parses the real header and key, sends its own
    sealed features, and fails only where it must: it cannot know the session key."""
    local = PeerIdentity(0x02AA00000001, "py", 42, 7)
    for s in streams:
        hs = Handshake(s.dst[1] == 6783, local, 99, password=b"not their password", overlays=["sleeve"])
        hs.initiate()
        sent = hs.receive_data(s.data[:KEY_END])
        assert sent[:1] == b"\x01" and sent[1:33] == hs.public_key
        features_frame = FrameReader().feed(sent[33:])
        assert len(features_frame) == 1 and len(features_frame[0]) > SEAL_OVERHEAD
        with pytest.raises(HandshakeFailure) as info:
            hs.receive_data(s.data[KEY_END:])
        assert info.value.reason is FailureReason.DECRYPTION_FAILED
        assert info.value.retryable


def test_no_password_meets_a_real_encrypted_peer(streams: list[TcpStream]) -> None:
    hs = Handshake(False, PeerIdentity(0x02AA00000001, "py", 42), 1)
    hs.initiate()
    with pytest.raises(
        HandshakeFailure, match="no password specificed, but peer requested an encrypted connection"
    ):
        hs.receive_data(streams[0].data)
    assert hs.error is not None and hs.error.reason is FailureReason.EXPECTED_NO_CRYPTO
