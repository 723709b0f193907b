"""The fastdp health state machine against a simulated clock and a simulated lossy path."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from fastdp.health import (
    HealthConfig,
    HealthMonitor,
    LinkState,
    PeerHealth,
    SendAck,
    SendHeartbeat,
    Transition,
)

PEER_A = 0x02_00_00_00_00_0A
PEER_B = 0x02_00_00_00_00_0B
UID = 0x1234_5678_9ABC_DEF0
STEP = 0.01  # simulated tick granularity
LATENCY = 0.001

# path(now, direction, size) -> delivered?  direction is "ab" or "ba"
Path = Callable[[float, str, int], bool]


def always(now: float, direction: str, size: int) -> bool:
    return True


@dataclass
class Sim:
    """Two peers' views of one link (A's view of B, B's view of A) over a simulated path."""

    path: Path = always
    config: HealthConfig = field(default_factory=HealthConfig)
    b_starts: float = 0.0
    now: float = 0.0
    a: PeerHealth = field(init=False)
    b: PeerHealth | None = None
    queue: list[tuple[float, int, str, object]] = field(default_factory=list)
    log: list[tuple[str, Transition]] = field(default_factory=list)
    counter: int = 0
    sent: list[tuple[float, str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.a = PeerHealth(PEER_B, UID, 0.0, self.config)

    def _send(self, src: str, action: SendHeartbeat | SendAck) -> None:
        direction = "ab" if src == "a" else "ba"
        self.sent.append((self.now, src, action))
        size = action.size if isinstance(action, SendHeartbeat) else 60
        if self.path(self.now, direction, size):
            self.counter += 1
            heapq.heappush(self.queue, (self.now + LATENCY, self.counter, "b" if src == "a" else "a", action))

    def _handle(self, who: str, actions: list) -> None:
        for action in actions:
            if isinstance(action, Transition):
                self.log.append((who, action))
            else:
                self._send(who, action)

    def run_until(self, end: float) -> None:
        while self.now < end:
            if self.b is None and self.now >= self.b_starts:
                self.b = PeerHealth(PEER_A, UID, self.now, self.config)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, dst, action = heapq.heappop(self.queue)
                view = self.a if dst == "a" else self.b
                if view is None:
                    continue  # B's daemon does not know the link yet: no ack
                if isinstance(action, SendHeartbeat):
                    self._handle(dst, view.heartbeat_received(
                        self.now, action.seq, action.timestamp_ns, action.echo_seq, action.echo_timestamp_ns,
                        action.echo_hold_ns, action.ack_wanted))
                else:
                    assert isinstance(action, SendAck)
                    self._handle(dst, view.ack_received(self.now, action.seq, action.timestamp_ns))
            self._handle("a", self.a.tick(self.now))
            if self.b is not None:
                self._handle("b", self.b.tick(self.now))
            self.now = round(self.now + STEP, 6)

    def transitions(self, who: str = "a") -> list[Transition]:
        return [t for w, t in self.log if w == who]

    def first(self, who: str, new: LinkState, after: float = 0.0) -> float:
        times = [t.at for t in self.transitions(who) if t.new is new and t.at >= after]
        assert times, f"{who} never became {new.value} after {after}: {self.transitions(who)}"
        return times[0]


def broken_between(start: float, end: float, directions: str = "ab ba") -> Path:
    def path(now: float, direction: str, size: int) -> bool:
        return not (start <= now < end and direction in directions.split())
    return path


# --- confirmation ---------------------------------------------------------------------------


def test_new_link_is_confirmed_quickly() -> None:
    sim = Sim()
    sim.run_until(2.0)
    for who in "ab":
        assert sim.first(who, LinkState.HEALTHY) < 0.3
        (t,) = sim.transitions(who)
        assert t.old is LinkState.PENDING and t.reason.startswith("confirmed")
    # each hop is delivered on the next simulated tick
    assert sim.a.rtt is not None and sim.a.rtt == pytest.approx(2 * STEP, abs=STEP)


def test_confirmed_within_1s_of_the_peer_starting_late() -> None:
    sim = Sim(b_starts=3.0)
    sim.run_until(5.0)
    assert sim.a.state is LinkState.HEALTHY
    assert sim.first("a", LinkState.HEALTHY) - 3.0 < 1.0
    assert sim.first("b", LinkState.HEALTHY) - 3.0 < 1.0


def test_not_confirmed_then_confirmed_by_first_exchange() -> None:
    sim = Sim(b_starts=8.0)
    sim.run_until(10.0)
    (fail, ok) = sim.transitions("a")
    assert fail.new is LinkState.UNHEALTHY and fail.at == pytest.approx(5.0, abs=STEP)
    assert "not confirmed" in fail.reason and "no ack" in fail.reason
    # Never confirmed before: no hysteresis, the first exchange is enough.
    assert ok.new is LinkState.HEALTHY and ok.at - 8.0 < 1.0


# --- failover --------------------------------------------------------------------------------


@pytest.mark.parametrize("directions", ["ab ba", "ab", "ba"])
def test_declared_unhealthy_within_3s_of_a_break(directions: str) -> None:
    sim = Sim(path=broken_between(5.0, 100.0, directions))
    sim.run_until(10.0)
    for who in "ab":
        t = sim.first(who, LinkState.UNHEALTHY)
        # Near the timeout (0.9 s): up to two heartbeat intervals sooner, since the last
        # echo of ours to get through can be that old when the path breaks; and well
        # inside the 3 s the issue allows.
        cfg = sim.config
        assert cfg.timeout - 2 * cfg.healthy_interval - STEP <= t - 5.0 < 1.5, (who, t)
        reason = sim.transitions(who)[-1].reason
        assert reason.startswith("heartbeats lost") and "s ago" in reason
    # While unhealthy the peer keeps probing, at the slower rate.
    sent = sim.a.sent
    sim.run_until(20.0)
    assert 18 <= sim.a.sent - sent <= 22


def test_unhealthy_reason_names_the_direction() -> None:
    sim = Sim(path=broken_between(2.0, 100.0, "ab"))
    sim.run_until(6.0)
    assert "not acknowledged" in sim.transitions("a")[-1].reason
    assert "none received" in sim.transitions("b")[-1].reason


def test_random_loss_does_not_flap() -> None:
    rng = random.Random(7)
    sim = Sim(path=lambda now, d, s: rng.random() >= 0.1)  # 10 % loss each way
    sim.run_until(300.0)
    assert [t.new for t in sim.transitions("a")] == [LinkState.HEALTHY]
    assert [t.new for t in sim.transitions("b")] == [LinkState.HEALTHY]


def test_mtu_too_small_fails_full_size_heartbeats_only() -> None:
    def path(now: float, direction: str, size: int) -> bool:
        return not (now >= 3.0 and size > 1200)  # heartbeats are 1390, acks 60

    sim = Sim(path=path)
    sim.run_until(8.0)
    assert 0.7 <= sim.first("a", LinkState.UNHEALTHY) - 3.0 < 1.5
    assert 0.7 <= sim.first("b", LinkState.UNHEALTHY) - 3.0 < 1.5


def test_send_error_is_reported_in_the_reason() -> None:
    cfg = HealthConfig()
    link = PeerHealth(PEER_B, UID, 0.0, cfg)
    now, actions = 0.0, []
    for action in link.tick(now):
        assert isinstance(action, SendHeartbeat) and action.size == 1390
        link.heartbeat_received(now, 1, 0)
        link.ack_received(now + 0.001, action.seq, action.timestamp_ns)
    assert link.state is LinkState.HEALTHY
    while now < 3.0:
        now += STEP
        for action in link.tick(now):
            if isinstance(action, SendHeartbeat):
                link.send_failed(now, action.seq, "path MTU to 10.0.0.2 is below 1426 bytes")
            actions.append(action)
    (t,) = [a for a in actions if isinstance(a, Transition)]
    assert t.new is LinkState.UNHEALTHY and "path MTU" in t.reason


# --- return and hysteresis -------------------------------------------------------------------


def test_healthy_again_within_10s_with_hysteresis() -> None:
    sim = Sim(path=broken_between(5.0, 15.0))
    sim.run_until(30.0)
    for who in "ab":
        back = sim.first(who, LinkState.HEALTHY, after=15.0)
        assert 1.5 <= back - 15.0 < 10.0, back
        assert sim.transitions(who)[-1].reason.startswith("healthy again")


def test_short_blips_do_not_flip_the_link() -> None:
    def path(now: float, direction: str, size: int) -> bool:
        return now < 2.0 or (now % 2.5) < 1.9  # down 0.6 s of every 2.5 s

    sim = Sim(path=path)
    sim.run_until(30.0)
    assert [t.new for t in sim.transitions("a")] == [LinkState.HEALTHY]


def test_intermittent_path_stays_on_the_sleeve() -> None:
    def path(now: float, direction: str, size: int) -> bool:
        return now < 3.0 or (now % 4.0) < 1.2  # up 1.2 s, down 2.8 s: never clean for long

    sim = Sim(path=path)
    sim.run_until(40.0)
    assert [t.new for t in sim.transitions("a")] == [LinkState.HEALTHY, LinkState.UNHEALTHY]


def test_flapping_is_damped_but_bounded() -> None:
    # Down 3 s, up 9 s, repeatedly: every outage is detected; each return takes longer
    # than the one before (up to the cap), but never more than 10 s.
    def path(now: float, direction: str, size: int) -> bool:
        return now < 5.0 or ((now - 5.0) % 12.0) >= 3.0

    sim = Sim(path=path)
    sim.run_until(65.0)
    ts = sim.transitions("a")
    downs = [t.at for t in ts if t.new is LinkState.UNHEALTHY]
    ups = [t.at for t in ts[1:] if t.new is LinkState.HEALTHY]
    assert len(downs) >= 4
    delays = []
    for up in ups:
        restored = 8.0 + 12.0 * ((up - 8.0) // 12.0)
        delays.append(up - restored)
    assert all(d < 10.0 for d in delays), delays
    assert delays == sorted(delays) and delays[-1] > delays[0] + 2.0, delays
    assert sim.a.required_rounds(sim.now) == HealthConfig().max_recovery_rounds


# --- the machine's details -------------------------------------------------------------------


def test_heartbeat_cadence_per_state() -> None:
    link = PeerHealth(PEER_B, UID, 0.0)
    sends = [a for i in range(101) for a in link.tick(i * STEP) if isinstance(a, SendHeartbeat)]
    assert len(sends) == 11  # pending: every 100 ms over [0, 1]
    assert [a.seq for a in sends] == list(range(1, 12))
    assert link.next_deadline() == pytest.approx(1.1)


def test_late_tick_does_not_burst() -> None:
    link = PeerHealth(PEER_B, UID, 0.0)
    link.tick(0.0)
    assert len(link.tick(5.0)) >= 1
    assert [a for a in link.tick(5.001) if isinstance(a, SendHeartbeat)] == []


def test_acks_and_heartbeats_bookkeeping() -> None:
    link = PeerHealth(PEER_B, UID, 0.0)
    assert link.ack_received(0.0, 1, 0) == []  # never sent
    (hb,) = link.tick(0.0)
    assert isinstance(hb, SendHeartbeat)
    actions = link.heartbeat_received(0.01, 7, 123)
    assert actions == [SendAck(PEER_B, UID, 7, 123)]
    # a duplicate is still acked but not counted
    assert link.heartbeat_received(0.02, 7, 123) == [SendAck(PEER_B, UID, 7, 123)]
    assert link.received == 1
    actions = link.ack_received(0.03, hb.seq, hb.timestamp_ns)
    assert [a.new for a in actions if isinstance(a, Transition)] == [LinkState.HEALTHY]
    assert link.rtt == pytest.approx(0.03)
    assert link.ack_received(0.04, hb.seq, hb.timestamp_ns) == []  # stale
    assert link.acked == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        HealthConfig(timeout=0.2)
    with pytest.raises(ValueError):
        HealthConfig(healthy_interval=0)
    with pytest.raises(ValueError):
        HealthConfig(recovery_rounds=20)


def test_monitor_dispatch_and_conn_uid() -> None:
    mon = HealthMonitor()
    assert mon.next_deadline() is None
    mon.add(PEER_B, UID, 0.0)
    (hb,) = mon.tick(0.0)
    assert isinstance(hb, SendHeartbeat) and hb.peer == PEER_B
    assert mon.tick(0.05) == []  # nothing due
    assert mon.heartbeat_received(0.05, PEER_B, UID + 1, 1, 0) == []  # another connection: not acked
    assert mon.heartbeat_received(0.05, PEER_A, UID, 1, 0) == []  # unknown peer
    assert mon.ignored == 2
    assert mon.heartbeat_received(0.05, PEER_B, UID, 1, 0) == [SendAck(PEER_B, UID, 1, 0)]
    (t,) = mon.ack_received(0.06, PEER_B, UID, hb.seq, hb.timestamp_ns)
    assert isinstance(t, Transition) and mon.state(PEER_B) is LinkState.HEALTHY
    assert mon.next_deadline() == pytest.approx(0.1)  # the send scheduled while pending
    assert mon.add(PEER_B, UID, 1.0) is mon.links[PEER_B]  # same connection: kept
    assert mon.add(PEER_B, UID + 1, 1.0).state is LinkState.PENDING  # new connection: fresh
    mon.send_failed(1.0, PEER_B, 1, "boom")
    assert mon.links[PEER_B].last_error == "boom"
    mon.remove(PEER_B)
    assert mon.state(PEER_B) is None


def test_25_peers_send_within_the_heartbeat_budget() -> None:
    mon = HealthMonitor()
    peers = [0x020000000100 + i for i in range(25)]
    for p in peers:
        mon.add(p, UID, 0.0)
    sent = 0
    now = 0.0
    while now < 60.0:
        for action in mon.tick(now):
            if isinstance(action, SendHeartbeat):
                sent += 1
                mon.ack_received(now, action.peer, UID, action.seq, action.timestamp_ns)
                mon.heartbeat_received(now, action.peer, UID, action.seq, action.timestamp_ns)
        now += 0.05
    assert all(mon.state(p) is LinkState.HEALTHY for p in peers)
    budget = HealthConfig().budget * 60
    assert 0.7 * budget <= sent <= 1.1 * budget, sent


def test_many_peers_stretch_intervals_within_the_budget_and_the_3s_promise() -> None:
    mon = HealthMonitor()
    for i in range(5):
        mon.add(PEER_B + i, UID, 0.0)
    assert mon.config == HealthConfig()  # a few peers: the base rates
    for i in range(5, 24):
        mon.add(PEER_B + i, UID, 0.0)
    cfg = mon.config
    assert 24 / cfg.healthy_interval <= HealthConfig().budget + 1e-9
    assert cfg.timeout <= 2.7 and cfg.timeout >= 2 * cfg.healthy_interval
    assert all(link.config is cfg for link in mon.links.values())
    for i in range(200):
        mon.add(PEER_B + 100 + i, UID, 0.0)
    assert mon.config.timeout <= 2.7  # detection still within 3 s, at a higher rate
    for peer in list(mon.links):
        mon.remove(peer)
    assert mon.config == HealthConfig()


# --- echoes instead of acks ------------------------------------------------------------------


def test_healthy_link_runs_on_echoes_without_acks() -> None:
    sim = Sim()
    sim.run_until(10.0)
    for who in "ab":
        (t,) = sim.transitions(who)  # confirmed once, healthy ever since
        assert t.new is LinkState.HEALTHY
    late = [(src, a) for at, src, a in sim.sent if at > 2.0]
    beats = [a for _, a in late if isinstance(a, SendHeartbeat)]
    acks = [a for _, a in late if isinstance(a, SendAck)]
    assert len(beats) > 100 and acks == []
    assert all(not b.ack_wanted and b.echo_seq > 0 for b in beats)
    # The echo carries the round trip: twice the simulated one-way latency.
    assert sim.a.rtt == pytest.approx(2 * LATENCY, abs=STEP * 2)


def test_echoes_that_stop_make_the_link_unhealthy_within_the_timeout() -> None:
    # A's heartbeats stop reaching B; B's still reach A, echoing A's last good one.
    sim = Sim(path=broken_between(5.0, 60.0, "ab"))
    sim.run_until(10.0)
    went = sim.first("a", LinkState.UNHEALTHY, after=5.0)
    assert 5.0 < went <= 5.0 + sim.config.timeout + STEP
    assert "not acknowledged" in sim.transitions("a")[-1].reason


def test_acks_are_asked_for_again_when_echoes_fall_behind() -> None:
    cfg = HealthConfig()
    link = PeerHealth(PEER_B, UID, 0.0, cfg)
    (hb,) = [a for a in link.tick(0.0) if isinstance(a, SendHeartbeat)]
    link.heartbeat_received(0.01, 1, 5)
    link.ack_received(0.02, hb.seq, hb.timestamp_ns)
    assert link.healthy and not link.acks_wanted(0.03)
    # No newer evidence for more than half the timeout: acks please.
    assert link.acks_wanted(0.02 + cfg.timeout / 2 + 0.01)
    # An echo of a heartbeat we never sent, or of an old one, is no evidence.
    link.heartbeat_received(0.5, 2, 6, echo_seq=99, echo_timestamp_ns=1)
    link.heartbeat_received(0.55, 3, 7, echo_seq=hb.seq, echo_timestamp_ns=hb.timestamp_ns)
    assert link.acks_wanted(0.56)
    # A fresh echo is; it counts from when our heartbeat reached the peer.
    (hb2,) = [a for a in link.tick(0.6) if isinstance(a, SendHeartbeat)]
    assert hb2.echo_seq == 3 and hb2.echo_timestamp_ns == 7 and hb2.ack_wanted
    hold = 10**7  # the peer held it 10 ms: it arrived there at 0.64
    link.heartbeat_received(0.65, 4, 8, echo_seq=hb2.seq, echo_timestamp_ns=hb2.timestamp_ns, echo_hold_ns=hold)
    assert link.last_ack_at == pytest.approx(0.64) and not link.acks_wanted(0.66)
    assert link.rtt is not None


def test_a_heartbeat_that_wants_no_ack_gets_none() -> None:
    link = PeerHealth(PEER_B, UID, 0.0)
    assert link.heartbeat_received(0.01, 1, 5, ack_wanted=False) == []
    assert link.heartbeat_received(0.02, 2, 6) == [SendAck(PEER_B, UID, 2, 6)]


# --- sequence numbers that cannot be real (issue 12) ---------------------------------------


def test_a_sequence_number_far_in_the_future_does_not_wedge_the_link() -> None:
    sim = Sim()
    sim.run_until(1.0)
    assert sim.a.state is LinkState.HEALTHY
    # One heartbeat claiming seq 2^63 (a bug, or a forgery with the key): ignored, unacked.
    assert sim.a.heartbeat_received(sim.now, 1 << 63, 0) == []
    assert sim.a.implausible == 1 and sim.a.last_hb_seq != 1 << 63
    sim.run_until(6.0)
    # The real heartbeats after it are still news: the link never left HEALTHY.
    assert sim.a.state is LinkState.HEALTHY, sim.transitions("a")
    assert [t.new for t in sim.transitions("a")] == [LinkState.HEALTHY]


def test_a_long_silence_still_allows_the_sequence_to_jump() -> None:
    link = PeerHealth(PEER_B, UID, 0.0)
    link.heartbeat_received(0.0, 1, 0)
    # An hour without heartbeats reaching us, at 2 per second from the peer: a real jump.
    link.heartbeat_received(3600.0, 1 + 7200, 0)
    assert link.last_hb_seq == 7201 and link.implausible == 0
    # ... but not one beyond what 1000 a second could count.
    link.heartbeat_received(3601.0, 7201 + 2100, 0)
    assert link.last_hb_seq == 7201 and link.implausible == 1
