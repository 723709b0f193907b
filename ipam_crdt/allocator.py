"""The IPAM allocator: ring, space, Paxos and persistence behind one sans-IO state machine.

Inputs are method calls with the current time; outputs are return values, messages to
send (`router.gossip_api` actions) and events for requests that completed later.

Driving it:
- `now` is Unix time in seconds (it goes on the wire as gossipState.Now).
- After constructing it, send `drain_actions()`: a ring made from a seed is broadcast.
- Call `tick(now)` every `TICK_INTERVAL` seconds; it retries what is pending.
- `allocate`/`claim`/`prime` answer at once when they can. Otherwise they return a
  pending result, and the outcome comes later as an event from `drain_events()`.
- It is the `Gossiper` of the `IPallocation` channel. `on_gossip_unicast` returns its
  replies directly. After `on_gossip` and `on_gossip_broadcast`, the service must send
  `drain_actions()` (for example, a ring made by consensus is broadcast from there).
- Every public call persists what it changed before it returns, so an address that
  `allocate` returns is already durable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from ipam_crdt import status, wire
from ipam_crdt.address import CIDR, Range, ip_str
from ipam_crdt.config import (
    CONTAINER_DIED_TIMEOUT,
    TICK_INTERVAL,
    AllocatorConfig,
    Bootstrap,
    ConsensusMode,
    ObserverMode,
    PreClaim,
    SeedMode,
    parse_ipalloc_init,
)
from ipam_crdt.conflicts import SeedConflict, preferred, ring_used
from ipam_crdt.errors import DifferentRange, DifferentSeeds, InvalidRequest, IPAMError, NotFound
from ipam_crdt.events import (
    Allocated,
    AllocateFailed,
    AllocateResult,
    Claimed,
    ClaimFailed,
    ClaimResult,
    Event,
    Primed,
)
from ipam_crdt.naming import annotated, peer_str
from ipam_crdt.paxos import Node, NodeID, Observer, Participant
from ipam_crdt.ring import UNKNOWN_PEER, Ring
from ipam_crdt.space import Space
from ipam_crdt.store import IPAMStore, MemoryStore, OwnedData
from router import ratelog
from router.gossip_api import Action, SendBroadcast, SendUnicast
from router.peername import parse_peer_name

__all__ = [
    "Allocator", "AllocatorConfig", "Bootstrap", "ConsensusMode", "SeedMode", "ObserverMode",
    "PreClaim", "parse_ipalloc_init", "Allocated", "AllocateFailed", "Claimed", "ClaimFailed",
    "Primed", "Event", "AllocateResult", "ClaimResult", "SeedConflict", "TICK_INTERVAL",
    "NO_CONTAINER_ID",
]

log = logging.getLogger(__name__)

# Weave's api.NoContainerID: the allocation is filed under the address itself.
NO_CONTAINER_ID = "_"
MAX_RECLAIM_FAILURES = 16


# ------------------------------------------------------------------ pending operations


@dataclass
class _Allocate:
    ident: str
    subnet: CIDR
    is_container: bool
    deadline: float
    result: Event | None = None


@dataclass
class _Claim:
    ident: str
    cidr: CIDR
    is_container: bool
    no_error_on_unknown: bool
    deadline: float
    attempts: int = 0
    answered: bool = False  # with no_error_on_unknown, the caller was told "ok" early
    result: Event | None = None
    on_host: bool = False  # a pre-claim: the address is in use on this host


@dataclass
class _Prime:
    result: Event | None = None


class _GossipData:
    """Weave's ipamGossipData: always encodes our latest state; merging is a no-op."""

    def __init__(self, alloc: Allocator) -> None:
        self._alloc = alloc

    def encode(self) -> list[bytes]:
        return [self._alloc.encode()]

    def merge(self, other: object) -> _GossipData:
        return self


# ------------------------------------------------------------------ the allocator


class Allocator:
    def __init__(self, config: AllocatorConfig) -> None:
        self.config = config
        self.our_name = config.our_name
        self.universe = config.universe
        self.store: IPAMStore = config.store if config.store is not None else MemoryStore()
        r = config.universe.range()
        self.ring = Ring(r.start, r.end, config.our_name)
        self.space = Space()
        self.owned: dict[str, OwnedData] = {}
        self.nicknames: dict[int, str] = {config.our_name: config.our_nickname}
        self.paxos: Participant | None
        if isinstance(config.bootstrap, ObserverMode):
            self.paxos = Observer()
        else:
            quorum = config.bootstrap.quorum if isinstance(config.bootstrap, ConsensusMode) else 1
            self.paxos = Node(NodeID(config.our_name, config.our_uid), quorum)
        self.awaiting_consensus = False
        self.shutting_down = False
        self.pending_allocates: list[_Allocate] = []
        self.pending_claims: list[_Claim] = []
        self.pending_primes: list[_Prime] = []
        self.dead: dict[str, float] = {}
        self.conflict: SeedConflict | None = None
        # Addresses in use on this host that IPAM refused to us (a live peer holds them).
        self.reclaim_failures: list[str] = []
        self._heard_from_mesh = False
        self.now = config.now
        self._rng = config.rng
        self._outbox: list[Action] = []
        self._broadcast_wanted = False
        self._events: list[Event] = []
        # (donor, range) pairs asked during the current call: one request each is enough.
        self._asked: set[tuple[int, Range]] = set()
        self._start()

    # -------------------------------------------------------------- start-up

    def _start(self) -> None:
        # Pre-claims (addresses found on the host) queue first, so that a ring made
        # from a seed below already honours them.
        for pc in self.config.pre_claims:
            # No deadline: the address is in use here, and giving up on it would let
            # another peer hand it out (after an rmpeer of its owner, say).
            op = _Claim(pc.ident, pc.cidr, pc.is_container, True, math.inf)
            op.answered = True  # nobody waits for a pre-claim
            op.on_host = True
            self.pending_claims.append(op)
        loaded = self._load_persisted()
        seed = self.config.bootstrap.peers if isinstance(self.config.bootstrap, SeedMode) else ()
        if loaded and seed and self.ring.is_empty():
            # Persisted before any ring existed: the seed still decides the ring.
            log.info("Initialising with persisted data and supplied IPAM seed")
            self._create_ring(seed)
        elif loaded and seed:
            log.info("Found persisted IPAM data, ignoring supplied IPAM seed")
        elif loaded:
            log.info("Initialising with persisted data")
        elif seed:
            log.info("Initialising with supplied IPAM seed")
            self._create_ring(seed)
        elif self.paxos is not None and self.paxos.is_elector:
            log.info("Initialising via deferred consensus")
        else:
            log.info("Initialising as observer - awaiting IPAM data from another peer")
        if loaded:
            self._try_ops(self.pending_claims)
        self._after_call()
        self._events.clear()

    def _load_persisted(self) -> bool:
        persisted = self.store.load(self.our_name, self.universe.range())
        if persisted is None:
            self._persist_ring()
            return False
        self.ring.restore(persisted.ring)
        self.space.update_ranges(self.ring.owned_ranges())
        self.owned = persisted.owned
        self._drop_contradicted()
        for data in self.owned.values():
            for cidr in data.cidrs:
                if self.ring.contains(cidr.addr):
                    try:
                        self.space.claim(cidr.addr)
                    except IPAMError as exc:
                        log.warning("persisted address %s no longer in our space: %s", cidr, exc)
        return True

    def _drop_contradicted(self) -> None:
        """Forget database entries for addresses the host says another ident uses.

        Pre-claims are read from the kernel (a container's interface holds the address), so
        they win over what the database remembers for some other ident.
        """
        users = {pc.cidr.addr: pc.ident for pc in self.config.pre_claims if pc.ident != NO_CONTAINER_ID}
        for ident, data in list(self.owned.items()):
            stale = [c for c in data.cidrs if users.get(c.addr, ident) != ident]
            if not stale:
                continue
            log.warning(
                "persisted %s for %s, but %s uses it on this host; forgetting the persisted entry",
                ", ".join(str(c) for c in stale), ident, users[stale[0].addr],
            )
            data.cidrs = [c for c in data.cidrs if c not in stale]
            if not data.cidrs:
                del self.owned[ident]
            self.store.save_owned(ident, data if data.cidrs else None)

    def _take_over_previous_name(self, owner: int) -> bool:
        """Take the ranges of `owner`, an earlier name of this host, if it is not live.

        The database says this host ran as `owner`, and its containers' addresses lie in
        `owner`'s ranges; nobody else can hand them out, and nobody will answer for them.
        Taking them over is what `weave rmpeer OLD` run here would do, but done before any
        other peer can rmpeer that name and hand the addresses out again.
        """
        # Only once another peer has spoken to us: before that, an unknown peer may just be
        # one we have not heard of yet.
        if not self._heard_from_mesh or owner not in self.config.previous_names:
            return False
        if self.config.is_known_peer(owner):
            return False
        moved = self.ring.transfer(owner, self.our_name)
        if not moved:
            return False
        log.warning(
            "Taking over %d addresses of %s, this host's previous peer name (its containers use them)",
            sum(r.size for r in moved), peer_str(owner),
        )
        self._persist_ring()
        self.space.update_ranges(self.ring.owned_ranges())
        self._broadcast()
        return True

    # -------------------------------------------------------------- plumbing

    def _set_now(self, now: float | None) -> None:
        if now is not None and now > self.now:
            self.now = now

    def _send(self, dst: int, msg: wire.Unicast) -> None:
        self._outbox.append(SendUnicast(dst, wire.encode_unicast(msg)))

    def _broadcast(self) -> None:
        self._broadcast_wanted = True

    def _send_ring_update(self, dst: int) -> None:
        self._send(dst, wire.RingUpdate(self._gossip_state()))

    def drain_actions(self) -> list[Action]:
        """Messages to send, in order; a wanted broadcast goes last with the latest state."""
        out, self._outbox = self._outbox, []
        if self._broadcast_wanted:
            self._broadcast_wanted = False
            out.append(SendBroadcast(self.encode()))
        return out

    def drain_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _after_call(self) -> None:
        self._report_free_space()
        self._asked.clear()

    def _persist_ring(self) -> None:
        self.store.save_ring(self.our_name, self.ring)

    # -------------------------------------------------------------- encoding

    def _gossip_state(self) -> wire.GossipState:
        # Paxos only matters until there is a ring. An observer sends a nil Paxos map,
        # which makes electors with a ring send it back to us.
        if self.ring.is_empty():
            paxos = None if self.paxos is None else self.paxos.gossip_state()
            return wire.GossipState(int(self.now), dict(self.nicknames), paxos, None)
        return wire.GossipState(int(self.now), dict(self.nicknames), None, wire.RingData.of(self.ring))

    def encode(self) -> bytes:
        return wire.encode_gossip_state(self._gossip_state())

    # -------------------------------------------------------------- Gossiper

    def gossip(self) -> _GossipData:
        return _GossipData(self)

    def on_gossip(self, payload: bytes) -> None:
        """Periodic gossip: merge it; Weave never passes IPAM gossip on."""
        try:
            self._update(UNKNOWN_PEER, payload)
        finally:
            self._after_call()
        return None

    def on_gossip_broadcast(self, src: int, payload: bytes) -> _GossipData:
        try:
            self._update(src, payload)
        finally:
            self._after_call()
        return self.gossip()

    def on_gossip_unicast(self, src: int, payload: bytes) -> list[Action]:
        try:
            msg = wire.decode_unicast(payload)
            if isinstance(msg, wire.SpaceRequest):
                log.debug("Peer %s asked me for space in %s", peer_str(src), msg.range)
                # Without a ring we have nothing to give; they will ask again.
                if not self.ring.is_empty():
                    self._donate_space(msg.range, src)
            elif isinstance(msg, wire.SpaceRequestDenied):
                self._space_request_denied(src, msg.range)
            else:
                self._update_state(src, msg.state)
        finally:
            self._after_call()
        return self.drain_actions()

    # -------------------------------------------------------------- merging state

    def _update(self, sender: int, payload: bytes) -> None:
        self._update_state(sender, wire.decode_gossip_state(payload))

    def _update_state(self, sender: int, state: wire.GossipState) -> None:
        self._heard_from_mesh = True
        if state.nicknames:
            self.nicknames.update(state.nicknames)
        if state.ring is not None:
            self._merge_ring(sender, state.ring.to_ring())
        elif not self.ring.is_empty():
            # The sender is proposing, or asking for a ring: it can have ours.
            if sender != UNKNOWN_PEER:
                self._send_ring_update(sender)
        elif state.paxos is not None:
            if self.paxos is not None and self.paxos.update(state.paxos):
                if self.paxos.think():
                    self._broadcast()
                consensus = self.paxos.consensus()
                if consensus is not None:
                    self._create_ring(consensus.value)
        elif self.paxos is not None and self.paxos.is_elector and sender != UNKNOWN_PEER:
            # A non-elector asked for a ring on an explicit broadcast: make one.
            self._establish_ring()

    def _merge_ring(self, sender: int, theirs: Ring) -> None:
        try:
            updated = self.ring.merge(theirs, self._has_allocations)
        except DifferentSeeds as exc:
            if theirs.range != self.ring.range:
                self._range_conflict(sender, theirs)
            if self._adopt_if_unused(sender, theirs):
                return
            if self._they_will_adopt(theirs):
                # No need to drop the connection: our ring is about to replace theirs.
                log.info("Peer %s has an unused ring seeded differently; sending it ours",
                         annotated(sender, self.nicknames))
                if sender != UNKNOWN_PEER:
                    self._send_ring_update(sender)
                return
            message = (
                f"IP allocation was seeded by different peers (received: {self._annotate(exc.received)}, "
                f"ours: {self._annotate(exc.ours)})"
            )
            self._note_conflict(sender, message)
            raise DifferentSeeds(exc.received, exc.ours, message) from None
        except DifferentRange:
            self._range_conflict(sender, theirs)
        if self.conflict is not None and self.conflict.peer == sender:
            self.conflict = None
        if updated:
            self._prune_nicknames()
            self._ring_updated()

    def _range_conflict(self, sender: int, theirs: Ring) -> NoReturn:
        message = (
            f"Incompatible IP allocation ranges (received: {theirs.range.as_cidr_string()}, "
            f"ours: {self.ring.range.as_cidr_string()})"
        )
        self._note_conflict(sender, message)
        raise DifferentRange(theirs.range, self.ring.range, message) from None

    def _has_allocations(self, ranges: list[Range]) -> bool:
        return self.space.has_used_in(ranges)

    def _annotate(self, names: Iterable[int]) -> str:
        return "[" + " ".join(annotated(n, self.nicknames) for n in names) + "]"

    def _note_conflict(self, sender: int, message: str) -> None:
        c = self.conflict
        if c is not None and c.message == message:
            self.conflict = SeedConflict(c.peer, message, c.first_seen, self.now, c.count + 1)
            return
        # Every differing message from a peer is a new line otherwise: rate limited.
        ratelog.reject(log, "ipam", "conflict", "%s (from %s)", message, annotated(sender, self.nicknames),
                       level=logging.ERROR)
        self.conflict = SeedConflict(sender, message, self.now, self.now)

    def _adopt_if_unused(self, sender: int, theirs: Ring) -> bool:
        """Resolve a seed conflict automatically when that loses nothing.

        We give up our ring for theirs only if ours holds no allocations, and, so that
        two unused rings do not swap forever, only if theirs holds allocations or has
        the smaller seed list.
        """
        if self.space.num_used() > 0 or any(
            self.ring.contains(c.addr) for d in self.owned.values() for c in d.cidrs
        ):
            return False
        if not preferred(theirs, self.ring):
            return False
        log.warning(
            "IP allocation was seeded by different peers (received: %s, ours: %s); our ring holds no "
            "allocations, so we adopt the ring of %s",
            self._annotate(theirs.seeds), self._annotate(self.ring.seeds), annotated(sender, self.nicknames),
        )
        r = self.universe.range()
        self.ring = Ring(r.start, r.end, self.our_name)
        self.space.clear()
        self.ring.merge(theirs, self._has_allocations)
        self.conflict = None
        self._prune_nicknames()
        self._ring_updated()
        self._broadcast()
        return True

    def _they_will_adopt(self, theirs: Ring) -> bool:
        """Whether the sender of `theirs` will give it up for ours (see _adopt_if_unused)."""
        return not ring_used(theirs) and preferred(self.ring, theirs)

    def _prune_nicknames(self) -> None:
        in_ring = self.ring.peer_names()
        for name in list(self.nicknames):
            if name != self.our_name and name not in in_ring and not self.config.is_known_peer(name):
                del self.nicknames[name]

    # -------------------------------------------------------------- ring life cycle

    def _establish_ring(self) -> None:
        if not self.ring.is_empty() or self.awaiting_consensus or self.paxos is None:
            return
        self.awaiting_consensus = True
        self._propose()
        consensus = self.paxos.consensus()
        if consensus is not None:
            # With a quorum of 1, proposing reaches consensus at once.
            self._create_ring(consensus.value)

    def _propose(self) -> None:
        if self.paxos is not None:
            log.debug("Paxos proposing")
            self.paxos.propose()
        self._broadcast()

    def _create_ring(self, peers: Iterable[int]) -> None:
        names = sorted(set(peers))
        log.info("Paxos consensus: %s", " ".join(peer_str(p) for p in names))
        self.ring.claim_for_peers(names)
        self._ring_updated()
        self._broadcast()

    def _ring_updated(self) -> None:
        if self.awaiting_consensus:
            self.awaiting_consensus = False
            self.paxos = None
        self._persist_ring()
        self.space.update_ranges(self.ring.owned_ranges())
        self._try_pending_ops()

    def _report_free_space(self) -> None:
        ranges = self.ring.owned_ranges()
        if not ranges:
            return
        free = {r.start: self.space.num_free_in_range(r) for r in ranges}
        if self.ring.report_free(free):
            self._persist_ring()

    def _donate_space(self, r: Range, to: int) -> None:
        block = self.space.donate(r)
        if block is None:
            log.debug("No space to give to peer %s", peer_str(to))
            self._send(to, wire.SpaceRequestDenied(r))
        else:
            log.debug("Giving range %s to %s", block, peer_str(to))
            self.ring.grant_range_to_host(block.start, block.end, to)
            self._persist_ring()
        # Always: it tells them what we gave, or where else to look.
        self._send_ring_update(to)

    def _space_request_denied(self, sender: int, r: Range) -> None:
        for op in list(self.pending_claims):
            if r.contains(op.cidr.addr):
                self.pending_claims.remove(op)
                self._finish_claim(op, self._denied_message(op.cidr, sender))
                if op.result is not None:
                    self._events.append(op.result)

    def _denied_message(self, cidr: CIDR, owner: int) -> str:
        nick = self.nicknames.get(owner)
        suffix = f" ({nick})" if nick else ""
        return f"address {cidr} is owned by other peer {peer_str(owner)}{suffix}"

    # -------------------------------------------------------------- owned addresses

    def _add_owned(self, ident: str, cidr: CIDR, is_container: bool) -> None:
        data = self.owned.get(ident)
        if data is None:
            data = self.owned[ident] = OwnedData(is_container)
        data.is_container = is_container
        data.cidrs.append(cidr)
        self.store.save_owned(ident, data)

    def _owned_in_range(self, ident: str, r: Range) -> list[CIDR]:
        data = self.owned.get(ident)
        return [c for c in data.cidrs if r.contains(c.addr)] if data else []

    def _find_owner(self, addr: int) -> str | None:
        for ident, data in self.owned.items():
            if any(c.addr == addr for c in data.cidrs):
                return ident
        return None

    def _release(self, cidrs: Iterable[CIDR]) -> None:
        for cidr in cidrs:
            if self.space.is_used(cidr.addr):
                self.space.release(cidr.addr)

    # -------------------------------------------------------------- operations

    def _try_ops(self, ops: list[Any]) -> None:
        for op in list(ops):
            if op not in ops:
                continue
            done = self._try(op)
            if done:
                ops.remove(op)
                if op.result is not None:
                    self._events.append(op.result)

    def _try_pending_ops(self) -> None:
        self._try_ops(self.pending_primes)
        self._try_ops(self.pending_claims)
        self._try_ops(self.pending_allocates)

    def _have_pending_ops(self) -> bool:
        return bool(self.pending_primes or self.pending_claims or self.pending_allocates)

    def _try(self, op: _Allocate | _Claim | _Prime) -> bool:
        if isinstance(op, _Allocate):
            return self._try_allocate(op)
        if isinstance(op, _Claim):
            return self._try_claim(op)
        if self.ring.is_empty():
            self._establish_ring()
            return False
        op.result = Primed()
        return True

    def _try_allocate(self, op: _Allocate) -> bool:
        existing = self._owned_in_range(op.ident, op.subnet.range())
        if existing:
            self.dead.pop(op.ident, None)
            op.result = Allocated(op.ident, op.subnet, existing[0])
            return True
        self._establish_ring()
        addr = self.space.allocate(op.subnet.host_range())
        if addr is not None:
            ident = ip_str(addr) if op.ident == NO_CONTAINER_ID else op.ident
            cidr = op.subnet.with_addr(addr)
            log.debug("Allocated %s for %s in %s", ip_str(addr), ident, op.subnet)
            self._add_owned(ident, cidr, op.is_container)
            op.result = Allocated(op.ident, op.subnet, cidr)
            return True
        # Weave asks for the whole subnet, network and broadcast address included; those
        # two can never be allocated, and once they are all that is left, peers pass them
        # back and forth for ever. We ask only for addresses we could use. (As a donor we
        # answer whatever range we are asked for, exactly as Weave does.)
        self._ask_for_space(op.subnet.host_range())
        return False

    def _ask_for_space(self, r: Range) -> None:
        for donor in self.ring.choose_peers_to_ask_for_space(r.start, r.end, self._rng):
            if not self.config.is_known_peer(donor):
                continue
            if (donor, r) not in self._asked:
                self._asked.add((donor, r))
                log.debug("Decided to ask peer %s for space in range %s", peer_str(donor), r)
                self._send(donor, wire.SpaceRequest(r))
            return

    def _finish_claim(self, op: _Claim, error: str | None) -> None:
        if error is None:
            op.result = None if op.answered else Claimed(op.ident, op.cidr)
        elif op.answered:
            log.error("[allocator] %s", error)
            if op.on_host:
                self.reclaim_failures.append(f"{op.ident}: {error}")
                del self.reclaim_failures[:-MAX_RECLAIM_FAILURES]
            op.result = None
        else:
            op.result = ClaimFailed(op.ident, op.cidr, error)

    def _try_claim(self, op: _Claim) -> bool:
        addr = op.cidr.addr
        if not self.ring.contains(addr):
            log.info("Address %s claimed by %s - not in our range", op.cidr, op.ident)
            self._add_owned(op.ident, op.cidr, op.is_container)
            self._finish_claim(op, None)
            return True
        self._establish_ring()
        self.dead.pop(op.ident, None)
        owner = self.ring.owner(addr)
        if owner not in (UNKNOWN_PEER, self.our_name) and self._take_over_previous_name(owner):
            owner = self.ring.owner(addr)
        if owner == UNKNOWN_PEER:
            log.info(
                "Claim %s for %s: is in the range %s, but the allocator is not initialized yet; "
                "will try later.",
                op.cidr, op.ident, self.universe,
            )
            self._answer_early(op)
            return False
        if owner != self.our_name:
            if op.attempts >= self.config.claim_attempts or not self.config.is_known_peer(owner):
                if op.no_error_on_unknown and op.attempts < self.config.claim_attempts:
                    self._answer_early(op)
                    return False
                self._finish_claim(op, self._denied_message(op.cidr, owner))
                return True
            op.attempts += 1
            log.debug("requesting address %s from other peer %s", op.cidr, peer_str(owner))
            self._send(owner, wire.SpaceRequest(Range(addr, addr + 1)))
            return False
        existing = self._find_owner(addr)
        addr_ident = ip_str(addr)
        if existing is None:
            try:
                self.space.claim(addr)
            except IPAMError as exc:
                self._finish_claim(op, str(exc))
                return True
            self._add_owned(addr_ident if op.ident == NO_CONTAINER_ID else op.ident, op.cidr, op.is_container)
            self._finish_claim(op, None)
        elif existing == op.ident or (op.ident == NO_CONTAINER_ID and existing == addr_ident):
            self._finish_claim(op, None)
        elif existing == addr_ident:
            self._finish_claim(op, f"address {op.cidr} already in use")
        elif op.ident == NO_CONTAINER_ID:
            self._finish_claim(op, None)
        else:
            self._finish_claim(op, f"address {op.cidr} is already owned by {existing}")
        return True

    def _answer_early(self, op: _Claim) -> None:
        """With no_error_on_unknown the caller hears "ok" now; we keep trying."""
        if op.no_error_on_unknown and not op.answered:
            op.answered = True
            if op in self.pending_claims:  # else claim() itself returns the answer
                self._events.append(Claimed(op.ident, op.cidr))

    # -------------------------------------------------------------- public API

    def allocate(
        self, ident: str, subnet: CIDR, now: float | None = None, is_container: bool = True
    ) -> AllocateResult:
        """An address for `ident` in `subnet`: the one it has there already, or a new one."""
        self._set_now(now)
        if not self.universe.range().overlaps(subnet.range()):
            raise InvalidRequest(f"range {subnet} out of bounds: {self.universe}")
        if self.shutting_down:
            return AllocateResult(None, [], f"Allocate request for {ident} cancelled")
        for op in self.pending_allocates:
            if op.ident == ident and op.subnet == subnet and ident != NO_CONTAINER_ID:
                return AllocateResult(None, self.drain_actions())
        op = _Allocate(ident, subnet, is_container, self.now + self.config.allocate_timeout)
        try:
            if not self._try_allocate(op):
                self.pending_allocates.append(op)
        finally:
            self._after_call()
        result = op.result
        if isinstance(result, Allocated):
            return AllocateResult(result.cidr, self.drain_actions())
        return AllocateResult(None, self.drain_actions())

    def claim(
        self,
        ident: str,
        cidr: CIDR,
        now: float | None = None,
        is_container: bool = True,
        no_error_on_unknown: bool = False,
    ) -> ClaimResult:
        """Record that `ident` uses `cidr` (a restarted container, `weave attach ip:...`)."""
        self._set_now(now)
        if self.shutting_down:
            return ClaimResult(True, [], f"Claim request for {ident} cancelled")
        op = _Claim(ident, cidr, is_container, no_error_on_unknown, self.now + self.config.allocate_timeout)
        try:
            done = self._try_claim(op)
            if not done:
                self.pending_claims.append(op)
        finally:
            self._after_call()
        actions = self.drain_actions()
        if done:
            if isinstance(op.result, ClaimFailed):
                return ClaimResult(True, actions, op.result.reason)
            return ClaimResult(True, actions)
        if op.answered:
            return ClaimResult(True, actions)
        return ClaimResult(False, actions)

    def prime(self, now: float | None = None) -> tuple[bool, list[Action]]:
        """Make sure a ring exists (`weave prime`); True once it does."""
        self._set_now(now)
        op = _Prime()
        try:
            done = self._try(op)
            if not done:
                self.pending_primes.append(op)
        finally:
            self._after_call()
        return done, self.drain_actions()

    def lookup(self, ident: str, r: Range | None = None) -> list[CIDR]:
        data = self.owned.get(ident)
        if data is None:
            return []
        return [c for c in data.cidrs if r is None or r.contains(c.addr)]

    def owned_addresses(self) -> dict[str, list[CIDR]]:
        return {ident: list(d.cidrs) for ident, d in self.owned.items()}

    def free(self, ident: str, addr: int | None = None, now: float | None = None) -> None:
        """Release one address of `ident`, or all of them when addr is None."""
        self._set_now(now)
        # A container detached before its address was reclaimed: stop claiming it.
        host_claims = [o for o in self.pending_claims
                       if o.on_host and o.ident == ident and addr in (None, o.cidr.addr)]
        for op in host_claims:
            self.pending_claims.remove(op)
        data = self.owned.get(ident)
        if host_claims and (data is None or not any(addr in (None, c.addr) for c in data.cidrs)):
            self._after_call()
            return
        if addr is None:
            if data is None or not data.cidrs:
                raise NotFound(f"Delete: no addresses for {ident}")
            del self.owned[ident]
            self.store.save_owned(ident, None)
            self._release(data.cidrs)
        else:
            match = [c for c in data.cidrs if c.addr == addr] if data is not None else []
            if data is None or not match:
                raise NotFound(f"Free: address {ip_str(addr)} not found for {ident}")
            data.cidrs.remove(match[0])
            if not data.cidrs:
                del self.owned[ident]
            self.store.save_owned(ident, data if data.cidrs else None)
            self._release(match)
        self._after_call()

    def cancel(self, ident: str) -> None:
        """Cancel pending requests for `ident` (its caller gave up or it died)."""
        for alloc_op in [o for o in self.pending_allocates if o.ident == ident]:
            self.pending_allocates.remove(alloc_op)
            reason = f"Allocate request for {ident} cancelled"
            self._events.append(AllocateFailed(ident, alloc_op.subnet, reason))
        # Not a pre-claim: the address is in use here whatever this caller does (free drops it).
        for claim_op in [o for o in self.pending_claims if o.ident == ident and not o.on_host]:
            self.pending_claims.remove(claim_op)
            self._finish_claim(claim_op, f"Claim request for {ident} cancelled")
            if claim_op.result is not None:
                self._events.append(claim_op.result)

    def container_died(self, ident: str, now: float | None = None) -> None:
        """Free its addresses after CONTAINER_DIED_TIMEOUT unless it starts again."""
        self._set_now(now)
        data = self.owned.get(ident)
        if data is not None and data.is_container:
            self.dead[ident] = self.now
        self.cancel(ident)

    def container_started(self, ident: str) -> None:
        self.dead.pop(ident, None)

    def container_destroyed(self, ident: str) -> None:
        data = self.owned.get(ident)
        if data is not None and data.is_container:
            self.free(ident)
            self.dead.pop(ident, None)

    def prune_owned(self, live_idents: Iterable[str]) -> None:
        """Forget containers that no longer exist (start-up clean-up)."""
        live = set(live_idents)
        for ident, data in list(self.owned.items()):
            if data.is_container and ident not in live:
                log.debug("Deleting old entry %s: %s", ident, [str(c) for c in data.cidrs])
                self.free(ident)

    def tick(self, now: float) -> list[Action]:
        """Retry what is pending (Weave does this every 5 s) and expire what waited too long."""
        self._set_now(now)
        try:
            if self.awaiting_consensus:
                self._propose()
            elif self._have_pending_ops():
                if self.ring.is_empty():
                    self._establish_ring()
                else:
                    self._try_pending_ops()
            self._remove_dead_containers()
            self._expire_ops()
        finally:
            self._after_call()
        return self.drain_actions()

    def _remove_dead_containers(self) -> None:
        cutoff = self.now - CONTAINER_DIED_TIMEOUT
        for ident, died in list(self.dead.items()):
            if died < cutoff:
                del self.dead[ident]
                if ident in self.owned:
                    self.free(ident)
                    log.debug("Removed addresses for container %s", ident)

    def _expire_ops(self) -> None:
        for op in [o for o in self.pending_allocates if o.deadline <= self.now]:
            self.pending_allocates.remove(op)
            reason = (
                f"no free address in {op.subnet} after {self.config.allocate_timeout:g}s "
                f"(IPAM status: {self.status_line()})"
            )
            log.warning("Allocate for %s failed: %s", op.ident, reason)
            self._events.append(AllocateFailed(op.ident, op.subnet, reason))
        for claim in [o for o in self.pending_claims if o.deadline <= self.now]:
            self.pending_claims.remove(claim)
            self._finish_claim(claim, f"could not claim {claim.cidr} after {self.config.allocate_timeout:g}s")
            if claim.result is not None:
                self._events.append(claim.result)

    # -------------------------------------------------------------- peers

    def peer_gone(self, name: int) -> None:
        if name not in self.ring.peer_names() and name != self.our_name:
            self.nicknames.pop(name, None)

    def _lookup_peer(self, name_or_nick: str) -> int | None:
        for name, nick in self.nicknames.items():
            if nick == name_or_nick:
                return name
        try:
            return parse_peer_name(name_or_nick)
        except ValueError:
            return None

    def admin_takeover(self, name_or_nick: str, now: float | None = None) -> tuple[int, list[Action]]:
        """`weave rmpeer`: take over a (dead) peer's ranges. Returns the addresses gained."""
        self._set_now(now)
        peer = self._lookup_peer(name_or_nick)
        if peer is None:
            log.warning("attempt to take over range from unknown peer '%s'", name_or_nick)
            return 0, []
        if peer == self.our_name:
            log.warning("attempt to take over range from ourself")
            return 0, []
        if not self.ring.transfer(peer, self.our_name):
            return 0, []
        before = self.space.num_free()
        try:
            self._ring_updated()
            self._broadcast()
        finally:
            self._after_call()
        return self.space.num_free() - before, self.drain_actions()

    def _pick_heir(self) -> int:
        known = self.config.is_known_peer
        heir = self.ring.pick_peer_for_transfer(known)
        if heir == UNKNOWN_PEER:
            heir = next((n for n in self.nicknames if n != self.our_name and known(n)), UNKNOWN_PEER)
        if heir == UNKNOWN_PEER:
            heir = self.ring.pick_peer_for_transfer(lambda _n: True)
        if heir == UNKNOWN_PEER:
            heir = next((n for n in self.nicknames if n != self.our_name), UNKNOWN_PEER)
        return heir

    def shutdown(self, now: float | None = None) -> list[Action]:
        """`weave reset`: hand all our ranges to an heir and stop serving requests."""
        self._set_now(now)
        log.info("Shutdown")
        self.shutting_down = True
        for ident in {o.ident for o in self.pending_allocates} | {o.ident for o in self.pending_claims}:
            self.cancel(ident)
        self.pending_claims.clear()  # pre-claims: nothing of ours is claimed any more
        self.pending_primes.clear()
        heir = self._pick_heir()
        self.ring.transfer(self.our_name, heir)
        self.space.clear()
        if heir != UNKNOWN_PEER:
            self._persist_ring()
            self._broadcast()
        self._asked.clear()
        return self.drain_actions()

    # -------------------------------------------------------------- status

    def status_line(self) -> str:
        """The `Status:` of `weave status` for IPAM."""
        return status.status_line(self)

    def status_lines(self) -> list[str]:
        """The status, plus a problem that needs an operator, with what to do about it."""
        return status.status_lines(self)

    def is_known(self, name: int) -> bool:
        return name == self.our_name or self.config.is_known_peer(name)

    def report(self, default_subnet: CIDR | None = None) -> dict[str, object]:
        """The `IPAM` section of Weave's /report JSON."""
        return status.report(self, default_subnet)
