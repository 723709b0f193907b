"""What `weave status` and `/report` show about IPAM, in Weave's words and JSON shape."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipam_crdt.address import CIDR, ip_str
from ipam_crdt.conflicts import CONFLICT_STALE_AFTER, RANGE_REMEDY, SEED_REMEDY
from ipam_crdt.naming import peer_str

if TYPE_CHECKING:
    from ipam_crdt.allocator import Allocator


def status_line(alloc: Allocator) -> str:
    if not alloc.ring.is_empty():
        if not any(i.range.size > 0 and alloc.is_known(i.peer) for i in alloc.ring.all_range_info()):
            return "all IP ranges owned by unreachable peers - use 'rmpeer'"
        if alloc.pending_allocates:
            return "waiting for IP(s) to become available"
        return "ready"
    if alloc.awaiting_consensus and alloc.paxos is not None:
        st = alloc.paxos.status()
        if st.elector:
            return f"awaiting consensus (quorum: {st.quorum}, known: {st.known_nodes})"
        return "priming"
    return "idle"


def status_lines(alloc: Allocator) -> list[str]:
    lines = [status_line(alloc)]
    c = alloc.conflict
    if c is not None and alloc.now - c.last_seen < CONFLICT_STALE_AFTER:
        remedy = SEED_REMEDY if c.message.startswith("IP allocation was seeded") else RANGE_REMEDY
        lines.append(f"{c.message} - {remedy} (seen {c.count} times)")
    waiting = [o for o in alloc.pending_claims if o.on_host and not alloc.ring.is_empty()]
    owners = sorted({alloc.ring.owner(o.cidr.addr) for o in waiting} - {alloc.our_name})
    dead = [o for o in owners if not alloc.is_known(o)]
    if dead:
        names = ", ".join(peer_str(o) for o in dead)
        lines.append(
            f"{len(waiting)} address(es) in use on this host lie in ranges of unreachable peer(s) {names} "
            "- if that was this host under an earlier name, run 'weave rmpeer' for it here; "
            "never on another host, which would hand the addresses out again"
        )
    for failure in alloc.reclaim_failures:
        lines.append(f"address in use on this host refused by IPAM: {failure} - it may be in use twice")
    return lines


def report(alloc: Allocator, default_subnet: CIDR | None = None) -> dict[str, object]:
    paxos = None
    if alloc.awaiting_consensus and alloc.paxos is not None:
        st = alloc.paxos.status()
        paxos = {"Elector": st.elector, "KnownNodes": st.known_nodes, "Quorum": st.quorum}
    entries = [
        {
            "Token": ip_str(i.range.start),
            "Size": i.range.size,
            "Peer": peer_str(i.peer),
            "Nickname": alloc.nicknames.get(i.peer, ""),
            "IsKnownPeer": alloc.is_known(i.peer),
            "Version": i.version,
        }
        for i in alloc.ring.all_range_info()
    ]
    claims = [
        {"Ident": o.ident, "CIDR": {"Addr": ip_str(o.cidr.addr), "PrefixLen": o.cidr.prefix_len}}
        for o in alloc.pending_claims
    ]
    allocs = [f"{o.ident} {o.subnet}" for o in alloc.pending_allocates]
    return {
        "Paxos": paxos,
        "Range": str(alloc.universe),
        "RangeNumIPs": alloc.universe.size,
        "ActiveIPs": alloc.space.num_used(),
        "DefaultSubnet": str(default_subnet or alloc.universe),
        "Entries": entries or None,
        "PendingClaims": claims or None,
        "PendingAllocates": allocs or None,
    }
