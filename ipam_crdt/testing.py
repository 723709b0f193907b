"""An in-memory mesh of allocators, for tests and simulations (no sockets, no clock).

Messages wait in a queue until delivered; a partition holds back messages between
peers on different sides until it heals. Each peer keeps its store across a restart,
as a disk would, and comes back with a new UID as a restarted Weave router does.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ipam_crdt.address import CIDR
from ipam_crdt.allocator import (
    AllocateResult,
    Allocator,
    AllocatorConfig,
    Bootstrap,
    ClaimResult,
    ConsensusMode,
    Event,
)
from ipam_crdt.store import MemoryStore
from router.errors import WireError
from router.gossip_api import Action, SendBroadcast, SendUnicast

log = logging.getLogger(__name__)


@dataclass
class Message:
    src: int
    dst: int
    kind: str  # "unicast", "broadcast" or "gossip"
    payload: bytes


@dataclass
class SimPeer:
    name: int
    nickname: str
    bootstrap: Bootstrap
    store: MemoryStore
    alloc: Allocator | None
    uid: int = 0
    events: list[Event] = field(default_factory=list)
    configure: Callable[[AllocatorConfig], None] | None = None


class SimNetwork:
    def __init__(self, universe: CIDR, rng: random.Random, now: float = 1_000_000.0) -> None:
        self.universe = universe
        self.rng = rng
        self.now = now
        self.peers: dict[int, SimPeer] = {}
        self.queue: deque[Message] = deque()
        # Peers in different groups cannot talk; None means everyone can.
        self.groups: list[set[int]] | None = None
        self.errors: list[tuple[int, int, str]] = []
        self.delivered = 0

    # ------------------------------------------------------------ membership

    def add_peer(
        self,
        name: int,
        bootstrap: Bootstrap | None = None,
        nickname: str = "",
        *,
        store: MemoryStore | None = None,
        configure: Callable[[AllocatorConfig], None] | None = None,
    ) -> Allocator:
        """A new peer; `store` is its disk (a lost peer name: another peer's store),
        `configure` adjusts its config before it boots (pre-claims, previous names)."""
        store = store or MemoryStore()
        peer = SimPeer(name, nickname or f"p{name}", bootstrap or ConsensusMode(), store, None)
        peer.configure = configure
        self.peers[name] = peer
        self._boot(peer)
        assert peer.alloc is not None
        return peer.alloc

    def _boot(self, peer: SimPeer) -> None:
        peer.uid = self.rng.getrandbits(64)

        def is_known(other: int, me: int = peer.name) -> bool:
            return self.reachable(me, other)

        config = AllocatorConfig(
            our_name=peer.name,
            our_uid=peer.uid,
            universe=self.universe,
            bootstrap=peer.bootstrap,
            our_nickname=peer.nickname,
            store=peer.store,
            is_known_peer=is_known,
            rng=random.Random(self.rng.getrandbits(32)),
            now=self.now,
        )
        if peer.configure is not None:
            peer.configure(config)
        peer.alloc = Allocator(config)
        self._collect(peer)

    def crash(self, name: int) -> None:
        """Stop a peer; its store survives. Messages to and from it are lost."""
        self.peers[name].alloc = None
        self.queue = deque(m for m in self.queue if name not in (m.src, m.dst))

    def restart(self, name: int) -> Allocator:
        peer = self.peers[name]
        if peer.alloc is not None:
            self.crash(name)
        self._boot(peer)
        assert peer.alloc is not None
        return peer.alloc

    def remove(self, name: int) -> None:
        """A peer that is gone for good (its data with it)."""
        self.crash(name)
        del self.peers[name]

    def _is_up(self, name: int) -> bool:
        peer = self.peers.get(name)
        return peer is not None and peer.alloc is not None

    def up(self) -> list[SimPeer]:
        return [p for p in self.peers.values() if p.alloc is not None]

    def alloc(self, name: int) -> Allocator:
        a = self.peers[name].alloc
        assert a is not None, f"peer {name} is down"
        return a

    # ------------------------------------------------------------ connectivity

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def reachable(self, a: int, b: int) -> bool:
        if a == b:
            return True
        pa, pb = self.peers.get(a), self.peers.get(b)
        if pa is None or pb is None or pa.alloc is None or pb.alloc is None:
            return False
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    # ------------------------------------------------------------ messages

    def enqueue(self, src: int, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, SendUnicast):
                self.queue.append(Message(src, action.dst, "unicast", action.payload))
            elif isinstance(action, SendBroadcast):
                for dst in self.peers:
                    if dst != src:
                        self.queue.append(Message(src, dst, "broadcast", action.payload))

    def _collect(self, peer: SimPeer) -> None:
        assert peer.alloc is not None
        self.enqueue(peer.name, peer.alloc.drain_actions())
        peer.events.extend(peer.alloc.drain_events())

    def call(self, name: int, fn: Callable[[Allocator], object]) -> object:
        """Run something against a peer's allocator and collect what it sends."""
        peer = self.peers[name]
        assert peer.alloc is not None
        result = fn(peer.alloc)
        if isinstance(result, AllocateResult | ClaimResult):
            self.enqueue(name, result.actions)
        elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list):
            self.enqueue(name, result[1])
        elif isinstance(result, list):
            self.enqueue(name, result)
        self._collect(peer)
        return result

    def allocate(self, name: int, ident: str, subnet: CIDR | None = None) -> AllocateResult:
        r = self.call(name, lambda a: a.allocate(ident, subnet or self.universe, self.now))
        assert isinstance(r, AllocateResult)
        return r

    def claim(self, name: int, ident: str, cidr: CIDR) -> ClaimResult:
        r = self.call(name, lambda a: a.claim(ident, cidr, self.now))
        assert isinstance(r, ClaimResult)
        return r

    def rmpeer(self, name: int, gone: str) -> int:
        r = self.call(name, lambda a: a.admin_takeover(gone, self.now))
        assert isinstance(r, tuple)
        return int(r[0])

    def shutdown(self, name: int) -> None:
        self.call(name, lambda a: a.shutdown(self.now))

    def deliver(self, max_messages: int = 100_000, drop_rate: float = 0.0) -> int:
        """Deliver queued messages that can get through; others stay queued."""
        held: deque[Message] = deque()
        count = 0
        while self.queue and count < max_messages:
            m = self.queue.popleft()
            if not self.reachable(m.src, m.dst):
                if self._is_up(m.src) and self._is_up(m.dst):
                    held.append(m)  # partitioned: wait for the heal
                continue
            count += 1
            if drop_rate and self.rng.random() < drop_rate:
                continue
            self._deliver_one(m)
        self.queue.extendleft(reversed(held))
        self.delivered += count
        return count

    def _deliver_one(self, m: Message) -> None:
        peer = self.peers[m.dst]
        alloc = peer.alloc
        assert alloc is not None
        try:
            if m.kind == "unicast":
                self.enqueue(m.dst, alloc.on_gossip_unicast(m.src, m.payload))
            elif m.kind == "broadcast":
                alloc.on_gossip_broadcast(m.src, m.payload)
            else:
                alloc.on_gossip(m.payload)
        except WireError as exc:
            # The mesh would drop the connection; here the message is simply lost.
            self.errors.append((m.src, m.dst, str(exc)))
        self._collect(peer)

    def gossip_round(self) -> None:
        """Periodic gossip: every peer sends its full state to every peer it can reach."""
        for peer in self.up():
            assert peer.alloc is not None
            [payload] = peer.alloc.gossip().encode()
            for other in self.up():
                if other.name != peer.name and self.reachable(peer.name, other.name):
                    self.queue.append(Message(peer.name, other.name, "gossip", payload))

    def tick(self, seconds: float = 5.0) -> None:
        self.now += seconds
        for peer in self.up():
            assert peer.alloc is not None
            self.enqueue(peer.name, peer.alloc.tick(self.now))
            peer.events.extend(peer.alloc.drain_events())

    def settle(self, rounds: int = 10, drop_rate: float = 0.0, max_messages: int = 200_000) -> None:
        """`rounds` times: a tick, a gossip round, and delivery until nothing more gets through.

        Raises AssertionError if messages keep flowing without end (a livelock).
        """
        for _ in range(rounds):
            self.tick()
            self.gossip_round()
            budget = max_messages
            while self.queue:
                n = self.deliver(max_messages=budget, drop_rate=drop_rate)
                if n == 0:
                    break
                budget -= n
                if budget <= 0:
                    raise AssertionError(f"messages never settle: {len(self.queue)} still queued")
