"""`weave attach`, `weave detach`, `weave ps`: containers (network namespaces) on the bridge.

The daemon does the work, so that the CLI, the CNI plugin and the Docker plugin share
one path: the veth (router.containers), then the container's name in weaveDNS and the
resolver configuration `ip netns exec NAME ...` uses. Addresses are CIDRs given by the
caller, or allocated by IPAM (`net:default`, `net:CIDR`) when the daemon runs it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from router import containers
from router.bridge import DriverError, run_in_netns

log = logging.getLogger(__name__)


class AttachError(Exception):
    """A request that cannot be done; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Allocator(Protocol):
    """IPAM as attach uses it: `spec` is "net:default", "net:CIDR" or "ip:CIDR"."""

    async def allocate_for(self, ident: str, spec: str) -> ipaddress.IPv4Interface: ...

    async def release(self, ident: str, address: ipaddress.IPv4Interface | None) -> None: ...


@dataclass(frozen=True)
class AddressSpec:
    kind: str  # "ip" (a given CIDR) or "net" (allocate)
    value: str  # the CIDR, or "default"

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def parse_address(text: str) -> AddressSpec:
    """`CIDR`, `ip:CIDR`, `net:CIDR` or `net:default` (Weave's attach arguments)."""
    kind, sep, value = text.partition(":")
    if not sep:
        kind, value = "ip", text
    if kind == "net" and value == "default":
        return AddressSpec("net", "default")
    if kind not in ("ip", "net"):
        raise AttachError(f"{text!r}: expected CIDR, ip:CIDR, net:CIDR or net:default")
    try:
        if kind == "ip":
            iface = ipaddress.IPv4Interface(value)
            if "/" not in value:
                raise ValueError("a prefix length is required")
            return AddressSpec("ip", str(iface))
        return AddressSpec("net", str(ipaddress.IPv4Network(value, strict=False)))
    except ValueError as exc:
        raise AttachError(f"{text!r} is not a valid address: {exc}") from None


class IpamAllocator:
    """The IPAM service as attach uses it: container idents, CIDR specs."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def allocate_for(self, ident: str, spec: str) -> ipaddress.IPv4Interface:
        from ipam_crdt.service import IpamServiceError

        kind, _, value = spec.partition(":")
        try:
            if kind == "ip":
                await self.service.claim(ident, value)
                return ipaddress.IPv4Interface(value)
            subnet = None if value == "default" else value
            return ipaddress.IPv4Interface(str(await self.service.allocate(ident, subnet)))
        except IpamServiceError as exc:
            raise AttachError(f"{spec}: {exc}", exc.status_code) from None

    async def release(self, ident: str, address: ipaddress.IPv4Interface | None) -> None:
        from ipam_crdt.service import IpamServiceError

        try:
            await self.service.free(ident, str(address.ip) if address is not None else None)
        except IpamServiceError as exc:
            log.info("release of %s for %s: %s", address, ident, exc)


class Attacher:
    def __init__(
        self,
        bridge: str,
        mtu: int,
        dns: Any = None,
        ipam: Allocator | None = None,
        dns_domain: str = "weave.local.",
    ) -> None:
        self.bridge = bridge
        self.mtu = mtu
        self.dns = dns
        self.ipam = ipam
        self.dns_domain = dns_domain
        self._lock = trio.Lock()  # one attach/detach at a time: they read-modify the kernel
        # Attached containers: container -> its host veth, watched to notice containers
        # that die without a detach (their namespace deleted takes the veth with it).
        self._live: dict[str, str] = {}

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
        except DriverError as exc:
            raise AttachError(str(exc), 404 if "does not exist" in str(exc) else 400) from None

    async def attach(
        self, container: str, addresses: list[str], hostname: str = "", with_dns: bool = True
    ) -> containers.Attachment:
        specs = [parse_address(a) for a in addresses]
        ns = await self._run(containers.resolve, container)
        if not specs:
            if self.ipam is None:
                raise AttachError("no address given, and IPAM is off: give one, e.g. 10.32.1.1/12")
            specs = [AddressSpec("net", "default")]
        async with self._lock:
            cidrs: list[ipaddress.IPv4Interface] = []
            allocated: list[ipaddress.IPv4Interface] = []
            try:
                for spec in specs:
                    if spec.kind == "ip" and self.ipam is None:
                        cidrs.append(ipaddress.IPv4Interface(spec.value))
                        continue
                    if self.ipam is None:
                        raise AttachError(f"{spec}: allocating needs IPAM, which is off")
                    address = await self.ipam.allocate_for(ns.container, str(spec))
                    allocated.append(address)
                    cidrs.append(address)
                result = await self._run(containers.attach, ns.path, cidrs, self.bridge, self.mtu)
            except BaseException:
                if self.ipam is not None:
                    for address in allocated:
                        with trio.CancelScope(shield=True):
                            await self.ipam.release(ns.container, address)
                raise
            if self.dns is not None and with_dns:
                await self._dns_setup(ns, result, hostname)
        self._live[ns.container] = result.host_ifname
        log.info("attached %s: %s", ns.container, ", ".join(str(a) for a in result.addresses))
        return result

    async def _dns_setup(
        self, ns: containers.ContainerNetns, att: containers.Attachment, hostname: str
    ) -> None:
        from weavedns.service import write_netns_resolv_conf

        config = self.dns.container_config(att.ifname)
        try:
            await trio.to_thread.run_sync(run_in_netns, ns.path, _apply_dns_routes, config)
            if "/" not in ns.container:
                await trio.to_thread.run_sync(
                    write_netns_resolv_conf, ns.container, self.dns.resolv_conf_for_container()
                )
        except (OSError, DriverError) as exc:
            log.warning("attach %s: DNS set-up failed: %s", ns.container, exc)
        if hostname:
            fqdn = hostname if hostname.endswith(".") or "." in hostname else f"{hostname}.{self.dns_domain}"
            for address in att.addresses:
                try:
                    self.dns.add(ns.container, str(address.ip), fqdn)
                except ValueError as exc:
                    raise AttachError(f"hostname {hostname!r}: {exc}") from None

    async def detach(self, container: str, addresses: list[str]) -> containers.Detachment:
        specs = [parse_address(a) for a in addresses]
        for spec in specs:
            if spec.kind != "ip":
                raise AttachError(f"{spec}: detach takes addresses (CIDR), not networks")
        cidrs = [ipaddress.IPv4Interface(s.value) for s in specs] or None
        ns = await self._run(containers.resolve, container)
        async with self._lock:
            result = await self._run(containers.detach, ns.path, cidrs)
        if result.link_removed:
            self._live.pop(ns.container, None)
        if self.ipam is not None:
            for address in result.addresses:
                await self.ipam.release(ns.container, address)
        if self.dns is not None:
            if result.link_removed:
                self.dns.container_died(ns.container)
                if "/" not in ns.container:
                    from weavedns.service import remove_netns_resolv_conf

                    remove_netns_resolv_conf(ns.container)
            else:
                for address in result.addresses:
                    self.dns.remove(ns.container, str(address.ip))
        log.info("detached %s: %s", ns.container, ", ".join(str(a) for a in result.addresses) or "nothing")
        return result

    async def watch(
        self, interval: float = 1.0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Notice containers that went away without a detach: free their addresses and names."""
        try:
            for att in await self.ps():
                self._live[att.container] = att.host_ifname
        except DriverError as exc:
            log.warning("cannot list attached containers: %s", exc)
        task_status.started()
        while True:
            await trio.sleep(interval)
            if not self._live:
                continue
            links = await trio.to_thread.run_sync(_link_names)
            for container, veth in list(self._live.items()):
                if veth not in links:
                    async with self._lock:
                        if self._live.get(container) == veth:
                            del self._live[container]
                            await self._died(container)

    async def _died(self, container: str) -> None:
        log.info("container %s is gone (its interface went away): releasing addresses and names", container)
        if self.ipam is not None:
            await self.ipam.release(container, None)
        if self.dns is not None:
            self.dns.container_died(container)
            if "/" not in container:
                from weavedns.service import remove_netns_resolv_conf

                remove_netns_resolv_conf(container)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[list[containers.Attachment]]:
        """The containers attached now, with attach and detach held off until exit."""
        async with self._lock:
            yield await self.ps()

    async def ps(self) -> list[containers.Attachment]:
        return await trio.to_thread.run_sync(functools.partial(containers.list_attached, self.bridge))


def _link_names() -> set[str]:
    from router.netlink import IPRoute

    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _apply_dns_routes(config: Any) -> None:
    """In the container's netns: the route and fixed neighbour for the DNS address."""
    from router.netlink import IPRoute

    with IPRoute() as ipr:
        for r in config.routes:
            index = ipr.link_lookup(ifname=r.dev)[0]
            ipr.route("replace", dst=r.dst, oif=index, scope=r.scope if isinstance(r.scope, int) else 253)
        for n in config.neighbours:
            index = ipr.link_lookup(ifname=n.dev)[0]
            ipr.neigh("replace", dst=n.address, lladdr=n.lladdr, ifindex=index, state=0x80)  # NUD_PERMANENT


def handover_refusal(atts: list[containers.Attachment], shown: int = 5) -> str | None:
    """Why `DELETE /peer` must be refused while these containers are attached, or None."""
    if not atts:
        return None
    names = ", ".join(f"{a.container} ({' '.join(str(x) for x in a.addresses) or 'no address'})"
                      for a in atts[:shown])
    more = f" and {len(atts) - shown} more" if len(atts) > shown else ""
    return (f"{len(atts)} container(s) attached here would keep addresses other hosts could then "
            f"hand out: {names}{more}; detach them first ('weave reset' does)")


def attachment_lines(atts: list[containers.Attachment]) -> str:
    """`weave ps`: container, MAC, addresses."""
    lines = (f"{a.container} {a.mac} {' '.join(str(x) for x in a.addresses)}".rstrip() for a in atts)
    return "".join(f"{line}\n" for line in lines)


def handler(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint whose AttachError becomes a plain-text answer with the error's status."""

    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except AttachError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=exc.status)

    return wrapped


def attach_routes(attacher: Attacher) -> list[Route]:
    @handler
    async def post_attach(request: Request) -> Response:
        form = await request.form()
        container = str(form.get("container", ""))
        if not container:
            raise AttachError("container is required")
        att = await attacher.attach(
            container,
            [str(a) for a in form.getlist("addr")],
            hostname=str(form.get("hostname", "")),
            with_dns=str(form.get("without-dns", "")).lower() != "true",
        )
        return PlainTextResponse("".join(f"{a}\n" for a in att.addresses))

    @handler
    async def post_detach(request: Request) -> Response:
        form = await request.form()
        container = str(form.get("container", ""))
        if not container:
            raise AttachError("container is required")
        result = await attacher.detach(container, [str(a) for a in form.getlist("addr")])
        return PlainTextResponse("".join(f"{a}\n" for a in result.addresses))

    @handler
    async def get_ps(request: Request) -> Response:
        atts = await attacher.ps()
        if request.query_params.get("format") == "json":
            return JSONResponse(
                [
                    {"Container": a.container, "MAC": a.mac, "Addresses": [str(x) for x in a.addresses]}
                    for a in atts
                ]
            )
        return PlainTextResponse(attachment_lines(atts))

    return [
        Route("/attach", post_attach, methods=["POST"]),
        Route("/detach", post_detach, methods=["POST"]),
        Route("/ps", get_ps),
    ]
