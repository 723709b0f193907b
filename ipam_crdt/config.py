"""How an allocator is set up: `--ipalloc-init` bootstrap modes and the configuration."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ipam_crdt.address import CIDR
from ipam_crdt.errors import InvalidRequest
from ipam_crdt.paxos import quorum_for
from ipam_crdt.store import IPAMStore
from router.peername import parse_peer_name

TICK_INTERVAL = 5.0
CONTAINER_DIED_TIMEOUT = 30.0
DEFAULT_ALLOCATE_TIMEOUT = 120.0
DEFAULT_CLAIM_ATTEMPTS = 5


@dataclass(frozen=True)
class ConsensusMode:
    """`--ipalloc-init consensus[=N]`: agree on the initial peers by Paxos."""

    peer_count: int | None = None
    target_count: int = 0

    @property
    def quorum(self) -> int:
        return quorum_for(self.peer_count, self.target_count)


@dataclass(frozen=True)
class SeedMode:
    """`--ipalloc-init seed=A,B,...`: every seed peer builds the same ring locally."""

    peers: tuple[int, ...]


@dataclass(frozen=True)
class ObserverMode:
    """`--ipalloc-init observer`: never vote; get the ring from the others."""


Bootstrap = ConsensusMode | SeedMode | ObserverMode


def parse_ipalloc_init(text: str, target_count: int = 0) -> Bootstrap:
    """Parse the `--ipalloc-init` value: `consensus`, `consensus=N`, `seed=a,b`, `observer`."""
    kind, sep, arg = text.strip().partition("=")
    if kind == "consensus":
        if not sep:
            return ConsensusMode(None, target_count)
        if not (arg.isascii() and arg.isdigit()) or int(arg) < 1:
            raise InvalidRequest(f"invalid --ipalloc-init {text!r}: consensus=N needs a positive count")
        return ConsensusMode(int(arg), target_count)
    if kind == "seed" and sep and arg:
        try:
            return SeedMode(tuple(parse_peer_name(p) for p in arg.split(",")))
        except ValueError as exc:
            raise InvalidRequest(f"invalid --ipalloc-init {text!r}: {exc}") from None
    if kind == "observer" and not sep:
        return ObserverMode()
    raise InvalidRequest(f"invalid --ipalloc-init {text!r}: expected consensus[=N], seed=NAMES or observer")


@dataclass
class PreClaim:
    ident: str
    cidr: CIDR
    is_container: bool = True


@dataclass
class AllocatorConfig:
    our_name: int
    our_uid: int
    universe: CIDR
    bootstrap: Bootstrap = field(default_factory=ConsensusMode)
    our_nickname: str = ""
    store: IPAMStore | None = None
    # Whether a peer is currently reachable through the mesh (topology), as Weave's
    # isKnownPeer: used to pick donors, heirs, and for the status.
    is_known_peer: Callable[[int], bool] = lambda _name: True
    rng: random.Random = field(default_factory=random.Random)
    now: float = 0.0
    allocate_timeout: float = DEFAULT_ALLOCATE_TIMEOUT
    claim_attempts: int = DEFAULT_CLAIM_ATTEMPTS
    # Addresses in use on this host, claimed at start (ipam_crdt.reclaim); they never expire.
    pre_claims: list[PreClaim] = field(default_factory=list)
    # Names this host ran under before (its database's peer name, when the peer-name file
    # was lost): their ranges are ours to take over once the ring shows they are not live.
    previous_names: frozenset[int] = frozenset()
