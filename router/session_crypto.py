"""Control-plane crypto and the framing of an established connection (sans-IO).

Session key (both ends compute the same one)::

    SHA-256( crypto_box_beforenm(remote public, local private) || password )

Every TCP message on an encrypted connection is ``secretbox(msg, nonce, key)``
(XSalsa20-Poly1305, 16 bytes longer than ``msg``). The 24-byte nonce is all zero
except byte 0 bit 7 (the *sender* dialled the connection), byte 0 bit 6 (TCP, so the
nonces never collide with UDP nonces under the same key) and bytes 16..23, a
big-endian per-direction counter starting at 0. The receiver expects the opposite
polarity and its own counter, so a dropped, replayed or reordered message fails to
open and the connection is dropped.

Codecs for an established connection (both have ``encode_frame`` and ``feed``):

- ``FrameCodec``: protocol v2, ``uint32 BE length || payload`` with the payload
  sealed when a session key is given;
- ``GobFrameCodec``: legacy protocol v1, one gob ``[]byte`` value per message on a
  stream that lives as long as the connection.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import nacl.bindings
import nacl.exceptions
import nacl.public

from router.errors import GobError, ProtocolError
from router.gob import BYTES, Decoder, decode_int, decode_uint, encode
from router.protocol import MAX_FRAME_SIZE, FrameReader, frame

KEY_SIZE = 32
NONCE_SIZE = 24
SEAL_OVERHEAD = 16
_TCP_BIT = 0x40
_OUTBOUND_BIT = 0x80
_SEQ_OFFSET = 16
V1_MAX_TYPES = 16
V1_MAX_DEFINITION_BYTES = 16 * 1024


# ---------------------------------------------------------------- keys


def generate_private_key() -> nacl.public.PrivateKey:
    """A fresh X25519 key pair, one per connection."""
    return nacl.public.PrivateKey.generate()


def as_private_key(key: nacl.public.PrivateKey | bytes) -> nacl.public.PrivateKey:
    if isinstance(key, nacl.public.PrivateKey):
        return key
    if len(key) != KEY_SIZE:
        raise ValueError(f"an X25519 private key is {KEY_SIZE} bytes, got {len(key)}")
    return nacl.public.PrivateKey(bytes(key))


def derive_session_key(
    remote_public: bytes, local_private: nacl.public.PrivateKey | bytes, password: bytes
) -> bytes:
    """SHA-256 of the NaCl box precomputation followed by the password."""
    if len(remote_public) != KEY_SIZE:
        raise ProtocolError(f"peer public key is {len(remote_public)} bytes, expected {KEY_SIZE}")
    try:
        shared = nacl.public.Box(as_private_key(local_private), nacl.public.PublicKey(bytes(remote_public)))
        precomputed = shared.shared_key()
    except nacl.exceptions.CryptoError:
        # libsodium refuses low-order points (the shared secret would be all zero).
        raise ProtocolError("peer sent an unusable public key (low-order curve point)") from None
    return hashlib.sha256(precomputed + password).digest()


# ---------------------------------------------------------------- nonces


def tcp_nonce(sender_outbound: bool, seq: int) -> bytes:
    """Nonce of TCP message number ``seq`` sent by the dialler (True) or the listener."""
    if not 0 <= seq < 1 << 64:
        raise ValueError(f"sequence number {seq} does not fit in 64 bits")
    return _nonce(sender_outbound, True, seq.to_bytes(8, "big"))


def udp_nonce(sender_outbound: bool, seq: bytes) -> bytes:
    """Nonce of a UDP (sleeve) packet; ``seq`` is its 8-byte sequence field as sent."""
    if len(seq) != 8:
        raise ValueError(f"a UDP sequence field is 8 bytes, got {len(seq)}")
    return _nonce(sender_outbound, False, bytes(seq))


def _nonce(sender_outbound: bool, tcp: bool, seq: bytes) -> bytes:
    first = (_OUTBOUND_BIT if sender_outbound else 0) | (_TCP_BIT if tcp else 0)
    return bytes((first,)) + bytes(_SEQ_OFFSET - 1) + seq


# ---------------------------------------------------------------- sealing


def _check_key(key: bytes) -> bytes:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a session key is {KEY_SIZE} bytes, got {len(key)}")
    return bytes(key)


class TcpSealer:
    """Seals the messages one end sends, numbering them from 0."""

    def __init__(self, session_key: bytes, outbound: bool) -> None:
        self._key = _check_key(session_key)
        self._outbound = outbound
        self.seq = 0

    def seal(self, msg: bytes) -> bytes:
        nonce = tcp_nonce(self._outbound, self.seq)
        self.seq += 1
        return nacl.bindings.crypto_secretbox(bytes(msg), nonce, self._key)


class TcpOpener:
    """Opens the messages the other end sends; ``outbound`` is *our* role."""

    def __init__(self, session_key: bytes, outbound: bool) -> None:
        self._key = _check_key(session_key)
        self._remote_outbound = not outbound
        self.seq = 0

    def open(self, box: bytes) -> bytes:
        if len(box) < SEAL_OVERHEAD:
            raise ProtocolError(f"Unable to decrypt TCP msg: {len(box)} bytes is shorter than the MAC")
        nonce = tcp_nonce(self._remote_outbound, self.seq)
        try:
            msg = nacl.bindings.crypto_secretbox_open(bytes(box), nonce, self._key)
        except nacl.exceptions.CryptoError:
            raise ProtocolError(
                f"Unable to decrypt TCP msg number {self.seq} "
                "(wrong password, or a message was lost, replayed or altered)"
            ) from None
        # Only a successful open moves the counter, so a forged message cannot desync it.
        self.seq += 1
        return msg


# ---------------------------------------------------------------- codecs


class Codec(Protocol):
    """What a connection needs from its codec once the handshake is done."""

    @property
    def version(self) -> int: ...

    @property
    def encrypted(self) -> bool: ...

    def encode_frame(self, payload: bytes) -> bytes: ...

    def feed(self, data: bytes) -> list[bytes]: ...


class _SessionCodec:
    """What both protocol versions share: optional sealing, and bytes held over from the handshake."""

    def __init__(self, session_key: bytes | None, outbound: bool) -> None:
        self._sealer = TcpSealer(session_key, outbound) if session_key is not None else None
        self._opener = TcpOpener(session_key, outbound) if session_key is not None else None
        self._pending = b""
        self._error: Exception | None = None

    @property
    def encrypted(self) -> bool:
        return self._sealer is not None

    def queue(self, data: bytes) -> None:
        """Hold stream bytes for the next ``feed`` (``feed(b"")`` will do) to decode."""
        self._pending += data

    def _seal(self, payload: bytes) -> bytes:
        return self._sealer.seal(payload) if self._sealer is not None else bytes(payload)

    def _input(self, data: bytes) -> bytes:
        """``data`` behind any held-over bytes; after an error the stream stays unusable."""
        if self._error is not None:
            raise self._error
        if self._pending:
            data, self._pending = self._pending + data, b""
        return data


class FrameCodec(_SessionCodec):
    """Protocol v2: length-prefixed frames, sealed when there is a session key.

    ``outbound`` is True on the end that dialled. Stream data that arrived during the
    handshake is handed over with ``queue``. After any error the codec keeps raising:
    the stream is unusable (frames of the failing ``feed`` call are dropped with it,
    since the connection is going away).
    """

    version = 2

    def __init__(
        self,
        session_key: bytes | None = None,
        outbound: bool = False,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> None:
        super().__init__(session_key, outbound)
        self._reader = FrameReader(max_frame_size)
        self._max = max_frame_size

    def encode_frame(self, payload: bytes) -> bytes:
        # Checked before sealing: a refused message must not use up a nonce.
        size = len(payload) + (SEAL_OVERHEAD if self._sealer is not None else 0)
        if size > self._max:
            raise ValueError(f"outgoing message exceeds maximum size: {size} > {self._max}")
        data = self._seal(payload)
        return frame(data)

    def feed(self, data: bytes) -> list[bytes]:
        data = self._input(data)
        try:
            frames = self._reader.feed(data)
            if self._opener is not None:
                frames = [self._opener.open(f) for f in frames]
        except ProtocolError as exc:
            self._error = exc
            raise
        return frames


def _peek_uint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """A gob uint at ``pos`` as (value, end), or None if it is not all there yet."""
    if pos >= len(buf):
        return None
    size = 256 - buf[pos] if buf[pos] >= 0x80 else 0
    if size <= 8 and pos + 1 + size > len(buf):
        return None
    return decode_uint(buf, pos)


class GobMessageSplitter:
    """Cuts a gob stream into whole messages (each with its length prefix).

    A length beyond ``max_size`` is refused as soon as its prefix is in, before any of
    the body is buffered.
    """

    def __init__(self, max_size: int = MAX_FRAME_SIZE) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first message not yet handed out
        self._max = max_size

    def take_rest(self) -> bytes:
        """The bytes not yet handed out as whole messages (and forget them)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def push(self, data: bytes) -> None:
        """Add stream bytes; `pop` hands out the messages they complete."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def pop(self) -> bytes | None:
        """The next whole message, or None until more bytes are pushed."""
        head = _peek_uint(self._buf, self._pos)
        if head is None:
            return None
        length, start = head
        if length == 0:
            raise GobError("empty gob message")
        if length > self._max:
            raise ProtocolError(f"incoming gob message exceeds maximum size: {length} > {self._max}")
        if start + length > len(self._buf):
            return None
        message = bytes(self._buf[self._pos : start + length])
        self._pos = start + length
        return message

    def feed(self, data: bytes) -> list[bytes]:
        """`push`, then every whole message there is."""
        self.push(data)
        out: list[bytes] = []
        while (message := self.pop()) is not None:
            out.append(message)
        return out


def is_definition(message: bytes) -> bool:
    """Whether a whole gob message (as split above) defines a type rather than carrying a value."""
    head = _peek_uint(message, 0)
    if head is None:
        raise GobError("truncated gob message")
    type_id, _ = decode_int(message, head[1])
    return type_id < 0


def v1_stream_decoder() -> Decoder:
    """The decoder for a v1 connection's incoming gob stream, bounded for it.

    Weave defines exactly one type on a v1 stream (map[string]string, for the
    features; []byte is built in), so a handful is plenty. The bound covers the whole
    connection: gob definitions are never sealed, so with a password they arrive from
    a peer that has not proved anything yet, and must not pile up.
    """
    return Decoder(max_types=V1_MAX_TYPES, max_definition_bytes=V1_MAX_DEFINITION_BYTES)


class GobFrameCodec(_SessionCodec):
    """Protocol v1: every message is one gob ``[]byte`` value, sealed when encrypted.

    The incoming stream lasts the whole connection; ``decoder`` is its decoder so far
    (the handshake's, holding the definitions it read). Each definition is parsed once,
    when it arrives, within the bounds of `v1_stream_decoder`.
    """

    version = 1

    def __init__(
        self,
        session_key: bytes | None = None,
        outbound: bool = False,
        *,
        decoder: Decoder | None = None,
        max_message_size: int = MAX_FRAME_SIZE,
    ) -> None:
        super().__init__(session_key, outbound)
        self._splitter = GobMessageSplitter(max_message_size)
        self._decoder = decoder if decoder is not None else v1_stream_decoder()

    @property
    def definition_count(self) -> int:
        return self._decoder.definition_count

    @property
    def definition_bytes(self) -> int:
        return self._decoder.definition_bytes

    def encode_frame(self, payload: bytes) -> bytes:
        data = self._seal(payload)
        # []byte is a built-in gob type: no definitions, so a fresh encoder writes the same bytes.
        return encode(data, BYTES)

    def feed(self, data: bytes) -> list[bytes]:
        data = self._input(data)
        decoder = self._decoder
        try:
            out: list[bytes] = []
            for message in self._splitter.feed(data):
                decoder.feed(message)
                if is_definition(message):
                    decoder.consume_definitions()
                    continue
                payload = decoder.decode(BYTES)
                if not decoder.at_end:
                    raise GobError("unexpected data after a v1 message")
                out.append(self._opener.open(payload) if self._opener is not None else payload)
        except (ProtocolError, GobError) as exc:
            self._error = exc
            raise
        return out
