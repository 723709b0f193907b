"""Driver: the kernel VXLAN device of the fast data path and its forwarding database.

One device, ``vxlan-<port>`` (``vxlan-6784``), UDP destination port 6784, VNI
:data:`DEFAULT_VNI`, no fixed remote, MAC learning on, outer DF set, enslaved to the
bridge ``weave`` as an ``isolated`` port (tunnel ports never forward to each other in
the bridge; relaying between peers is the sleeve's job, DESIGN.md §4).

Head-end replication: one all-zero FDB entry (``00:00:00:00:00:00 dst <peer ip>``,
appended like ``bridge fdb append``) per peer whose fast path is healthy; the kernel
floods broadcasts and unknown unicast to every such peer and learns unicast MACs from
what it receives.

Everything here is synchronous netlink through pyroute2; the daemon calls it from a
worker thread (``trio.to_thread``). Each function takes an optional ``netns`` (a name
under ``/run/netns`` or a path to a namespace file): the calling thread enters that
namespace only while it opens its sockets (see :func:`netns_context`). The daemon runs
inside its host's namespace and passes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from router.netlink import IPRoute, NetlinkError

log = logging.getLogger(__name__)

OVERLAY_NAME = "vxlan"  # what pyweave peers call this overlay; never Weave's "fastdp"
DEFAULT_BRIDGE = "weave"
DEFAULT_PORT = 6784
# One VNI for the whole pyweave network: a single device on the bridge carries every
# peer's traffic, so peers are told apart by outer IP, not by VNI (Weave's OVS datapath
# encodes short peer IDs in the VNI instead). 0x707766 is ASCII "pwf". A VXLAN packet
# with any other VNI arriving on port 6784 (e.g. from a Weave Net peer's OVS datapath)
# matches no device and the kernel drops it.
DEFAULT_VNI = 0x707766
DEFAULT_MTU = 1376
ZERO_MAC = "00:00:00:00:00:00"

IFLA_VXLAN_DF_SET = 1  # enum ifla_vxlan_df: 0 unset, 1 set, 2 inherit

_CLONE_NEWNET = 0x40000000
_NETNS_RUN_DIR = "/run/netns"

AF_BRIDGE = 7
NUD_REACHABLE = 0x02
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
NTF_MASTER = 0x04


class VxlanError(RuntimeError):
    """A netlink operation on the VXLAN device failed; the message says which and why."""


# --- network namespaces --------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join(_NETNS_RUN_DIR, netns)


@contextlib.contextmanager
def netns_context(netns: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace `netns` (None: stay).

    Sockets opened inside keep that namespace for their whole life, so open them
    here and use them anywhere. Only the calling thread moves (``setns(2)``), and it
    moves back even if the body raises. The namespace must already exist.
    """
    if netns is None:
        yield
        return
    target = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


@contextlib.contextmanager
def open_ipr(netns: str | None = None) -> Iterator[IPRoute]:
    """An rtnetlink socket in `netns` (None: the caller's namespace), closed on exit."""
    with netns_context(netns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


# --- helpers -------------------------------------------------------------------------------


def device_name(port: int = DEFAULT_PORT) -> str:
    """The VXLAN device's name for a UDP port, as Weave names it: ``vxlan-6784``."""
    return f"vxlan-{port}"


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _check_ip(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise ValueError(f"{ip!r} is not an IPv4 address") from None


def _netlink(what: str, err: NetlinkError) -> VxlanError:
    return VxlanError(f"{what}: {os.strerror(err.code) if err.code > 0 else err} (errno {err.code})")


# --- probe ---------------------------------------------------------------------------------


def available(netns: str | None = None) -> tuple[bool, str]:
    """Can this kernel create a VXLAN device here? Returns (ok, reason).

    Creates a throwaway device (never brought up, so it binds no UDP port) and
    deletes it again.
    """
    name = "pwvxp" + secrets.token_hex(4)
    try:
        with open_ipr(netns) as ipr:
            try:
                ipr.link("add", ifname=name, kind="vxlan", vxlan_id=DEFAULT_VNI, vxlan_learning=1)
            except NetlinkError as e:
                return False, f"cannot create a vxlan device: {os.strerror(e.code)} (errno {e.code})"
            try:
                ipr.link("del", index=_lookup(ipr, name))
            except NetlinkError as e:
                log.warning("could not delete the throwaway vxlan device %s: %s", name, e)
    except OSError as e:
        return False, f"netlink unavailable: {e}"
    return True, "kernel vxlan devices are available"


# --- the device ----------------------------------------------------------------------------


def ensure_vxlan(bridge: str = DEFAULT_BRIDGE, port: int = DEFAULT_PORT, vni: int = DEFAULT_VNI,
                 mtu: int = DEFAULT_MTU, local_ip: str | None = None, netns: str | None = None) -> int:
    """Create ``vxlan-<port>`` on `bridge` afresh (a stale one is deleted first); returns its ifindex.

    Settings: UDP destination port `port`, VNI `vni`, no remote (peers are FDB
    entries, see :func:`add_peer`), learning on, outer IPv4 DF set (a too-small path
    drops packets instead of fragmenting them; heartbeats notice), outer UDP checksums
    on (offloaded by the NICs that matter and it keeps corrupted frames out of the
    bridge), source address `local_ip` if given, MTU `mtu`. Bridge port: ``isolated
    on``, learning on. The device is up when this returns.
    """
    if not 0 < vni < 1 << 24:
        raise ValueError(f"VNI must be within 1..16777215, not {vni}")
    if not 0 < port < 1 << 16:
        raise ValueError(f"invalid UDP port {port}")
    name = device_name(port)
    with open_ipr(netns) as ipr:
        br = _lookup(ipr, bridge)
        if br is None:
            raise VxlanError(f"bridge {bridge!r} does not exist")
        stale = _lookup(ipr, name)
        if stale is not None:
            log.info("deleting stale %s (ifindex %d)", name, stale)
            try:
                ipr.link("del", index=stale)
            except NetlinkError as e:
                raise _netlink(f"deleting stale {name}", e) from None
        attrs: dict[str, object] = {
            "vxlan_id": vni,
            "vxlan_port": port,
            "vxlan_learning": 1,
            "vxlan_udp_csum": 1,
            "vxlan_df": IFLA_VXLAN_DF_SET,
        }
        if local_ip is not None:
            attrs["vxlan_local"] = _check_ip(local_ip)
        try:
            ipr.link("add", ifname=name, kind="vxlan", mtu=mtu, **attrs)
        except NetlinkError as e:
            hint = " (another vxlan device already uses this VNI and port)" if e.code == errno.EEXIST else ""
            raise VxlanError(f"creating {name}: {os.strerror(e.code)}{hint}") from None
        index = _lookup(ipr, name)
        if index is None:
            raise VxlanError(f"{name} vanished right after it was created")
        try:
            ipr.link("set", index=index, master=br)
            ipr.brport("set", index=index, isolated=1, learning=1)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)
            raise _netlink(f"attaching {name} to {bridge}", e) from None
    log.info("%s up on %s: ifindex %d, vni %#x, mtu %d%s", name, bridge, index, vni, mtu,
             f", local {local_ip}" if local_ip else "")
    return index


def teardown(port: int = DEFAULT_PORT, netns: str | None = None) -> bool:
    """Delete ``vxlan-<port>`` (and with it its FDB). False if there was none."""
    name = device_name(port)
    with open_ipr(netns) as ipr:
        index = _lookup(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise _netlink(f"deleting {name}", e) from None
    log.info("deleted %s", name)
    return True


@dataclass(frozen=True)
class VxlanInfo:
    """What the kernel reports about the device (for status pages and tests)."""

    ifindex: int
    name: str
    vni: int
    port: int
    learning: bool
    mtu: int
    up: bool
    master: int | None
    isolated: bool | None
    bridge_learning: bool | None
    df: int | None
    udp_csum: bool | None


def describe(port: int = DEFAULT_PORT, netns: str | None = None) -> VxlanInfo | None:
    """The device's settings as the kernel reports them, or None if there is no device."""
    name = device_name(port)
    with open_ipr(netns) as ipr:
        index = _lookup(ipr, name)
        if index is None:
            return None
        (link,) = ipr.get_links(index)
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    slave = info.get_attr("IFLA_INFO_SLAVE_DATA") if info is not None else None

    def vx(attr: str) -> Any:
        return data.get_attr(attr) if data is not None else None

    def brport(attr: str) -> bool | None:
        value = slave.get_attr(attr) if slave is not None else None
        return None if value is None else bool(value)

    df = vx("IFLA_VXLAN_DF")
    csum = vx("IFLA_VXLAN_UDP_CSUM")
    return VxlanInfo(
        ifindex=index, name=name, vni=int(vx("IFLA_VXLAN_ID") or 0), port=int(vx("IFLA_VXLAN_PORT") or 0),
        learning=bool(vx("IFLA_VXLAN_LEARNING")), mtu=link.get_attr("IFLA_MTU"),
        up=bool(link["flags"] & 1), master=link.get_attr("IFLA_MASTER"),
        isolated=brport("IFLA_BRPORT_ISOLATED"), bridge_learning=brport("IFLA_BRPORT_LEARNING"),
        df=None if df is None else int(df), udp_csum=None if csum is None else bool(csum))


# --- forwarding database -------------------------------------------------------------------


@dataclass(frozen=True)
class FdbEntry:
    """One entry of the VXLAN device's own FDB: inner MAC -> outer destination IP."""

    mac: str
    dst: str
    static: bool  # added by us (permanent/noarp) rather than learned


def _device(ipr: IPRoute, port: int) -> int:
    index = _lookup(ipr, device_name(port))
    if index is None:
        raise VxlanError(f"{device_name(port)} does not exist (call ensure_vxlan first)")
    return index


def _vxlan_entries(ipr: IPRoute, index: int) -> list[FdbEntry]:
    entries = []
    for msg in ipr.fdb("dump"):
        if msg["ifindex"] != index or not msg["flags"] & NTF_SELF:
            continue
        mac, dst = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
        if mac is None or dst is None:
            continue
        static = bool(msg["state"] & (NUD_PERMANENT | NUD_NOARP))
        entries.append(FdbEntry(mac=mac.lower(), dst=dst, static=static))
    return entries


def fdb_entries(port: int = DEFAULT_PORT, netns: str | None = None) -> list[FdbEntry]:
    """Every entry in the VXLAN device's FDB (all-zero peer entries and learned MACs)."""
    with open_ipr(netns) as ipr:
        return _vxlan_entries(ipr, _device(ipr, port))


def peers(port: int = DEFAULT_PORT, netns: str | None = None) -> list[str]:
    """The peer IPs that have an all-zero (head-end replication) entry, sorted."""
    with open_ipr(netns) as ipr:
        entries = _vxlan_entries(ipr, _device(ipr, port))
    return sorted({e.dst for e in entries if e.mac == ZERO_MAC}, key=ipaddress.IPv4Address)


def add_peer(ip: str, port: int = DEFAULT_PORT, netns: str | None = None) -> bool:
    """Append the all-zero FDB entry for `ip` (``bridge fdb append``). False if it was there already."""
    ip = _check_ip(ip)
    with open_ipr(netns) as ipr:
        index = _device(ipr, port)
        if any(e.mac == ZERO_MAC and e.dst == ip for e in _vxlan_entries(ipr, index)):
            return False
        error = _append_peer(ipr, index, ip, port)
        if error is not None:
            raise error
    log.info("fastdp peer %s added", ip)
    return True


def _append_peer(ipr: IPRoute, index: int, ip: str, port: int) -> VxlanError | None:
    try:
        ipr.neigh("append", family=AF_BRIDGE, ifindex=index, lladdr=ZERO_MAC, dst=ip,
                  state=NUD_NOARP | NUD_PERMANENT, flags=NTF_SELF)
    except NetlinkError as e:
        return _netlink(f"adding peer {ip} to {device_name(port)}", e)
    return None


def add_peers(
    ips: Sequence[str], port: int = DEFAULT_PORT, netns: str | None = None
) -> dict[str, VxlanError | None]:
    """`add_peer` for many peers over one netlink socket, without looking first (appending
    an entry that is already there changes nothing). The outcome for each IP: None when
    its entry is in place."""
    checked = [_check_ip(ip) for ip in ips]
    outcome: dict[str, VxlanError | None] = {}
    with open_ipr(netns) as ipr:
        index = _device(ipr, port)
        for ip in checked:
            outcome[ip] = _append_peer(ipr, index, ip, port)
    added = [ip for ip, error in outcome.items() if error is None]
    if added:
        log.info("fastdp peer%s %s added", "s" if len(added) > 1 else "", ", ".join(added))
    return outcome


def remove_peer(ip: str, port: int = DEFAULT_PORT, netns: str | None = None) -> int:
    """Remove `ip`'s all-zero entry and every MAC the device learned behind `ip`.

    The bridge's own entries that send those MACs to the VXLAN port go too, so the
    next frame for such a MAC is flooded (reaching the sleeve) instead of being sent
    into a tunnel that no longer leads anywhere. Returns how many VXLAN FDB entries
    were removed (0 if there were none).
    """
    ip = _check_ip(ip)
    removed = 0
    with open_ipr(netns) as ipr:
        index = _device(ipr, port)
        doomed = [e for e in _vxlan_entries(ipr, index) if e.dst == ip]
        for entry in doomed:
            try:
                ipr.neigh("del", family=AF_BRIDGE, ifindex=index, lladdr=entry.mac, dst=ip, flags=NTF_SELF)
                removed += 1
            except NetlinkError as e:
                if e.code != errno.ENOENT:
                    raise _netlink(f"removing {entry.mac} -> {ip} from {device_name(port)}", e) from None
        macs = {e.mac for e in doomed if e.mac != ZERO_MAC}
        if macs:
            for msg in ipr.fdb("dump"):
                mac = msg.get_attr("NDA_LLADDR")
                # The bridge reports its entries with ndm_flags 0 and NDA_MASTER set.
                bridge_entry = not msg["flags"] & NTF_SELF and msg.get_attr("NDA_MASTER") is not None
                if (msg["ifindex"] != index or not bridge_entry or mac is None
                        or mac.lower() not in macs or msg["state"] & (NUD_PERMANENT | NUD_NOARP)):
                    continue
                extra = {}
                vlan = msg.get_attr("NDA_VLAN")
                if vlan:
                    extra["vlan"] = vlan
                try:
                    ipr.neigh("del", family=AF_BRIDGE, ifindex=index, lladdr=mac, flags=NTF_MASTER, **extra)
                except NetlinkError as e:
                    if e.code != errno.ENOENT:
                        raise _netlink(f"removing bridge entry {mac} on {device_name(port)}", e) from None
    log.info("fastdp peer %s removed (%d fdb entries)", ip, removed)
    return removed
