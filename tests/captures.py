"""Read the real Weave Net 2.8 captures in tests/data/captures.

TCP streams are reassembled by sequence number (the captures are loss-free but
segments can repeat); UDP payloads are returned in capture order.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import dpkt

# Copies of ../shared/reference/captures (tests/data/captures/README.md says where they
# came from); PYWEAVE_CAPTURES points elsewhere, e.g. at newer captures.
CAPTURE_DIR = Path(os.environ.get("PYWEAVE_CAPTURES", Path(__file__).resolve().parent / "data" / "captures"))


def capture_path(name: str) -> Path:
    """A golden file: it ships with the tests, so a missing one is a failure, never a skip."""
    path = CAPTURE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"golden capture {path} is missing (it belongs in tests/data/captures)")
    return path


@dataclass
class TcpStream:
    src: tuple[str, int]
    dst: tuple[str, int]
    data: bytes = b""
    # Offsets into `data` where each captured segment started, for tests that care.
    segments: list[int] = field(default_factory=list)


@dataclass
class UdpPacket:
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes
    dont_fragment: bool


def _ip_packets(name: str):
    with open(capture_path(name), "rb") as fh:
        for _ts, raw in dpkt.pcap.Reader(fh):
            eth = dpkt.ethernet.Ethernet(raw)
            if isinstance(eth.data, dpkt.ip.IP):
                yield eth.data


def tcp_streams(name: str) -> list[TcpStream]:
    """Every TCP direction in the capture with payload, in order of first data."""
    pieces: dict[tuple, dict[int, bytes]] = {}
    isn: dict[tuple, int] = {}
    order: list[tuple] = []
    for ip in _ip_packets(name):
        tcp = ip.data
        if not isinstance(tcp, dpkt.tcp.TCP):
            continue
        key = (socket.inet_ntoa(ip.src), tcp.sport, socket.inet_ntoa(ip.dst), tcp.dport)
        if tcp.flags & dpkt.tcp.TH_SYN:
            isn[key] = tcp.seq + 1
            continue
        if not tcp.data:
            continue
        if key not in pieces:
            pieces[key] = {}
            order.append(key)
        pieces[key].setdefault(tcp.seq, bytes(tcp.data))
    streams = []
    for key in order:
        segs = pieces[key]
        start = isn.get(key, min(segs))
        data = bytearray()
        offsets = []
        for seq in sorted(segs):
            rel = (seq - start) % (1 << 32)
            chunk = segs[seq]
            if rel > len(data):
                raise AssertionError(f"gap in TCP stream {key} at offset {len(data)}")
            offsets.append(rel)
            data[rel : rel + len(chunk)] = chunk
        streams.append(TcpStream((key[0], key[1]), (key[2], key[3]), bytes(data), offsets))
    return streams


def udp_packets(name: str) -> list[UdpPacket]:
    out = []
    for ip in _ip_packets(name):
        udp = ip.data
        if isinstance(udp, dpkt.udp.UDP):
            out.append(
                UdpPacket(
                    (socket.inet_ntoa(ip.src), udp.sport),
                    (socket.inet_ntoa(ip.dst), udp.dport),
                    bytes(udp.data),
                    bool(ip.df),
                )
            )
    return out
