"""fastdp link keys: the key-share message, the KDF, and how the switch and the service use them.

No kernel here: the service is never run, the probe endpoint reads from a fake socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastdp import linkkey
from fastdp.health import LinkState
from fastdp.linkkey import KeyShareError, decode_share, derive_key, encode_share, new_share
from fastdp.probe import ProbeEndpoint, ProbeKind, ProbeMessage, encode_frame, probe_mac
from fastdp.service import FastdpService
from router import ratelog
from router.errors import WireError
from router.overlay import OverlayConn
from router.overlay_switch import OverlaySwitch
from router.protocol import ControlMessage, SleeveControl, VxlanControl

A = 0x02_00_00_00_0A_01
B = 0x02_00_00_00_0B_02
UID = 0xC0FF_EE00_0000_0001


# --- the message and the KDF --------------------------------------------------------------------


def test_share_message_round_trip() -> None:
    share = new_share()
    body = encode_share(share)
    assert len(body) == linkkey.MESSAGE_LEN == 37 and body[:4] == b"PWfk"
    assert decode_share(body) == share
    assert new_share() != share


@pytest.mark.parametrize("body,match", [
    (b"", "bytes"),
    (encode_share(bytes(32))[:-1], "bytes"),
    (encode_share(bytes(32)) + b"\0", "bytes"),
    (b"XXXX" + encode_share(bytes(32))[4:], "not a fastdp key share"),
    (b"PWfk\x02" + bytes(32), "version"),
])
def test_bad_share_messages(body: bytes, match: str) -> None:
    with pytest.raises(KeyShareError, match=match):
        decode_share(body)


@given(st.binary(max_size=80))
def test_random_share_messages_raise_only_the_module_error(body: bytes) -> None:
    try:
        share = decode_share(body)
    except KeyShareError:
        return
    assert len(share) == 32 and body[:5] == b"PWfk\x01"


def test_keys_differ_by_direction_and_connection_and_both_ends_agree() -> None:
    sa, sb = new_share(), new_share()
    a_tx = derive_key(sa, sb, A, B, UID)
    assert a_tx == derive_key(sa, sb, A, B, UID) and len(a_tx) == 32  # what B uses to check A's frames
    others = {derive_key(sb, sa, B, A, UID), derive_key(sa, sb, A, B, UID + 1),
              derive_key(sa, new_share(), A, B, UID), derive_key(sa, sb, B, A, UID)}
    assert a_tx not in others and len(others) == 4
    with pytest.raises(ValueError):
        derive_key(sa[:31], sb, A, B, UID)
    with pytest.raises(ValueError):
        derive_key(sa, sb, 0, B, UID)


# --- the probe endpoint hands the health machine only authentic frames --------------------------


class FakePacketSocket:
    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)

    def recv_into(self, buf: bytearray) -> int:
        if not self.frames:
            raise BlockingIOError
        frame = self.frames.pop(0)
        buf[:len(frame)] = frame
        return len(frame)


def heartbeat(key: bytes, sender: int = A, conn_uid: int = UID, seq: int = 1) -> bytes:
    msg = ProbeMessage(ProbeKind.HEARTBEAT, sender, conn_uid, seq, 5)
    return encode_frame(probe_mac(B), probe_mac(sender), msg, key, 200)


def test_only_authentic_frames_reach_the_health_machine() -> None:
    svc = FastdpService(B, clock=lambda: 0.0)
    share_b = svc.add_peer(A, UID, "10.98.0.1")
    assert share_b is not None
    share_a = new_share()
    a_key = derive_key(share_a, share_b, A, B, UID)
    endpoint = ProbeEndpoint(B)
    rejected = dict(ratelog.REJECTS.counts)

    def receive(frames: list[bytes]) -> list[ProbeMessage]:
        endpoint.packet_sock = FakePacketSocket(frames)  # type: ignore[assignment]
        return [f.message for f in endpoint.receive(svc._key_for)]

    # Before A's share arrived there is no key: even the genuine frame is refused.
    assert receive([heartbeat(a_key)]) == []
    assert svc.set_peer_share(A, UID, share_a)
    assert not svc.set_peer_share(A, UID, new_share())  # the first share counts
    assert not svc.set_peer_share(A, UID + 1, new_share())  # not its connection
    forged = [
        heartbeat(derive_key(new_share(), share_b, A, B, UID), seq=1 << 63),  # a made-up share
        heartbeat(derive_key(share_b, share_a, B, A, UID), seq=1 << 63),  # our own direction's key
        heartbeat(a_key, conn_uid=UID + 1),  # an old connection
        heartbeat(a_key, sender=0x02_00_00_00_0C_03),  # a stranger
        heartbeat(a_key)[:-1],  # cut
        bytes(200),
    ]
    assert receive(forged) == []
    assert (endpoint.forged, endpoint.unknown, endpoint.malformed) == (2, 3, 1)
    counts = ratelog.REJECTS.counts
    for reason, n in (("bad_mac", 2), ("unknown_sender", 3), ("malformed", 0)):
        assert counts[("fastdp", reason)] - rejected.get(("fastdp", reason), 0) >= n
    link = svc.monitor.links[A]
    assert link.received == 0 and link.last_hb_seq is None and link.state is LinkState.PENDING
    # The genuine one does.
    (msg,) = receive([heartbeat(a_key, seq=3)])
    assert msg.sender == A and msg.seq == 3


# --- the switch sends our share and hands fastdp the peer's -------------------------------------


@dataclass
class FakeHost:
    sent: list[tuple[int, int, ControlMessage]] = field(default_factory=list)

    def overlay_send(self, remote: int, conn_uid: int, msg: ControlMessage) -> None:
        self.sent.append((remote, conn_uid, msg))


@dataclass
class FakeSleeve:
    host: FakeHost = field(default_factory=FakeHost)
    controls: list[ControlMessage] = field(default_factory=list)

    def connection_up(self, conn: OverlayConn) -> None:
        pass

    def control(self, remote: int, conn_uid: int, msg: ControlMessage) -> None:
        self.controls.append(msg)


def test_switch_exchanges_key_shares_over_the_mesh_connection() -> None:
    svc = FastdpService(B, clock=lambda: 0.0)
    svc.available = True
    sleeve = FakeSleeve()
    switch = OverlaySwitch(sleeve, svc)  # type: ignore[arg-type]
    conn = OverlayConn(A, "a", UID, False, ("10.98.0.1", 6783), None, {"Overlays": "sleeve vxlan"},
                       common_overlays=("sleeve", "vxlan"))
    switch.connection_up(conn)
    ((remote, conn_uid, sent),) = sleeve.host.sent
    assert (remote, conn_uid, sent.overlay, sent.subtag) == (A, UID, "vxlan", VxlanControl.KEY_SHARE)
    body = sent.data
    assert decode_share(body) == svc._peers[A].local_share
    assert svc._key_for(A, UID) is None

    before = dict(ratelog.REJECTS.counts)
    def share_msg(data: bytes) -> ControlMessage:
        return ControlMessage("vxlan", VxlanControl.KEY_SHARE, data)

    switch.control(A, UID, share_msg(b"PWfk\x01short"))  # ours, but broken
    switch.control(A, UID + 1, share_msg(encode_share(new_share())))  # another connection
    assert svc._key_for(A, UID) is None
    assert ratelog.REJECTS.counts[("fastdp", "bad_key_share")] > before.get(("fastdp", "bad_key_share"), 0)
    share_a = new_share()
    switch.control(A, UID, share_msg(encode_share(share_a)))
    assert svc._key_for(A, UID) == derive_key(share_a, decode_share(body), A, B, UID)
    # The sleeve's own messages go to the sleeve.
    established = ControlMessage("sleeve", SleeveControl.CONNECTION_ESTABLISHED)
    switch.control(A, UID, established)
    assert sleeve.controls == [established]


def test_key_share_error_is_a_wire_error() -> None:
    assert issubclass(KeyShareError, WireError)
