"""Mesh message framing and message bodies (sans-IO).

After the handshake every TCP message is a frame: a 4-byte big-endian length and a
payload (sealed with NaCl secretbox on an encrypted connection, see session_crypto).
A plaintext payload is one tag byte followed by a body:

- tag 0 heartbeat: empty body;
- tags 1-3: legacy sleeve control (sent to peers without an ``Overlays`` feature);
- tags 4/5/6 gossip: a gob stream of built-in values (see ``encode_gossip``);
- tag 7 overlay control: ``forwarder index byte || sub-tag byte || data``.

Which of tags 1-3 and 7 a connection carries, and what a forwarder index means on it,
follows from the handshake: :class:`ControlFraming` is the one encoder and decoder of
overlay control messages. Unknown tags are valid frames; callers ignore them, as Weave does.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

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


# ---------------------------------------------------------------- control framing of a connection

SLEEVE_OVERLAY: Final = "sleeve"
# pyweave's kernel path; never announced as "fastdp", which to a Weave peer means its OVS datapath.
VXLAN_OVERLAY: Final = "vxlan"
# Forwarder indices are one byte; Weave keeps at most this many overlays in common.
MAX_FORWARDERS: Final = 256
SLEEVE_CONTROL_TAGS = frozenset(int(t) for t in SleeveControl)
CONTROL_TAGS = frozenset({*SLEEVE_CONTROL_TAGS, int(Tag.OVERLAY_CONTROL)})


class VxlanControl(enum.IntEnum):
    """Sub-tags of pyweave's vxlan overlay, whose messages only ever go to pyweave peers."""

    KEY_SHARE = 1  # data: a fastdp.linkkey share message


# Why a control message was refused: constant /metrics labels (pyweave_inputs_rejected).
CONTROL_SHORT: Final = "control_short"
CONTROL_BAD_FORWARDER: Final = "control_bad_forwarder"
CONTROL_BARE_TAG: Final = "control_bare_tag"
CONTROL_WRAPPED_TAG: Final = "control_wrapped_tag"
CONTROL_BAD_SUBTAG: Final = "control_bad_subtag"
CONTROL_BAD_LENGTH: Final = "control_bad_length"
CONTROL_NOT_CONTROL: Final = "control_not_control"
CONTROL_REASONS = frozenset({CONTROL_SHORT, CONTROL_BAD_FORWARDER, CONTROL_BARE_TAG, CONTROL_WRAPPED_TAG,
                             CONTROL_BAD_SUBTAG, CONTROL_BAD_LENGTH, CONTROL_NOT_CONTROL})

_SUBTAGS: dict[str, frozenset[int]] = {
    SLEEVE_OVERLAY: SLEEVE_CONTROL_TAGS,
    VXLAN_OVERLAY: frozenset(int(t) for t in VxlanControl),
}
# Data lengths Weave's sleeve sends (nil, nil, a uint16); anything else is not a Weave message.
_SLEEVE_DATA_LEN = {
    SleeveControl.CONNECTION_ESTABLISHED: 0,
    SleeveControl.FRAGMENTATION_RECEIVED: 0,
    SleeveControl.PMTU_VERIFIED: 2,
}


class ControlError(ProtocolError):
    """A control message refused by :meth:`ControlFraming.decode`; ``reason`` is a constant."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ControlMessage:
    """One overlay's control message, whatever its framing on the wire."""

    overlay: str
    subtag: int
    data: bytes = b""


def _check_message(msg: ControlMessage) -> tuple[str, str] | None:
    """(reason, why) if `msg` is not a message its overlay defines; None if it is."""
    subtags = _SUBTAGS.get(msg.overlay)
    if subtags is None:
        return CONTROL_BAD_FORWARDER, f"no control messages are defined for overlay {msg.overlay!r}"
    if msg.subtag not in subtags:
        return CONTROL_BAD_SUBTAG, f"{msg.overlay} control sub-tag {msg.subtag} is not one we know"
    if msg.overlay == SLEEVE_OVERLAY:
        subtag = SleeveControl(msg.subtag)
        want = _SLEEVE_DATA_LEN[subtag]
        if len(msg.data) != want:
            return CONTROL_BAD_LENGTH, f"sleeve {subtag.name} carries {want} bytes, got {len(msg.data)}"
    return None


@dataclass(frozen=True)
class ControlFraming:
    """How overlay control messages travel on one connection, as the handshake settled it.

    A peer that announces ``Overlays`` (every Weave 2.x router, and pyweave) runs an
    overlay switch: every control message is tag 7 with body ``[forwarder index,
    sub-tag, data...]``, and Weave's ``overlaySwitchForwarder.ControlMessage`` indexes
    its forwarders with ``msg[0]`` and reads ``msg[1]`` unchecked, so anything shorter,
    or an index past its list, panics the Weave router. ``forwarders`` is that list:
    the overlays named by both ends, in the dialler's order (Weave's
    ``commonOverlays``), at most 256. A peer without ``Overlays`` (Weave 1.x; Weave 2.x
    keeps its sleeve as the "compat overlay" for it) gets the sleeve's messages
    unwrapped as tags 1-3; ``forwarders`` is then None.

    Weave's commonOverlays means to order by the dialler, but mesh hands it the TCP
    remote address on both ends, so each Weave router really orders by its own list.
    With a Weave peer the two readings cannot differ: pyweave names "sleeve" and
    "vxlan", Weave "fastdp" and "sleeve", so the sleeve is the only overlay in common
    and its index is 0. Between pyweave peers the dialler's order is the rule.
    """

    forwarders: tuple[str, ...] | None

    @classmethod
    def negotiate(cls, ours: Sequence[str], theirs: Sequence[str] | None, outbound: bool) -> ControlFraming:
        """The framing for a connection on which we announced `ours` and the peer `theirs`
        (None: no ``Overlays`` feature). Raises ProtocolError if no overlay is in common,
        as Weave fails such a connection."""
        if theirs is None:
            if SLEEVE_OVERLAY not in ours:
                raise ProtocolError("no overlays in common with peer: no switch there, no sleeve here")
            return cls(None)
        common = set(ours) & set(theirs)
        ordering = ours if outbound else theirs
        # A name the peer repeats is one forwarder (Weave's own list never repeats one).
        forwarders = tuple(dict.fromkeys(name for name in ordering if name in common))[:MAX_FORWARDERS]
        if not forwarders:
            raise ProtocolError(f"no overlays in common with peer (it offers {' '.join(theirs)!r})")
        return cls(forwarders)

    @property
    def common(self) -> tuple[str, ...]:
        """The overlays both ends run on this connection."""
        return (SLEEVE_OVERLAY,) if self.forwarders is None else self.forwarders

    def encode(self, msg: ControlMessage) -> tuple[int, bytes]:
        """(mesh tag, body) of `msg`. A message the connection cannot carry (its overlay
        is not in common, or it is not one its overlay defines) is a caller bug: ValueError,
        and nothing for the wire."""
        problem = _check_message(msg)
        if problem is not None:
            raise ValueError(problem[1])
        if self.forwarders is None:
            if msg.overlay != SLEEVE_OVERLAY:
                raise ValueError(f"a peer without an overlay switch only runs the sleeve, not {msg.overlay}")
            return msg.subtag, bytes(msg.data)
        if msg.overlay not in self.forwarders:
            raise ValueError(f"overlay {msg.overlay} is not in common with this peer {self.forwarders}")
        return Tag.OVERLAY_CONTROL, OverlayControl(self.forwarders.index(msg.overlay), msg.subtag,
                                                   bytes(msg.data)).encode()

    def decode(self, tag: int, body: bytes) -> ControlMessage:
        """The control message in a tag 1-3 or 7 message. Raises ControlError for
        anything that is not a well-formed message of an overlay in common."""
        if tag not in CONTROL_TAGS:
            raise ControlError(CONTROL_NOT_CONTROL, f"tag {tag} is not an overlay control tag")
        if self.forwarders is None:
            if tag == Tag.OVERLAY_CONTROL:
                raise ControlError(CONTROL_WRAPPED_TAG,
                                   "overlay control message (tag 7) from a peer without an overlay switch")
            msg = ControlMessage(SLEEVE_OVERLAY, tag, bytes(body))
        else:
            if tag != Tag.OVERLAY_CONTROL:
                raise ControlError(CONTROL_BARE_TAG,
                                   f"bare sleeve control tag {tag} from a peer that runs an overlay switch")
            if len(body) < 2:
                raise ControlError(CONTROL_SHORT, f"overlay control message of {len(body)} bytes; "
                                   "need forwarder and sub-tag")
            if body[0] >= len(self.forwarders):
                raise ControlError(CONTROL_BAD_FORWARDER,
                                   f"forwarder index {body[0]}; {len(self.forwarders)} overlays in common")
            msg = ControlMessage(self.forwarders[body[0]], body[1], bytes(body[2:]))
        problem = _check_message(msg)
        if problem is not None:
            raise ControlError(*problem)
        return msg
