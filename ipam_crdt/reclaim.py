"""Reclaiming, at start-up, every address in use on this host (issue 12, defect 8).

A router must never lose track of an address in use on its host: not when its database
was written under another peer name (the peer-name file was lost, so it came back under a
new name), not when the database is gone, not after a crash. Two sources say what is in
use, and both are claimed in IPAM under the router's current name:

* the kernel: every container veth on the bridge and the addresses of its peer end in the
  container's namespace (:func:`scan_bridge`, the I/O part);
* the database: every allocation it holds, whatever peer name it was written under.

:func:`plan_claims` (the pure part) turns the two into one claim per address. The kernel
is the truth where they disagree: an address on a container's interface is claimed for
that container, even if the database gave it to another ident. The same address on two
containers of this host is a conflict no claim can settle: the router refuses to start
and says which containers to fix. The Weave Net migration (issue 13) uses the same two
functions on a host that ran Weave.

The claims become the allocator's pre-claims (`AllocatorConfig.pre_claims`), which never
expire: an address that cannot be claimed yet (no ring; its range owned by a peer that
is unreachable) keeps being tried. A range owned by one of this host's previous names
(from the database) is taken over by the current name as soon as the ring shows it and
that name is not a live peer; see `Allocator._try_claim`.

What is refused, and what is only reported:

* the same address on two containers of this host is known before the router starts,
  and no claim can make it right: the start is refused, naming the containers;
* an address whose range a *live* peer owns, and which that peer will not give up (it
  handed it out itself), can only be learnt once the mesh is up, after the start. The
  address is then in use on two hosts already; stopping this router would not undo
  that, and would cut off every other container here. So it is logged as an error and
  shown as a Problem in `weave status`, for the operator to detach one of the two;
* an address whose range an *unreachable* peer owns that is not a known previous name
  of this host (the database was lost too) stays claimed-in-waiting, and `weave status`
  says to `rmpeer` that name on this host, never on another one.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ipam_crdt.address import CIDR
from ipam_crdt.config import AllocatorConfig, PreClaim
from ipam_crdt.naming import peer_str
from ipam_crdt.store import OwnedData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PortAddresses:
    """One container on the bridge: its ident (as `weave attach` files it) and addresses."""

    container: str
    host_ifname: str
    addresses: tuple[CIDR, ...]


@dataclass
class ReclaimPlan:
    claims: list[PreClaim] = field(default_factory=list)
    # Addresses found on more than one container of this host: refuse to start.
    conflicts: list[str] = field(default_factory=list)
    # Database entries the kernel contradicts (ident, address): not claimed.
    superseded: list[tuple[str, CIDR]] = field(default_factory=list)


def plan_claims(ports: Iterable[PortAddresses], persisted: Mapping[str, OwnedData]) -> ReclaimPlan:
    """One claim for every address in use on the bridge or in the database; none twice.

    Ports are taken in container order, so the plan does not depend on the order the
    kernel listed them in; the conflict message names every holder of a shared address.
    """
    plan = ReclaimPlan()
    holder: dict[int, str] = {}
    shared: dict[int, list[str]] = {}
    for port in sorted(ports, key=lambda p: (p.container, p.host_ifname, p.addresses)):
        for cidr in port.addresses:
            first = holder.get(cidr.addr)
            if first is None:
                holder[cidr.addr] = port.container
                plan.claims.append(PreClaim(port.container, cidr, True))
            elif first != port.container:
                shared.setdefault(cidr.addr, [first]).append(port.container)
    for addr, who in sorted(shared.items()):
        plan.conflicts.append(
            f"address {ipaddress.IPv4Address(addr)} is on more than one container of this host "
            f"({', '.join(who)}): detach it from all but one"
        )
    for ident in sorted(persisted):
        data = persisted[ident]
        for cidr in data.cidrs:
            first = holder.get(cidr.addr)
            if first is None:
                holder[cidr.addr] = ident
                plan.claims.append(PreClaim(ident, cidr, data.is_container))
            elif first != ident:
                plan.superseded.append((ident, cidr))
    return plan


def reclaim_into(config: AllocatorConfig, ports: Sequence[PortAddresses]) -> ReclaimPlan:
    """Plan the claims for `ports` and `config.store`'s contents, and put them into `config`.

    The store is read as it is, whatever peer name it was written under (the allocator
    then discards data of another name; its addresses come back as these pre-claims), and
    a name other than ours becomes one of `config.previous_names`. The caller refuses to
    start when the plan has conflicts.
    """
    name, persisted = config.store.peek() if config.store is not None else (None, {})
    plan = plan_claims(ports, persisted)
    if plan.conflicts:
        return plan
    config.pre_claims = [*config.pre_claims, *plan.claims]
    if name is not None and name != config.our_name:
        config.previous_names = config.previous_names | {name}
        log.warning(
            "IPAM database was written by peer %s, we are %s (a lost peer-name file?): "
            "claiming its %d addresses under our name",
            peer_str(name), peer_str(config.our_name), sum(len(d.cidrs) for d in persisted.values()),
        )
        # Under our own name the allocator forgets these entries itself, and says so.
        for ident, cidr in plan.superseded:
            log.warning("IPAM database gives %s to %s, but another container uses it on this host",
                        cidr, ident)
    if plan.claims:
        log.info(
            "IPAM: reclaiming %d addresses in use on this host (%d containers on the bridge)",
            len(plan.claims), len(ports),
        )
    return plan


def ports_from_attachments(attachments: Iterable[object]) -> list[PortAddresses]:
    """`router.containers.Attachment`s as the planner takes them."""
    out = []
    for att in attachments:
        addrs = tuple(CIDR(int(a.ip), a.network.prefixlen) for a in att.addresses)  # type: ignore[attr-defined]
        out.append(PortAddresses(att.container, att.host_ifname, addrs))  # type: ignore[attr-defined]
    return out


def scan_bridge(bridge: str) -> list[PortAddresses]:
    """The containers on `bridge` and their addresses, read from the kernel (blocking).

    Uses `router.containers.list_attached`: each `vethwepl*` port of the bridge, its
    peer's namespace (found by the nsfs inode in the veth's name, or for a container Weave
    Net attached by the PID in it, confirmed by the link-netnsid) and the addresses on the
    peer end there. Weave's containers are thus claimed under their namespace like ours.
    """
    from router.containers import list_attached

    return ports_from_attachments(list_attached(bridge))


__all__ = [
    "PortAddresses", "ReclaimPlan", "plan_claims", "ports_from_attachments", "reclaim_into", "scan_bridge",
]
