"""Only current fastdp peers may send to the VXLAN port: an nftables source filter.

The kernel's VXLAN device decapsulates any datagram to its port with the right VNI and
hands the inner frame to the bridge, which learns the frame's source MAC behind the
VXLAN port (and the device learns it behind the outer source address). So junk from
anyone on the underlay could teach the bridge made-up MACs, or steer a container's
MAC to a stranger. Learning cannot simply be turned off: unicast to a container
behind a peer relies on the entries the device learns from that peer's traffic (the
static entries per peer are all-zero, i.e. flooding). Instead this table, pyweave's
own, drops UDP to the port unless it comes from a peer fastdp currently monitors::

    table inet pyweave_fastdp {
        set peers { type ipv4_addr; elements = { <peer IPs> } }
        chain input {
            type filter hook input priority filter - 10; policy accept;
            udp dport 6784 ip saddr != @peers drop
            meta nfproto ipv6 udp dport 6784 drop
        }
    }

The whole table is replaced in one nft transaction whenever the set of peers changes
(so no moment without it), and deleted when fastdp stops.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable

from fastdp.vxlan import DEFAULT_PORT, netns_context

TABLE = "pyweave_fastdp"
_TIMEOUT = 10.0


class FilterError(RuntimeError):
    """nft failed (or is missing); the message says why."""


NFT_MISSING = "nft is not installed"  # FilterError's message when there is no nft to run


def script(peer_ips: Iterable[str], port: int = DEFAULT_PORT) -> str:
    """The nft script that (re)creates the table for `peer_ips`."""
    ips = sorted({str(ipaddress.IPv4Address(ip)) for ip in peer_ips}, key=ipaddress.IPv4Address)
    if not 0 < port < 1 << 16:
        raise ValueError(f"bad port {port}")
    elements = f" elements = {{ {', '.join(ips)} }};" if ips else ""
    return "\n".join([
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f"  set peers {{ type ipv4_addr;{elements} }}",
        "  chain input {",
        "    type filter hook input priority filter - 10; policy accept;",
        f"    udp dport {port} ip saddr != @peers drop",
        f"    meta nfproto ipv6 udp dport {port} drop",
        "  }",
        "}",
    ]) + "\n"


def _nft(args: list[str], stdin: str | None, netns: str | None) -> subprocess.CompletedProcess[str]:
    # The child inherits the namespace of the thread that forks it.
    try:
        with netns_context(netns):
            return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True,
                                  timeout=_TIMEOUT)
    except FileNotFoundError:
        raise FilterError(NFT_MISSING) from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FilterError(f"nft: {e}") from None


def apply(peer_ips: Iterable[str], port: int = DEFAULT_PORT, netns: str | None = None) -> None:
    """Allow VXLAN to `port` from exactly `peer_ips` (IPv4). Raises FilterError."""
    result = _nft(["-f", "-"], script(peer_ips, port), netns)
    if result.returncode != 0:
        raise FilterError(f"nft: {result.stderr.strip() or 'failed'}")


def remove(netns: str | None = None) -> bool:
    """Delete the table; False if there was none (or nft could not run)."""
    try:
        return _nft(["delete", "table", "inet", TABLE], None, netns).returncode == 0
    except FilterError:
        return False


def allowed(netns: str | None = None) -> set[str] | None:
    """The peer IPs the table lets through, None if there is no table (tests, status)."""
    result = _nft(["list", "set", "inet", TABLE, "peers"], None, netns)
    if result.returncode != 0:
        return None
    text = result.stdout
    start = text.find("elements = {")
    if start < 0:
        return set()
    body = text[start + len("elements = {"):text.index("}", start)]
    return {part.strip() for part in body.replace("\n", " ").split(",") if part.strip()}
