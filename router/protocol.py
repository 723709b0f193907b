"""Mesh message framing and message bodies (sans-IO).

After the handshake every TCP message is a frame: a 4-byte big-endian length and a
payload (sealed with NaCl secretbox on an encrypted connection, see session_crypto).
A plaintext payload is one tag byte followed by a body:

- tag 0 heartbeat: empty body;
- tags 1-3: legacy sleeve control (sent to peers without an ``Overlays`` feature);
- tags 4/5/6 gossip: a gob stream of built-in values (see ``encode_gossip``);
- tag 7 overlay control: ``forwarder index byte || sub-tag byte || data``.

Unknown tags are valid frames; callers ignore them, as Weave does.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

from router.errors import GobError, ProtocolError
from router.gob import BYTES, STRING, UINT, Decoder, GobType, encode_stream

MAX_FRAME_SIZE = 10 * 1024 * 1024
LENGTH_PREFIX_SIZE = 4
# Before the handshake completes, the peer has proved nothing. Weave's features
# frames are 170-190 bytes in every capture (a v1 features message is smaller still);
# 64 KiB leaves room for long nicknames and extra features while keeping what a
# stranger can make us buffer 160 times smaller than MAX_FRAME_SIZE.
MAX_HANDSHAKE_FRAME_SIZE = 64 * 1024


class Tag(enum.IntEnum):
    HEARTBEAT = 0
    CONNECTION_ESTABLISHED = 1
    FRAGMENTATION_RECEIVED = 2
    PMTU_VERIFIED = 3
    GOSSIP = 4
    GOSSIP_UNICAST = 5
    GOSSIP_BROADCAST = 6
    OVERLAY_CONTROL = 7


GOSSIP_TAGS = frozenset({Tag.GOSSIP, Tag.GOSSIP_UNICAST, Tag.GOSSIP_BROADCAST})


# ---------------------------------------------------------------- framing


def frame(payload: bytes) -> bytes:
    """Length-prefix one payload. Larger than MAX_FRAME_SIZE is a caller bug."""
    if len(payload) > MAX_FRAME_SIZE:
        raise ValueError(f"outgoing message exceeds maximum size: {len(payload)} > {MAX_FRAME_SIZE}")
    return struct.pack(">I", len(payload)) + payload


class FrameReader:
    """Splits a byte stream into length-prefixed frames, keeping any partial frame.

    After a ProtocolError the stream is out of sync, so every later feed fails too.
    """

    def __init__(self, max_size: int = MAX_FRAME_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_size
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back because they do not yet form a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[bytes] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= LENGTH_PREFIX_SIZE:
            (length,) = struct.unpack_from(">I", buf, pos)
            if length > self._max:
                self._error = ProtocolError(f"incoming message exceeds maximum size: {length} > {self._max}")
                raise self._error
            end = pos + LENGTH_PREFIX_SIZE + length
            if end > len(buf):
                break
            frames.append(bytes(buf[pos + LENGTH_PREFIX_SIZE : end]))
            pos = end
        del buf[:pos]
        return frames


# ---------------------------------------------------------------- tagged messages


def encode_message(tag: int, body: bytes = b"") -> bytes:
    """A plaintext payload: tag byte then body."""
    if not 0 <= tag <= 255:
        raise ValueError(f"protocol tag {tag} does not fit in a byte")
    return bytes((tag,)) + body


def split_message(payload: bytes) -> tuple[int, bytes] | None:
    """(tag, body) of a plaintext payload; None for a blank payload, which Weave skips."""
    if not payload:
        return None
    return payload[0], payload[1:]


# ---------------------------------------------------------------- gossip envelopes


@dataclass(frozen=True)
class GossipMessage:
    """A gossip envelope. For GOSSIP_BROADCAST ``src`` is the broadcast's origin peer."""

    tag: Tag
    channel: str
    src: int
    payload: bytes
    dst: int | None = None


def encode_gossip(msg: GossipMessage) -> bytes:
    """The body after the tag byte: one fresh gob stream of built-in values."""
    if msg.tag not in GOSSIP_TAGS:
        raise ValueError(f"tag {msg.tag!r} is not a gossip tag")
    if (msg.tag == Tag.GOSSIP_UNICAST) != (msg.dst is not None):
        raise ValueError("a destination is required for GOSSIP_UNICAST and only for it")
    items: list[tuple[Any, GobType]] = [(msg.channel, STRING), (msg.src, UINT)]
    if msg.dst is not None:
        items.append((msg.dst, UINT))
    items.append((bytes(msg.payload), BYTES))
    return encode_stream(items)


def decode_gossip(tag: int, body: bytes) -> GossipMessage:
    """Parse a tag 4/5/6 body. Trailing bytes after the payload are ignored, as in Go."""
    if tag not in GOSSIP_TAGS:
        raise ProtocolError(f"tag {tag} is not a gossip tag")
    gossip_tag = Tag(tag)
    dec = Decoder(body)
    try:
        channel = dec.decode(STRING)
        src = dec.decode(UINT)
        dst = dec.decode(UINT) if gossip_tag == Tag.GOSSIP_UNICAST else None
        payload = dec.decode(BYTES)
    except GobError as exc:
        raise GobError(f"bad {gossip_tag.name.lower()} envelope: {exc}") from None
    return GossipMessage(gossip_tag, channel, src, payload, dst)


# ---------------------------------------------------------------- overlay control


class SleeveControl(enum.IntEnum):
    """Sleeve sub-tags; also the raw legacy tags 1-3 for peers without ``Overlays``."""

    CONNECTION_ESTABLISHED = 1
    FRAGMENTATION_RECEIVED = 2
    PMTU_VERIFIED = 3


class FastdpControl(enum.IntEnum):
    HEARTBEAT_ACK = 0
    CRYPTO_INIT_SA_REMOTE = 1


@dataclass(frozen=True)
class OverlayControl:
    """Tag 7 body: which forwarder of the overlay switch, its sub-tag, opaque data.

    ``forwarder`` indexes the overlays both ends have in common, in the dialler's
    preference order; what ``subtag`` means depends on that forwarder's overlay.
    """

    forwarder: int
    subtag: int
    data: bytes = b""

    def encode(self) -> bytes:
        if not (0 <= self.forwarder <= 255 and 0 <= self.subtag <= 255):
            raise ValueError(f"forwarder {self.forwarder} / sub-tag {self.subtag} do not fit in a byte")
        return bytes((self.forwarder, self.subtag)) + self.data

    @classmethod
    def decode(cls, body: bytes) -> OverlayControl:
        if len(body) < 2:
            raise ProtocolError(f"overlay control message of {len(body)} bytes; need forwarder and sub-tag")
        return cls(body[0], body[1], bytes(body[2:]))


def encode_pmtu(mtu: int) -> bytes:
    """Data of a PMTU_VERIFIED control message."""
    if not 0 <= mtu <= 0xFFFF:
        raise ValueError(f"MTU {mtu} does not fit in 16 bits")
    return struct.pack(">H", mtu)


def decode_pmtu(data: bytes) -> int:
    """The MTU of a PMTU_VERIFIED message; like Weave, bytes after the first two are ignored."""
    if len(data) < 2:
        raise ProtocolError(f"PMTUVerified carries a 2-byte MTU, got {len(data)} bytes")
    return int(struct.unpack_from(">H", data)[0])
