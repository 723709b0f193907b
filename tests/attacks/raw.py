"""Attacks that need no handshake: junk on a router's ports from a host on the underlay
or from a container. Run inside a test namespace:

    python -m tests.attacks.raw ATTACK ADDRESS [options]

Every attack is bounded in count and time and prints one line, ``done`` plus what it
sent, so a test can check it ran. It sends only to the address it is given (a test
host's or the DNS address on a test bridge).

Attacks:
    tcp-garbage ADDR     --connections N --bytes B   random bytes on TCP 6783, N at once
    huge-prefix ADDR     a protocol header, then a 1 GiB length prefix, then silence
    udp-junk ADDR        --port P --count N          random datagrams (sleeve 6783, VXLAN 6784)
    vxlan-junk ADDR      --count N   VXLAN frames (VNI of fastdp) with made-up inner MACs
    fastdp-forge ADDR    --source IP --sender NAME --receiver NAME --count N
                         heartbeats claiming seq 2^63, unauthenticated (the first probe
                         format) and under a made-up key, from IP forged (raw socket)
    dns-bad ADDR         --count N   queries with a reserved (0x40) label type, on UDP 53
    dns-idle ADDR        --connections N --hold S    TCP connections to 53 that send nothing
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable

Attack = Callable[[argparse.Namespace], str]
ATTACKS: dict[str, tuple[Attack, Callable[[argparse.ArgumentParser], None]]] = {}
# fastdp's VXLAN device (fastdp/vxlan.py): VNI and port.
VXLAN_PORT = 6784
VXLAN_VNI = 0x707766


def attack(name: str, options: Callable[[argparse.ArgumentParser], None] = lambda p: None):  # type: ignore[no-untyped-def]
    def register(fn: Attack) -> Attack:
        ATTACKS[name] = (fn, options)
        return fn

    return register


def _garbage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--bytes", type=int, default=4096)


@attack("tcp-garbage", _garbage_options)
def tcp_garbage(opts: argparse.Namespace) -> str:
    socks, sent = [], 0
    for _ in range(opts.connections):
        try:
            s = socket.create_connection((opts.address, 6783), timeout=3)
            s.sendall(os.urandom(opts.bytes))
            sent += opts.bytes
            socks.append(s)
        except OSError:
            pass
    time.sleep(0.5)
    for s in socks:
        s.close()
    return f"{len(socks)} connections, {sent} bytes"


@attack("huge-prefix")
def huge_prefix(opts: argparse.Namespace) -> str:
    with socket.create_connection((opts.address, 6783), timeout=5) as s:
        s.sendall(b"weave\x01\x02" + b"\x00" + (1 << 30).to_bytes(4, "big"))
        s.settimeout(8)
        try:
            while s.recv(65536):
                pass
            return "closed by router"
        except ConnectionResetError:
            return "closed by router"
        except TimeoutError:
            return "left open"


def _udp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=6783)
    p.add_argument("--count", type=int, default=5000)


@attack("udp-junk", _udp_options)
def udp_junk(opts: argparse.Namespace) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(opts.count):
            s.sendto(os.urandom(16 + i % 1400), (opts.address, opts.port))
    return f"{opts.count} datagrams to {opts.port}"


def _count_options(default: int) -> Callable[[argparse.ArgumentParser], None]:
    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--count", type=int, default=default)

    return options


@attack("vxlan-junk", _count_options(2000))
def vxlan_junk(opts: argparse.Namespace) -> str:
    """Well-formed VXLAN with made-up inner source MACs: a bridge that learns from the
    tunnel would fill its FDB with them and send containers' frames to us."""
    header = struct.pack("!II", 0x08000000, VXLAN_VNI << 8)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(opts.count):
            src = bytes([0x02, 0xBA, 0xD0]) + i.to_bytes(3, "big")
            inner = b"\xff" * 6 + src + b"\x08\x06" + os.urandom(28)
            s.sendto(header + inner, (opts.address, VXLAN_PORT))
    return f"{opts.count} VXLAN frames"


def _forge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="the IP address to forge (a real peer's)")
    p.add_argument("--sender", required=True, help="the forged sender's peer name (aa:bb:...)")
    p.add_argument("--receiver", required=True, help="the target router's peer name")
    p.add_argument("--count", type=int, default=200)


@attack("fastdp-forge", _forge_options)
def fastdp_forge(opts: argparse.Namespace) -> str:
    """Issue 12 defect 5: one heartbeat claiming seq 2^63 made every real one look old and
    kept the link on the sleeve for good."""
    from fastdp import probe
    from router.peername import parse_peer_name

    sender, receiver = parse_peer_name(opts.sender), parse_peer_name(opts.receiver)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    src, dst = socket.inet_aton(opts.source), socket.inet_aton(opts.address)
    size = probe.heartbeat_frame_size()
    for i in range(opts.count):
        msg = probe.ProbeMessage(probe.ProbeKind.HEARTBEAT, sender, secrets.randbits(64), 1 << 63, time.monotonic_ns())
        frame = bytearray(probe.encode_frame(probe.probe_mac(receiver), probe.probe_mac(sender), msg,
                                             secrets.token_bytes(32), size))
        if i % 2:  # the first format: version 1, no MAC
            frame[18] = 1
            frame = frame[:-16]
        payload = struct.pack("!II", 0x08000000, VXLAN_VNI << 8) + bytes(frame)
        udp = struct.pack("!HHHH", 45678, VXLAN_PORT, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
        raw.sendto(ip + udp, (opts.address, 0))
    raw.close()
    return f"{opts.count} forged heartbeats"


def bad_label_query(qid: int) -> bytes:
    """One DNS query whose first label has the reserved type 0x40 (dnslib raised on it)."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    return header + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"


@attack("dns-bad", _count_options(2000))
def dns_bad(opts: argparse.Namespace) -> str:
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        for i in range(opts.count):
            s.sendto(bad_label_query(i & 0xFFFF), (opts.address, 53))
            if i % 100 == 0:  # sample the replies without slowing the flood
                try:
                    reply = s.recv(4096)
                    replies += reply[3] & 0x0F == 1  # FORMERR
                except TimeoutError:
                    pass
    return f"{opts.count} queries, {replies} FORMERR sampled"


def _idle_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connections", type=int, default=300)
    p.add_argument("--hold", type=float, default=3.0)


@attack("dns-idle", _idle_options)
def dns_idle(opts: argparse.Namespace) -> str:
    socks = []
    for _ in range(opts.connections):
        try:
            socks.append(socket.create_connection((opts.address, 53), timeout=2))
        except OSError:
            break
    time.sleep(opts.hold)
    for s in socks:
        s.close()
    return f"{len(socks)} idle connections held {opts.hold} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raw", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="attack", required=True)
    for name, (_, options) in ATTACKS.items():
        sp = sub.add_parser(name)
        sp.add_argument("address")
        options(sp)
    opts = p.parse_args(argv)
    fn, _ = ATTACKS[opts.attack]
    print("done", fn(opts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
