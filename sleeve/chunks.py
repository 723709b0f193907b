"""Sleeve datagrams larger than the path, cut into path-sized UDP datagrams (pyweave only).

Between two pyweave peers a sleeve datagram may carry a 64 KB TCP super-frame. Sent as
one UDP datagram, the kernel would fragment it at the IP layer, and every fragment
would cross the network stack on its own. Instead it is cut into chunks of one segment
size and handed to the kernel in one call with UDP GSO (UDP_SEGMENT), which keeps them
as one packet through veths and bridges; a receiver with UDP_GRO gets them back in one
read. Each chunk is a UDP datagram of its own:

    sender name [6] | 7f:ff:ff:ff:ff:ff | message id u32 | index u8 | count u8 | piece

Where the marker is, a plain sleeve datagram has a frame's source peer (a peer name is
a unicast MAC address; the marker has the group bit set) and an encrypted one the top
of its sequence number (never that high). Only peers that announced the virtio-header
feature receive chunks, and only theirs are looked at; Weave peers never see one.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from router import ratelog
from router.errors import WireError

log = logging.getLogger(__name__)

MARKER = bytes.fromhex("7fffffffffff")
_HEADER = struct.Struct(">6s6sIBB")
HEADER_SIZE = _HEADER.size  # 18
MAX_CHUNKS = 64  # the kernel's UDP_MAX_SEGMENTS
MAX_PENDING = 256  # messages being reassembled at once
# A chunked message is one sleeve datagram: a 64 KB super-frame and its headers.
MAX_MESSAGE_BYTES = 65536 + 1024
MAX_PENDING_BYTES = 16 * 1024 * 1024
PENDING_TIMEOUT = 1.0


def is_chunk(datagram: bytes | memoryview) -> bool:
    return len(datagram) >= HEADER_SIZE and datagram[6:12] == MARKER


def split(datagram: bytes, sender: bytes, message_id: int, segment: int) -> list[bytes]:
    """Chunks of `datagram`, each at most `segment` bytes (all but the last exactly)."""
    piece = segment - HEADER_SIZE
    if piece <= 0:
        raise ValueError(f"segment size {segment} leaves no room for data")
    count = -(-len(datagram) // piece)
    if count > MAX_CHUNKS:
        raise ValueError(f"{len(datagram)} bytes need {count} chunks of {segment}, more than {MAX_CHUNKS}")
    message_id &= 0xFFFFFFFF
    view = memoryview(datagram)
    return [
        _HEADER.pack(sender, MARKER, message_id, i, count) + view[i * piece : (i + 1) * piece]
        for i in range(count)
    ]


@dataclass
class _Pending:
    count: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Puts chunked datagrams back together; incomplete ones are dropped after a while.

    Bounded in messages and in bytes (chunks are easy to forge on a plain sleeve): a
    message larger than any datagram is refused, and past MAX_PENDING_BYTES the oldest
    incomplete messages are dropped.
    """

    def __init__(self, max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self._pending: dict[tuple[bytes, int], _Pending] = {}
        self._max_bytes = max_pending_bytes
        self.pending_bytes = 0
        self.expired = 0

    def add(self, chunk: bytes | memoryview, now: float) -> bytes | None:
        """The whole datagram once its last chunk arrives, else None. Raises WireError."""
        if len(chunk) < HEADER_SIZE:
            raise WireError(f"sleeve chunk of {len(chunk)} bytes is shorter than its header")
        sender, _, message_id, index, count = _HEADER.unpack_from(chunk)
        if not 0 < count <= MAX_CHUNKS or index >= count:
            raise WireError(f"sleeve chunk {index} of {count}: out of range")
        key = (sender, message_id)
        entry = self._pending.get(key)
        if entry is None or entry.count != count:
            if entry is not None:
                self._forget(key)
            if len(self._pending) >= MAX_PENDING:
                self.expire(now, force=True)
            entry = self._pending[key] = _Pending(count, now)
        piece = bytes(chunk[HEADER_SIZE:])
        old = entry.parts.get(index)
        grow = len(piece) - (len(old) if old is not None else 0)
        if entry.size + grow > MAX_MESSAGE_BYTES:
            self._forget(key)
            raise WireError(f"chunked sleeve message of more than {MAX_MESSAGE_BYTES} bytes")
        entry.parts[index] = piece
        entry.size += grow
        self.pending_bytes += grow
        if len(entry.parts) < count:
            while self.pending_bytes > self._max_bytes and len(self._pending) > 1:
                self.expire(now, force=True)
                ratelog.reject(
                    log, "sleeve", "chunks_evicted", "sleeve: %d B of chunks pending; dropped the oldest",
                    self.pending_bytes, level=logging.INFO,
                )
            return None
        self._forget(key)
        return b"".join(entry.parts[i] for i in range(count))

    def _forget(self, key: tuple[bytes, int]) -> None:
        entry = self._pending.pop(key)
        self.pending_bytes -= entry.size

    def expire(self, now: float, force: bool = False) -> None:
        stale = [k for k, e in self._pending.items() if now - e.started > PENDING_TIMEOUT]
        if force and not stale and self._pending:
            stale = [min(self._pending, key=lambda k: self._pending[k].started)]
        for key in stale:
            self._forget(key)
        self.expired += len(stale)

    def __len__(self) -> int:
        return len(self._pending)
