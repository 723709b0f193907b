"""Weave Net's persisted state (`<db-prefix>data.db`), decoded: bytes in, `WeaveState` out.

Weave's `db` package keeps one BoltDB bucket, `top`, with `version` (major, minor: 1, 0),
`peername` (a gob `mesh.PeerName`, a uint64), and what its components persist there:
IPAM's `ring` (the same gob `Ring` as in IPAM gossip) and `ownedAddresses` (a gob
`map[string]ownedData{IsContainer bool; Cidrs []address.CIDR{Addr uint32; PrefixLen int}}`),
and the router's `directPeers` (a gob `[]string`, the `weave connect` targets).

A migration trusts none of it: anything that is not what a Weave 2.8 router writes raises
`WeaveDBError` with a constant `reason`, so that nothing half-understood reaches our store.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipam_crdt.address import CIDR, Range
from ipam_crdt.boltdb import BoltDB, BoltError
from ipam_crdt.errors import IPAMError
from ipam_crdt.naming import peer_str
from ipam_crdt.ring import Ring
from ipam_crdt.wire import decode_ring
from router.gob import BOOL, INT, STRING, UINT, Decoder, Field, GobError, MapType, SliceType, StructType

TOP_BUCKET = b"top"
VERSION_KEY = b"version"
PEERNAME_KEY = b"peername"
RING_KEY = b"ring"
OWNED_KEY = b"ownedAddresses"
DIRECT_PEERS_KEY = b"directPeers"
SUPPORTED_MAJOR = 1

CIDR_TYPE = StructType("CIDR", (Field("Addr", UINT), Field("PrefixLen", INT)))
OWNED_DATA = StructType(
    "ownedData", (Field("IsContainer", BOOL), Field("Cidrs", SliceType(CIDR_TYPE, "[]address.CIDR")))
)
OWNED_ADDRESSES = MapType(STRING, OWNED_DATA)
DIRECT_PEERS = SliceType(STRING)

# Docker's container ids are 64 characters; Weave's own idents ("weave:expose", "_") shorter.
MAX_IDENT_LEN = 1024
MAX_DIRECT_PEER_LEN = 1024
_MAX_PEER_NAME = (1 << 48) - 1
_MAX_ADDRESS = (1 << 32) - 1

# WeaveDBError reasons (BoltDB-level failures carry `ipam_crdt.boltdb.Reason` values).
NO_BUCKET = "no_bucket"
MISSING_KEY = "missing_key"
BAD_VERSION = "bad_version"
BAD_PEERNAME = "bad_peername"
BAD_RING = "bad_ring"
BAD_OWNED = "bad_owned"
BAD_DIRECT_PEERS = "bad_direct_peers"


class WeaveDBError(ValueError):
    """Weave's file cannot be read as Weave's state; `reason` is a constant saying why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"Weave database: {message}")
        self.reason = reason


@dataclass(frozen=True)
class WeaveOwned:
    """The addresses one ident owns (Weave's `ownedData`)."""

    is_container: bool
    cidrs: tuple[CIDR, ...]


@dataclass(frozen=True)
class WeaveState:
    peer_name: int
    # None when Weave never had a ring (no consensus yet, or IPAM off).
    ring: Ring | None
    owned: dict[str, WeaveOwned]
    direct_peers: tuple[str, ...]

    @property
    def universe(self) -> Range | None:
        return None if self.ring is None else self.ring.range


def parse_weave_db(data: bytes) -> WeaveState:
    """Weave's state from the bytes of its BoltDB file."""
    try:
        top = BoltDB(data).bucket(TOP_BUCKET)
    except BoltError as exc:
        raise WeaveDBError(exc.reason.value, str(exc)) from None
    version = top.get(VERSION_KEY)
    if version is None:
        raise WeaveDBError(MISSING_KEY, "no 'version' key: not written by a Weave router")
    if len(version) != 2 or version[0] != SUPPORTED_MAJOR:
        raise WeaveDBError(BAD_VERSION, f"persistence version {version.hex()}, this program reads 1.x")
    raw_name = top.get(PEERNAME_KEY)
    if raw_name is None:
        raise WeaveDBError(MISSING_KEY, "no 'peername' key")
    peer_name = _peer_name(raw_name)
    raw_ring = top.get(RING_KEY)
    ring = None if raw_ring is None else _ring(raw_ring, peer_name)
    raw_owned = top.get(OWNED_KEY)
    owned = {} if raw_owned is None else _owned(raw_owned)
    if owned and ring is None:
        raise WeaveDBError(BAD_OWNED, "addresses are owned but there is no ring they could come from")
    raw_peers = top.get(DIRECT_PEERS_KEY)
    peers = () if raw_peers is None else _direct_peers(raw_peers)
    return WeaveState(peer_name, ring, owned, peers)


def _gob(payload: bytes, schema: object, reason: str, what: str) -> object:
    try:
        return Decoder(payload).decode(schema)  # type: ignore[arg-type]
    except GobError as exc:
        raise WeaveDBError(reason, f"bad {what}: {exc}") from None


def _peer_name(payload: bytes) -> int:
    name = _gob(payload, UINT, BAD_PEERNAME, "peer name")
    assert isinstance(name, int)
    if not 0 < name <= _MAX_PEER_NAME:
        raise WeaveDBError(BAD_PEERNAME, f"peer name {name} is not a 48-bit MAC-style name")
    return name


def _ring(payload: bytes, peer_name: int) -> Ring:
    try:
        ring = decode_ring(payload).to_ring()
        ring.check()
    except IPAMError as exc:
        raise WeaveDBError(BAD_RING, f"bad ring: {exc}") from None
    if ring.peer != peer_name:
        raise WeaveDBError(
            BAD_RING, f"ring written by {peer_str(ring.peer)}, the file's peer name is {peer_str(peer_name)}"
        )
    return ring


def _owned(payload: bytes) -> dict[str, WeaveOwned]:
    value = _gob(payload, OWNED_ADDRESSES, BAD_OWNED, "owned addresses")
    assert isinstance(value, dict)
    owned: dict[str, WeaveOwned] = {}
    users: dict[int, str] = {}
    for ident, data in value.items():
        if not 0 < len(ident) <= MAX_IDENT_LEN or not ident.isprintable():
            raise WeaveDBError(BAD_OWNED, f"owned addresses: unusable ident {ident[:80]!r}")
        cidrs = []
        for c in data["Cidrs"]:
            addr, plen = c["Addr"], c["PrefixLen"]
            if not 0 <= addr <= _MAX_ADDRESS or not 0 <= plen <= 32:
                raise WeaveDBError(BAD_OWNED, f"owned addresses of {ident!r}: bad CIDR {addr}/{plen}")
            cidr = CIDR(addr, plen)
            if addr in users:
                raise WeaveDBError(BAD_OWNED, f"{cidr} is owned by both {users[addr]!r} and {ident!r}")
            users[addr] = ident
            cidrs.append(cidr)
        if cidrs:
            owned[ident] = WeaveOwned(bool(data["IsContainer"]), tuple(cidrs))
    return owned


def _direct_peers(payload: bytes) -> tuple[str, ...]:
    value = _gob(payload, DIRECT_PEERS, BAD_DIRECT_PEERS, "direct peers")
    assert isinstance(value, list)
    for peer in value:
        if not 0 < len(peer) <= MAX_DIRECT_PEER_LEN or not peer.isprintable():
            raise WeaveDBError(BAD_DIRECT_PEERS, f"direct peers: unusable address {peer[:80]!r}")
    return tuple(value)
