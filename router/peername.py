"""Peer names: 48-bit values shown as MAC addresses (Weave's "mac" flavour)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from router.errors import WireError

PEER_NAME_FLAVOUR = "mac"
UNKNOWN_PEER_NAME = 0
_MAX = (1 << 48) - 1


def parse_peer_name(text: str) -> int:
    """Parse `aa:bb:cc:dd:ee:ff` (or fewer octets, as Weave accepts) into an int."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 6 or any(not 1 <= len(p) <= 2 for p in parts):
        raise WireError(f"invalid peer name {text!r}: expected a MAC address like 02:00:00:00:00:01")
    try:
        octets = [int(p, 16) for p in parts]
    except ValueError:
        raise WireError(f"invalid peer name {text!r}: not hexadecimal") from None
    value = 0
    for octet in octets:
        value = (value << 8) | octet
    return value << (8 * (6 - len(octets)))


def format_peer_name(name: int) -> str:
    if not 0 <= name <= _MAX:
        raise WireError(f"peer name {name} does not fit in 48 bits")
    return name.to_bytes(6, "big").hex(":")


def peer_name_to_bytes(name: int) -> bytes:
    return name.to_bytes(6, "big")


def peer_name_from_bytes(data: bytes) -> int:
    if len(data) != 6:
        raise WireError(f"a peer name is 6 bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def random_peer_name() -> int:
    """A random locally-administered unicast MAC, as Weave picks for a new peer."""
    first = (secrets.randbits(8) | 0x02) & 0xFE
    return (first << 40) | secrets.randbits(40)


# The state directory's file that keeps the router's peer name across restarts.
PEERNAME_FILE = "peername"


def read_peer_name_file(path: Path) -> int | None:
    """The peer name in `path`; None if there is no such file. WireError if it holds none,
    OSError if it cannot be read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return parse_peer_name(text.strip())


def write_peer_name_file(path: Path, name: int) -> None:
    """Write `name` to `path` atomically and durably: a host that loses its name comes back
    as a stranger."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write(format_peer_name(name) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
