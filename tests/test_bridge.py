"""router/bridge.py: the vnet header codec and segmenter (pure), the bridge and TAP (real kernel)."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import bridge as br
from router import containers
from router.bridge import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR_LEN,
    BridgeError,
    FrameError,
    VnetHeader,
)
from router.testbed import Host, Testbed

log = logging.getLogger(__name__)

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
                                reason="needs root, iproute2 and nftables (network namespaces)")

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
SRC4, DST4 = socket.inet_aton("10.40.0.1"), socket.inet_aton("10.40.0.2")
SRC6, DST6 = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "fd00::2")


# --- pure: vnet header, checksums ------------------------------------------------------------


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


@given(u8, u8, u16, u16, u16, u16)
def test_vnet_header_roundtrip(flags: int, gso: int, hdr_len: int, gso_size: int, start: int, off: int) -> None:
    hdr = VnetHeader(flags, gso, hdr_len, gso_size, start, off)
    raw = hdr.pack()
    assert len(raw) == VNET_HDR_LEN == 10
    assert br.parse_vnet_header(raw + b"frame") == hdr
    assert br.split_vnet(raw + b"frame") == (hdr, b"frame")


def test_vnet_header_layout_is_native_struct_virtio_net_hdr() -> None:
    raw = VnetHeader(1, 0x81, 54, 1336, 34, 16).pack()
    assert raw == struct.pack("=BBHHHH", 1, 0x81, 54, 1336, 34, 16)
    assert VnetHeader(gso_type=0x81).gso == VIRTIO_NET_HDR_GSO_TCPV4
    assert br.vnet_frame(b"x") == bytes(10) + b"x"


def test_vnet_header_errors() -> None:
    with pytest.raises(FrameError):
        br.parse_vnet_header(b"123456789")
    with pytest.raises(FrameError):
        VnetHeader(flags=256).pack()


def _reference_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


@given(st.binary(max_size=3000))
def test_ones_complement_sum_matches_word_loop(data: bytes) -> None:
    assert br.ones_complement_sum(data) == _reference_sum(data)
    assert br.internet_checksum(data) == ~_reference_sum(data) & 0xFFFF


def test_internet_checksum_known_ipv4_header() -> None:
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert br.internet_checksum(header) == 0xB861
    assert br.internet_checksum(b"\xff\xff" * 3) == 0  # a sum of 0xFFFF, not "all zero"


# --- pure: segmentation ---------------------------------------------------------------------


def _superframe(v6: bool, payload: bytes, mss: int, *, flags: int = dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH,
                seq: int = 1000, opts: bytes = b"", ip_id: int = 7, vlan: bool = False, ecn: bool = False
                ) -> tuple[bytes, VnetHeader]:
    tcp = dpkt.tcp.TCP(sport=40000, dport=5001, seq=seq, ack=99, flags=flags, win=500, opts=opts, data=payload)
    tcp.off = (20 + len(opts)) // 4
    if v6:
        ip: dpkt.Packet = dpkt.ip6.IP6(src=SRC6, dst=DST6, nxt=6, hlim=64, plen=len(bytes(tcp)), data=tcp)
        ethertype, iphl = 0x86DD, 40
    else:
        ip = dpkt.ip.IP(src=SRC4, dst=DST4, p=6, ttl=64, id=ip_id, df=1, data=tcp)
        ethertype, iphl = 0x0800, 20
    l3 = bytes(ip)
    eth = MAC_B + MAC_A + (b"\x81\x00\x00\x05" if vlan else b"") + ethertype.to_bytes(2, "big")
    start = len(eth) + iphl
    gso = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso | (VIRTIO_NET_HDR_GSO_ECN if ecn else 0),
                     start + 20 + len(opts), mss, start, 16)
    return eth + l3, hdr


def _dpkt_l3(segment: bytes) -> dpkt.Packet:
    eth = dpkt.ethernet.Ethernet(segment)
    return eth.data


def _check_segment(segment: bytes, v6: bool, mtu: int) -> dpkt.tcp.TCP:
    """Checksums valid (dpkt recomputes them), length within the MTU; returns the TCP segment."""
    l3 = _dpkt_l3(segment)
    l3_bytes = bytes(l3)
    assert len(l3_bytes) <= mtu
    if v6:
        assert isinstance(l3, dpkt.ip6.IP6)
        assert l3.plen == len(l3_bytes) - 40
        stored = l3.data.sum
        fresh = dpkt.ip6.IP6(l3_bytes)
        fresh.data.sum = 0
        assert _same_checksum(dpkt.ip6.IP6(bytes(fresh)).data.sum, stored)
    else:
        assert isinstance(l3, dpkt.ip.IP)
        assert l3.len == len(l3_bytes)
        stored_ip, stored_tcp = l3.sum, l3.data.sum
        fresh = dpkt.ip.IP(l3_bytes)
        fresh.sum = 0
        fresh.data.sum = 0
        again = dpkt.ip.IP(bytes(fresh))
        assert again.sum == stored_ip and _same_checksum(again.data.sum, stored_tcp)
    tcp = l3.data
    assert isinstance(tcp, dpkt.tcp.TCP)
    return tcp


@settings(max_examples=60, deadline=None)
@given(v6=st.booleans(), size=st.integers(1, 20000), mss=st.integers(100, 1460),
       opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]), seq=st.integers(0, 2**32 - 1),
       ip_id=u16, vlan=st.booleans(), mtu=st.one_of(st.none(), st.integers(200, 1500)))
def test_segment_superframe_property(v6: bool, size: int, mss: int, opts: bytes, seq: int, ip_id: int,
                                     vlan: bool, mtu: int | None) -> None:
    payload = os.urandom(size)
    frame, hdr = _superframe(v6, payload, mss, opts=opts, seq=seq, ip_id=ip_id, vlan=vlan)
    segments = br.segment_superframe(frame, hdr, mtu)
    l3_hdr = (40 if v6 else 20) + 20 + len(opts)
    eff_mss = min(mss, mtu - l3_hdr) if mtu is not None else mss
    assert len(segments) == -(-size // eff_mss)
    expect_seq = seq
    data = b""
    for n, seg in enumerate(segments):
        assert seg[:12] == frame[:12]
        limit = mtu if mtu is not None else l3_hdr + mss
        tcp = _check_segment(seg, v6, limit)
        assert tcp.seq == expect_seq
        assert len(tcp.data) == eff_mss or n == len(segments) - 1
        assert bytes(tcp.opts) == opts
        last = n == len(segments) - 1
        assert bool(tcp.flags & dpkt.tcp.TH_PUSH) == last
        if not v6:
            assert _dpkt_l3(seg).id == (ip_id + n) & 0xFFFF
        expect_seq = (expect_seq + len(tcp.data)) & 0xFFFFFFFF
        data += tcp.data
    assert data == payload


def test_segment_flags_fin_psh_last_cwr_first() -> None:
    flags = dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH | dpkt.tcp.TH_FIN | dpkt.tcp.TH_CWR
    frame, hdr = _superframe(False, os.urandom(3000), 1000, flags=flags, ecn=True)
    segs = [_check_segment(s, False, 1500) for s in br.segment_superframe(frame, hdr)]
    assert [s.flags for s in segs] == [dpkt.tcp.TH_ACK | dpkt.tcp.TH_CWR, dpkt.tcp.TH_ACK,
                                       dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH | dpkt.tcp.TH_FIN]


def test_segment_ignores_ethernet_padding_and_handles_empty_payload() -> None:
    frame, hdr = _superframe(False, b"", 1000, flags=dpkt.tcp.TH_ACK)
    (seg,) = br.segment_superframe(frame + bytes(6), hdr)
    assert len(seg) == len(frame)
    assert _check_segment(seg, False, 1500).data == b""


def test_segment_rejects_what_it_cannot_cut() -> None:
    frame, hdr = _superframe(False, os.urandom(3000), 1000)
    with pytest.raises(FrameError, match="not a TCP super-frame"):
        br.segment_superframe(frame, VnetHeader(gso_type=3, gso_size=1000))
    with pytest.raises(FrameError, match="ethertype"):
        br.segment_superframe(frame, VnetHeader(1, VIRTIO_NET_HDR_GSO_TCPV6, 0, 1000, 34, 16))
    with pytest.raises(FrameError):
        br.segment_superframe(frame[:40], hdr)
    with pytest.raises(FrameError, match="no room"):
        br.segment_superframe(frame, hdr, mtu=40)
    with pytest.raises(FrameError):
        br.segment_superframe(b"short", hdr)


def _partial(frame: bytes, start: int, offset: int, pseudo: bytes) -> bytes:
    """What the kernel hands over with NEEDS_CSUM: the field holds the uncomplemented pseudo sum."""
    pos = start + offset
    partial = br.ones_complement_sum(pseudo)
    return frame[:pos] + partial.to_bytes(2, "big") + frame[pos + 2:]


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(max_size=1400), udp=st.booleans())
def test_complete_checksum(payload: bytes, udp: bool) -> None:
    if udp:
        l4: dpkt.Packet = dpkt.udp.UDP(sport=5353, dport=5353, data=payload)
        l4.ulen = 8 + len(payload)
        proto, offset = 17, 6
    else:
        l4 = dpkt.tcp.TCP(sport=1, dport=2, seq=3, flags=dpkt.tcp.TH_ACK, data=payload)
        proto, offset = 6, 16
    ip = dpkt.ip.IP(src=SRC4, dst=DST4, p=proto, ttl=64, data=l4)
    good = MAC_B + MAC_A + b"\x08\x00" + bytes(ip)
    seglen = len(bytes(l4))
    pseudo = SRC4 + DST4 + struct.pack("!BBH", 0, proto, seglen)
    partial = _partial(good, 34, offset, pseudo)
    hdr = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 34, offset)
    done = br.complete_checksum(partial, hdr)
    want = int.from_bytes(good[34 + offset:36 + offset], "big")
    got = int.from_bytes(done[34 + offset:36 + offset], "big")
    assert got == want or {got, want} == {0, 0xFFFF}
    assert br.ones_complement_sum(pseudo + done[34:]) == 0xFFFF
    assert br.frames_from_tap(hdr.pack() + partial) == [done]
    assert br.complete_checksum(good, br.NO_OFFLOAD) == good


def test_complete_checksum_out_of_range() -> None:
    with pytest.raises(FrameError):
        br.complete_checksum(bytes(40), VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16))


# --- kernel fixtures -------------------------------------------------------------------------


@pytest.fixture
def host(module_testbed: Testbed) -> Host:
    return module_testbed.add_host()


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    try:
        yield opened
    finally:
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass


def ip_json(netns: str, *args: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", netns, "-j", "-d", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def link_json(netns: str, name: str) -> dict | None:
    links = [x for x in ip_json(netns, "link", "show") if x["ifname"] == name]
    return links[0] if links else None


def read_frames(fd: int, timeout: float, vnet: bool) -> Iterator[bytes]:
    """Frames from a non-blocking TAP fd until `timeout` s pass (vnet header stripped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            return
        try:
            buf = os.read(fd, br.TAP_READ_SIZE)
        except BlockingIOError:
            continue
        yield buf[VNET_HDR_LEN:] if vnet else buf


def write_frame(fd: int, frame: bytes, vnet: bool) -> None:
    os.write(fd, br.vnet_frame(frame) if vnet else frame)


# --- bridge ----------------------------------------------------------------------------------


@needs_root
@pytest.mark.netns
def test_bridge_created_up_no_stp_mtu(host: Host) -> None:
    info = br.ensure_bridge(netns=host.netns)
    assert info.created and info.name == "weave" and info.mtu == 1376
    link = link_json(host.netns, "weave")
    assert link is not None
    assert link["mtu"] == 1376 and "UP" in link["flags"]
    data = link["linkinfo"]["info_data"]
    assert data["stp_state"] == 0
    assert data["ageing_time"] == 30000  # centiseconds
    assert data["mcast_snooping"] == 0
    assert link["address"] == info.mac
    assert br.bridge_info(netns=host.netns) == br.BridgeInfo("weave", info.index, 1376, info.mac, False)


@needs_root
@pytest.mark.netns
def test_bridge_adopted_idempotent_mtu_fixed(host: Host) -> None:
    host.run(["ip", "link", "add", "weave", "type", "bridge", "stp_state", "1"])
    first = br.ensure_bridge(mtu=1400, netns=host.netns)
    second = br.ensure_bridge(mtu=1400, netns=host.netns)
    assert not first.created and first == second
    link = link_json(host.netns, "weave")
    assert link is not None and link["mtu"] == 1400 and link["linkinfo"]["info_data"]["stp_state"] == 0
    # The bridge keeps its MTU when a port with another MTU joins.
    fd = br.ensure_tap(mtu=1500, netns=host.netns)
    try:
        assert link_json(host.netns, "weave")["mtu"] == 1400  # type: ignore[index]
    finally:
        os.close(fd)


@needs_root
@pytest.mark.netns
def test_bridge_name_taken_by_other_device(host: Host) -> None:
    host.run(["ip", "link", "add", "weave", "type", "veth", "peer", "name", "weave-p"])
    with pytest.raises(BridgeError, match="not a bridge"):
        br.ensure_bridge(netns=host.netns)
    with pytest.raises(BridgeError, match="invalid interface name"):
        br.ensure_bridge("x" * 16, netns=host.netns)


@needs_root
@pytest.mark.netns
def test_netns_none_means_the_callers_namespace(host: Host) -> None:
    # The daemon runs inside its host namespace and passes nothing.
    br.run_in_netns(host.netns, br.ensure_bridge, "weave", 1376)
    assert link_json(host.netns, "weave") is not None
    with pytest.raises(FileNotFoundError):
        br.ensure_bridge(netns="pwt-no-such-netns")


# --- TAP -------------------------------------------------------------------------------------


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet_hdr"])
def test_tap_on_bridge_isolated(host: Host, fds: list[int], vnet: bool) -> None:
    br.ensure_bridge(netns=host.netns)
    fd = br.ensure_tap(vnet_hdr=vnet, nonblocking=True, netns=host.netns)
    fds.append(fd)
    link = link_json(host.netns, "vethwe-sleeve")
    assert link is not None
    assert link["mtu"] == 1376 and link["master"] == "weave" and "UP" in link["flags"]
    info = link["linkinfo"]
    assert info["info_kind"] == "tun"
    assert info["info_data"]["type"] == "tap" and info["info_data"]["pi"] is False
    assert info["info_data"]["vnet_hdr"] is vnet
    assert info["info_slave_kind"] == "bridge" and info["info_slave_data"]["isolated"] is True
    assert os.get_blocking(fd) is False
    os.close(fds.pop())
    assert link_json(host.netns, "vethwe-sleeve") is None  # not persistent


@needs_root
@pytest.mark.netns
def test_tap_without_bridge(host: Host) -> None:
    with pytest.raises(BridgeError, match="bridge 'weave' not present"):
        br.ensure_tap(netns=host.netns)
    assert link_json(host.netns, "vethwe-sleeve") is None


def _arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, socket.inet_aton(spa), tha,
                       socket.inet_aton(tpa))


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet_hdr"])
def test_frame_injected_into_tap_reaches_container(host: Host, fds: list[int], vnet: bool) -> None:
    br.ensure_bridge(netns=host.netns)
    fd = br.ensure_tap(vnet_hdr=vnet, nonblocking=True, netns=host.netns)
    fds.append(fd)
    c1 = host.add_container("c1")
    att = containers.attach(c1.netns, ["10.40.0.1/24"], netns=host.netns)
    fake = bytes.fromhex("02aabbccdd01")
    request = b"\xff" * 6 + fake + b"\x08\x06" + _arp(1, fake, "10.40.0.99", bytes(6), "10.40.0.1")
    write_frame(fd, request, vnet)
    container_mac = bytes.fromhex(att.mac.replace(":", ""))
    for frame in read_frames(fd, 3, vnet):
        if frame[12:14] == b"\x08\x06" and frame[:6] == fake:
            assert frame[6:12] == container_mac
            assert frame[20:22] == b"\x00\x02"  # ARP reply
            assert frame[28:32] == socket.inet_aton("10.40.0.1")
            break
    else:
        pytest.fail("no ARP reply from the container came out of the TAP")


@needs_root
@pytest.mark.netns
def test_isolated_tunnel_ports_do_not_forward_to_each_other(host: Host, fds: list[int]) -> None:
    br.ensure_bridge(netns=host.netns)
    tap1 = br.ensure_tap("vethwe-sleeve", nonblocking=True, netns=host.netns)
    fds.append(tap1)
    tap2 = br.ensure_tap("vethwe-tap2", nonblocking=True, netns=host.netns)
    fds.append(tap2)
    c1 = host.add_container("c1")
    containers.attach(c1.netns, ["10.40.0.1/24"], netns=host.netns)
    ethertype = 0x88B5  # local experimental
    sock = br.run_in_netns(c1.netns, socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    try:
        sock.bind(("ethwe", 0))
        sock.settimeout(3)
        nonce = os.urandom(16)
        os.write(tap1, b"\xff" * 6 + bytes.fromhex("02aabbccdd02") + ethertype.to_bytes(2, "big") + nonce)
        assert nonce in sock.recv(2048)  # reached the container port
        assert not any(nonce in f for f in read_frames(tap2, 0.3, False))  # but not the other TAP
        # A container's broadcast floods to both tunnel ports.
        nonce2 = os.urandom(16)
        sock.send(b"\xff" * 6 + bytes.fromhex("02aabbccdd03") + ethertype.to_bytes(2, "big") + nonce2)
        assert any(nonce2 in f for f in read_frames(tap1, 1, False))
        assert any(nonce2 in f for f in read_frames(tap2, 1, False))
    finally:
        sock.close()


# --- checksum offload, teardown ----------------------------------------------------------


@needs_root
@pytest.mark.netns
def test_tx_checksum_toggle(host: Host) -> None:
    host.run(["ip", "link", "add", "vethwepltest01", "type", "veth", "peer", "name", "ethtest"])
    assert br.get_tx_checksum("vethwepltest01", netns=host.netns) is True
    br.set_tx_checksum("vethwepltest01", False, netns=host.netns)
    assert br.get_tx_checksum("vethwepltest01", netns=host.netns) is False
    br.set_tx_checksum("vethwepltest01", True, netns=host.netns)
    assert br.get_tx_checksum("vethwepltest01", netns=host.netns) is True
    with pytest.raises(BridgeError):
        br.set_tx_checksum("nosuchdev", False, netns=host.netns)


@needs_root
@pytest.mark.netns
def test_teardown_and_stale(host: Host, fds: list[int]) -> None:
    assert br.teardown(netns=host.netns) == []
    br.ensure_bridge(netns=host.netns)
    host.run(["ip", "tuntap", "add", "mode", "tap", "name", "vethwe-sleeve"])  # left by someone, persistent
    assert [(s.name, s.kind) for s in br.list_stale(netns=host.netns)] == [("vethwe-sleeve", "tun")]
    fds.append(br.ensure_tap(vnet_hdr=True, netns=host.netns))  # adopted
    assert link_json(host.netns, "vethwe-sleeve")["linkinfo"]["info_data"]["vnet_hdr"] is True  # type: ignore[index]
    c1 = host.add_container("c1")
    att = containers.attach(c1.netns, ["10.40.0.1/24"], netns=host.netns)
    host.run(["ip", "link", "add", "vethweplorphan", "type", "veth", "peer", "name", "orphan-p"])
    stale = br.list_stale(netns=host.netns)
    assert [(s.name, s.kind) for s in stale] == [("vethweplorphan", "veth")]
    removed = br.teardown(netns=host.netns)
    assert set(removed) == {"vethwe-sleeve", att.host_ifname, "vethweplorphan", "weave"}
    names = {x["ifname"] for x in ip_json(host.netns, "link", "show")}
    assert names == {"lo", "eth0"}  # orphan-p went with its peer
    assert {x["ifname"] for x in ip_json(c1.netns, "link", "show")} == {"lo"}
    assert br.teardown(netns=host.netns) == []


# --- super-frames from the real kernel ---------------------------------------------------------

SENDER = r"""
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[2]))
s = socket.create_connection((sys.argv[1], 5001), timeout=10)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(hashlib.sha256(data).hexdigest())
"""

RECEIVER = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001))
s.listen(1)
s.settimeout(10)
print("ready", flush=True)
c, _ = s.accept()
h = hashlib.sha256()
while d := c.recv(1 << 20):
    h.update(d)
c.close()
print(h.hexdigest())
"""


@dataclass
class RelayStats:
    reads: int = 0
    superframes: int = 0
    partial: int = 0  # single frames with a partial checksum (NEEDS_CSUM) completed by us
    segments: int = 0
    largest: int = 0  # largest frame read, without the vnet header
    largest_out: int = 0  # largest frame written on
    errors: list[str] = field(default_factory=list)


def _relay(fds: tuple[int, int], vnet: bool, mtu: int, stats: RelayStats, stop: threading.Event) -> None:
    """A minimal sleeve: frames between two TAPs, super-frames segmented and checked with dpkt."""
    while not stop.is_set():
        ready, _, _ = select.select(list(fds), [], [], 0.05)
        for fd in ready:
            other = fds[1] if fd == fds[0] else fds[0]
            try:
                buf = os.read(fd, br.TAP_READ_SIZE)
            except BlockingIOError:
                continue
            stats.reads += 1
            try:
                if vnet:
                    hdr, frame = br.split_vnet(buf)
                    out = br.frames_from_tap(buf, mtu)
                    if hdr.gso != VIRTIO_NET_HDR_GSO_NONE:
                        _check_superframe(frame, hdr, out, mtu)
                        stats.superframes += 1
                        stats.segments += len(out)
                    else:
                        _check_plain(out[0])
                        stats.partial += hdr.needs_csum
                else:
                    frame, out = buf, [buf]
                    _check_plain(frame)
                stats.largest = max(stats.largest, len(frame))
                for f in out:
                    stats.largest_out = max(stats.largest_out, len(f))
                    write_frame(other, f, vnet)
            except Exception as e:  # reported by the test
                stats.errors.append(repr(e))


def _check_superframe(frame: bytes, hdr: VnetHeader, segments: list[bytes], mtu: int) -> None:
    v6 = hdr.gso == VIRTIO_NET_HDR_GSO_TCPV6
    whole = _dpkt_l3(frame).data
    expect, data = whole.seq, b""
    for seg in segments:
        tcp = _check_segment(seg, v6, mtu)
        assert tcp.seq == expect, "sequence numbers not contiguous"
        expect = (expect + len(tcp.data)) & 0xFFFFFFFF
        data += tcp.data
    assert data == whole.data


def _same_checksum(a: int, b: int) -> bool:
    # 0x0000 and 0xFFFF are the same number in one's complement; a TCP sender may write either.
    return a == b or {a, b} == {0, 0xFFFF}


def _check_plain(frame: bytes) -> None:
    l3 = _dpkt_l3(frame)
    if isinstance(getattr(l3, "data", None), dpkt.tcp.TCP):
        _check_segment(frame, isinstance(l3, dpkt.ip6.IP6), 1376)


@needs_root
@pytest.mark.netns
@pytest.mark.parametrize(("vnet", "tx_checksum", "family", "gso_max_size"), [
    (True, True, 4, None),
    (True, True, 6, None),
    (True, True, 4, 32000),
    (False, True, 4, None),
    (False, False, 4, None),
], ids=["vnet-tcp4", "vnet-tcp6", "vnet-gso32000", "plain-tx-on", "plain-tx-off"])
def test_tcp_stream_through_taps(module_testbed: Testbed, fds: list[int], vnet: bool, tx_checksum: bool,
                                 family: int, gso_max_size: int | None) -> None:
    """Two hosts, each a bridge + TAP + container, joined only by a relay between the TAPs.

    The sender's super-frames (vnet) are cut by segment_superframe and every segment is
    checked with dpkt; the receiving kernel's TCP checks the checksums once more and the
    stream must arrive intact.
    """
    mtu, size = 1376, 4 << 20
    hosts = [module_testbed.add_host(), module_testbed.add_host()]
    ctrs = []
    for i, h in enumerate(hosts, 1):
        br.ensure_bridge(mtu=mtu, netns=h.netns)
        fds.append(br.ensure_tap(vnet_hdr=vnet, nonblocking=True, netns=h.netns))
        c = h.add_container(f"c{i}")
        containers.attach(c.netns, [f"10.40.0.{i}/24"], mtu=mtu, tx_checksum=tx_checksum,
                          gso_max_size=gso_max_size, netns=h.netns)
        if family == 6:
            c.run(["ip", "-6", "addr", "add", f"fd00::{i}/64", "dev", "ethwe", "nodad"])
        ctrs.append(c)
    dst = "fd00::2" if family == 6 else "10.40.0.2"
    stats, stop = RelayStats(), threading.Event()
    relay = threading.Thread(target=_relay, args=((fds[-2], fds[-1]), vnet, mtu, stats, stop), daemon=True)
    relay.start()
    receiver = subprocess.Popen(ctrs[1].exec_argv([sys.executable, "-c", RECEIVER, dst]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        sent = ctrs[0].run([sys.executable, "-c", SENDER, dst, str(size)], timeout=30).stdout.strip()
        got, err = receiver.communicate(timeout=15)
        assert got.strip() == sent, err
    finally:
        stop.set()
        relay.join(5)
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    log.info("stream %s: %s", (vnet, tx_checksum, family, gso_max_size), stats)
    assert stats.errors == []
    assert stats.largest_out <= mtu + 14
    if vnet:
        assert stats.superframes > 0 and stats.largest > mtu + 14
        assert stats.partial > 0
        assert stats.largest <= (gso_max_size or 65536) + 14
        print(f"\nlargest super-frame read from the TAP: {stats.largest} bytes "
              f"({stats.superframes} super-frames -> {stats.segments} segments)")
    else:
        assert stats.largest <= mtu + 14
