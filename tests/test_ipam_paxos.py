"""Weave's gossiped single-value Paxos: steps, quorum, observers, and agreement under chaos."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam_crdt.paxos import (
    AcceptedValue,
    Node,
    NodeClaims,
    NodeID,
    Observer,
    ProposalID,
    quorum_for,
)

N1, N2, N3 = NodeID(1, 11), NodeID(2, 22), NodeID(3, 33)


def test_quorum_rules() -> None:
    assert [quorum_for(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    # Without consensus=N: (#targets + 1) / 2 + 1.
    assert [quorum_for(None, t) for t in (0, 1, 2, 3)] == [1, 2, 2, 3]


def test_proposal_order() -> None:
    assert ProposalID(1, N2).precedes(ProposalID(2, N1))
    assert ProposalID(1, N1).precedes(ProposalID(1, N2))
    assert ProposalID(1, NodeID(1, 1)).precedes(ProposalID(1, NodeID(1, 2)))
    assert not ProposalID(1, N1).precedes(ProposalID(1, N1))
    assert not ProposalID().valid and ProposalID(1, N1).valid


def test_quorum_of_one_agrees_at_once() -> None:
    node = Node(N1, quorum=1)
    node.propose()
    agreed = node.consensus()
    assert agreed is not None and agreed.value == (1,) and agreed.origin == ProposalID(1, N1)


def test_propose_needs_a_quorum() -> None:
    with pytest.raises(ValueError):
        Node(N1, quorum=0).propose()


def test_propose_uses_the_highest_round_seen() -> None:
    node = Node(N1, quorum=2)
    node.update({N2: NodeClaims(ProposalID(4, N2)), N3: NodeClaims(accepted=ProposalID(6, N3))})
    node.propose()
    assert node.knows[N1].promise == ProposalID(7, N1)


def test_update_keeps_the_later_claims() -> None:
    node = Node(N1, quorum=2)
    old = NodeClaims(ProposalID(1, N2))
    assert node.update({N2: old}) is True
    assert node.update({N2: old}) is False
    newer = NodeClaims(ProposalID(2, N2), ProposalID(2, N2), AcceptedValue((2,), ProposalID(2, N2)))
    assert node.update({N2: newer}) is True
    assert node.update({N2: old}) is False
    assert node.knows[N2] == newer


def test_two_of_three_agree_and_the_third_learns() -> None:
    n1, n2, n3 = Node(N1, 2), Node(N2, 2), Node(N3, 2)
    n1.propose()
    # n2 hears the proposal and promises.
    assert n2.update(n1.gossip_state()) and n2.think()
    assert n2.knows[N2].promise == ProposalID(1, N1)
    # n1 sees the quorum of promises and accepts with everyone it has heard of.
    assert n1.update(n2.gossip_state()) and n1.think()
    assert n1.knows[N1].accepted == ProposalID(1, N1)
    assert n1.knows[N1].accepted_val.value == (1, 2)
    assert n1.consensus() is None  # one acceptance is not a quorum
    # n2 accepts what its promised proposal carried: now there is consensus.
    n2.update(n1.gossip_state())
    assert n2.think()
    assert n2.consensus() == n1.knows[N1].accepted_val
    n3.update(n2.gossip_state())
    n3.think()
    assert n3.consensus() == AcceptedValue((1, 2), ProposalID(1, N1))


def test_a_later_proposer_keeps_an_accepted_value() -> None:
    n1 = Node(N1, 2)
    accepted_by_2 = NodeClaims(ProposalID(1, N2), ProposalID(1, N2), AcceptedValue((2, 9), ProposalID(1, N2)))
    n1.update({N2: accepted_by_2})
    n1.propose()  # round 2
    n1.update({N2: NodeClaims(ProposalID(2, N1), accepted_by_2.accepted, accepted_by_2.accepted_val)})
    assert n1.think()
    assert n1.knows[N1].accepted == ProposalID(2, N1)
    # Paxos safety: the value accepted earlier is carried on, with its original origin.
    assert n1.knows[N1].accepted_val == AcceptedValue((2, 9), ProposalID(1, N2))


def test_our_proposal_is_dropped_when_we_promise_a_later_one() -> None:
    n1 = Node(N1, 2)
    n1.propose()
    n1.update({N2: NodeClaims(ProposalID(5, N2)), N3: NodeClaims(ProposalID(1, N1))})
    assert n1.think()
    assert n1.knows[N1].promise == ProposalID(5, N2)
    assert not n1.knows[N1].accepted.valid


def test_observer_takes_no_part() -> None:
    obs = Observer()
    assert obs.gossip_state() is None and not obs.is_elector
    assert obs.update({N1: NodeClaims(ProposalID(1, N1))}) is False
    obs.propose()
    assert obs.think() is False and obs.consensus() is None
    assert obs.status().elector is False


def test_status() -> None:
    node = Node(N1, 3)
    node.update({N2: NodeClaims()})
    st_ = node.status()
    assert (st_.elector, st_.known_nodes, st_.quorum) == (True, 1, 3)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 7), st.floats(0.0, 0.6))
def test_agreement_under_random_gossip(seed: int, n: int, loss: float) -> None:
    """Safety always: every node that sees consensus sees the same value. Liveness once
    messages flow: all nodes reach it."""
    rng = random.Random(seed)
    quorum = n // 2 + 1
    nodes = [Node(NodeID(i + 1, rng.getrandbits(32)), quorum) for i in range(n)]
    agreed: set[AcceptedValue] = set()

    def exchange(lossy: bool) -> None:
        for a in nodes:
            for b in nodes:
                if a is not b and not (lossy and rng.random() < loss):
                    if b.update(a.gossip_state()):
                        b.think()
        for node in nodes:
            v = node.consensus()
            if v is not None:
                agreed.add(v)

    for _ in range(30):
        if rng.random() < 0.4:
            rng.choice(nodes).propose()
        exchange(lossy=True)
        assert len(agreed) <= 1
    # Proposals stop; gossip flows freely.
    for _ in range(4):
        exchange(lossy=False)
    if not agreed:
        nodes[0].propose()
        for _ in range(4):
            exchange(lossy=False)
    assert len(agreed) == 1
    assert all(node.consensus() in agreed for node in nodes)
    [value] = agreed
    assert len(value.value) >= quorum and set(value.value) <= {node.id.name for node in nodes}
