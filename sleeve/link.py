"""The control side of one sleeve link (one mesh connection), sans-IO.

Heartbeats, confirmation, the fragmentation test and path-MTU verification, as Weave's
sleeve does them (weave-net.md §3.4): the side that dialled the TCP connection sends UDP
heartbeats to the remote's TCP address every 500 ms; the other side learns the remote's
UDP address from the first valid heartbeat (NAT tolerant) and answers in kind. Each
side acknowledges a heartbeat with ConnectionEstablished over TCP; receiving that ack
means our UDP gets through, and the link is established. Then heartbeats slow to 10 s,
the fragmentation test runs (every 5 min) and the overlay MTU is verified with probes.

Inputs are the events of the link and the clock; outputs are actions for the service.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass

from router.protocol import SleeveControl
from sleeve.wire import (
    ETHERNET_HEADER_SIZE,
    FRAG_TEST_FRAME_LEN,
    fragmentation_test_frame,
    heartbeat_frame,
    overlay_mtu,
    pmtu_probe_frame,
)

log = logging.getLogger(__name__)

FAST_HEARTBEAT = 0.5
# Before the link is confirmed, the first heartbeats repeat sooner (0.05, 0.1, 0.2, 0.4 s):
# the first usually arrives before the remote has registered the connection and is
# dropped, and a busy host starting many connections at once should not lose 0.5 s on each.
FIRST_RETRY = 0.05
SLOW_HEARTBEAT = 10.0
HEARTBEAT_TIMEOUT = 60.0
FRAG_TEST_INTERVAL = 300.0
PMTU_FIRST_WAIT = 0.01  # doubled per attempt
# Weave waits 8 attempts (2.55 s) before calling a size too big; a shrunk path then takes
# 10-20 s to find, during which bigger frames vanish. 6 attempts (0.63 s) still give a
# round trip of a few hundred ms time to answer.
PMTU_ATTEMPTS = 6
# A silent drop on the path (no ICMP) is only found by probing again.
PMTU_RECHECK_INTERVAL = 60.0
# Frame sizes (overlay MTU) PMTU verification searches between.
LOWEST_GOOD_MTU = 552 - 28 - 6 - 14  # Weave's lowest known-good path MTU, as an overlay MTU
DEFAULT_UNDERLAY_MTU = 1500

_U16 = struct.Struct(">H")


@dataclass(frozen=True)
class SendFrame:
    """Send a special frame (src us, dst the remote) on the link's UDP path; `df` ones
    (PMTU probes) must not be fragmented on the way."""

    frame: bytes
    df: bool


@dataclass(frozen=True)
class SendControl:
    """Send a sleeve control message on the mesh connection (TCP); the mesh frames it."""

    subtag: SleeveControl
    body: bytes = b""


@dataclass(frozen=True)
class Established:
    pass


@dataclass(frozen=True)
class MtuChanged:
    mtu: int


@dataclass(frozen=True)
class Failed:
    reason: str


Action = SendFrame | SendControl | Established | MtuChanged | Failed


class PmtuState(enum.Enum):
    IDLE = "idle"
    VERIFYING = "verifying"
    DONE = "done"


class SleeveLink:
    """One connection's sleeve control state.

    `address` is where UDP goes: the remote's TCP address when we dialled, else learnt
    from its heartbeats (None until then). `mtu` is the overlay MTU: the largest Ethernet
    payload (frame minus 14) the link carries; `frag_ok` says the path carried a
    fragmented datagram, so oversize non-DF frames may be sent whole.
    """

    def __init__(
        self,
        conn_uid: int,
        outbound: bool,
        address: tuple[str, int] | None,
        encrypted: bool,
        now: float,
        underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
        frame_overhead: int = 0,
    ) -> None:
        self.conn_uid = conn_uid
        self.outbound = outbound
        self.address = address if outbound else None
        self.encrypted = encrypted
        self.established = False
        self.failed = False
        self.frag_ok = False
        # Bytes a link adds to every frame beyond Weave's format (pyweave's virtio header).
        self.frame_overhead = frame_overhead
        self.mtu = overlay_mtu(underlay_mtu, encrypted) - frame_overhead
        self.pmtu_state = PmtuState.IDLE
        self.last_heard = now
        self._started = now
        self._next_heartbeat = now if outbound else float("inf")
        self._unconfirmed_interval = FIRST_RETRY
        self._acked_address: tuple[str, int] | None = None
        self._next_frag_test = float("inf")
        # PMTU search: the candidate being verified, the highest verified, the lowest failed.
        self._candidate = self.mtu
        self._good = LOWEST_GOOD_MTU
        self._bad: int | None = None
        self._probe_attempt = 0
        self._probe_deadline = float("inf")
        self._next_recheck = float("inf")

    # -- events

    def heartbeat(self, conn_uid: int, address: tuple[str, int], now: float) -> list[Action]:
        """A heartbeat frame arrived from `address`."""
        if conn_uid != self.conn_uid or self.failed:
            return []
        self.last_heard = now
        actions: list[Action] = []
        if self.address != address:
            if self.address is not None:
                log.info("sleeve: peer's UDP address moved from %s to %s", _fmt(self.address), _fmt(address))
            self.address = address
            if self._next_heartbeat == float("inf"):
                self._next_heartbeat = now  # answer at once: the remote waits for our heartbeat
        if self._acked_address != address:
            self._acked_address = address
            actions.append(SendControl(SleeveControl.CONNECTION_ESTABLISHED))
        return actions + self.tick(now)

    def control(self, subtag: SleeveControl, body: bytes, now: float) -> list[Action]:
        """A sleeve control message arrived on the TCP connection."""
        if self.failed:
            return []
        if subtag == SleeveControl.CONNECTION_ESTABLISHED:
            if self.established:
                return []
            self.established = True
            self._next_heartbeat = now + SLOW_HEARTBEAT
            self._next_frag_test = now
            self.pmtu_state = PmtuState.VERIFYING
            self._probe_attempt = 0
            self._probe_deadline = now
            return [Established(), *self.tick(now)]
        if subtag == SleeveControl.FRAGMENTATION_RECEIVED:
            if not self.frag_ok:
                log.debug("sleeve: fragmentation test passed")
            self.frag_ok = True
            return []
        if subtag == SleeveControl.PMTU_VERIFIED:
            if len(body) < 2:  # the mesh's decoder refuses these; a sans-IO core checks anyway
                return []
            return self._verified(_U16.unpack_from(body)[0], now)
        return []

    def special_frame_ack(self, frame_len: int) -> list[Action]:
        """The remote sent a fragmentation test or a PMTU probe: acknowledge it."""
        if frame_len == FRAG_TEST_FRAME_LEN:
            return [SendControl(SleeveControl.FRAGMENTATION_RECEIVED)]
        return [SendControl(SleeveControl.PMTU_VERIFIED, _U16.pack(frame_len - ETHERNET_HEADER_SIZE))]

    def path_mtu(self, underlay_mtu: int, now: float) -> list[Action]:
        """Sending failed with EMSGSIZE: the kernel knows a smaller path MTU."""
        candidate = overlay_mtu(underlay_mtu, self.encrypted) - self.frame_overhead
        # The path changed: what was verified before no longer holds above the new limit.
        self._bad = candidate + 1
        self._good = min(self._good, candidate)
        self._candidate = candidate
        self.pmtu_state = PmtuState.VERIFYING
        self._probe_attempt = 0
        self._probe_deadline = now
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        if self.failed:
            return []
        actions: list[Action] = []
        if now - self.last_heard > HEARTBEAT_TIMEOUT:
            self.failed = True
            return [Failed("timed out waiting for UDP heartbeat")]
        if self.address is not None and now >= self._next_heartbeat:
            # From the main socket: the peer learns our UDP address from heartbeats.
            actions.append(SendFrame(heartbeat_frame(self.conn_uid), df=False))
            if self.established:
                self._next_heartbeat = now + SLOW_HEARTBEAT
            else:
                self._next_heartbeat = now + self._unconfirmed_interval
                self._unconfirmed_interval = min(2 * self._unconfirmed_interval, FAST_HEARTBEAT)
        if self.established and now >= self._next_frag_test:
            actions.append(SendFrame(fragmentation_test_frame(), df=False))
            self._next_frag_test = now + FRAG_TEST_INTERVAL
        if self.pmtu_state is PmtuState.DONE and now >= self._next_recheck:
            actions += self.reverify(now)
        elif self.pmtu_state is PmtuState.VERIFYING and now >= self._probe_deadline:
            actions += self._probe(now)
        return actions

    def reverify(self, now: float) -> list[Action]:
        """Check again that frames of the current MTU get through (the path may have
        shrunk without telling anyone); search below it if they don't."""
        if not self.established or self.failed:
            return []
        self._good = LOWEST_GOOD_MTU
        self._bad = None
        self._candidate = self.mtu
        self.pmtu_state = PmtuState.VERIFYING
        self._probe_attempt = 0
        self._probe_deadline = now
        return self._probe(now)

    def next_deadline(self) -> float:
        deadlines = [self.last_heard + HEARTBEAT_TIMEOUT, self._next_heartbeat, self._next_frag_test]
        if self.pmtu_state is PmtuState.VERIFYING:
            deadlines.append(self._probe_deadline)
        elif self.pmtu_state is PmtuState.DONE:
            deadlines.append(self._next_recheck)
        return min(deadlines)

    # -- PMTU verification

    def _probe(self, now: float) -> list[Action]:
        if self._probe_attempt >= PMTU_ATTEMPTS:
            # No ack for this size: it is too big; search below it.
            self._bad = self._candidate
            return self._next_candidate(now)
        wait = PMTU_FIRST_WAIT * (2**self._probe_attempt)
        self._probe_attempt += 1
        self._probe_deadline = now + wait
        return [SendFrame(pmtu_probe_frame(self._candidate), df=True)]

    def _verified(self, mtu: int, now: float) -> list[Action]:
        if self.pmtu_state is not PmtuState.VERIFYING or mtu != self._candidate:
            return []
        self._good = max(self._good, mtu)
        return self._next_candidate(now)

    def _next_candidate(self, now: float) -> list[Action]:
        high = (self._bad - 1) if self._bad is not None else self._good
        if high <= self._good:
            return self._settle(self._good, now)
        self._candidate = (self._good + high + 1) // 2 if self._bad is not None else high
        self._probe_attempt = 0
        self._probe_deadline = now
        return self._probe(now)

    def _settle(self, mtu: int, now: float) -> list[Action]:
        self.pmtu_state = PmtuState.DONE
        self._probe_deadline = float("inf")
        self._next_recheck = now + PMTU_RECHECK_INTERVAL
        if mtu == self.mtu:
            return []
        log.info("sleeve: overlay MTU %d (was %d)", mtu, self.mtu)
        self.mtu = mtu
        return [MtuChanged(mtu)]


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
