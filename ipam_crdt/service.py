"""The IPAM service: the allocator core wired to the mesh, a timer and its callers (trio).

One `IpamService` per daemon, started in the daemon's nursery with `nursery.start(service.run)`.
It owns the `Allocator` (the sans-IO core), which is also the gossiper of the
"IPallocation" channel. Every call into the core, whether from a caller, from the mesh
(gossip received) or from the timer, is followed by sending the messages the core asked
for and by waking the callers whose pending requests the core finished.

Callers (the HTTP API, `weave attach`, the CNI plugin) use the async methods. A request
the core cannot answer at once (no ring yet: consensus among the initial peers; no free
space here: a peer must donate some) waits, for at most `allocate_timeout` seconds, and
then fails with `AllocationTimeout` saying what IPAM is waiting for. A caller that goes
away (its task cancelled, say an HTTP client disconnecting) withdraws its request.

Addresses are durable before they are returned: the core writes each allocation through
its store, and `SqliteStore` commits every write (synchronous=FULL) before returning.

Every failure is an `IpamServiceError` whose `status_code` is the HTTP status to answer.

Everything runs on the trio thread: the mesh calls the gossiper synchronously, so the core
cannot sit behind a worker thread. A store write (an fsync) therefore blocks the event
loop for its duration; bench/bench_ipam.py measures it.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ipam_crdt.address import CIDR, Range, parse_ip
from ipam_crdt.allocator import NO_CONTAINER_ID, Allocator
from ipam_crdt.config import (
    DEFAULT_ALLOCATE_TIMEOUT,
    TICK_INTERVAL,
    AllocatorConfig,
    parse_ipalloc_init,
)
from ipam_crdt.errors import InvalidRequest, NotFound, StoreError
from ipam_crdt.events import Allocated, AllocateFailed, Claimed, ClaimFailed, Event
from ipam_crdt.naming import peer_str
from ipam_crdt.reclaim import PortAddresses, reclaim_into
from ipam_crdt.ring import UNKNOWN_PEER
from ipam_crdt.store import SqliteStore
from router.errors import WireError
from router.gossip_api import Action
from router.mesh import Mesh
from router.peername import parse_peer_name

log = logging.getLogger(__name__)

CHANNEL = "IPallocation"
DEFAULT_RANGE = "10.32.0.0/12"
# `weave reset` waits 0.5 s after DELETE /peer; we wait until the handover has left the
# send queues, for at most this long.
HANDOFF_WAIT = 1.0


# ------------------------------------------------------------------ errors


class IpamServiceError(Exception):
    """A request the service could not satisfy; `status_code` is the HTTP status for it."""

    status_code = 500


class BadRequest(IpamServiceError):
    """Malformed input: an address, CIDR or subnet that does not parse or lies outside the range."""

    status_code = 400


class NotFoundError(IpamServiceError):
    """Nothing to free, or a peer nobody knows."""

    status_code = 404


class UnknownPeer(NotFoundError):
    pass


class Conflict(IpamServiceError):
    status_code = 409


class ClaimRejected(Conflict):
    """The address belongs to another container or another peer."""


class PeerStillConnected(Conflict):
    """`rmpeer` of a peer that is still in the mesh: taking its space would break the ring."""


class StillInUse(Conflict):
    """`DELETE /peer` while containers here use our space: handing it away would give
    their addresses to other hosts' new containers."""


class ContainerNotRunning(Conflict):
    """`check-alive` was asked for and the container is not running (Weave answers "cancelled")."""


class Unavailable(IpamServiceError):
    status_code = 503


class AllocationTimeout(Unavailable):
    """The request waited `allocate_timeout` seconds for a ring or for space."""


class AllocationFailed(Unavailable):
    """The core gave up on the request (its own deadline passed, or it was cancelled)."""


class ShuttingDown(Unavailable):
    """This peer handed its space away (`weave reset`) or the service has stopped."""


class StorageFailure(IpamServiceError):
    """The IPAM database could not be written; nothing was handed out."""

    status_code = 500


class IpamConfigError(ValueError):
    """Bad --ipalloc-range / --ipalloc-init / --ipalloc-default-subnet."""


# ------------------------------------------------------------------ settings


@dataclass
class IpamSettings:
    """The IPAM flags of `weaver`, as given on the command line."""

    ipalloc_range: str = DEFAULT_RANGE
    ipalloc_init: str = "consensus"
    ipalloc_default_subnet: str | None = None

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace | Any) -> IpamSettings:
        """From parsed flags (attributes ipalloc_range, ipalloc_init, ipalloc_default_subnet)."""
        return cls(
            getattr(ns, "ipalloc_range", None) or DEFAULT_RANGE,
            getattr(ns, "ipalloc_init", None) or "consensus",
            getattr(ns, "ipalloc_default_subnet", None) or None,
        )


def _parse_subnet_flag(flag: str, text: str) -> CIDR:
    try:
        return CIDR.parse_subnet(text)
    except InvalidRequest as exc:
        raise IpamConfigError(f"{flag}: {exc}") from None


# ------------------------------------------------------------------ waiting for the core


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    result: Event | None = None


_Key = tuple[Any, ...]


def _event_key(ev: Event) -> _Key:
    if isinstance(ev, Allocated | AllocateFailed):
        return ("allocate", ev.ident, ev.subnet)
    if isinstance(ev, Claimed | ClaimFailed):
        return ("claim", ev.ident, ev.cidr)
    return ("prime",)


class _Channel:
    """The mesh's view of the allocator: after each handler, send what the core asked for."""

    def __init__(self, service: IpamService) -> None:
        self._svc = service

    def gossip(self) -> Any:
        return self._svc.alloc.gossip()

    def on_gossip(self, payload: bytes) -> Any:
        try:
            return self._svc.alloc.on_gossip(payload)
        finally:
            self._svc._flush()

    def on_gossip_broadcast(self, src: int, payload: bytes) -> Any:
        try:
            return self._svc.alloc.on_gossip_broadcast(src, payload)
        finally:
            self._svc._flush()

    def on_gossip_unicast(self, src: int, payload: bytes) -> list[Action]:
        try:
            return self._svc.alloc.on_gossip_unicast(src, payload)
        finally:
            self._svc._flush()


# ------------------------------------------------------------------ the service


class IpamService:
    """IPAM for one daemon: an `Allocator` on the mesh's "IPallocation" channel.

    `config` is either the parsed flags (`IpamSettings`) or a ready `AllocatorConfig`. An
    `AllocatorConfig` is used as given, except that a missing store is opened in
    `state_dir` and the default `is_known_peer` is replaced by the mesh's topology.
    With `IpamSettings` and no `state_dir`, allocations live in memory only.
    """

    def __init__(
        self,
        mesh: Mesh,
        config: AllocatorConfig | IpamSettings,
        state_dir: str | Path | None = None,
        *,
        default_subnet: CIDR | str | None = None,
        allocate_timeout: float | None = None,
        tick_interval: float = TICK_INTERVAL,
        clock: Callable[[], float] = time.time,
        is_alive: Callable[[str], Awaitable[bool]] | None = None,
        host_ports: Sequence[PortAddresses] | None = None,
    ) -> None:
        self.mesh = mesh
        self.clock = clock
        self.tick_interval = tick_interval
        # Weave asks Docker whether a container runs for `check-alive`; without such a
        # hook the flag is accepted and ignored.
        self.is_alive = is_alive
        self._own_store: SqliteStore | None = None
        if isinstance(config, IpamSettings):
            if default_subnet is None and config.ipalloc_default_subnet:
                default_subnet = config.ipalloc_default_subnet
            config = self._config_from_settings(config, state_dir, allocate_timeout)
        else:
            if config.our_name != mesh.name:
                raise IpamConfigError(
                    f"the allocator is for peer {peer_str(config.our_name)}, "
                    f"the mesh is {peer_str(mesh.name)}"
                )
            if config.store is None and state_dir is not None:
                config.store = self._open_store(state_dir)
            if config.is_known_peer is AllocatorConfig.is_known_peer:
                config.is_known_peer = self._is_known_peer
            if allocate_timeout is not None:
                config.allocate_timeout = allocate_timeout
        try:
            self.allocate_timeout = config.allocate_timeout
            self.universe = config.universe
            self.default_subnet = self._default_subnet(default_subnet)
            if host_ports is not None:
                self._plan_reclaim(config, host_ports)
            self.alloc = Allocator(config)
        except (IpamConfigError, StoreError) as exc:
            self._close_store()
            raise IpamConfigError(str(exc)) from None
        # Set by the daemon (router.weaver) for `DELETE /peer`: an async context manager
        # that holds off attaches while it is entered and yields why the hand-over must be
        # refused (containers attached here), or None; and what stops the daemon after it.
        self.handover_guard: Callable[[], AbstractAsyncContextManager[str | None]] | None = None
        self.on_handed_over: Callable[[], None] | None = None
        self._channel = _Channel(self)
        self._waiters: dict[_Key, list[_Waiter]] = {}
        self._had_ring = not self.alloc.ring.is_empty()
        self._stopped = False
        # Actions from constructing the core (a ring made from a seed) wait for run().
        self._startup_actions = self.alloc.drain_actions()
        self._startup_events = self.alloc.drain_events()

    # -------------------------------------------------------------- construction helpers

    def _default_subnet(self, subnet: CIDR | str | None) -> CIDR:
        if subnet is None:
            return self.universe
        if isinstance(subnet, str):
            subnet = _parse_subnet_flag("--ipalloc-default-subnet", subnet)
        inside = self.universe.range()
        if not (inside.start <= subnet.range().start and subnet.range().end <= inside.end):
            raise IpamConfigError(
                f"--ipalloc-default-subnet {subnet} is not inside --ipalloc-range {self.universe}"
            )
        return subnet

    @staticmethod
    def _plan_reclaim(config: AllocatorConfig, ports: Sequence[PortAddresses]) -> None:
        """Claim every address in use on this host under our name (ipam_crdt.reclaim);
        the same address on two of this host's containers refuses the start."""
        plan = reclaim_into(config, ports)
        if plan.conflicts:
            raise IpamConfigError("; ".join(plan.conflicts))

    def _is_known_peer(self, name: int) -> bool:
        return name in self.mesh.peers

    def _open_store(self, state_dir: str | Path) -> SqliteStore:
        try:
            self._own_store = SqliteStore(state_dir)
        except StoreError as exc:
            raise IpamConfigError(str(exc)) from None
        return self._own_store

    def _close_store(self) -> None:
        if self._own_store is not None:
            self._own_store.close()
            self._own_store = None

    def _config_from_settings(
        self, settings: IpamSettings, state_dir: str | Path | None, allocate_timeout: float | None
    ) -> AllocatorConfig:
        universe = _parse_subnet_flag("--ipalloc-range", settings.ipalloc_range)
        try:
            bootstrap = parse_ipalloc_init(settings.ipalloc_init, len(self.mesh.config.initial_peers))
        except InvalidRequest as exc:
            raise IpamConfigError(str(exc)) from None
        config = AllocatorConfig(
            our_name=self.mesh.name,
            our_uid=self.mesh.uid,
            universe=universe,
            bootstrap=bootstrap,
            our_nickname=self.mesh.config.nickname,
            is_known_peer=self._is_known_peer,
            now=self.clock(),
            allocate_timeout=DEFAULT_ALLOCATE_TIMEOUT if allocate_timeout is None else allocate_timeout,
        )
        if state_dir is not None:
            config.store = self._open_store(state_dir)
        return config

    # -------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the channel and the timer until cancelled; then close the store."""
        self.mesh.add_channel(CHANNEL, self._channel)
        self.mesh.on_peers_removed.append(self._peers_removed)
        log.info(
            "IPAM: range %s, default subnet %s, %s",
            self.universe, self.default_subnet, self.alloc.status_line(),
        )
        try:
            self._flush(self._startup_actions)
            self._dispatch(self._startup_events)
            self._startup_actions, self._startup_events = [], []
            task_status.started()
            while True:
                await trio.sleep(self.tick_interval)
                self._tick()
        finally:
            self._stopped = True
            if self.mesh.channels.get(CHANNEL) is self._channel:
                del self.mesh.channels[CHANNEL]
            if self._peers_removed in self.mesh.on_peers_removed:
                self.mesh.on_peers_removed.remove(self._peers_removed)
            for waiters in self._waiters.values():
                for w in waiters:
                    w.done.set()  # no result: they raise ShuttingDown
            self._close_store()

    def close(self) -> None:
        """Release the database of a service that will not run (run() closes it itself)."""
        self._stopped = True
        self._close_store()

    def _tick(self) -> None:
        try:
            self._flush(self.alloc.tick(self.clock()))
        except Exception:
            # A failing tick must not take the daemon's data plane down with it.
            log.exception("IPAM tick failed")

    def _peers_removed(self, names: list[int]) -> None:
        for name in names:
            self.alloc.peer_gone(name)
        self._flush()

    # -------------------------------------------------------------- core plumbing

    def _flush(self, actions: Iterable[Action] = ()) -> None:
        """Send what the core asked for and wake the callers whose requests it finished."""
        out = list(actions) + self.alloc.drain_actions()
        if out and not self._stopped:
            self.mesh.send_actions(CHANNEL, out)
        self._dispatch(self.alloc.drain_events())
        has_ring = not self.alloc.ring.is_empty()
        if has_ring and not self._had_ring:
            ours = self.alloc.ring.owned_ranges()
            log.info(
                "IPAM ring ready: %d peers own %s; we own %d addresses in %d ranges",
                len(self.alloc.ring.peer_names()), self.universe, sum(r.size for r in ours), len(ours),
            )
        self._had_ring = has_ring

    def _dispatch(self, events: Iterable[Event]) -> None:
        for ev in events:
            if isinstance(ev, AllocateFailed | ClaimFailed):
                level = logging.INFO if ev.reason.endswith("cancelled") else logging.WARNING
                log.log(level, "IPAM request for %s failed: %s", ev.ident, ev.reason)
            else:
                log.debug("IPAM request done: %s", ev)
            key = _event_key(ev)
            waiters = self._waiters.get(key)
            if not waiters:
                continue
            # Anonymous requests ("_") are separate requests that share a key: one event
            # answers one of them. A named ident's requests are one request.
            if key[1:2] == (NO_CONTAINER_ID,):
                taken = [waiters.pop(0)]
            else:
                taken, waiters[:] = waiters[:], []
            if not waiters:
                del self._waiters[key]
            for w in taken:
                w.result = ev
                w.done.set()

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the core, translating its errors, and flush whatever it produced."""
        if self._stopped:
            raise ShuttingDown("the IPAM service has stopped")
        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            log.error("IPAM database error: %s", exc)
            raise StorageFailure(str(exc)) from None
        except InvalidRequest as exc:
            raise BadRequest(str(exc)) from None
        except NotFound as exc:
            raise NotFoundError(str(exc)) from None
        finally:
            self._flush()

    async def _wait(self, key: _Key, timeout: float, ident: str | None) -> Event | None:
        """Wait for the event answering `key`; None on timeout. Withdraws the request then."""
        w = _Waiter()
        self._waiters.setdefault(key, []).append(w)
        try:
            with trio.move_on_after(timeout):
                await w.done.wait()
        finally:
            if w.result is None:
                self._withdraw(key, w, ident)
        return w.result

    def _withdraw(self, key: _Key, w: _Waiter, ident: str | None) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None and w in waiters:
            waiters.remove(w)
            if not waiters:
                del self._waiters[key]
        if ident is None or self._stopped:
            return
        # The core cancels by ident; only when nobody else waits for that ident.
        if any(k[1:2] == (ident,) for k in self._waiters):
            return
        self.alloc.cancel(ident)
        self._flush()

    def _check_open(self) -> None:
        if self._stopped:
            raise ShuttingDown("the IPAM service has stopped")
        if self.alloc.shutting_down:
            raise ShuttingDown("this peer has handed its IP space to other peers (weave reset)")

    async def _check_alive(self, ident: str, check_alive: bool) -> None:
        if check_alive and self.is_alive is not None and not await self.is_alive(ident):
            raise ContainerNotRunning(f"container {ident} is not running")

    def _timeout(self, timeout: float | None) -> float:
        t = self.allocate_timeout if timeout is None else timeout
        return t if t > 0 else math.inf

    # -------------------------------------------------------------- parsing

    def parse_subnet(self, text: CIDR | str | None) -> CIDR:
        """A subnet for allocation: `a.b.c.0/len` inside the range; None = default subnet.

        Inside, not just overlapping: an address is handed out with the subnet's prefix, so
        `0.0.0.0/0` would give a container `10.32.0.1/0`. `CIDR.parse_subnet` already
        refuses subnets too small to hold an address besides network and broadcast (/31, /32).
        """
        if text is None:
            return self.default_subnet
        try:
            subnet = text if isinstance(text, CIDR) else CIDR.parse_subnet(text)
        except InvalidRequest as exc:
            raise BadRequest(str(exc)) from None
        inside, r = self.universe.range(), subnet.range()
        if not (inside.start <= r.start and r.end <= inside.end):
            raise BadRequest(
                f"subnet {subnet} is outside the IP allocation range {self.universe}: "
                "a subnet to allocate in must lie inside it"
            )
        return subnet

    @staticmethod
    def parse_cidr(text: CIDR | str) -> CIDR:
        if isinstance(text, CIDR):
            return text
        try:
            return CIDR.parse(text)
        except InvalidRequest as exc:
            raise BadRequest(str(exc)) from None

    @staticmethod
    def parse_addr(text: int | str) -> int:
        if isinstance(text, int):
            return text
        try:
            return parse_ip(text)
        except InvalidRequest as exc:
            raise BadRequest(str(exc)) from None

    # -------------------------------------------------------------- requests

    async def allocate(
        self,
        ident: str,
        subnet: CIDR | str | None = None,
        check_alive: bool = False,
        *,
        timeout: float | None = None,
    ) -> CIDR:
        """An address for `ident` in `subnet` (default subnet if None), with the subnet's prefix.

        Idempotent: the address `ident` already has there, else a new one. Waits while
        the ring is being agreed or space requested, at most `timeout` (default
        `allocate_timeout`) seconds.
        """
        net = self.parse_subnet(subnet)
        self._check_open()
        await self._check_alive(ident, check_alive)
        self._check_open()
        result = self._call(self.alloc.allocate, ident, net, self.clock())
        self._flush(result.actions)
        if result.cidr is not None:
            return result.cidr
        if result.error is not None:
            self._check_open()
            raise AllocationFailed(result.error)
        wait = self._timeout(timeout)
        ev = await self._wait(("allocate", ident, net), wait, ident)
        if isinstance(ev, Allocated):
            return ev.cidr
        self._check_open()
        if isinstance(ev, AllocateFailed):
            raise AllocationFailed(f"no address for {ident} in {net}: {ev.reason}")
        raise AllocationTimeout(
            f"no address for {ident} in {net} after {wait:g} s: {self._waiting_for()}"
        )

    async def claim(
        self,
        ident: str,
        cidr: CIDR | str,
        check_alive: bool = False,
        no_error_on_unknown: bool = False,
        *,
        timeout: float | None = None,
    ) -> None:
        """Record that `ident` uses `cidr` (a restarted container, `weave attach ip:...`).

        An address outside the range is just recorded, as Weave does. One owned by another
        peer is asked for; one in use by another container is refused, and so is the
        network or broadcast address of the CIDR (Weave would record those).
        """
        c = self.parse_cidr(cidr)
        if c.prefix_len == 0:
            raise BadRequest(f"{c}: a /0 cannot be a container's subnet")
        if c.prefix_len <= 30 and c.addr in (c.network, c.network + c.size - 1):
            # Weave would record it; no container can use it, and allocation never hands it out.
            kind = "network" if c.addr == c.network else "broadcast"
            raise BadRequest(f"{c} is the {kind} address of its subnet, not an address for a container")
        self._check_open()
        await self._check_alive(ident, check_alive)
        self._check_open()
        result = self._call(
            self.alloc.claim, ident, c, self.clock(), no_error_on_unknown=no_error_on_unknown
        )
        self._flush(result.actions)
        if result.done:
            if result.error is not None:
                self._check_open()
                raise ClaimRejected(f"Unable to claim: {result.error}")
            return
        wait = self._timeout(timeout)
        ev = await self._wait(("claim", ident, c), wait, ident)
        if isinstance(ev, Claimed):
            return
        self._check_open()
        if isinstance(ev, ClaimFailed):
            raise ClaimRejected(f"Unable to claim: {ev.reason}")
        raise AllocationTimeout(f"Unable to claim {c} for {ident} after {wait:g} s: {self._waiting_for()}")

    def lookup(self, ident: str, subnet: CIDR | str | None = None) -> list[CIDR]:
        """The addresses `ident` has (in `subnet`'s host range if given)."""
        r = None if subnet is None else self.parse_subnet(subnet).host_range()
        return self.alloc.lookup(ident, r)

    def owned(self) -> dict[str, list[CIDR]]:
        return self.alloc.owned_addresses()

    async def free(self, ident: str, addr: int | str | None = None) -> None:
        """Release one address of `ident`, or all of them."""
        a = None if addr is None else self.parse_addr(addr)
        if self._stopped:
            raise ShuttingDown("the IPAM service has stopped")
        try:
            self._call(self.alloc.free, ident, a, self.clock())
        except NotFoundError as exc:
            raise NotFoundError(str(exc) if a is None else f"Unable to free: {exc}") from None

    async def prime(self, *, timeout: float | None = None) -> None:
        """Wait until the ring exists (`weave prime`), starting consensus if need be."""
        self._check_open()
        done, actions = self._call(self.alloc.prime, self.clock())
        self._flush(actions)
        if done:
            return
        wait = self._timeout(timeout)
        if await self._wait(("prime",), wait, None) is None:
            self._check_open()
            raise AllocationTimeout(f"no IP allocation ring after {wait:g} s: {self._waiting_for()}")

    def resolve_peer(self, name_or_nickname: str) -> int:
        """A peer name from a name (MAC form) or nickname that IPAM knows."""
        text = name_or_nickname.strip()
        for name, nick in self.alloc.nicknames.items():
            if nick and nick == text:
                return name
        try:
            name = parse_peer_name(text)
        except WireError:
            name = None
        if name is None or not (
            name in self.alloc.nicknames or name in self.alloc.ring.peer_names() or name in self.mesh.peers
        ):
            raise UnknownPeer(f"unknown peer {text!r}: not the name or nickname of a peer IPAM knows")
        return name

    async def rmpeer(self, name_or_nickname: str, *, force: bool = False) -> int:
        """`weave rmpeer`: take over a dead peer's ranges; returns the addresses gained.

        Refused for ourselves, and for a peer still in the mesh unless `force` (taking
        over a live peer's ranges makes the ring inconsistent, weave#3310).
        """
        self._check_open()
        peer = self.resolve_peer(name_or_nickname)
        if peer == self.mesh.name:
            raise BadRequest("cannot rmpeer ourselves; run 'weave reset' to give our space away")
        if not force and peer in self.mesh.peers:
            raise PeerStillConnected(
                f"peer {peer_str(peer)} is still connected to the mesh; stop it first "
                "(or force it, if you know it is dead)"
            )
        gained, actions = self._call(self.alloc.admin_takeover, peer_str(peer), self.clock())
        self._flush(actions)
        log.info("rmpeer: took over %d addresses from %s (%s)", gained, peer_str(peer), name_or_nickname)
        return int(gained)

    async def hand_over(self) -> int | None:
        """`DELETE /peer` (what `weave reset` calls): give our space away, then stop the daemon.

        Handing space away while this router goes on running let its containers keep
        addresses that other hosts then handed to new containers (issue 12, defect 7). So
        it is refused (409, `StillInUse`) while any container is attached here, checked
        with attaches held off until the hand-over is done; and once done, IPAM serves no
        more requests and the daemon stops: a hand-over is only ever part of a shutdown.
        `weave reset` detaches the containers first.
        """
        if self.handover_guard is None:
            heir = await self.shutdown_handoff()
        else:
            async with self.handover_guard() as refusal:
                if refusal:
                    raise StillInUse(f"not handing over this peer's IP space: {refusal}")
                heir = await self.shutdown_handoff()
        if self.on_handed_over is not None:
            self.on_handed_over()
        return heir

    async def shutdown_handoff(self, wait: float = HANDOFF_WAIT) -> int | None:
        """`weave reset`: hand all our ranges to a live peer and stop serving requests.

        Returns the heir's name, or None if there was nothing to hand over or nobody to
        take it (the space then stays ours on the other peers' rings until `rmpeer`).
        Waits up to `wait` seconds for the handover to leave the send queues.
        """
        if self._stopped:
            raise ShuttingDown("the IPAM service has stopped")
        ours = self.alloc.ring.owned_ranges()
        self._flush(self._call(self.alloc.shutdown, self.clock()))
        if not ours:
            log.info("IPAM shutdown: we own no IP ranges; nothing to hand over")
            return None
        heir = self.alloc.ring.owner(ours[0].start)
        if heir == UNKNOWN_PEER:
            log.warning(
                "IPAM shutdown: no peer to hand our %d addresses to; they stay unusable until "
                "another peer runs 'weave rmpeer %s'",
                sum(r.size for r in ours), peer_str(self.mesh.name),
            )
            return None
        log.info("IPAM shutdown: handed %d addresses to %s", sum(r.size for r in ours), peer_str(heir))
        await self._drain_sends(wait)
        return heir

    async def _drain_sends(self, wait: float) -> None:
        with trio.move_on_after(wait):
            while any(c._queue for c in self.mesh.connections.values()):
                await trio.sleep(0.01)
            await trio.sleep(0.01)  # the last frame is being written

    # -------------------------------------------------------------- status

    def _waiting_for(self) -> str:
        line = self.alloc.status_line()
        if self.alloc.ring.is_empty() and self.alloc.awaiting_consensus:
            return (
                f"IPAM status: {line} - the peers of --ipalloc-init must be running and "
                "connected before the first address can be handed out"
            )
        return f"IPAM status: {line}"

    def status_lines(self) -> list[str]:
        return self.alloc.status_lines()

    def report(self) -> dict[str, object]:
        """The `IPAM` section of /report."""
        return self.alloc.report(self.default_subnet)

    @property
    def tracker(self) -> str:
        """Weave's local range tracker (awsvpc, no-masq-local): none here."""
        return ""

    def status_section(self) -> str:
        """The `Service: ipam` block of `weave status`."""
        lines = self.status_lines()
        out = ["        Service: ipam", f"         Status: {lines[0]}"]
        out += [f"        Problem: {extra}" for extra in lines[1:]]
        out += [f"          Range: {self.universe}", f"  DefaultSubnet: {self.default_subnet}"]
        return "\n".join(out) + "\n"

    def ranges_text(self) -> str:
        """`weave status ipam`: the share of the range each peer owns, ourselves first."""
        totals: dict[int, int] = {}
        for info in self.alloc.ring.all_range_info():
            totals[info.peer] = totals.get(info.peer, 0) + info.range.size
        ours = self.mesh.name
        lines = []
        for peer in sorted(totals, key=lambda p: (p != ours, p)):
            pct = totals[peer] * 100.0 / self.universe.size
            display = f"{peer_str(peer)}({self.alloc.nicknames.get(peer, '')})"
            if peer == ours:
                info = f"({self.alloc.space.num_used()} active)"
            else:
                info = "" if self.alloc.is_known(peer) else "- unreachable!"
            lines.append(f"{display:<37} {totals[peer]:8d} IPs ({pct:04.1f}% of total) {info}")
        return "".join(line + "\n" for line in lines)

    def owned_ranges(self) -> list[Range]:
        """The parts of the range this peer owns."""
        return self.alloc.ring.owned_ranges()

__all__ = [
    "CHANNEL", "DEFAULT_RANGE", "IpamService", "IpamSettings", "IpamServiceError", "BadRequest",
    "NotFoundError", "UnknownPeer", "Conflict", "ClaimRejected", "PeerStillConnected", "StillInUse",
    "ContainerNotRunning", "Unavailable", "AllocationTimeout", "AllocationFailed", "ShuttingDown",
    "StorageFailure", "IpamConfigError",
]
