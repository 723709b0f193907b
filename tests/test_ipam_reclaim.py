"""Reclaiming the addresses in use on a host at start-up (issue 12, defect 8).

The planner is pure: the containers on the bridge and the database's allocations in, one
claim per address out. The allocator then claims them under the current name, taking
over the ranges of the host's previous name (a lost peer-name file) before any other
peer can `rmpeer` that name and hand the addresses out again.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam_crdt.address import CIDR, ip_str
from ipam_crdt.allocator import AllocatorConfig, SeedMode
from ipam_crdt.config import PreClaim
from ipam_crdt.reclaim import PortAddresses, plan_claims, reclaim_into
from ipam_crdt.store import MemoryStore, OwnedData, SqliteStore
from ipam_crdt.testing import SimNetwork

UNIVERSE = CIDR.parse("10.40.0.0/16")
P1, P2, P3 = 0x020000000001, 0x020000000002, 0x020000000003

# Few addresses and idents, so that collisions (the interesting cases) are common.
addresses = st.integers(0, 12).map(lambda i: CIDR(UNIVERSE.network + 1 + i, 16))
idents = st.sampled_from(["c1", "c2", "c3", "weave:expose", "/proc/1/ns/net"])
ports_st = st.lists(
    st.builds(PortAddresses, idents, st.sampled_from(["vethwepl0000001", "vethwepl0000002"]),
              st.lists(addresses, max_size=3).map(tuple)),
    max_size=4,
)
persisted_st = st.dictionaries(idents, st.builds(OwnedData, st.booleans(), st.lists(addresses, max_size=3)),
                               max_size=4)


@settings(max_examples=300, deadline=None)
@given(ports_st, persisted_st)
def test_every_address_in_use_is_claimed_once(ports: list[PortAddresses], persisted: dict[str, OwnedData]) -> None:
    plan = plan_claims(ports, persisted)
    claimed = [c.cidr.addr for c in plan.claims]
    assert len(claimed) == len(set(claimed)), "an address claimed twice"
    on_bridge: dict[int, set[str]] = {}
    for p in ports:
        for c in p.addresses:
            on_bridge.setdefault(c.addr, set()).add(p.container)
    shared = {a for a, who in on_bridge.items() if len(who) > 1}
    assert len(plan.conflicts) == len(shared)
    for a in shared:
        assert any(ip_str(a) in msg for msg in plan.conflicts)
    in_use = set(on_bridge) | {c.addr for d in persisted.values() for c in d.cidrs}
    assert set(claimed) == in_use, "an address in use left unclaimed"
    by_addr = {c.cidr.addr: c for c in plan.claims}
    for a, who in on_bridge.items():
        assert by_addr[a].ident in who and by_addr[a].is_container  # the kernel wins over the database
    for ident, cidr in plan.superseded:
        assert by_addr[cidr.addr].ident != ident
    # The plan does not depend on the order the kernel listed the ports in.
    assert plan_claims(list(reversed(ports)), persisted).claims == plan.claims


def test_plan_examples() -> None:
    a, b, c = (CIDR.parse(f"10.40.0.{i}/16") for i in (1, 2, 3))
    ports = [PortAddresses("c2", "vethwepl2", (b,)), PortAddresses("c1", "vethwepl1", (a, c))]
    persisted = {"c1": OwnedData(True, [a]), "old": OwnedData(True, [b]), "weave:expose": OwnedData(False, [c]),
                 "gone": OwnedData(True, [CIDR.parse("10.40.0.9/16")])}
    plan = plan_claims(ports, persisted)
    assert plan.claims == [PreClaim("c1", a), PreClaim("c1", c), PreClaim("c2", b),
                           PreClaim("gone", CIDR.parse("10.40.0.9/16"))]
    assert plan.superseded == [("old", b), ("weave:expose", c)]
    assert not plan.conflicts
    twice = plan_claims([*ports, PortAddresses("c3", "vethwepl3", (b,))], {})
    assert twice.conflicts == ["address 10.40.0.2 is on more than one container of this host (c2, c3): "
                               "detach it from all but one"]


def _renamed_host(net: SimNetwork, old: int, new: int, ports: list[PortAddresses]) -> None:
    """`old` loses its peer-name file and comes back as `new`, on the same disk."""
    store = net.peers[old].store
    net.remove(old)

    def configure(config: AllocatorConfig) -> None:
        assert not reclaim_into(config, ports).conflicts

    net.add_peer(new, SeedMode((P1, P2)), store=store, configure=configure)


def test_renamed_host_takes_its_old_names_space_and_keeps_its_addresses() -> None:
    net = SimNetwork(UNIVERSE, random.Random(3))
    for p in (P1, P2):
        net.add_peer(p, SeedMode((P1, P2)))
    used = {f"c{i}": net.allocate(P2, f"c{i}").cidr for i in range(3)}
    api_only = net.allocate(P2, "no-interface").cidr  # in the database only
    net.settle()
    old_space = net.alloc(P2).space.num_free() + net.alloc(P2).space.num_used()
    ports = [PortAddresses(ident, f"vethwepl{i}", (cidr,)) for i, (ident, cidr) in enumerate(used.items())
             if cidr is not None]
    _renamed_host(net, P2, P3, ports)
    net.settle()

    new = net.alloc(P3)
    for ident, cidr in {**used, "no-interface": api_only}.items():
        assert new.lookup(ident) == [cidr], ident
    assert P2 not in new.ring.peer_names() and new.space.num_used() == 4
    assert sum(r.size for r in new.ring.owned_ranges()) == old_space
    # The others learn it by broadcast: `rmpeer` of the old name finds nothing left.
    assert net.alloc(P1).ring.owned_ranges(P2) == []
    assert net.rmpeer(P1, f"p{P2}") == 0
    taken = {cidr.addr for cidr in [*used.values(), api_only] if cidr is not None}
    for i in range(200):
        got = net.allocate(P1, f"after-{i}").cidr
        net.settle()
        assert got is None or got.addr not in taken


def test_old_name_still_live_is_not_taken_over_and_claims_keep_trying() -> None:
    net = SimNetwork(UNIVERSE, random.Random(4))
    for p in (P1, P2):
        net.add_peer(p, SeedMode((P1, P2)))
    cidr = net.allocate(P2, "c").cidr
    assert cidr is not None
    net.settle()

    def configure(config: AllocatorConfig) -> None:
        config.previous_names = frozenset({P2})  # says so, but P2 is up: not ours to take
        config.pre_claims = [PreClaim("c", cidr)]

    net.add_peer(P3, SeedMode((P1, P2)), configure=configure)
    net.settle()
    new = net.alloc(P3)
    assert new.ring.owned_ranges(P2) and new.lookup("c") == []
    # P2 handed it out itself and will not give it up: in use twice, said so in the status.
    assert new.reclaim_failures and not new.pending_claims
    assert "address in use on this host refused by IPAM: c: " in " ".join(new.status_lines())


def test_pre_claim_of_an_unreachable_owner_never_expires_and_is_reported() -> None:
    net = SimNetwork(UNIVERSE, random.Random(5))
    for p in (P1, P2):
        net.add_peer(p, SeedMode((P1, P2)))
    cidr = net.allocate(P2, "c").cidr
    assert cidr is not None
    net.settle()
    net.crash(P2)

    def configure(config: AllocatorConfig) -> None:
        config.pre_claims = [PreClaim("c", cidr)]  # no database: the old name is unknown

    net.add_peer(P3, SeedMode((P1, P2)), configure=configure)
    for _ in range(100):  # 500 s: far past allocate_timeout
        net.tick()
        net.settle()
    new = net.alloc(P3)
    assert [o.cidr for o in new.pending_claims] == [cidr]
    assert "run 'weave rmpeer' for it here" in " ".join(new.status_lines())
    # The remedy it names: rmpeer of the old name on this host; the claim then succeeds.
    assert net.rmpeer(P3, f"p{P2}") > 0
    assert new.lookup("c") == [cidr] and not new.pending_claims


def test_detach_before_the_claim_succeeds_drops_it() -> None:
    net = SimNetwork(UNIVERSE, random.Random(6))
    net.add_peer(P1, SeedMode((P1, P2)))

    def configure(config: AllocatorConfig) -> None:
        config.pre_claims = [PreClaim("c", CIDR.parse("10.40.200.1/16"))]  # P2's half; P2 never came

    net.add_peer(P3, SeedMode((P1, P2)), configure=configure)
    net.settle()
    new = net.alloc(P3)
    assert new.pending_claims
    new.free("c")  # the watch noticed the container go
    assert not new.pending_claims


def test_persisted_entry_contradicted_by_the_bridge_is_forgotten(tmp_path: Path) -> None:
    net = SimNetwork(UNIVERSE, random.Random(7))
    store = MemoryStore()
    a = net.add_peer(P1, SeedMode((P1,)), store=store)
    cidr = a.allocate("stale-ident", UNIVERSE).cidr
    assert cidr is not None

    def configure(config: AllocatorConfig) -> None:
        assert not reclaim_into(config, [PortAddresses("real", "vethwepl1", (cidr,))]).conflicts

    net.peers[P1].configure = configure
    again = net.restart(P1)
    assert again.lookup("real") == [cidr] and again.lookup("stale-ident") == []


def test_store_peek_reads_whatever_name_wrote_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    assert store.peek() == (None, {})
    store.save_owned("c1", OwnedData(True, [CIDR.parse("10.40.0.1/16")]))
    store.save_ring(P2, __import__("ipam_crdt.ring", fromlist=["Ring"]).Ring(
        UNIVERSE.range().start, UNIVERSE.range().end, P2))
    assert store.peek() == (P2, {"c1": OwnedData(True, [CIDR.parse("10.40.0.1/16")])})
    store.close()


def test_service_refuses_to_start_on_an_address_used_twice(tmp_path: Path) -> None:
    from ipam_crdt.service import IpamConfigError, IpamService, IpamSettings
    from router.mesh import Mesh, MeshConfig
    from router.peername import random_peer_name

    mesh = Mesh(MeshConfig(name=random_peer_name(), nickname="x", port=0, host="127.0.0.1"))
    twice = CIDR.parse("10.40.0.7/16")
    ports = [PortAddresses("c1", "vethwepl1", (twice,)), PortAddresses("c2", "vethwepl2", (twice,))]
    with pytest.raises(IpamConfigError, match=r"10\.40\.0\.7 is on more than one container .*\(c1, c2\)"):
        IpamService(mesh, IpamSettings("10.40.0.0/16", "consensus=1"), tmp_path, host_ports=ports)
    # The database was closed again: a retry can open it.
    IpamService(mesh, IpamSettings("10.40.0.0/16", "consensus=1"), tmp_path, host_ports=ports[:1]).close()
