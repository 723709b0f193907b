"""The `IPallocation` gossip channel on the wire (gob; see gob.md §1.4 and §9.4).

Broadcasts and periodic gossip carry one `gossipState` on a fresh gob stream. Unicasts
are one raw kind byte followed by a fresh gob stream: a `Range` for a space request (0)
or a denial (2), a `gossipState` for a ring update (1).

Schemas follow Weave's Go types field by field, including the type names Go puts on the
wire. By default we number types as a Weave 2.8 router does (gob.md §9.4), so our bytes
equal Go's; Go's decoder would accept any numbering.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ipam_crdt.address import Range
from ipam_crdt.errors import IPAMWireError
from ipam_crdt.paxos import AcceptedValue, NodeClaims, NodeID, ProposalID
from ipam_crdt.ring import Entry, Ring
from router.gob import (
    INT,
    STRING,
    UINT,
    Decoder,
    Encoder,
    Field,
    GobError,
    GobStruct,
    GobType,
    MapType,
    SliceType,
    StructType,
    decode_int,
    decode_uint,
)

CHANNEL = "IPallocation"

# ------------------------------------------------------------------ schemas

NODE_ID = StructType("", (Field("Name", UINT), Field("UID", UINT)))
PROPOSAL_ID = StructType("ProposalID", (Field("Round", UINT), Field("Proposer", NODE_ID)))
PAXOS_VALUE = SliceType(UINT, "Value")
ACCEPTED_VALUE = StructType("AcceptedValue", (Field("Value", PAXOS_VALUE), Field("Origin", PROPOSAL_ID)))
NODE_CLAIMS = StructType(
    "", (Field("Promise", PROPOSAL_ID), Field("Accepted", PROPOSAL_ID), Field("AcceptedVal", ACCEPTED_VALUE))
)
PAXOS_STATE = MapType(NODE_ID, NODE_CLAIMS, "GossipState")
RING_ENTRY = StructType(
    "", (Field("Token", UINT), Field("Peer", UINT), Field("Version", UINT), Field("Free", UINT))
)
RING_ENTRIES = SliceType(RING_ENTRY, "entries")
PEER_NAMES = SliceType(UINT, "[]mesh.PeerName")
RING = StructType(
    "Ring",
    (
        Field("Start", UINT),
        Field("End", UINT),
        Field("Peer", UINT),
        Field("Entries", RING_ENTRIES),
        Field("Seeds", PEER_NAMES),
    ),
)
NICKNAMES = MapType(UINT, STRING, "map[mesh.PeerName]string")
IPAM_GOSSIP = StructType(
    "gossipState",
    (
        Field("Now", INT),
        Field("Nicknames", NICKNAMES),
        Field("Paxos", PAXOS_STATE),
        Field("Ring", RING, optional=True),
    ),
)
RANGE = StructType("Range", (Field("Start", UINT), Field("End", UINT)))

# The ids a Weave 2.8 router gives these types (all three routers in both captures).
WEAVE_GOSSIP_TYPE_IDS: dict[GobType, int] = {
    RING: 65, RING_ENTRY: 66, RING_ENTRIES: 67, PEER_NAMES: 68,
    IPAM_GOSSIP: 78, NICKNAMES: 79, NODE_ID: 80, NODE_CLAIMS: 81, PROPOSAL_ID: 82,
    ACCEPTED_VALUE: 83, PAXOS_VALUE: 84, PAXOS_STATE: 85,
}  # fmt: skip
WEAVE_RANGE_TYPE_IDS: dict[GobType, int] = {RANGE: 89}

MSG_SPACE_REQUEST = 0
MSG_RING_UPDATE = 1
MSG_SPACE_REQUEST_DENIED = 2

_U32 = (1 << 32) - 1


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class RingData:
    """A ring as gossiped: `peer` is the sender's name."""

    start: int
    end: int
    peer: int
    entries: tuple[Entry, ...]
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, ring: Ring) -> RingData:
        return cls(ring.start, ring.end, ring.peer, tuple(ring.entries), tuple(ring.seeds))

    def to_ring(self) -> Ring:
        return Ring(self.start, self.end, self.peer, self.entries, self.seeds)


@dataclass(frozen=True)
class GossipState:
    """Weave's `gossipState`. `paxos` None is Go's nil map (an observer, or a ring exists),
    which the receiver treats differently from an empty map."""

    now: int
    nicknames: Mapping[int, str] | None
    paxos: Mapping[NodeID, NodeClaims] | None
    ring: RingData | None


@dataclass(frozen=True)
class SpaceRequest:
    range: Range


@dataclass(frozen=True)
class SpaceRequestDenied:
    range: Range


@dataclass(frozen=True)
class RingUpdate:
    state: GossipState


Unicast = SpaceRequest | SpaceRequestDenied | RingUpdate


# ------------------------------------------------------------------ encoding


def _node_id(n: NodeID) -> dict[str, Any]:
    return {"Name": n.name, "UID": n.uid}


def _proposal(p: ProposalID) -> dict[str, Any]:
    return {"Round": p.round, "Proposer": _node_id(p.proposer)}


def _claims(c: NodeClaims) -> dict[str, Any]:
    return {
        "Promise": _proposal(c.promise),
        "Accepted": _proposal(c.accepted),
        "AcceptedVal": {"Value": list(c.accepted_val.value), "Origin": _proposal(c.accepted_val.origin)},
    }


def _ring(r: RingData) -> dict[str, Any]:
    return {
        "Start": r.start,
        "End": r.end,
        "Peer": r.peer,
        "Entries": [
            {"Token": e.token, "Peer": e.peer, "Version": e.version, "Free": e.free} for e in r.entries
        ],
        "Seeds": list(r.seeds),
    }


def gossip_state_value(state: GossipState) -> dict[str, Any]:
    """The gob value (plain dicts) for a gossipState."""
    paxos = None
    if state.paxos is not None:
        paxos = {_hashable_node(k): _claims(v) for k, v in state.paxos.items()}
    return {
        "Now": state.now,
        "Nicknames": None if state.nicknames is None else dict(state.nicknames),
        "Paxos": paxos,
        "Ring": None if state.ring is None else _ring(state.ring),
    }


def _hashable_node(n: NodeID) -> GobStruct:
    # Map keys must be hashable; the gob encoder reads struct fields by name.
    return GobStruct("", _node_id(n))


def encode_gossip_state(state: GossipState, type_ids: Mapping[GobType, int] | None = None) -> bytes:
    ids = WEAVE_GOSSIP_TYPE_IDS if type_ids is None else type_ids
    return Encoder(ids).encode(gossip_state_value(state), IPAM_GOSSIP)


def encode_range(r: Range, type_ids: Mapping[GobType, int] | None = None) -> bytes:
    ids = WEAVE_RANGE_TYPE_IDS if type_ids is None else type_ids
    return Encoder(ids).encode({"Start": r.start, "End": r.end}, RANGE)


def encode_unicast(msg: Unicast, type_ids: Mapping[GobType, int] | None = None) -> bytes:
    if isinstance(msg, SpaceRequest):
        return bytes([MSG_SPACE_REQUEST]) + encode_range(msg.range, type_ids)
    if isinstance(msg, SpaceRequestDenied):
        return bytes([MSG_SPACE_REQUEST_DENIED]) + encode_range(msg.range, type_ids)
    return bytes([MSG_RING_UPDATE]) + encode_gossip_state(msg.state, type_ids)


# ------------------------------------------------------------------ decoding


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= _U32:
        raise IPAMWireError(f"IPAM {what} {value} does not fit in 32 bits")
    return value


def _to_node(v: Mapping[str, Any]) -> NodeID:
    return NodeID(v["Name"], v["UID"])


def _to_proposal(v: Mapping[str, Any]) -> ProposalID:
    return ProposalID(v["Round"], _to_node(v["Proposer"]))


def _to_claims(v: Mapping[str, Any]) -> NodeClaims:
    av = v["AcceptedVal"]
    return NodeClaims(
        _to_proposal(v["Promise"]),
        _to_proposal(v["Accepted"]),
        AcceptedValue(tuple(av["Value"]), _to_proposal(av["Origin"])),
    )


def _to_ring(v: Mapping[str, Any]) -> RingData:
    entries = tuple(
        Entry(
            _u32(e["Token"], "ring token"),
            e["Peer"],
            _u32(e["Version"], "entry version"),
            _u32(e["Free"], "free count"),
        )
        for e in v["Entries"]
    )
    start = _u32(v["Start"], "ring start")
    # Go's Address is a uint32: a ring over the whole IPv4 space is not representable.
    end = _u32(v["End"], "ring end")
    if not start < end:
        raise IPAMWireError(f"IPAM ring with empty range [{start}, {end})")
    return RingData(start, end, v["Peer"], entries, tuple(v["Seeds"]))


def decode_gossip_state(payload: bytes) -> GossipState:
    """One gossipState from a fresh gob stream. Like Go, bytes after it are ignored."""
    try:
        v = Decoder(payload).decode(IPAM_GOSSIP)
    except GobError as exc:
        raise IPAMWireError(f"bad IPAM gossip: {exc}") from None
    paxos = None
    if v["Paxos"] is not None:
        paxos = {_to_node(k): _to_claims(c) for k, c in v["Paxos"].items()}
        for claims in paxos.values():
            # A real proposer always includes itself; an empty value cannot seed a ring.
            if claims.accepted.valid and not claims.accepted_val.value:
                raise IPAMWireError("IPAM Paxos claim accepted an empty set of peers")
    return GossipState(
        now=v["Now"],
        nicknames=v["Nicknames"],
        paxos=paxos,
        ring=None if v["Ring"] is None else _to_ring(v["Ring"]),
    )


def encode_ring(ring: RingData) -> bytes:
    """A Ring on its own gob stream, as Weave persists it."""
    return Encoder({RING: 65, RING_ENTRY: 66, RING_ENTRIES: 67, PEER_NAMES: 68}).encode(_ring(ring), RING)


def decode_ring(payload: bytes) -> RingData:
    try:
        v = Decoder(payload).decode(RING)
    except GobError as exc:
        raise IPAMWireError(f"bad IPAM ring: {exc}") from None
    return _to_ring(v)


def decode_range(payload: bytes) -> Range:
    try:
        v = Decoder(payload).decode(RANGE)
    except GobError as exc:
        raise IPAMWireError(f"bad IPAM range: {exc}") from None
    start, end = _u32(v["Start"], "range start"), _u32(v["End"], "range end")
    if start > end:
        raise IPAMWireError(f"IPAM range ends before it starts: [{start}, {end})")
    return Range(start, end)


def decode_unicast(payload: bytes) -> Unicast:
    if not payload:
        raise IPAMWireError("empty IPAM unicast message")
    kind, body = payload[0], payload[1:]
    if kind == MSG_SPACE_REQUEST:
        return SpaceRequest(decode_range(body))
    if kind == MSG_SPACE_REQUEST_DENIED:
        return SpaceRequestDenied(decode_range(body))
    if kind == MSG_RING_UPDATE:
        return RingUpdate(decode_gossip_state(body))
    raise IPAMWireError(f"unknown IPAM unicast message kind {kind}")


# ------------------------------------------------------------------ sender's type ids


def definition_ids(stream: bytes) -> list[int]:
    """The type ids defined in a gob stream, in order (ids only; bodies are skipped)."""
    ids = []
    pos = 0
    try:
        while pos < len(stream):
            length, start = decode_uint(stream, pos)
            type_id, _ = decode_int(stream, start, start + length)
            if type_id < 0:
                ids.append(-type_id)
            pos = start + length
    except GobError as exc:
        raise IPAMWireError(f"bad gob stream: {exc}") from None
    return ids


def _definition_order(root: GobType) -> list[GobType]:
    """Types in the order Go's encoder defines them: pre-order, fields in order."""
    out: list[GobType] = []

    def walk(t: GobType) -> None:
        if not isinstance(t, StructType | SliceType | MapType) or t in out:
            return
        out.append(t)
        if isinstance(t, StructType):
            for f in t.fields:
                walk(f.type)
        elif isinstance(t, MapType):
            walk(t.key)
            walk(t.elem)
        else:
            walk(t.elem)

    walk(root)
    return out


def sender_type_ids(stream: bytes, root: GobType = IPAM_GOSSIP) -> dict[GobType, int]:
    """The ids the sender gave our schema's types, so re-encoding can match its bytes."""
    order = _definition_order(root)
    ids = definition_ids(stream)
    if len(ids) < len(order):
        raise IPAMWireError(f"gob stream defines {len(ids)} types, {len(order)} expected")
    return dict(zip(order, ids, strict=False))
