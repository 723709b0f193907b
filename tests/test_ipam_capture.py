"""IPAM against real Weave 2.8 traffic: every IPallocation message of ipam-dns.pcap.

The capture (captures/README.md): three routers wv1..wv3 with consensus=3 on 10.40.0.0/16.
Paxos agrees on [wv1, wv3]; wv1 allocates two addresses in its own half; wv2 owns nothing
and asks wv3 twice for space, getting 10.40.192.0/18 and then 10.40.160.0/19.
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam_crdt import wire
from ipam_crdt.address import CIDR, Range, parse_ip
from ipam_crdt.allocator import Allocator, AllocatorConfig, ConsensusMode
from ipam_crdt.paxos import AcceptedValue, Node, NodeClaims, NodeID, ProposalID
from ipam_crdt.ring import Entry, Ring
from ipam_crdt.space import Space
from ipam_crdt.store import MemoryStore, OwnedData
from router.errors import WireError
from router.gob import BYTES, STRING, UINT, decode_all, encode_stream
from router.gossip_api import SendUnicast
from tests.captures import CAPTURE_DIR, capture_path, tcp_streams
from tests.golden import IPAM_PAYLOAD_WV2

WV1, WV2, WV3 = 0x029900000001, 0x029900000002, 0x029900000003
ADDR = {"10.201.0.1": WV1, "10.201.0.2": WV2, "10.201.0.3": WV3}
UNIVERSE = CIDR.parse("10.40.0.0/16")
NOW = 1795241051


@dataclass
class IpamMessage:
    tag: int  # 4 gossip, 5 unicast, 6 broadcast
    src: int  # the sender named in the envelope
    dst: int | None  # unicast only
    hop_from: int  # the TCP sender
    hop_to: int
    body: bytes  # the whole gossip body (envelope + payload)
    payload: bytes


def _frames(data: bytes) -> list[bytes]:
    pos, out = 8, []  # 7-byte protocol header and the encryption flag byte
    while pos + 4 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    assert pos == len(data)
    return out[1:]  # the first frame is the feature map


@pytest.fixture(scope="module")
def messages() -> list[IpamMessage]:
    out = []
    for stream in tcp_streams("ipam-dns.pcap"):
        for f in _frames(stream.data):
            if f[0] not in (4, 5, 6):
                continue
            values = decode_all(f[1:])
            if values[0] != wire.CHANNEL:
                continue
            dst = values[2] if f[0] == 5 else None
            out.append(IpamMessage(f[0], values[1], dst, ADDR[stream.src[0]], ADDR[stream.dst[0]], f[1:], values[-1]))
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    capture_path("ipam-dns-report.json")
    return json.loads((CAPTURE_DIR / "ipam-dns-report.json").read_text())["IPAM"]


def _decode(m: IpamMessage) -> wire.GossipState | wire.Unicast:
    return wire.decode_unicast(m.payload) if m.tag == 5 else wire.decode_gossip_state(m.payload)


def _state(m: IpamMessage) -> wire.GossipState:
    """The gossipState a message carries (an empty one for space requests and denials)."""
    d = _decode(m)
    if isinstance(d, wire.RingUpdate):
        return d.state
    if isinstance(d, wire.SpaceRequest | wire.SpaceRequestDenied):
        return wire.GossipState(0, None, None, None)
    return d


def test_every_message_decodes_and_the_mix_is_as_described(messages: list[IpamMessage]) -> None:
    kinds = Counter((m.tag, m.payload[0] if m.tag == 5 else None) for m in messages)
    assert kinds == {(4, None): 6, (6, None): 18, (5, 1): 5, (5, 0): 2}
    for m in messages:
        d = _decode(m)
        state = d.state if isinstance(d, wire.RingUpdate) else d
        if isinstance(state, wire.GossipState):
            assert state.now == NOW
            assert state.nicknames is not None and set(state.nicknames) <= {WV1, WV2, WV3}
            # Weave sends Paxos only until there is a ring, never both.
            assert state.paxos is None or state.ring is None
    # Each router's first gossip is an empty Paxos map: an elector that has not voted.
    firsts = [_state(m) for m in messages if m.tag == 4]
    assert all(s.paxos == {} and s.ring is None for s in firsts)


def test_space_requests_and_ring_updates(messages: list[IpamMessage]) -> None:
    requests = [(m, _decode(m)) for m in messages if m.tag == 5 and m.payload[0] == wire.MSG_SPACE_REQUEST]
    assert [(m.src, m.dst) for m, _ in requests] == [(WV2, WV3), (WV2, WV3)]
    # Weave asks for the whole subnet being allocated in, here the default one.
    assert all(d == wire.SpaceRequest(UNIVERSE.range()) for _, d in requests)
    updates = [(m.src, m.dst) for m in messages if m.tag == 5 and m.payload[0] == wire.MSG_RING_UPDATE]
    assert Counter(updates) == {(WV3, WV2): 3, (WV1, WV2): 1, (WV2, WV3): 1}
    for m in messages:
        if m.tag == 5:
            assert m.hop_from == m.src and m.hop_to == m.dst  # direct neighbours, no relaying


def test_paxos_claims_decode_and_show_the_agreed_value(messages: list[IpamMessage]) -> None:
    accepted = {}
    for m in messages:
        s = _state(m)
        for node, claims in (s.paxos or {}).items():
            assert node.name in (WV1, WV2, WV3) and node.uid != 0
            if claims.accepted.valid:
                accepted[node.name] = claims.accepted_val
    # wv1's round-1 proposal won with the value [wv1, wv3]; wv2 arrived too late to vote.
    assert set(accepted) == {WV1, WV3}
    assert {v.value for v in accepted.values()} == {(WV1, WV3)}
    assert {v.origin.round for v in accepted.values()} == {1}
    assert {v.origin.proposer.name for v in accepted.values()} == {WV1}


@pytest.mark.parametrize("ids", ["sender", "default"])
def test_reencoding_is_byte_identical(messages: list[IpamMessage], ids: str) -> None:
    for m in messages:
        d = _decode(m)
        if m.tag == 5:
            root = wire.IPAM_GOSSIP if m.payload[0] == wire.MSG_RING_UPDATE else wire.RANGE
            type_ids = wire.sender_type_ids(m.payload[1:], root) if ids == "sender" else None
            again = wire.encode_unicast(d, type_ids)  # type: ignore[arg-type]
        else:
            type_ids = wire.sender_type_ids(m.payload) if ids == "sender" else None
            again = wire.encode_gossip_state(d, type_ids)  # type: ignore[arg-type]
        assert again == m.payload
        # Semantic round trip as well.
        assert (wire.decode_unicast(again) if m.tag == 5 else wire.decode_gossip_state(again)) == d
        header = [(wire.CHANNEL, STRING), (m.src, UINT)] + ([(m.dst, UINT)] if m.tag == 5 else [])
        assert encode_stream([*header, (again, BYTES)]) == m.body


def test_sender_type_ids_are_weaves(messages: list[IpamMessage]) -> None:
    for m in messages:
        if m.tag != 5:
            assert wire.sender_type_ids(m.payload) == wire.WEAVE_GOSSIP_TYPE_IDS
        elif m.payload[0] == wire.MSG_SPACE_REQUEST:
            assert wire.sender_type_ids(m.payload[1:], wire.RANGE) == wire.WEAVE_RANGE_TYPE_IDS




def test_golden_gob_md_payload() -> None:
    state = wire.decode_gossip_state(IPAM_PAYLOAD_WV2)
    assert state == wire.GossipState(1795238366, {0x029800000002: "wv-2"}, {}, None)
    assert wire.sender_type_ids(IPAM_PAYLOAD_WV2) == wire.WEAVE_GOSSIP_TYPE_IDS
    assert wire.encode_gossip_state(state) == IPAM_PAYLOAD_WV2
    # With our own numbering from 65 the bytes differ but mean the same.
    ours = wire.encode_gossip_state(state, {})
    assert ours != IPAM_PAYLOAD_WV2 and wire.decode_gossip_state(ours) == state


def _last(messages: list[IpamMessage], **match: object) -> IpamMessage:
    found = [m for m in messages if all(getattr(m, k) == v for k, v in match.items())]
    return found[-1]


def test_final_ring_matches_wv1_report(messages: list[IpamMessage], report: dict) -> None:
    # wv1's own latest ring is in its ring update to wv2; then it heard wv3's broadcasts.
    own = _state(_last(messages, tag=5, src=WV1)).ring
    assert own is not None
    ring = own.to_ring()
    for m in messages:
        if m.hop_to == WV1 and m.src != WV1:
            s = _state(m)
            if s.ring is not None:
                ring.merge(s.ring.to_ring(), lambda _r: True)
    got = [
        {"Token": str(i.range.start), "Size": i.range.size, "Peer": i.peer, "Version": i.version}
        for i in ring.all_range_info()
    ]
    want = [
        {"Token": str(parse_ip(e["Token"])), "Size": e["Size"], "Peer": int(e["Peer"].replace(":", ""), 16),
         "Version": e["Version"]}
        for e in report["Entries"]
    ]  # fmt: skip
    assert got == want


def test_allocator_report_reproduces_wv1_ipam_section(messages: list[IpamMessage], report: dict) -> None:
    own = _state(_last(messages, tag=5, src=WV1)).ring
    assert own is not None
    store = MemoryStore()
    store.save_ring(WV1, own.to_ring())
    for ident, addr in (("cont11", "10.40.0.1"), ("cont12", "10.40.0.2")):
        store.save_owned(ident, OwnedData(True, [CIDR(parse_ip(addr), 16)]))
    alloc = Allocator(AllocatorConfig(WV1, 1, UNIVERSE, ConsensusMode(3), "wv1", store, now=NOW))
    for m in messages:
        if m.hop_to == WV1 and m.tag == 6:
            alloc.on_gossip_broadcast(m.src, m.payload)
    assert alloc.report(UNIVERSE) == report


def test_replay_paxos_as_wv1(messages: list[IpamMessage]) -> None:
    from_wv1 = [_state(m) for m in messages if m.src == WV1 and m.tag == 6 and _state(m).paxos]
    proposal, acceptance = from_wv1[0].paxos, from_wv1[1].paxos
    assert proposal is not None and acceptance is not None
    [wv1_id] = [n for n in proposal if n.name == WV1]
    node = Node(wv1_id, quorum=2)
    node.propose()
    assert node.gossip_state() == proposal
    # wv3's promise reaches wv1, which then has a quorum of promises and accepts.
    from_wv3 = next(_state(m).paxos for m in messages if m.src == WV3 and m.tag == 6 and _state(m).paxos)
    assert from_wv3 is not None
    assert node.update(from_wv3) and node.think()
    assert node.gossip_state() == acceptance
    assert node.consensus() is None  # only wv1 has accepted so far
    node.update({NodeID(WV3, next(n.uid for n in from_wv3 if n.name == WV3)): acceptance[wv1_id]})
    node.think()
    agreed = node.consensus()
    assert agreed is not None and agreed.value == (WV1, WV3)
    fresh = Ring(UNIVERSE.range().start, UNIVERSE.range().end, WV1)
    fresh.claim_for_peers(sorted(agreed.value))
    first_ring = next(_state(m).ring for m in messages if m.src == WV1 and _state(m).ring)
    assert first_ring is not None
    # The first ring wv1 gossiped is the claimed ring after one allocation (free 32767, v1).
    assert [(e.token, e.peer) for e in fresh.entries] == [(e.token, e.peer) for e in first_ring.entries]
    assert fresh.entries[0] == Entry(parse_ip("10.40.0.0"), WV1, 0, 32768)


def test_replay_donations_as_wv3(messages: list[IpamMessage]) -> None:
    updates = [_state(m).ring for m in messages if m.tag == 5 and m.src == WV3]
    requests = [m for m in messages if m.tag == 5 and m.payload[0] == wire.MSG_SPACE_REQUEST]
    before = updates[0]
    assert before is not None
    store = MemoryStore()
    store.save_ring(WV3, before.to_ring())
    wv3 = Allocator(AllocatorConfig(WV3, 7, UNIVERSE, ConsensusMode(3), "wv3", store, now=NOW))
    got = []
    for req in requests:
        [reply] = wv3.on_gossip_unicast(WV2, req.payload)
        assert isinstance(reply, SendUnicast) and reply.dst == WV2
        got.append(_state_of(reply.payload))
    assert [g.entries for g in got] == [u.entries for u in updates[1:] if u is not None]


def _state_of(payload: bytes) -> wire.RingData:
    d = wire.decode_unicast(payload)
    assert isinstance(d, wire.RingUpdate) and d.state.ring is not None
    return d.state.ring


def test_space_donation_choice_matches_wv3() -> None:
    space = Space()
    space.add_ranges([Range(parse_ip("10.40.128.0"), parse_ip("10.41.0.0"))])
    assert space.donate(UNIVERSE.range()) == Range(parse_ip("10.40.192.0"), parse_ip("10.41.0.0"))
    assert space.donate(UNIVERSE.range()) == Range(parse_ip("10.40.160.0"), parse_ip("10.40.192.0"))


def test_allocations_in_wv1s_half_match(messages: list[IpamMessage]) -> None:
    first = next(_state(m).ring for m in messages if m.src == WV1 and _state(m).ring)
    assert first is not None
    ring = Ring(UNIVERSE.range().start, UNIVERSE.range().end, WV1)
    ring.claim_for_peers([WV1, WV3])
    store = MemoryStore()
    store.save_ring(WV1, ring)
    wv1 = Allocator(AllocatorConfig(WV1, 1, UNIVERSE, ConsensusMode(3), "wv1", store, now=NOW))
    assert wv1.allocate("cont11", UNIVERSE).cidr == CIDR(parse_ip("10.40.0.1"), 16)
    assert wv1.ring.entries == list(first.entries)
    assert wv1.allocate("cont12", UNIVERSE).cidr == CIDR(parse_ip("10.40.0.2"), 16)
    last = _state(_last(messages, tag=5, src=WV1)).ring
    assert last is not None and wv1.ring.entries == list(last.entries)


def test_mutated_messages_raise_only_wire_errors(messages: list[IpamMessage]) -> None:
    """Flip, drop and truncate bytes of every real message: decoding and feeding the
    result to an allocator either works or raises a WireError, never anything else."""
    rng = random.Random(6)
    accepted = rejected = 0
    for m in messages:
        for _ in range(40):
            data = bytearray(m.payload)
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                i = rng.randrange(len(data))
                if op < 0.5:
                    data[i] = rng.randrange(256)
                elif op < 0.8:
                    del data[i]
                else:
                    del data[i:]
                if not data:
                    break
            alloc = Allocator(AllocatorConfig(WV1, 1, UNIVERSE, ConsensusMode(3), "wv1", now=NOW))
            try:
                if m.tag == 5:
                    alloc.on_gossip_unicast(m.src, bytes(data))
                else:
                    alloc.on_gossip_broadcast(m.src, bytes(data))
                accepted += 1
            except WireError:
                rejected += 1
    assert accepted > 0 and rejected > 0


_u32 = st.integers(0, 2**32 - 1)
_name = st.integers(0, 2**48 - 1)
_node = st.builds(NodeID, _name, st.integers(0, 2**64 - 1))
_proposal = st.builds(ProposalID, st.integers(0, 2**64 - 1), _node)
_claims = st.builds(
    NodeClaims,
    _proposal,
    _proposal.filter(lambda p: not p.valid),  # an accepted proposal needs a non-empty value
    st.builds(AcceptedValue, st.lists(_name, max_size=4).map(tuple), _proposal),
)
_ring_data = st.builds(
    wire.RingData,
    st.just(0),
    st.integers(1, 2**32 - 1),
    _name,
    st.lists(st.builds(Entry, _u32, _name, _u32, _u32), max_size=6).map(tuple),
    st.lists(_name, max_size=4).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(-(2**63), 2**63 - 1),
    st.none() | st.dictionaries(_name, st.text(max_size=8), max_size=4),
    st.none() | st.dictionaries(_node, _claims, max_size=3),
    st.none() | _ring_data,
)
def test_gossip_state_round_trips(now: int, nicks: dict | None, paxos: dict | None, ring: wire.RingData | None) -> None:
    state = wire.GossipState(now, nicks, paxos, ring)
    again = wire.decode_gossip_state(wire.encode_gossip_state(state))
    # A nil map (omitted) and an empty one (sent) stay apart: for Paxos the receiver
    # tells an observer (nil) from an elector (empty) by it.
    assert again == state
    msg = wire.RingUpdate(state)
    assert wire.decode_unicast(wire.encode_unicast(msg)) == msg
