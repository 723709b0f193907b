"""Single-value Paxos over gossip, used to agree on the peers that seed the ring.

Every node gossips what it knows of every node's claims (its promise and what it has
accepted); receiving gossip merges claims, keeping the later proposal. A node "thinks"
after each merge: it promises the highest proposal it has seen; if its own proposal is
promised by a quorum it accepts it (with the best value accepted earlier, or else the
names of every node it has heard from); and it accepts whatever value was accepted for
the proposal it promised. Consensus is a quorum of nodes that accepted values from the
same proposal. Observers take no part: they never vote and gossip no claims.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class NodeID:
    """A peer incarnation: the UID changes on restart, so promises are never forgotten."""

    name: int = 0
    uid: int = 0


@dataclass(frozen=True)
class ProposalID:
    # Round 0 is "no proposal" and precedes every real one.
    round: int = 0
    proposer: NodeID = NodeID()

    def precedes(self, other: ProposalID) -> bool:
        return (self.round, self.proposer.name, self.proposer.uid) < (
            other.round,
            other.proposer.name,
            other.proposer.uid,
        )

    @property
    def valid(self) -> bool:
        return self.round > 0


@dataclass(frozen=True)
class AcceptedValue:
    value: tuple[int, ...] = ()
    # The proposal that picked the value: comparing origins compares values.
    origin: ProposalID = ProposalID()


@dataclass(frozen=True)
class NodeClaims:
    promise: ProposalID = ProposalID()
    accepted: ProposalID = ProposalID()
    accepted_val: AcceptedValue = AcceptedValue()

    def same(self, other: NodeClaims) -> bool:
        return (
            self.promise == other.promise
            and self.accepted == other.accepted
            and self.accepted_val.origin == other.accepted_val.origin
        )


GossipState = dict[NodeID, NodeClaims]


@dataclass(frozen=True)
class PaxosStatus:
    elector: bool
    known_nodes: int = 0
    quorum: int = 0


class Participant:
    """The interface the allocator uses; `Node` votes, `Observer` does not."""

    is_elector = False

    def gossip_state(self) -> GossipState | None:
        return None

    def update(self, incoming: Mapping[NodeID, NodeClaims]) -> bool:
        return False

    def set_quorum(self, quorum: int) -> None:
        pass

    def propose(self) -> None:
        pass

    def think(self) -> bool:
        return False

    def consensus(self) -> AcceptedValue | None:
        return None

    def status(self) -> PaxosStatus:
        return PaxosStatus(elector=False)


class Observer(Participant):
    pass


@dataclass
class Node(Participant):
    id: NodeID
    quorum: int
    knows: GossipState = field(default_factory=dict)

    is_elector = True

    def gossip_state(self) -> GossipState:
        return dict(self.knows)

    def set_quorum(self, quorum: int) -> None:
        self.quorum = quorum

    def update(self, incoming: Mapping[NodeID, NodeClaims]) -> bool:
        """Merge what another node knows into what we know; True if we learned something."""
        changed = False
        for node, theirs in incoming.items():
            ours = self.knows.get(node)
            if ours is None:
                self.knows[node] = theirs
                changed = True
                continue
            promise, accepted, value = ours.promise, ours.accepted, ours.accepted_val
            if promise.precedes(theirs.promise):
                promise = theirs.promise
                changed = True
            if accepted.precedes(theirs.accepted):
                accepted, value = theirs.accepted, theirs.accepted_val
                changed = True
            self.knows[node] = NodeClaims(promise, accepted, value)
        return changed

    def propose(self) -> None:
        """The Prepare step: gossip a proposal numbered above every round seen so far."""
        if self.quorum <= 0:
            raise ValueError("Paxos propose() needs a quorum")
        highest = max((max(c.promise.round, c.accepted.round) for c in self.knows.values()), default=0)
        ours = self.knows.get(self.id, NodeClaims())
        self.knows[self.id] = NodeClaims(ProposalID(highest + 1, self.id), ours.accepted, ours.accepted_val)
        if self.quorum == 1:
            self.think()

    def think(self) -> bool:
        """Run the Promise / Accept-request / Accepted steps; True if our claims changed."""
        before = self.knows.get(self.id, NodeClaims())
        promise, accepted, value = before.promise, before.accepted, before.accepted_val

        for claims in self.knows.values():
            if promise.precedes(claims.promise):
                promise = claims.promise

        # Our proposal is only in the running while it is also our promise: anyone who
        # heard of a later promise would not accept it anyway.
        if promise.proposer == self.id:
            promisers = [c for c in self.knows.values() if c.promise == promise]
            if len(promisers) >= self.quorum:
                best = ProposalID()
                best_value = AcceptedValue()
                for c in promisers:
                    if best.precedes(c.accepted):
                        best, best_value = c.accepted, c.accepted_val
                if not best.valid:
                    best_value = AcceptedValue(self._pick_value(), promise)
                accepted, value = promise, best_value

        for claims in self.knows.values():
            if claims.accepted == promise:
                accepted, value = claims.accepted, claims.accepted_val
                break

        after = NodeClaims(promise, accepted, value)
        if after.same(before):
            return False
        self.knows[self.id] = after
        return True

    def _pick_value(self) -> tuple[int, ...]:
        # Every node we have heard from: at least a quorum, enough to seed the ring.
        return tuple(sorted({node.name for node in self.knows}))

    def consensus(self) -> AcceptedValue | None:
        counts: dict[ProposalID, int] = {}
        for claims in self.knows.values():
            if claims.accepted.valid:
                origin = claims.accepted_val.origin
                counts[origin] = counts.get(origin, 0) + 1
                if counts[origin] >= self.quorum:
                    return claims.accepted_val
        return None

    def status(self) -> PaxosStatus:
        return PaxosStatus(elector=True, known_nodes=len(self.knows), quorum=self.quorum)


def quorum_for(initial_peer_count: int | None, target_count: int = 0) -> int:
    """Weave's quorum: N/2+1 for `consensus=N`, else (#targets+1)/2+1."""
    if initial_peer_count is not None and initial_peer_count > 0:
        return initial_peer_count // 2 + 1
    return (target_count + 1) // 2 + 1
