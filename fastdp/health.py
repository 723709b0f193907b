"""Per-peer health of the fast data path: a sans-IO state machine driven by heartbeats.

Each side of a fastdp link sends heartbeats (full-size VXLAN probe frames, see
:mod:`fastdp.probe`). A heartbeat from the peer proves its full-size frames reach us;
proof that ours reach it comes back as an ack, or, once the link is healthy, as the echo
of our latest heartbeat that each of the peer's heartbeats carries (half the frames). A
link is good when both keep arriving.

States::

    PENDING --(first ack and first peer heartbeat)--> HEALTHY       "confirmed"
    PENDING --(confirm_timeout without that)--------> UNHEALTHY     "not confirmed"
                    (and still leaves UNHEALTHY by the first exchange, like PENDING)
    HEALTHY --(no ack/echo or no peer heartbeat for `timeout`)--> UNHEALTHY "heartbeats lost N s ago"
    UNHEALTHY --(K consecutive acks and K consecutive peer heartbeats)--> HEALTHY "healthy again"

Timing (defaults) and why:

- Heartbeats every 150 ms while healthy, and `timeout` 0.9 s: a break is declared 0.6-0.9 s
  after it happens (an echo can be up to two intervals old when the path breaks), well
  within the 3 s promised with room for a stalled event loop, and at least 4 consecutive
  losses are needed, so random loss does not trip it. A router sends at most `budget`
  heartbeats per second in all; with many peers intervals and timeout stretch, the
  timeout staying within `max_timeout`. A healthy link asks for acks again whenever the
  echoes fall half a timeout behind (a peer that heartbeats more slowly).
- While pending, heartbeats every 100 ms: a new link is confirmed one round trip after
  both sides can exchange, plus at most 100 ms, well within 1 s.
- While unhealthy, heartbeats every 500 ms (cheap, the path may be broken for long), and
  recovery needs K = 5 consecutive heartbeats each way (no sequence gap), i.e. about 2 s
  of a clean path: a path that drops even one heartbeat in that window stays on the
  sleeve. Flapping is damped: each HEALTHY->UNHEALTHY transition within the last
  `flap_window` (60 s) doubles K, up to 16 (7.5 s of clean path at 500 ms), so traffic
  still moves back within 10 s of a lasting repair.

Cost: every input is O(1) attribute updates on one object found by a dict lookup; at the
budget of 60 heartbeats per second a healthy router handles ~120 frames per second.
Time is passed in (`now`, monotonic seconds); on the wire a timestamp is
``round(now * 1e9)`` of the sender's clock and acks and echoes return it unchanged, so
round-trip times need no per-sequence state.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A peer's heartbeat sequence numbers grow by one per heartbeat, a few per second. One
# that jumps further ahead than any sender could have counted since the last (1000 a
# second, plus slack for reordering) is a bug or an attack, and is ignored: believing it
# would make every real heartbeat after it look old, and the link would never recover.
MAX_SEQ_SLACK = 1024
MAX_HEARTBEAT_RATE = 1000.0


class LinkState(enum.Enum):
    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class HealthConfig:
    confirm_interval: float = 0.1
    healthy_interval: float = 0.15
    unhealthy_interval: float = 0.5
    timeout: float = 0.9
    confirm_timeout: float = 5.0
    recovery_rounds: int = 5
    max_recovery_rounds: int = 16
    flap_window: float = 60.0
    heartbeat_size: int = 1390  # inner frame bytes: overlay MTU 1376 + 14
    # Heartbeats per second a router sends to all its peers together while they are
    # healthy. Past it (many peers) intervals and the timeout stretch, the timeout
    # staying within max_timeout, so that detection stays under the 3 s promised.
    budget: float = 60.0
    max_timeout: float = 2.7
    # Heartbeats leave on this grid (seconds of the monotonic clock).
    send_grid: float = 0.05

    def __post_init__(self) -> None:
        if min(self.confirm_interval, self.healthy_interval, self.unhealthy_interval) <= 0:
            raise ValueError("heartbeat intervals must be positive")
        if self.timeout < 2 * self.healthy_interval:
            raise ValueError("timeout must cover at least two healthy heartbeat intervals")
        if not 1 <= self.recovery_rounds <= self.max_recovery_rounds:
            raise ValueError("need 1 <= recovery_rounds <= max_recovery_rounds")


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    """Send heartbeat `seq` of `size` bytes (inner frame) to `peer`, stamped `timestamp_ns`.

    It echoes the peer's latest heartbeat (`echo_seq`, 0 for none, with its timestamp and
    how long we held it), and says whether each of ours still wants an ack."""

    peer: int
    conn_uid: int
    seq: int
    timestamp_ns: int
    size: int
    echo_seq: int = 0
    echo_timestamp_ns: int = 0
    echo_hold_ns: int = 0
    ack_wanted: bool = True


@dataclass(frozen=True, slots=True)
class SendAck:
    """Ack `peer`'s heartbeat `seq`, echoing its `timestamp_ns`."""

    peer: int
    conn_uid: int
    seq: int
    timestamp_ns: int


@dataclass(frozen=True, slots=True)
class Transition:
    """`peer`'s link went from `old` to `new` at `at` because of `reason`."""

    peer: int
    conn_uid: int
    old: LinkState
    new: LinkState
    reason: str
    at: float


Action = SendHeartbeat | SendAck | Transition


def _ns(now: float) -> int:
    return max(0, round(now * 1e9))


class PeerHealth:
    """The health of the fastdp link to one peer (one mesh connection, `conn_uid`)."""

    __slots__ = ("peer", "conn_uid", "config", "state", "reason", "created", "since", "seq", "next_send",
                 "last_ack_at", "last_ack_seq", "ack_streak", "last_hb_at", "last_hb_seq", "last_hb_ts",
                 "hb_streak", "rtt", "last_error", "flaps", "sent", "acked", "received", "confirmed",
                 "implausible")

    def __init__(self, peer: int, conn_uid: int, now: float, config: HealthConfig | None = None) -> None:
        self.peer = peer
        self.conn_uid = conn_uid
        self.config = config or HealthConfig()
        self.state = LinkState.PENDING
        self.reason = "waiting for the first heartbeat exchange"
        self.created = now
        self.since = now
        self.seq = 0  # last heartbeat sequence number sent
        self.next_send = now
        self.last_ack_at: float | None = None
        self.last_ack_seq: int | None = None
        self.ack_streak = 0
        self.last_hb_at: float | None = None
        self.last_hb_seq: int | None = None
        self.last_hb_ts = 0  # the peer's timestamp on its latest heartbeat, echoed in ours
        self.hb_streak = 0
        self.rtt: float | None = None  # smoothed round-trip time, seconds
        self.last_error: str | None = None
        self.flaps: deque[float] = deque()
        self.sent = self.acked = self.received = 0
        self.confirmed = False  # has this link ever been HEALTHY
        self.implausible = 0  # heartbeats ignored because their seq jumped too far ahead

    def __repr__(self) -> str:
        return f"PeerHealth(peer={self.peer:012x}, {self.state.value}: {self.reason})"

    @property
    def healthy(self) -> bool:
        return self.state is LinkState.HEALTHY

    def interval(self) -> float:
        if self.state is LinkState.HEALTHY:
            return self.config.healthy_interval
        if self.state is LinkState.PENDING:
            return self.config.confirm_interval
        return self.config.unhealthy_interval

    def next_deadline(self) -> float:
        """When :meth:`tick` next has something to do."""
        deadline = self.next_send
        if self.state is LinkState.HEALTHY:
            assert self.last_ack_at is not None and self.last_hb_at is not None
            deadline = min(deadline, min(self.last_ack_at, self.last_hb_at) + self.config.timeout)
        elif self.state is LinkState.PENDING:
            deadline = min(deadline, self.created + self.config.confirm_timeout)
        return deadline

    def required_rounds(self, now: float) -> int:
        """Consecutive good heartbeats (each way) needed to leave UNHEALTHY now."""
        flaps = sum(1 for t in self.flaps if now - t <= self.config.flap_window)
        rounds = self.config.recovery_rounds << max(0, flaps - 1)
        return min(rounds, self.config.max_recovery_rounds)

    # -- inputs

    def tick(self, now: float) -> list[Action]:
        """Time passed: check deadlines, send the next heartbeat if due."""
        actions: list[Action] = []
        self._check_timeouts(now, actions)
        if now >= self.next_send:
            self.seq += 1
            self.sent += 1
            size = self.config.heartbeat_size
            echo_seq, hold = 0, 0
            if self.last_hb_seq is not None and self.last_hb_at is not None:
                echo_seq, hold = self.last_hb_seq, _ns(now - self.last_hb_at)
            actions.append(SendHeartbeat(self.peer, self.conn_uid, self.seq, _ns(now), size,
                                         echo_seq, self.last_hb_ts, hold, self.acks_wanted(now)))
            self.next_send += self.interval()
            if self.next_send <= now:  # we were late (stalled loop): don't send a burst to catch up
                self.next_send = now + self.interval()
            # On a grid, so that one wake-up sends every link's heartbeat that is due.
            grid = self.config.send_grid
            self.next_send = math.ceil(self.next_send / grid - 1e-9) * grid
        return actions

    def acks_wanted(self, now: float) -> bool:
        """Whether our heartbeats ask for acks. A healthy link does without: the peer's
        heartbeats echo ours, which halves the frames. Acks come back when the echoes
        fall behind (a peer that heartbeats more slowly than we need)."""
        if self.state is not LinkState.HEALTHY or self.last_ack_at is None:
            return True
        return now - self.last_ack_at > self.config.timeout / 2

    def heartbeat_received(self, now: float, seq: int, timestamp_ns: int, echo_seq: int = 0,
                           echo_timestamp_ns: int = 0, echo_hold_ns: int = 0,
                           ack_wanted: bool = True) -> list[Action]:
        """The peer's heartbeat `seq` arrived: ack it if asked to, count it, and take the
        echo of ours it carries as an ack if the link is healthy."""
        last = self.last_hb_seq
        if last is not None and self.last_hb_at is not None:
            if seq - last > MAX_SEQ_SLACK + max(0.0, now - self.last_hb_at) * MAX_HEARTBEAT_RATE:
                self.implausible += 1
                return []
        actions: list[Action] = [SendAck(self.peer, self.conn_uid, seq, timestamp_ns)] if ack_wanted else []
        if last is not None and seq <= last:
            return actions  # duplicate or reordered: ack it, but it proves nothing new
        self.received += 1
        self.hb_streak = self.hb_streak + 1 if last is not None and seq == last + 1 else 1
        self.last_hb_seq = seq
        self.last_hb_ts = timestamp_ns
        self.last_hb_at = now
        if echo_seq and self.state is LinkState.HEALTHY:
            self._echoed(now, echo_seq, echo_timestamp_ns, echo_hold_ns)
        self._check_better(now, actions)
        return actions

    def _echoed(self, now: float, seq: int, timestamp_ns: int, hold_ns: int) -> None:
        """The peer had our heartbeat `seq` (sent at `timestamp_ns`, our clock) and held
        it `hold_ns` before echoing: proof the path worked when it arrived there, which
        is when an immediate ack would have come back (now - hold). Never later than now,
        never earlier than when it left."""
        last = self.last_ack_seq
        if seq > self.seq or (last is not None and seq <= last):
            return  # never sent, or no newer than what we know
        sent_at = min(timestamp_ns / 1e9, now)
        hold = hold_ns / 1e9
        self.acked += 1
        self.ack_streak = self.ack_streak + 1 if last is not None and seq == last + 1 else 1
        self.last_ack_seq = seq
        evidence = max(sent_at, now - hold)
        self.last_ack_at = max(evidence, self.last_ack_at or evidence)
        rtt = now - sent_at - hold
        if 0 <= rtt < self.config.timeout * 10:
            self.rtt = rtt if self.rtt is None else self.rtt + (rtt - self.rtt) / 8
        self.last_error = None

    def ack_received(self, now: float, seq: int, timestamp_ns: int) -> list[Action]:
        """The peer acked our heartbeat `seq` (echoing the timestamp we sent)."""
        last = self.last_ack_seq
        if seq > self.seq or (last is not None and seq <= last):
            return []  # an ack for something we never sent, or a stale one
        self.acked += 1
        self.ack_streak = self.ack_streak + 1 if last is not None and seq == last + 1 else 1
        self.last_ack_seq = seq
        self.last_ack_at = now
        rtt = now - timestamp_ns / 1e9
        if 0 <= rtt < self.config.timeout * 10:
            self.rtt = rtt if self.rtt is None else self.rtt + (rtt - self.rtt) / 8
        self.last_error = None
        actions: list[Action] = []
        self._check_better(now, actions)
        return actions

    def send_failed(self, now: float, seq: int, error: str) -> None:
        """Heartbeat `seq` could not be sent (e.g. EMSGSIZE: the path MTU is too small)."""
        self.last_error = error
        self.ack_streak = 0

    # -- transitions

    def _move(self, now: float, new: LinkState, reason: str, actions: list[Action]) -> None:
        old = self.state
        self.state = new
        self.reason = reason
        self.since = now
        actions.append(Transition(self.peer, self.conn_uid, old, new, reason, now))
        log.log(logging.INFO if new is not LinkState.UNHEALTHY else logging.WARNING,
                "fastdp link to %012x: %s -> %s: %s", self.peer, old.value, new.value, reason)

    def _suffix(self) -> str:
        return f"; last send error: {self.last_error}" if self.last_error else ""

    def _check_timeouts(self, now: float, actions: list[Action]) -> None:
        if self.state is LinkState.HEALTHY:
            assert self.last_ack_at is not None and self.last_hb_at is not None
            timeout = self.config.timeout
            ack_age, hb_age = now - self.last_ack_at, now - self.last_hb_at
            if ack_age < timeout and hb_age < timeout:
                return
            # Echoes ride on the peer's heartbeats and are up to an interval older: when
            # those stop, the echoes stop with them, and the cause is the peer's side.
            if hb_age + self.config.healthy_interval >= ack_age:
                what = f"heartbeats lost {hb_age:.1f} s ago (none received from the peer)"
            else:
                what = f"heartbeats lost {ack_age:.1f} s ago (ours are not acknowledged)"
            self.flaps.append(now)
            while self.flaps and now - self.flaps[0] > self.config.flap_window:
                self.flaps.popleft()
            self.ack_streak = self.hb_streak = 0
            self._move(now, LinkState.UNHEALTHY, what + self._suffix(), actions)
        elif self.state is LinkState.PENDING and now - self.created >= self.config.confirm_timeout:
            missing = []
            if self.last_ack_at is None:
                missing.append("no ack")
            if self.last_hb_at is None:
                missing.append("no heartbeat from the peer")
            self.ack_streak = self.hb_streak = 0
            self._move(now, LinkState.UNHEALTHY,
                       f"not confirmed within {self.config.confirm_timeout:.1f} s ({', '.join(missing)})"
                       + self._suffix(), actions)

    def _check_better(self, now: float, actions: list[Action]) -> None:
        if self.state is LinkState.PENDING or (self.state is LinkState.UNHEALTHY and not self.confirmed):
            # A link never confirmed has nothing to be damped for: one exchange each way will do.
            timeout = self.config.timeout
            if (self.last_ack_at is not None and self.last_hb_at is not None
                    and now - self.last_ack_at < timeout and now - self.last_hb_at < timeout):
                self.confirmed = True
                rtt = f", rtt {self.rtt * 1e3:.2f} ms" if self.rtt is not None else ""
                after = now - self.created
                self._move(now, LinkState.HEALTHY,
                           f"confirmed: heartbeats flow both ways after {after:.2f} s{rtt}", actions)
        elif self.state is LinkState.UNHEALTHY:
            need = self.required_rounds(now)
            if self.ack_streak >= need and self.hb_streak >= need:
                self._move(now, LinkState.HEALTHY,
                           f"healthy again: {need} consecutive heartbeats acked and received", actions)


class HealthMonitor:
    """The health of every peer's fastdp link; dispatches inputs by peer name and ConnUID.

    Inputs for unknown peers or a different ConnUID (an old connection) are ignored and
    counted in `ignored`; such heartbeats are not acked, so a peer only sees acks from
    a side that knows the same connection.
    """

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.base = config or HealthConfig()
        self.config = self.base
        self.links: dict[int, PeerHealth] = {}
        self.ignored = 0

    def add(self, peer: int, conn_uid: int, now: float) -> PeerHealth:
        """Start monitoring `peer`'s link for connection `conn_uid` (replacing an older one)."""
        link = self.links.get(peer)
        if link is None or link.conn_uid != conn_uid:
            link = self.links[peer] = PeerHealth(peer, conn_uid, now, self.config)
            self._rescale()
        return link

    def remove(self, peer: int) -> None:
        if self.links.pop(peer, None) is not None:
            self._rescale()

    def _rescale(self) -> None:
        """Keep the heartbeat rate within the budget as peers come and go."""
        base = self.base
        scale = max(1.0, len(self.links) / (base.healthy_interval * base.budget))
        timeout = min(max(base.timeout, base.timeout * scale), max(base.max_timeout, base.timeout))
        healthy = min(base.healthy_interval * scale, timeout / 2)
        ratio = healthy / base.healthy_interval
        config = dataclasses.replace(
            base,
            confirm_interval=base.confirm_interval * ratio,
            healthy_interval=healthy,
            unhealthy_interval=max(base.unhealthy_interval, healthy),
            timeout=timeout,
        )
        if config != self.config:
            self.config = config
            for link in self.links.values():
                link.config = config

    def _link(self, peer: int, conn_uid: int) -> PeerHealth | None:
        link = self.links.get(peer)
        if link is None or link.conn_uid != conn_uid:
            self.ignored += 1
            return None
        return link

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for link in self.links.values():
            if now >= link.next_deadline():
                actions.extend(link.tick(now))
        return actions

    def heartbeat_received(self, now: float, peer: int, conn_uid: int, seq: int, timestamp_ns: int,
                           echo_seq: int = 0, echo_timestamp_ns: int = 0, echo_hold_ns: int = 0,
                           ack_wanted: bool = True) -> list[Action]:
        link = self._link(peer, conn_uid)
        if link is None:
            return []
        return link.heartbeat_received(now, seq, timestamp_ns, echo_seq, echo_timestamp_ns, echo_hold_ns,
                                       ack_wanted)

    def ack_received(self, now: float, peer: int, conn_uid: int, seq: int, timestamp_ns: int) -> list[Action]:
        link = self._link(peer, conn_uid)
        return link.ack_received(now, seq, timestamp_ns) if link else []

    def send_failed(self, now: float, peer: int, seq: int, error: str) -> None:
        link = self.links.get(peer)
        if link is not None:
            link.send_failed(now, seq, error)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has work, or None with no links."""
        return min((link.next_deadline() for link in self.links.values()), default=None)

    def state(self, peer: int) -> LinkState | None:
        link = self.links.get(peer)
        return link.state if link else None
