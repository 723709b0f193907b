"""Every overlay control message pyweave sends a Weave router, beside what Weave sends.

The mesh and sleeve tests are async only because the mesh reads the trio clock.

The golden bytes come from the real Weave 2.8 start-up captures (tests/data/captures),
read at test time. In plain-startup.pcap wv2 (02:98:00:00:00:02, 10.98.0.2) dials wv1
(02:98:00:00:00:01, 10.98.0.1); both announce ``Overlays=sleeve``. pyweave takes the
place of one of them: it is given the other's captured feature map and UDP special
frames (its heartbeat, its PMTU probe), runs its real mesh and sleeve (no sockets), and
the control messages it queues for the TCP connection must be the bytes the Weave
router it replaces sent in that situation.

Overlay combinations a handshake can produce with a Weave peer:

- both sleeve only (as captured);
- pyweave ``sleeve vxlan`` (fastdp on) against Weave ``fastdp sleeve``;
- pyweave ``sleeve vxlan`` against Weave with only the sleeve (``weave launch --no-fastdp``);
- a peer without the ``Overlays`` feature (Weave 1.x, before the overlay switch).

In the first three the sleeve is the only overlay in common (Weave knows no "vxlan",
pyweave never announces "fastdp"), so it is forwarder 0 and the bytes are the
captured ones. Weave 1.x was not captured: Weave 2.x's sleeve, as its compat overlay,
sends such a peer its control messages unwrapped (mesh tag = sleeve tag, same data),
which is what the table expects there, built from the captured messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fastdp.linkkey import MESSAGE_LEN, decode_share
from fastdp.service import FastdpService
from router import ratelog
from router.handshake import decode_features, parse_features
from router.mesh import Connection, Mesh, MeshConfig
from router.overlay_switch import OverlaySwitch
from router.peername import parse_peer_name
from router.protocol import (
    CONTROL_REASONS,
    CONTROL_TAGS,
    SLEEVE_OVERLAY,
    VXLAN_OVERLAY,
    ControlError,
    ControlFraming,
    ControlMessage,
    FrameReader,
    ProtocolError,
    SleeveControl,
    Tag,
    VxlanControl,
    encode_pmtu,
    frame,
)
from router.session_crypto import SEAL_OVERHEAD
from sleeve import service as sleeve_service
from sleeve.service import VNET_FEATURE, SleeveOverlay
from sleeve.wire import (
    FRAG_TEST_FRAME_LEN,
    MalformedPacket,
    SpecialFrame,
    classify_special,
    decode_packet,
    fragmentation_test_frame,
    heartbeat_conn_uid,
)
from tests.captures import tcp_streams, udp_packets

WV1 = parse_peer_name("02:98:00:00:00:01")
WV2 = parse_peer_name("02:98:00:00:00:02")
ADDRESS = {WV1: "10.98.0.1", WV2: "10.98.0.2"}
SUBTAGS = (SleeveControl.CONNECTION_ESTABLISHED, SleeveControl.FRAGMENTATION_RECEIVED,
           SleeveControl.PMTU_VERIFIED)


# ---------------------------------------------------------------- what the captures hold


@dataclass
class WeaveSide:
    """One Weave router's end of the wv2 -> wv1 connection, as captured."""

    name: int
    features: dict[str, str]
    control: dict[SleeveControl, bytes]  # the first of each sleeve control message it sent, framed
    heartbeat: bytes = b""  # the special frames it sent over UDP
    pmtu_probe: bytes = b""
    frag_test_header: bytes = b""  # the frame header of its fragmentation test (first IP fragment)


@dataclass
class Capture:
    sides: dict[int, WeaveSide]
    conn_uid: int
    sealed_control_sizes: list[int] = field(default_factory=list)  # enc-startup.pcap


def _messages(data: bytes) -> list[bytes]:
    assert data[:8] == b"weave\x01\x02\x00", "the plain capture: protocol 1-2, no encryption"
    reader = FrameReader()
    frames = reader.feed(data[8:])
    assert reader.buffered == 0
    return frames


@pytest.fixture(scope="module")
def capture() -> Capture:
    sides: dict[int, WeaveSide] = {}
    for stream in tcp_streams("plain-startup.pcap"):
        if {stream.src[0], stream.dst[0]} != {ADDRESS[WV1], ADDRESS[WV2]}:
            continue
        frames = _messages(stream.data)
        features = decode_features(frames[0])
        control: dict[SleeveControl, bytes] = {}
        for payload in frames[1:]:
            if payload[0] in CONTROL_TAGS:
                assert payload[0] == Tag.OVERLAY_CONTROL and payload[1] == 0, "wrapped, sleeve = forwarder 0"
                control.setdefault(SleeveControl(payload[2]), frame(payload))
        name = parse_peer_name(features["Name"])
        sides[name] = WeaveSide(name, features, control)
    assert set(sides) == {WV1, WV2}
    assert sides[WV2].features["Overlays"] == sides[WV1].features["Overlays"] == "sleeve"
    for packet in udp_packets("plain-startup.pcap"):
        sender = next((n for n, ip in ADDRESS.items() if packet.src == (ip, 6783)), None)
        if sender is None or packet.dst[0] not in ADDRESS.values():
            continue
        side = sides[sender]
        try:
            _, frames = decode_packet(packet.payload)
        except MalformedPacket:
            # The 60021-byte fragmentation test: only its first IP fragment was captured.
            side.frag_test_header = side.frag_test_header or packet.payload[6:20]
            continue
        _src, _dst, data = frames[0]
        kind = classify_special(data)
        if kind is SpecialFrame.HEARTBEAT and not side.heartbeat:
            side.heartbeat = bytes(data)
        elif kind is SpecialFrame.PMTU_PROBE and not side.pmtu_probe:
            side.pmtu_probe = bytes(data)
    conn_uid = int(sides[WV1].features["ConnID"]) ^ int(sides[WV2].features["ConnID"])
    for side in sides.values():
        assert heartbeat_conn_uid(side.heartbeat) == conn_uid
        assert len(side.pmtu_probe) == 1452
        assert int.from_bytes(side.frag_test_header[12:14], "big") == FRAG_TEST_FRAME_LEN
    sizes: list[int] = []
    for stream in tcp_streams("enc-startup.pcap"):
        reader = FrameReader()
        sealed = reader.feed(stream.data[7 + 1 + 32:])
        # Control messages are the only sealed frames this small (gossip is hundreds of bytes).
        sizes += sorted(len(f) - SEAL_OVERHEAD for f in sealed[1:] if len(f) - SEAL_OVERHEAD <= 5)
    return Capture(sides, conn_uid, sizes)


def test_capture_holds_every_sleeve_control_message(capture: Capture) -> None:
    for side in capture.sides.values():
        assert side.control == {
            SleeveControl.CONNECTION_ESTABLISHED: bytes.fromhex("00000003070001"),
            SleeveControl.FRAGMENTATION_RECEIVED: bytes.fromhex("00000003070002"),
            SleeveControl.PMTU_VERIFIED: bytes.fromhex("00000005070003059e"),
        }


# ---------------------------------------------------------------- what a Weave router does with them


class WeavePanic(Exception):
    """What overlay_switch.go:460 does with a message it cannot index: the router dies."""


def weave_receives(weave_overlays: str | None, pyweave_overlays: str, payload: bytes) -> tuple[str, int, bytes]:
    """Weave's handling of one control message from pyweave (mesh handleProtocolMsg, then the
    overlay switch's ControlMessage, then the sleeve's handleControlMessage):
    (overlay, sleeve tag, data); WeavePanic where Weave panics.

    `weave_overlays` is the Weave router's Overlays feature (None: Weave 1.x, no switch);
    pyweave always announces Overlays, so a Weave 2.x router always runs its switch with it.
    """
    tag, msg = payload[0], payload[1:]
    assert tag in CONTROL_TAGS, "not a control message"
    if weave_overlays is None:
        return SLEEVE_OVERLAY, tag, msg
    theirs = pyweave_overlays.split(" ")
    # commonOverlays: every Weave router orders by its own list (mesh passes RemoteAddr both ways).
    forwarders = [name for name in weave_overlays.split(" ") if name in theirs]
    if not msg:
        raise WeavePanic("index out of range [0] with length 0")  # msg[0]
    if msg[0] >= len(forwarders):
        raise WeavePanic(f"index out of range [{msg[0]}] with length {len(forwarders)}")  # forwarders[msg[0]]
    if len(msg) < 2:
        raise WeavePanic("index out of range [1] with length 1")  # msg[1]
    return forwarders[msg[0]], msg[1], msg[2:]


def test_the_weave_model_takes_weaves_own_messages_and_panics_like_the_issue(capture: Capture) -> None:
    for side in capture.sides.values():
        for subtag, framed in side.control.items():
            overlay, tag, data = weave_receives("sleeve", "sleeve", framed[4:])
            assert (overlay, tag) == (SLEEVE_OVERLAY, subtag)
    with pytest.raises(WeavePanic, match=r"index out of range \[0\] with length 0"):
        weave_receives("fastdp sleeve", "sleeve", b"\x01")  # what pyweave used to send


# ---------------------------------------------------------------- pyweave, in the place of a Weave router


class FakeMacs:
    def forget_peer(self, peer: int) -> None:
        pass


class FakeSwitch:
    def __init__(self) -> None:
        self.macs = FakeMacs()
        self.kernel_peers: frozenset[int] = frozenset()


class FakeDataPath:
    """What SleeveOverlay uses of the UDP data path: special frames sent are recorded."""

    def __init__(self, ourself: int) -> None:
        self.ourself = ourself
        self.vnet_hdr = False
        self.links: dict = {}
        self.switch = FakeSwitch()
        self.stats: dict[str, int] = {}
        self.on_special = None
        self.specials: list[tuple[int, bytes, bool]] = []

    def send_special(self, remote: int, frame_: bytes, df: bool) -> None:
        self.specials.append((remote, bytes(frame_), df))


@dataclass(frozen=True)
class Combo:
    """One overlay combination: what pyweave announces, what the Weave peer announces."""

    name: str
    ours: tuple[str, ...]
    theirs: str | None  # the Weave peer's Overlays feature; None: absent (Weave 1.x)
    encrypted: bool = False

    @property
    def fastdp(self) -> bool:
        return VXLAN_OVERLAY in self.ours


COMBOS = [
    Combo("both sleeve only", ("sleeve",), "sleeve"),
    Combo("pyweave sleeve+vxlan, Weave fastdp+sleeve", ("sleeve", "vxlan"), "fastdp sleeve"),
    Combo("pyweave sleeve+vxlan, Weave sleeve only", ("sleeve", "vxlan"), "sleeve"),
    Combo("Weave fastdp+sleeve, password", ("sleeve", "vxlan"), "fastdp sleeve", encrypted=True),
    Combo("Weave 1.x: no Overlays feature", ("sleeve", "vxlan"), None),
]


def weave_sends(combo: Combo, captured: bytes) -> bytes:
    """What a Weave router of `combo` sends where the captured (sleeve-only) one sent `captured`."""
    if combo.theirs is None:
        return frame(bytes((captured[6],)) + captured[7:])  # compat: the sleeve's tag, unwrapped
    return captured


@dataclass
class Router:
    mesh: Mesh
    sleeve: SleeveOverlay
    datapath: FakeDataPath
    conn: Connection
    remote: WeaveSide
    clock: list[float]

    def control_sent(self) -> list[bytes]:
        """The control messages queued for the connection since the last call, framed."""
        queue = self.conn._queue
        sent = [frame(m) for m, _channel in queue if m[0] in CONTROL_TAGS]
        kept = [(m, c) for m, c in queue if m[0] not in CONTROL_TAGS]
        queue.clear()
        queue.extend(kept)
        return sent

    def special(self, frame_: bytes) -> None:
        self.clock[0] += 0.01
        self.sleeve._special(self.remote.name, (ADDRESS[self.remote.name], 6783), frame_)

    def receive(self, payload: bytes) -> None:
        self.mesh._dispatch(self.conn, payload)


def pyweave_in_place_of(capture: Capture, combo: Combo, replaced: int, monkeypatch: pytest.MonkeyPatch) -> Router:
    """pyweave as `replaced` on the captured connection, its peer the other Weave router."""
    monkeypatch.setattr(sleeve_service, "path_mtu", lambda address: 1500)
    remote = capture.sides[WV2 if replaced == WV1 else WV1]
    outbound = replaced == WV2  # wv2 dialled
    clock = [100.0]
    mesh = Mesh(MeshConfig(name=replaced, nickname="pyweave", discovery=False, overlays=combo.ours))
    datapath = FakeDataPath(replaced)
    sleeve = SleeveOverlay(mesh, datapath, 6783, clock=lambda: clock[0])  # type: ignore[arg-type]
    fastdp = None
    if combo.fastdp:
        fastdp = FastdpService(replaced, clock=lambda: clock[0])
        fastdp.available = True
    mesh.overlay = OverlaySwitch(sleeve, fastdp)
    features = dict(remote.features)
    if combo.theirs is None:
        del features["Overlays"]
    else:
        features["Overlays"] = combo.theirs
    port = 6783 if outbound else 56475
    conn = Connection(None, outbound, f"{ADDRESS[remote.name]}:{port}", None)  # type: ignore[arg-type]
    conn.remote = parse_features(features)
    conn.conn_uid = capture.conn_uid
    conn.announced_overlays = combo.ours
    conn.state = "pending"  # what the handshake leaves
    if combo.encrypted:
        conn.encrypted = True
        conn.overlay_key = bytes(range(32))
    mesh._register(conn)
    return Router(mesh, sleeve, datapath, conn, remote, clock)


def routers(capture: Capture, combo: Combo, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Router]]:
    for replaced in (WV1, WV2):
        yield replaced, pyweave_in_place_of(capture, combo, replaced, monkeypatch)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: c.name)
async def test_pyweave_sends_what_weave_sends(capture: Capture, combo: Combo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conformance table: situation by situation, pyweave's bytes beside Weave's."""
    for replaced, router in routers(capture, combo, monkeypatch):
        expect = {t: weave_sends(combo, capture.sides[replaced].control[t]) for t in SUBTAGS}
        # Connection up: nothing for a Weave peer (no fastdp key share: vxlan is not in common).
        assert router.control_sent() == []
        # The peer's first UDP heartbeat arrives: acknowledged with ConnectionEstablished.
        router.special(router.remote.heartbeat)
        assert router.control_sent() == [expect[SleeveControl.CONNECTION_ESTABLISHED]]
        # A repeated heartbeat from the same address is not acknowledged again (nor by Weave).
        router.special(router.remote.heartbeat)
        assert router.control_sent() == []
        # Its fragmentation test arrives: FragmentationReceived.
        router.special(fragmentation_test_frame())
        assert router.control_sent() == [expect[SleeveControl.FRAGMENTATION_RECEIVED]]
        # Its PMTU probe (1452-byte frame) arrives: PMTUVerified 1438.
        router.special(router.remote.pmtu_probe)
        sent = router.control_sent()
        assert sent == [expect[SleeveControl.PMTU_VERIFIED]]
        if combo.encrypted:
            sizes = sorted(len(m) - 4 for m in expect.values())
            assert sizes == [3, 3, 5] and set(sizes) <= set(capture.sealed_control_sizes)
        # What the Weave router makes of each: the sleeve's message, never a panic.
        for subtag, framed in expect.items():
            assert weave_receives(combo.theirs, " ".join(combo.ours), framed[4:])[:2] == (SLEEVE_OVERLAY, subtag)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: c.name)
async def test_pyweave_takes_what_weave_sends(capture: Capture, combo: Combo, monkeypatch: pytest.MonkeyPatch) -> None:
    for _replaced, router in routers(capture, combo, monkeypatch):
        remote = router.remote
        before = ratelog.REJECTS.snapshot()
        router.special(remote.heartbeat)  # the peer learns our address and acks: we are established
        # Our own UDP heartbeat on this connection is byte for byte the one Weave sends.
        assert (remote.name, remote.heartbeat, False) in router.datapath.specials
        router.datapath.specials.clear()
        router.receive(weave_sends(combo, remote.control[SleeveControl.CONNECTION_ESTABLISHED])[4:])
        assert router.conn.state == "established"
        # Established: the fragmentation test and a PMTU probe follow, as Weave's do (on a
        # 1500-byte path, unencrypted, the probe is Weave's 1452-byte frame).
        frames = [(f, df) for _peer, f, df in router.datapath.specials]
        assert (fragmentation_test_frame(), False) in frames
        probes = [f for f, df in frames if df and classify_special(f) is SpecialFrame.PMTU_PROBE]
        assert probes and (combo.encrypted or probes[0] == remote.pmtu_probe)
        router.control_sent()
        router.datapath.specials.clear()
        router.receive(weave_sends(combo, remote.control[SleeveControl.FRAGMENTATION_RECEIVED])[4:])
        assert router.sleeve._conns[remote.name].ctl.frag_ok
        assert ratelog.REJECTS.snapshot() == before
        assert router.control_sent() == []


async def test_tcp_heartbeat_is_weaves(capture: Capture, autojump_clock: object,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """mesh sends ``sendSimpleProtocolMsg(ProtocolHeartbeat)`` every 30 s: tag 0, no body,
    ``00 00 00 01 00`` on the wire. The captures are shorter than 30 s and hold none, so
    this row is from mesh's source: pyweave's heartbeat task must queue exactly that, and
    it is not a control message (no overlay framing applies)."""
    router = pyweave_in_place_of(capture, COMBOS[1], WV1, monkeypatch)
    router.conn._queue.clear()
    with trio.move_on_after(router.mesh.config.heartbeat_interval + 1):
        await router.mesh._heartbeats(router.conn)
    assert [frame(m) for m, _c in router.conn._queue] == [bytes.fromhex("0000000100")]
    assert Tag.HEARTBEAT not in CONTROL_TAGS


def pyweave_pair_end(me: int, peer: int, outbound: bool, announced: tuple[str, ...]) -> tuple[Connection, FastdpService]:
    """One end of a connection between pyweave routers that both have fastdp; `announced`
    is what this end put in its handshake, the peer announced ``sleeve vxlan``."""
    mesh = Mesh(MeshConfig(name=me, nickname="py", discovery=False, overlays=("sleeve", "vxlan")))
    sleeve = SleeveOverlay(mesh, FakeDataPath(me), 6783, clock=lambda: 0.0)  # type: ignore[arg-type]
    fastdp = FastdpService(me, clock=lambda: 0.0)
    fastdp.available = True
    mesh.overlay = OverlaySwitch(sleeve, fastdp)
    conn = Connection(None, outbound, f"{ADDRESS[peer]}:6783", None)  # type: ignore[arg-type]
    conn.remote = parse_features({"PeerNameFlavour": "mac", "Name": f"02:98:00:00:00:0{peer & 0xF}",
                                  "NickName": "py", "UID": "7", "ConnID": "9", "ShortID": "3",
                                  "Overlays": "sleeve vxlan", VNET_FEATURE: "1"})
    conn.conn_uid = 99
    conn.announced_overlays = announced
    mesh._register(conn)
    return conn, fastdp


async def test_pyweave_between_pyweave_peers_wraps_the_vxlan_key_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a Weave peer: both announce ``sleeve vxlan``, so vxlan is forwarder 1 on both ends."""
    monkeypatch.setattr(sleeve_service, "path_mtu", lambda address: 1500)
    for me, peer, outbound in ((WV1, WV2, True), (WV2, WV1, False)):
        conn, fastdp = pyweave_pair_end(me, peer, outbound, ("sleeve", "vxlan"))
        (share,) = [m for m, _c in conn._queue if m[0] in CONTROL_TAGS]
        assert share[:3] == bytes((Tag.OVERLAY_CONTROL, 1, VxlanControl.KEY_SHARE))
        assert len(share) == 3 + MESSAGE_LEN
        assert decode_share(share[3:]) == fastdp._peers[peer].local_share


async def test_no_key_share_where_the_handshake_left_vxlan_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """fastdp came up after this connection's handshake, which announced only the sleeve:
    the peer has no forwarder for vxlan on it, so nothing of fastdp's may be sent."""
    monkeypatch.setattr(sleeve_service, "path_mtu", lambda address: 1500)
    conn, fastdp = pyweave_pair_end(WV1, WV2, True, ("sleeve",))
    assert [m for m, _c in conn._queue if m[0] in CONTROL_TAGS] == []
    assert WV2 not in fastdp._peers


async def test_a_peer_with_nothing_in_common_is_refused_before_anything_is_sent(
    capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weave without its sleeve (e.g. ``fastdp`` or ``awsvpc`` alone): Weave fails such a
    connection ("no overlays in common with peer"), and so does pyweave."""
    for theirs in ("fastdp", "awsvpc", ""):
        with pytest.raises(ProtocolError, match="no overlays in common"):
            pyweave_in_place_of(capture, Combo("x", ("sleeve", "vxlan"), theirs), WV1, monkeypatch)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: c.name)
async def test_malformed_control_messages_are_rejected_not_fatal(
    capture: Capture, combo: Combo, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    router = pyweave_in_place_of(capture, combo, WV1, monkeypatch)
    if combo.theirs is None:
        bad = {b"\x07\x00\x01": "control_wrapped_tag", b"\x03\x05": "control_bad_length",
               b"\x01\x00": "control_bad_length"}
    else:
        bad = {b"\x07": "control_short", b"\x07\x00": "control_short", b"\x07\x05\x01": "control_bad_forwarder",
               b"\x07\x01\x01": "control_bad_forwarder", b"\x07\x00\x09": "control_bad_subtag",
               b"\x07\x00\x03\x05": "control_bad_length", b"\x07\x00\x01\x00": "control_bad_length",
               b"\x01": "control_bare_tag", b"\x02\x00\x02": "control_bare_tag"}
    with caplog.at_level(logging.WARNING):
        for payload, reason in bad.items():
            before = ratelog.REJECTS.snapshot().get(("overlay", reason), 0)
            router.receive(payload)
            assert ratelog.REJECTS.snapshot().get(("overlay", reason), 0) == before + 1, payload.hex()
    assert router.conn.state == "pending" and not router.conn._closing.is_set()
    assert router.control_sent() == []


# ---------------------------------------------------------------- the encoder and decoder alone

OVERLAY_NAMES = st.sampled_from(["sleeve", "vxlan", "fastdp", "awsvpc", ""])
OVERLAY_LISTS = st.lists(OVERLAY_NAMES, max_size=4)


def _messages_for(overlay: str) -> st.SearchStrategy[ControlMessage]:
    if overlay == SLEEVE_OVERLAY:
        return st.one_of(
            st.sampled_from([ControlMessage(overlay, SleeveControl.CONNECTION_ESTABLISHED),
                             ControlMessage(overlay, SleeveControl.FRAGMENTATION_RECEIVED)]),
            st.integers(0, 0xFFFF).map(lambda mtu: ControlMessage(overlay, SleeveControl.PMTU_VERIFIED,
                                                                   encode_pmtu(mtu))),
        )
    return st.binary(max_size=50).map(lambda data: ControlMessage(overlay, VxlanControl.KEY_SHARE, data))


@given(OVERLAY_LISTS, st.none() | OVERLAY_LISTS, st.booleans(), st.data())
def test_round_trip_for_every_negotiated_framing(ours: list[str], theirs: list[str] | None, outbound: bool,
                                                  data: st.DataObject) -> None:
    ours = list(dict.fromkeys(ours))  # our own list never repeats a name
    try:
        framing = ControlFraming.negotiate(ours, theirs, outbound)
    except ProtocolError:
        assert SLEEVE_OVERLAY not in ours or (theirs is not None and not set(ours) & set(theirs))
        return
    # The peer's framing, computed from its side of the same handshake, agrees on every index.
    if theirs is not None:
        assert ControlFraming.negotiate(list(dict.fromkeys(theirs)), ours, not outbound) == framing
    for overlay in framing.common:
        if overlay not in (SLEEVE_OVERLAY, VXLAN_OVERLAY):
            continue
        msg = data.draw(_messages_for(overlay))
        tag, body = framing.encode(msg)
        assert framing.decode(tag, body) == msg
        if framing.forwarders is None:
            assert (tag, body) == (msg.subtag, msg.data)
        else:
            assert tag == Tag.OVERLAY_CONTROL and body[0] < len(framing.forwarders)


# Mostly near-misses of real messages: small forwarder indices and sub-tags, short data.
CONTROL_BODIES = st.binary(max_size=8) | st.builds(
    lambda index, subtag, data: bytes((index, subtag)) + data, st.integers(0, 3), st.integers(0, 4),
    st.binary(max_size=3))


@given(OVERLAY_LISTS, st.none() | OVERLAY_LISTS, st.booleans(),
       st.sampled_from(sorted(CONTROL_TAGS)) | st.integers(0, 255), CONTROL_BODIES)
def test_decoder_is_strict(ours: list[str], theirs: list[str] | None, outbound: bool, tag: int, body: bytes) -> None:
    try:
        framing = ControlFraming.negotiate(list(dict.fromkeys(ours)), theirs, outbound)
    except ProtocolError:
        return
    try:
        msg = framing.decode(tag, body)
    except ControlError as exc:
        assert exc.reason in CONTROL_REASONS
        return
    # Whatever it accepts is a message it would send itself, byte for byte.
    assert framing.encode(msg) == (tag, body)


def test_decoder_accepts_exactly_the_encoders_messages_on_a_grid() -> None:
    """Exhaustively, for the framings real handshakes produce: bodies of up to four bytes
    drawn from values near the real ones, under every tag (the longer ones under the
    control tags and a few others). What is accepted is exactly the set of messages the
    encoder makes; everything else is a ControlError with a known reason."""
    import itertools

    values = (0, 1, 2, 3, 5, 0x9E, 0xFF)
    bodies = [bytes(b) for n in range(5) for b in itertools.product(values, repeat=n)]
    some_tags = sorted({*CONTROL_TAGS, 0, 4, 6, 8, 255})
    framings = {
        "weave sleeve": ControlFraming.negotiate(["sleeve", "vxlan"], ["fastdp", "sleeve"], True),
        "pyweave pair": ControlFraming.negotiate(["sleeve", "vxlan"], ["sleeve", "vxlan"], False),
        "weave 1.x": ControlFraming.negotiate(["sleeve", "vxlan"], None, False),
    }
    for name, framing in framings.items():
        accepted = set()
        for body in bodies:
            for tag in range(256) if len(body) <= 2 else some_tags:
                try:
                    msg = framing.decode(tag, body)
                except ControlError as exc:
                    assert exc.reason in CONTROL_REASONS
                    continue
                assert framing.encode(msg) == (tag, body)
                accepted.add((tag, body))
        pmtu = {b"\x00\x03" + bytes(p) for p in itertools.product(values, repeat=2)}
        if framing.forwarders is None:
            expected = {(1, b""), (2, b"")} | {(3, p[2:]) for p in pmtu}
        else:
            expected = {(7, b"\x00\x01"), (7, b"\x00\x02")} | {(7, p) for p in pmtu}
            if VXLAN_OVERLAY in framing.forwarders:
                expected |= {(7, b) for b in bodies if b[:2] == b"\x01\x01"}
        assert accepted == expected, name


@given(st.sampled_from(["sleeve", "fastdp sleeve"]), st.booleans(),
       st.sampled_from([("sleeve",), ("sleeve", "vxlan")]), st.data())
def test_weave_takes_everything_the_encoder_makes(weave: str, outbound: bool, ours: tuple[str, ...],
                                                  data: st.DataObject) -> None:
    framing = ControlFraming.negotiate(ours, weave.split(" "), outbound)
    assert framing.common == (SLEEVE_OVERLAY,)
    msg = data.draw(_messages_for(SLEEVE_OVERLAY))
    tag, body = framing.encode(msg)
    assert weave_receives(weave, " ".join(ours), bytes((tag,)) + body) == (SLEEVE_OVERLAY, msg.subtag, msg.data)
    with pytest.raises(ValueError):
        framing.encode(ControlMessage(VXLAN_OVERLAY, VxlanControl.KEY_SHARE, bytes(MESSAGE_LEN)))


def test_encoder_refuses_what_the_connection_cannot_carry() -> None:
    legacy = ControlFraming.negotiate(["sleeve", "vxlan"], None, True)
    assert legacy.forwarders is None and legacy.common == (SLEEVE_OVERLAY,)
    switch = ControlFraming.negotiate(["sleeve"], ["fastdp", "sleeve"], False)
    for framing in (legacy, switch):
        for msg in (ControlMessage(VXLAN_OVERLAY, VxlanControl.KEY_SHARE, b"x"),
                    ControlMessage(SLEEVE_OVERLAY, 9),
                    ControlMessage(SLEEVE_OVERLAY, SleeveControl.PMTU_VERIFIED, b"\x05"),
                    ControlMessage(SLEEVE_OVERLAY, SleeveControl.CONNECTION_ESTABLISHED, b"\x00"),
                    ControlMessage("fastdp", 0)):
            with pytest.raises(ValueError):
                framing.encode(msg)


# ---------------------------------------------------------------- a real router and a Weave-like peer

FAKE_WEAVE_SECONDS = 8.0
# Sent once the link is up; each is refused (and counted) by the router, which stays up.
MALFORMED = (b"\x07", b"\x07\x00", b"\x01", b"\x07\x05\x01", b"\x07\x00\x03\x05")


def fake_weave_main() -> None:
    """A peer that speaks to a router as Weave 2.8 with fastdp does (run in a test host:
    ``python -c 'from tests.test_weave_conformance import fake_weave_main; fake_weave_main()'
    ROUTER_IP``). It dials, announces ``Overlays=fastdp sleeve``, runs the sleeve's side of
    the link faithfully (UDP heartbeats, ConnectionEstablished on the router's first
    heartbeat, acks of its fragmentation test and PMTU probes, all framed as Weave frames
    them), prints every control message the router sends (``ctl HEX``), sends MALFORMED
    once it is acked, and prints ``done``."""
    import select
    import socket
    import struct
    import sys
    import time

    from router.protocol import encode_message
    from sleeve.wire import FRAG_TEST_FRAME_LEN, encode_packet, heartbeat_frame
    from tests.attacks.evil_peer import connect

    router_ip = sys.argv[1]
    session = connect(router_ip, 6783, "fake-weave", overlays=("fastdp", "sleeve"), short_id=77)
    tcp, hs, name = session.sock, session.hs, session.name
    assert hs.remote is not None and hs.codec is not None
    router = hs.remote.name
    print("connected", flush=True)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 6783))

    def send_tcp(payload: bytes) -> None:
        tcp.sendall(hs.codec.encode_frame(payload))  # type: ignore[union-attr]

    def send_udp(frame_: bytes) -> None:
        udp.sendto(encode_packet(name, [(name, router, frame_)]), (router_ip, 6783))

    acked = malformed_sent = False
    next_heartbeat = 0.0
    end = time.monotonic() + FAKE_WEAVE_SECONDS
    tcp.setblocking(False)
    while (now := time.monotonic()) < end:
        if now >= next_heartbeat:
            send_udp(heartbeat_frame(hs.conn_uid))
            send_tcp(encode_message(0))
            next_heartbeat = now + 0.5
        if acked and not malformed_sent:
            # As Weave once established: its fragmentation test, a PMTU probe (MTU 1438).
            send_udp(bytes(FRAG_TEST_FRAME_LEN))
            send_udp(bytes(1438 + 14))
            for payload in MALFORMED:
                send_tcp(payload)
            malformed_sent = True
            print("malformed sent", flush=True)
        ready, _, _ = select.select([tcp, udp], [], [], 0.1)
        if tcp in ready:
            data = tcp.recv(65536)
            if not data:
                print("closed by router", flush=True)
                return
            for payload in hs.codec.feed(data):
                if payload and payload[0] in CONTROL_TAGS:
                    print("ctl", payload.hex(), flush=True)
        if udp in ready:
            packet, _addr = udp.recvfrom(65536)
            _sender, frames = decode_packet(packet)
            for _src, _dst, frame_ in frames:
                kind = classify_special(frame_)
                if kind is SpecialFrame.HEARTBEAT and not acked:
                    send_tcp(b"\x07\x00\x01")  # Weave acks the first heartbeat it gets
                    acked = True
                elif kind is SpecialFrame.FRAGMENTATION_TEST and len(frame_) == FRAG_TEST_FRAME_LEN:
                    send_tcp(b"\x07\x00\x02")
                elif kind is SpecialFrame.PMTU_PROBE:
                    send_tcp(b"\x07\x00\x03" + struct.pack(">H", len(frame_) - 14))
    print("done", flush=True)


def _router_marks(fn):  # type: ignore[no-untyped-def]
    from tests.routers import router_test_marks

    for mark in router_test_marks():
        fn = mark(fn)
    return fn


@_router_marks
def test_a_real_router_and_a_weave_peer(make_testbed, show_logs) -> None:  # type: ignore[no-untyped-def]
    """The issue's set-up, with a scripted Weave 2.8 peer in place of Weave's routers: the
    router's control messages are the ones Weave takes, the link gets established, and
    malformed control messages are refused and counted, not fatal."""
    import sys
    import time

    from tests.routers import launch, log_text, wait_for, weave
    from tests.test_mesh_integration import report, weave_metrics

    tb = make_testbed(2)
    show_logs(tb)
    router_host, weave_host = tb.hosts
    launch(router_host)
    argv = [sys.executable, "-c", "from tests.test_weave_conformance import fake_weave_main; fake_weave_main()",
            router_host.address]
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    weave_host.spawn(argv, "fake-weave", env={"PYTHONPATH": repo})
    out = weave_host.log_path("fake-weave")

    def lines() -> list[str]:
        return out.read_text().splitlines() if out.exists() else []

    wait_for(lambda: "malformed sent" in lines(), "the fake Weave peer's link to be acked", timeout=20,
             hosts=[router_host], describe=lambda: "\n".join(lines()))
    time.sleep(0.5)

    def established() -> bool:
        conns = report(router_host)["Connections"]
        return any(c["Address"].startswith(weave_host.address) and c["State"] == "established" for c in conns)

    wait_for(established, "the router's connection to the Weave peer to be established", timeout=10,
             hosts=[router_host])
    metrics = weave_metrics(router_host)
    refused = sum(v for k, v in metrics.items()
                  if k.startswith("pyweave_inputs_rejected") and 'component="overlay"' in k)
    assert refused >= len(MALFORMED), metrics
    wait_for(lambda: "done" in lines() or "closed by router" in lines(), "the fake Weave peer to finish",
             timeout=20, hosts=[router_host])
    text = lines()
    print("fake Weave peer:", *text, sep="\n    ")
    assert "closed by router" not in text, text
    sent = [bytes.fromhex(line.split()[1]) for line in text if line.startswith("ctl ")]
    assert sent and sent[0] == b"\x07\x00\x01", text
    assert {b"\x07\x00\x02", b"\x07\x00\x03\x05\x9e"} <= set(sent), text
    for payload in sent:
        # Weave's switch and sleeve take each one (no panic), as a sleeve message.
        overlay, tag, data = weave_receives("fastdp sleeve", "sleeve vxlan", payload)
        assert overlay == SLEEVE_OVERLAY and tag in SUBTAGS, payload.hex()
        assert len(data) == (2 if tag == SleeveControl.PMTU_VERIFIED else 0), payload.hex()
    log = log_text(router_host)
    assert "Traceback" not in log and "overlay control message from" in log
    assert weave(router_host, "status", check=False).strip()
