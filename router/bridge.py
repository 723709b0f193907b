"""Kernel drivers for the host side of the data path (DESIGN.md §2 layer 2, §4).

The `weave` Linux bridge, the sleeve TAP port on it, TX checksum offload switching, and
the pure virtio-net header codec / TSO segmenter the sleeve needs for frames read from a
TAP opened with ``IFF_VNET_HDR``.

Network namespaces: every kernel-touching function takes ``netns=None``. The daemon runs
inside its host namespace and passes nothing; tests (and ``weave`` helpers working on
another namespace) pass a named namespace or a path to a netns file. The call then runs
in a short-lived thread that ``setns()``-es into the namespace before it opens anything,
so netlink sockets, ``/dev/net/tun`` and ioctl sockets are all bound to that namespace;
the calling thread (and trio's thread pool) never changes namespace. File descriptors
are process-wide, so a TAP fd opened that way works from any thread afterwards.

Everything here is synchronous and blocking; the daemon calls it via ``trio.to_thread``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from router.netlink import IPRoute, NetlinkError

log = logging.getLogger(__name__)

T = TypeVar("T")
NetnsArg = str | os.PathLike[str] | None

DEFAULT_BRIDGE = "weave"
DEFAULT_TAP = "vethwe-sleeve"
DEFAULT_MTU = 1376
# Kernel default; Weave never changes it (its own MAC cache expires after 10 min).
DEFAULT_AGEING_TIME = 300
# Every port this package makes is named vethwe*; container host ends are vethwepl*.
PORT_PREFIX = "vethwe"
CONTAINER_VETH_PREFIX = "vethwepl"
IFNAMSIZ = 15
NETNS_RUN_DIR = "/run/netns"

CLONE_NEWNET = 0x40000000
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

# linux/sockios.h, linux/ethtool.h
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17

_libc = ctypes.CDLL(None, use_errno=True)


class DriverError(RuntimeError):
    """A kernel driver operation failed; the message says what and why."""


class BridgeError(DriverError):
    """The bridge or TAP could not be set up or inspected."""


# --- namespaces ------------------------------------------------------------------------------


def netns_path(netns: str | os.PathLike[str]) -> str:
    """The netns file for `netns`: a path as is, a bare name under /run/netns."""
    s = os.fspath(netns)
    return s if "/" in s else os.path.join(NETNS_RUN_DIR, s)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_netns(netns: NetnsArg, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` inside network namespace `netns` (None: right here).

    A fresh thread enters the namespace and exits when `fn` returns, so no thread is
    ever left in a foreign namespace. Exceptions from `fn` propagate unchanged.
    Raises FileNotFoundError if the namespace does not exist.
    """
    if netns is None:
        return fn(*args, **kwargs)
    path = netns_path(netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _setns(fd)
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    try:
        thread = threading.Thread(target=target, name=f"netns {path}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    return result[0]


@contextmanager
def _iproute() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _link_by_name(ipr: IPRoute, name: str) -> Any | None:
    try:
        links = ipr.get_links(ifname=name)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


def _link_kind(link: Any) -> str | None:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def _check_name(name: str) -> None:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise BridgeError(f"invalid interface name {name!r} (1-{IFNAMSIZ} characters, no '/' or spaces)")


def random_mac() -> str:
    """A random locally administered unicast MAC address."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


# --- bridge ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeInfo:
    """The bridge as left by :func:`ensure_bridge`."""

    name: str
    index: int
    mtu: int
    mac: str
    created: bool  # False: an existing bridge was adopted


def _bridge_attrs(ageing_time: int) -> dict[str, int]:
    return {
        "br_stp_state": 0,
        "br_ageing_time": ageing_time * 100,  # centiseconds
        # Weave carries multicast over its broadcast trees without IGMP snooping; with
        # snooping on, the bridge would stop flooding a group to the tunnel ports once it
        # has seen a local listener, and remote members would never get it.
        "br_mcast_snooping": 0,
    }


def _ensure_bridge(name: str, mtu: int, mac: str | None, ageing_time: int) -> BridgeInfo:
    with _iproute() as ipr:
        link = _link_by_name(ipr, name)
        created = link is None
        if link is None:
            try:
                ipr.link("add", ifname=name, kind="bridge", address=mac or random_mac(),
                         **_bridge_attrs(ageing_time))
            except NetlinkError as e:
                if e.code != errno.EEXIST:  # lost a race with another creator: adopt it
                    raise BridgeError(f"could not create bridge {name!r}: {e}") from e
                created = False
            link = _link_by_name(ipr, name)
            if link is None:
                raise BridgeError(f"bridge {name!r} vanished while being created")
        kind = _link_kind(link)
        if kind != "bridge":
            raise BridgeError(f"{name!r} exists but is a {kind or 'non-bridge'} device, not a bridge")
        index = link["index"]
        try:
            if not created:
                ipr.link("set", index=index, kind="bridge", **_bridge_attrs(ageing_time))
                if mac is not None:
                    ipr.link("set", index=index, address=mac)
            # A separate set (not IFLA_MTU at creation) marks the MTU as chosen by the user,
            # so the bridge keeps it instead of following the smallest port MTU.
            ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise BridgeError(f"could not configure bridge {name!r} (mtu {mtu}): {e}") from e
        link = ipr.get_links(index)[0]
        info = BridgeInfo(name=name, index=index, mtu=link.get_attr("IFLA_MTU"),
                          mac=link.get_attr("IFLA_ADDRESS"), created=created)
        if not created:
            _warn_port_mtus(ipr, info)
    log.info("%s bridge %s (index %d, mtu %d, mac %s)", "created" if created else "adopted", name,
             info.index, info.mtu, info.mac)
    return info


def _warn_port_mtus(ipr: IPRoute, info: BridgeInfo) -> None:
    """Say so when an adopted bridge's containers were made for another MTU.

    A bridge Weave Net made may carry containers with the MTU Weave ran with (WEAVE_MTU, often
    larger for fastdp). Their frames larger than ours would be dropped at the tunnel port
    without a word; changing a running container's MTU is not ours to do, so the operator is
    told which MTU to launch with.
    """
    other: dict[int, list[str]] = {}
    for link in ipr.get_links():
        port = link.get_attr("IFLA_IFNAME")
        if (link.get_attr("IFLA_MASTER") == info.index and port.startswith(CONTAINER_VETH_PREFIX)
                and link.get_attr("IFLA_MTU") != info.mtu):
            other.setdefault(link.get_attr("IFLA_MTU"), []).append(port)
    for mtu, ports in sorted(other.items()):
        log.warning("bridge %s has MTU %d, but %d container veth(s) on it have MTU %d (%s): their larger "
                    "frames would be lost; launch with --mtu %d to keep them as they were made",
                    info.name, info.mtu, len(ports), mtu, ", ".join(sorted(ports)[:5]), mtu)


def ensure_bridge(name: str = DEFAULT_BRIDGE, mtu: int = DEFAULT_MTU, *, mac: str | None = None,
                  ageing_time: int = DEFAULT_AGEING_TIME, netns: NetnsArg = None) -> BridgeInfo:
    """Create the Linux bridge `name`, or adopt an existing one; either way leave it up.

    STP off, FDB ageing `ageing_time` s, multicast snooping off, MTU `mtu` (fixed even on
    an adopted bridge). A new bridge gets `mac` or a random MAC set explicitly, so its
    address does not change as ports come and go. Idempotent. Raises BridgeError if
    `name` exists and is not a bridge.
    """
    _check_name(name)
    return run_in_netns(netns, _ensure_bridge, name, mtu, mac, ageing_time)


def bridge_info(name: str = DEFAULT_BRIDGE, *, netns: NetnsArg = None) -> BridgeInfo | None:
    """The bridge `name` as it is now, or None if there is no such bridge."""

    def inspect() -> BridgeInfo | None:
        with _iproute() as ipr:
            link = _link_by_name(ipr, name)
            if link is None or _link_kind(link) != "bridge":
                return None
            return BridgeInfo(name=name, index=link["index"], mtu=link.get_attr("IFLA_MTU"),
                              mac=link.get_attr("IFLA_ADDRESS"), created=False)

    return run_in_netns(netns, inspect)


# --- TAP -----------------------------------------------------------------------------------

# We ask for the 10-byte struct virtio_net_hdr, not the 12-byte virtio_net_hdr_mrg_rxbuf:
# the extra num_buffers field only matters to virtio guests merging receive buffers.
VNET_HDR_LEN = 10
TAP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
# Enough for the largest GSO frame the kernel hands a TAP by default (64 KB IP packet,
# Ethernet + VLAN header, vnet header), rounded up.
TAP_READ_SIZE = 1 << 17


def _open_tap(name: str, vnet_hdr: bool, nonblocking: bool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    fd = os.open("/dev/net/tun", flags)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0))
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            # Offloads are an int argument passed by value, not a pointer.
            fcntl.ioctl(fd, TUNSETOFFLOAD, TAP_OFFLOADS)
    except OSError:
        os.close(fd)
        raise
    return fd


def _ensure_tap(name: str, bridge: str, mtu: int, vnet_hdr: bool, nonblocking: bool) -> int:
    try:
        fd = _open_tap(name, vnet_hdr, nonblocking)
    except OSError as e:
        hint = " (another process holds it?)" if e.errno == errno.EBUSY else ""
        raise BridgeError(f"could not open TAP {name!r}: {e}{hint}") from e
    try:
        with _iproute() as ipr:
            br = _link_by_name(ipr, bridge)
            if br is None or _link_kind(br) != "bridge":
                raise BridgeError(f"bridge {bridge!r} not present; create it first (ensure_bridge)")
            tap = _link_by_name(ipr, name)
            if tap is None:
                raise BridgeError(f"TAP {name!r} vanished after TUNSETIFF")
            index = tap["index"]
            ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, master=br["index"])
            # Tunnel ports must never forward to each other in the kernel: all relaying
            # between peers happens in the sleeve, which knows the routes (DESIGN.md §4).
            ipr.brport("set", index=index, isolated=1)
            ipr.link("set", index=index, state="up")
    except BaseException as e:
        os.close(fd)
        if isinstance(e, NetlinkError):
            raise BridgeError(f"could not attach TAP {name!r} to bridge {bridge!r} (mtu {mtu}): {e}") from e
        raise
    log.info("TAP %s on bridge %s: mtu %d, vnet_hdr %s, fd %d", name, bridge, mtu, vnet_hdr, fd)
    return fd


def ensure_tap(name: str = DEFAULT_TAP, bridge: str = DEFAULT_BRIDGE, mtu: int = DEFAULT_MTU,
               vnet_hdr: bool = False, *, nonblocking: bool = False, netns: NetnsArg = None) -> int:
    """Open (creating if needed) TAP `name`, enslave it to `bridge` as an isolated port, up.

    Returns the TAP fd; the caller owns it. The TAP is not persistent: it disappears
    when the last fd is closed. Frames are plain Ethernet (IFF_NO_PI). With `vnet_hdr`
    every read and write starts with a 10-byte virtio_net_hdr (:class:`VnetHeader`) and
    checksum + TCP segmentation offload are enabled, so reads may return partial
    checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM) and TCP super-frames up to 64 KB; see
    :func:`frames_from_tap`. Without it the kernel completes checksums and segments
    before the frame reaches us.
    """
    _check_name(name)
    return run_in_netns(netns, _ensure_tap, name, bridge, mtu, vnet_hdr, nonblocking)


# --- TX checksum offload ------------------------------------------------------------------


def _ethtool_value(ifname: str, cmd: int, value: int = 0) -> int:
    buf = ctypes.create_string_buffer(struct.pack("II", cmd, value))
    ifr = struct.pack("16sP16x", ifname.encode(), ctypes.addressof(buf))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    return struct.unpack("II", buf.raw[:8])[1]


def set_tx_checksum(ifname: str, enabled: bool, *, netns: NetnsArg = None) -> None:
    """Turn TX checksum offload on or off on `ifname` (``ethtool -K IF tx on|off``).

    Turning it off also drops TSO/GSO-partial on the device (they depend on it), so the
    stack hands the device complete, MTU-sized frames. Raises BridgeError on failure.

    When pyweave uses it: container veths get ``tx off`` when the sleeve TAP is *not*
    opened with vnet_hdr, as Weave does for the veths it makes. The reason is capture
    points that see frames before the kernel finishes them: Weave's pcap socket on a
    veth, and in pyweave AF_PACKET probe ports or a tcpdump on a port, would otherwise
    see TCP/UDP frames with only the pseudo-header checksum filled in. A plain TAP
    itself is not such a point: the kernel completes checksums and segments before it
    queues a frame to a TAP without offloads (measured: 8 MB of TCP through a plain TAP
    with tx on, every frame's checksum valid). With vnet_hdr, offload stays on: the
    sleeve finishes checksums and segments itself (:func:`frames_from_tap`), and the
    container can hand it 64 KB super-frames.
    """
    try:
        run_in_netns(netns, _ethtool_value, ifname, ETHTOOL_STXCSUM, int(enabled))
    except OSError as e:
        state = "on" if enabled else "off"
        raise BridgeError(f"could not turn tx checksumming {state} on {ifname}: {e}") from e


def get_tx_checksum(ifname: str, *, netns: NetnsArg = None) -> bool:
    """Whether TX checksum offload is on for `ifname`."""
    try:
        return bool(run_in_netns(netns, _ethtool_value, ifname, ETHTOOL_GTXCSUM))
    except OSError as e:
        raise BridgeError(f"could not read tx checksumming of {ifname}: {e}") from e


# --- teardown and stale objects -------------------------------------------------------------


@dataclass(frozen=True)
class StaleLink:
    """A kernel object left by an earlier run."""

    name: str
    kind: str
    reason: str


def _list_stale(bridge: str, tap: str) -> list[StaleLink]:
    out: list[StaleLink] = []
    with _iproute() as ipr:
        br = _link_by_name(ipr, bridge)
        br_index = br["index"] if br is not None and _link_kind(br) == "bridge" else None
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            kind = _link_kind(link) or "?"
            if name == tap and kind == "tun" and not link["flags"] & IFF_LOWER_UP:
                out.append(StaleLink(name, kind, "TAP with no process attached"))
            elif name.startswith(CONTAINER_VETH_PREFIX) and kind == "veth":
                master = link.get_attr("IFLA_MASTER")
                if br_index is None or master != br_index:
                    out.append(StaleLink(name, kind, f"container veth not on bridge {bridge}"))
    return out


def list_stale(bridge: str = DEFAULT_BRIDGE, tap: str = DEFAULT_TAP, *,
               netns: NetnsArg = None) -> list[StaleLink]:
    """Objects an earlier run left behind that a new daemon should not reuse as is.

    A TAP called `tap` that no process has open (only a persistent TAP outlives its
    process), and container veths (``vethwepl*``) that are not ports of `bridge` (the
    bridge was deleted or recreated under them). The bridge itself is never stale:
    :func:`ensure_bridge` adopts it.
    """
    return run_in_netns(netns, _list_stale, bridge, tap)


def _teardown(bridge: str, tap: str, veths: bool) -> list[str]:
    removed: list[str] = []
    with _iproute() as ipr:
        br = _link_by_name(ipr, bridge)
        br_index = br["index"] if br is not None and _link_kind(br) == "bridge" else None
        doomed: list[tuple[int, str]] = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            kind = _link_kind(link)
            on_bridge = br_index is not None and link.get_attr("IFLA_MASTER") == br_index
            if name == tap and kind == "tun":
                doomed.append((link["index"], name))
            elif veths and kind == "veth" and name.startswith(PORT_PREFIX) and (
                    on_bridge or name.startswith(CONTAINER_VETH_PREFIX)):
                doomed.append((link["index"], name))
        if br_index is not None:
            doomed.append((br_index, bridge))
        for index, name in doomed:
            try:
                ipr.link("del", index=index)
                removed.append(name)
            except NetlinkError as e:
                if e.code != errno.ENODEV:  # a veth goes with its peer
                    raise BridgeError(f"could not delete {name}: {e}") from e
    if removed:
        log.info("teardown removed %s", ", ".join(removed))
    return removed


def teardown(bridge: str = DEFAULT_BRIDGE, tap: str = DEFAULT_TAP, *, veths: bool = True,
             netns: NetnsArg = None) -> list[str]:
    """Remove what the drivers made: the TAP, container veths, the bridge. Idempotent.

    With `veths`, every ``vethwe*`` veth on the bridge and every ``vethwepl*`` veth
    anywhere in the namespace goes (deleting the host end removes the container end).
    A TAP still held open by a process is deleted too (its fd then reads EOF/errors).
    Returns the names removed.
    """
    return run_in_netns(netns, _teardown, bridge, tap, veths)


# --- virtio-net header codec -------------------------------------------------------------

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

# Legacy virtio headers are in host byte order (the TAP is not switched to TUNSETVNETLE/BE).
_VNET = struct.Struct("=BBHHHH")


class FrameError(ValueError):
    """A frame (or vnet header) that cannot be parsed or processed."""


@dataclass(frozen=True)
class VnetHeader:
    """struct virtio_net_hdr: what the kernel tells a vnet_hdr TAP reader about a frame."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    def pack(self) -> bytes:
        return build_vnet_header(self)


NO_OFFLOAD = VnetHeader()
NO_OFFLOAD_HEADER = bytes(VNET_HDR_LEN)


def parse_vnet_header(buf: bytes | bytearray | memoryview) -> VnetHeader:
    """Decode the first 10 bytes of `buf`."""
    if len(buf) < VNET_HDR_LEN:
        raise FrameError(f"vnet header needs {VNET_HDR_LEN} bytes, got {len(buf)}")
    return VnetHeader(*_VNET.unpack_from(buf, 0))


def build_vnet_header(hdr: VnetHeader) -> bytes:
    """Encode `hdr` as the 10 bytes that precede a frame written to a vnet_hdr TAP."""
    try:
        return _VNET.pack(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset)
    except struct.error as e:
        raise FrameError(f"vnet header field out of range: {hdr}") from e


def split_vnet(buf: bytes | bytearray | memoryview) -> tuple[VnetHeader, bytes]:
    """Split a read from a vnet_hdr TAP into its header and the Ethernet frame."""
    return parse_vnet_header(buf), bytes(buf[VNET_HDR_LEN:])


# --- checksums, segmentation -------------------------------------------------------------


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's complement sum of `data` (big-endian words, odd length zero-padded).

    Uses 2**16 == 1 (mod 0xFFFF): the big-endian integer of the data is congruent to the
    sum of its 16-bit words, so one bignum remainder does the whole sum in C.
    """
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    total = int.from_bytes(b, "big") + initial
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum: the complement of :func:`ones_complement_sum`."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80


def _l3_offset(frame: bytes) -> tuple[int, int]:
    if len(frame) < 14:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
    off, ethertype = 14, int.from_bytes(frame[12:14], "big")
    while ethertype == ETH_P_8021Q:
        if len(frame) < off + 4:
            raise FrameError("truncated VLAN tag")
        ethertype = int.from_bytes(frame[off + 2:off + 4], "big")
        off += 4
    return off, ethertype


def complete_checksum(frame: bytes | bytearray | memoryview, hdr: VnetHeader) -> bytes:
    """Finish a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM) as the kernel would.

    The field at csum_start + csum_offset holds the (uncomplemented) pseudo-header sum;
    the checksum is the complement of the sum from csum_start to the end of the frame.
    A zero result is sent as 0xFFFF (the same value in one's complement, and the only
    valid form for UDP). Frames without the flag are returned unchanged.
    """
    out = bytes(frame)
    if not hdr.needs_csum:
        return out
    start, pos = hdr.csum_start, hdr.csum_start + hdr.csum_offset
    if start >= len(out) or pos + 2 > len(out):
        raise FrameError(f"checksum at {start}+{hdr.csum_offset} outside a {len(out)}-byte frame")
    csum = internet_checksum(out[start:]) or 0xFFFF
    return out[:pos] + csum.to_bytes(2, "big") + out[pos + 2:]


def _tcp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, len(segment))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), IPPROTO_TCP)
    return internet_checksum(pseudo + segment)


def segment_superframe(frame: bytes | bytearray | memoryview, hdr: VnetHeader,
                       mtu: int | None = None) -> list[bytes]:
    """Cut a TCP super-frame read from a vnet_hdr TAP into ordinary Ethernet frames.

    `hdr` must have gso type TCPv4 or TCPv6 (the ECN bit is allowed). Each segment
    carries at most gso_size payload bytes, fewer if `mtu` (the IP MTU the segments must
    fit, e.g. a Weave peer's) demands it. Headers are copied; per segment the IP length
    (and for IPv4 the ID, incremented per segment, and header checksum) and the TCP
    sequence number and checksum are rewritten. FIN and PSH stay on the last segment
    only, CWR on the first only, as Linux's own segmentation does. Returns complete
    frames (no vnet header) with valid checksums. Raises FrameError for anything else.
    """
    frame = bytes(frame)
    if hdr.gso not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
        raise FrameError(f"not a TCP super-frame (gso_type {hdr.gso_type})")
    l3, ethertype = _l3_offset(frame)
    v4 = hdr.gso == VIRTIO_NET_HDR_GSO_TCPV4
    if ethertype != (ETH_P_IP if v4 else ETH_P_IPV6):
        raise FrameError(f"gso type {hdr.gso_type} but ethertype {ethertype:#06x}")
    if v4:
        if len(frame) < l3 + 20:
            raise FrameError("truncated IPv4 header")
        ihl = (frame[l3] & 0x0F) * 4
        if frame[l3] >> 4 != 4 or ihl < 20 or frame[l3 + 9] != IPPROTO_TCP:
            raise FrameError("not a TCP/IPv4 packet")
        l4 = l3 + ihl
        end = l3 + int.from_bytes(frame[l3 + 2:l3 + 4], "big")
        src, dst = frame[l3 + 12:l3 + 16], frame[l3 + 16:l3 + 20]
    else:
        if len(frame) < l3 + 40 or frame[l3] >> 4 != 6:
            raise FrameError("truncated or not an IPv6 header")
        if hdr.needs_csum and hdr.csum_start > l3 + 40:
            l4 = hdr.csum_start  # behind extension headers
        elif frame[l3 + 6] == IPPROTO_TCP:
            l4 = l3 + 40
        else:
            raise FrameError("IPv6 packet without TCP right after the fixed header")
        end = l3 + 40 + int.from_bytes(frame[l3 + 4:l3 + 6], "big")
        src, dst = frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]
    if end > len(frame) or len(frame) < l4 + 20:
        raise FrameError(f"IP length {end - l3} beyond a {len(frame)}-byte frame")
    thl = (frame[l4 + 12] >> 4) * 4
    if thl < 20 or l4 + thl > end:
        raise FrameError(f"bad TCP header length {thl}")
    mss = hdr.gso_size
    if mtu is not None:
        mss = min(mss, mtu - (l4 - l3) - thl)
    if mss <= 0:
        raise FrameError(f"no room for payload (gso_size {hdr.gso_size}, mtu {mtu})")
    eth, iphdr, tcphdr = frame[:l3], frame[l3:l4], frame[l4:l4 + thl]
    payload = frame[l4 + thl:end]
    seq0 = int.from_bytes(tcphdr[4:8], "big")
    flags0 = tcphdr[13]
    ip_id0 = int.from_bytes(iphdr[4:6], "big") if v4 else 0
    chunks = [payload[i:i + mss] for i in range(0, len(payload), mss)] or [b""]
    out: list[bytes] = []
    for n, chunk in enumerate(chunks):
        flags = flags0
        if n < len(chunks) - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        if n > 0:
            flags &= ~TCP_CWR
        tcp = bytearray(tcphdr)
        tcp[4:8] = ((seq0 + n * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        tcp[13] = flags
        tcp[16:18] = b"\0\0"
        segment = bytes(tcp) + chunk
        tcp[16:18] = _tcp_checksum(src, dst, segment).to_bytes(2, "big")
        ip = bytearray(iphdr)
        if v4:
            ip[2:4] = (len(ip) + len(segment)).to_bytes(2, "big")
            ip[4:6] = ((ip_id0 + n) & 0xFFFF).to_bytes(2, "big")
            ip[10:12] = b"\0\0"
            ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
        else:
            ip[4:6] = (len(ip) - 40 + len(segment)).to_bytes(2, "big")
        out.append(eth + bytes(ip) + bytes(tcp) + chunk)
    return out


def frames_from_tap(buf: bytes | bytearray | memoryview, mtu: int | None = None) -> list[bytes]:
    """Turn one read from a vnet_hdr TAP into complete frames fit for any peer.

    GSO TCP super-frames are segmented (to `mtu` if given), partial checksums are
    completed, anything else is passed through. Raises FrameError for GSO types the TAP
    was not asked to accept (UDP) and malformed frames.
    """
    hdr, frame = split_vnet(buf)
    if hdr.gso == VIRTIO_NET_HDR_GSO_NONE:
        return [complete_checksum(frame, hdr)]
    return segment_superframe(frame, hdr, mtu)


def vnet_frame(frame: bytes | bytearray | memoryview, hdr: VnetHeader = NO_OFFLOAD) -> bytes:
    """Prefix `frame` with a vnet header for writing to a vnet_hdr TAP (default: no offload)."""
    return build_vnet_header(hdr) + bytes(frame)
