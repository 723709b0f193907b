"""The fastdp service: wires the health monitor to the VXLAN device and the probe port (trio).

The overlay switch tells it which direct pyweave peers also offer the ``vxlan`` overlay
(:meth:`FastdpService.add_peer` / :meth:`FastdpService.remove_peer`). For each, the
service exchanges heartbeats over the real VXLAN path (:mod:`fastdp.probe`), feeds them
to the health machine (:mod:`fastdp.health`) and keeps the kernel in step with it: a
peer's all-zero FDB entry on ``vxlan-<port>`` exists exactly while its link is healthy.
Every change of what the kernel carries is reported through ``on_change(peer, state)``
*after* the kernel has it, so the switch can hand the peer's traffic to the sleeve (or
take it back) knowing what the kernel does.

Heartbeats are authenticated (:mod:`fastdp.linkkey`): :meth:`FastdpService.add_peer`
returns our key share for the connection, which the switch sends to the peer over the
mesh connection, and the peer's share comes back through
:meth:`FastdpService.set_peer_share`. Until both are known the link sends no heartbeat
and accepts none. Only current peers' addresses may send to the VXLAN port
(:mod:`fastdp.srcfilter`), so strangers cannot teach the bridge MACs either.

If this host cannot have a VXLAN device, :meth:`FastdpService.run` logs one line, marks
the service unavailable and returns without failing its nursery: the mesh carries on
with the sleeve alone.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from fastdp import linkkey, srcfilter, vxlan
from fastdp.health import (
    Action,
    HealthConfig,
    HealthMonitor,
    LinkState,
    PeerHealth,
    SendAck,
    SendHeartbeat,
    Transition,
)
from fastdp.probe import (
    PathMtuError,
    ProbeEndpoint,
    ProbeKind,
    ProbeMessage,
    heartbeat_frame_size,
    probe_mac,
)
from router.netlink import NetlinkError
from router.peername import format_peer_name

log = logging.getLogger(__name__)

T = TypeVar("T")

OVERLAY_NAME = vxlan.OVERLAY_NAME
DEFAULT_SWEEP_INTERVAL = 1.0
KERNEL_RETRY = 1.0  # seconds before a failed FDB change is tried again
# How long after a peer's entry went we still look for MACs the kernel learned behind it.
SWEEP_GRACE = 10.0
_KERNEL_ERRORS = (OSError, NetlinkError, vxlan.VxlanError)
_NO_NFT = srcfilter.NFT_MISSING  # the filter error after which nft is not tried again


@dataclass(frozen=True)
class FastdpState:
    """What fastdp does for one peer, as last reported (a snapshot).

    `healthy` means the kernel carries this peer's traffic now: its link is confirmed
    and its FDB entry is in place. Times are on the service's clock.
    """

    peer: int
    conn_uid: int
    peer_ip: str
    healthy: bool
    link: LinkState  # the health machine's own view (pending / healthy / unhealthy)
    since: float  # when `healthy` took its current value (or monitoring began)
    reason: str
    last_transition: float | None  # time of the health machine's last transition
    failovers: int  # healthy -> not healthy, while the connection lasted
    returns: int  # back to healthy after a failover
    last_failover: float | None  # seconds from the last heartbeat that got through to the entry's removal
    last_return: float | None  # seconds from the start of the clean heartbeat run to the entry's return
    rtt: float | None  # smoothed heartbeat round trip, seconds
    error: str | None  # the last send or kernel error, if it persists


class _Peer:
    __slots__ = ("peer", "conn_uid", "ip", "health", "reported", "was_healthy", "since", "last_transition",
                 "failovers", "returns", "last_failover", "last_return", "lost_at", "hb_run", "ack_run",
                 "send_error", "kernel_error", "final_reason", "local_share", "tx_key", "rx_key")

    def __init__(self, peer: int, conn_uid: int, ip: str, health: PeerHealth, now: float) -> None:
        self.peer = peer
        self.conn_uid = conn_uid
        self.ip = ip
        self.health = health
        self.reported = False  # what on_change last said about `healthy`
        self.was_healthy = False
        self.since = now
        self.last_transition: float | None = None
        self.failovers = self.returns = 0
        self.last_failover: float | None = None
        self.last_return: float | None = None
        self.lost_at: float | None = None  # last heartbeat evidence before the link went unhealthy
        self.hb_run: float | None = None  # when the current runs of good heartbeats/acks began
        self.ack_run: float | None = None
        self.send_error: str | None = None
        self.kernel_error: str | None = None
        self.final_reason: str | None = None  # set once the peer is removed or the service stops
        self.local_share = linkkey.new_share()
        self.tx_key: bytes | None = None  # set once the peer's key share arrived
        self.rx_key: bytes | None = None


class FastdpService:
    """Fastdp for one host: the VXLAN device, the probe endpoint, per-peer health.

    `mtu` is the overlay MTU (the bridge's and the containers'); the VXLAN device and
    the probe port get it, and heartbeats are full-size frames for it, so a path that
    cannot carry a full container frame keeps the peer unhealthy (on the sleeve).
    `clock` gives the time the health machine runs on (seconds, at the rate of trio's
    clock); `config` its intervals (its heartbeat_size is derived from `mtu`). `netns`
    runs every kernel operation in that namespace (tests, tools); the daemon runs in its
    host's namespace and leaves it None.
    """

    def __init__(
        self,
        ourself: int,
        bridge: str = vxlan.DEFAULT_BRIDGE,
        mtu: int = vxlan.DEFAULT_MTU,
        port: int = vxlan.DEFAULT_PORT,
        on_change: Callable[[int, FastdpState], None] | None = None,
        clock: Callable[[], float] = trio.current_time,
        *,
        config: HealthConfig | None = None,
        vni: int = vxlan.DEFAULT_VNI,
        local_ip: str | None = None,
        netns: str | None = None,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
    ) -> None:
        if not 0 < ourself < 1 << 48:
            raise ValueError(f"invalid peer name {ourself}")
        self.ourself = ourself
        self.bridge = bridge
        self.mtu = mtu
        self.port = port
        self.vni = vni
        self.local_ip = local_ip
        self.netns = netns
        self.on_change = on_change
        self._clock = clock
        self.config = dataclasses.replace(config or HealthConfig(), heartbeat_size=heartbeat_frame_size(mtu))
        self.sweep_interval = sweep_interval
        self.monitor = HealthMonitor(self.config)
        self.available = False
        self.unavailable_reason: str | None = None
        self.running = False
        self.stats = {"heartbeats_sent": 0, "acks_sent": 0, "frames_received": 0, "send_errors": 0,
                      "kernel_errors": 0, "swept": 0, "unkeyed": 0}
        self._started = False
        self._stopped = False
        self._made = False  # vxlan device created (so ours to delete)
        self._endpoint: ProbeEndpoint | None = None
        self._peers: dict[int, _Peer] = {}
        self._gone: dict[int, _Peer] = {}  # removed while the kernel still carried them
        self._installed: dict[str, int] = {}  # peer IP -> peer name, for every all-zero FDB entry we made
        self._recently_removed: dict[str, tuple[float, int]] = {}  # peer IP -> (sweep it until, peer)
        self._filtered: frozenset[str] | None = None  # the peer IPs the source filter lets in
        self._filter_error: str | None = None
        self._wake = trio.Event()
        self._kernel_wake = trio.Event()

    @property
    def device(self) -> str:
        return vxlan.device_name(self.port)

    # -- called by the overlay switch

    def add_peer(self, peer: int, conn_uid: int, peer_ip: str) -> bytes | None:
        """Start monitoring the fastdp link to direct peer `peer` over connection `conn_uid`.

        `peer_ip` is the peer's underlay address (where its port `port` is). Idempotent
        for the same connection; a new `conn_uid` replaces the old connection's link,
        which starts unconfirmed again. Returns our key share for this connection, to be
        sent to the peer (:func:`fastdp.linkkey.encode_share`); None (ignored) once the
        service is known unavailable.
        """
        ip = str(ipaddress.IPv4Address(peer_ip))
        if peer == self.ourself or not 0 < peer < 1 << 48:
            raise ValueError(f"cannot monitor a fastdp link to peer {peer:#x}")
        if self._stopped:
            return None
        old = self._peers.get(peer)
        if old is not None and old.conn_uid == conn_uid:
            if old.ip != ip:
                log.warning("fastdp: %s is already monitored at %s, ignoring %s", _who(peer), old.ip, ip)
            return old.local_share
        now = self._clock()
        rec = _Peer(peer, conn_uid, ip, self.monitor.add(peer, conn_uid, now), now)
        previous = old or self._gone.pop(peer, None)
        if previous is not None:
            rec.reported = previous.reported  # the kernel may still carry the old connection's entry
        self._peers[peer] = rec
        log.debug("fastdp: monitoring %s at %s (connection %016x)", _who(peer), ip, conn_uid)
        self._wake.set()
        self._kernel_wake.set()
        return rec.local_share

    def set_peer_share(self, peer: int, conn_uid: int, share: bytes) -> bool:
        """The peer's key share for connection `conn_uid` arrived: the link's keys exist
        from now on. False (and nothing changes) if `conn_uid` is not the peer's current
        connection or it already sent its share (the first one counts)."""
        rec = self._peers.get(peer)
        if rec is None or rec.conn_uid != conn_uid or rec.rx_key is not None:
            return False
        rec.tx_key = linkkey.derive_key(rec.local_share, share, self.ourself, peer, conn_uid)
        rec.rx_key = linkkey.derive_key(share, rec.local_share, peer, self.ourself, conn_uid)
        self._wake.set()
        return True

    def _key_for(self, sender: int, conn_uid: int) -> bytes | None:
        rec = self._peers.get(sender)
        return rec.rx_key if rec is not None and rec.conn_uid == conn_uid else None

    def remove_peer(self, peer: int, conn_uid: int) -> None:
        """Stop monitoring `peer` if `conn_uid` is its current connection; its FDB entry goes.

        If the kernel carried the peer, ``on_change`` reports it no longer does once
        the entry is gone. Idempotent.
        """
        rec = self._peers.get(peer)
        if rec is None or rec.conn_uid != conn_uid:
            return
        del self._peers[peer]
        self.monitor.remove(peer)
        rec.final_reason = "connection closed"
        if rec.reported:
            self._gone[peer] = rec
        self._kernel_wake.set()

    def state(self, peer: int) -> FastdpState | None:
        """The fastdp state of `peer`'s link, or None if it is not monitored."""
        rec = self._peers.get(peer)
        return self._snapshot(rec) if rec is not None else None

    def states(self) -> dict[int, FastdpState]:
        return {peer: self._snapshot(rec) for peer, rec in self._peers.items()}

    # -- the service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Set up the kernel side, then monitor peers until cancelled; the kernel objects go on exit.

        Returns right after ``task_status.started()`` if fastdp is unavailable here.
        """
        if self._started:
            raise RuntimeError("FastdpService.run() can only be called once")
        self._started = True
        try:
            try:
                ok, why = await trio.to_thread.run_sync(vxlan.available, self.netns)
                if ok:
                    await self._to_thread(self._setup)
            except _KERNEL_ERRORS as e:
                ok, why = False, f"cannot set up {self.device} on bridge {self.bridge!r}: {e}"
            if not ok:
                self.unavailable_reason = why
                self._stopped = True
                self._peers.clear()
                self.monitor.links.clear()
                log.warning("fastdp (vxlan overlay) unavailable, peers will use the sleeve: %s", why)
                task_status.started()
                return
            self.available = self.running = True
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._kernel_loop)
                await self._timer_loop()
        finally:
            self.running = False
            self._stopped = True
            with trio.CancelScope(shield=True):
                if self._made:
                    await self._to_thread(self._teardown)
                self._installed.clear()
                for rec in [*self._peers.values(), *self._gone.values()]:
                    rec.final_reason = rec.final_reason or "fastdp stopped"
                    self._report(rec)
                self._gone.clear()

    async def _to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    def _setup(self) -> None:
        vxlan.ensure_vxlan(self.bridge, self.port, self.vni, self.mtu, self.local_ip, self.netns)
        self._made = True
        self._apply_filter(frozenset())
        endpoint = ProbeEndpoint(self.ourself, self.bridge, self.mtu, self.vni, self.port, self.local_ip,
                                 self.netns)
        try:
            endpoint.open()
        except BaseException:
            vxlan.teardown(self.port, self.netns)
            srcfilter.remove(self.netns)
            self._made = False
            self._filtered = None
            raise
        self._endpoint = endpoint
        log.info("fastdp up: %s on %s, mtu %d, heartbeats of %d bytes", self.device, self.bridge, self.mtu,
                 self.config.heartbeat_size)

    def _apply_filter(self, ips: frozenset[str]) -> None:
        """Let VXLAN in from exactly `ips` (in a worker thread). Without nft the device stays
        open to all: logged once, and heartbeats are still authenticated."""
        if self._filter_error == _NO_NFT:
            return
        try:
            srcfilter.apply(ips, self.port, self.netns)
        except srcfilter.FilterError as e:
            self.stats["kernel_errors"] += 1
            if self._filter_error != str(e):
                log.warning("fastdp: cannot filter who may send to UDP %d (%s); strangers can reach %s",
                            self.port, e, self.device)
            self._filter_error = str(e)
            return
        self._filter_error = None
        self._filtered = ips

    def _teardown(self) -> None:
        if self._filtered is not None:
            srcfilter.remove(self.netns)
            self._filtered = None
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        try:
            vxlan.teardown(self.port, self.netns)
        except _KERNEL_ERRORS as e:
            log.error("fastdp: could not delete %s: %s", self.device, e)
            return
        log.info("fastdp stopped: %s and the probe port removed", self.device)

    # -- heartbeats

    async def _timer_loop(self) -> None:
        while True:
            self._wake = trio.Event()
            now = self._clock()
            self._perform(self.monitor.tick(now))
            deadline = self.monitor.next_deadline()
            wait = math.inf if deadline is None else max(deadline - self._clock(), 0.001)
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _receive_loop(self) -> None:
        endpoint = self._endpoint
        assert endpoint is not None
        while True:
            await trio.lowlevel.wait_readable(endpoint.fileno())
            try:
                frames = endpoint.receive(self._key_for)
            except OSError as e:
                log.warning("fastdp: reading the probe port failed: %s", e)
                await trio.sleep(0.1)
                continue
            now = self._clock()
            changed = False
            for frame in frames:
                msg = frame.message
                self.stats["frames_received"] += 1
                if msg.kind is ProbeKind.HEARTBEAT:
                    actions = self.monitor.heartbeat_received(
                        now, msg.sender, msg.conn_uid, msg.seq, msg.timestamp_ns, msg.echo_seq,
                        msg.echo_timestamp_ns, msg.echo_hold_ns, msg.ack_wanted)
                else:
                    actions = self.monitor.ack_received(
                        now, msg.sender, msg.conn_uid, msg.seq, msg.timestamp_ns)
                self._note_run(msg.sender, msg.conn_uid, msg.kind, now)
                changed |= any(isinstance(a, Transition) for a in actions)
                self._perform(actions)
            if changed:
                # Only a change of state can move a link's deadlines; fresh evidence
                # just pushes them later, which the timer finds when it wakes.
                self._wake.set()

    def _note_run(self, peer: int, conn_uid: int, kind: ProbeKind, now: float) -> None:
        """Remember when the current run of good heartbeats (and acks) began, to time returns."""
        rec = self._peers.get(peer)
        if rec is None or rec.conn_uid != conn_uid or rec.health.healthy:
            return
        if kind is ProbeKind.HEARTBEAT and rec.health.hb_streak == 1:
            rec.hb_run = now
        elif kind is ProbeKind.ACK and rec.health.ack_streak == 1:
            rec.ack_run = now

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Transition):
                self._transition(action)
                continue
            rec = self._peers.get(action.peer)
            if rec is None or self._endpoint is None:
                continue
            if rec.tx_key is None:
                self.stats["unkeyed"] += 1  # the peer's key share is not here yet
                continue
            if isinstance(action, SendHeartbeat):
                msg = ProbeMessage(ProbeKind.HEARTBEAT, self.ourself, action.conn_uid, action.seq,
                                   action.timestamp_ns, action.echo_seq, action.echo_timestamp_ns,
                                   action.echo_hold_ns, action.ack_wanted)
                try:
                    self._endpoint.send(rec.ip, rec.peer, msg, rec.tx_key, action.size)
                except OSError as e:
                    self.stats["send_errors"] += 1
                    self.monitor.send_failed(self._clock(), rec.peer, action.seq, str(e))
                    self._send_error(rec, e)
                else:
                    self.stats["heartbeats_sent"] += 1
                    self._send_error(rec, None)
            elif isinstance(action, SendAck):
                msg = ProbeMessage(ProbeKind.ACK, self.ourself, action.conn_uid, action.seq,
                                   action.timestamp_ns)
                try:
                    self._endpoint.send(rec.ip, rec.peer, msg, rec.tx_key)
                except OSError as e:
                    self.stats["send_errors"] += 1
                    log.debug("fastdp: ack to %s failed: %s", _who(rec.peer), e)
                else:
                    self.stats["acks_sent"] += 1

    def _send_error(self, rec: _Peer, error: OSError | None) -> None:
        text = None if error is None else str(error)
        if text == rec.send_error:
            return
        if text is None:
            log.info("fastdp: heartbeats to %s can be sent again", _who(rec.peer))
        elif isinstance(error, PathMtuError):
            log.warning("fastdp: %s; its traffic stays on the sleeve", text)
        else:
            log.info("fastdp: heartbeat to %s failed: %s", _who(rec.peer), text)
        rec.send_error = text

    def _transition(self, t: Transition) -> None:
        rec = self._peers.get(t.peer)
        if rec is None or rec.conn_uid != t.conn_uid:
            return
        rec.last_transition = t.at
        if t.old is LinkState.HEALTHY:
            link = rec.health
            evidence = [x for x in (link.last_ack_at, link.last_hb_at) if x is not None]
            rec.lost_at = min(evidence) if evidence else None
            rec.hb_run = rec.ack_run = None
        if LinkState.HEALTHY in (t.old, t.new):
            self._kernel_wake.set()
        elif self.on_change is not None:
            self.on_change(rec.peer, self._snapshot(rec))  # pending -> unhealthy: nothing for the kernel

    # -- the kernel's forwarding database

    def _fdb_changes(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(removals, additions) of (ip, peer) that make the kernel's peer entries match
        the healthy links."""
        want = {rec.ip: rec.peer for rec in self._peers.values() if rec.health.healthy}
        removals = [(ip, peer) for ip, peer in self._installed.items() if want.get(ip) != peer]
        additions = [(ip, peer) for ip, peer in want.items() if ip not in self._installed]
        return removals, additions

    async def _kernel_loop(self) -> None:
        next_sweep = self._clock() + self.sweep_interval
        while True:
            self._kernel_wake = trio.Event()
            failed = False
            while not failed:
                removals, additions = self._fdb_changes()
                if removals:
                    ip, peer = removals[0]
                    try:
                        await self._to_thread(vxlan.remove_peer, ip, self.port, self.netns)
                    except _KERNEL_ERRORS as e:
                        self._kernel_failed(peer, f"remove fdb entry for {ip}: {e}")
                        failed = True
                        break
                    del self._installed[ip]
                    self._recently_removed[ip] = (self._clock() + SWEEP_GRACE, peer)
                    self._kernel_ok(peer)
                    self._report_peer(peer)
                elif additions:
                    # Links come up in bursts (a mesh forming): one netlink socket for all.
                    outcome: dict[str, Exception | None]
                    try:
                        outcome = dict(await self._to_thread(
                            vxlan.add_peers, [ip for ip, _ in additions], self.port, self.netns
                        ))
                    except _KERNEL_ERRORS as e:
                        outcome = {ip: e for ip, _ in additions}
                    for ip, peer in additions:
                        error = outcome.get(ip)
                        if error is not None:
                            self._kernel_failed(peer, f"add fdb entry for {ip}: {error}")
                            failed = True
                            continue
                        self._installed[ip] = peer
                        self._kernel_ok(peer)
                        self._report_peer(peer)
                else:
                    break
            wanted = frozenset(rec.ip for rec in self._peers.values())
            if wanted != self._filtered:
                await self._to_thread(self._apply_filter, wanted)
                failed = failed or (wanted != self._filtered and self._filter_error != _NO_NFT)
            now = self._clock()
            if not failed and now >= next_sweep:
                next_sweep = now + self.sweep_interval
                await self._sweep(now)
            wait = KERNEL_RETRY if failed else next_sweep - now if self._suspects(now) else math.inf
            with trio.move_on_after(max(wait, 0.001)):
                await self._kernel_wake.wait()

    def _suspects(self, now: float) -> dict[str, int]:
        """IPs (-> peer) whose entries went lately: the kernel may have learned MACs behind them since."""
        for ip, (until, _) in list(self._recently_removed.items()):
            if until < now:
                del self._recently_removed[ip]
        return {ip: peer for ip, (_, peer) in self._recently_removed.items() if ip not in self._installed}

    async def _sweep(self, now: float) -> None:
        # A frame that left the peer just before it, too, declared the link dead makes
        # the kernel learn a MAC behind it again; unicast to that MAC would vanish into
        # the dead tunnel until the entry aged out (5 min), so such entries go. The
        # peer's probe MAC, learned from its heartbeats, is harmless: nothing sends to it.
        suspects = self._suspects(now)
        if not suspects:
            return
        try:
            entries = await self._to_thread(vxlan.fdb_entries, self.port, self.netns)
            stale = {e.dst for e in entries
                     if e.dst in suspects and e.mac != _mac_text(probe_mac(suspects[e.dst]))}
            for ip in sorted(stale):
                if ip not in self._installed:
                    self.stats["swept"] += await self._to_thread(vxlan.remove_peer, ip, self.port, self.netns)
        except _KERNEL_ERRORS as e:
            self.stats["kernel_errors"] += 1
            log.debug("fastdp: sweeping learned entries failed: %s", e)

    def _kernel_failed(self, peer: int, error: str) -> None:
        self.stats["kernel_errors"] += 1
        rec = self._peers.get(peer) or self._gone.get(peer)
        if rec is not None and rec.kernel_error != error:
            rec.kernel_error = error
            log.warning("fastdp: %s (retrying every %.0f s)", error, KERNEL_RETRY)

    def _kernel_ok(self, peer: int) -> None:
        rec = self._peers.get(peer) or self._gone.get(peer)
        if rec is not None:
            rec.kernel_error = None

    def _report_peer(self, peer: int) -> None:
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._gone.get(peer)
            if rec is None or any(p == peer for p in self._installed.values()):
                return
            del self._gone[peer]
        self._report(rec)

    def _carried(self, rec: _Peer) -> bool:
        return (rec.final_reason is None and rec.health.healthy
                and self._installed.get(rec.ip) == rec.peer)

    def _report(self, rec: _Peer) -> None:
        """Tell on_change if whether the kernel carries `rec`'s peer has changed."""
        healthy = self._carried(rec)
        if healthy == rec.reported:
            return
        now = self._clock()
        rec.reported = healthy
        rec.since = now
        if healthy:
            if rec.was_healthy:
                rec.returns += 1
                runs = [x for x in (rec.hb_run, rec.ack_run) if x is not None]
                rec.last_return = now - min(runs) if runs else None
            rec.was_healthy = True
            log.debug("fastdp: %s now carried by %s", _who(rec.peer), self.device)
        else:
            if rec.final_reason is None and rec.was_healthy:
                rec.failovers += 1
                rec.last_failover = now - rec.lost_at if rec.lost_at is not None else None
            log.debug("fastdp: %s no longer carried by %s: %s", _who(rec.peer), self.device,
                     rec.final_reason or rec.health.reason)
        if self.on_change is not None:
            self.on_change(rec.peer, self._snapshot(rec))

    def _snapshot(self, rec: _Peer) -> FastdpState:
        link = rec.health
        if rec.final_reason is not None:
            reason = rec.final_reason
        elif rec.rx_key is None:
            reason = "no key share from the peer yet (heartbeats need the keys)"
        elif link.state is LinkState.PENDING:
            reason = f"not yet confirmed ({link.reason})"
        else:
            reason = link.reason
        return FastdpState(
            peer=rec.peer, conn_uid=rec.conn_uid, peer_ip=rec.ip, healthy=rec.reported, link=link.state,
            since=rec.since, reason=reason, last_transition=rec.last_transition, failovers=rec.failovers,
            returns=rec.returns, last_failover=rec.last_failover, last_return=rec.last_return, rtt=link.rtt,
            error=rec.kernel_error or rec.send_error)


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _who(peer: int) -> str:
    return format_peer_name(peer)
