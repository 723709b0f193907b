"""The weaveDNS service: trio glue between the records, the mesh, the server and the API.

`DnsService` owns one `Nameserver` (the "nameserver" gossip channel) and one `DNSServer`
(UDP+TCP). Local changes are broadcast at once through the mesh; the full state goes out
with the mesh's own periodic gossip (`Mesh._periodic_gossip` calls `gossip()` on every
channel every 30 s) and to every new connection, so the service adds no timer for that.
Records of peers the topology garbage-collects are dropped (`Mesh.on_peers_removed`);
tombstones older than 30 minutes are purged by a timer. Our own live records are kept in
``$WEAVE_STATE_DIR/dns-entries.json`` and re-announced when the router restarts: a
restarted peer that forgot them would otherwise tombstone them everywhere (it overrides
entries that claim to be its own but that it does not hold).

Construct the service *before* starting the mesh: the channel is registered in the
constructor, so full-state gossip from the first connections is not lost to a surrogate.

Where the server listens (the decision)
---------------------------------------
Containers are network namespaces attached to the ``weave`` bridge; the host may or may
not have an address on that bridge ("exposed"), and several routers may share one machine,
each in its own network namespace, while all the ``weave`` bridges of the mesh form one
layer-2 segment through the overlay. Weave listens on the docker0 address, which we lack.

- The server listens on the link-local address ``169.254.53.1:53`` (`DNS_ADDRESS`), which
  the router adds to its ``weave`` bridge as a /32, scope link. Link-local space never
  clashes with the allocation range or with the underlay, and it is the same on every host,
  so it is a constant the attach code and the CLI can rely on.
- Each container gets ``169.254.53.1/32 dev ethwe scope link`` and a *permanent* neighbour
  entry mapping 169.254.53.1 to its own host's bridge MAC. All hosts hold the same address
  on one layer-2 segment, so an ARP request would be answered by every host in the mesh;
  the static entry keeps every container talking to its own host. The router pins the
  bridge MAC (sets it explicitly) so it cannot change as ports come and go.
- Replies must reach container addresses (e.g. 10.32.0.0/12) that an unexposed host has no
  route to. The router adds a policy rule ``from 169.254.53.1 lookup 6753`` whose table
  holds ``default dev weave scope link``: only packets sourced from the DNS address take
  it, so the host is not otherwise exposed, and strict rp_filter is satisfied too. This is
  why the server binds 169.254.53.1 rather than 0.0.0.0: a socket on 0.0.0.0 would answer
  from whatever source the main table picks, and an unexposed host has no route back.
  Exposed or not, the same path is used.
- Several routers on one machine do not collide: address, rule and table live in each
  router's own network namespace, and container resolv.conf files are per netns name.

Checked on this kernel with two "hosts" whose bridges shared one segment, both holding
169.254.53.1, one exposed and one not, rp_filter=1: each container got its own host's
answer; tests/test_dns_service.py checks the same path end to end (as root).
`--dns-listen-address` may name another address (tests use 127.0.0.x:0); then the
containers are told that address and the host is left alone. 0.0.0.0 (weaver's default in
Weave) is taken to mean 169.254.53.1 with the given port.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from router.mesh import Mesh
from router.peername import format_peer_name
from weavedns.answer import DEFAULT_DOMAIN, DEFAULT_TTL, in_domain
from weavedns.answer import fqdn as as_fqdn
from weavedns.records import Nameserver, NameserverGossip, broadcast_actions, name_key
from weavedns.server import DNSServer, make_server
from weavedns.upstream import DEFAULT_TIMEOUT
from weavedns.wire import CHANNEL, TOMBSTONE_TIMEOUT, Entry, format_addr

log = logging.getLogger(__name__)

__all__ = [
    "DNS_ADDRESS", "DNS_PORT", "DEFAULT_LISTEN", "DNS_RULE_PRIORITY", "DNS_ROUTE_TABLE", "BRIDGE",
    "CONTAINER_IFNAME", "ENTRIES_FILE", "ETC_NETNS", "DnsInputError", "BridgeMissing", "RouteSpec",
    "NeighbourSpec", "ContainerDnsConfig", "HostDnsSetup", "DnsService", "apply_host_setup",
    "remove_host_setup", "write_netns_resolv_conf", "remove_netns_resolv_conf", "normalise_hostname",
]

DNS_ADDRESS = "169.254.53.1"
DNS_PORT = 53
DEFAULT_LISTEN = f"{DNS_ADDRESS}:{DNS_PORT}"
DNS_RULE_PRIORITY = 6753
DNS_ROUTE_TABLE = 6753
BRIDGE = "weave"
CONTAINER_IFNAME = "ethwe"
ENTRIES_FILE = "dns-entries.json"
ETC_NETNS = Path("/etc/netns")
# Tombstones become purgeable TOMBSTONE_TIMEOUT after deletion; looking every minute means
# none outlives that by more than a minute (Weave looks every 30 min).
PURGE_INTERVAL = 60.0
BRIDGE_RETRY = 1.0

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_RT_SCOPE_LINK = 253


class DnsInputError(ValueError):
    """A request the DNS service refuses (bad IP, hostname, container); nothing changed."""


class BridgeMissing(OSError):
    """The bridge the DNS address belongs on does not exist (yet)."""


# ------------------------------------------------------------------ validation


def normalise_hostname(name: str, domain: str) -> str:
    """`name` as a fully-qualified hostname inside `domain`, or DnsInputError saying why not."""
    if not name or not name.strip():
        raise DnsInputError("missing hostname (fqdn)")
    full = as_fqdn(name)
    if len(full) > 254:
        raise DnsInputError(f"hostname {name!r} is longer than 253 characters")
    if full != "." and not all(_LABEL.fullmatch(lab) for lab in full[:-1].split(".")):
        raise DnsInputError(
            f"invalid hostname {name!r}: labels are 1-63 letters, digits, '-' or '_' and do not "
            "start or end with '-'"
        )
    if not in_domain(full, domain):
        raise DnsInputError(f"hostname {full!r} is not in the weaveDNS domain {domain!r}")
    return full


def _parse_ip(text: str) -> int:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        raise DnsInputError(f"invalid IPv4 address {text!r}") from None


def _check_container(container: str) -> str:
    if not container or container == "*" or any(c.isspace() or not c.isprintable() for c in container):
        raise DnsInputError(f"invalid container id {container!r}")
    return container


# ------------------------------------------------------------------ container side


@dataclass(frozen=True)
class RouteSpec:
    """`ip route replace <dst> dev <dev> scope <scope>` inside the container."""

    dst: str
    dev: str
    scope: str = "link"


@dataclass(frozen=True)
class NeighbourSpec:
    """`ip neigh replace <address> lladdr <lladdr> dev <dev> nud permanent` inside the container."""

    address: str
    lladdr: str
    dev: str


@dataclass(frozen=True)
class ContainerDnsConfig:
    """What a container needs to use weaveDNS; the attach code applies it after addressing."""

    nameserver: str
    search: str
    resolv_conf: str
    routes: tuple[RouteSpec, ...] = ()
    neighbours: tuple[NeighbourSpec, ...] = ()

    def ip_commands(self, netns: str) -> list[list[str]]:
        """The iproute2 commands that apply the routes and neighbours in named netns `netns`."""
        out = []
        for r in self.routes:
            out.append(["ip", "-n", netns, "route", "replace", r.dst, "dev", r.dev, "scope", r.scope])
        for n in self.neighbours:
            out.append(
                ["ip", "-n", netns, "neigh", "replace", n.address, "lladdr", n.lladdr, "dev", n.dev,
                 "nud", "permanent"]
            )
        return out


def _check_netns_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid network namespace name {name!r}")
    return name


def write_netns_resolv_conf(netns_name: str, text: str, etc_netns: Path = ETC_NETNS) -> Path:
    """Write /etc/netns/NAME/resolv.conf, which `ip netns exec NAME ...` bind-mounts on /etc/resolv.conf."""
    directory = etc_netns / _check_netns_name(netns_name)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "resolv.conf"
    tmp = directory / ".resolv.conf.tmp"
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def remove_netns_resolv_conf(netns_name: str, etc_netns: Path = ETC_NETNS) -> None:
    """Remove /etc/netns/NAME/resolv.conf, and the directory if nothing else is left in it."""
    directory = etc_netns / _check_netns_name(netns_name)
    (directory / "resolv.conf").unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass  # missing, or holds other files (hosts, ...)


# ------------------------------------------------------------------ host side


@dataclass(frozen=True)
class HostDnsSetup:
    """The DNS address on the bridge plus the policy route its replies take (see module docs)."""

    address: str = DNS_ADDRESS
    bridge: str = BRIDGE
    table: int = DNS_ROUTE_TABLE
    priority: int = DNS_RULE_PRIORITY


def apply_host_setup(setup: HostDnsSetup, netns: str | None = None) -> str:
    """Idempotently configure the host side; returns the (now pinned) bridge MAC.

    Blocking netlink: call it through trio.to_thread. Raises BridgeMissing if the bridge
    does not exist yet, OSError if the kernel refuses a step."""
    from router.netlink import IPRoute, NetlinkError

    try:
        with IPRoute(**({"netns": netns} if netns else {})) as ipr:
            found = ipr.link_lookup(ifname=setup.bridge)
            if not found:
                raise BridgeMissing(f"bridge {setup.bridge!r} does not exist")
            index = found[0]
            mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
            # An explicitly set MAC stops the bridge from taking the lowest port MAC; containers
            # hold it in a permanent neighbour entry.
            ipr.link("set", index=index, address=mac, state="up")
            ipr.addr("replace", index=index, address=setup.address, prefixlen=32, scope=_RT_SCOPE_LINK)
            ipr.route("replace", dst="0.0.0.0/0", oif=index, table=setup.table, scope=_RT_SCOPE_LINK)
            if not _our_rules(ipr, setup):
                ipr.rule("add", table=setup.table, priority=setup.priority, src=setup.address, src_len=32)
    except NetlinkError as exc:
        raise OSError(exc.code, f"weaveDNS: cannot set up {setup.address} on {setup.bridge}: {exc}") from exc
    log.info(
        "DNS address %s on bridge %s (mac %s); replies via rule %d, table %d",
        setup.address, setup.bridge, mac, setup.priority, setup.table,
    )
    return str(mac)


def remove_host_setup(setup: HostDnsSetup, netns: str | None = None) -> None:
    """Undo `apply_host_setup` (for `weave reset`); missing pieces are skipped."""
    from router.netlink import IPRoute, NetlinkError

    with IPRoute(**({"netns": netns} if netns else {})) as ipr:
        for _ in _our_rules(ipr, setup):
            ipr.rule("del", table=setup.table, priority=setup.priority, src=setup.address, src_len=32)
        found = ipr.link_lookup(ifname=setup.bridge)
        if found:
            for call in (
                lambda: ipr.route("del", dst="0.0.0.0/0", oif=found[0], table=setup.table),
                lambda: ipr.addr("del", index=found[0], address=setup.address, prefixlen=32),
            ):
                try:
                    call()
                except NetlinkError as exc:
                    log.debug("DNS host clean-up: %s", exc)


def _our_rules(ipr: Any, setup: HostDnsSetup) -> list[Any]:
    return [
        r for r in ipr.get_rules(family=2)
        if r.get_attr("FRA_PRIORITY") == setup.priority and r.get_attr("FRA_SRC") == setup.address
    ]


def _bridge_mac(bridge: str) -> str | None:
    try:
        return Path(f"/sys/class/net/{bridge}/address").read_text().strip() or None
    except OSError:
        return None


# ------------------------------------------------------------------ the service


@dataclass
class _Counters:
    local_changes: int = 0
    peers_gone: int = 0
    purged: int = 0


class DnsService:
    """weaveDNS for one router. See the module docstring for where it listens and why."""

    def __init__(
        self,
        mesh: Mesh,
        listen: str = DEFAULT_LISTEN,
        *,
        domain: str = DEFAULT_DOMAIN,
        ttl: int = DEFAULT_TTL,
        resolv_conf: str | None = "/etc/resolv.conf",
        state_dir: Path | str | None = None,
        enabled: bool = True,
        dns_address: str | None = None,
        manage_host: bool | None = None,
        bridge: str = BRIDGE,
        fallback_timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        purge_interval: float = PURGE_INTERVAL,
    ) -> None:
        """`listen` is host:port (port 0: any free port; host 0.0.0.0 or empty: DNS_ADDRESS).
        `dns_address` is what containers are told (default: the listen host). `manage_host`
        (default: when that address is link-local and is the one listened on) puts it on
        `bridge` with its reply route. `resolv_conf` None: no forwarding upstream."""
        self.mesh = mesh
        self.enabled = enabled
        self.domain = as_fqdn(domain)
        self.ttl = ttl
        self.purge_interval = purge_interval
        self.state_dir = Path(state_dir) if state_dir is not None else None
        host, _, port = listen.rpartition(":")
        if not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise ValueError(f"DNS listen address {listen!r} is not host:port")
        if host in ("", "0.0.0.0"):
            # A UDP socket on 0.0.0.0 answers from the source the main table picks, which the
            # container's resolver would not accept (see the module docstring).
            host = dns_address or DNS_ADDRESS
            log.info("weaveDNS: listening on %s:%s rather than on all addresses", host, port)
        ipaddress.IPv4Address(host)  # ValueError for a bad host
        self.listen_host = host
        self.listen_port = int(port)
        self.dns_address = str(ipaddress.IPv4Address(dns_address or host))
        if manage_host is None:
            manage_host = ipaddress.IPv4Address(self.dns_address).is_link_local and host == self.dns_address
        self.host_setup = HostDnsSetup(self.dns_address, bridge) if manage_host else None
        self.bridge = bridge
        self.counters = _Counters()
        self.nameserver = Nameserver(
            mesh.name, lambda name: name in mesh.peers, clock=clock, on_broadcast=self._broadcast
        )
        self.server: DNSServer = make_server(
            self.nameserver,
            f"{host}:{port}",
            domain=self.domain,
            ttl=ttl,
            resolv_conf=resolv_conf,
            effective_address=self.dns_address,
            fallback_timeout=fallback_timeout,
        )
        self._registered = False
        if enabled:
            mesh.add_channel(CHANNEL, self.nameserver)
            mesh.on_peers_removed.append(self._peers_removed)
            self._registered = True
            self._restore()

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Started once the server listens, or at once (with a warning)
        if the bridge for the DNS address does not exist yet; the server follows when it does."""
        if not self.enabled:
            log.info("weaveDNS disabled")
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._purge_loop)
                if self.host_setup is not None and not await self._try_host_setup(warn=True):
                    task_status.started()
                    while not await self._try_host_setup(warn=False):
                        await trio.sleep(BRIDGE_RETRY)
                    await nursery.start(self.server.run)
                else:
                    await nursery.start(self.server.run)
                    task_status.started()
        finally:
            self._detach()

    async def _try_host_setup(self, warn: bool) -> bool:
        assert self.host_setup is not None
        try:
            await trio.to_thread.run_sync(apply_host_setup, self.host_setup)
            return True
        except BridgeMissing:
            if warn:
                log.warning(
                    "bridge %r does not exist yet: weaveDNS will listen on %s once it does",
                    self.bridge, self.dns_address,
                )
            return False

    def _detach(self) -> None:
        if not self._registered:
            return
        self._registered = False
        if self.mesh.channels.get(CHANNEL) is self.nameserver:
            del self.mesh.channels[CHANNEL]
        if self._peers_removed in self.mesh.on_peers_removed:
            self.mesh.on_peers_removed.remove(self._peers_removed)

    async def _purge_loop(self) -> None:
        while True:
            await trio.sleep(self.purge_interval)
            self.purge_tombstones()

    def purge_tombstones(self) -> int:
        n = self.nameserver.purge_tombstones()
        if n:
            self.counters.purged += n
            log.info("purged %d DNS tombstones older than %d s", n, TOMBSTONE_TIMEOUT)
        return n

    # ------------------------------------------------------------ mesh glue

    def _broadcast(self, delta: NameserverGossip | None) -> None:
        actions = broadcast_actions(delta)
        if actions:
            self.mesh.send_actions(CHANNEL, actions)

    def _peers_removed(self, names: list[int]) -> None:
        for name in names:
            if self.nameserver.peer_gone(name):
                self.counters.peers_gone += 1

    def _local_change(self, delta: NameserverGossip | None) -> None:
        if delta is None:
            return
        self.counters.local_changes += 1
        self._broadcast(delta)
        self._save()

    # ------------------------------------------------------------ API

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise DnsInputError("weaveDNS is disabled (--no-dns)")

    def add(self, container: str, ip: str, fqdn: str) -> Entry:
        """Register `fqdn` -> `ip` for `container` (re-adding revives a deleted entry)."""
        self._require_enabled()
        container = _check_container(container)
        addr = _parse_ip(ip)
        hostname = normalise_hostname(fqdn, self.domain)
        delta = self.nameserver.add_entry(hostname, container, addr)
        entry = delta.entries[0]
        self._local_change(delta)
        return entry

    def remove(self, container: str | None, ip: str | None = None, fqdn: str | None = None) -> int:
        """Tombstone our live entries matching every given field (None or "*": any); returns
        how many. Hostnames match case-insensitively."""
        self._require_enabled()
        cid = None if container in (None, "*") else _check_container(container)
        addr = None if ip in (None, "*") else _parse_ip(ip)
        hostnames: list[str | None] = [None]
        if fqdn and fqdn != "*":
            wanted = name_key(normalise_hostname(fqdn, self.domain))
            matching = {e.hostname for e in self._ours() if name_key(e.hostname) == wanted}
            hostnames = [h for h in sorted(matching)]
            if not hostnames:
                return 0
        count = 0
        for hostname in hostnames:
            delta = self.nameserver.delete(hostname, cid, addr)
            if delta is not None:
                count += len(delta)
                self._local_change(delta)
        return count

    def container_died(self, container: str) -> int:
        """Tombstone every entry of `container` (it stopped); returns how many."""
        self._require_enabled()
        delta = self.nameserver.container_died(container)
        self._local_change(delta)
        return len(delta) if delta is not None else 0

    def lookup(self, name: str) -> list[str]:
        """Live addresses of `name` (a single label gets the domain appended), storage order."""
        if not name:
            return []
        full = as_fqdn(name) if "." in name.rstrip(".") else name.rstrip(".") + "." + self.domain
        return [format_addr(a) for a in self.nameserver.lookup(full)]

    def reverse(self, ip: str) -> str | None:
        """The hostname of the first live entry holding `ip`, or None."""
        return self.nameserver.hostname_for(_parse_ip(ip))

    def entries(self) -> list[Entry]:
        """Every entry of the mesh, tombstones included, in Weave's storage order."""
        return self.nameserver.entries()

    def local_entry_count(self) -> int:
        """Live entries we originated: the weave_dns_entries metric."""
        return self.nameserver.local_live_count()

    def _ours(self) -> list[Entry]:
        return [e for e in self.nameserver.entries() if e.origin == self.mesh.name and e.live]

    @property
    def dns_address_port(self) -> str:
        """host:port containers should query (the bound port once the server listens)."""
        port = self.server.address[1] if self.server.address is not None else self.listen_port
        return f"{self.dns_address}:{port}"

    def resolv_conf_for_container(self) -> str:
        search = self.domain.rstrip(".") or "."
        return (
            "# written by pyweave: weaveDNS\n"
            f"nameserver {self.dns_address}\n"
            f"search {search}\n"
            "options ndots:1\n"
        )

    def container_config(self, ifname: str = CONTAINER_IFNAME) -> ContainerDnsConfig:
        """The resolv.conf text plus the route and neighbour a container on `ifname` needs."""
        routes: tuple[RouteSpec, ...] = ()
        neighbours: tuple[NeighbourSpec, ...] = ()
        if self.host_setup is not None:
            routes = (RouteSpec(f"{self.dns_address}/32", ifname),)
            mac = _bridge_mac(self.bridge)
            if mac is not None:
                neighbours = (NeighbourSpec(self.dns_address, mac, ifname),)
            else:
                log.warning("bridge %r not found: container DNS gets no neighbour entry", self.bridge)
        return ContainerDnsConfig(
            self.dns_address, self.domain.rstrip("."), self.resolv_conf_for_container(), routes, neighbours
        )

    # ------------------------------------------------------------ status

    def report(self) -> dict[str, Any] | None:
        """The DNS section of /report (None when disabled: Weave omits it)."""
        if not self.enabled:
            return None
        forwarder = self.server.forwarder
        entries = [e.to_report() for e in self.nameserver.entries()]
        host = self.listen_host
        port = self.server.address[1] if self.server.address is not None else self.listen_port
        return {
            "Domain": self.domain,
            "Upstream": [h for h, _ in forwarder.servers()] if forwarder is not None else [],
            "Address": f"{host}:{port}",
            "TTL": self.ttl,
            # Go marshals the empty (nil) slice as null.
            "Entries": entries or None,
        }

    def status_summary(self) -> list[tuple[str, str]]:
        """The `Service: dns` block of `weave status`, as (label, value) lines."""
        rep = self.report()
        if rep is None:
            return []
        live = sum(1 for e in rep["Entries"] or () if e["Tombstone"] == 0)
        return [
            ("Service", "dns"),
            ("Domain", rep["Domain"]),
            ("Upstream", ", ".join(rep["Upstream"]) or "none"),
            ("TTL", str(rep["TTL"])),
            ("Entries", str(live)),
        ]

    def status_lines(self) -> list[str]:
        """`weave status dns`: one line per live entry, as Weave prints them."""
        suffix = "." + self.domain
        out = []
        for e in self.nameserver.entries():
            if not e.live:
                continue
            host = e.hostname[: -len(suffix)] if e.hostname.endswith(suffix) else e.hostname
            addr = format_addr(e.addr)
            out.append(f"{host:<12} {addr:<15} {e.container_id[:12]:>12} {format_peer_name(e.origin)}")
        return out

    # ------------------------------------------------------------ persistence

    @property
    def _entries_path(self) -> Path | None:
        return self.state_dir / ENTRIES_FILE if self.state_dir is not None else None

    def _save(self) -> None:
        path = self._entries_path
        if path is None:
            return
        data = [
            {"hostname": e.hostname, "container": e.container_id, "address": format_addr(e.addr)}
            for e in self._ours()
        ]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot save DNS entries to %s: %s", path, exc)

    def _restore(self) -> None:
        path = self._entries_path
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise ValueError("not a list")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return
        restored = 0
        for item in data:
            try:
                hostname = normalise_hostname(str(item["hostname"]), self.domain)
                delta = self.nameserver.add_entry(
                    hostname, _check_container(str(item["container"])), _parse_ip(str(item["address"]))
                )
            except (KeyError, TypeError, DnsInputError) as exc:
                log.warning("skipping saved DNS entry %r: %s", item, exc)
                continue
            self._broadcast(delta)
            restored += 1
        if restored:
            log.info("restored %d DNS entries from %s", restored, path)
