"""`weave expose` / `weave hide`: give the host an address on the weave network.

The bridge gets an address (from IPAM as the container "weave:expose", or the CIDR
given), so the host reaches containers; and NAT (nftables, table `ip pyweave`)
masquerades container traffic leaving the range, and host traffic entering it, as
Weave's expose does. IP forwarding is switched on, which leaving the range needs.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from pathlib import Path

import trio
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from router.attach import AttachError, IpamAllocator, handler, parse_address

log = logging.getLogger(__name__)

EXPOSE_IDENT = "weave:expose"
NFT_TABLE = "pyweave"


def nat_script(bridge: str, ranges: list[ipaddress.IPv4Network]) -> str:
    """The whole `ip pyweave` table: replaced in one nft transaction."""
    lines = [f"table ip {NFT_TABLE} {{}}", f"delete table ip {NFT_TABLE}", f"table ip {NFT_TABLE} {{"]
    lines.append("  chain postrouting {")
    lines.append("    type nat hook postrouting priority srcnat; policy accept;")
    for net in ranges:
        lines.append(f'    ip saddr {net} ip daddr != {net} oifname != "{bridge}" masquerade')
        lines.append(f'    ip saddr != {net} ip daddr {net} oifname "{bridge}" masquerade')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nft(script: str) -> None:
    result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise AttachError(f"nftables: {result.stderr.strip() or 'nft failed'}", 500)


def remove_nat() -> None:
    subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], capture_output=True, timeout=10)


def _bridge_addresses(bridge: str) -> list[ipaddress.IPv4Interface]:
    from router.netlink import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=bridge)
        if not index:
            raise AttachError(f"bridge {bridge} does not exist", 500)
        return [
            ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(index=index[0], family=2)
            if a["scope"] == 0  # global: not the link-local DNS address
        ]


def _set_address(bridge: str, iface: ipaddress.IPv4Interface, add: bool) -> None:
    from router.netlink import IPRoute, NetlinkError

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=bridge)[0]
        what = "add" if add else "del"
        try:
            ipr.addr(what, index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code not in (17, 99):  # EEXIST on add, EADDRNOTAVAIL on delete
                raise AttachError(f"{what} {iface} on {bridge}: {exc}", 500) from None


class Exposer:
    def __init__(self, bridge: str, ipam: IpamAllocator | None) -> None:
        self.bridge = bridge
        self.ipam = ipam
        self._lock = trio.Lock()

    async def expose(self, addresses: list[str]) -> list[ipaddress.IPv4Interface]:
        specs = [parse_address(a) for a in addresses] or [parse_address("net:default")]
        async with self._lock:
            added = []
            for spec in specs:
                if self.ipam is not None:
                    iface = await self.ipam.allocate_for(EXPOSE_IDENT, str(spec))
                elif spec.kind == "ip":
                    iface = ipaddress.IPv4Interface(spec.value)
                else:
                    raise AttachError(f"{spec}: allocating needs IPAM, which is off; give a CIDR")
                await trio.to_thread.run_sync(_set_address, self.bridge, iface, True)
                added.append(iface)
            await self._sync_nat()
        log.info("exposed: %s", ", ".join(str(a) for a in added))
        return added

    async def hide(self, addresses: list[str]) -> list[ipaddress.IPv4Interface]:
        async with self._lock:
            current = await trio.to_thread.run_sync(_bridge_addresses, self.bridge)
            wanted = {ipaddress.IPv4Interface(parse_address(a).value) for a in addresses} or None
            removed = [a for a in current if wanted is None or a in wanted]
            for iface in removed:
                await trio.to_thread.run_sync(_set_address, self.bridge, iface, False)
                if self.ipam is not None:
                    await self.ipam.release(EXPOSE_IDENT, iface)
            await self._sync_nat()
        log.info("hidden: %s", ", ".join(str(a) for a in removed) or "nothing")
        return removed

    async def _sync_nat(self) -> None:
        nets = sorted({a.network for a in await trio.to_thread.run_sync(_bridge_addresses, self.bridge)})
        if nets:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            await trio.to_thread.run_sync(_nft, nat_script(self.bridge, nets))
        else:
            await trio.to_thread.run_sync(remove_nat)


def expose_routes(exposer: Exposer) -> list[Route]:
    @handler
    async def post_expose(request: Request) -> Response:
        form = await request.form()
        added = await exposer.expose([str(a) for a in form.getlist("addr")])
        return PlainTextResponse("".join(f"{a}\n" for a in added))

    @handler
    async def post_hide(request: Request) -> Response:
        form = await request.form()
        removed = await exposer.hide([str(a) for a in form.getlist("addr")])
        return PlainTextResponse("".join(f"{a}\n" for a in removed))

    return [Route("/expose", post_expose, methods=["POST"]), Route("/hide", post_hide, methods=["POST"])]
