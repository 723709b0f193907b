"""The mesh service: TCP connections to peers, gossip channels, topology and routes.

The protocol work is done by the sans-IO cores (handshake, session codec, topology,
routes, targets); this module only moves bytes between them and trio sockets. Every
connection runs in its own task; whatever goes wrong with one (a bad handshake, a wrong
password, garbage, a stall, a peer resetting mid-send, even a bug in a handler) ends that
connection alone, with the reason logged.

Gossip sent per channel is counted (gossip_bytes_sent etc., on /metrics as
pyweave_gossip_bytes_sent_total{channel}): by name for the channels this router
implements, and all others together as OTHER_CHANNELS, since their names come from peers
and a label per made-up name would grow without bound. Gossip on channels we don't
implement is relayed within per-connection bounds (router/surrogate.py).

Test-only knob: the environment variable PYWEAVE_HEARTBEAT_INTERVAL (seconds) replaces
the 30 s TCP heartbeat interval; the read timeout is always twice it (see HEARTBEAT_ENV).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import random
import secrets
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from router import ratelog
from router.errors import HandshakeError, ProtocolError, WireError
from router.gossip_api import Action, GossipData, Gossiper, SendBroadcast, SendUnicast
from router.handshake import Handshake, HandshakeFailure, PeerIdentity, RemoteFeatures
from router.overlay import Overlay, OverlayConn
from router.peername import format_peer_name
from router.protocol import (
    CONTROL_TAGS,
    ControlError,
    ControlFraming,
    ControlMessage,
    GossipMessage,
    Tag,
    decode_gossip,
    encode_gossip,
    encode_message,
    split_message,
)
from router.routes import Routes
from router.surrogate import MAX_CHANNEL_NAME, SurrogateTable
from router.targets import MAX_DISCOVERED, ConnectionMaker, PeerAddress, discovery_delay, normalise_address
from router.topology import Peers, choose_short_id

log = logging.getLogger(__name__)

GOSSIP_INTERVAL = 30.0
HEARTBEAT_INTERVAL = 30.0
# Test-only knob: PYWEAVE_HEARTBEAT_INTERVAL=<seconds> replaces the 30 s TCP heartbeat
# interval, and with it the read timeout (always twice the interval), so tests can see
# a dead connection (a partition) go away in seconds rather than a minute. Weave has no
# such setting; production routers should leave it unset.
HEARTBEAT_ENV = "PYWEAVE_HEARTBEAT_INTERVAL"
READ_TIMEOUT = 2 * HEARTBEAT_INTERVAL
HANDSHAKE_TIMEOUT = 10.0
DIAL_TIMEOUT = 10.0
# Neighbour gossip (tag 4) for one peer is merged until it is sent, as mesh's
# GossipSender does: it goes GOSSIP_COALESCE s after it was first queued, but no sooner
# than the gossip spacing after the previous neighbour gossip to that peer. The spacing
# is GOSSIP_SPACING_PER_PEER s per known peer (a topology message grows with the mesh),
# at most GOSSIP_MAX_SPACING. So a lone change travels at once, while a burst (a mesh
# forming) costs each connection one message per spacing, holding the latest state of
# every peer that changed; relaying every change as it came made 25 routers starting
# together spend most of their CPU decoding topology. (Weave coalesces its own topology
# updates for 1 s.) Broadcasts, unicasts, full state and heartbeats are never held.
GOSSIP_COALESCE = 0.02
GOSSIP_SPACING_PER_PEER = 0.04
GOSSIP_MAX_SPACING = 1.0
SEND_QUEUE_LENGTH = 1024
# Bytes queued for one peer: a slow peer and large relayed broadcasts (up to the 10 MiB
# frame limit each) would otherwise make the queue's length bound worth gigabytes.
SEND_QUEUE_BYTES = 16 << 20
ACCEPT_BURST = 20
ACCEPT_REFILL = 0.05
# Distinct (task, exception type) pairs whose first occurrence is logged with a traceback.
MAX_UNEXPECTED_KINDS = 64
# A mesh task that failed unexpectedly waits this long before its next round, so a fault
# that recurs costs a log line and a little CPU, not a busy loop.
UNEXPECTED_BACKOFF = 1.0
# Dials (TCP connects, name lookups) in progress at once. Gossip can name any number of
# addresses; each dial holds a socket (and maybe a resolver thread) until it fails.
MAX_DIALS_IN_FLIGHT = 32
TOPOLOGY_CHANNEL = "topology"
# The /metrics label of gossip on channels this router does not implement.
OTHER_CHANNELS = "other"
# Not rejections: "relaying gossip channel ..." lines, at most one per interval, since a
# peer can make up new channel names as fast as old ones expire.
_RELAY_LOG = ratelog.RateLimitedLog()
# Not rejections either: an overlay asking to send what the connection cannot carry (a bug).
_UNSENDABLE_LOG = ratelog.RateLimitedLog()


def heartbeat_interval_from_env() -> float:
    """HEARTBEAT_INTERVAL, or the PYWEAVE_HEARTBEAT_INTERVAL test knob if it is set."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return HEARTBEAT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        log.warning("ignoring %s=%r: not a positive number of seconds", HEARTBEAT_ENV, text)
        return HEARTBEAT_INTERVAL
    log.warning(
        "%s=%s: TCP heartbeat every %g s, read timeout %g s (a test setting)",
        HEARTBEAT_ENV, text, value, 2 * value,
    )
    return value


@dataclass
class MeshConfig:
    name: int
    nickname: str
    port: int = 6783
    host: str = ""
    password: bytes | None = None
    trusted_subnets: list[ipaddress.IPv4Network] = field(default_factory=list)
    conn_limit: int = 200
    discovery: bool = True
    min_version: int = 1
    initial_peers: list[str] = field(default_factory=list)
    overlays: tuple[str, ...] = ("sleeve",)
    # Seconds between TCP heartbeats; a connection silent for twice this is dropped.
    heartbeat_interval: float = field(default_factory=heartbeat_interval_from_env)

    @property
    def read_timeout(self) -> float:
        return 2 * self.heartbeat_interval


class TokenBucket:
    """Weave's accept throttle: a burst of `capacity`, one token back every `refill` s."""

    def __init__(self, capacity: int, refill: float, now: float) -> None:
        self.capacity = capacity
        self.refill = refill
        self._tokens = float(capacity)
        self._stamp = now

    def take(self, now: float) -> bool:
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) / self.refill)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def _tag_name(tag: int) -> str:
    try:
        return Tag(tag).name
    except ValueError:
        return str(tag)


class ConnectionRefused(Exception):
    """A connection the mesh declines after a good handshake (limit, duplicate)."""


class Connection:
    """One TCP connection to a peer, from dial/accept to close."""

    def __init__(self, stream: trio.SocketStream, outbound: bool, address: str, target: str | None) -> None:
        self.stream = stream
        self.outbound = outbound
        self.address = address  # the remote TCP address, ip:port
        self.target = target  # the connection maker's address, for outbound ones
        self.state = "connecting"
        self.remote: RemoteFeatures | None = None
        self.conn_uid = 0
        self.encrypted = False
        self.overlay_key: bytes | None = None
        # The Overlays we announced in this connection's handshake (None before it), and the
        # framing of its overlay control messages that follows from both ends' lists (set
        # on registering).
        self.announced_overlays: tuple[str, ...] | None = None
        self.framing: ControlFraming | None = None
        self.codec = None
        self.info = ""
        # For the sender task: messages in order, each (message, its gossip channel or
        # None), and neighbour gossip per channel, merged until it is sent (as mesh's
        # GossipSender does), so a burst of topology changes costs one message per peer.
        self._queue: deque[tuple[bytes, str | None]] = deque()
        self._queued_bytes = 0
        self._pending: dict[str, GossipData] = {}
        self._pending_since = 0.0
        self._last_gossip = -math.inf
        self._wake = trio.Event()
        self._closing = trio.Event()
        self.close_reason = ""

    @property
    def remote_name(self) -> int:
        assert self.remote is not None
        return self.remote.name

    def describe(self) -> str:
        if self.remote is None:
            return self.address
        return f"{format_peer_name(self.remote.name)}({self.remote.nickname}) at {self.address}"

    def send(self, tag: int, body: bytes = b"", channel: str | None = None) -> bool:
        """Queue one message; drops it (gossip is repaired by the next round) if the peer is too slow.

        `channel` names the gossip channel of a gossip message, for the byte counters."""
        if self._closing.is_set():
            return False
        message = encode_message(tag, body)
        if len(self._queue) >= SEND_QUEUE_LENGTH or self._queued_bytes + len(message) > SEND_QUEUE_BYTES:
            ratelog.reject(log, "mesh", "send_queue_full", "send queue to %s full; dropping a %s message",
                           self.describe(), _tag_name(tag))
            return False
        self._queue.append((message, channel))
        self._queued_bytes += len(message)
        self._wake.set()
        return True

    def gossip(self, channel: str, data: GossipData, now: float) -> None:
        """Add neighbour gossip (tag 4) for this peer, merged with what is still unsent."""
        if self._closing.is_set():
            return
        pending = self._pending.get(channel)
        if pending is None:
            if not self._pending:
                self._pending_since = now
            self._pending[channel] = data
        else:
            self._pending[channel] = pending.merge(data)
        self._wake.set()

    def take_pending(self) -> dict[str, GossipData]:
        pending, self._pending = self._pending, {}
        return pending

    def close(self, reason: str) -> None:
        if not self._closing.is_set():
            self.close_reason = reason
            self._closing.set()


class Mesh:
    def __init__(self, config: MeshConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.uid = secrets.randbits(64) or 1
        self.peers = Peers(
            config.name, config.nickname, self.uid, choose_short_id((), self.rng), rng=self.rng
        )
        self._routes: Routes | None = None
        # What other threads (the data path) read: replaced whole, never computed there.
        self.data_routes = Routes.compute(self.peers)
        self.maker = ConnectionMaker(rng=self.rng, discovery=config.discovery)
        # For discovery's choice of who dials: when we joined (the first topology update
        # after our first connection), and when each peer entered our topology.
        self._joined_at: float | None = None
        self._first_seen: dict[int, float] = {}
        self.connections: dict[int, Connection] = {}
        self.all_connections: set[Connection] = set()
        self.channels: dict[str, Gossiper] = {}
        self.termination_count = 0
        # Gossip sent (whole frames as written to the sockets) and received, by channel:
        # Prometheus pyweave_gossip_{bytes,messages}_{sent,received}_total on /metrics;
        # keyed by _metric_channel, so the keys are bounded.
        self.gossip_bytes_sent: Counter[str] = Counter()
        self.gossip_messages_sent: Counter[str] = Counter()
        self.gossip_bytes_received: Counter[str] = Counter()
        self.gossip_messages_received: Counter[str] = Counter()
        self.listening: list[tuple[str, int]] = []
        self._surrogates = SurrogateTable(GOSSIP_INTERVAL)
        self._topology_dirty: set[int] = set()
        self._topology_event = trio.Event()
        self._maker_event = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._accepts = TokenBucket(ACCEPT_BURST, ACCEPT_REFILL, 0.0)
        self._unexpected_seen: set[tuple[str, str]] = set()
        self._dials_in_flight = 0
        # Called with the names of peers that left the topology (IPAM/DNS clean-up).
        self.on_peers_removed: list[Callable[[list[int]], None]] = []
        # The data path that confirms connections; without one they carry only gossip.
        self.overlay: Overlay | None = None

    @property
    def name(self) -> int:
        return self.config.name

    @property
    def short_id(self) -> int | None:
        me = self.peers.ourself
        return me.short_id if me.has_short_id else None

    # ------------------------------------------------------------ lifecycle

    async def run(
        self,
        sockets: Sequence[socket.socket] = (),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen (on `sockets` if given: bound and listening already), dial, gossip."""
        if sockets:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        else:
            listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host or None)
        self.listening = [lst.socket.getsockname()[:2] for lst in listeners]
        log.info(
            "mesh listening on %s as %s(%s), uid %d",
            ", ".join(f"{h}:{p}" for h, p in self.listening),
            format_peer_name(self.name),
            self.config.nickname,
            self.uid,
        )
        for error in self.connect(self.config.initial_peers):
            log.error("not connecting to the peers given at launch: %s", error)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(trio.serve_listeners, self._accept, listeners)
            nursery.start_soon(self._maker_loop)
            nursery.start_soon(self._topology_flusher)
            nursery.start_soon(self._periodic_gossip)
            task_status.started()

    def add_channel(self, name: str, gossiper: Gossiper) -> None:
        self.channels[name] = gossiper

    # ------------------------------------------------------------ targets

    def parse_addresses(self, addresses: Iterable[str]) -> tuple[list[PeerAddress], list[str]]:
        """Peer addresses as given by a user (CLI, API, command line): the valid ones,
        with our port where none is given, and the reasons the others are not."""
        good, errors = [], []
        for text in addresses:
            try:
                good.append(normalise_address(text, self.config.port))
            except ValueError as exc:
                errors.append(str(exc))
        return good, errors

    def connect(self, addresses: list[str], replace: bool = False) -> list[str]:
        """`weave connect`: adds the targets, or, if any address is invalid, nothing
        (as Weave rejects the whole call); returns the reasons for the invalid ones."""
        good, errors = self.parse_addresses(addresses)
        if errors:
            return errors
        self.maker.add_direct(list(good), trio.current_time(), replace=replace)
        self._maker_event.set()
        return []

    def forget(self, addresses: list[str]) -> list[str]:
        """`weave forget`: like :meth:`connect`, all or nothing; returns the reasons."""
        good, errors = self.parse_addresses(addresses)
        if errors:
            return errors
        self.maker.forget(list(good))
        return []

    def _discovered(self) -> dict[str, int]:
        """Addresses of peers others are connected to and we are not: address -> peer."""
        found: dict[str, int] = {}
        for peer in self.peers.by_name.values():
            for other, conn in peer.connections.items():
                if other == self.name or other in self.connections or not conn.remote_tcp_addr:
                    continue
                addr = _dial_address(conn.remote_tcp_addr, conn.outbound, self.config.port)
                if addr is not None:
                    found[addr] = other
        return found

    def _update_discovered(self, now: float) -> dict[str, int]:
        """Tell the connection maker what gossip suggests; peers that joined after us are
        left to dial us first (see router.targets)."""
        found = self._discovered()
        delays = {
            addr: discovery_delay(peer, self.name, self._first_seen.get(peer), self._joined_at)
            for addr, peer in found.items()
        }
        left_out = self.maker.set_discovered(set(found), now, delays)
        if left_out:
            ratelog.reject(log, "mesh", "too_many_discovered",
                           "gossip names %d more peer addresses than the %d this router dials; ignoring them",
                           left_out, MAX_DISCOVERED)
        return found

    def _seen(self, names: Iterable[int]) -> None:
        now = trio.current_time()
        for name in names:
            self._first_seen.setdefault(name, now)

    async def _maker_loop(self) -> None:
        while True:
            full = False
            try:
                full = self._start_dials(trio.current_time())
            except Exception as exc:  # gossip made the topology into something unforeseen
                self._unexpected("the connection maker", exc)
                await trio.sleep(UNEXPECTED_BACKOFF)
            # With every dial slot taken, the next thing to wait for is a dial ending.
            wake = None if full else self.maker.next_wakeup()
            with trio.move_on_at(wake if wake is not None else math.inf):
                await self._maker_event.wait()
            self._maker_event = trio.Event()

    def _start_dials(self, now: float) -> bool:
        """Start the dials that are due; True if the in-flight limit held some back."""
        self._update_discovered(now)
        # Inbound connections still in their handshake count too: dialling the same
        # peer now would only make a duplicate.
        inbound_hosts = {_host_of(c.address) for c in self.all_connections if not c.outbound}
        connected = {c.target for c in self.all_connections if c.target}
        room = MAX_DIALS_IN_FLIGHT - self._dials_in_flight
        if room <= 0:
            return True
        due = self.maker.due(now, inbound_hosts, connected, limit=room)
        for addr in due:
            if self.config.conn_limit and len(self.all_connections) >= self.config.conn_limit:
                self.maker.failed(addr, now, f"Connection limit reached ({self.config.conn_limit})")
                continue
            assert self._nursery is not None
            self._dials_in_flight += 1
            self._nursery.start_soon(self._dial, addr)
        return len(due) >= room

    async def _dial(self, address: str) -> None:
        # Whatever goes wrong is a failed attempt at this target, retried with backoff:
        # an exception escaping here would end the daemon (the mesh nursery).
        try:
            opened = await self._open(address)
        finally:
            self._dials_in_flight -= 1
            self._maker_event.set()
        if opened is None:
            return
        stream, target = opened
        try:
            peer = stream.socket.getpeername()
        except OSError as exc:  # reset between connect and here
            await trio.aclose_forcefully(stream)
            self._dial_failed(target, f"connection lost: {exc.strerror or exc}")
            return
        try:
            await self._run_connection(stream, True, _join_host_port(peer[0], peer[1]), target)
        except Exception as exc:
            self._unexpected("a connection", exc)
            self._dial_failed(target, f"internal error: {type(exc).__name__}")

    async def _open(self, address: str) -> tuple[trio.SocketStream, PeerAddress] | None:
        """The TCP connection to `address`, or None (the failure recorded)."""
        try:
            target = address
            if not isinstance(target, PeerAddress):
                target = normalise_address(target, self.config.port)
            with trio.fail_after(DIAL_TIMEOUT):
                return await trio.open_tcp_stream(target.host, target.port), target
        except (OSError, trio.TooSlowError) as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
            self._dial_failed(address, reason)
        except Exception as exc:  # e.g. UnicodeError from the resolver
            self._unexpected("dialling a peer", exc)
            self._dial_failed(address, f"{type(exc).__name__}: {exc}")
        return None

    def _dial_failed(self, address: str, reason: str) -> None:
        log.info("connection to %s failed: %s", address, reason)
        self.maker.failed(address, trio.current_time(), reason)
        self._maker_event.set()

    def _unexpected(self, where: str, exc: BaseException) -> None:
        """An exception no code path expects (a bug, or input we did not foresee): logged
        with its traceback the first time for each (place, type), counted always."""
        kind = type(exc).__name__
        key = (where, kind)
        ratelog.REJECTS.count("mesh", "unexpected_error")
        if key in self._unexpected_seen or len(self._unexpected_seen) >= MAX_UNEXPECTED_KINDS:
            log.debug("unexpected %s in %s: %s", kind, where, exc)
            return
        self._unexpected_seen.add(key)
        log.error("unexpected %s in %s (logged once): %s", kind, where, exc, exc_info=exc)

    async def _accept(self, stream: trio.SocketStream) -> None:
        # Runs under trio.serve_listeners: an exception here would stop the listener.
        try:
            peer = stream.socket.getpeername()
        except OSError:  # the peer is already gone
            await trio.aclose_forcefully(stream)
            return
        address = _join_host_port(peer[0], peer[1])
        if not self._accepts.take(trio.current_time()):
            ratelog.reject(
                log, "mesh", "accept_rate_limit", "rejecting connection from %s: accept rate limit", address
            )
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._run_connection(stream, False, address, None)
        except Exception as exc:
            self._unexpected("a connection", exc)

    # ------------------------------------------------------------ one connection

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(_host_of(address))
        except ValueError:
            return False
        return any(ip in net for net in self.config.trusted_subnets)

    async def _run_connection(
        self, stream: trio.SocketStream, outbound: bool, address: str, target: str | None
    ) -> None:
        conn = Connection(stream, outbound, address, target)
        self.all_connections.add(conn)
        error = ""
        kind = "closed"  # a constant naming the kind of failure, for rate-limited logs
        permanent = False
        handshaken = registered = False
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await self._handshake(conn)
            handshaken = True
            self._register(conn)
            registered = True
            if target is not None:
                self.maker.connected(target, trio.current_time())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, conn)
                nursery.start_soon(self._heartbeats, conn)
                nursery.start_soon(self._receiver, conn)
                await conn._closing.wait()
                nursery.cancel_scope.cancel()
            error = conn.close_reason
        except HandshakeFailure as exc:
            error, permanent = str(exc), not exc.retryable
            kind = exc.reason.name.lower()
        except (HandshakeError, ProtocolError, WireError) as exc:
            error, kind = f"protocol error: {exc}", "protocol_error"
        except ConnectionRefused as exc:
            error, kind = str(exc), "refused"
        except trio.TooSlowError:
            error, kind = "handshake timed out" if not registered else "timed out", "timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            error, kind = f"connection lost: {exc}" if str(exc) else "connection lost", "lost"
        except Exception as exc:
            # A bug handling this connection's traffic: it ends this connection only.
            log.exception("internal error on connection %s", conn.describe())
            error, kind = f"internal error: {exc!r}", "internal_error"
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self.all_connections.discard(conn)
            self._surrogates.forget(conn)
            if registered:
                self._deregister(conn)
            what = "connection to" if outbound else "connection from"
            if outbound or handshaken:
                log.info("%s %s closed: %s", what, conn.describe(), error or "closed")
            else:
                # Anyone can open connections that never complete a handshake (the accept
                # limit lets 20 a second through): one line per interval, all counted.
                ratelog.reject(log, "mesh", f"handshake_{kind}", "%s %s closed: %s", what, conn.describe(),
                               error or "closed", level=logging.INFO)
            if target is not None:
                self.maker.failed(target, trio.current_time(), error or "connection closed", permanent)
                self._maker_event.set()

    async def _handshake(self, conn: Connection) -> None:
        conn.announced_overlays = tuple(self.config.overlays)
        hs = Handshake(
            outbound=conn.outbound,
            local=PeerIdentity(self.name, self.config.nickname, self.uid, self.short_id),
            conn_id=secrets.randbits(64),
            password=self.config.password,
            trusted_remote=self._trusted(conn.address),
            overlays=conn.announced_overlays,
            min_version=self.config.min_version,
            extra_features=self.overlay.features() if self.overlay is not None else None,
        )
        await conn.stream.send_all(hs.initiate())
        while not hs.complete:
            data = await conn.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("peer closed the connection during the handshake")
            try:
                out = hs.receive_data(data)
            except HandshakeFailure as exc:
                # What we had already produced (our features) lets the peer fail for the
                # same reason instead of seeing the connection vanish.
                unsent = getattr(exc, "unsent", b"")
                if unsent:
                    # Best effort: a peer that has gone must not hide the real reason.
                    with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, OSError):
                        await conn.stream.send_all(unsent)
                raise
            if out:
                await conn.stream.send_all(out)
        conn.remote = hs.remote
        conn.conn_uid = hs.conn_uid
        conn.codec = hs.codec
        conn.encrypted = hs.session_key is not None
        conn.overlay_key = hs.overlay_session_key
        conn.state = "pending"

    def _register(self, conn: Connection) -> None:
        remote = conn.remote
        assert remote is not None
        # Before anything is sent: a peer with no overlay in common is refused, as Weave does.
        ours = conn.announced_overlays if conn.announced_overlays is not None else tuple(self.config.overlays)
        conn.framing = ControlFraming.negotiate(ours, remote.overlays, conn.outbound)
        existing = self.connections.get(remote.name)
        if existing is None and self.config.conn_limit and len(self.connections) >= self.config.conn_limit:
            raise ConnectionRefused(f"Connection limit reached ({self.config.conn_limit})")
        if existing is not None:
            # Both ends compute the same ConnUID, so they agree on which duplicate survives.
            if conn.conn_uid < existing.conn_uid:
                existing.close("replaced by a duplicate connection with a lower ConnUID")
                self._deregister(existing)
            else:
                raise ConnectionRefused(f"already connected to {format_peer_name(remote.name)}")
        known = self.peers.get(remote.name)
        restarted = known is not None and known.uid not in (0, remote.uid)
        new = self.peers.register_remote(remote.name, remote.nickname, remote.uid, remote.short_id)
        self._seen([remote.name])
        self.peers.add_connection(remote.name, conn.address, conn.outbound, established=False)
        self.connections[remote.name] = conn
        self._topology_changed({self.name, remote.name})
        log.info(
            "connection %s %s added%s",
            "to" if conn.outbound else "from",
            conn.describe(),
            " (encrypted)" if conn.encrypted else "",
        )
        if self.overlay is not None:
            host, _, port = conn.address.rpartition(":")
            self.overlay.connection_up(
                OverlayConn(
                    remote=remote.name,
                    nickname=remote.nickname,
                    conn_uid=conn.conn_uid,
                    outbound=conn.outbound,
                    tcp_address=(host.strip("[]"), int(port)),
                    session_key=conn.overlay_key,
                    features=dict(remote.raw),
                    common_overlays=conn.framing.common,
                )
            )
        if new or restarted:
            self._send_full_state(conn)
        else:
            body = self._gossip_body(TOPOLOGY_CHANNEL, self.peers.encode_peers([self.name]))
            conn.send(Tag.GOSSIP, body, TOPOLOGY_CHANNEL)

    def _deregister(self, conn: Connection) -> None:
        name = conn.remote_name
        if self.connections.get(name) is not conn:
            return
        del self.connections[name]
        if not self.connections:
            self._joined_at = None  # alone again: the next connection is a fresh join
        if self.overlay is not None:
            self.overlay.connection_down(name, conn.conn_uid)
        removed = self.peers.remove_connection(name)
        self.peers.release_remote(name)
        removed += self.peers.garbage_collect()
        self.termination_count += 1
        self._peers_removed(removed)
        self._topology_changed({self.name})

    async def _sender(self, conn: Connection) -> None:
        # Every task of a connection turns its failures into conn.close(reason): an
        # exception escaping would reach the nursery (as an ExceptionGroup).
        codec = conn.codec
        assert codec is not None

        async def write(message: bytes, channel: str | None) -> None:
            data = codec.encode_frame(message)
            await conn.stream.send_all(data)
            if channel is not None:
                label = self._metric_channel(channel)
                self.gossip_bytes_sent[label] += len(data)
                self.gossip_messages_sent[label] += 1

        try:
            while True:
                if conn._queue:
                    message, channel = conn._queue.popleft()
                    conn._queued_bytes -= len(message)
                    await write(message, channel)
                    continue
                if conn._pending:
                    spacing = min(GOSSIP_MAX_SPACING, GOSSIP_SPACING_PER_PEER * len(self.peers))
                    flush_at = max(conn._pending_since + GOSSIP_COALESCE, conn._last_gossip + spacing)
                    wait = flush_at - trio.current_time()
                    if wait > 0:
                        with trio.move_on_after(wait):
                            await conn._wake.wait()  # queued messages don't wait
                        conn._wake = trio.Event()
                        continue
                    # Encoded now, from the current state: the latest of every peer.
                    conn._last_gossip = trio.current_time()
                    for channel, data in conn.take_pending().items():
                        for payload in data.encode():
                            body = self._gossip_body(channel, payload)
                            await write(encode_message(Tag.GOSSIP, body), channel)
                    continue
                await conn._wake.wait()
                conn._wake = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            conn.close(f"connection lost: {exc}")

    async def _heartbeats(self, conn: Connection) -> None:
        while True:
            await trio.sleep(self.config.heartbeat_interval)
            conn.send(Tag.HEARTBEAT)

    async def _receiver(self, conn: Connection) -> None:
        assert conn.codec is not None
        try:
            for frame in conn.codec.feed(b""):
                self._dispatch(conn, frame)
            read_timeout = self.config.read_timeout
            while True:
                with trio.move_on_after(read_timeout) as timeout:
                    data = await conn.stream.receive_some(65536)
                if timeout.cancelled_caught:
                    conn.close(f"no message for {read_timeout:g} s")
                    return
                if not data:
                    conn.close("peer closed the connection")
                    return
                for frame in conn.codec.feed(data):
                    self._dispatch(conn, frame)
        except (WireError, ConnectionRefused) as exc:
            conn.close(f"protocol error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            conn.close(f"connection lost: {exc}")

    # ------------------------------------------------------------ messages

    def _dispatch(self, conn: Connection, frame: bytes) -> None:
        split = split_message(frame)
        if split is None:
            return
        tag, body = split
        if tag in CONTROL_TAGS:
            self._overlay_control(conn, tag, body)
            return
        if tag not in (Tag.GOSSIP, Tag.GOSSIP_UNICAST, Tag.GOSSIP_BROADCAST):
            return  # heartbeats and tags we don't know
        msg = decode_gossip(tag, body)
        label = self._metric_channel(msg.channel)
        self.gossip_bytes_received[label] += len(frame)
        self.gossip_messages_received[label] += 1
        gossiper = self._channel(msg.channel)
        if gossiper is None:
            self._relay_unknown(conn, msg)
        elif msg.tag == Tag.GOSSIP:
            data = gossiper.on_gossip(msg.payload)
            if data is not None:
                self._gossip_neighbours(msg.channel, data, exclude=conn.remote_name)
        elif msg.tag == Tag.GOSSIP_BROADCAST:
            data = gossiper.on_gossip_broadcast(msg.src, msg.payload)
            if data is not None:
                for payload in data.encode():
                    self._relay_broadcast(msg.channel, msg.src, payload)
        else:
            assert msg.dst is not None
            if msg.dst == self.name:
                self._perform(msg.channel, gossiper.on_gossip_unicast(msg.src, msg.payload))
            else:
                self._relay_unicast(msg.channel, msg.src, msg.dst, msg.payload)

    def _overlay_control(self, conn: Connection, tag: int, body: bytes) -> None:
        if conn.framing is None or self.overlay is None:
            return
        try:
            msg = conn.framing.decode(tag, body)
        except ControlError as exc:
            # Weave would panic on most of these; we drop the message and keep the connection.
            ratelog.reject(log, "overlay", exc.reason, "overlay control message from %s refused: %s",
                           conn.describe(), exc)
            return
        self.overlay.control(conn.remote_name, conn.conn_uid, msg)

    def _channel(self, name: str) -> Gossiper | None:
        """The application for a channel; None for one this router does not implement."""
        if name == TOPOLOGY_CHANNEL:
            return _TopologyGossiper(self)
        return self.channels.get(name)

    def _metric_channel(self, name: str) -> str:
        return name if name == TOPOLOGY_CHANNEL or name in self.channels else OTHER_CHANNELS

    def _relay_unknown(self, conn: Connection, msg: GossipMessage) -> None:
        """Pass on gossip of a channel we don't implement, for the Weave peers that do.

        Broadcasts and unicasts for others need no state; neighbour gossip needs the
        channel's de-duplication, charged to the connection it came on (which may only be
        relaying it). Beyond that connection's budget the gossip is dropped and counted:
        the connection itself may have done nothing wrong."""
        if msg.tag == Tag.GOSSIP_BROADCAST:
            self._relay_broadcast(msg.channel, msg.src, msg.payload)
            return
        if msg.tag == Tag.GOSSIP_UNICAST:
            assert msg.dst is not None
            if msg.dst != self.name:  # one for us has no application to go to
                self._relay_unicast(msg.channel, msg.src, msg.dst, msg.payload)
            return
        if len(msg.channel) > MAX_CHANNEL_NAME:
            ratelog.reject(
                log, "gossip", "unknown_channel_name_too_long",
                "dropping gossip from %s on an unknown channel with a name of %d characters (at most %d)",
                conn.describe(), len(msg.channel), MAX_CHANNEL_NAME,
            )
            return
        new = msg.channel not in self._surrogates
        surrogate = self._surrogates.gossiper(conn, msg.channel, trio.current_time())
        if surrogate is None:
            ratelog.reject(
                log, "gossip", "unknown_channel_limit",
                "dropping gossip on unknown channel %.64r from %s: the connection already carries "
                "gossip of %d unknown channels",
                msg.channel, conn.describe(), self._surrogates.per_connection,
            )
            return
        if new:
            _RELAY_LOG.reject(
                log, "gossip", "new_unknown_channel",
                "relaying gossip channel %.64r, which this router does not implement", msg.channel,
                level=logging.INFO,
            )
        data = surrogate.on_gossip(msg.payload)
        if data is not None:
            self._gossip_neighbours(msg.channel, data, exclude=conn.remote_name)

    def _gossip_body(
        self, channel: str, payload: bytes, tag: Tag = Tag.GOSSIP, src: int | None = None
    ) -> bytes:
        return encode_gossip(GossipMessage(tag, channel, self.name if src is None else src, payload))

    def _gossip_neighbours(self, channel: str, data: GossipData, exclude: int | None = None) -> None:
        now = trio.current_time()
        for hop in self.routes.random_neighbours(exclude, self.rng):
            conn = self.connections.get(hop)
            if conn is not None:
                conn.gossip(channel, data, now)

    def _relay_broadcast(self, channel: str, origin: int, payload: bytes) -> None:
        body = self._gossip_body(channel, payload, Tag.GOSSIP_BROADCAST, origin)
        for hop in self.routes.broadcast_all(origin):
            self._send_to(hop, Tag.GOSSIP_BROADCAST, body, channel)

    def _relay_unicast(self, channel: str, src: int, dst: int, payload: bytes) -> None:
        hop = self.routes.next_hop_all(dst)
        if hop is None:
            log.debug("dropping %s unicast for unreachable %s", channel, format_peer_name(dst))
            return
        body = encode_gossip(GossipMessage(Tag.GOSSIP_UNICAST, channel, src, payload, dst))
        self._send_to(hop, Tag.GOSSIP_UNICAST, body, channel)

    def _send_to(self, name: int, tag: Tag, body: bytes, channel: str) -> None:
        conn = self.connections.get(name)
        if conn is not None:
            conn.send(tag, body, channel)

    def _perform(self, channel: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendUnicast):
                self._relay_unicast(channel, self.name, action.dst, action.payload)
            elif isinstance(action, SendBroadcast):
                self._relay_broadcast(channel, self.name, action.payload)

    def send_actions(self, channel: str, actions: list[Action]) -> None:
        """For applications: perform unicasts/broadcasts they asked for."""
        self._perform(channel, actions)

    def _send_full_state(self, conn: Connection) -> None:
        conn.send(Tag.GOSSIP, self._gossip_body(TOPOLOGY_CHANNEL, self.peers.encode_full()), TOPOLOGY_CHANNEL)
        for channel, gossiper in self.channels.items():
            # As in _periodic_gossip: a channel whose state cannot be gossiped must not
            # cost every new connection its life.
            try:
                data = gossiper.gossip()
                payloads = data.encode() if data is not None else []
            except Exception as exc:
                self._unexpected(f"full state on channel {channel!r}", exc)
                continue
            for payload in payloads:
                conn.send(Tag.GOSSIP, self._gossip_body(channel, payload), channel)

    async def _periodic_gossip(self) -> None:
        while True:
            await trio.sleep(GOSSIP_INTERVAL * (0.9 + 0.2 * self.rng.random()))
            self._gossip_neighbours(TOPOLOGY_CHANNEL, _TopologyData(self, None))
            for channel, gossiper in list(self.channels.items()):
                # A channel's state comes from peers: one that cannot be gossiped must not
                # stop the others, nor end the daemon.
                try:
                    data = gossiper.gossip()
                    if data is not None:
                        self._gossip_neighbours(channel, data)
                except Exception as exc:
                    self._unexpected(f"periodic gossip on channel {channel!r}", exc)

    # ------------------------------------------------------------ topology

    @property
    def routes(self) -> Routes:
        """Routes over the current topology, computed when first needed after a change (a
        burst of gossip changes the topology many times before anything is routed)."""
        routes = self._routes
        if routes is None:
            routes = self._routes = self.data_routes = Routes.compute(self.peers)
        return routes

    def _topology_changed(self, names: set[int]) -> None:
        self._routes = None
        self._topology_dirty |= names
        self._topology_event.set()
        self._maker_event.set()

    async def _topology_flusher(self) -> None:
        # Changes made before this task runs go out together; the connections' senders
        # then merge them with whatever else is pending for each peer (GOSSIP_COALESCE).
        while True:
            await self._topology_event.wait()
            self._topology_event = trio.Event()
            names, self._topology_dirty = self._topology_dirty, set()
            try:
                self.routes  # noqa: B018 (computes them for the data path)
                if names:
                    self._gossip_neighbours(TOPOLOGY_CHANNEL, _TopologyData(self, names))
            except Exception as exc:  # a topology gossip made that we cannot route or encode
                self._unexpected("the topology flusher", exc)
                await trio.sleep(UNEXPECTED_BACKOFF)

    def apply_topology(self, payload: bytes) -> set[int] | None:
        result = self.peers.apply_update(payload)
        changed = set(result.improved)
        if result.local_modified:
            changed.add(self.name)
        if result.removed:
            self._peers_removed(list(result.removed))
        if result.local_modified:
            self._topology_changed({self.name})  # recomputes the routes too
        elif changed or result.removed:
            self._routes = None
            self._topology_event.set()  # the flusher recomputes the data path's routes
            self._maker_event.set()
        self._seen(result.new)
        if self._joined_at is None and self.connections:
            self._joined_at = trio.current_time()  # what this update told us was there before us
        fresh = result.new | result.restarted
        if fresh:
            now = trio.current_time()
            found = self._update_discovered(now)
            self.maker.retry_now({a for a, n in found.items() if n in fresh}, now)
        return changed or None

    # ------------------------------------------------------------ overlay host

    def _overlay_conn(self, remote: int, conn_uid: int) -> Connection | None:
        conn = self.connections.get(remote)
        return conn if conn is not None and conn.conn_uid == conn_uid else None

    def overlay_established(self, remote: int, conn_uid: int) -> None:
        conn = self._overlay_conn(remote, conn_uid)
        if conn is None or conn.state == "established":
            return
        conn.state = "established"
        self.peers.set_connection_established(remote)
        self._topology_changed({self.name})
        log.info("connection %s %s established", "to" if conn.outbound else "from", conn.describe())

    def overlay_failed(self, remote: int, conn_uid: int, reason: str) -> None:
        conn = self._overlay_conn(remote, conn_uid)
        if conn is not None:
            conn.close(reason)

    def overlay_send(self, remote: int, conn_uid: int, msg: ControlMessage) -> None:
        """The one way overlay control messages reach the wire: framed for this connection."""
        conn = self._overlay_conn(remote, conn_uid)
        if conn is None or conn.framing is None:
            return
        try:
            tag, body = conn.framing.encode(msg)
        except ValueError as exc:
            # A Weave peer may panic on what it cannot index: nothing doubtful goes out.
            _UNSENDABLE_LOG.reject(log, "overlay", "unsendable_control",
                                   "not sending %s a %s control message: %s", conn.describe(), msg.overlay,
                                   exc, level=logging.ERROR)
            return
        conn.send(tag, body)

    def _peers_removed(self, removed: list) -> None:
        if not removed:
            return
        names = [p.name for p in removed]
        for name in names:
            self._first_seen.pop(name, None)
        log.info("peers left the topology: %s", ", ".join(format_peer_name(n) for n in names))
        for callback in self.on_peers_removed:
            try:
                callback(names)
            except Exception as exc:  # one service's clean-up must not stop the others'
                self._unexpected("a peers-removed callback", exc)


def _join_host_port(host: str, port: int) -> str:
    """A socket address as Go's net.JoinHostPort writes it (IPv6 in brackets): it is
    gossiped as RemoteTCPAddr, which Weave peers split with net.SplitHostPort."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_of(address: str) -> str:
    """The host part of a `_join_host_port` address, without brackets."""
    return address.rpartition(":")[0].strip("[]")


@functools.lru_cache(maxsize=4096)
def _dial_address(remote_tcp_addr: str, outbound: bool, port: int) -> PeerAddress | None:
    """Where to dial a peer that another peer lists a connection to: the address it was
    dialled at, or for a connection it made, its IP with our port; None (logged, rate
    limited) if that is not a valid address. Cached: the same few addresses recur in
    every topology update, so each bad one is also counted once per cache entry."""
    try:
        if outbound:
            return normalise_address(remote_tcp_addr, port)
        host = normalise_address(remote_tcp_addr, port).host
        return normalise_address(f"[{host}]" if ":" in host else host, port)
    except ValueError as exc:
        ratelog.reject(log, "mesh", "bad_gossip_address", "ignoring peer address from gossip: %s", exc)
        return None


@dataclass
class _TopologyData:
    """Topology gossip: the named peers (None = all), encoded when sent."""

    mesh: Mesh
    names: set[int] | None

    def encode(self) -> list[bytes]:
        if self.names is None:
            return [self.mesh.peers.encode_full()]
        payload = self.mesh.peers.encode_peers(self.names)
        return [payload] if payload else []  # all of them were garbage-collected meanwhile

    def merge(self, other: GossipData) -> GossipData:
        assert isinstance(other, _TopologyData)
        if self.names is None or other.names is None:
            return _TopologyData(self.mesh, None)
        return _TopologyData(self.mesh, self.names | other.names)


class _TopologyGossiper:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def gossip(self) -> GossipData | None:
        return _TopologyData(self.mesh, None)

    def on_gossip(self, payload: bytes) -> GossipData | None:
        changed = self.mesh.apply_topology(payload)
        return None if changed is None else _TopologyData(self.mesh, changed)

    def on_gossip_broadcast(self, src: int, payload: bytes) -> GossipData | None:
        return self.on_gossip(payload)

    def on_gossip_unicast(self, src: int, payload: bytes) -> list[Action]:
        raise ProtocolError("unexpected gossip unicast on the topology channel")
