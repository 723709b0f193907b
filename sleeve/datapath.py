"""The sleeve's packet hot path: TAP <-> UDP, in two threads of its own.

Per-packet work under trio costs more than the work itself, so frames never touch the
event loop: one thread reads the TAP and sends datagrams, one receives datagrams and
writes the TAP or relays. Both read immutable snapshots (`links`, the routes) that the
control side replaces whole; special frames (heartbeats, probes) are handed to the
control side through `on_special`, which must be thread-safe.

With a vnet_hdr TAP the kernel hands us TCP super-frames (up to 64 KB) with partial
checksums. To a pyweave peer that negotiated it (`vnet`), every frame travels with its
10-byte virtio header and is written whole into the peer's TAP, whose kernel segments
it; one datagram then carries what would otherwise be 40 frames. Everyone else gets
ordinary frames: segmented, checksums completed, within the link's MTU.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from router.bridge import (
    NO_OFFLOAD_HEADER,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR_LEN,
    FrameError,
    VnetHeader,
    complete_checksum,
    segment_superframe,
)
from router.errors import WireError
from sleeve import chunks
from sleeve.crypto import PacketDropped, SleeveCipher
from sleeve.ipfrag import dont_fragment, frag_needed_reply, fragment_frame, is_ipv4
from sleeve.switch import Switch
from sleeve.wire import (
    ENCRYPTED_PACKET_OVERHEAD,
    FRAME_HEADER_SIZE,
    MAX_FRAME_LEN,
    PLAIN_PACKET_OVERHEAD,
    SPECIAL_HEADER,
    decode_frames,
    frame_header,
    packet_sender,
    peer_name_bytes,
)

log = logging.getLogger(__name__)

POLL_MS = 200
BURST = 64  # reads per wake-up before sending what was gathered
UDP_READ_SIZE = 65536
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_VNET = struct.Struct("=BBHHHH")
# linux/in.h (Python 3.11's socket module lacks them)
IP_MTU_DISCOVER = 10
IP_MTU = 14
IP_PMTUDISC_DONT = 0
IP_PMTUDISC_PROBE = 3
# linux/udp.h
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_BATCH = 40  # chunks per UDP GSO send: keeps each call under 64 KB

# (src peer, dst peer, vnet header or b"", Ethernet frame)
Out = tuple[int, int, bytes, bytes | memoryview]
# (src peer, dst peer, the pieces of what the wire frame carries): sent with sendmsg,
# so a 64 KB frame is never copied in Python on its way out.
WireFrame = tuple[int, int, tuple[bytes | memoryview, ...]]


@dataclass(eq=False)
class Link:
    """What the data path needs to send to, and receive from, one connected peer."""

    name: int
    address: tuple[str, int] | None
    cipher: SleeveCipher | None
    mtu: int
    frag_ok: bool = False
    vnet: bool = False  # frames carry a virtio header both ways (pyweave peers)
    established: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def max_payload(self) -> int:
        """Largest datagram payload that needs no IP fragmentation on this path."""
        overhead = ENCRYPTED_PACKET_OVERHEAD if self.cipher else PLAIN_PACKET_OVERHEAD
        return self.mtu + 14 + FRAME_HEADER_SIZE + overhead + (VNET_HDR_LEN if self.vnet else 0)


class DataPath:
    def __init__(
        self,
        ourself: int,
        tap_fd: int,
        vnet_hdr: bool,
        sock: socket.socket,
        switch: Switch,
        on_special: Callable[[int, tuple[str, int], bytes], None] | None = None,
        df_sock: socket.socket | None = None,
    ) -> None:
        self.ourself = ourself
        self.tap_fd = tap_fd
        self.vnet_hdr = vnet_hdr
        self.sock = sock
        self.switch = switch
        self.on_special = on_special or (lambda sender, address, frame: None)
        self.df_sock = df_sock
        self.links: dict[int, Link] = {}
        self.stats: Counter[str] = Counter()
        self._name = peer_name_bytes(ourself)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._message_ids = itertools.count(1)
        self._reassembler = chunks.Reassembler()
        self._gso = True  # until the kernel refuses UDP_SEGMENT

    # -- lifecycle

    def start(self) -> None:
        for target, name in ((self._tap_loop, "sleeve-tap"), (self._udp_loop, "sleeve-udp")):
            t = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._threads.clear()

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except Exception:
            log.exception("sleeve: %s failed", threading.current_thread().name)

    # -- sending

    def send_special(self, peer: int, frame: bytes, df: bool = False) -> None:
        """Send a heartbeat/probe frame to a connected peer (called from the control side).

        `df` frames go out with the Don't Fragment bit, so a PMTU probe that is too big
        for the path is lost instead of fragmented."""
        link = self.links.get(peer)
        if link is not None and link.address is not None:
            hdr = NO_OFFLOAD_HEADER if link.vnet else b""
            sock = self.df_sock if df and self.df_sock is not None else self.sock
            self._send(link, [(self.ourself, peer, hdr, frame)], special=True, sock=sock)

    def _send(
        self, link: Link, frames: list[Out], special: bool = False, sock: socket.socket | None = None
    ) -> None:
        """Batch frames into datagrams for `link`, within its MTU unless it takes more."""
        if link.address is None:
            return
        limit = link.max_payload
        overhead = ENCRYPTED_PACKET_OVERHEAD if link.cipher else PLAIN_PACKET_OVERHEAD
        batch: list[tuple[int, int, bytes | memoryview]] = []
        size = overhead
        for src, dst, hdr, frame in frames:
            if special:
                entries: list[WireFrame] = [(src, dst, (hdr, frame) if hdr else (frame,))]
            else:
                entries = self._fit(link, src, dst, hdr, frame)
            for entry in entries:
                n = FRAME_HEADER_SIZE + sum(len(part) for part in entry[2])
                if batch and size + n > limit:
                    self._transmit(link, batch, sock or self.sock)
                    batch, size = [], overhead
                batch.append(entry)
                size += n
        if batch:
            self._transmit(link, batch, sock or self.sock)

    def _fit(self, link: Link, src: int, dst: int, hdr: bytes, frame: bytes | memoryview) -> list[WireFrame]:
        """The wire frames that carry `frame` on `link` (possibly none: dropped or refused)."""
        flags = gso = 0
        if hdr:
            flags, gso, hdr_len, gso_size, _, _ = _VNET.unpack_from(hdr)
        if gso:
            segment = hdr_len + gso_size
            if segment - 14 > link.mtu and self._refuse(link, frame):
                return []
            if link.vnet and len(frame) + VNET_HDR_LEN <= MAX_FRAME_LEN:
                return [(src, dst, (hdr, frame))]  # cut into chunks on the way if need be
            try:
                pieces = segment_superframe(frame, VnetHeader(*_VNET.unpack_from(hdr)), link.mtu)
            except FrameError as exc:
                self.stats["bad_frames"] += 1
                log.debug("sleeve: cannot segment a frame: %s", exc)
                return []
            self.stats["segmented"] += 1
            return [(src, dst, (NO_OFFLOAD_HEADER, p) if link.vnet else (p,)) for p in pieces]
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not link.vnet:
            try:
                frame = complete_checksum(frame, VnetHeader(*_VNET.unpack_from(hdr)))
            except FrameError:
                self.stats["bad_frames"] += 1
                return []
        if len(frame) - 14 > link.mtu:
            if dont_fragment(frame):
                self._refuse(link, frame)
                return []
            if not link.frag_ok:
                try:
                    pieces = fragment_frame(bytes(frame), link.mtu)
                except (ValueError, WireError):
                    self.stats["bad_frames"] += 1
                    return []
                return [(src, dst, (NO_OFFLOAD_HEADER, p) if link.vnet else (p,)) for p in pieces]
        if link.vnet:
            return [(src, dst, (hdr or NO_OFFLOAD_HEADER, frame))]
        return [(src, dst, (frame,))]

    def _refuse(self, link: Link, frame: bytes | memoryview) -> bool:
        """A DF frame too big for the link: tell its sender the MTU (ICMP frag needed)."""
        if not is_ipv4(frame) or not dont_fragment(frame) or frame[0] & 1:
            return False
        self.stats["frag_needed"] += 1
        try:
            reply = frag_needed_reply(bytes(frame), link.mtu)
        except (ValueError, WireError):
            return True
        self._inject(NO_OFFLOAD_HEADER, reply)
        return True

    def _transmit(self, link: Link, frames: list[WireFrame], sock: socket.socket) -> None:
        assert link.address is not None
        buffers: list[bytes | memoryview] = []
        for src, dst, parts in frames:
            buffers.append(frame_header(src, dst, sum(len(part) for part in parts)))
            buffers.extend(parts)
        cipher = link.cipher
        try:
            if cipher is None:
                size = len(self._name) + sum(len(b) for b in buffers)
                if link.vnet and size > link.max_payload:
                    self._send_chunked(link, b"".join([self._name, *buffers]), sock)
                else:
                    sock.sendmsg([self._name, *buffers], (), 0, link.address)
            else:
                with link.lock:
                    datagram = cipher.seal(b"".join(buffers), False)
                if link.vnet and len(datagram) > link.max_payload:
                    self._send_chunked(link, datagram, sock)
                else:
                    sock.sendto(datagram, link.address)
            self.stats["datagrams_sent"] += 1
        except OSError as exc:
            self.stats["send_errors"] += 1
            if exc.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ECONNREFUSED, errno.EHOSTUNREACH):
                log.debug("sleeve: send to %s failed: %s", link.address, exc)

    def _send_chunked(self, link: Link, datagram: bytes, sock: socket.socket) -> None:
        assert link.address is not None
        segment = link.max_payload
        pieces = chunks.split(datagram, self._name, next(self._message_ids), segment)
        self.stats["chunked"] += 1
        for start in range(0, len(pieces), GSO_BATCH):
            batch = pieces[start : start + GSO_BATCH]
            if self._gso and len(batch) > 1:
                try:
                    sock.sendmsg(batch, [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))], 0, link.address)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                        raise
                    self._gso = False
                    log.info("sleeve: the kernel refuses UDP GSO (%s); sending chunks one by one", exc)
            for piece in batch:
                sock.sendto(piece, link.address)

    def _inject(self, hdr: bytes, frame: bytes | memoryview) -> None:
        try:
            if self.vnet_hdr:
                os.writev(self.tap_fd, (hdr or NO_OFFLOAD_HEADER, frame))
            else:
                os.write(self.tap_fd, frame)
        except OSError as exc:
            self.stats["inject_errors"] += 1
            log.debug("sleeve: TAP write failed: %s", exc)

    # -- the two loops

    def _tap_loop(self) -> None:
        poller = select.poll()
        poller.register(self.tap_fd, select.POLLIN)
        vnet = self.vnet_hdr
        switch = self.switch
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            out: dict[int, list[Out]] = {}
            for _ in range(BURST):
                try:
                    buf = os.read(self.tap_fd, 1 << 17)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        return
                    raise
                if vnet:
                    view = memoryview(buf)
                    hdr, frame = buf[:VNET_HDR_LEN], view[VNET_HDR_LEN:]
                else:
                    hdr, frame = b"", buf
                if len(frame) < 14:
                    continue
                for hop, dst in switch.from_local(frame):
                    out.setdefault(hop, []).append((self.ourself, dst, hdr, frame))
            self._send_gathered(out)

    def _udp_loop(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            out: dict[int, list[Out]] = {}
            for _ in range(BURST):
                try:
                    data, ancillary, _, address = self.sock.recvmsg(
                        UDP_READ_SIZE, _GRO_CMSG_SPACE, socket.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        return
                    continue  # ICMP errors reported on the socket (e.g. port unreachable)
                segment = 0
                for level, kind, value in ancillary:
                    if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                        segment = struct.unpack_from("=i", value)[0]
                if 0 < segment < len(data):
                    # GRO handed us several datagrams of one flow at once.
                    view = memoryview(data)
                    for start in range(0, len(data), segment):
                        self._datagram(bytes(view[start : start + segment]), address, out)
                else:
                    self._datagram(data, address, out)
            self._send_gathered(out)

    def _send_gathered(self, out: dict[int, list[Out]]) -> None:
        """Send what one burst gathered, per next hop; frames for a hop without an
        established link are counted and dropped."""
        for hop, frames in out.items():
            link = self.links.get(hop)
            if link is None or not link.established:
                self.stats["no_link_drops"] += len(frames)
                continue
            self._send(link, frames)

    def _datagram(self, data: bytes, address: tuple[str, int], out: dict[int, list[Out]]) -> None:
        if chunks.is_chunk(data) and self._vnet_sender(data):
            try:
                whole = self._reassembler.add(data, time.monotonic())
            except WireError:
                self.stats["malformed"] += 1
                return
            if whole is None:
                if len(self._reassembler) > chunks.MAX_PENDING // 2:
                    self._reassembler.expire(time.monotonic())
                return
            data = whole
        self._receive(data, address, out)

    def _vnet_sender(self, data: bytes) -> bool:
        try:
            link = self.links.get(packet_sender(data))
        except WireError:
            return False
        return link is not None and link.vnet

    def _receive(self, data: bytes, address: tuple[str, int], out: dict[int, list[Out]]) -> None:
        try:
            sender = packet_sender(data)
        except WireError:
            self.stats["malformed"] += 1
            return
        link = self.links.get(sender)
        if link is None:
            self.stats["unknown_sender"] += 1
            return
        try:
            if link.cipher is not None:
                frames = decode_frames(link.cipher.open(data))
            else:
                frames = decode_frames(data, PLAIN_PACKET_OVERHEAD)
        except PacketDropped as exc:
            self.stats[f"dropped_{exc.reason.name.lower()}"] += 1
            return
        except WireError as exc:
            self.stats["malformed"] += 1
            log.debug("sleeve: malformed datagram from %s: %s", address, exc)
            return
        self.stats["datagrams_received"] += 1
        vnet = link.vnet
        for src, dst, frame in frames:
            hdr: bytes = b""
            if vnet:
                if len(frame) < VNET_HDR_LEN + 14:
                    self.stats["malformed"] += 1
                    continue
                hdr, frame = bytes(frame[:VNET_HDR_LEN]), frame[VNET_HDR_LEN:]
            if frame[:14] == SPECIAL_HEADER:
                if src == sender and dst == self.ourself:
                    self.on_special(sender, address, bytes(frame))
                continue
            deliver, hops = self.switch.from_peer(sender, src, dst, frame)
            if deliver:
                self._inject(hdr, frame)
            for hop, to in hops:
                out.setdefault(hop, []).append((src, to, hdr, frame))


def open_udp_socket(host: str, port: int) -> socket.socket:
    """The sleeve's UDP socket: the kernel fragments what exceeds the path (no DF).

    Blocking, so that senders wait for buffer space instead of dropping; the receiving
    thread polls and reads with MSG_DONTWAIT.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        sock.bind((host, port))
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            log.info("sleeve: no UDP GRO on this kernel")
    except OSError:
        sock.close()
        raise
    return sock


def open_df_socket() -> socket.socket:
    """A socket for PMTU probes and heartbeats: Don't Fragment set, whatever the kernel's
    cached path MTU says (IP_PMTUDISC_PROBE), so probes test the path itself."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
    return sock


def path_mtu(address: tuple[str, int]) -> int | None:
    """The kernel's idea of the path MTU towards `address` (route MTU or learnt PMTU)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(address)
            return s.getsockopt(socket.IPPROTO_IP, IP_MTU)
        except OSError:
            return None

