"""The mesh topology: the "topology" gossip payload and Weave's model of all peers (sans-IO).

Wire format (weave-net.md §2.7, gob.md §9.3): one fresh gob stream holding pairs of
``peerSummary`` and ``[]connectionSummary``, one pair per peer.

`Peers` keeps what a Weave router keeps: ourselves with our local connections, every
remote peer with the connection list it last announced, and placeholders (UID 0) for
peers we only know because someone lists a connection to them. Updates merge per peer
by (Version, UID, HasShortID); peers no longer reachable from us over any connection are
garbage-collected.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from router.errors import GobError, ProtocolError, WireError
from router.gob import (
    BOOL,
    BYTES,
    MAX_DEFINITION_BYTES,
    STRING,
    UINT,
    Builtin,
    Decoder,
    Encoder,
    Field,
    GobType,
    SliceType,
    StructType,
    WireDef,
    decode_int,
    decode_uint,
)
from router.peername import format_peer_name, peer_name_to_bytes

log = logging.getLogger(__name__)

SHORT_ID_BITS = 12
MAX_SHORT_ID = (1 << SHORT_ID_BITS) - 1
_MAX_UINT64 = (1 << 64) - 1
_MAX_PEER_NAME = (1 << 48) - 1
# chooseShortID: this many random picks before counting the free ids.
SHORT_ID_RANDOM_TRIES = 10
# Peers a router keeps track of, placeholders included, and entries a payload or a peer's
# connection list may hold. Meshes are far smaller (a ShortID, which fastdp needs, has 12
# bits); without a bound one 10 MB gossip frame names ~200k made-up peers, seconds of CPU
# and ~1 KB of state each.
MAX_PEERS = 4096

PEER_SUMMARY = StructType(
    "peerSummary",
    (
        Field("NameByte", BYTES),
        Field("NickName", STRING),
        Field("UID", UINT),
        Field("Version", UINT),
        Field("ShortID", UINT),
        Field("HasShortID", BOOL),
    ),
)
CONN_SUMMARY = StructType(
    "connectionSummary",
    (
        Field("NameByte", BYTES),
        Field("RemoteTCPAddr", STRING),
        Field("Outbound", BOOL),
        Field("Established", BOOL),
    ),
)
# Unnamed on the wire: Go sends no CommonType.Name for []connectionSummary.
CONN_LIST = SliceType(CONN_SUMMARY)


# ---------------------------------------------------------------- summaries


@dataclasses.dataclass(frozen=True)
class PeerSummary:
    """One peer as gossiped. UID 0 marks a placeholder."""

    name: int
    nickname: str = ""
    uid: int = 0
    version: int = 0
    short_id: int = 0
    has_short_id: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.name <= _MAX_PEER_NAME:
            raise ValueError(f"peer name {self.name} does not fit in 48 bits")
        if not 0 <= self.uid <= _MAX_UINT64 or not 0 <= self.version <= _MAX_UINT64:
            raise ValueError("peer UID and version are uint64")
        if not 0 <= self.short_id <= MAX_SHORT_ID:
            raise ValueError(f"short id {self.short_id} is not a {SHORT_ID_BITS}-bit value")

    def to_gob(self) -> dict[str, Any]:
        return {
            "NameByte": peer_name_to_bytes(self.name),
            "NickName": self.nickname,
            "UID": self.uid,
            "Version": self.version,
            "ShortID": self.short_id,
            "HasShortID": self.has_short_id,
        }


@dataclasses.dataclass(frozen=True)
class ConnectionSummary:
    """One connection of a peer, to the peer called `name`."""

    name: int
    remote_tcp_addr: str = ""
    outbound: bool = False
    established: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.name <= _MAX_PEER_NAME:
            raise ValueError(f"peer name {self.name} does not fit in 48 bits")

    def to_gob(self) -> dict[str, Any]:
        return {
            "NameByte": peer_name_to_bytes(self.name),
            "RemoteTCPAddr": self.remote_tcp_addr,
            "Outbound": self.outbound,
            "Established": self.established,
        }


TopologyEntry = tuple[PeerSummary, Sequence[ConnectionSummary]]
DecodedEntry = tuple[PeerSummary, list[ConnectionSummary]]


def encode_topology(entries: Iterable[TopologyEntry], type_ids: Mapping[GobType, int] | None = None) -> bytes:
    """A topology gossip payload on a fresh gob encoder, entries in the order given.

    `type_ids` pins the process-wide gob ids Go would use (e.g. {PEER_SUMMARY: 75,
    CONN_SUMMARY: 76, CONN_LIST: 77}) for byte-exact comparisons; any ids decode.
    """
    if type_ids is None:
        return join_entry_values(entry_values(summary, conns) for summary, conns in entries)
    enc = Encoder(type_ids)
    out = bytearray()
    for summary, conns in entries:
        out += enc.encode(summary.to_gob(), PEER_SUMMARY)
        out += enc.encode([c.to_gob() for c in conns], CONN_LIST)
    return bytes(out)


def _fresh_stream_parts() -> tuple[Encoder, bytes, bytes]:
    enc = Encoder()
    return enc, enc.definitions(PEER_SUMMARY), enc.definitions(CONN_LIST)


# A fresh encoder always numbers the types the same way, so the value messages of a peer
# are the same bytes in every payload: they are encoded once per peer version (Peers
# caches them) and payloads are joined from them.
_VALUES, _PEER_DEFS, _CONN_DEFS = _fresh_stream_parts()

EntryValues = tuple[bytes, bytes]


def entry_values(summary: PeerSummary, conns: Iterable[ConnectionSummary]) -> EntryValues:
    """The two gob value messages of one entry, for `join_entry_values`."""
    return (
        _VALUES.value(summary.to_gob(), PEER_SUMMARY),
        _VALUES.value([c.to_gob() for c in conns], CONN_LIST),
    )


def join_entry_values(values: Iterable[EntryValues]) -> bytes:
    """A payload from entries' value messages, with the definitions in front of first use."""
    out = bytearray()
    for peer_value, conns_value in values:
        if not out:
            out += _PEER_DEFS
            out += peer_value
            out += _CONN_DEFS
        else:
            out += peer_value
        out += conns_value
    return bytes(out)


def _name_from_gob(raw: Any, owner: int | None = None) -> int:
    if isinstance(raw, bytes) and len(raw) == 6:
        return int.from_bytes(raw, "big")
    what = "peer" if owner is None else f"connection of {format_peer_name(owner)}:"
    size = len(raw) if isinstance(raw, bytes) else "no"
    raise WireError(f"topology: {what} NameByte must be 6 bytes, got {size}")


def _peer_from_gob(raw: Mapping[str, Any]) -> PeerSummary:
    return _peer_summary(
        raw["NameByte"], raw["NickName"], raw["UID"], raw["Version"], raw["ShortID"], raw["HasShortID"]
    )


def _peer_summary(
    name_raw: Any, nickname: str, uid: int, version: int, short_id: int, has_short_id: bool
) -> PeerSummary:
    name = _name_from_gob(name_raw)
    if short_id > MAX_SHORT_ID:
        raise WireError(
            f"topology: peer {format_peer_name(name)} has ShortID {short_id}, above the {SHORT_ID_BITS}-bit "
            f"maximum {MAX_SHORT_ID}"
        )
    for key, value in (("UID", uid), ("Version", version)):
        if value > _MAX_UINT64:
            raise WireError(f"topology: peer {format_peer_name(name)} {key} {value} overflows uint64")
    return PeerSummary(name, nickname, uid, version, short_id, has_short_id)


def _conn_from_gob(raw: Mapping[str, Any], owner: int) -> ConnectionSummary:
    name = _name_from_gob(raw["NameByte"], owner)
    return ConnectionSummary(name, raw["RemoteTCPAddr"], raw["Outbound"], raw["Established"])


def decode_topology(payload: bytes) -> list[DecodedEntry]:
    """Every (peer, connections) pair in a topology payload. Bad input raises WireError."""
    return [(peer, conns()) for peer, conns in decode_topology_lazily(payload)]


class TopologyTooLarge(WireError):
    """More peers or connections than MAX_PEERS."""


def _too_many_peers() -> TopologyTooLarge:
    return TopologyTooLarge(f"topology: more than {MAX_PEERS} peers")


def _too_many_connections(owner: int) -> TopologyTooLarge:
    name = format_peer_name(owner)
    return TopologyTooLarge(f"topology: peer {name} lists more than {MAX_PEERS} connections")


def decode_topology_lazily(payload: bytes) -> list[tuple[PeerSummary, Callable[[], list[ConnectionSummary]]]]:
    """Every peer summary in a payload, with a function that decodes its connections.

    Most summaries in gossip are not news, and their connection lists (the bulk of a
    payload) never need decoding. Bad input raises WireError, from here or the function.
    """
    fast = _decode_known_layout(payload)
    if fast is not None:
        return fast
    dec = Decoder(payload)
    out: list[tuple[PeerSummary, Callable[[], list[ConnectionSummary]]]] = []
    while not dec.at_end:
        if len(out) >= MAX_PEERS:
            raise _too_many_peers()
        try:
            peer = _peer_from_gob(dec.decode(PEER_SUMMARY))
        except GobError as exc:
            raise GobError(f"topology: bad peerSummary #{len(out)}: {exc}") from None
        if dec.at_end:
            # Go would silently drop the peer; a truncated pair is not something Weave sends.
            raise WireError(f"topology: peer {format_peer_name(peer.name)} has no connection list")
        try:
            mark = dec.skip()
        except GobError as exc:
            raise GobError(f"topology: bad connection list of {format_peer_name(peer.name)}: {exc}") from None
        out.append((peer, functools.partial(_decode_conns, dec, mark, peer.name)))
    return out


def _decode_conns(dec: Decoder, mark: int, owner: int) -> list[ConnectionSummary]:
    try:
        raw_conns = dec.decode_at(mark, CONN_LIST)
    except GobError as exc:
        raise GobError(f"topology: bad connection list of {format_peer_name(owner)}: {exc}") from None
    if len(raw_conns) > MAX_PEERS:
        raise _too_many_connections(owner)
    return [_conn_from_gob(c, owner) for c in raw_conns]


# The fast path. Every topology payload, from pyweave or from Weave, is laid out the same
# way: peerSummary definitions, a summary, the connection list's definitions, a list,
# then summaries and lists alternating with no more definitions. The definitions differ
# only in their type ids (Go numbers types per process), so a payload's definitions are
# parsed once per distinct byte string and its values are then read by the hand-written
# readers below; the generic decoder would parse the definitions and compile readers for
# every payload, which made topology gossip the largest CPU cost of a forming mesh.
# Anything else (other definitions, fields we don't know, bad bytes) goes the generic
# way, which gives the precise error.

_Fields = tuple[tuple[int, int], ...]  # per wire field number: (our field's index, builtin id)


@dataclasses.dataclass(frozen=True)
class _Layout:
    peer_id: int
    list_id: int
    peer_fields: _Fields
    conn_fields: _Fields


_LAYOUTS: dict[tuple[bytes, bytes, int, int], _Layout | None] = {}
_MAX_LAYOUTS = 64


def _decode_known_layout(
    payload: bytes,
) -> list[tuple[PeerSummary, Callable[[], list[ConnectionSummary]]]] | None:
    """The entries of a payload in the usual layout, or None to take the generic way."""
    try:
        pos, peer_id, peer_body, peer_end = _after_definitions(payload, 0)
        peer_defs = payload[:pos]
        if peer_end >= len(payload):
            return None
        pos, list_id, list_body, list_end = _after_definitions(payload, peer_end)
        layout = _layout(peer_defs, payload[peer_end:pos], peer_id, list_id)
        if layout is None:
            return None
        out: list[tuple[PeerSummary, Callable[[], list[ConnectionSummary]]]] = []
        while True:
            if len(out) >= MAX_PEERS:
                raise _too_many_peers()
            peer = _read_peer(payload, peer_body, peer_end, layout.peer_fields)
            conns: Callable[[], list[ConnectionSummary]]
            conns = functools.partial(
                _read_conns, payload, list_body, list_end, layout.conn_fields, peer.name
            )
            out.append((peer, conns))
            if list_end >= len(payload):
                return out
            type_id, peer_body, peer_end = _message(payload, list_end)
            if type_id != peer_id or peer_end >= len(payload):
                return None
            type_id, list_body, list_end = _message(payload, peer_end)
            if type_id != list_id:
                return None
    except TopologyTooLarge:
        raise
    except (GobError, WireError):
        return None


def _message(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(type id, start of body, end) of the gob message at `pos`."""
    length, start = decode_uint(buf, pos)
    end = start + length
    if length == 0 or end > len(buf):
        raise GobError("bad gob message length")
    type_id, body = decode_int(buf, start, end)
    return type_id, body, end


def _after_definitions(buf: bytes, pos: int) -> tuple[int, int, int, int]:
    """Skip definition messages from `pos`: (start, type id, body, end) of the value after them."""
    while True:
        type_id, body, end = _message(buf, pos)
        if type_id > 0:
            return pos, type_id, body, end
        if type_id == 0:
            raise GobError("gob message with type id 0")
        pos = end


def _layout(peer_defs: bytes, list_defs: bytes, peer_id: int, list_id: int) -> _Layout | None:
    if len(peer_defs) + len(list_defs) > MAX_DEFINITION_BYTES:
        return None  # the generic decoder refuses it; never keep such bytes as a cache key
    key = (peer_defs, list_defs, peer_id, list_id)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    layout = None
    try:
        types = Decoder(peer_defs + list_defs).read_definitions()
    except GobError:
        types = {}
    listed = types.get(list_id)
    if listed is not None and listed.kind == "slice":
        peer_fields = _field_slots(types.get(peer_id), PEER_SUMMARY)
        conn_fields = _field_slots(types.get(listed.elem), CONN_SUMMARY)
        if peer_fields is not None and conn_fields is not None:
            layout = _Layout(peer_id, list_id, peer_fields, conn_fields)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


def _field_slots(wire: WireDef | None, local: StructType) -> _Fields | None:
    if wire is None or wire.kind != "struct":
        return None
    ours = {f.name: (i, f.type.id) for i, f in enumerate(local.fields) if isinstance(f.type, Builtin)}
    slots = []
    for name, type_id in wire.fields:
        slot = ours.get(name)
        if slot is None or slot[1] != type_id:
            return None
        slots.append(slot)
    return tuple(slots)


def _read_fields(buf: bytes, pos: int, end: int, fields: _Fields, values: list[Any]) -> int:
    """Read one struct's fields into `values`; returns the position after its end marker."""
    num = -1
    while True:
        delta, pos = _uint_at(buf, pos, end)
        if delta == 0:
            return pos
        num += delta
        if num >= len(fields):
            raise GobError(f"gob field number {num} out of bounds")
        slot, kind = fields[num]
        value, pos = _uint_at(buf, pos, end)
        if kind == _UINT_ID:
            values[slot] = value
        elif kind == _BOOL_ID:
            values[slot] = value != 0
        else:
            if value > end - pos:
                raise GobError(f"gob byte string of length {value} exceeds the {end - pos} bytes left")
            raw = buf[pos : pos + value]
            values[slot] = raw if kind == _BYTES_ID else raw.decode("utf-8", "surrogateescape")
            pos += value


def _uint_at(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    # Deltas, flags, counts and lengths are almost always one byte.
    if pos < end and buf[pos] < 0x80:
        return buf[pos], pos + 1
    return decode_uint(buf, pos, end)


_UINT_ID, _BOOL_ID, _BYTES_ID = UINT.id, BOOL.id, BYTES.id


def _read_peer(buf: bytes, pos: int, end: int, fields: _Fields) -> PeerSummary:
    values: list[Any] = [b"", "", 0, 0, 0, False]
    _read_fields(buf, pos, end, fields, values)
    return _peer_summary(*values)


def _read_conns(buf: bytes, pos: int, end: int, fields: _Fields, owner: int) -> list[ConnectionSummary]:
    try:
        marker, pos = decode_uint(buf, pos, end)
        if marker != 0:
            raise GobError("non-zero delta for singleton: top-level value lacks its 00 marker")
        count, pos = decode_uint(buf, pos, end)
        if count > end - pos:
            raise GobError(f"gob slice count {count} exceeds the {end - pos} bytes left")
        if count > MAX_PEERS:
            raise _too_many_connections(owner)
        out = []
        for _ in range(count):
            values: list[Any] = [b"", "", False, False]
            pos = _read_fields(buf, pos, end, fields, values)
            out.append(ConnectionSummary(_name_from_gob(values[0], owner), values[1], values[2], values[3]))
        return out
    except GobError as exc:
        raise GobError(f"topology: bad connection list of {format_peer_name(owner)}: {exc}") from None


# ---------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer as we know it. Immutable: the model replaces it on every change.

    `connections` is keyed by the remote peer's name (one connection per pair of peers,
    as in Weave); treat it as read-only.
    """

    name: int
    nickname: str = ""
    uid: int = 0
    version: int = 0
    short_id: int = 0
    has_short_id: bool = False
    connections: Mapping[int, ConnectionSummary] = dataclasses.field(default_factory=dict, hash=False)

    @property
    def is_placeholder(self) -> bool:
        return self.uid == 0

    def summary(self) -> PeerSummary:
        return PeerSummary(self.name, self.nickname, self.uid, self.version, self.short_id, self.has_short_id)

    def entry(self) -> DecodedEntry:
        return self.summary(), list(self.connections.values())

    @classmethod
    def from_summary(cls, summary: PeerSummary, conns: Iterable[ConnectionSummary] = ()) -> Peer:
        return cls(
            summary.name,
            summary.nickname,
            summary.uid,
            summary.version,
            summary.short_id,
            summary.has_short_id,
            _connections_map(conns),
        )

    def __str__(self) -> str:
        return f"{format_peer_name(self.name)}({self.nickname})"


def _connections_map(conns: Iterable[ConnectionSummary]) -> dict[int, ConnectionSummary]:
    # A repeated remote name keeps the last summary, as Go's map assignment does.
    return {c.name: c for c in conns}


def supersedes(incoming: PeerSummary | Peer, current: PeerSummary | Peer) -> bool:
    """Weave's merge rule: higher Version, then higher UID, then having a ShortID wins."""
    if incoming.version != current.version:
        return incoming.version > current.version
    if incoming.uid != current.uid:
        return incoming.uid > current.uid
    return incoming.has_short_id and not current.has_short_id


def choose_short_id(in_use: Collection[int], rng: random.Random) -> int | None:
    """A free 12-bit ShortID: a few random picks, then a uniform pick among the free ones.

    None when all 4096 are taken.
    """
    for _ in range(SHORT_ID_RANDOM_TRIES):
        candidate = rng.randrange(MAX_SHORT_ID + 1)
        if candidate not in in_use:
            return candidate
    taken = {s for s in in_use if 0 <= s <= MAX_SHORT_ID}
    free = (MAX_SHORT_ID + 1) - len(taken)
    if free == 0:
        return None
    n = rng.randrange(free)
    for candidate in range(MAX_SHORT_ID + 1):
        if candidate in taken:
            continue
        if n == 0:
            return candidate
        n -= 1
    raise AssertionError("unreachable: a free short id was counted but not found")


def short_id_owners(peers: Iterable[Peer | PeerSummary]) -> dict[int, int]:
    """ShortID -> name of the peer that keeps it: on a collision the lowest name wins."""
    owners: dict[int, int] = {}
    for p in peers:
        if p.has_short_id:
            current = owners.get(p.short_id)
            if current is None or p.name < current:
                owners[p.short_id] = p.name
    return owners


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    """What merging one topology update did.

    received: names of all peers described in the update (Weave relays these as-is for
      broadcasts);
    improved: peers whose entry we took from the update and kept, i.e. the delta to relay
      to our neighbours;
    new: peers we did not know before and still know (from a summary or a placeholder);
    restarted: known peers now announced under a different UID;
    removed: peers dropped by the garbage collection that followed;
    local_modified: our own entry changed (we met an old incarnation of ourselves, or had
      to give up our ShortID), so our entry must be gossiped again.
    """

    received: frozenset[int]
    improved: frozenset[int]
    new: frozenset[int]
    restarted: frozenset[int]
    removed: tuple[Peer, ...]
    local_modified: bool


class Peers:
    """Every peer we know, ourselves included, with the connections each announced.

    `rng` is used only to pick a new ShortID after a collision.
    """

    def __init__(
        self,
        name: int,
        nickname: str,
        uid: int,
        short_id: int | None,
        *,
        rng: random.Random,
        version: int = 0,
        max_peers: int = MAX_PEERS,
    ) -> None:
        if uid == 0:
            raise ValueError("UID 0 is reserved for placeholders")
        has_short_id = short_id is not None
        me = Peer(name, nickname, uid, version, short_id or 0, has_short_id)
        me.summary()  # validates the ranges
        self._name = name
        self._peers: dict[int, Peer] = {name: me}
        self._refs: Counter[int] = Counter()
        self._rng = rng
        self._max_peers = max_peers
        # The encoded value messages of each peer, valid while the Peer object is current.
        self._values: dict[int, tuple[Peer, EntryValues]] = {}

    # -- reading

    @property
    def name(self) -> int:
        return self._name

    @property
    def ourself(self) -> Peer:
        return self._peers[self._name]

    @property
    def by_name(self) -> Mapping[int, Peer]:
        """A live read-only view; `dict(peers.by_name)` is a consistent snapshot."""
        return MappingProxyType(self._peers)

    def get(self, name: int) -> Peer | None:
        return self._peers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._peers

    def __iter__(self) -> Iterator[int]:
        return iter(self._peers)

    def __len__(self) -> int:
        return len(self._peers)

    def peer_by_short_id(self, short_id: int) -> Peer | None:
        owner = short_id_owners(self._peers.values()).get(short_id)
        return None if owner is None else self._peers[owner]

    def entries(self, names: Iterable[int] | None = None) -> list[DecodedEntry]:
        """(summary, connections) of the named peers we know (all if None), sorted by name."""
        chosen = self._peers if names is None else {n for n in names if n in self._peers}
        return [self._peers[n].entry() for n in sorted(chosen)]

    def encode_full(self, type_ids: Mapping[GobType, int] | None = None) -> bytes:
        """The complete topology: the payload of periodic gossip and of a new connection."""
        return self.encode_peers(self._peers, type_ids)

    def encode_peers(self, names: Iterable[int], type_ids: Mapping[GobType, int] | None = None) -> bytes:
        """A topology payload for just these peers (unknown names are left out)."""
        if type_ids is not None:
            return encode_topology(self.entries(names), type_ids)
        chosen = sorted(n for n in set(names) if n in self._peers)
        return join_entry_values(self._entry_values(self._peers[n]) for n in chosen)

    def _entry_values(self, peer: Peer) -> EntryValues:
        cached = self._values.get(peer.name)
        if cached is not None and cached[0] is peer:
            return cached[1]
        values = entry_values(peer.summary(), peer.connections.values())
        self._values[peer.name] = (peer, values)
        return values

    # -- peers met on our own connections

    def register_remote(self, name: int, nickname: str, uid: int, short_id: int | None) -> bool:
        """Take a reference on a peer we have a connection (attempt) to; True if it was new.

        A known peer keeps what we know of it (its gossip is more recent than a handshake).
        A new one enters with Version 0; if it takes our ShortID, ours is re-picked, which
        the caller publishes with the connection's own topology update.
        """
        if name == self._name:
            raise ProtocolError("cannot connect to ourself")
        if name in self._peers:
            self._refs[name] += 1
            return False
        summary = PeerSummary(name, nickname, uid, 0, short_id or 0, short_id is not None)  # validates
        self._refs[name] += 1
        self._peers[name] = Peer.from_summary(summary)
        self._ensure_own_short_id()
        return True

    def release_remote(self, name: int) -> None:
        """Drop a reference taken by register_remote; the next GC may then remove the peer."""
        if self._refs[name] <= 0:
            raise ValueError(f"peer {format_peer_name(name)} has no reference to release")
        self._refs[name] -= 1
        if self._refs[name] == 0:
            del self._refs[name]

    def add_connection(
        self, remote: int, remote_tcp_addr: str, outbound: bool, established: bool = False
    ) -> None:
        """A local connection joined (or replaced our connection to `remote`): Version++."""
        if remote not in self._peers or remote == self._name:
            raise ValueError(f"add_connection: {format_peer_name(remote)} is not a registered remote peer")
        conns = dict(self.ourself.connections)
        conns[remote] = ConnectionSummary(remote, remote_tcp_addr, outbound, established)
        self._bump_ourself(connections=conns)

    def set_connection_established(self, remote: int, established: bool = True) -> bool:
        """Mark a local connection (not) established: Version++. False if there is none."""
        conn = self.ourself.connections.get(remote)
        if conn is None:
            return False
        conns = dict(self.ourself.connections)
        conns[remote] = ConnectionSummary(remote, conn.remote_tcp_addr, conn.outbound, established)
        self._bump_ourself(connections=conns)
        return True

    def remove_connection(self, remote: int) -> list[Peer]:
        """A local connection went away: Version++, then GC. Returns the peers removed."""
        if remote not in self.ourself.connections:
            return []
        conns = dict(self.ourself.connections)
        del conns[remote]
        self._bump_ourself(connections=conns)
        # GC before anything is gossiped, so no update ever carries unreachable peers.
        return self.garbage_collect()

    def _bump_ourself(self, **changes: Any) -> None:
        me = self.ourself
        self._peers[self._name] = dataclasses.replace(me, version=me.version + 1, **changes)

    # -- gossip

    def apply_update(self, update: bytes | Iterable[TopologyEntry]) -> UpdateResult:
        """Merge a topology update (a payload or decoded entries). Raises WireError on bad
        bytes, before anything changes."""
        if isinstance(update, bytes | bytearray | memoryview):
            entries = decode_topology_lazily(bytes(update))
        else:
            entries = [(summary, functools.partial(list, conns)) for summary, conns in update]
        # Decide entry by entry (a later summary of the same peer competes with an earlier
        # one), decoding only the connection lists that are taken.
        taken: dict[int, Peer] = {}
        ours: list[PeerSummary] = []
        restarted: set[int] = set()
        for summary, conns in entries:
            name = summary.name
            if name == self._name:
                ours.append(summary)
                continue
            current = taken.get(name) or self._peers.get(name)
            if current is not None:
                # A peer first seen in this update takes its first summary whatever it says.
                if not supersedes(summary, current):
                    continue
                if current.uid != 0 and summary.uid != current.uid:
                    restarted.add(name)
            taken[name] = Peer.from_summary(summary, conns())

        known_before = set(self._peers)
        arriving = {n for n in taken if n not in known_before}
        arriving.update(r for p in taken.values() for r in p.connections if r not in known_before)
        if len(known_before) + len(arriving) > self._max_peers:
            # Refused whole, before anything changes (GC might free some: not worth the risk).
            total = len(known_before) + len(arriving)
            raise TopologyTooLarge(f"topology: update would make {total} peers, more than {self._max_peers}")
        # Only a new peer (perhaps unreachable) or a lost connection can leave a peer
        # unreachable; otherwise the collection would find nothing (most updates).
        need_gc = any(
            (old := self._peers.get(name)) is None or not old.connections.keys() <= peer.connections.keys()
            for name, peer in taken.items()
        )
        local_modified = False
        for summary in ours:
            local_modified |= self._outdo_old_incarnation(summary)
        self._peers.update(taken)
        for peer in taken.values():
            for remote in peer.connections:
                if remote not in self._peers:
                    self._peers[remote] = Peer(remote)

        removed = self._collect() if need_gc else []
        gone = {p.name for p in removed}
        local_modified |= self._ensure_own_short_id()
        return UpdateResult(
            received=frozenset(s.name for s, _ in entries),
            improved=frozenset(set(taken) - gone),
            new=frozenset(set(self._peers) - known_before),
            restarted=frozenset(restarted - gone),
            removed=tuple(removed),
            local_modified=local_modified,
        )

    def _outdo_old_incarnation(self, summary: PeerSummary) -> bool:
        me = self.ourself
        if summary.uid == me.uid or summary.version < me.version:
            return False
        log.info("topology: old incarnation of ourselves (UID %d, version %d)", summary.uid, summary.version)
        self._peers[self._name] = dataclasses.replace(me, version=summary.version + 1)
        return True

    def _ensure_own_short_id(self) -> bool:
        """Re-pick our ShortID if a peer with a lower name holds it. True if we changed."""
        me = self.ourself
        if not me.has_short_id:
            return False
        owner = short_id_owners(self._peers.values())[me.short_id]
        if owner == self._name:
            return False
        in_use = {p.short_id for p in self._peers.values() if p.has_short_id}
        new_id = choose_short_id(in_use, self._rng)
        if new_id is None:
            log.warning("topology: ShortID %d collides with %s and no ShortID is free", me.short_id, owner)
            return False
        log.info("topology: ShortID %d collides with %s; switching to %d", me.short_id, owner, new_id)
        self._bump_ourself(short_id=new_id)
        return True

    def garbage_collect(self) -> list[Peer]:
        """Drop peers unreachable from us over any connections and not referenced locally.

        Removing peers may free a ShortID we had lost to a collision; we then take one.
        """
        removed = self._collect()
        if removed:
            self._ensure_own_short_id()
        return removed

    def _collect(self) -> list[Peer]:
        reached = {self._name}
        frontier = [self._name]
        while frontier:
            peer = self._peers.get(frontier.pop())
            if peer is None:
                continue
            for remote in peer.connections:
                if remote not in reached:
                    reached.add(remote)
                    frontier.append(remote)
        removed = [p for n, p in self._peers.items() if n not in reached and self._refs[n] == 0]
        for p in removed:
            del self._peers[p.name]
            self._refs.pop(p.name, None)
            self._values.pop(p.name, None)
        if removed:
            log.debug("topology: removed unreachable peers %s", ", ".join(str(p) for p in removed))
        return removed
