"""Which peers to dial and when: the connection maker's state, without I/O.

Targets are the addresses named on the command line or by `weave connect` ("direct")
plus those learned from topology gossip ("discovered"). A failed attempt is retried with
jittered exponential backoff (about 2 s, x1.5 each time, capped at 6 minutes), as Weave
does; unlike Weave, a target whose peer gossip reports as new or restarted is retried at
once, so a mesh whose members start together converges in seconds rather than minutes.

Two peers that learn of each other at the same moment would both dial, and one of the
two connections is then dropped as a duplicate (a wasted handshake and two extra
topology versions at each end). So a discovered target may be deferred, left for the
peer there to dial us (see `discovery_delay`): a peer that joins the mesh gets the full
topology from its first neighbour and knows everyone at once, while the others hear of
it through gossip, hop by hop; so the newcomer dials and the older members wait for it.
Peers named on the command line or by `weave connect` are never deferred.
"""

from __future__ import annotations

import enum
import ipaddress
import random
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass

INITIAL_INTERVAL = 2.0
BACKOFF_FACTOR = 1.5
MAX_INTERVAL = 360.0
# A connection that lived this long before failing is retried at once.
LONG_LIVED = 60.0
# How long a deferred discovered target waits for the peer to dial us instead: enough for
# its handshake on a busy host. Two peers that each see the other as the newcomer wait
# for each other; the higher-named one waits the shorter time, so it dials first.
DISCOVERY_DEFER = 3.0
DISCOVERY_DEFER_SHORT = 2.0
DEFAULT_PORT = 6783
# A target skipped because its host already has a connection to us is looked at again
# after this long (the connection may be a handshake that fails).
BUSY_HOST_RECHECK = 1.0
# Targets learned from gossip, at most (those named by the user are not counted). Weave
# meshes are tens of peers, 100 at the most it supports well.
MAX_DISCOVERED = 1024


class TargetState(enum.Enum):
    WAITING = "waiting"  # due now, not yet dialled
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RETRYING = "retrying"
    FAILED = "failed"


@dataclass
class Target:
    address: str
    direct: bool
    state: TargetState = TargetState.WAITING
    attempts: int = 0
    try_after: float = 0.0
    interval: float = INITIAL_INTERVAL
    last_error: str = ""
    connected_at: float = 0.0


def discovery_delay(peer: int, ourself: int, first_seen: float | None, joined_at: float | None) -> float:
    """How long to leave a discovered `peer` to dial us before we dial it.

    `first_seen`: when the peer entered our topology; `joined_at`: when we applied the
    first topology update after our first connection came up (the topology we were
    given on joining). A peer that was in the mesh before we joined is dialled at once:
    it hears of us only through gossip, later. One that came after us got our entry in
    the topology it was given on joining, and dials us.
    """
    if joined_at is None or first_seen is None or first_seen <= joined_at:
        return 0.0
    return DISCOVERY_DEFER_SHORT if peer < ourself else DISCOVERY_DEFER


# A peer address as text is at most a 253-character name, brackets, a colon and a port;
# anything much longer is refused before it is looked at.
MAX_ADDRESS_TEXT = 300
MAX_HOSTNAME = 253
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
# An IPv6 zone (scope) is an interface name or number.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}", re.ASCII)


class PeerAddress(str):
    """A validated peer address, ``host:port`` (``[v6]:port`` for IPv6), as text.

    Made only by :func:`normalise_address`. It is the string the connection maker keys
    its targets by (so it compares equal to plain text), and carries the parts the
    dialler needs, so they are never split out of the text again: a host that is an IP
    address or an RFC 1123 host name (ASCII, labels 1..63 characters, 253 in all), and a
    port in 1..65535. Nothing else may reach getaddrinfo: a 64-character label there
    raises UnicodeError, not OSError."""

    host: str
    port: int

    def __new__(cls, host: str, port: int) -> PeerAddress:
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self = super().__new__(cls, text)
        self.host = host
        self.port = port
        return self


def valid_hostname(name: str) -> bool:
    """RFC 1123 host name syntax (one trailing dot allowed); a last label of digits only
    is refused, since the resolver would read such a name as a (partial) IPv4 address."""
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_HOSTNAME or not name.isascii():
        return False
    labels = name.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _host(text: str, bracketed: bool) -> str:
    """The canonical host, or ValueError saying why `text` is not one."""
    zone = ""
    if "%" in text:
        text, _, zone = text.partition("%")
        if not _ZONE.fullmatch(zone):
            raise ValueError("bad IPv6 zone")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is not None:
        if zone and ip.version != 6:
            raise ValueError("a zone is only for an IPv6 address")
        if bracketed and ip.version != 6:
            raise ValueError("only an IPv6 address goes in brackets")
        return f"{ip.compressed}%{zone}" if zone else ip.compressed
    if bracketed or zone:
        raise ValueError("not an IPv6 address")
    if not valid_hostname(text):
        raise ValueError("not an IP address or a valid host name")
    return text


def normalise_address(text: str, default_port: int = DEFAULT_PORT) -> PeerAddress:
    """Parse and validate `host[:port]` (`[v6][:port]`, or a bare IPv6 address) from
    the command line, the API or gossip: the one place a peer address is checked.
    Raises ValueError, with the reason, on anything else."""
    if not isinstance(text, str):
        raise ValueError("peer address is not text")
    if len(text) > MAX_ADDRESS_TEXT:
        raise ValueError(f"invalid peer address {text[:40]!r}...: longer than {MAX_ADDRESS_TEXT} characters")
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty peer address")
    try:
        if not stripped.isascii():
            raise ValueError("not ASCII")
        bracketed = stripped.startswith("[")
        if bracketed:
            close = stripped.find("]")
            if close < 0:
                raise ValueError("no closing ']'")
            host_text, rest = stripped[1:close], stripped[close + 1:]
            if rest and not rest.startswith(":"):
                raise ValueError("junk after ']'")
            port_text = rest[1:] if rest else None
        elif stripped.count(":") > 1:
            host_text, port_text = stripped, None  # a bare IPv6 address
        else:
            host_text, sep, port_text = stripped.partition(":")
            if not sep:
                port_text = None
        if port_text is None:
            port = default_port
        elif _PORT.fullmatch(port_text):
            port = int(port_text)
        else:
            raise ValueError("port must be a number in 1..65535")
        if not 0 < port < 65536:
            raise ValueError("port must be a number in 1..65535")
        host = _host(host_text, bracketed)
    except ValueError as exc:
        raise ValueError(f"invalid peer address {stripped!r}: {exc} (expected host[:port])") from None
    return PeerAddress(host, port)


class ConnectionMaker:
    def __init__(self, *, rng: random.Random | None = None, discovery: bool = True) -> None:
        self._rng = rng or random.Random()
        self.discovery = discovery
        self._targets: dict[str, Target] = {}

    # -- what the user asks for

    def add_direct(self, addresses: list[str], now: float, replace: bool = False) -> None:
        wanted = set(addresses)
        if replace:
            for addr, target in list(self._targets.items()):
                if target.direct and addr not in wanted:
                    target.direct = False
                    if target.state is not TargetState.CONNECTED:
                        del self._targets[addr]
        for addr in addresses:
            target = self._targets.get(addr)
            if target is None:
                self._targets[addr] = Target(addr, direct=True, try_after=now)
            else:
                target.direct = True

    def forget(self, addresses: list[str]) -> None:
        for addr in addresses:
            target = self._targets.get(addr)
            if target is not None and target.direct:
                del self._targets[addr]

    def direct_targets(self) -> list[str]:
        return sorted(a for a, t in self._targets.items() if t.direct)

    # -- what gossip tells us

    def set_discovered(
        self, addresses: Set[str], now: float, delays: Mapping[str, float] | None = None
    ) -> int:
        """The addresses topology gossip suggests; stale undialled ones are dropped.

        A new target is first due after its entry in `delays` (the peer there is expected
        to dial us meanwhile), at once if it has none. At most MAX_DISCOVERED targets
        come from gossip (a peer can list any number of made-up connections); returns
        how many new addresses were left out for that reason."""
        if not self.discovery:
            addresses = set()
        for addr, target in list(self._targets.items()):
            if not target.direct and addr not in addresses and target.state is not TargetState.CONNECTED:
                del self._targets[addr]
        room = MAX_DISCOVERED - sum(1 for t in self._targets.values() if not t.direct)
        left_out = 0
        for addr in sorted(addresses):  # which ones are kept must not depend on set order
            if addr not in self._targets:
                if room <= 0:
                    left_out += 1
                    continue
                room -= 1
                delay = delays.get(addr, 0.0) if delays else 0.0
                self._targets[addr] = Target(addr, direct=False, try_after=now + delay)
        return left_out

    def retry_now(self, addresses: set[str], now: float) -> None:
        """Gossip says the peer at these addresses is new or restarted: try it straight away."""
        for addr in addresses:
            target = self._targets.get(addr)
            if target is not None and target.state in (TargetState.RETRYING, TargetState.FAILED):
                target.try_after = now
                target.interval = INITIAL_INTERVAL

    # -- what the dialler reports

    def due(
        self,
        now: float,
        skip_hosts: Set[str] = frozenset(),
        connected: Set[str] = frozenset(),
        limit: int | None = None,
    ) -> list[str]:
        """Targets to dial now, at most `limit` of them (the rest stay due). `connected`
        are addresses we already have a connection to; `skip_hosts` are IPs with an
        inbound connection (a target with the default port there is assumed to be that
        peer)."""
        ready: list[tuple[float, str, Target]] = []
        for addr, target in self._targets.items():
            if target.state in (TargetState.CONNECTING, TargetState.CONNECTED):
                continue
            host = addr.host if isinstance(addr, PeerAddress) else addr.rpartition(":")[0]
            if addr in connected or (host in skip_hosts and addr.endswith(f":{DEFAULT_PORT}")):
                # Look again later, not at once: the caller sleeps until next_wakeup().
                target.try_after = max(target.try_after, now + BUSY_HOST_RECHECK)
                continue
            if target.try_after <= now:
                ready.append((target.try_after, addr, target))
        if limit is not None and len(ready) > limit:
            # The longest-waiting first: targets that keep failing fast (a flood of bad
            # addresses from gossip) must not starve the others.
            ready.sort(key=lambda item: item[0])
            del ready[limit:]
        for _, _, target in ready:
            target.state = TargetState.CONNECTING
            target.attempts += 1
        return [addr for _, addr, _ in ready]

    def connected(self, address: str, now: float) -> None:
        target = self._targets.get(address)
        if target is not None:
            target.state = TargetState.CONNECTED
            target.connected_at = now
            target.last_error = ""

    def failed(self, address: str, now: float, error: str, permanent: bool = False) -> None:
        """A dial or a connection ended. Schedules the retry."""
        target = self._targets.get(address)
        if target is None:
            return
        lived = now - target.connected_at if target.state is TargetState.CONNECTED else 0.0
        target.last_error = error
        if permanent:
            target.state = TargetState.FAILED
            target.try_after = float("inf")
            return
        target.state = TargetState.RETRYING
        if lived > LONG_LIVED:
            target.interval = INITIAL_INTERVAL
            target.try_after = now
            return
        delay = target.interval * (0.5 + self._rng.random())
        target.try_after = now + delay
        target.interval = min(target.interval * BACKOFF_FACTOR, MAX_INTERVAL)

    def next_wakeup(self) -> float | None:
        times = [
            t.try_after
            for t in self._targets.values()
            if t.state in (TargetState.WAITING, TargetState.RETRYING) and t.try_after != float("inf")
        ]
        return min(times) if times else None

    def targets(self) -> list[Target]:
        return sorted(self._targets.values(), key=lambda t: t.address)
