"""Every decoder that takes bytes from outside, as one registry of fuzz targets.

A target is the function the daemon calls with a peer's bytes, in the state it is in
when they arrive (a listening handshake, a codec with a real session key, a sleeve data
path with a known peer), plus the errors that count as a clean refusal: the module's
error root, which is what the caller catches (the mesh catches ``WireError`` and drops
the connection; the sleeve and DNS loops must see no exception at all). Anything else,
including an ``AssertionError`` from a target's own invariant, is a finding.

The hypothesis tests (tests/fuzz/test_fuzz.py) and bench/fuzz.py both iterate over
``TARGETS``: a new decoder is one ``@target`` function here.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import os
import random
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from router.errors import GobError, WireError
from router.gob import BYTES as BYTES_T
from router.gob import Decoder
from router.protocol import (
    CONTROL_TAGS,
    GOSSIP_TAGS,
    ControlError,
    ControlFraming,
    FrameReader,
    decode_gossip,
    split_message,
)
from tests.fuzz import seeds as S

Runner = Callable[[bytes], object]


@dataclass(frozen=True)
class Target:
    name: str
    run: Runner
    errors: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    module: str  # where a finding has to be fixed
    examples: int = 300  # hypothesis examples in the CI pass
    # Minimal inputs of past findings: the CI pass runs them every time.
    reproducers: Callable[[], list[bytes]] = lambda: []


TARGETS: dict[str, Target] = {}


def target(
    name: str,
    errors: tuple[type[BaseException], ...],
    seeds: Callable[[], list[bytes]],
    module: str,
    *,
    examples: int = 300,
    reproducers: Callable[[], list[bytes]] = lambda: [],
) -> Callable[[Runner], Runner]:
    def register(fn: Runner) -> Runner:
        if name in TARGETS:
            raise ValueError(f"fuzz target {name} registered twice")
        TARGETS[name] = Target(name, fn, errors, functools.cache(seeds), module, examples, reproducers)
        return fn

    return register


# ---------------------------------------------------------------- shared helpers

KEY = bytes(range(100, 132))
_MAX_FRAMES = 64  # per input, so a target's time stays bounded by the input size


# The control framings a connection can have: with a Weave 2.x peer (the sleeve alone in
# common), between pyweave peers (both overlays), and with a Weave 1.x peer (no switch).
_FRAMINGS = (
    ControlFraming.negotiate(("sleeve", "vxlan"), ("fastdp", "sleeve"), True),
    ControlFraming.negotiate(("sleeve", "vxlan"), ("sleeve", "vxlan"), False),
    ControlFraming.negotiate(("sleeve", "vxlan"), None, True),
)


def dispatch(payload: bytes) -> None:
    """What Mesh._dispatch decodes of one frame before a channel or overlay sees it."""
    split = split_message(payload)
    if split is None:
        return
    tag, body = split
    if tag in CONTROL_TAGS:
        for framing in _FRAMINGS:
            try:
                framing.decode(tag, body)
            except ControlError:
                pass
    elif tag in GOSSIP_TAGS:
        decode_gossip(tag, body)


def dispatch_all(frames: list[bytes]) -> None:
    for payload in frames[:_MAX_FRAMES]:
        dispatch(payload)


# ---------------------------------------------------------------- gob


@target("gob_v2_values", (GobError,), S.gob_values, "router/gob.py")
def _gob_values(data: bytes) -> object:
    """A fresh gob stream (v2 features, gossip payloads): every value in it, untyped."""
    dec = Decoder(data)
    out = []
    for _ in range(16):
        if dec.at_end:
            break
        out.append(dec.decode())
    return out


def _v1_streams() -> list[bytes]:
    out = []
    for stream in S.dialler_streams(None):
        if stream[5:7] == b"\x01\x01":  # the v1 ones: header, then the gob stream
            out.append(stream[7:])
    return out


@target("gob_v1_stream", (WireError,), _v1_streams, "router/session_crypto.py")
def _gob_v1(data: bytes) -> object:
    """A v1 connection's gob stream after the handshake (type definitions, then []byte values)."""
    from router.session_crypto import GobFrameCodec

    codec = GobFrameCodec()
    frames = []
    # Two feeds: a definition split across reads must work like one read.
    half = len(data) // 2
    frames += codec.feed(data[:half])
    frames += codec.feed(data[half:])
    dispatch_all(frames)
    return frames


# ---------------------------------------------------------------- per-connection state bounds

FLOOD_REPEATS = 2000
# What a connection may keep after any run of whole messages (a real v1 stream defines a
# handful of types, well under 4 KiB).
FLOOD_RETAINED = 64 * 1024


def whole_gob_messages(data: bytes) -> bytes:
    """The complete gob messages at the start of ``data`` (an incomplete tail is dropped, so
    that what a flood leaves behind is state, never a legitimately buffered message)."""
    from router.session_crypto import GobMessageSplitter

    try:
        return b"".join(GobMessageSplitter(max_size=4096).feed(data[:512]))
    except WireError:
        return b""


def flood(state: object, feed: Callable[[bytes], object], chunk: bytes) -> None:
    """Feed the same whole messages again and again: the connection must refuse them (a
    clean error) or keep bounded state, however long the peer goes on."""
    import tracemalloc

    if not chunk:
        return
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(FLOOD_REPEATS):
            feed(chunk)
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        if started:
            tracemalloc.stop()
    assert state is not None
    assert retained <= FLOOD_RETAINED, (
        f"{FLOOD_REPEATS} x {len(chunk)} B of whole messages left {retained} B of connection state"
    )




def _definition_seeds() -> list[bytes]:
    from router.gob import Encoder, Field, SliceType, StructType

    t = StructType("T", (Field("A", SliceType(StructType("U", (Field("B", BYTES_T),)))),))
    return [Encoder().definitions(t)] + _v1_streams()


@target("gob_v1_definition_flood", (WireError,), lambda: _definition_seeds(), "router/session_crypto.py",
        examples=20, reproducers=lambda: _definition_seeds()[:1])
def _gob_v1_flood(data: bytes) -> object:
    """After a v1 handshake: the same whole messages (type definitions, say) in a loop."""
    from router.session_crypto import GobFrameCodec

    codec = GobFrameCodec()
    flood(codec, codec.feed, whole_gob_messages(data))
    return codec


@target("handshake_v1_definition_flood", (WireError,), lambda: _definition_seeds(), "router/handshake.py",
        reproducers=lambda: _definition_seeds()[:1])
def _handshake_v1_flood(data: bytes) -> object:
    """A v1 dialler that sends definitions instead of its features, to a router with a password."""
    hs, _header = S.listener_handshake(S.PASSWORD)
    hs.receive_data(b"weave\x01\x01")
    flood(hs, hs.receive_data, whole_gob_messages(data))
    return hs.state


# ---------------------------------------------------------------- handshake and session crypto


def _handshake(password: bytes | None, data: bytes) -> object:
    hs, _header = S.listener_handshake(password)
    hs.receive_data(data)
    if hs.complete:
        dispatch_all(hs.codec.feed(b""))
    return hs.state


def _handshake_seeds(password: bytes | None) -> Callable[[], list[bytes]]:
    def seeds() -> list[bytes]:
        out = S.dialler_streams(password)
        return out + (S.capture_tcp() if password is None else S.capture_enc_tcp())

    return seeds


@target("handshake_plain", (WireError,), _handshake_seeds(None), "router/handshake.py")
def _handshake_plain(data: bytes) -> object:
    return _handshake(None, data)


@target("handshake_password", (WireError,), _handshake_seeds(S.PASSWORD), "router/handshake.py")
def _handshake_password(data: bytes) -> object:
    return _handshake(S.PASSWORD, data)


PRE_HANDSHAKE_FEED = 4 * 1024 * 1024
PRE_HANDSHAKE_RETAINED = 2 * 1024 * 1024  # features are ~200 bytes; 10 MB is the post-handshake limit


def _partial_handshakes() -> list[bytes]:
    """Handshakes cut short where a peer could go on sending: inside the features."""
    out = []
    for stream in S.dialler_streams(None) + S.dialler_streams(S.PASSWORD):
        out.append(stream[:9] if stream[6] == 2 else stream[:8])
    out.append(b"weave\x01\x02\x00" + (10 * 1024 * 1024).to_bytes(4, "big"))
    return out


@target("handshake_buffering", (WireError,), _partial_handshakes, "router/handshake.py", examples=20,
        reproducers=lambda: _partial_handshakes()[-1:])
def _handshake_buffering(data: bytes) -> object:
    """A peer that starts a handshake and then streams bytes: what the listener holds before
    the handshake completes is bounded well below the post-handshake frame limit."""
    import tracemalloc

    hs, _header = S.listener_handshake(None)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        hs.receive_data(data[:64])
        chunk = bytes(65536)
        for _ in range(PRE_HANDSHAKE_FEED // len(chunk)):
            if hs.complete:
                break
            hs.receive_data(chunk)
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        if started:
            tracemalloc.stop()
    assert hs.complete or retained <= PRE_HANDSHAKE_RETAINED, f"{retained} B held before the handshake completed"
    return hs.state


def _sealed_v2_seeds() -> list[bytes]:
    from router.session_crypto import FrameCodec

    out = []
    payloads = S.mesh_payloads()
    for start in range(0, len(payloads), 3):
        sender = FrameCodec(KEY, outbound=True)
        out.append(b"".join(sender.encode_frame(p) for p in payloads[start : start + 3]))
    return out


@target("session_v2_sealed", (WireError,), _sealed_v2_seeds, "router/session_crypto.py")
def _session_v2(data: bytes) -> object:
    """An encrypted v2 connection's stream, at the listener (real key, counters at 0)."""
    from router.session_crypto import FrameCodec

    frames = FrameCodec(KEY, outbound=False).feed(data)
    dispatch_all(frames)
    return frames


def _sealed_v1_seeds() -> list[bytes]:
    from router.session_crypto import GobFrameCodec

    sender = GobFrameCodec(KEY, outbound=True)
    return [b"".join(sender.encode_frame(p) for p in S.mesh_payloads()[:4])]


@target("session_v1_sealed", (WireError,), _sealed_v1_seeds, "router/session_crypto.py")
def _session_v1(data: bytes) -> object:
    from router.session_crypto import GobFrameCodec

    frames = GobFrameCodec(KEY, outbound=False).feed(data)
    dispatch_all(frames)
    return frames


# ---------------------------------------------------------------- mesh frames and envelopes


@target("mesh_frames", (WireError,), S.plain_streams, "router/protocol.py")
def _mesh_frames(data: bytes) -> object:
    """A plain v2 connection's stream: the frame reader, then what the dispatcher decodes."""
    reader = FrameReader()
    frames = reader.feed(data)
    dispatch_all(frames)
    return frames


@target("gossip_envelope", (WireError,), S.mesh_payloads, "router/protocol.py", examples=400)
def _gossip_envelope(data: bytes) -> object:
    if not data:
        return None
    tag = 4 + data[0] % 3
    return decode_gossip(tag, data[1:])


# ---------------------------------------------------------------- topology

OURSELF = 0x0A00_0000_0001
NEIGHBOUR = 0x0A00_0000_0002


def _peers():  # type: ignore[no-untyped-def]
    """A router with one connection, as it is when its neighbour's first update arrives."""
    from router.topology import Peers

    peers = Peers(OURSELF, "fuzz", 0x1111, 1, rng=random.Random(1))
    peers.register_remote(NEIGHBOUR, "neighbour", 0x2222, 2)
    peers.add_connection(NEIGHBOUR, "10.0.0.2:6783", outbound=True, established=True)
    return peers


def _topology_seeds() -> list[bytes]:
    from router.topology import ConnectionSummary, PeerSummary, encode_topology

    me = PeerSummary(OURSELF, "fuzz", 0x1111, 3, 1, True)
    them = PeerSummary(NEIGHBOUR, "neighbour", 0x2222, 5, 2, True)
    third = PeerSummary(0x0A00_0000_0003, "third", 0x3333, 1, 0, False)
    out = [
        encode_topology(
            [
                (them, [ConnectionSummary(OURSELF, "10.0.0.1:6783", False, True),
                        ConnectionSummary(third.name, "10.0.0.3:6783", True, True)]),
                (third, [ConnectionSummary(NEIGHBOUR, "10.0.0.2:41000", False, False)]),
            ]
        ),
        encode_topology([(me, [])]),
        encode_topology([(them, [ConnectionSummary(OURSELF, "", False, True)])]),
    ]
    # Near the IDNA limits: one edit makes a 64-byte label, or an empty one.
    out += [_topology_with_address("b" * 63 + ".example:6783"), _topology_with_address("host.x:6783")]
    return out + S.capture_gossip().get("topology", [])


@target("topology_update", (WireError,), _topology_seeds, "router/topology.py")
def _topology_update(data: bytes) -> object:
    """Peers.apply_update with a gossiped payload; what we hold afterwards must encode and
    decode again (we gossip it on)."""
    from router.routes import Routes
    from router.topology import decode_topology

    peers = _peers()
    result = peers.apply_update(data)
    decoded = decode_topology(peers.encode_full())
    assert {s.name for s, _ in decoded} == set(peers.by_name), "re-encoded topology lost peers"
    # What the mesh computes from it next: routes, and where gossip and broadcasts go.
    routes = Routes.compute(peers)
    for name in list(peers.by_name)[:16]:
        routes.next_hop_all(name)
        routes.broadcast_all(name)
    routes.random_neighbours(None, random.Random(0))
    return result


def _topology_with_address(address: str) -> bytes:
    from router.topology import ConnectionSummary, PeerSummary, encode_topology

    them = PeerSummary(NEIGHBOUR, "neighbour", 0x2222, 5, 2, True)
    third = PeerSummary(THIRD, "third", 0x3333, 1, 0, False)
    conns = [ConnectionSummary(OURSELF, "10.0.0.1:6783", False, True), ConnectionSummary(THIRD, address, True, True)]
    return encode_topology([(them, conns), (third, [ConnectionSummary(NEIGHBOUR, "", False, True)])])


def dialable(address: str) -> None:
    """What trio.open_tcp_stream needs of an address we dial: host must survive IDNA
    encoding and contain no NUL (getaddrinfo raises UnicodeError / ValueError, which no
    dial loop expects), and the port must be a real port."""
    host, sep, port = address.rpartition(":")
    assert sep and port.isdigit() and 0 < int(port) < 65536, f"bad port in {address!r}"
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return
    except ValueError:
        pass
    assert "\x00" not in bare, f"NUL in dial address {address!r}"
    try:
        bare.encode("idna")
    except UnicodeError as exc:
        raise AssertionError(f"dial address {address!r} crashes getaddrinfo: {exc}") from None


@target(
    "topology_dial_addresses",
    (WireError,),
    _topology_seeds,
    "router/mesh.py, router/targets.py",
    reproducers=lambda: [_topology_with_address("a" * 64 + ":6783")],
)
def _topology_dial(data: bytes) -> object:
    """The addresses discovery would dial after an update (Mesh._discovered)."""
    from router.mesh import _dial_address

    peers = _peers()
    peers.apply_update(data)
    out = []
    for peer in peers.by_name.values():
        for other, conn in peer.connections.items():
            if other == OURSELF or not conn.remote_tcp_addr:
                continue
            addr = _dial_address(conn.remote_tcp_addr, conn.outbound, 6783)
            if addr is not None:
                dialable(addr)
                out.append(addr)
    return out


# ---------------------------------------------------------------- IPAM


@functools.cache
def _ipam_pristine():  # type: ignore[no-untyped-def]
    """Two peers that agreed on a ring and allocated: (their network, the fuzzed peer, the other)."""
    from ipam_crdt.address import CIDR
    from ipam_crdt.testing import SimNetwork

    net = SimNetwork(CIDR.parse("10.32.0.0/12"), random.Random(7))
    a, b = 0x0A00_0000_0001, 0x0A00_0000_0002
    net.add_peer(a)
    net.add_peer(b)
    net.allocate(a, "c1")
    net.settle()
    net.allocate(b, "c2")
    net.settle()
    return net, a, b


def _ipam_seeds() -> list[bytes]:
    from ipam_crdt import wire
    from ipam_crdt.address import Range

    net, a, b = _ipam_pristine()
    other = net.alloc(b)
    out = [other.encode(), S.golden.IPAM_PAYLOAD_WV2]
    out += [bytes((wire.MSG_SPACE_REQUEST,)) + wire.encode_range(Range(0x0A20_0000, 0x0A20_1000))]
    out += [bytes((wire.MSG_SPACE_REQUEST_DENIED,)) + wire.encode_range(Range(0x0A20_0000, 0x0A20_0100))]
    out += [bytes((wire.MSG_RING_UPDATE,)) + other.encode()]
    return out + S.capture_gossip().get("IPallocation", [])


def _ipam_alloc():  # type: ignore[no-untyped-def]
    net, a, b = _ipam_pristine()
    return copy.deepcopy(net.alloc(a)), b


@target("ipam_gossip", (WireError,), _ipam_seeds, "ipam_crdt/wire.py, ipam_crdt/allocator.py", examples=150)
def _ipam_gossip(data: bytes) -> object:
    """An IPAM broadcast from a known peer, at a peer with a ring and allocations; what it
    accepted must leave a working allocator (allocation, timers, status, report)."""
    alloc, src = _ipam_alloc()
    result = alloc.on_gossip_broadcast(src, data)
    _ipam_still_works(alloc)
    return result


def _ipam_still_works(alloc) -> None:  # type: ignore[no-untyped-def]
    from ipam_crdt.address import CIDR

    net, _, _ = _ipam_pristine()
    now = net.now + 10
    alloc.allocate("fuzz-after", CIDR.parse("10.32.0.0/12"), now)
    alloc.tick(now + 30)
    alloc.status_lines()
    alloc.report()


@target("ipam_unicast", (WireError,), _ipam_seeds, "ipam_crdt/wire.py, ipam_crdt/allocator.py", examples=150)
def _ipam_unicast(data: bytes) -> object:
    alloc, src = _ipam_alloc()
    actions = alloc.on_gossip_unicast(src, data)
    _ipam_still_works(alloc)
    return actions


# ---------------------------------------------------------------- DNS gossip

_DNS_NOW = 1_700_000_000


def _nameserver():  # type: ignore[no-untyped-def]
    from weavedns.records import Nameserver

    ns = Nameserver(OURSELF, is_known_peer=lambda name: True, clock=lambda: float(_DNS_NOW))
    ns.add_entry("web.weave.local.", "c1", 0x0A20_0001)
    ns.add_entry("db.weave.local.", "c2", 0x0A20_0002)
    ns.add_entry("web.weave.local.", "c3", 0x0A20_0003, origin=NEIGHBOUR)
    return ns


def _dns_gossip_seeds() -> list[bytes]:
    from weavedns.wire import Entry, encode_gossip

    entries = [
        Entry("web.weave.local.", NEIGHBOUR, "c3", 0x0A20_0003, 2, 0),
        Entry("new.weave.local.", NEIGHBOUR, "c9", 0x0A20_0009, 0, 0),
        Entry("web.weave.local.", OURSELF, "c1", 0x0A20_0001, 1, _DNS_NOW),
    ]
    out = [encode_gossip((_DNS_NOW, entries)), encode_gossip((_DNS_NOW, []))]
    return out + S.capture_gossip().get("nameserver", [])


@target("dns_gossip", (WireError,), _dns_gossip_seeds, "weavedns/wire.py, weavedns/records.py")
def _dns_gossip(data: bytes) -> object:
    ns = _nameserver()
    ns.on_gossip_broadcast(NEIGHBOUR, data)
    return ns.entries()


# ---------------------------------------------------------------- sleeve


class _Routes:
    """OURSELF - NEIGHBOUR - THIRD in a line."""

    def next_hop(self, dest: int) -> int | None:
        return NEIGHBOUR if dest in (NEIGHBOUR, THIRD) else None

    def broadcast(self, origin: int) -> list[int]:
        return [NEIGHBOUR] if origin == OURSELF else []

    def broadcast_via(self, hop: int, origin: int) -> list[int]:
        return []


THIRD = 0x0A00_0000_0003
_ROUTES = _Routes()


@functools.cache
def _sleeve_fds() -> tuple[int, socket.socket]:
    # Injected frames go nowhere; nothing is ever sent (no link is established).
    return os.open(os.devnull, os.O_WRONLY), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _datapath(encrypted: bool, vnet: bool):  # type: ignore[no-untyped-def]
    from sleeve.crypto import SleeveCipher
    from sleeve.datapath import DataPath, Link
    from sleeve.switch import Switch

    tap, sock = _sleeve_fds()
    specials: list[bytes] = []

    def on_special(sender: int, address: tuple[str, int], frame: bytes) -> None:
        # What SleeveOverlay._special decodes (on the trio side).
        from sleeve.wire import SpecialFrame, classify_special, heartbeat_conn_uid

        if classify_special(frame) is SpecialFrame.HEARTBEAT:
            heartbeat_conn_uid(frame)
        specials.append(frame)

    switch = Switch(OURSELF, lambda: _ROUTES, lambda: 1000.0)
    dp = DataPath(OURSELF, tap, vnet, sock, switch, on_special=on_special)
    cipher = SleeveCipher(KEY, OURSELF, outbound=False) if encrypted else None
    dp.links = {NEIGHBOUR: Link(NEIGHBOUR, ("10.0.0.2", 6783), cipher, 1376, vnet=vnet)}
    return dp


def _sleeve(encrypted: bool, vnet: bool, data: bytes) -> object:
    dp = _datapath(encrypted, vnet)
    out: dict[int, list[object]] = {}
    dp._datagram(data, ("10.0.0.2", 6783), out)  # type: ignore[arg-type]
    return dp.stats


def _frames_seeds() -> list[tuple[int, int, bytes]]:
    from sleeve.wire import heartbeat_frame, pmtu_probe_frame

    arp = bytes.fromhex("ffffffffffff02000000000208060001080006040001") + bytes(28)
    unicast = bytes.fromhex("020000000001020000000002") + b"\x08\x00" + bytes(60)
    return [
        (NEIGHBOUR, OURSELF, heartbeat_frame(0x9999)),
        (NEIGHBOUR, OURSELF, pmtu_probe_frame(1376)),
        (NEIGHBOUR, 0, arp),
        (THIRD, OURSELF, unicast),
        (NEIGHBOUR, THIRD, unicast),
    ]


def _plain_sleeve_seeds() -> list[bytes]:
    from sleeve.wire import encode_packet

    frames = _frames_seeds()
    out = [encode_packet(NEIGHBOUR, [f]) for f in frames] + [encode_packet(NEIGHBOUR, frames)]
    for name in ("plain-startup.pcap", "plain-ping.pcap"):
        out += S.capture_udp(name)
    return out


def _vnet_sleeve_seeds() -> list[bytes]:
    from router.bridge import NO_OFFLOAD_HEADER
    from sleeve import chunks
    from sleeve.wire import encode_packet, peer_name_bytes

    frames = [(s, d, NO_OFFLOAD_HEADER + f) for s, d, f in _frames_seeds()]
    whole = encode_packet(NEIGHBOUR, frames)
    out = [encode_packet(NEIGHBOUR, [f]) for f in frames] + [whole]
    out += chunks.split(whole, peer_name_bytes(NEIGHBOUR), 7, 600)
    return out


@target("sleeve_plain", (), _plain_sleeve_seeds, "sleeve/datapath.py, sleeve/wire.py", examples=400)
def _sleeve_plain(data: bytes) -> object:
    """A UDP datagram on 6783 at the sleeve's receiving thread (no exception may escape it)."""
    return _sleeve(False, False, data)


@target("sleeve_plain_vnet", (), _vnet_sleeve_seeds, "sleeve/datapath.py, sleeve/chunks.py", examples=400)
def _sleeve_vnet(data: bytes) -> object:
    """The same from a pyweave peer that negotiated virtio headers (and chunked datagrams)."""
    return _sleeve(False, True, data)


def _remote_cipher():  # type: ignore[no-untyped-def]
    from sleeve.crypto import SleeveCipher

    return SleeveCipher(KEY, NEIGHBOUR, outbound=True)


def _sealed_sleeve_seeds() -> list[bytes]:
    from sleeve.wire import encode_frames

    remote = _remote_cipher()
    frames = _frames_seeds()
    out = [remote.seal(encode_frames([f])) for f in frames] + [remote.seal(encode_frames(frames), df=True)]
    return out + S.capture_udp("enc-startup.pcap")


@target("sleeve_encrypted", (), _sealed_sleeve_seeds, "sleeve/crypto.py", examples=400)
def _sleeve_encrypted(data: bytes) -> object:
    """A datagram claiming to come from a peer whose link is encrypted."""
    return _sleeve(True, False, data)


def _frame_section_seeds() -> list[bytes]:
    from sleeve.wire import encode_frames

    frames = _frames_seeds()
    return [encode_frames([f]) for f in frames] + [encode_frames(frames)]


@target("sleeve_encrypted_inner", (), _frame_section_seeds, "sleeve/wire.py, sleeve/datapath.py")
def _sleeve_inner(data: bytes) -> object:
    """What an authenticated peer can send: any frame section, sealed with the real key."""
    dp = _datapath(True, False)
    sealed = _remote_cipher().seal(data, df=bool(len(data) & 1))
    dp._datagram(sealed, ("10.0.0.2", 6783), {})
    return dp.stats


def _sleeve_control_seeds() -> list[bytes]:
    from router.protocol import encode_pmtu

    return [b"\x01", b"\x02", b"\x03" + encode_pmtu(1376), b"\x03" + encode_pmtu(8000), b"\x03\x00"]


@target("sleeve_control", (WireError,), _sleeve_control_seeds, "sleeve/link.py")
def _sleeve_control(data: bytes) -> object:
    """Sleeve control messages on the TCP connection (tag 1-3 and its body), then the timers."""
    from router.protocol import SleeveControl
    from sleeve.link import SleeveLink

    if not data:
        return None
    link = SleeveLink(0x9999, True, ("10.0.0.2", 6783), False, 100.0)
    actions = link.control(SleeveControl(1 + data[0] % 3), data[1:], 100.0)
    actions += link.heartbeat(0x9999, ("10.0.0.2", 6783), 100.5)
    for now in (101.0, 110.0, 200.0):
        actions += link.tick(now)
    assert 0 < link.mtu <= 65535, f"sleeve MTU {link.mtu}"
    return actions


# ---------------------------------------------------------------- fastdp probes


# The link key a neighbour's frames to us are checked with; the seeds are authentic, so
# mutations start from frames that pass the MAC and hit the field checks behind it.
_PROBE_KEY = bytes(range(32))


def _probe_seeds() -> list[bytes]:
    from fastdp import probe

    out = []
    for kind in probe.ProbeKind:
        msg = probe.ProbeMessage(kind, NEIGHBOUR, 0x9999, 7, 123456789, 6, 12345, 100)
        size = probe.heartbeat_frame_size() if kind == probe.ProbeKind.HEARTBEAT else probe.MIN_FRAME
        out.append(probe.encode_datagram(0x123456, probe.probe_mac(OURSELF), probe.probe_mac(NEIGHBOUR), msg,
                                         _PROBE_KEY, size))
    return out


@target("fastdp_probe_frame", (WireError,), lambda: [d[8:] for d in _probe_seeds()], "fastdp/probe.py")
def _probe_frame(data: bytes) -> object:
    """An inner frame read from the probe port (ProbeEndpoint.receive): the sender is read
    first (to find the link's key), then the frame is checked under that key."""
    from fastdp.probe import decode_frame, frame_sender

    frame_sender(data)
    return decode_frame(data, _PROBE_KEY)


@target("fastdp_vxlan_datagram", (WireError,), _probe_seeds, "fastdp/probe.py")
def _probe_datagram(data: bytes) -> object:
    from fastdp.probe import decode_datagram

    return decode_datagram(data, _PROBE_KEY)


def _share_seeds() -> list[bytes]:
    from fastdp.linkkey import encode_share

    return [encode_share(bytes(32)), encode_share(bytes(range(32)))]


@target("fastdp_key_share", (WireError,), _share_seeds, "fastdp/linkkey.py")
def _key_share(data: bytes) -> object:
    """A peer's key share, an overlay control message over the mesh connection."""
    from fastdp.linkkey import decode_share, is_share_message

    is_share_message(data)
    return decode_share(data)


# ---------------------------------------------------------------- DNS queries


@functools.cache
def _engine():  # type: ignore[no-untyped-def]
    from weavedns.answer import AnswerEngine

    return AnswerEngine(_nameserver(), rng=random.Random(3))


def _dns_query_seeds() -> list[bytes]:
    import dnslib

    out = []
    for name, qtype in (("web.weave.local", "A"), ("db.weave.local", "AAAA"), ("1.0.32.10.in-addr.arpa", "PTR"),
                        ("example.com", "A"), ("weave.local", "SOA"), ("WEB.weave.local", "ANY")):
        q = dnslib.DNSRecord.question(name, qtype)
        out.append(q.pack())
        q.add_ar(dnslib.EDNS0(udp_len=4096))
        out.append(q.pack())
    return out


def _check_reply(query: bytes, reply: object, tcp: bool) -> None:
    from weavedns.answer import Forward

    if reply is None or isinstance(reply, Forward):
        return
    assert isinstance(reply, bytes), f"answer returned {type(reply).__name__}"
    assert len(reply) >= 12 and reply[:2] == query[:2], "reply does not echo the query ID"
    assert len(reply) <= (65535 if tcp else 4096), f"reply of {len(reply)} bytes"


_LABEL_0X40 = bytes.fromhex("123401000001000000000000") + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"


@target("dns_udp_query", (), _dns_query_seeds, "weavedns/answer.py", examples=400,
        reproducers=lambda: [_LABEL_0X40])
def _dns_udp(data: bytes) -> object:
    """AnswerEngine.answer as the UDP thread calls it (an exception there is a logged traceback)."""
    reply = _engine().answer(data)
    _check_reply(data, reply, tcp=False)
    return reply


def _dns_tcp_seeds() -> list[bytes]:
    qs = _dns_query_seeds()
    return [b"".join(len(q).to_bytes(2, "big") + q for q in qs[i : i + 3]) for i in range(0, len(qs), 3)]


@target("dns_tcp_stream", (), _dns_tcp_seeds, "weavedns/server.py, weavedns/answer.py",
        reproducers=lambda: [len(_LABEL_0X40).to_bytes(2, "big") + _LABEL_0X40])
def _dns_tcp(data: bytes) -> object:
    """A TCP connection's bytes, split as DNSServer._read_message does, each message answered."""
    engine = _engine()
    buf, replies = bytearray(data), []
    while len(buf) >= 2 and len(replies) < _MAX_FRAMES:
        size = (buf[0] << 8) | buf[1]
        if len(buf) < 2 + size:
            break
        msg = bytes(buf[2 : 2 + size])
        del buf[: 2 + size]
        reply = engine.answer(msg, tcp=True)
        _check_reply(msg, reply, tcp=True)
        replies.append(reply)
    return replies


# ---------------------------------------------------------------- HTTP API parameters


def form_value(data: bytes) -> str:
    """A urlencoded form value as Starlette's form parser hands it to a handler."""
    return urllib.parse.unquote_plus(data.decode("latin-1"))


def path_param(data: bytes) -> str:
    """A percent-encoded path segment as Starlette's router decodes it."""
    return urllib.parse.unquote(data.decode("latin-1"))


def _peer_seeds() -> list[bytes]:
    return [b"10.0.0.2", b"10.0.0.2:6783", b"weave-host-1", b"[fd00::1]:6783", b"%ff", b"a" * 64 + b":6783",
            b"%e2%98%83", b"host.example.com:1", b""]


@target(
    "api_connect_peer",
    (ValueError,),
    _peer_seeds,
    "router/targets.py",
    examples=400,
    reproducers=lambda: [b"%ff", b"a" * 64, b"%e2%98%83", b"%00"],
)
def _api_connect(data: bytes) -> object:
    """POST /connect peer=...: Mesh.connect keeps what normalise_address accepts, and dials it."""
    from router.targets import normalise_address

    addr = normalise_address(form_value(data), 6783)
    dialable(addr)
    return addr


def _ipam_param_seeds() -> list[bytes]:
    return [b"10.32.0.1/12", b"10.40.0.0/24", b"0.0.0.0/0", b"10.32.0.1", b" 10.32.0.5 ", b"10.32.0.1/33",
            b"%31%30.32.0.1/8", b"1.2.3.4/-1"]


@target("api_ipam_params", (), _ipam_param_seeds, "ipam_crdt/service.py, ipam_crdt/address.py", examples=400)
def _api_ipam(data: bytes) -> object:
    """/ip/{id}/{ip}/{prefixlen} and friends: the service's parsers, as the handlers call them."""
    from ipam_crdt.address import CIDR
    from ipam_crdt.service import BadRequest, IpamService

    text = path_param(data)
    svc = SimpleNamespace(universe=CIDR.parse("10.32.0.0/12"), default_subnet=CIDR.parse("10.32.0.0/12"))
    results: list[object] = []
    for parse in (IpamService.parse_cidr, IpamService.parse_addr, lambda t: IpamService.parse_subnet(svc, t)):
        try:
            results.append(parse(text))
        except BadRequest:
            results.append(None)
    return results


def _dns_param_seeds() -> list[bytes]:
    return [b"web.weave.local.", b"web", b"10.32.0.1", b"c1", b"*", b"a" * 70 + b".weave.local", b"%00", b"..",
            b"\xe2\x98\x83.weave.local"]


@target("api_dns_params", (), _dns_param_seeds, "weavedns/service.py", examples=400)
def _api_dns(data: bytes) -> object:
    """PUT/DELETE /name/{container}/{ip}?fqdn=: the DNS service's validators."""
    from weavedns.service import DnsInputError, _check_container, _parse_ip, normalise_hostname

    text = path_param(data)
    results: list[object] = []
    for check in (_check_container, _parse_ip, lambda t: normalise_hostname(t, "weave.local.")):
        try:
            results.append(check(text))
        except DnsInputError:
            results.append(None)
    return results


_REPORT = {"Router": {"Name": "02:00:00:00:00:01", "Peers": [{"Name": "a"}], "Version": "2.8.1"},
           "IPAM": {"Range": "10.32.0.0/12", "Entries": None}, "DNS": {"Domain": "weave.local.", "Entries": []}}


@target("api_report_format", (KeyError,), lambda: [b"{{.Router.Name}}", b"{{json .IPAM}}", b"{{.}} x {{.DNS}}"],
        "router/api.py", examples=400)
def _api_report(data: bytes) -> object:
    """GET /report?format=: the template renderer (a KeyError is the handler's 400)."""
    from router.api import _template

    return _template(form_value(data), _REPORT)


# ---------------------------------------------------------------- the HTTP API as a whole


class _Api:
    """The router's Starlette app with its DNS and IPAM services, built as weaver builds it
    (not running: requests are answered, nothing is dialled or gossiped)."""

    def __init__(self) -> None:
        import tempfile

        from ipam_crdt.service import IpamService, IpamSettings
        from router.api import build_app
        from router.mesh import Mesh, MeshConfig
        from router.peername import format_peer_name
        from weavedns.service import DnsService

        self.tmp = tempfile.TemporaryDirectory(prefix="pyweave-fuzz-api-")
        self.mesh = Mesh(MeshConfig(OURSELF, "fuzz", discovery=False))
        dns = DnsService(self.mesh, "127.0.0.9:0", state_dir=self.tmp.name, resolv_conf=None, manage_host=False)
        settings = IpamSettings(ipalloc_range="10.32.0.0/12", ipalloc_init="seed=" + format_peer_name(OURSELF))
        ipam = IpamService(self.mesh, settings, self.tmp.name, allocate_timeout=0.02)
        self.app = build_app(self.mesh, dns=dns, ipam=ipam)
        self.requests = 0


_api: _Api | None = None


def _http_seeds() -> list[bytes]:
    return [
        b"POST /connect\npeer=10.0.0.2&peer=weave-2:6783&replace=true",
        b"POST /forget\npeer=10.0.0.2",
        b"GET /report?format=%7B%7B.Router.Name%7D%7D %7B%7Bjson .DNS%7D%7D",
        b"GET /report\n",
        b"GET /status\n",
        b"GET /status/peers\n",
        b"GET /status/ipam\n",
        b"GET /metrics\n",
        b"POST /ip/c1\n",
        b"POST /ip/c2?check-alive=false\n",
        b"POST /ip/c1/10.32.0.0/24\n",
        b"PUT /ip/c3/10.32.0.9\n",
        b"PUT /ip/c3/10.32.0.9/12?noErrorOnUnknown=true\n",
        b"GET /ip/c1\n",
        b"GET /ip/c1/10.32.0.0/12\n",
        b"DELETE /ip/c1/10.32.0.1\n",
        b"DELETE /ip/c2\n",
        b"GET /ip\n",
        b"GET /ring\n",
        b"GET /ipinfo/defaultsubnet\n",
        b"GET /ipinfo/tracker\n",
        b"DELETE /peer/0a:00:00:00:00:09\n",
        b"PUT /name/c1/10.32.0.5?fqdn=web.weave.local\n",
        b"PUT /name/c1/10.32.0.6\nfqdn=db.weave.local.",
        b"DELETE /name/c1/10.32.0.5?fqdn=web.weave.local\n",
        b"DELETE /name/c1\n",
        b"GET /name\n",
        b"GET /domain\n",
        b"GET /dns-address\n",
    ]


_METHODS = ("GET", "POST", "PUT", "DELETE")


def parse_request(data: bytes) -> tuple[str, bytes, bytes, bytes]:
    """``METHOD /path?query\nbody`` -> (method, raw path, query string, body)."""
    head, _, body = data.partition(b"\n")
    method_text, _, target_text = head.partition(b" ")
    method = method_text.decode("latin-1").upper()
    if method not in _METHODS:
        method = _METHODS[len(method_text) % len(_METHODS)]
    # Hypercorn (h11) refuses a request target with bytes outside VCHAR; a client escapes them.
    target_text = b"".join(_VCHAR_ESCAPE[b] for b in target_text)
    raw_path, _, query = target_text.partition(b"?")
    if not raw_path.startswith(b"/"):
        raw_path = b"/" + raw_path
    return method, raw_path, query, body


_VCHAR_ESCAPE = [bytes((b,)) if 0x21 <= b <= 0x7E else b"%%%02X" % b for b in range(256)]


@target("api_http", (), _http_seeds, "router/api.py, ipam_crdt/http.py, weavedns/http.py", examples=200)
def _api_http(data: bytes) -> object:
    """One request to the whole API on 6784: no exception may escape a handler (a 500 with a
    traceback in the log)."""
    import trio

    global _api
    method, raw_path, query, body = parse_request(data)
    path = urllib.parse.unquote(raw_path.decode("latin-1"))
    if _api is None or _api.requests >= 500:
        _api = _Api()  # bounded state: allocations and names pile up otherwise
    api = _api
    api.requests += 1
    if method == "DELETE" and path.rstrip("/") == "/peer":
        _api = None  # hands our space away (issue 12 defect 7): the next input gets a fresh router
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": raw_path, "query_string": query, "root_path": "",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 6784),
    }
    response: dict[str, object] = {}

    async def receive() -> dict[str, object]:
        if "sent" not in response:
            response["sent"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            response["status"] = message["status"]

    async def call() -> None:
        with trio.fail_after(5):
            await api.app(scope, receive, send)

    trio.run(call)
    assert response.get("status") != 500, f"{method} {path}: 500"
    return response.get("status")
