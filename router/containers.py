"""Attach containers (network namespaces) to the weave bridge (DESIGN.md §4, §7).

A container is a network namespace, named by a CONTAINER spec:

* a PID (int, or a string of digits): ``/proc/PID/ns/net``;
* a path (anything with a ``/``): a netns file, e.g. ``/run/netns/x`` or a CNI netns path;
* otherwise a named namespace as made by ``ip netns add``: ``/run/netns/NAME``.

Attaching creates a veth pair. The host end, on the bridge, is named ``vethwepl`` + the
namespace's nsfs inode number in base 36 (7 characters): unique among live namespaces,
stable for the container's life whichever spec names it, and within IFNAMSIZ. The
container end is created directly inside the namespace under its final name (``ethwe``),
so a name clash there fails before anything is half made.

Containers Weave Net attached are adopted as they are: their host end is ``vethwepl<pid>``
(Weave names it by the container's PID), their container end ``ethwe``. Listing finds
them by link-netnsid, and attach and detach find a container's veth by the same id when
there is none under our name, so they work on Weave's veths without renaming them.

Finding containers again from the host (:func:`list_attached`): each host veth on the
bridge reports the peer's namespace as a link-netnsid, which only means something inside
the host namespace. Candidate namespace files are gathered from nsfs bind mounts in
``/proc/self/mountinfo`` (``ip netns`` names, Docker and CNI paths alike) and from
``/proc/*/ns/net`` (namespaces only processes hold), falling back to open file
descriptors in ``/proc/*/fd`` (namespaces only an fd holds). The inode encoded in the
veth name (for Weave's ``vethwepl<pid>``, that process's namespace) picks the candidate;
asking the kernel for that candidate's nsid (RTM_GETNSID) confirms it, and if the name
does not decode, the nsid alone finds it.

Functions are synchronous; the daemon calls them via ``trio.to_thread``. Every function
takes ``netns``: the *host* namespace where the bridge lives (None: the caller's own).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from router.bridge import (
    CONTAINER_VETH_PREFIX,
    DEFAULT_BRIDGE,
    DEFAULT_MTU,
    IFNAMSIZ,
    NETNS_RUN_DIR,
    DriverError,
    NetnsArg,
    _iproute,
    _link_by_name,
    _link_kind,
    run_in_netns,
    set_tx_checksum,
)
from router.netlink import NetlinkError

log = logging.getLogger(__name__)

DEFAULT_IFNAME = "ethwe"
MULTICAST_ROUTE = ipaddress.IPv4Network("224.0.0.0/4")
RT_SCOPE_LINK = 253
NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000
_NAME_DIGITS = 7
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_HOST_VETH_RE = re.compile(rf"^{CONTAINER_VETH_PREFIX}[0-9a-z]{{{_NAME_DIGITS}}}$")
_WEAVE_VETH_RE = re.compile(rf"^{CONTAINER_VETH_PREFIX}([1-9][0-9]{{0,6}})$")  # Weave Net's: vethwepl<pid>
# Weave's CNI plugin tunes the container's ARP cache so a MAC that moved is noticed fast.
_ARP_TUNING = {"base_reachable_time_ms": "5000", "delay_first_probe_time": "2", "ucast_solicit": "1"}
IPv4Addrs = Iterable[ipaddress.IPv4Interface | str]


class ContainerError(DriverError):
    """A container could not be resolved, attached or detached; the message says why."""


@dataclass(frozen=True)
class Attachment:
    """A container plugged into the bridge."""

    container: str  # the netns name for a named namespace, else the netns path
    netns: str  # path of the netns file
    host_ifname: str  # host end, a port of the bridge
    mac: str  # MAC of the container end
    addresses: tuple[ipaddress.IPv4Interface, ...]  # on the container end, sorted
    ifname: str = DEFAULT_IFNAME  # the container end's name inside the namespace


@dataclass(frozen=True)
class Detachment:
    """What :func:`detach` removed."""

    container: str
    host_ifname: str
    addresses: tuple[ipaddress.IPv4Interface, ...]  # removed from the container end
    link_removed: bool  # the veth pair is gone


@dataclass(frozen=True)
class ContainerNetns:
    """A resolved CONTAINER spec."""

    container: str  # the netns name if the namespace is named, else `path`
    path: str
    inode: int


# --- resolving containers ------------------------------------------------------------------


def _is_net_ns(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _named_netns(st: os.stat_result) -> str | None:
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except OSError:
        return None
    for name in names:
        try:
            other = os.stat(os.path.join(NETNS_RUN_DIR, name))
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return name
        except OSError:
            continue
    return None


def resolve(spec: str | int | os.PathLike[str]) -> ContainerNetns:
    """Resolve a CONTAINER spec (PID, netns path or ``ip netns`` name) to its namespace.

    A namespace that has an ``ip netns`` name is identified by it, with path
    /run/netns/NAME, however the spec named it; otherwise by the path. Raises
    ContainerError if it does not exist or is not a network namespace.
    """
    s = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if isinstance(spec, int) or (s.isascii() and s.isdigit()):
        path, what = f"/proc/{int(s)}/ns/net", f"process {s}"
    elif "/" in s:
        path, what = s, f"netns file {s}"
    elif s and s not in (".", ".."):
        path, what = os.path.join(NETNS_RUN_DIR, s), f"named netns {s!r}"
    else:
        raise ContainerError(f"invalid container spec {spec!r}")
    if "\0" in path:  # os.stat would raise ValueError, which no caller expects
        raise ContainerError(f"invalid container spec {spec!r}: a NUL byte")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ContainerError(f"container {what} does not exist ({path}: {e.strerror})") from e
    if not _is_net_ns(path):
        raise ContainerError(f"container {what}: {path} is not a network namespace")
    name = _named_netns(st)
    if name is not None:
        path = os.path.join(NETNS_RUN_DIR, name)
    return ContainerNetns(container=name or path, path=path, inode=st.st_ino)


def host_veth_name(inode: int) -> str:
    """The host-side veth name for the namespace with nsfs inode `inode`."""
    if inode < 36 ** _NAME_DIGITS:
        digits = ""
        for _ in range(_NAME_DIGITS):
            inode, r = divmod(inode, 36)
            digits = _B36[r] + digits
    else:  # a 64-bit inode: not decodable, list_attached then matches by nsid
        digits = hashlib.sha1(str(inode).encode()).hexdigest()[:_NAME_DIGITS]
    name = CONTAINER_VETH_PREFIX + digits
    assert len(name) <= IFNAMSIZ
    return name


def _inode_from_name(name: str) -> int | None:
    if not _HOST_VETH_RE.match(name):
        return None
    return int(name[len(CONTAINER_VETH_PREFIX):], 36)


# --- addresses --------------------------------------------------------------------------------


def _check_addresses(cidrs: IPv4Addrs) -> list[ipaddress.IPv4Interface]:
    out: list[ipaddress.IPv4Interface] = []
    for c in cidrs:
        try:
            iface = c if isinstance(c, ipaddress.IPv4Interface) else ipaddress.IPv4Interface(c)
        except (ValueError, TypeError) as e:
            raise ContainerError(f"bad address {c!r}: not an IPv4 address with prefix ({e})") from e
        ip, net = iface.ip, iface.network
        problem = None
        if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip == ipaddress.IPv4Address(
                "255.255.255.255") or ip in ipaddress.IPv4Network("240.0.0.0/4"):
            problem = "not a unicast host address"
        elif net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
            problem = f"the {'network' if ip == net.network_address else 'broadcast'} address of {net}"
        if problem:
            raise ContainerError(f"bad address {iface}: {problem}")
        if iface not in out:
            out.append(iface)
    return out


def _addresses(ipr: Any, index: int) -> list[ipaddress.IPv4Interface]:
    out = []
    for a in ipr.get_addr(family=socket.AF_INET, index=index):
        out.append(ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
    return sorted(out, key=lambda i: (i.ip, i.network.prefixlen))


def _add_address(ipr: Any, index: int, iface: ipaddress.IPv4Interface) -> None:
    kw: dict[str, Any] = {}
    if iface.network.prefixlen < 31:
        kw["broadcast"] = str(iface.network.broadcast_address)
    ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)


def _del_address(ipr: Any, index: int, iface: ipaddress.IPv4Interface) -> None:
    ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


# --- inside the container -------------------------------------------------------------------


@dataclass(frozen=True)
class _Inside:
    ifname: str
    mac: str
    addresses: tuple[ipaddress.IPv4Interface, ...]


def _gratuitous_arp(ifname: str, mac: str, ip: ipaddress.IPv4Address) -> None:
    hw = bytes.fromhex(mac.replace(":", ""))
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, ip.packed, b"\0" * 6, ip.packed)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        s.send(b"\xff" * 6 + hw + b"\x08\x06" + arp)


def _configure_inside(index: int, mtu: int, new: Sequence[ipaddress.IPv4Interface],
                      added: list[ipaddress.IPv4Interface], gso_max_size: int | None) -> _Inside:
    """In the container namespace: MTU, addresses, up, lo up, multicast route, ARP tuning.

    `added` collects the addresses this call added, for the caller's rollback.
    """
    with _iproute() as ipr:
        links = ipr.get_links(index)
        link = links[0]
        ifname = link.get_attr("IFLA_IFNAME")
        if link.get_attr("IFLA_MTU") != mtu:
            ipr.link("set", index=index, mtu=mtu)
        if gso_max_size is not None:
            ipr.link("set", index=index, gso_max_size=gso_max_size)
        present = set(_addresses(ipr, index))
        for iface in new:
            if iface not in present:
                _add_address(ipr, index, iface)
                added.append(iface)
        ipr.link("set", index=index, state="up")
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
        ipr.route("replace", dst=str(MULTICAST_ROUTE), oif=index, scope=RT_SCOPE_LINK)
        mac = link.get_attr("IFLA_ADDRESS")
        addresses = tuple(_addresses(ipr, index))
    for key, value in _ARP_TUNING.items():
        try:
            with open(f"/proc/sys/net/ipv4/neigh/{ifname}/{key}", "w") as f:
                f.write(value)
        except OSError as e:
            log.debug("could not set %s for %s: %s", key, ifname, e)
    for iface in added:
        try:
            _gratuitous_arp(ifname, mac, iface.ip)
        except OSError as e:
            log.debug("gratuitous ARP for %s on %s failed: %s", iface.ip, ifname, e)
    return _Inside(ifname=ifname, mac=mac, addresses=addresses)


def _inspect_inside(index: int) -> _Inside | None:
    with _iproute() as ipr:
        try:
            links = ipr.get_links(index)
        except NetlinkError:
            return None
        if not links or _link_kind(links[0]) != "veth":
            return None
        link = links[0]
        return _Inside(ifname=link.get_attr("IFLA_IFNAME"), mac=link.get_attr("IFLA_ADDRESS"),
                       addresses=tuple(_addresses(ipr, index)))


def _remove_inside(index: int, cidrs: Sequence[ipaddress.IPv4Interface] | None
                   ) -> tuple[list[ipaddress.IPv4Interface], int]:
    """Remove `cidrs` (those present) from the container end; returns (removed, left)."""
    with _iproute() as ipr:
        present = _addresses(ipr, index)
        targets = present if cidrs is None else [c for c in cidrs if c in present]
        for iface in targets:
            try:
                _del_address(ipr, index, iface)
            except NetlinkError as e:
                if e.code != errno.EADDRNOTAVAIL:
                    raise
        return list(targets), len(_addresses(ipr, index))


# --- host side -------------------------------------------------------------------------------


def _peer_nsid(ipr: Any, ns: ContainerNetns) -> int | None:
    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        reply = ipr.get_netnsid(fd=fd)
    finally:
        os.close(fd)
    nsid = reply.get("nsid") if reply else None
    return None if nsid is None or nsid < 0 else nsid


def _existing_veth(ipr: Any, name: str, ns: ContainerNetns) -> Any | None:
    """The host veth leading into `ns`, or None; ContainerError if `name` is taken by something else.

    Ours is called `name`. A container Weave Net attached has a host end named by a PID
    (``vethwepl<pid>``) that no inode gives back, so without ours the ``vethwepl*`` veths
    whose peer lives in `ns` are looked at: that one is adopted, not doubled.
    """
    link = _link_by_name(ipr, name)
    nsid = _peer_nsid(ipr, ns)
    if link is None:
        if nsid is None:  # no veth of the host leads into a namespace the host has no id for
            return None
        for other in ipr.get_links():
            if (_link_kind(other) == "veth" and other.get_attr("IFLA_LINK_NETNSID") == nsid
                    and other.get_attr("IFLA_IFNAME").startswith(CONTAINER_VETH_PREFIX)):
                return other
        return None
    peer = link.get_attr("IFLA_LINK_NETNSID")
    if _link_kind(link) != "veth" or peer is None or peer != nsid:
        raise ContainerError(f"host interface {name} exists but does not lead into container {ns.container} "
                             "(left over from something else? remove it or run weave reset)")
    return link


def _attach_host(ns: ContainerNetns, cidrs: list[ipaddress.IPv4Interface], bridge: str, mtu: int,
                 ifname: str, tx_checksum: bool, gso_max_size: int | None) -> Attachment:
    name = host_veth_name(ns.inode)
    if os.stat("/proc/thread-self/ns/net").st_ino == ns.inode:
        raise ContainerError(f"{ns.container} is the host's own namespace, not a container")
    with _iproute() as ipr:
        br = _link_by_name(ipr, bridge)
        if br is None or _link_kind(br) != "bridge":
            raise ContainerError(f"bridge {bridge!r} not present; is the router running?")
        link = _existing_veth(ipr, name, ns)
        created = link is None
        added: list[ipaddress.IPv4Interface] = []
        peer_index: int | None = None
        try:
            if created:
                fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    ipr.link("add", ifname=name, kind="veth", mtu=mtu,
                             peer={"ifname": ifname, "mtu": mtu, "net_ns_fd": fd})
                except NetlinkError as e:
                    if e.code == errno.EEXIST:
                        raise ContainerError(f"cannot attach {ns.container}: an interface named {ifname!r} "
                                             "already exists in the container") from e
                    raise
                finally:
                    os.close(fd)
                link = _link_by_name(ipr, name)
                if link is None:
                    raise ContainerError(f"veth {name} vanished while attaching {ns.container}")
            name = link.get_attr("IFLA_IFNAME")  # Weave's own name, for a container Weave attached
            index = link["index"]
            peer_index = link.get_attr("IFLA_LINK")
            if link.get_attr("IFLA_MTU") != mtu:
                ipr.link("set", index=index, mtu=mtu)
            if link.get_attr("IFLA_MASTER") != br["index"]:
                ipr.link("set", index=index, master=br["index"])
            ipr.link("set", index=index, state="up")
            if not tx_checksum:
                set_tx_checksum(name, False)
            inside = run_in_netns(ns.path, _configure_inside, peer_index, mtu, cidrs, added, gso_max_size)
            if not tx_checksum:
                set_tx_checksum(inside.ifname, False, netns=ns.path)
        except BaseException as e:
            _rollback(ipr, ns, name, created, added, peer_index)
            if isinstance(e, ContainerError):
                raise
            if isinstance(e, (NetlinkError, OSError, DriverError)):
                raise ContainerError(f"could not attach {ns.container}: {e}") from e
            raise
    att = Attachment(container=ns.container, netns=ns.path, host_ifname=name, mac=inside.mac,
                     addresses=inside.addresses, ifname=inside.ifname)
    if created or added:
        log.info("attached %s: %s (%s) on %s, %s", ns.container, name, att.mac, bridge,
                 ", ".join(map(str, att.addresses)) or "no addresses")
    return att


def _rollback(ipr: Any, ns: ContainerNetns, name: str, created: bool, added: list[ipaddress.IPv4Interface],
              peer_index: int | None) -> None:
    try:
        if created:
            link = _link_by_name(ipr, name)
            if link is not None:
                ipr.link("del", index=link["index"])
        elif added and peer_index is not None:
            run_in_netns(ns.path, _remove_inside, peer_index, list(added))
        log.info("rolled back attach of %s", ns.container)
    except Exception as e:  # the original error matters more
        log.error("rollback of attach %s failed: %s", ns.container, e)


def attach(container: str | int | os.PathLike[str], cidrs: IPv4Addrs, bridge: str = DEFAULT_BRIDGE,
           mtu: int = DEFAULT_MTU, ifname: str = DEFAULT_IFNAME, *, tx_checksum: bool = True,
           gso_max_size: int | None = None, netns: NetnsArg = None) -> Attachment:
    """Plug `container` into `bridge` with `cidrs` on its `ifname`; idempotent.

    Makes a veth pair: the host end on the bridge, up; the container end inside the
    namespace, named `ifname`, MTU `mtu`, addresses added (with a gratuitous ARP each),
    up, plus ``lo`` up and the route 224.0.0.0/4 dev `ifname`. Attaching again adds the
    missing addresses and returns the same Attachment. `tx_checksum=False` turns TX
    checksum offload off on both ends (see :func:`router.bridge.set_tx_checksum` for
    when), `gso_max_size` caps the container's super-frames. On any failure what this
    call made is removed again and ContainerError is raised.
    """
    if not ifname or len(ifname) > IFNAMSIZ:
        raise ContainerError(f"invalid interface name {ifname!r}")
    ns = resolve(container)
    addrs = _check_addresses(cidrs)
    try:
        return run_in_netns(netns, _attach_host, ns, addrs, bridge, mtu, ifname, tx_checksum, gso_max_size)
    except FileNotFoundError as e:
        raise ContainerError(f"host namespace {netns!r} does not exist") from e


def _detach_host(ns: ContainerNetns, cidrs: list[ipaddress.IPv4Interface] | None) -> Detachment:
    name = host_veth_name(ns.inode)
    with _iproute() as ipr:
        link = _existing_veth(ipr, name, ns)
        if link is None:
            return Detachment(ns.container, name, (), False)
        name = link.get_attr("IFLA_IFNAME")
        removed: list[ipaddress.IPv4Interface] = []
        left = 0
        if cidrs is not None:
            removed, left = run_in_netns(ns.path, _remove_inside, link.get_attr("IFLA_LINK"), cidrs)
        else:
            inside = run_in_netns(ns.path, _inspect_inside, link.get_attr("IFLA_LINK"))
            removed = list(inside.addresses) if inside else []
        link_removed = left == 0
        if link_removed:
            try:
                ipr.link("del", index=link["index"])
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
    log.info("detached %s: %s%s", ns.container, ", ".join(map(str, removed)) or "no addresses",
             f", removed {name}" if link_removed else "")
    return Detachment(ns.container, name, tuple(sorted(removed, key=lambda i: (i.ip, i.network.prefixlen))),
                      link_removed)


def detach(container: str | int | os.PathLike[str], cidrs: IPv4Addrs | None = None, *,
           missing_ok: bool = False, netns: NetnsArg = None) -> Detachment:
    """Remove `cidrs` from the container, or its whole veth when `cidrs` is None or none remain.

    Idempotent: addresses not present are ignored, a container that is not attached gives
    an empty Detachment. A container that does not exist raises ContainerError, unless
    `missing_ok` (a CNI DEL after the namespace went: its veth went with it).
    """
    try:
        ns = resolve(container)
    except ContainerError:
        if missing_ok:
            return Detachment(str(container), "", (), False)
        raise
    addrs = None if cidrs is None else _check_addresses(cidrs)
    try:
        return run_in_netns(netns, _detach_host, ns, addrs)
    except (NetlinkError, OSError) as e:
        raise ContainerError(f"could not detach {ns.container}: {e}") from e


# --- listing ---------------------------------------------------------------------------------


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _candidate_paths(with_fds: bool = False) -> dict[int, list[str]]:
    """Network namespace files we can open, by inode, best name first."""
    found: dict[int, list[str]] = {}

    def add(path: str) -> None:
        try:
            ino = os.stat(path).st_ino
        except OSError:
            return
        if path not in found.setdefault(ino, []):
            found[ino].append(path)

    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        mounts = []
    bind_mounts = []
    for fields in mounts:
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) > sep + 1 and fields[sep + 1] == "nsfs" and fields[3].startswith("net:["):
            bind_mounts.append(_unescape_mountinfo(fields[4]))
    # ip netns names first, then other bind mounts (Docker, CNI), then processes.
    for path in sorted(bind_mounts, key=lambda p: (os.path.dirname(p) != NETNS_RUN_DIR, p)):
        add(path)
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        add(f"/proc/{pid}/ns/net")
    if with_fds:
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("net:["):
                        add(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
    return found


def _container_id(path: str) -> str:
    if os.path.dirname(path) == NETNS_RUN_DIR:
        return os.path.basename(path)
    return path


def _list_host(bridge: str) -> list[tuple[str, int, int, int | None]]:
    """(host veth, its index, peer ifindex, peer nsid) for our veths on `bridge`."""
    with _iproute() as ipr:
        br = _link_by_name(ipr, bridge)
        if br is None or _link_kind(br) != "bridge":
            return []
        out = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if (link.get_attr("IFLA_MASTER") == br["index"] and _link_kind(link) == "veth"
                    and name.startswith(CONTAINER_VETH_PREFIX)):
                out.append((name, link["index"], link.get_attr("IFLA_LINK"),
                            link.get_attr("IFLA_LINK_NETNSID")))
        return out


def _name_hint(name: str) -> int | None:
    """The nsfs inode a host veth's name points at: ours encode it; Weave's (``vethwepl<pid>``)
    name a process whose namespace it probably is. The link-netnsid confirms either."""
    m = _WEAVE_VETH_RE.match(name)
    if m is not None:
        try:
            return os.stat(f"/proc/{int(m.group(1))}/ns/net").st_ino
        except OSError:
            pass
    return _inode_from_name(name)


def _nsids(paths: Iterable[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    with _iproute() as ipr:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                reply = ipr.get_netnsid(fd=fd)
            except NetlinkError:
                continue
            finally:
                os.close(fd)
            nsid = reply.get("nsid") if reply else None
            out[path] = None if nsid is None or nsid < 0 else nsid
    return out


def list_attached(bridge: str = DEFAULT_BRIDGE, *, netns: NetnsArg = None) -> list[Attachment]:
    """Containers attached to `bridge`, read back from the kernel (see the module docstring).

    Veths whose peer namespace cannot be found or opened are logged and skipped.
    """
    ports = run_in_netns(netns, _list_host, bridge)
    if not ports:
        return []
    candidates = _candidate_paths()
    by_name = {name: candidates[ino][0] for name, *_ in ports
               if (ino := _name_hint(name)) is not None and ino in candidates}
    nsid_of = run_in_netns(netns, _nsids, set(by_name.values()))
    by_nsid: dict[int, str] | None = None
    result: list[Attachment] = []
    for name, _index, peer_index, nsid in ports:
        path = by_name.get(name)
        if path is None or nsid is None or nsid_of.get(path) != nsid:
            path = None
            if by_nsid is None and nsid is not None:
                candidates = _candidate_paths(with_fds=True)
                firsts = [paths[0] for paths in candidates.values()]
                by_nsid = {v: p for p, v in run_in_netns(netns, _nsids, firsts).items() if v is not None}
            if by_nsid is not None and nsid is not None:
                path = by_nsid.get(nsid)
        if path is None:
            log.warning("list_attached: cannot find the namespace of %s (nsid %s)", name, nsid)
            continue
        try:
            inside = run_in_netns(path, _inspect_inside, peer_index)
        except OSError as e:
            log.warning("list_attached: cannot enter %s for %s: %s", path, name, e)
            continue
        if inside is None:
            log.warning("list_attached: %s: no veth %d in %s", name, peer_index, path)
            continue
        result.append(Attachment(container=_container_id(path), netns=path, host_ifname=name, mac=inside.mac,
                                 addresses=inside.addresses, ifname=inside.ifname))
    return sorted(result, key=lambda a: a.container)
