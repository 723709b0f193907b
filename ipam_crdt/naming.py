"""How IPAM messages and reports print peer names."""

from __future__ import annotations

from router.peername import format_peer_name


def peer_str(name: int) -> str:
    """A peer name as Weave prints it (MAC form); names wider than 48 bits in hex."""
    if 0 <= name < 1 << 48:
        return format_peer_name(name)
    return f"{name:016x}"


def annotated(name: int, nicknames: dict[int, str]) -> str:
    """`name(nickname)` when the nickname is known, as Weave's error messages show it."""
    nick = nicknames.get(name)
    return f"{peer_str(name)}({nick})" if nick else peer_str(name)
