"""IPv4 helpers for frames that do not fit the sleeve link MTU (sans-IO).

- A DF frame that is too big gets an ICMPv4 "fragmentation needed" (type 3 code 4)
  reply carrying the next-hop MTU, injected back towards its sender
  (``frag_needed_reply``).
- A non-DF frame is split into IPv4 fragments that fit (``fragment_frame``) when the
  underlay path cannot be trusted to reassemble fragmented UDP.

``mtu`` is always the largest IPv4 packet (Ethernet header not included) allowed on
the link, e.g. ``sleeve.wire.overlay_mtu(...)``. Only untagged Ethernet II frames with
ethertype 0x0800 count as IPv4.
"""

from __future__ import annotations

import struct

from router.errors import WireError
from sleeve.wire import ETHERNET_HEADER_SIZE, BytesLike

ETHERTYPE_IPV4 = 0x0800
IPV4_MIN_HEADER = 20
IPV4_MIN_MTU = 68
ICMP_DEST_UNREACHABLE = 3
ICMP_FRAG_NEEDED = 4
PROTO_ICMP = 1
DEFAULT_TTL = 64

_DF = 0x4000
_MF = 0x2000
_RESERVED = 0x8000
_OFFSET_MASK = 0x1FFF
_IP = ETHERNET_HEADER_SIZE
_ETHERTYPE_IPV4 = b"\x08\x00"
_IP_HEADER = struct.Struct(">BBHHHBBH4s4s")
_ICMP_HEADER = struct.Struct(">BBHHH")
_H = struct.Struct(">H")


class BadIPv4(WireError):
    """A frame that claims to be IPv4 but whose header does not hold together."""


def internet_checksum(data: BytesLike) -> int:
    """RFC 1071 checksum; over data that includes a correct checksum field it is 0."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    # 2^16 = 1 (mod 0xFFFF), so the ones'-complement sum of the 16-bit words is the value mod 0xFFFF.
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and any(data):
        total = 0xFFFF
    return ~total & 0xFFFF


def is_ipv4(frame: BytesLike) -> bool:
    """Whether the frame carries an IPv4 packet (by ethertype and version nibble)."""
    return len(frame) >= _IP + IPV4_MIN_HEADER and frame[12:14] == _ETHERTYPE_IPV4 and frame[_IP] >> 4 == 4


def dont_fragment(frame: BytesLike) -> bool:
    """Whether the frame is IPv4 with the DF bit set."""
    return is_ipv4(frame) and bool(frame[_IP + 6] & 0x40)


def ipv4_packet_length(frame: BytesLike) -> int:
    """The IPv4 total length field (the frame may be longer by Ethernet padding)."""
    return _H.unpack_from(frame, _IP + 2)[0]


def _parse(frame: BytesLike) -> tuple[memoryview, int, int]:
    """The IPv4 packet inside ``frame`` (padding cut off), its header length and total length."""
    if not is_ipv4(frame):
        raise BadIPv4("frame is not IPv4")
    view = memoryview(frame)[_IP:]
    header_len = (view[0] & 0x0F) * 4
    total = _H.unpack_from(view, 2)[0]
    if header_len < IPV4_MIN_HEADER:
        raise BadIPv4(f"IPv4 header length {header_len} is below {IPV4_MIN_HEADER}")
    if not header_len <= total <= len(view):
        raise BadIPv4(
            f"IPv4 total length {total} does not fit: header {header_len} bytes, frame holds {len(view)}"
        )
    return view[:total], header_len, total


def _with_checksum(header: bytearray) -> bytes:
    header[10:12] = b"\x00\x00"
    header[10:12] = _H.pack(internet_checksum(header))
    return bytes(header)


# ---------------------------------------------------------------- ICMP fragmentation needed


def frag_needed_reply(frame: BytesLike, mtu: int, *, ttl: int = DEFAULT_TTL, ip_id: int = 0) -> bytes:
    """The Ethernet frame telling the sender of ``frame`` to send IP packets of at most ``mtu`` bytes.

    MACs swapped, IP from the frame's destination to its source, ICMP type 3 code 4 with
    the next-hop MTU, quoting the original IP header and the first 8 bytes of its data.
    Whether to answer at all (broadcast frames, ICMP errors) is the caller's decision.
    """
    if not 0 < mtu <= 0xFFFF:
        raise ValueError(f"next-hop MTU {mtu} does not fit the ICMP field")
    packet, header_len, total = _parse(frame)
    quote = packet[: min(total, header_len + 8)]
    icmp = bytearray(_ICMP_HEADER.pack(ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, 0, 0, mtu))
    icmp += quote
    icmp[2:4] = _H.pack(internet_checksum(icmp))
    src_ip = bytes(packet[12:16])
    dst_ip = bytes(packet[16:20])
    ip = bytearray(
        _IP_HEADER.pack(0x45, 0, IPV4_MIN_HEADER + len(icmp), ip_id, 0, ttl, PROTO_ICMP, 0, dst_ip, src_ip)
    )
    return b"".join((frame[6:12], frame[0:6], _ETHERTYPE_IPV4, _with_checksum(ip), icmp))


# ---------------------------------------------------------------- fragmentation


def _copied_options(options: memoryview) -> bytes:
    """The options that RFC 791 copies into every fragment (copy flag set), padded to 4 bytes."""
    out = bytearray()
    pos = 0
    end = len(options)
    while pos < end:
        kind = options[pos]
        if kind == 0:
            break
        if kind == 1:
            pos += 1
            continue
        if pos + 1 >= end or options[pos + 1] < 2 or pos + options[pos + 1] > end:
            raise BadIPv4(f"malformed IPv4 option {kind} at offset {pos}")
        length = options[pos + 1]
        if kind & 0x80:
            out += options[pos : pos + length]
        pos += length
    out += bytes(-len(out) % 4)
    return bytes(out)


def fragment_frame(frame: BytesLike, mtu: int) -> list[bytes]:
    """The frames of the IPv4 fragments of a non-DF frame, each IP packet at most ``mtu`` bytes.

    Offsets are multiples of 8, every fragment but the last has MF set (the last keeps
    the input's MF, and offsets continue from the input's, so a fragment can be
    fragmented again), headers are re-checksummed, and later fragments carry only the
    options marked for copying. A frame that already fits comes back as the only item
    (without any Ethernet padding).
    """
    packet, header_len, total = _parse(frame)
    eth = bytes(frame[:_IP])
    if total <= mtu:
        return [eth + bytes(packet)]
    if mtu < IPV4_MIN_MTU:
        raise ValueError(f"cannot fragment for an MTU of {mtu} (IPv4 needs at least {IPV4_MIN_MTU})")
    flags_offset = _H.unpack_from(packet, 6)[0]
    if flags_offset & _DF:
        raise ValueError("the packet has DF set: answer with frag_needed_reply instead of fragmenting")
    base_offset = (flags_offset & _OFFSET_MASK) * 8
    keep_flags = flags_offset & (_RESERVED | _MF)
    header = bytearray(packet[:header_len])
    later = bytearray(header[:IPV4_MIN_HEADER])
    later += _copied_options(packet[IPV4_MIN_HEADER:header_len])
    later[0] = 0x40 | (len(later) // 4)
    payload = packet[header_len:]
    size = len(payload)
    frames: list[bytes] = []
    pos = 0
    while pos < size:
        chunk = (mtu - len(header)) & ~7
        end = min(pos + chunk, size)
        offset = base_offset + pos
        if offset // 8 > _OFFSET_MASK:
            raise BadIPv4(f"fragment offset {offset} does not fit the 13-bit field")
        flags = keep_flags if end == size else keep_flags | _MF
        header[2:4] = _H.pack(len(header) + end - pos)
        header[6:8] = _H.pack(flags | offset // 8)
        frames.append(b"".join((eth, _with_checksum(header), payload[pos:end])))
        pos = end
        header = later
    return frames
