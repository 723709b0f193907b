"""The "nameserver" gossip payload: Weave's GossipData{Timestamp, Entries} as gob (sans-IO).

Layout (gob.md §9.4): struct ``GossipData`` with ``Timestamp int64`` and the embedded
``Entries`` (``[]Entry``); ``Entry`` is ``{ContainerID string, Origin PeerName (uint),
Addr uint32 (uint), Hostname string, Version int, Tombstone int64}``. Weave writes every
payload with a fresh gob encoder, entries sorted case-sensitively.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from router.errors import WireError
from router.gob import INT, STRING, UINT, Decoder, Encoder, Field, SliceType, StructType
from router.peername import format_peer_name

__all__ = [
    "CHANNEL", "GOSSIP_WINDOW", "TOMBSTONE_TIMEOUT", "DNS_ENTRY", "DNS_ENTRIES", "DNS_GOSSIP",
    "Entry", "GossipMessage", "NameserverWireError", "ClockSkewError",
    "encode_gossip", "decode_gossip", "format_addr", "parse_addr", "wire_order",
]

CHANNEL = "nameserver"
# Tombstones outlive the allowed clock skew; gossip older/newer than half of it is refused.
TOMBSTONE_TIMEOUT = 30 * 60
GOSSIP_WINDOW = TOMBSTONE_TIMEOUT // 2

DNS_ENTRY = StructType(
    "Entry",
    (
        Field("ContainerID", STRING),
        Field("Origin", UINT),
        Field("Addr", UINT),
        Field("Hostname", STRING),
        Field("Version", INT),
        Field("Tombstone", INT),
    ),
)
DNS_ENTRIES = SliceType(DNS_ENTRY, "Entries")
DNS_GOSSIP = StructType("GossipData", (Field("Timestamp", INT), Field("Entries", DNS_ENTRIES)))

_MAX_ADDR = (1 << 32) - 1
_MAX_UINT64 = (1 << 64) - 1


class NameserverWireError(WireError):
    """A nameserver gossip payload that cannot be accepted."""


class ClockSkewError(NameserverWireError):
    """The sender's clock differs from ours by more than GOSSIP_WINDOW seconds."""


Key = tuple[str, int, str, int]


@dataclass(frozen=True, slots=True)
class Entry:
    """One DNS record: `hostname` resolves to IPv4 `addr` (as a 32-bit int) for `container_id`.

    Identity is (hostname, origin, container_id, addr); `version` and `tombstone` (unix
    seconds of deletion, 0 = live) are the CRDT payload only the origin may change.
    """

    hostname: str
    origin: int
    container_id: str
    addr: int
    version: int = 0
    tombstone: int = 0

    @property
    def key(self) -> Key:
        return (self.hostname, self.origin, self.container_id, self.addr)

    @property
    def live(self) -> bool:
        return self.tombstone == 0

    def to_gob(self) -> dict[str, Any]:
        return {
            "ContainerID": self.container_id,
            "Origin": self.origin,
            "Addr": self.addr,
            "Hostname": self.hostname,
            "Version": self.version,
            "Tombstone": self.tombstone,
        }

    def to_report(self) -> dict[str, Any]:
        """The entry as Weave's /report shows it (DNS.Entries)."""
        return {
            "Hostname": self.hostname,
            "Origin": format_peer_name(self.origin),
            "ContainerID": self.container_id,
            "Address": format_addr(self.addr),
            "Version": self.version,
            "Tombstone": self.tombstone,
        }

    def __str__(self) -> str:
        state = f" tombstoned@{self.tombstone}" if self.tombstone else ""
        return f"{self.hostname} -> {format_addr(self.addr)} ({self.container_id}, v{self.version}{state})"


@dataclass(frozen=True, slots=True)
class GossipMessage:
    timestamp: int
    entries: tuple[Entry, ...] = ()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def wire_order(entry: Entry) -> tuple[bytes, int, bytes, int]:
    """Weave's case-sensitive gossip order: Go compares strings byte by byte."""
    return (_utf8(entry.hostname), entry.origin, _utf8(entry.container_id), entry.addr)


def format_addr(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def parse_addr(text: str) -> int:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        raise NameserverWireError(f"not an IPv4 address: {text!r}") from None


def encode_gossip(
    message: GossipMessage | tuple[int, Iterable[Entry]], first_id: int = 65
) -> bytes:
    """One payload on a fresh gob encoder, entries in Weave's wire order."""
    if isinstance(message, GossipMessage):
        timestamp, entries = message.timestamp, message.entries
    else:
        timestamp, entries = message
    value = {
        "Timestamp": timestamp,
        "Entries": [e.to_gob() for e in sorted(entries, key=wire_order)],
    }
    return Encoder(first_id=first_id).encode(value, DNS_GOSSIP)


def _entry_from_gob(raw: Mapping[str, Any]) -> Entry:
    addr = raw["Addr"]
    if addr > _MAX_ADDR:
        raise NameserverWireError(f"entry address {addr} does not fit in 32 bits")
    if raw["Origin"] > _MAX_UINT64:
        raise NameserverWireError(f"entry origin {raw['Origin']} does not fit in 64 bits")
    return Entry(
        hostname=raw["Hostname"],
        origin=raw["Origin"],
        container_id=raw["ContainerID"],
        addr=addr,
        version=raw["Version"],
        tombstone=raw["Tombstone"],
    )


def decode_gossip(payload: bytes, now: int | None = None) -> GossipMessage:
    """Decode one payload; with `now`, refuse clock skew beyond GOSSIP_WINDOW like Weave.

    Like Go's Decoder.Decode, only the first value is read. Duplicate entries (which
    make Weave panic) are refused.
    """
    raw = Decoder(payload).decode(DNS_GOSSIP)
    timestamp = raw["Timestamp"]
    if now is not None:
        skew = timestamp - now
        if skew > GOSSIP_WINDOW or skew < -GOSSIP_WINDOW:
            raise ClockSkewError(
                f"nameserver gossip clock skew of {skew}s exceeds the {GOSSIP_WINDOW}s limit"
            )
    entries = tuple(_entry_from_gob(e) for e in raw["Entries"])
    seen: set[Key] = set()
    for e in entries:
        if e.key in seen:
            raise NameserverWireError(f"duplicate nameserver entry in gossip: {e}")
        seen.add(e.key)
    return GossipMessage(timestamp, entries)
