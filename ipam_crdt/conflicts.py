"""Rings that cannot be merged: which one to keep, and what to tell the operator.

Two rings seeded by different peers (weave#3908) cannot merge. Weave reports the error on
every exchange until an operator resets one side. We resolve it automatically when that
loses nothing: a peer whose ring holds no allocations gives it up for the other one. So
that two unused rings do not swap forever, both sides use the same order: a ring in use
beats an unused one, else the one with the smaller seed list wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipam_crdt.ring import Ring

# A conflict not seen again for this long no longer shows in the status.
CONFLICT_STALE_AFTER = 120.0

SEED_REMEDY = (
    "this peer and others formed separate IP allocation rings; to recover, on the peers "
    "of one side run 'weave reset' (or delete the IPAM database in the state directory) "
    "and start them again"
)
RANGE_REMEDY = "every peer must be started with the same --ipalloc-range"


@dataclass(frozen=True)
class SeedConflict:
    """Our ring and a peer's ring were seeded differently (weave#3908), or cover
    different ranges: kept (one at a time) for the status until it goes stale."""

    peer: int
    message: str
    first_seen: float
    last_seen: float
    count: int = 1


def preferred(a: Ring, b: Ring) -> bool:
    """Whether to keep ring a over a differently seeded ring b: a ring in use beats an
    unused one, else the smaller seed list wins. Both sides decide alike."""
    used_a, used_b = ring_used(a), ring_used(b)
    if used_a != used_b:
        return used_a
    return sorted(a.seeds) < sorted(b.seeds)


def ring_used(ring: Ring) -> bool:
    """Whether a ring's free counts show any address in use (as its owners last said)."""
    for i, e in enumerate(ring.entries):
        nxt = ring.entries[i + 1].token if i + 1 < len(ring.entries) else ring.entries[0].token
        size = nxt - e.token if nxt > e.token else (ring.end - e.token) + (nxt - ring.start)
        if e.free < size:
            return True
    return False
