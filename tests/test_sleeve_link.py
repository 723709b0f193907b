"""sleeve.link: heartbeats, confirmation, fragmentation test and PMTU search, with a fake clock."""

from __future__ import annotations

import struct

import pytest

from router.protocol import SleeveControl
from sleeve.link import (
    FAST_HEARTBEAT,
    FIRST_RETRY,
    HEARTBEAT_TIMEOUT,
    SLOW_HEARTBEAT,
    Established,
    Failed,
    MtuChanged,
    PmtuState,
    SendControl,
    SendFrame,
    SleeveLink,
)
from sleeve.wire import SpecialFrame, classify_special, heartbeat_conn_uid, probe_mtu

UID = 0x1234
ADDR = ("10.0.0.2", 6783)


def frames(actions: list, kind: SpecialFrame | None = None) -> list[SendFrame]:
    return [a for a in actions if isinstance(a, SendFrame) and (kind is None or classify_special(a.frame) is kind)]


def test_outbound_side_heartbeats_at_once_then_sooner_retries_then_every_half_second() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    beats = frames(link.tick(0.0), SpecialFrame.HEARTBEAT)
    assert len(beats) == 1 and heartbeat_conn_uid(beats[0].frame) == UID
    sent = [0.0]
    while sent[-1] < 3.0:
        t = link.next_deadline()
        assert len(frames(link.tick(t), SpecialFrame.HEARTBEAT)) == 1
        sent.append(t)
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    expected = [FIRST_RETRY, 2 * FIRST_RETRY, 4 * FIRST_RETRY, 8 * FIRST_RETRY] + [FAST_HEARTBEAT] * (len(gaps) - 4)
    assert gaps == pytest.approx(expected)


def test_inbound_side_waits_for_a_heartbeat_then_answers_and_acks() -> None:
    link = SleeveLink(UID, False, None, False, now=0.0)
    assert link.address is None and link.tick(5.0) == []
    actions = link.heartbeat(UID, ("10.0.0.9", 40000), now=5.0)
    assert SendControl(SleeveControl.CONNECTION_ESTABLISHED) in actions
    assert len(frames(actions, SpecialFrame.HEARTBEAT)) == 1
    assert link.address == ("10.0.0.9", 40000)
    # The same address again is not acknowledged twice.
    assert SendControl(SleeveControl.CONNECTION_ESTABLISHED) not in link.heartbeat(UID, ("10.0.0.9", 40000), now=5.1)


def test_heartbeat_of_another_connection_is_ignored() -> None:
    link = SleeveLink(UID, False, None, False, now=0.0)
    assert link.heartbeat(UID + 1, ADDR, now=1.0) == []
    assert link.address is None


def test_ack_establishes_slows_heartbeats_and_starts_mtu_checks() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    link.tick(0.0)
    actions = link.control(SleeveControl.CONNECTION_ESTABLISHED, b"", now=1.0)
    assert Established() in actions and link.established
    assert frames(actions, SpecialFrame.FRAGMENTATION_TEST)
    probes = frames(actions, SpecialFrame.PMTU_PROBE)
    assert probes and probes[0].df and probe_mtu(probes[0].frame) == 1438
    assert link.control(SleeveControl.CONNECTION_ESTABLISHED, b"", now=1.1) == []
    assert frames(link.tick(1.0 + SLOW_HEARTBEAT - 0.1), SpecialFrame.HEARTBEAT) == []
    assert frames(link.tick(1.0 + SLOW_HEARTBEAT), SpecialFrame.HEARTBEAT)


def test_silence_for_a_minute_fails_the_link() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    assert not any(isinstance(a, Failed) for a in link.tick(HEARTBEAT_TIMEOUT - 1))
    assert Failed("timed out waiting for UDP heartbeat") in link.tick(HEARTBEAT_TIMEOUT + 0.1)
    assert link.tick(HEARTBEAT_TIMEOUT + 1) == []


def test_acknowledgements_of_the_peers_probes() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    assert link.special_frame_ack(60001) == [SendControl(SleeveControl.FRAGMENTATION_RECEIVED)]
    assert link.special_frame_ack(1438 + 14) == [SendControl(SleeveControl.PMTU_VERIFIED, struct.pack(">H", 1438))]


def test_fragmentation_received_sets_frag_ok() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    link.control(SleeveControl.FRAGMENTATION_RECEIVED, b"", now=1.0)
    assert link.frag_ok


def run_pmtu(link: SleeveLink, path_mtu: int, start: float = 1.0) -> list:
    """Drive verification: probes up to `path_mtu` (as an overlay MTU) are acknowledged."""
    now = start
    out: list = []
    actions = link.control(SleeveControl.CONNECTION_ESTABLISHED, b"", now)
    for _ in range(10_000):
        out += actions
        acked = [p for p in frames(actions, SpecialFrame.PMTU_PROBE) if probe_mtu(p.frame) <= path_mtu]
        actions = []
        for probe in acked:
            size = struct.pack(">H", probe_mtu(probe.frame))
            actions += link.control(SleeveControl.PMTU_VERIFIED, size, now)
        if link.pmtu_state is PmtuState.DONE:
            return out + actions
        now += 0.005
        actions += link.tick(now)
    raise AssertionError("PMTU search did not finish")


def test_pmtu_verified_at_the_first_candidate_keeps_it() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    out = run_pmtu(link, 1438)
    assert link.mtu == 1438 and not any(isinstance(a, MtuChanged) for a in out)


def test_pmtu_search_finds_a_smaller_path() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    out = run_pmtu(link, 1238)
    assert link.mtu == 1238
    assert MtuChanged(1238) in out


def test_encrypted_and_extra_overhead_lower_the_first_candidate() -> None:
    assert SleeveLink(UID, True, ADDR, True, now=0.0).mtu == 1414
    assert SleeveLink(UID, True, ADDR, False, now=0.0, frame_overhead=10).mtu == 1428


def test_emsgsize_restarts_the_search_below_the_kernels_mtu() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    run_pmtu(link, 1438)
    actions = link.path_mtu(1400, now=30.0)
    probes = frames(actions, SpecialFrame.PMTU_PROBE)
    assert probes and probe_mtu(probes[0].frame) == 1338


def test_verified_mtu_is_rechecked_and_a_shrunk_path_found() -> None:
    link = SleeveLink(UID, True, ADDR, False, now=0.0)
    run_pmtu(link, 1438)
    assert link.pmtu_state is PmtuState.DONE and link.next_deadline() <= 1.0 + 61
    # The path shrinks silently; the periodic check (or reverify) finds it.
    out = link.reverify(now=20.0)
    assert probe_mtu(frames(out, SpecialFrame.PMTU_PROBE)[0].frame) == 1438
    now = 20.0
    while link.pmtu_state is PmtuState.VERIFYING and now < 200:
        now += 0.005
        for probe in frames(link.tick(now), SpecialFrame.PMTU_PROBE):
            if probe_mtu(probe.frame) <= 1300:
                link.control(SleeveControl.PMTU_VERIFIED, struct.pack(">H", probe_mtu(probe.frame)), now)
        link.last_heard = now  # heartbeats keep flowing
    assert link.mtu == 1300
