"""Seed corpora: real bytes from the golden captures, and our encoders' own output.

Captures are optional here (a fuzz pass must run without ../shared): each loader returns
what it can find, and the encoders' output alone reaches every decoder's valid path.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from router.gob import BYTES, INT, STRING, STRING_MAP, UINT, encode, encode_stream
from router.handshake import Handshake, PeerIdentity
from router.protocol import (
    FrameReader,
    GossipMessage,
    OverlayControl,
    Tag,
    encode_gossip,
    encode_message,
    encode_pmtu,
    frame,
    split_message,
)
from tests import golden


def _capture_dir() -> Path | None:
    env = os.environ.get("PYWEAVE_CAPTURES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / "data" / "captures")
    for path in candidates:
        if (path / "plain-startup.pcap").exists():
            return path
    return None


@functools.cache
def capture_tcp() -> list[bytes]:
    """Every TCP direction of the plain captures (header, flag, features, frames)."""
    directory = _capture_dir()
    if directory is None:
        return []
    os.environ.setdefault("PYWEAVE_CAPTURES", str(directory))
    from tests.captures import tcp_streams

    out = []
    for name in ("plain-startup.pcap", "ipam-dns.pcap"):
        out += [s.data for s in tcp_streams(name) if s.data.startswith(b"weave")]
    return out


@functools.cache
def capture_enc_tcp() -> list[bytes]:
    directory = _capture_dir()
    if directory is None:
        return []
    from tests.captures import tcp_streams

    return [s.data[:4096] for s in tcp_streams("enc-startup.pcap") if s.data.startswith(b"weave")]


@functools.cache
def capture_udp(name: str) -> list[bytes]:
    if _capture_dir() is None:
        return []
    from tests.captures import udp_packets

    seen, out = set(), []
    for p in udp_packets(name):
        if p.payload not in seen:
            seen.add(p.payload)
            out.append(p.payload)
    return out


@functools.cache
def capture_frames() -> list[bytes]:
    """The plaintext v2 frame payloads of the plain captures (tag byte + body)."""
    out = []
    for data in capture_tcp():
        if data[5:7] != b"\x01\x02" and data[5:7] != b"\x02\x02":
            continue
        reader = FrameReader()
        try:
            out += reader.feed(data[8:])[1:]
        except ValueError:
            continue
    return out


@functools.cache
def capture_gossip() -> dict[str, list[bytes]]:
    """Gossip payloads of the captures by channel."""
    from router.protocol import GOSSIP_TAGS, decode_gossip

    out: dict[str, list[bytes]] = {}
    for payload in capture_frames():
        split = split_message(payload)
        if split is None or split[0] not in GOSSIP_TAGS:
            continue
        msg = decode_gossip(*split)
        bucket = out.setdefault(msg.channel, [])
        if msg.payload not in bucket and len(bucket) < 40:
            bucket.append(msg.payload)
    return out


def gossip_envelopes() -> list[bytes]:
    """Tag byte + envelope body."""
    msgs = [
        GossipMessage(Tag.GOSSIP, "topology", 0x0298_0000_0002, b"\x01\x02"),
        GossipMessage(Tag.GOSSIP_BROADCAST, "nameserver", 1, golden.IPAM_PAYLOAD_WV2[:40]),
        GossipMessage(Tag.GOSSIP_UNICAST, "IPallocation", 2, b"\x00" * 8, dst=3),
    ]
    out = [encode_message(m.tag, encode_gossip(m)) for m in msgs]
    out += [p for p in capture_frames() if p and p[0] in (4, 5, 6)][:30]
    return out


def mesh_payloads() -> list[bytes]:
    """Frame payloads as the dispatcher sees them (tag + body)."""
    return gossip_envelopes() + [
        encode_message(Tag.HEARTBEAT),
        encode_message(Tag.OVERLAY_CONTROL, OverlayControl(0, 3, encode_pmtu(1410)).encode()),
        encode_message(Tag.OVERLAY_CONTROL, OverlayControl(1, 1, bytes(40)).encode()),
        encode_message(Tag.PMTU_VERIFIED, encode_pmtu(8910)),
        encode_message(Tag.CONNECTION_ESTABLISHED),
    ]


def plain_streams() -> list[bytes]:
    """Streams of length-prefixed frames (v2, after the handshake)."""
    payloads = mesh_payloads()
    out = [b"".join(frame(p) for p in payloads[i : i + 4]) for i in range(0, len(payloads), 4)]
    for data in capture_tcp():
        if data[5:7] in (b"\x01\x02", b"\x02\x02"):
            out.append(data[8:4096])
    return out


def gob_values() -> list[bytes]:
    out = [
        golden.FEATURES_WV2,
        golden.IPAM_PAYLOAD_WV2,
        golden.NAMESERVER_FRAME[4 + 1 + 14 :],
        encode({"a": "b", "Name": "02:00:00:00:00:01"}, STRING_MAP),
        encode(b"\x00" * 20, BYTES),
        encode_stream([("topology", STRING), (12345, UINT), (-7, INT), (b"xyz", BYTES)]),
    ]
    for payloads in capture_gossip().values():
        out += payloads[:5]
    return out


# ---------------------------------------------------------------- handshakes

LISTENER = PeerIdentity(0x0A00_0000_0001, "fuzz-listener", 0x1111, 1)
DIALLER = PeerIdentity(0x0A00_0000_0002, "fuzz-dialler", 0x2222, 2)
LISTENER_KEY = bytes(range(1, 33))
DIALLER_KEY = bytes(range(33, 65))
PASSWORD = b"fuzz-password"


def listener_handshake(password: bytes | None) -> tuple[Handshake, bytes]:
    """The state a listening router is in when a peer's first bytes arrive, and its header."""
    hs = Handshake(
        outbound=False,
        local=LISTENER,
        conn_id=0x1234,
        password=password,
        overlays=["fastdp", "sleeve"],
        private_key=LISTENER_KEY if password else None,
    )
    return hs, hs.initiate()


@functools.cache
def dialler_streams(password: bytes | None) -> list[bytes]:
    """What a dialler sends a listener: the handshake (v1 and v2), then a few frames."""
    out = []
    for max_version in (1, 2):
        dialler = Handshake(
            outbound=True,
            local=DIALLER,
            conn_id=0x5678,
            password=password,
            overlays=["sleeve"],
            max_version=max_version,
            private_key=DIALLER_KEY if password else None,
        )
        listener, to_dialler = listener_handshake(password)
        sent = bytearray(dialler.initiate())
        to_listener = bytes(sent)
        for _ in range(8):
            if dialler.complete and listener.complete:
                break
            if to_dialler and not dialler.complete:
                more = dialler.receive_data(to_dialler)
                sent += more
                to_listener += more
            to_dialler = b""
            if to_listener and not listener.complete:
                to_dialler = listener.receive_data(to_listener)
            to_listener = b""
        assert dialler.complete and listener.complete, "seed handshake did not complete"
        handshake_only = bytes(sent)
        for payload in mesh_payloads()[:6]:
            sent += dialler.codec.encode_frame(payload)
        out += [handshake_only, bytes(sent)]
    return out
