"""Simulation of a whole IPAM mesh (pure cores, in-memory network).

Random allocations, releases, partitions (messages held back), heals, message loss,
crashes and restarts from the store, and rmpeer of peers that are gone for good.
Invariants: no address is ever owned by two idents anywhere; once messages flow all rings
agree, tile the range exactly, and every peer's space matches its part of the ring.

By default 24 seeds x 1500 steps per bootstrap mode (about 20 s); PYWEAVE_LONG_SIM=1
runs 100 seeds x 4000 steps (a few minutes).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest

from ipam_crdt.address import CIDR
from ipam_crdt.allocator import Allocated, AllocateFailed, ConsensusMode, ObserverMode, SeedMode
from ipam_crdt.store import OwnedData
from ipam_crdt.testing import SimNetwork
from router.peername import format_peer_name

LONG = os.environ.get("PYWEAVE_LONG_SIM") == "1"
SEEDS = range(100) if LONG else range(24)
STEPS = 4000 if LONG else 1500


@dataclass
class Stats:
    allocated: int = 0
    freed: int = 0
    restarts: int = 0
    partitions: int = 0
    removed: int = 0
    failed: int = 0


def owned_everywhere(net: SimNetwork) -> dict[str, dict[str, OwnedData]]:
    """Each peer's allocations: live ones from the allocator, crashed ones from their store."""
    out = {}
    for peer in net.peers.values():
        owned = peer.alloc.owned if peer.alloc is not None else peer.store.owned
        out[format_peer_name(peer.name)] = owned
    return out


def check_no_duplicates(net: SimNetwork) -> None:
    seen: dict[int, tuple[str, str]] = {}
    for peer, owned in owned_everywhere(net).items():
        for ident, data in owned.items():
            for cidr in data.cidrs:
                holder = (peer, ident)
                assert seen.setdefault(cidr.addr, holder) == holder, (
                    f"{cidr} owned by both {seen[cidr.addr]} and {holder}"
                )


def check_space_matches_ring(net: SimNetwork) -> None:
    for peer in net.up():
        a = peer.alloc
        assert a is not None
        ring_ranges = a.ring.owned_ranges()
        total = sum(r.size for r in ring_ranges)
        assert a.space.num_free() + a.space.num_used() == total
        for data in a.owned.values():
            for cidr in data.cidrs:
                assert a.space.is_used(cidr.addr)
                assert any(r.contains(cidr.addr) for r in ring_ranges), f"{cidr} outside our ring ranges"


def check_converged(net: SimNetwork) -> None:
    states = {p.alloc.ring.state() for p in net.up()}  # type: ignore[union-attr]
    assert len(states) == 1, "rings did not converge"
    ring = net.up()[0].alloc.ring  # type: ignore[union-attr]
    sizes = sum(i.range.size for i in ring.all_range_info())
    assert sizes == net.universe.size
    for peer in net.up():
        # Every peer's free count, as the ring tells everyone, is what its space says.
        a = peer.alloc
        assert a is not None
        assert sum(e.free for e in ring.entries if e.peer == peer.name) == a.space.num_free()


def run(seed: int, steps: int, consensus: bool) -> Stats:
    rng = random.Random(seed)
    universe = CIDR.parse("10.40.0.0/24")  # small, so peers run out and ask each other
    net = SimNetwork(universe, rng)
    names = [0x020000000000 + i for i in range(1, rng.randint(3, 6) + 1)]
    mode = ConsensusMode(len(names)) if consensus else SeedMode(tuple(names[:2]))
    for n in names:
        # Sometimes the last peer is an observer: it never votes and gets the ring given.
        observer = consensus and n == names[-1] and seed % 3 == 0
        net.add_peer(n, ObserverMode() if observer else mode)
    stats = Stats()
    idents: dict[int, list[str]] = {n: [] for n in names}
    counter = 0
    removable = len(names) - 2  # always keep two peers

    for step in range(steps):
        up = [p.name for p in net.up()]
        roll = rng.random()
        if roll < 0.45 and up:
            p = rng.choice(up)
            if idents[p] and rng.random() < 0.2:
                ident = rng.choice(idents[p])  # idempotent re-request
            else:
                counter += 1
                ident = f"c{counter}"
            subnet = universe if rng.random() < 0.8 else CIDR.parse(f"10.40.0.{rng.choice([0, 64, 128, 192])}/26")
            r = net.allocate(p, ident, subnet)
            if r.cidr is not None:
                stats.allocated += 1
                if ident not in idents[p]:
                    idents[p].append(ident)
        elif roll < 0.65 and up:
            p = rng.choice(up)
            owned = list(net.alloc(p).owned)
            if owned:
                ident = rng.choice(owned)
                net.call(p, lambda a, i=ident: a.free(i, now=net.now))
                stats.freed += 1
        elif roll < 0.70:
            if net.groups is None and len(up) > 1:
                rng.shuffle(up)
                cut = rng.randint(1, len(up) - 1)
                net.partition([up[:cut], up[cut:]])
                stats.partitions += 1
            else:
                net.heal()
        elif roll < 0.74 and up:
            p = rng.choice(up)
            net.crash(p)
            stats.restarts += 1
        elif roll < 0.78:
            down = [p.name for p in net.peers.values() if p.alloc is None]
            if down:
                net.restart(rng.choice(down))
        elif roll < 0.80 and removable > 0 and len(up) >= 3:
            # rmpeer is only safe when nobody holds newer news of the dead peer: heal,
            # let everything flow, then remove it for good and take its ranges over.
            net.heal()
            for p in [p.name for p in net.peers.values() if p.alloc is None]:
                net.restart(p)
            net.settle(3)
            if any(p.alloc.ring.is_empty() for p in net.up()):  # type: ignore[union-attr]
                continue  # no ring yet: removing electors could leave consensus out of reach
            gone = rng.choice([p.name for p in net.up()])
            net.remove(gone)
            heir = rng.choice([p.name for p in net.up()])
            net.rmpeer(heir, format_peer_name(gone))
            removable -= 1
            stats.removed += 1
        else:
            net.tick(rng.choice([1.0, 5.0]))
            if rng.random() < 0.5:
                net.gossip_round()
        net.deliver(max_messages=rng.randint(0, 30), drop_rate=0.05)
        check_no_duplicates(net)
        for peer in net.peers.values():
            for e in peer.events:
                if isinstance(e, Allocated):
                    stats.allocated += 1
                    if e.ident not in idents[peer.name]:
                        idents[peer.name].append(e.ident)
                elif isinstance(e, AllocateFailed):
                    stats.failed += 1
            peer.events.clear()
        if step % 50 == 0:
            check_space_matches_ring(net)

    # Everything flows again.
    net.heal()
    for p in [p.name for p in net.peers.values() if p.alloc is None]:
        net.restart(p)
    net.settle(6)
    net.settle(2)
    check_no_duplicates(net)
    check_space_matches_ring(net)
    check_converged(net)
    assert not net.errors, net.errors[:3]
    assert len(net.queue) == 0
    return stats


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("consensus", [True, False], ids=["consensus", "seed"])
def test_simulation(seed: int, consensus: bool) -> None:
    stats = run(seed, STEPS, consensus)
    # The run exercised what it claims to.
    assert stats.allocated > 20 and stats.freed > 5


def test_simulation_exercises_restarts_partitions_and_rmpeer() -> None:
    totals = Stats()
    for seed in range(4):
        s = run(1000 + seed, STEPS, consensus=seed % 2 == 0)
        for k in vars(totals):
            setattr(totals, k, getattr(totals, k) + getattr(s, k))
    assert totals.restarts > 0 and totals.partitions > 0 and totals.removed > 0
