"""Encrypted sleeve datagrams (sans-IO).

Layout::

    sender peer name[6] || seqNoAndDF uint64 BE || secretbox(frame section)

The frame section is the plain packet without its leading sender name (``sleeve.wire``
``encode_frames`` / a ``Batcher.sealed`` body), sealed with XSalsa20-Poly1305 (16 bytes
longer). Checked against the real captures: an encrypted heartbeat is 66 bytes =
6 + 8 + 16 + 14 + 22 and the fragmentation test 60045 = 6 + 8 + 16 + 14 + 60001, so the
sender name is not repeated inside the box.

Bit 63 of ``seqNoAndDF`` is the DF flag: DF and non-DF datagrams are separate streams,
each with its own counter from 0 (the captures show a non-DF seq 0 after DF seq 0..2)
and, at the receiver, its own decryptor and replay window. The 24-byte nonce is zero
except byte 0 bit 7 (the *sender* of the datagram dialled the TCP connection; bit 6,
the TCP marker, is 0 here) and bytes 16..23, the ``seqNoAndDF`` field as sent.

Key: the connection's TCP session key, ``SHA-256(crypto_box_beforenm(...) || password)``
(``router.handshake.Handshake.overlay_session_key``). Weave hands it to the overlay only
when the connection is untrusted (either end does not trust the other); with no key the
link uses plain datagrams. The UDP nonces never repeat TCP ones because of bit 6.

Drops: ``SleeveCipher.open``/``decode`` raise ``PacketDropped`` (a ``WireError``) whose
``reason`` says why (truncated, replayed, too old, failed authentication, malformed
plaintext), and count it in ``SleeveCipher.drops`` first, so a caller only has to catch
it and move on; nothing about the drop reaches the sender.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import Counter
from typing import cast

import nacl.bindings
import nacl.exceptions

from router.errors import WireError
from sleeve.replay import FRESH, ReplayWindow, Verdict
from sleeve.wire import (
    ENCRYPTED_PACKET_OVERHEAD,
    PEER_NAME_SIZE,
    SEQ_FIELD_SIZE,
    BytesLike,
    Frame,
    MalformedPacket,
    decode_frames,
    packet_sender,
    peer_name_bytes,
)

logger = logging.getLogger(__name__)

KEY_SIZE = 32
NONCE_SIZE = 24
DF_FLAG = 1 << 63
MAX_SEQ = DF_FLAG - 1
HEADER_SIZE = PEER_NAME_SIZE + SEQ_FIELD_SIZE
_OUTBOUND_BIT = 0x80
_SEQ = struct.Struct(">Q")
_secretbox = nacl.bindings.crypto_secretbox
_secretbox_open = nacl.bindings.crypto_secretbox_open
_CryptoError = nacl.exceptions.CryptoError


class DropReason(enum.Enum):
    TRUNCATED = "truncated"
    REPLAYED = "replayed"
    TOO_OLD = "too old"
    DECRYPTION_FAILED = "decryption failed"
    MALFORMED = "malformed plaintext"


class PacketDropped(WireError):
    """An encrypted datagram that was dropped; ``reason`` says why."""

    def __init__(self, reason: DropReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_VERDICT_REASON = {Verdict.DUPLICATE: DropReason.REPLAYED, Verdict.TOO_OLD: DropReason.TOO_OLD}


def _check_key(key: bytes) -> bytes:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a session key is {KEY_SIZE} bytes, got {len(key)}")
    return bytes(key)


def _nonce_prefix(sender_outbound: bool) -> bytes:
    return bytes((_OUTBOUND_BIT if sender_outbound else 0,)) + bytes(NONCE_SIZE - SEQ_FIELD_SIZE - 1)


def seq_field(seq: int, df: bool) -> bytes:
    """The 8-byte ``seqNoAndDF`` field."""
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number {seq} does not fit in 63 bits")
    return _SEQ.pack(seq | DF_FLAG if df else seq)


def udp_nonce(sender_outbound: bool, seq_and_df: bytes) -> bytes:
    """The nonce of a datagram whose sender did (True) or did not dial, given its 8-byte seq field."""
    if len(seq_and_df) != SEQ_FIELD_SIZE:
        raise ValueError(f"the sequence field is {SEQ_FIELD_SIZE} bytes, got {len(seq_and_df)}")
    return _nonce_prefix(sender_outbound) + bytes(seq_and_df)


def parse_header(packet: BytesLike) -> tuple[int, bool, int]:
    """``(sender, df, seq)`` of an encrypted datagram, without opening it."""
    if len(packet) < HEADER_SIZE:
        raise MalformedPacket(f"encrypted sleeve packet of {len(packet)} bytes is shorter than its header")
    value = _SEQ.unpack_from(packet, PEER_NAME_SIZE)[0]
    return packet_sender(packet), bool(value & DF_FLAG), value & MAX_SEQ


class Encryptor:
    """Seals the datagrams of one stream (DF or not) that the local peer sends on one connection."""

    def __init__(self, session_key: bytes, local_name: int, outbound: bool, df: bool) -> None:
        self._key = _check_key(session_key)
        self._sender = peer_name_bytes(local_name)
        self._prefix = _nonce_prefix(outbound)
        self._flag = DF_FLAG if df else 0
        self.df = df
        self.seq = 0

    def seal(self, frames: BytesLike) -> bytes:
        """The whole datagram for this frame section; uses up one sequence number."""
        seq = self.seq
        if seq > MAX_SEQ:
            raise OverflowError("sleeve sequence numbers exhausted; the connection must be re-established")
        self.seq = seq + 1
        field = _SEQ.pack(seq | self._flag)
        # PyNaCl is typed for bytes but only concatenates its input, so any buffer will do (no copy here).
        box = _secretbox(cast(bytes, frames), self._prefix + field, self._key)
        return b"".join((self._sender, field, box))


class Decryptor:
    """Opens one stream (DF or not) from the remote peer, with its own replay window.

    ``outbound`` is the *local* role (we dialled); the remote's nonces have the opposite bit.
    """

    def __init__(self, session_key: bytes, outbound: bool, df: bool) -> None:
        self._key = _check_key(session_key)
        self._prefix = _nonce_prefix(not outbound)
        self.df = df
        self.window = ReplayWindow()

    def open(self, packet: BytesLike) -> bytes:
        """The frame section of ``packet`` (its DF flag must match); raises PacketDropped."""
        view = memoryview(packet)
        if len(view) < ENCRYPTED_PACKET_OVERHEAD:
            raise PacketDropped(
                DropReason.TRUNCATED,
                f"encrypted sleeve packet of {len(view)} bytes is shorter than {ENCRYPTED_PACKET_OVERHEAD}",
            )
        field = bytes(view[PEER_NAME_SIZE:HEADER_SIZE])
        if field[0] >> 7 != self.df:
            raise ValueError("packet belongs to the other (DF / non-DF) stream")
        seq = int.from_bytes(field, "big") & MAX_SEQ
        window = self.window
        verdict = window.check(seq)
        if verdict is not FRESH:
            raise PacketDropped(_VERDICT_REASON[verdict], f"sequence number {seq} is {verdict.value}")
        try:
            plain = _secretbox_open(cast(bytes, view[HEADER_SIZE:]), self._prefix + field, self._key)
        except _CryptoError:
            raise PacketDropped(
                DropReason.DECRYPTION_FAILED, f"packet {seq} failed authentication (wrong key or altered)"
            ) from None
        window.commit(seq)
        return plain


class SleeveCipher:
    """Both directions of one connection's encrypted sleeve link.

    ``outbound``: the local peer dialled the TCP connection. Sending::

        batcher = Batcher.sealed(max_payload)
        for body in batcher.pack(frames):
            sock.send(cipher.seal(body, df))

    Receiving (after ``wire.packet_sender`` found this connection)::

        try:
            sender, frames = cipher.decode(datagram)
        except PacketDropped:
            pass    # already counted in cipher.drops
    """

    def __init__(self, session_key: bytes, local_name: int, outbound: bool) -> None:
        key = _check_key(session_key)
        self.outbound = outbound
        self._encryptors = (
            Encryptor(key, local_name, outbound, df=False),
            Encryptor(key, local_name, outbound, df=True),
        )
        self._decryptors = (Decryptor(key, outbound, df=False), Decryptor(key, outbound, df=True))
        self.drops: Counter[DropReason] = Counter()

    def encryptor(self, df: bool) -> Encryptor:
        return self._encryptors[df]

    def decryptor(self, df: bool) -> Decryptor:
        return self._decryptors[df]

    def seal(self, frames: BytesLike, df: bool = False) -> bytes:
        """The datagram carrying this frame section on the DF or non-DF stream."""
        return self._encryptors[df].seal(frames)

    def open(self, packet: BytesLike) -> bytes:
        """The frame section of a datagram from the remote; raises (and counts) PacketDropped."""
        try:
            if len(packet) < HEADER_SIZE:
                raise PacketDropped(
                    DropReason.TRUNCATED, f"encrypted sleeve packet of {len(packet)} bytes has no header"
                )
            return self._decryptors[packet[PEER_NAME_SIZE] >> 7].open(packet)
        except PacketDropped as exc:
            self.drops[exc.reason] += 1
            logger.debug("dropped encrypted sleeve packet: %s", exc)
            raise

    def decode(self, packet: BytesLike) -> tuple[int, list[Frame]]:
        """``(sender, frames)`` of a datagram from the remote; raises (and counts) PacketDropped."""
        plain = self.open(packet)
        try:
            return packet_sender(packet), decode_frames(plain)
        except MalformedPacket as exc:
            self.drops[DropReason.MALFORMED] += 1
            logger.debug("dropped encrypted sleeve packet: %s", exc)
            raise PacketDropped(DropReason.MALFORMED, f"decrypted sleeve packet: {exc}") from None
