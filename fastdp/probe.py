"""Heartbeats that travel the real VXLAN path: codec (sans-IO) and driver.

How a heartbeat travels (A -> B)::

    A: daemon builds  [VXLAN hdr | inner Ethernet frame]  and sends it from an ordinary
       UDP socket (ephemeral source port) to B_ip:6784
    B: kernel vxlan-6784 decapsulates it (VNI must match) -> bridge "weave" -> static FDB
       entry for B's probe MAC -> probe port veth -> B's daemon reads it with AF_PACKET

So a heartbeat crosses the same kernel objects, firewall rules (UDP 6784) and path MTU
as container traffic does. B answers with an ack the same way (B -> A over VXLAN), so an
ack proves both directions work; a heartbeat is padded so that its inner frame is
overlay MTU + 14 bytes, the largest frame the bridge sends into the tunnel, and the
outer IP packet (inner + 36) is exactly as big as a full-size container packet's. Acks
are small (60-byte inner frame): the reverse direction's MTU is validated by the peer's
own heartbeats.

Inner frame (all integers big-endian)::

    dst MAC (6) | src MAC (6) | ethertype 0x88B5 (2)          -- IEEE "local experimental"
    magic "PWhb" (4) | version 2 (1) | kind (1) | frame length (2)
    sender peer name (6) | ConnUID (8) | sequence number (8) | timestamp ns (8)
    zero padding up to `frame length` - 16 | MAC (16)

`kind` is 1 (heartbeat) or 2 (ack). A heartbeat's timestamp is the sender's monotonic
clock at sending; an ack carries the sequence number and timestamp of the heartbeat it
answers, so the heartbeat's sender measures the round trip without keeping state.
`frame length` is the size the sender built; a frame that arrives shorter was cut and
is rejected.

The MAC is keyed BLAKE2b with a 16-byte digest over the first `frame length` - 16 bytes
(everything, the Ethernet header and the padding included), under the key of the
sender -> receiver direction of the connection (:mod:`fastdp.linkkey`). Keyed BLAKE2b
is a MAC by design (no HMAC double pass) and one hashlib call per frame: encoding or
decoding a full-size heartbeat, MAC included, takes 5-7 us here, at ~120 frames a
second. Version 1 frames carried no MAC and are rejected: anyone on the underlay could
forge them. The codec checks the MAC before it believes any field; :func:`frame_sender`
reads the (unproven) sender and ConnUID only to pick the key.

A heartbeat of at least 93 bytes continues, in what used to be padding::

    flags (1) | echo sequence number (8) | echo timestamp ns (8) | echo hold ns (8)

flags bit 0: no ack wanted; bit 1: the echo fields are set, repeating the sequence
number and timestamp of the latest heartbeat the sender had from us and how long it
held it. A healthy link runs on echoes alone, half the frames of heartbeat + ack.

Probe MACs are derived from peer names (:func:`probe_mac`), so a peer can address
another's probe port knowing only its name.

Kernel facts checked on this machine (Linux 6.18), see tests/test_fastdp_probe.py:

- The sending UDP socket must *not* bind port 6784: the vxlan device's kernel socket
  owns it (bind fails with EADDRINUSE), and it need not: the receiving kernel accepts
  VXLAN from any source port and learns the outer source IP.
- With ``IP_MTU_DISCOVER = IP_PMTUDISC_DO`` an outer packet bigger than the local
  route's MTU fails at ``sendto`` with EMSGSIZE (without it, the kernel would fragment
  it and the heartbeat would arrive, hiding the problem). A smaller MTU further along an
  L2 path (a bridge port) drops the frame silently: the heartbeat is simply lost. A
  router on the path answers with ICMP "fragmentation needed": that first heartbeat is
  lost, the kernel caches the path MTU for the peer's address and later sends fail
  with EMSGSIZE. Either way the health machine sees heartbeats stop.
- The receiving side does not check the overlay MTU exactly: the bridge and the veth
  accept frames up to MTU + 18 (Ethernet header plus a VLAN tag's allowance) on a probe
  veth with MTU 1376, i.e. up to 1394 bytes. What heartbeats validate is the underlay
  path, which is what can be too small.
- The kernel drops a VXLAN datagram whose VNI matches no device on that port.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import hmac
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from fastdp.vxlan import (
    AF_BRIDGE,
    DEFAULT_BRIDGE,
    DEFAULT_MTU,
    DEFAULT_PORT,
    DEFAULT_VNI,
    NTF_MASTER,
    NUD_NOARP,
    netns_context,
    open_ipr,
)
from router import ratelog
from router.errors import WireError
from router.netlink import NetlinkError

log = logging.getLogger(__name__)

ETHERTYPE = 0x88B5  # IEEE 802 local experimental ethertype 1
MAGIC = b"PWhb"
VERSION = 2
MAC_LEN = 16
ETH_HEADER = 14
VXLAN_HEADER_LEN = 8
VXLAN_FLAG_I = 0x08
OUTER_OVERHEAD = VXLAN_HEADER_LEN + 8 + 20  # VXLAN + UDP + IPv4 headers
MIN_FRAME = 68  # the smallest probe frame: header + MAC (above Ethernet's 60)

# The probe veth pair: PORT_IFNAME is the (non-isolated) bridge port, PROBE_IFNAME the
# end the daemon reads.
PORT_IFNAME = "vethwe-pbr"
PROBE_IFNAME = "vethwe-probe"

_ETH = struct.Struct("!6s6sH")
_PAYLOAD = struct.Struct("!4sBBH6sQQQ")
_VXLAN = struct.Struct("!B3xI")
HEADER_LEN = ETH_HEADER + _PAYLOAD.size  # 52: the fields every probe frame has
_ECHO = struct.Struct("!BQQQ")
ECHO_FRAME_LEN = HEADER_LEN + _ECHO.size + MAC_LEN  # 93: the smallest heartbeat that carries the echo
_NO_ACK, _ECHOED = 0x01, 0x02
_IN6_ADDR_GEN_MODE_NONE = 1
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_U64 = (1 << 64) - 1


class ProbeAuthError(WireError):
    """A probe frame whose MAC does not verify under the key of its claimed sender."""


class ProbeKind(enum.IntEnum):
    HEARTBEAT = 1
    ACK = 2


@dataclass(frozen=True)
class ProbeMessage:
    """What a probe frame says. For an ack, `seq` and `timestamp_ns` echo the heartbeat's.

    A heartbeat may also echo the receiver's latest heartbeat (`echo_seq` 0: none) and
    say that it wants no ack."""

    kind: ProbeKind
    sender: int  # the sending peer's name (48 bits)
    conn_uid: int  # the mesh connection this link belongs to (uint64)
    seq: int  # uint64
    timestamp_ns: int  # uint64, the heartbeat sender's monotonic clock
    echo_seq: int = 0  # uint64
    echo_timestamp_ns: int = 0  # uint64, the receiver's clock
    echo_hold_ns: int = 0  # uint64
    ack_wanted: bool = True


@dataclass(frozen=True)
class ProbeFrame:
    """A decoded inner frame: addresses, the size the sender built, the message."""

    dst_mac: bytes
    src_mac: bytes
    frame_len: int
    message: ProbeMessage


# --- codec (sans-IO) -----------------------------------------------------------------------


def probe_mac(peer_name: int) -> bytes:
    """The MAC of `peer_name`'s probe port: a locally administered unicast hash of the name.

    Derived rather than taken from the name itself so that it cannot equal a MAC the
    daemon derives from its peer name elsewhere (e.g. for the bridge).
    """
    if not 0 <= peer_name < 1 << 48:
        raise ValueError(f"peer name {peer_name} does not fit in 48 bits")
    digest = hashlib.sha256(b"pyweave fastdp probe" + peer_name.to_bytes(6, "big")).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def heartbeat_frame_size(mtu: int = DEFAULT_MTU) -> int:
    """The inner frame size of a full-size heartbeat for an overlay MTU: MTU + Ethernet header."""
    return mtu + ETH_HEADER


def outer_packet_size(frame_size: int) -> int:
    """The IPv4 packet size on the underlay for an inner frame of `frame_size` bytes."""
    return frame_size + OUTER_OVERHEAD


def _mac(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=MAC_LEN).digest()


def encode_frame(dst_mac: bytes, src_mac: bytes, msg: ProbeMessage, key: bytes,
                 size: int = MIN_FRAME) -> bytes:
    """The inner Ethernet frame carrying `msg`, zero-padded to `size` bytes (at least
    MIN_FRAME) and authenticated under `key` (the sender -> receiver link key)."""
    if len(dst_mac) != 6 or len(src_mac) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    if not MIN_FRAME <= size <= 0xFFFF:
        raise ValueError(f"probe frame size must be within {MIN_FRAME}..65535, not {size}")
    if not 16 <= len(key) <= 64:
        raise ValueError("a probe key is 16 to 64 bytes")
    if not 0 < msg.sender < 1 << 48:
        raise ValueError(f"sender peer name {msg.sender} is not a valid 48-bit name")
    for field in ("conn_uid", "seq", "timestamp_ns", "echo_seq", "echo_timestamp_ns", "echo_hold_ns"):
        if not 0 <= getattr(msg, field) <= _U64:
            raise ValueError(f"{field} must fit in 64 bits")
    header = _ETH.pack(dst_mac, src_mac, ETHERTYPE) + _PAYLOAD.pack(
        MAGIC, VERSION, int(msg.kind), size, msg.sender.to_bytes(6, "big"), msg.conn_uid, msg.seq,
        msg.timestamp_ns)
    if msg.kind is ProbeKind.HEARTBEAT and size >= ECHO_FRAME_LEN:
        flags = (0 if msg.ack_wanted else _NO_ACK) | (_ECHOED if msg.echo_seq else 0)
        header += _ECHO.pack(flags, msg.echo_seq, msg.echo_timestamp_ns, msg.echo_hold_ns)
    body = header + bytes(size - MAC_LEN - len(header))
    return body + _mac(key, body)


_Fields = tuple[bytes, int, int, int, bytes, int, int, int]  # _PAYLOAD, unpacked


def _header(frame: bytes | bytearray | memoryview) -> tuple[bytes, bytes, _Fields]:
    """(dst MAC, src MAC, payload fields) of a frame that is a probe frame of this
    version as far as its fixed header shows; WireError otherwise."""
    if len(frame) < MIN_FRAME:
        raise WireError(f"probe frame too short: {len(frame)} bytes, need at least {MIN_FRAME}")
    dst, src, ethertype = _ETH.unpack_from(frame, 0)
    if ethertype != ETHERTYPE:
        raise WireError(f"not a probe frame: ethertype {ethertype:#06x}")
    fields: _Fields = _PAYLOAD.unpack_from(frame, ETH_HEADER)
    magic, version = fields[0], fields[1]
    if magic != MAGIC:
        raise WireError(f"bad probe magic {magic!r}")
    if version != VERSION:
        raise WireError(f"unsupported probe version {version}")
    return dst, src, fields


def frame_sender(frame: bytes | bytearray | memoryview) -> tuple[int, int]:
    """The (sender, ConnUID) a probe frame claims, to look up the key that proves it.
    Unproven until :func:`decode_frame` verified the MAC. Raises WireError if the frame is
    not a probe frame of this version."""
    _, _, (_, _, _, _, sender, conn_uid, _, _) = _header(frame)
    return int.from_bytes(sender, "big"), conn_uid


def decode_frame(frame: bytes | bytearray | memoryview, key: bytes) -> ProbeFrame:
    """Parse an inner probe frame and check its MAC under `key`. Raises ProbeAuthError if
    the MAC is wrong, WireError if it is not a well-formed probe frame."""
    dst, src, (_, _, kind, frame_len, sender, conn_uid, seq, ts) = _header(frame)
    try:
        probe_kind = ProbeKind(kind)
    except ValueError:
        raise WireError(f"unknown probe kind {kind}") from None
    if frame_len < MIN_FRAME:
        raise WireError(f"probe frame length field {frame_len} is below the minimum {MIN_FRAME}")
    if len(frame) < frame_len:
        raise WireError(f"probe frame truncated: {len(frame)} of {frame_len} bytes")
    end = frame_len - MAC_LEN
    if not hmac.compare_digest(_mac(key, memoryview(frame)[:end]), bytes(frame[end:frame_len])):
        raise ProbeAuthError("probe frame MAC does not verify")
    sender_name = int.from_bytes(sender, "big")
    if sender_name == 0:
        raise WireError("probe frame from the unknown peer name 0")
    msg = ProbeMessage(probe_kind, sender_name, conn_uid, seq, ts)
    if probe_kind is ProbeKind.HEARTBEAT and frame_len >= ECHO_FRAME_LEN:
        flags, echo_seq, echo_ts, hold = _ECHO.unpack_from(frame, HEADER_LEN)
        if flags & _ECHOED or flags & _NO_ACK:
            msg = ProbeMessage(probe_kind, sender_name, conn_uid, seq, ts,
                               echo_seq if flags & _ECHOED else 0, echo_ts if flags & _ECHOED else 0,
                               hold if flags & _ECHOED else 0, not flags & _NO_ACK)
    return ProbeFrame(dst_mac=dst, src_mac=src, frame_len=frame_len, message=msg)


def encode_vxlan(vni: int, inner: bytes) -> bytes:
    """Prefix `inner` with a VXLAN header (I flag, `vni`)."""
    if not 0 <= vni < 1 << 24:
        raise ValueError(f"VNI {vni} does not fit in 24 bits")
    return _VXLAN.pack(VXLAN_FLAG_I, vni << 8) + inner


def decode_vxlan(data: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """Split a VXLAN datagram into (VNI, inner frame). Raises WireError if malformed."""
    if len(data) < VXLAN_HEADER_LEN:
        raise WireError(f"VXLAN datagram too short: {len(data)} bytes")
    flags, word = _VXLAN.unpack_from(data, 0)
    if flags != VXLAN_FLAG_I or data[1:4] != b"\0\0\0" or word & 0xFF:
        raise WireError("VXLAN header: I flag missing or reserved bits set")
    return word >> 8, memoryview(data)[VXLAN_HEADER_LEN:]


def encode_datagram(vni: int, dst_mac: bytes, src_mac: bytes, msg: ProbeMessage, key: bytes,
                    size: int = MIN_FRAME) -> bytes:
    """The UDP payload that carries `msg` to a peer's port 6784: VXLAN header + inner frame."""
    return encode_vxlan(vni, encode_frame(dst_mac, src_mac, msg, key, size))


def decode_datagram(data: bytes | bytearray | memoryview, key: bytes) -> tuple[int, ProbeFrame]:
    """Parse a UDP payload built by :func:`encode_datagram`: (VNI, frame)."""
    vni, inner = decode_vxlan(data)
    return vni, decode_frame(inner, key)


# --- driver --------------------------------------------------------------------------------


class PathMtuError(OSError):
    """A heartbeat was refused locally because the path MTU is smaller (EMSGSIZE)."""


def remove_probe_port(netns: str | None = None) -> bool:
    """Delete the probe veth pair if it exists (both ends go together). False if there was none."""
    with open_ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=PORT_IFNAME) or ipr.link_lookup(ifname=PROBE_IFNAME)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise
    return True


def create_probe_port(mac: bytes, bridge: str = DEFAULT_BRIDGE, mtu: int = DEFAULT_MTU,
                      netns: str | None = None) -> int:
    """Create the probe veth pair on `bridge` (a stale one is replaced); returns the probe end's ifindex.

    The probe end gets MAC `mac` and no IPv6 link-local address (so it never sends
    anything into the bridge); the bridge end is an ordinary, non-isolated port (so
    frames from the VXLAN port reach it) with a static FDB entry for `mac`, learning
    off and flooding off, so it receives exactly the frames addressed to `mac`. Both
    ends have MTU `mtu`.
    """
    mac_text = ":".join(f"{b:02x}" for b in mac)
    if remove_probe_port(netns):
        log.info("deleted stale probe port %s", PORT_IFNAME)
    with open_ipr(netns) as ipr:
        br = ipr.link_lookup(ifname=bridge)
        if not br:
            raise OSError(errno.ENODEV, f"bridge {bridge!r} does not exist")
        ipr.link("add", ifname=PORT_IFNAME, kind="veth", mtu=mtu, peer={"ifname": PROBE_IFNAME, "mtu": mtu})
        try:
            port = ipr.link_lookup(ifname=PORT_IFNAME)[0]
            probe = ipr.link_lookup(ifname=PROBE_IFNAME)[0]
            gen_mode = {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", _IN6_ADDR_GEN_MODE_NONE)]}
            no_ipv6 = {"attrs": [("AF_INET6", gen_mode)]}
            for index in (port, probe):
                ipr.link("set", index=index, IFLA_AF_SPEC=no_ipv6)
            ipr.link("set", index=probe, address=mac_text)
            ipr.link("set", index=port, master=br[0])
            ipr.brport("set", index=port, learning=0, unicast_flood=0, mcast_flood=0, bcast_flood=0)
            ipr.neigh("add", family=AF_BRIDGE, ifindex=port, lladdr=mac_text, state=NUD_NOARP,
                      flags=NTF_MASTER)
            ipr.link("set", index=probe, state="up")
            ipr.link("set", index=port, state="up")
        except BaseException:
            with contextlib.suppress(NetlinkError, IndexError):
                ipr.link("del", index=ipr.link_lookup(ifname=PORT_IFNAME)[0])
            raise
    log.info("probe port %s on %s, probe MAC %s", PORT_IFNAME, bridge, mac_text)
    return probe


def open_packet_socket(ifname: str = PROBE_IFNAME, netns: str | None = None) -> socket.socket:
    """A non-blocking AF_PACKET socket that receives only probe frames (ethertype) on `ifname`."""
    with netns_context(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    try:
        sock.bind((ifname, ETHERTYPE))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_udp_socket(local_ip: str | None = None, netns: str | None = None) -> socket.socket:
    """A non-blocking UDP socket for sending probes: ephemeral port, DF set, no local fragmentation."""
    with netns_context(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
        sock.bind((local_ip or "", 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ProbeEndpoint:
    """One host's probe machinery: the probe port, its AF_PACKET socket, a UDP socket.

    ``open()`` creates the probe port (replacing a stale one) and the sockets;
    ``close()`` undoes it. Both sockets are non-blocking: wait for ``fileno()`` to be
    readable (e.g. ``trio.lowlevel.wait_readable``), then call :meth:`receive`.
    """

    def __init__(self, peer_name: int, bridge: str = DEFAULT_BRIDGE, mtu: int = DEFAULT_MTU,
                 vni: int = DEFAULT_VNI, port: int = DEFAULT_PORT, local_ip: str | None = None,
                 netns: str | None = None) -> None:
        self.peer_name = peer_name
        self.mac = probe_mac(peer_name)
        self.bridge = bridge
        self.mtu = mtu
        self.vni = vni
        self.port = port
        self.local_ip = local_ip
        self.netns = netns
        self.packet_sock: socket.socket | None = None
        self.udp_sock: socket.socket | None = None
        self.malformed = 0  # frames dropped by the codec
        self.forged = 0  # frames whose MAC did not verify
        self.unknown = 0  # frames from a sender/connection we have no key for
        self._buf = bytearray(65536)

    def open(self) -> ProbeEndpoint:
        create_probe_port(self.mac, self.bridge, self.mtu, self.netns)
        try:
            self.packet_sock = open_packet_socket(PROBE_IFNAME, self.netns)
            self.udp_sock = open_udp_socket(self.local_ip, self.netns)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for sock in (self.packet_sock, self.udp_sock):
            if sock is not None:
                sock.close()
        self.packet_sock = self.udp_sock = None
        try:
            remove_probe_port(self.netns)
        except (OSError, NetlinkError) as e:
            log.warning("could not remove the probe port: %s", e)

    def __enter__(self) -> ProbeEndpoint:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The AF_PACKET socket's fd (readable when probe frames are waiting)."""
        if self.packet_sock is None:
            raise OSError(errno.EBADF, "probe endpoint is not open")
        return self.packet_sock.fileno()

    def send(self, peer_ip: str, peer_name: int, msg: ProbeMessage, key: bytes,
             size: int = MIN_FRAME) -> None:
        """Send `msg` over VXLAN to `peer_name`'s probe port at `peer_ip`, authenticated with `key`.

        Raises PathMtuError if the local path MTU is too small for `size`, other
        OSErrors (e.g. ENETUNREACH, EAGAIN when the socket buffer is full) as they come.
        """
        if self.udp_sock is None:
            raise OSError(errno.EBADF, "probe endpoint is not open")
        data = encode_datagram(self.vni, probe_mac(peer_name), self.mac, msg, key, size)
        try:
            self.udp_sock.sendto(data, (peer_ip, self.port))
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                why = (f"path MTU to {peer_ip} is below {len(data) + 28} bytes "
                       f"(heartbeat for overlay MTU {size - ETH_HEADER})")
                raise PathMtuError(errno.EMSGSIZE, why) from None
            raise

    def receive(self, key_for: Callable[[int, int], bytes | None]) -> list[ProbeFrame]:
        """Every authentic probe frame waiting on the probe port.

        `key_for(sender, conn_uid)` gives the key of frames from that sender on that
        connection, None if there is none (not a current peer, or the key shares are
        not both known yet). Malformed frames, frames with no key and frames whose MAC
        does not verify are counted (``pyweave_inputs_rejected{component="fastdp"}``)
        and dropped: only the holder of the key can move the health machine.
        """
        if self.packet_sock is None:
            raise OSError(errno.EBADF, "probe endpoint is not open")
        frames = []
        view = memoryview(self._buf)
        while True:
            try:
                n = self.packet_sock.recv_into(self._buf)
            except BlockingIOError:
                break
            data = view[:n]
            if data[:6] != self.mac:
                continue  # the bridge floods nothing to the probe port; someone else's frame
            try:
                sender, conn_uid = frame_sender(data)
                key = key_for(sender, conn_uid)
                if key is None:
                    self.unknown += 1
                    ratelog.reject(log, "fastdp", "unknown_sender",
                                   "fastdp: dropping a probe frame from a peer or connection with no key",
                                   level=logging.INFO)
                    continue
                frame = decode_frame(data, key)
            except ProbeAuthError:
                self.forged += 1
                ratelog.reject(log, "fastdp", "bad_mac", "fastdp: dropping a probe frame whose MAC is wrong")
                continue
            except WireError as e:
                self.malformed += 1
                ratelog.reject(log, "fastdp", "malformed", "fastdp: dropping a malformed probe frame: %s", e)
                continue
            frames.append(frame)
        return frames
