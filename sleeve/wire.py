"""Weave's sleeve UDP packet format (sans-IO).

A plain (unencrypted) sleeve datagram on UDP 6783 is::

    sender peer name[6] || { src peer[6] || dst peer[6] || length uint16 BE || ethernet frame[length] }+

``sender`` is the hop that sent the datagram; ``src``/``dst`` are the peer that
captured the frame and its final destination peer (relays keep them). An encrypted
datagram seals exactly the frame section (everything after the sender name), see
``sleeve.crypto``.

A frame here is a plain tuple ``(src, dst, data)``: peer names as 48-bit ints (as in
``router.peername``) and the Ethernet frame bytes. Decoding returns ``memoryview``
slices of the datagram, so no frame is copied; they stay valid only as long as the
caller does not overwrite the buffer the datagram was received into.

"Special" frames are the sleeve's own control traffic, sent with src = local peer and
dst = the remote peer: an all-zero 14-byte Ethernet header, then a payload whose length
says what it is (22 bytes in all = heartbeat carrying the ConnUID; 60001 = fragmentation
test; anything else = PMTU probe).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable

from router.errors import WireError

BytesLike = bytes | bytearray | memoryview
Frame = tuple[int, int, BytesLike]
"""``(src peer, dst peer, ethernet frame)``."""

PEER_NAME_SIZE = 6
FRAME_HEADER_SIZE = 14  # src[6] dst[6] length[2]
ETHERNET_HEADER_SIZE = 14
MAX_FRAME_LEN = 0xFFFF
MIN_FRAME_LEN = ETHERNET_HEADER_SIZE
MAX_FRAMES_PER_PACKET = 100

UDP_IP_OVERHEAD = 28
PLAIN_PACKET_OVERHEAD = PEER_NAME_SIZE
SEQ_FIELD_SIZE = 8
SECRETBOX_OVERHEAD = 16
ENCRYPTED_PACKET_OVERHEAD = PEER_NAME_SIZE + SEQ_FIELD_SIZE + SECRETBOX_OVERHEAD
FRAME_OVERHEAD = FRAME_HEADER_SIZE
ETHERNET_OVERHEAD = ETHERNET_HEADER_SIZE
MAX_UDP_PAYLOAD = 0xFFFF - UDP_IP_OVERHEAD

HEARTBEAT_FRAME_LEN = ETHERNET_HEADER_SIZE + 8
FRAG_TEST_FRAME_LEN = 60001
SPECIAL_HEADER = bytes(ETHERNET_HEADER_SIZE)

_M32 = 0xFFFFFFFF
_HEADER = struct.Struct(">HIHIH")
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack
_SENDER = struct.Struct(">HI")
_U64 = struct.Struct(">Q")


class MalformedPacket(WireError):
    """A sleeve datagram (or its decrypted frame section) that does not parse."""


class FrameTooLarge(ValueError):
    """A frame that can never fit the datagram budget it was offered to (a caller bug)."""


# ---------------------------------------------------------------- overheads and MTU


def packet_overhead(encrypted: bool) -> int:
    """Bytes a datagram carries besides its frames: the sender name, plus seq and MAC if sealed."""
    return ENCRYPTED_PACKET_OVERHEAD if encrypted else PLAIN_PACKET_OVERHEAD


def max_udp_payload(underlay_pmtu: int) -> int:
    """The largest UDP payload that leaves the host unfragmented on a path of this IP MTU."""
    return underlay_pmtu - UDP_IP_OVERHEAD


def overlay_mtu(underlay_pmtu: int, encrypted: bool) -> int:
    """The IP MTU inside the overlay for one frame per DF datagram (1500 -> 1438 plain, 1414 sealed)."""
    mtu = underlay_pmtu - UDP_IP_OVERHEAD - packet_overhead(encrypted) - FRAME_OVERHEAD - ETHERNET_OVERHEAD
    if mtu <= 0:
        raise ValueError(f"an underlay MTU of {underlay_pmtu} leaves no room for a sleeve frame")
    return mtu


def max_frame_len(max_payload: int, encrypted: bool) -> int:
    """The longest Ethernet frame that fits alone in a datagram of ``max_payload`` UDP bytes."""
    return min(MAX_FRAME_LEN, max_payload - packet_overhead(encrypted) - FRAME_OVERHEAD)


# ---------------------------------------------------------------- encoding


def frame_header(src: int, dst: int, length: int) -> bytes:
    try:
        return _pack_header(src >> 32, src & _M32, dst >> 32, dst & _M32, length)
    except struct.error:
        raise _bad_frame(src, dst, length) from None


def _bad_frame(src: int, dst: int, length: int) -> ValueError:
    for what, name in (("src", src), ("dst", dst)):
        if not 0 <= name < 1 << 48:
            return ValueError(f"{what} peer name {name} does not fit in 48 bits")
    return ValueError(f"frame of {length} bytes does not fit the 16-bit length field")


def peer_name_bytes(name: int) -> bytes:
    if not 0 <= name < 1 << 48:
        raise ValueError(f"peer name {name} does not fit in 48 bits")
    return name.to_bytes(PEER_NAME_SIZE, "big")


def encode_frames(frames: Iterable[Frame], prefix: bytes = b"") -> bytes:
    """``prefix`` followed by the frame section for ``frames`` (joined once)."""
    parts: list[BytesLike] = [prefix]
    append = parts.append
    for src, dst, data in frames:
        append(frame_header(src, dst, len(data)))
        append(data)
    return b"".join(parts)


def encode_packet(sender: int, frames: Iterable[Frame]) -> bytes:
    """A plain sleeve datagram from hop ``sender`` carrying ``frames``."""
    return encode_frames(frames, peer_name_bytes(sender))


# ---------------------------------------------------------------- decoding


def packet_sender(packet: BytesLike) -> int:
    """The hop sender's peer name (plain or encrypted datagrams alike), to find its connection."""
    if len(packet) < PEER_NAME_SIZE:
        raise MalformedPacket(f"sleeve packet of {len(packet)} bytes is shorter than a peer name")
    high, low = _SENDER.unpack_from(packet, 0)
    return (high << 32) | low


def decode_frames(data: BytesLike, offset: int = 0) -> list[Frame]:
    """The frames of a frame section starting at ``offset`` (views into ``data``)."""
    view = memoryview(data)
    end = len(view)
    if offset >= end:
        raise MalformedPacket("sleeve packet carries no frames")
    frames: list[Frame] = []
    append = frames.append
    unpack = _unpack_header
    pos = offset
    while pos < end:
        start = pos + FRAME_HEADER_SIZE
        if start > end:
            raise MalformedPacket(
                f"truncated frame header at offset {pos}: {end - pos} bytes left, need {FRAME_HEADER_SIZE}"
            )
        src_hi, src_lo, dst_hi, dst_lo, length = unpack(view, pos)
        pos = start + length
        if length < MIN_FRAME_LEN or pos > end:
            if length < MIN_FRAME_LEN:
                raise MalformedPacket(
                    f"frame at offset {start - FRAME_HEADER_SIZE} has length {length}, "
                    f"shorter than an Ethernet header ({MIN_FRAME_LEN})"
                )
            raise MalformedPacket(
                f"truncated frame at offset {start - FRAME_HEADER_SIZE}: length {length}, "
                f"only {end - start} bytes left"
            )
        append(((src_hi << 32) | src_lo, (dst_hi << 32) | dst_lo, view[start:pos]))
    return frames


def decode_packet(packet: BytesLike) -> tuple[int, list[Frame]]:
    """``(sender, frames)`` of a plain sleeve datagram; raises MalformedPacket on any bad input."""
    return packet_sender(packet), decode_frames(packet, PEER_NAME_SIZE)


# ---------------------------------------------------------------- batching


class Batcher:
    """Packs frames into datagram bodies of at most ``max_payload`` bytes and ``max_frames`` frames.

    Each body is ``prefix`` followed by a frame section, built with one join. The budget
    counts ``overhead`` (default ``len(prefix)``) as used, so:

    - plain: ``Batcher.plain(sender, max_payload)``: bodies are finished datagrams;
    - encrypted: ``Batcher.sealed(max_payload)``: bodies are bare frame sections, sized so
      that sealing (``ENCRYPTED_PACKET_OVERHEAD`` more bytes) still fits ``max_payload``.

    Frames go in in order; ``add`` hands back the previous body when the new frame
    does not fit beside it, ``flush`` the body in progress. Queued frames are referenced,
    not copied, until their body is built.
    """

    def __init__(
        self,
        max_payload: int,
        *,
        prefix: bytes = b"",
        overhead: int | None = None,
        max_frames: int = MAX_FRAMES_PER_PACKET,
    ) -> None:
        self.max_payload = max_payload
        self.prefix = bytes(prefix)
        self.overhead = len(self.prefix) if overhead is None else overhead
        self.max_frames = max_frames
        self._budget = max_payload - self.overhead
        if self._budget < FRAME_HEADER_SIZE + MIN_FRAME_LEN or max_frames < 1:
            raise ValueError(f"a datagram of {max_payload} bytes cannot carry any frame")
        self._parts: list[BytesLike] = [self.prefix]
        self._used = 0
        self._count = 0

    @classmethod
    def plain(cls, sender: int, max_payload: int, *, max_frames: int = MAX_FRAMES_PER_PACKET) -> Batcher:
        return cls(max_payload, prefix=peer_name_bytes(sender), max_frames=max_frames)

    @classmethod
    def sealed(cls, max_payload: int, *, max_frames: int = MAX_FRAMES_PER_PACKET) -> Batcher:
        return cls(max_payload, overhead=ENCRYPTED_PACKET_OVERHEAD, max_frames=max_frames)

    @property
    def pending_frames(self) -> int:
        return self._count

    @property
    def pending_size(self) -> int:
        """Bytes the body in progress would take, overhead included (0 when empty)."""
        return self._used + self.overhead if self._count else 0

    def fits(self, frame_len: int) -> bool:
        """Whether a frame of this length could ever be sent through this batcher."""
        return frame_len + FRAME_HEADER_SIZE <= self._budget and frame_len <= MAX_FRAME_LEN

    def add(self, src: int, dst: int, frame: BytesLike) -> bytes | None:
        """Queue one frame; returns the finished previous body if this frame started a new one."""
        length = len(frame)
        size = length + FRAME_HEADER_SIZE
        if size > self._budget:
            raise FrameTooLarge(
                f"frame of {length} bytes does not fit a {self.max_payload}-byte datagram "
                f"(at most {self._budget - FRAME_HEADER_SIZE})"
            )
        header = frame_header(src, dst, length)
        done = None
        if self._used + size > self._budget or self._count >= self.max_frames:
            done = self.flush()
        self._parts.append(header)
        self._parts.append(frame)
        self._used += size
        self._count += 1
        return done

    def flush(self) -> bytes | None:
        """The body in progress (None if no frame is queued); the batcher is empty afterwards."""
        if not self._count:
            return None
        body = b"".join(self._parts)
        self._parts = [self.prefix]
        self._used = 0
        self._count = 0
        return body

    def pack(self, frames: Iterable[Frame]) -> list[bytes]:
        """All of ``frames`` (and anything queued before) as bodies, flushed."""
        out: list[bytes] = []
        for src, dst, data in frames:
            body = self.add(src, dst, data)
            if body is not None:
                out.append(body)
        last = self.flush()
        if last is not None:
            out.append(last)
        return out


# ---------------------------------------------------------------- special frames


class SpecialFrame(enum.Enum):
    HEARTBEAT = "heartbeat"
    FRAGMENTATION_TEST = "fragmentation test"
    PMTU_PROBE = "PMTU probe"


_FRAG_TEST = bytes(FRAG_TEST_FRAME_LEN)


def heartbeat_frame(conn_uid: int) -> bytes:
    """The 22-byte heartbeat frame: zero header, then the connection's ConnUID big-endian."""
    if not 0 <= conn_uid < 1 << 64:
        raise ValueError(f"ConnUID {conn_uid} does not fit in 64 bits")
    return SPECIAL_HEADER + _U64.pack(conn_uid)


def fragmentation_test_frame() -> bytes:
    """The 60001 zero bytes sent (not DF) to learn whether the path reassembles IP fragments."""
    return _FRAG_TEST


def pmtu_probe_frame(mtu: int) -> bytes:
    """A DF probe for overlay MTU ``mtu``: ``mtu + 14`` zero bytes (acked with PMTUVerified mtu)."""
    length = mtu + ETHERNET_HEADER_SIZE
    if length in (HEARTBEAT_FRAME_LEN, FRAG_TEST_FRAME_LEN) or not MIN_FRAME_LEN <= length <= MAX_FRAME_LEN:
        raise ValueError(f"cannot probe an MTU of {mtu}: the frame would not read as a PMTU probe")
    return bytes(length)


def classify_special(frame: BytesLike) -> SpecialFrame | None:
    """What kind of special frame this is, or None for an ordinary Ethernet frame.

    Only the frame is looked at; the caller also checks that src is the hop sender and
    dst is the local peer, as Weave sends them.
    """
    length = len(frame)
    # The ethertype bytes reject almost every real frame before the 14-byte comparison.
    if length < ETHERNET_HEADER_SIZE or frame[12] or frame[13]:
        return None
    if frame[:ETHERNET_HEADER_SIZE] != SPECIAL_HEADER:
        return None
    if length == HEARTBEAT_FRAME_LEN:
        return SpecialFrame.HEARTBEAT
    if length == FRAG_TEST_FRAME_LEN:
        return SpecialFrame.FRAGMENTATION_TEST
    return SpecialFrame.PMTU_PROBE


def heartbeat_conn_uid(frame: BytesLike) -> int:
    """The ConnUID a heartbeat frame carries."""
    if len(frame) != HEARTBEAT_FRAME_LEN:
        raise MalformedPacket(f"a heartbeat frame is {HEARTBEAT_FRAME_LEN} bytes, got {len(frame)}")
    return _U64.unpack_from(frame, ETHERNET_HEADER_SIZE)[0]


def probe_mtu(frame: BytesLike) -> int:
    """The overlay MTU a PMTU probe verifies (what the receiver acks with PMTUVerified)."""
    return len(frame) - ETHERNET_HEADER_SIZE
