"""sleeve.crypto: encrypted sleeve datagrams, nonces, sequence streams and drops."""

from __future__ import annotations

import os
import struct
from collections import defaultdict

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import session_crypto
from router.errors import WireError
from sleeve.crypto import (
    DF_FLAG,
    DropReason,
    PacketDropped,
    SleeveCipher,
    parse_header,
    seq_field,
    udp_nonce,
)
from sleeve.replay import WINDOW_SIZE
from sleeve.wire import (
    ENCRYPTED_PACKET_OVERHEAD,
    FRAG_TEST_FRAME_LEN,
    Batcher,
    decode_frames,
    encode_frames,
    fragmentation_test_frame,
    heartbeat_frame,
    overlay_mtu,
    pmtu_probe_frame,
)
from tests.test_sleeve_wire import PEER, frames_eq, sleeve_datagrams

KEY = bytes(range(32))
A, B = PEER[1], PEER[2]


def pair(key: bytes = KEY) -> tuple[SleeveCipher, SleeveCipher]:
    """A dialled B."""
    return SleeveCipher(key, A, outbound=True), SleeveCipher(key, B, outbound=False)


def body(frames: list) -> bytes:
    return encode_frames(frames)


# ---------------------------------------------------------------- round trips and layout


names = st.integers(0, (1 << 48) - 1)
frames_st = st.lists(st.tuples(names, names, st.binary(min_size=14, max_size=400)), min_size=1, max_size=8)


@given(frames_st, st.booleans(), st.booleans())
@settings(max_examples=80)
def test_roundtrip_both_directions(frames: list, df: bool, a_sends: bool) -> None:
    a, b = pair()
    tx, rx, sender = (a, b, A) if a_sends else (b, a, B)
    packet = tx.seal(body(frames), df)
    assert len(packet) == len(body(frames)) + ENCRYPTED_PACKET_OVERHEAD
    assert parse_header(packet) == (sender, df, 0)
    got_sender, got = rx.decode(packet)
    assert got_sender == sender and frames_eq(got, frames)
    assert not rx.drops


def test_nonce_layout_matches_reference() -> None:
    """Built independently: byte 0 bit 7 = sender dialled, bit 6 = 0 (UDP), bytes 16..23 = seq field."""
    a, b = pair()
    frames = body([(A, B, heartbeat_frame(7))])
    for _ in range(3):
        a.seal(frames, df=True)
    packet = a.seal(frames, df=True)
    assert packet[6:14] == struct.pack(">Q", DF_FLAG | 3)
    nonce = b"\x80" + bytes(15) + packet[6:14]
    assert nacl.bindings.crypto_secretbox_open(packet[14:], nonce, KEY) == frames
    reply = b.seal(frames, df=False)
    assert reply[6:14] == bytes(8)
    assert nacl.bindings.crypto_secretbox_open(reply[14:], bytes(24), KEY) == frames
    assert udp_nonce(True, packet[6:14]) == nonce == session_crypto.udp_nonce(True, packet[6:14])
    assert udp_nonce(False, seq_field(5, False)) == session_crypto.udp_nonce(False, seq_field(5, False))
    # Never the TCP nonce of the same number under the same key.
    assert udp_nonce(True, seq_field(0, False)) != session_crypto.tcp_nonce(True, 0)


def test_df_and_non_df_are_separate_streams() -> None:
    a, b = pair()
    frames = body([(A, B, bytes(60))])
    seqs = [parse_header(a.seal(frames, df))[1:] for df in (True, True, False, True, False)]
    assert seqs == [(True, 0), (True, 1), (False, 0), (True, 2), (False, 1)]
    # The same sequence number on both streams is not a replay.
    a2, b2 = pair()
    b2.open(a2.seal(frames, True))
    b2.open(a2.seal(frames, False))
    assert not b2.drops
    assert b2.decryptor(True).window.check(0).value == "duplicate"
    assert b2.decryptor(False).window.check(1).value == "fresh"
    with pytest.raises(ValueError, match="other"):
        b2.decryptor(False).open(a2.seal(frames, True))


def test_batched_sealing() -> None:
    a, b = pair()
    frames = [(A, B, os.urandom(1400)) for _ in range(10)]
    batcher = Batcher.sealed(1472)
    packets = [a.seal(x, df=True) for x in batcher.pack(frames)]
    assert len(packets) == 10 and all(len(p) <= 1472 for p in packets)
    got = [f for p in packets for f in b.decode(p)[1]]
    assert frames_eq(got, frames)


def test_session_key_from_handshake_interoperates() -> None:
    ka, kb = session_crypto.generate_private_key(), session_crypto.generate_private_key()
    key_a = session_crypto.derive_session_key(bytes(kb.public_key), ka, b"secret")
    key_b = session_crypto.derive_session_key(bytes(ka.public_key), kb, b"secret")
    a, b = SleeveCipher(key_a, A, outbound=True), SleeveCipher(key_b, B, outbound=False)
    frames = [(A, B, b"x" * 100)]
    assert frames_eq(b.decode(a.seal(body(frames)))[1], frames)
    assert frames_eq(a.decode(b.seal(body(frames)))[1], frames)


# ---------------------------------------------------------------- drops


def test_replay_is_dropped_and_counted() -> None:
    a, b = pair()
    packet = a.seal(body([(A, B, bytes(40))]), df=True)
    b.open(packet)
    with pytest.raises(PacketDropped) as info:
        b.open(packet)
    assert info.value.reason is DropReason.REPLAYED and isinstance(info.value, WireError)
    assert b.drops == {DropReason.REPLAYED: 1}


def test_too_old_is_dropped() -> None:
    a, b = pair()
    frames = body([(A, B, bytes(40))])
    old = a.seal(frames)
    a.encryptor(False).seq = 3 * WINDOW_SIZE
    b.open(a.seal(frames))
    with pytest.raises(PacketDropped) as info:
        b.open(old)
    assert info.value.reason is DropReason.TOO_OLD


@given(st.data())
@settings(max_examples=80)
def test_tampering_is_rejected_without_moving_the_window(data: st.DataObject) -> None:
    a, b = pair()
    frames = body(data.draw(frames_st))
    df = data.draw(st.booleans())
    packet = a.seal(frames, df)
    index = data.draw(st.integers(6, len(packet) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(packet)
    bad[index] ^= flip
    with pytest.raises(PacketDropped) as info:
        b.open(bytes(bad))
    # A changed seq field that lands outside the window is refused before decryption.
    assert info.value.reason in (DropReason.DECRYPTION_FAILED, DropReason.TOO_OLD)
    assert sum(b.drops.values()) == 1
    assert b.open(packet) == frames


def test_reflection_and_wrong_key_fail() -> None:
    a, b = pair()
    packet = a.seal(body([(A, B, bytes(40))]))
    with pytest.raises(PacketDropped) as info:
        a.open(packet)  # our own datagram sent back: the direction bit differs
    assert info.value.reason is DropReason.DECRYPTION_FAILED
    other = SleeveCipher(os.urandom(32), B, outbound=False)
    with pytest.raises(PacketDropped):
        other.open(packet)
    assert other.drops == {DropReason.DECRYPTION_FAILED: 1}


def test_truncated_and_malformed() -> None:
    a, b = pair()
    for size in (0, 5, 13, 14, 29):
        with pytest.raises(PacketDropped) as info:
            b.open(bytes(size))
        assert info.value.reason is DropReason.TRUNCATED
    with pytest.raises(PacketDropped) as info:
        b.decode(a.seal(b"\x00\x01garbage"))
    assert info.value.reason is DropReason.MALFORMED
    with pytest.raises(PacketDropped) as info:
        b.decode(a.seal(b""))
    assert info.value.reason is DropReason.MALFORMED
    assert b.drops[DropReason.TRUNCATED] == 5 and b.drops[DropReason.MALFORMED] == 2
    with pytest.raises(ValueError):
        SleeveCipher(bytes(31), A, True)
    with pytest.raises(ValueError):
        seq_field(1 << 63, False)


# ---------------------------------------------------------------- golden: enc-startup


def test_encrypted_capture_framing() -> None:
    """Plaintext is unrecoverable (ephemeral keys), so check headers, streams and lengths."""
    streams: dict[tuple[int, str, bool], list[int]] = defaultdict(list)
    sizes: dict[str, int] = defaultdict(int)
    for src_ip, dst_ip, ulen, payload, outer_df in sleeve_datagrams("enc-startup.pcap"):
        sender, df, seq = parse_header(payload)
        assert sender == PEER[int(src_ip.rsplit(".", 1)[1])]
        # The DF stream goes out on the DF socket, the non-DF stream on the normal one.
        assert df == outer_df
        streams[(sender, dst_ip, df)].append(seq)
        frame_len = ulen - ENCRYPTED_PACKET_OVERHEAD - 14
        if ulen == 66:
            sizes["heartbeat"] += 1
            assert frame_len == 22 and df
        elif ulen == 60045:
            sizes["frag test"] += 1
            assert frame_len == FRAG_TEST_FRAME_LEN and not df and seq == 0
        else:
            sizes["probe"] += 1
            assert ulen == 1472 and df and frame_len == overlay_mtu(1500, encrypted=True) + 14
    assert sizes == {"heartbeat": 6, "frag test": 6, "probe": 12}
    for seqs in streams.values():
        assert seqs == sorted(set(seqs))
        assert seqs[0] == 0
    # Each direction's DF stream: heartbeat 0, then (after a number used by the local 60000-byte
    # PMTU trigger that never leaves the host) probes from 2.
    assert streams[(PEER[1], "10.98.0.3", True)] == [0, 2, 3, 4, 5]


def test_our_encrypted_special_frames_match_capture_sizes() -> None:
    captured = {
        (parse_header(p)[0], ulen): p[:14] for _s, _d, ulen, p, _df in sleeve_datagrams("enc-startup.pcap")
    }
    a = SleeveCipher(KEY, PEER[2], outbound=False)
    hb = a.seal(body([(PEER[2], PEER[1], heartbeat_frame(0xBFA8DB935CA788F3))]), df=True)
    assert len(hb) == 66 and hb[:14] == captured[(PEER[2], 66)]
    frag = a.seal(body([(PEER[2], PEER[1], fragmentation_test_frame())]), df=False)
    assert len(frag) == 60045 and frag[:14] == captured[(PEER[2], 60045)]
    probe = a.seal(body([(PEER[2], PEER[1], pmtu_probe_frame(1414))]), df=True)
    assert len(probe) == 1472
    assert decode_frames(SleeveCipher(KEY, PEER[1], outbound=True).open(probe))[0][2] == pmtu_probe_frame(
        1414
    )
