"""The sleeve data path end to end: real routers in network namespaces, real traffic.

Every test builds hosts with `router.testbed.Testbed`, starts routers the way a user
does (`weave launch` inside each host's namespace with the host's own WEAVE_STATE_DIR),
plugs container namespaces in with `weave attach`, and then judges the sleeve by what
crosses it: `ping` and `iperf3` between containers, TCP streams checked by SHA-256,
`weave status connections`, the daemon's log and its /metrics. Hand-made UDP datagrams
(garbage, truncated frames, a captured encrypted datagram sent again) come from another
host's namespace. Nothing leaves the namespaces the test bed creates.

Every router runs with --no-fastdp, so all traffic takes the sleeve. Two meshes (plain
and with a password) are shared by the tests that only add traffic; tests that change
the network (a line topology, a lowered MTU) build their own. The router restart runs
last on the plain mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router.bridge import VNET_HDR_LEN
from router.testbed import IPERF3_PORT, Container, Host, Testbed, TestbedError, iperf3_end
from sleeve.wire import overlay_mtu
from tests.routers import diagnostics, launch, log_text, router_test_marks, wait_for, weave

pytestmark = router_test_marks("ping", "iperf3", "ss")

REPO = Path(__file__).resolve().parents[1]
CONVERGE = 20.0  # seconds a small mesh may take to establish its sleeve links (it takes ~1 s)
PASSWORD = "sleeve-integration-secret"
OVERLAY_NET = "10.32.1"  # the container on hostN gets 10.32.1.N/12
OVERLAY_PREFIXLEN = 12
CONTAINER_MTU = 1376  # the bridge and every container port (DESIGN.md §4)
UNDERLAY_MTU = 1500



# ---------------------------------------------------------------- helpers


def weaver_pid(host: Host) -> int:
    return int((host.state_dir / "weaver.pid").read_text().strip())


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def peer_name(host: Host) -> str:
    return json.loads(weave(host, "report"))["Router"]["Name"]


def expected_mtu(underlay: int, encrypted: bool) -> int:
    """The overlay MTU of a pyweave<->pyweave sleeve link (frames carry a virtio header)."""
    return overlay_mtu(underlay, encrypted) - VNET_HDR_LEN


# `weave status connections`, e.g.
#   <- 10.98.0.2:41024       established sleeve f6:..:3a(host2) (fastdp off (--no-fastdp))  unencrypted mtu=1428
CONN_RE = re.compile(
    r"^(?P<dir><-|->)\s+(?P<ip>[\d.]+):(?P<port>\d+)\s+(?P<state>established)\s+(?P<overlay>\S+)\s+"
    r"(?P<name>[0-9a-f]{2}(?::[0-9a-f]{2}){5})\((?P<nick>[^)]*)\)(?:\s+\((?P<detail>.*)\))?\s+"
    r"(?P<enc>encrypted|unencrypted)\s+mtu=(?P<mtu>\d+)\s*$"
)


@dataclass
class Conn:
    outbound: bool
    ip: str
    overlay: str
    nick: str
    encrypted: bool
    mtu: int
    detail: str  # why this path (e.g. "fastdp off (--no-fastdp)")
    line: str


def connections(host: Host) -> list[Conn]:
    """The established connections `weave status connections` lists."""
    out = []
    for line in weave(host, "status", "connections").splitlines():
        m = CONN_RE.match(line.strip())
        if m:
            out.append(Conn(m["dir"] == "->", m["ip"], m["overlay"], m["nick"], m["enc"] == "encrypted",
                            int(m["mtu"]), m["detail"] or "", line.strip()))
    return out


def conn_to(host: Host, nick: str) -> Conn | None:
    return next((c for c in connections(host) if c.nick == nick), None)


def wait_connected(hosts: list[Host], pairs: Iterable[tuple[Host, Host]] | None = None,
                   timeout: float = CONVERGE) -> None:
    """Wait until every pair (default: all pairs of `hosts`) shows an established connection both ways."""
    todo = list(pairs) if pairs is not None else [(a, b) for a in hosts for b in hosts if a is not b]
    missing: list[str] = []

    def probe() -> bool:
        missing[:] = [f"{a.name} -> {b.name}" for a, b in todo if conn_to(a, b.name) is None]
        return not missing

    wait_for(probe, "established sleeve connections", timeout, hosts, lambda: f"missing: {missing}")


def ping(c: Container, address: str, *args: str, count: int = 5, interval: float = 0.2,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return c.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", *args, address],
                 check=False, timeout=timeout)


def received(proc: subprocess.CompletedProcess[str]) -> int:
    m = re.search(r"(\d+) (?:packets )?received", proc.stdout)
    return int(m[1]) if m else 0


def wait_ping(c: Container, address: str, hosts: Iterable[Host], timeout: float = CONVERGE) -> None:
    wait_for(lambda: c.ping(address, timeout=0.5), f"{c.name} to reach {address}", timeout, hosts)


def assert_pings(c: Container, address: str, hosts: Iterable[Host], count: int = 5) -> None:
    """`count` pings from `c` to `address`, nearly all answered (after a first one got through)."""
    wait_ping(c, address, hosts)
    proc = ping(c, address, count=count, interval=0.1)
    assert received(proc) >= count - 1, f"{c.name} -> {address}:\n{proc.stdout}{proc.stderr}"


@contextlib.contextmanager
def background(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """A process that is terminated (then killed) on the way out, whatever happens."""
    proc = subprocess.Popen(argv, text=True, stdin=subprocess.DEVNULL, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def iperf3(client: Container, server: Container, address: str, seconds: float,
           hosts: Iterable[Host] = ()) -> dict[str, Any]:
    """An iperf3 TCP run from `client` to a one-shot server on `address` in `server`; the JSON 'end'."""
    with server.iperf3_server(address):
        proc = client.run(["iperf3", "-c", address, "-p", str(IPERF3_PORT), "-t", str(seconds), "-J"],
                          check=False, timeout=seconds + 30)
    try:
        return iperf3_end(proc)
    except TestbedError as exc:
        pytest.fail(f"{exc}\n{diagnostics(hosts)}")


# A TCP sink: listens on argv[1]:argv[2], takes one connection, reads to EOF and prints
# {"bytes": n, "sha256": hex}.
STREAM_SINK = r"""
import hashlib, json, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(60)
conn, _ = srv.accept()
conn.settimeout(60)
h, n = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    h.update(chunk)
    n += len(chunk)
print(json.dumps({"bytes": n, "sha256": h.hexdigest()}), flush=True)
"""

# Connects to argv[1]:argv[2], sends argv[3] random bytes, prints {"bytes": n, "sha256": hex}.
STREAM_SOURCE = r"""
import hashlib, json, os, socket, sys
total = int(sys.argv[3])
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
h, sent = hashlib.sha256(), 0
while sent < total:
    chunk = os.urandom(min(1 << 16, total - sent))
    s.sendall(chunk)
    h.update(chunk)
    sent += len(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
print(json.dumps({"bytes": sent, "sha256": h.hexdigest()}), flush=True)
"""


def tcp_stream(client: Container, server: Container, address: str, size: int,
               hosts: Iterable[Host] = ()) -> float:
    """Send `size` random bytes over TCP and check they arrive intact; returns the seconds it took."""
    port = 5301
    argv = server.exec_argv([sys.executable, "-c", STREAM_SINK, address, str(port)])
    with background(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as sink:
        server.wait_listening(port)
        started = time.monotonic()
        sent = client.run([sys.executable, "-c", STREAM_SOURCE, address, str(port), str(size)],
                          check=False, timeout=90)
        took = time.monotonic() - started
        try:
            out, err = sink.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", "the sink did not finish"
    assert sent.returncode == 0, f"sending failed: {sent.stderr}\n{diagnostics(hosts)}"
    assert out.strip(), f"the sink printed nothing: {err}\n{diagnostics(hosts)}"
    assert json.loads(out) == json.loads(sent.stdout), "the stream arrived damaged"
    return took


METRICS_SCRIPT = (
    "import urllib.request;"
    "print(urllib.request.urlopen('http://127.0.0.1:6784/metrics', timeout=5).read().decode())"
)
DROPPED_RE = re.compile(r'^pyweave_sleeve_dropped_total\{reason="([^"]+)"\} (\S+)$', re.MULTILINE)


def metrics(host: Host) -> str:
    return host.run([sys.executable, "-c", METRICS_SCRIPT]).stdout


def sleeve_drops(host: Host) -> dict[str, float]:
    """pyweave_sleeve_dropped_total by reason (xfail if the router does not export it)."""
    text = metrics(host)
    drops = {m[1]: float(m[2]) for m in DROPPED_RE.finditer(text)}
    if not drops:
        pytest.xfail("the router does not export pyweave_sleeve_dropped_total{reason=...} on /metrics")
    return drops


def counter(host: Host, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", metrics(host), re.MULTILINE)
    return float(m[1]) if m else 0.0


# Sends each hex-encoded datagram of argv[3:] to argv[1]:argv[2] from an ordinary UDP socket.
SEND_DATAGRAMS = r"""
import socket, sys, time
addr = (sys.argv[1], int(sys.argv[2]))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i, hexed in enumerate(sys.argv[3:]):
        s.sendto(bytes.fromhex(hexed), addr)
        if i % 20 == 19:
            time.sleep(0.01)
print(len(sys.argv) - 3)
"""


def send_datagrams(from_host: Host, to: Host, datagrams: list[bytes]) -> None:
    args = [d.hex() for d in datagrams]
    out = from_host.run([sys.executable, "-c", SEND_DATAGRAMS, to.address, "6783", *args]).stdout
    assert int(out) == len(datagrams)


# Captures, on interface argv[1] (in the switch namespace), the first unfragmented IPv4 UDP
# datagram from argv[2] to argv[3]:argv[4] whose payload is at least argv[5] bytes; prints
# "ready" once listening, then the payload in hex.
CAPTURE = r"""
import socket, struct, sys, time
ifname, src, dst, port, least = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
# ETH_P_ALL: on a bridge port only the "all" taps run before the bridge takes the frame.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((ifname, 0))
s.settimeout(0.2)
print("ready", flush=True)
deadline = time.monotonic() + 20
want = (socket.inet_aton(src), socket.inet_aton(dst))
while time.monotonic() < deadline:
    try:
        data = s.recv(1 << 16)
    except TimeoutError:
        continue
    if data[12:14] != b"\x08\x00":
        continue
    ip = data[14:]
    if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17 or (ip[12:16], ip[16:20]) != want:
        continue
    if struct.unpack_from(">H", ip, 6)[0] & 0x3FFF:
        continue  # a fragment
    ihl = (ip[0] & 15) * 4
    sport, dport, ulen = struct.unpack_from(">HHH", ip, ihl)
    payload = ip[ihl + 8:ihl + ulen]
    if dport == port and len(payload) >= least:
        print(payload.hex(), flush=True)
        sys.exit(0)
sys.exit(1)
"""


# ---------------------------------------------------------------- meshes


@dataclass
class Mesh:
    """A test bed whose routers share launch flags; each host gets a container cN (10.32.1.N)."""

    tb: Testbed
    password: str | None
    launched: set[str] = field(default_factory=set)

    @property
    def encrypted(self) -> bool:
        return self.password is not None

    def flags(self) -> list[str]:
        # The sleeve is under test: keep the kernel path (fastdp) out of it.
        return ["--no-fastdp", *(["--password", self.password] if self.password else [])]

    def launch(self, host: Host, *peers: str) -> None:
        launch(host, *self.flags(), *peers)
        self.launched.add(host.name)

    def container(self, host: Host) -> Container:
        name = f"c{host.index}"
        c = host.containers.get(name)
        if c is None:
            c = host.add_container(name)
            out = weave(host, "attach", "-h", name, f"{self.ip(host)}/{OVERLAY_PREFIXLEN}", c.netns)
            assert self.ip(host) in out, out
        return c

    @staticmethod
    def ip(host: Host) -> str:
        return f"{OVERLAY_NET}.{host.index}"

    def up(self, n: int) -> list[Host]:
        """The first `n` hosts, launched (each told about host1), with containers, all connected."""
        while len(self.tb.hosts) < n:
            self.tb.add_host()
        hosts = self.tb.hosts[:n]
        for i, host in enumerate(hosts):
            if host.name not in self.launched:
                self.launch(host, *([hosts[0].address] if i else []))
        for host in hosts:
            self.container(host)
        wait_connected(hosts)
        return hosts


@contextlib.contextmanager
def make_testbed(n: int) -> Iterator[Testbed]:
    tb = Testbed(n)
    try:
        yield tb
    finally:
        tb.close()
    assert not tb.cleanup_errors, tb.cleanup_errors


@pytest.fixture(scope="module")
def plain_mesh() -> Iterator[Mesh]:
    with make_testbed(0) as tb:
        yield Mesh(tb, None)


@pytest.fixture(scope="module")
def encrypted_mesh() -> Iterator[Mesh]:
    with make_testbed(0) as tb:
        yield Mesh(tb, PASSWORD)


@pytest.fixture(params=["plain", "encrypted"])
def mesh(request: pytest.FixtureRequest) -> Mesh:
    return request.getfixturevalue(f"{request.param}_mesh")


# ---------------------------------------------------------------- 2 and 3 hosts


def test_two_hosts_ping_across_the_sleeve(mesh: Mesh) -> None:
    h1, h2 = mesh.up(2)
    c1, c2 = mesh.container(h1), mesh.container(h2)

    # Each side lists the other once, on the sleeve, with the right encryption and MTU.
    want_mtu = expected_mtu(UNDERLAY_MTU, mesh.encrypted)
    for host, other, outbound in ((h1, h2, False), (h2, h1, True)):
        conns = connections(host)
        assert len(conns) == 1, conns
        conn = conns[0]
        assert conn.nick == other.name and conn.ip == other.address, conn.line
        assert conn.overlay == "sleeve" and "--no-fastdp" in conn.detail, conn.line
        assert conn.encrypted is mesh.encrypted, conn.line
        assert conn.mtu == want_mtu, conn.line
        assert conn.outbound is outbound, conn.line  # host2 dialled host1
        enc = "encrypted" if mesh.encrypted else "unencrypted"
        assert re.search(rf"\s{enc}\s+mtu={want_mtu}$", conn.line), conn.line
    status = weave(h1, "status")
    assert ("Encryption: enabled" if mesh.encrypted else "Encryption: disabled") in status, status
    assert "Connections: 1 (1 established)" in status, status

    ps = weave(h2, "ps")
    assert re.search(rf"^{re.escape(c2.netns)} [0-9a-f:]{{17}} {re.escape(mesh.ip(h2))}/12$", ps, re.M), ps

    assert_pings(c1, mesh.ip(h2), [h1, h2])
    assert_pings(c2, mesh.ip(h1), [h1, h2])
    for host in (h1, h2):
        assert "Traceback" not in log_text(host)


def test_three_hosts_ping_each_other(mesh: Mesh) -> None:
    hosts = mesh.up(3)
    want_mtu = expected_mtu(UNDERLAY_MTU, mesh.encrypted)
    for host in hosts:
        conns = connections(host)
        assert sorted(c.nick for c in conns) == sorted(h.name for h in hosts if h is not host), conns
        for conn in conns:
            assert (conn.overlay, conn.encrypted, conn.mtu) == ("sleeve", mesh.encrypted, want_mtu), conn.line
    # host3 was told only about host1; its link to host2 came from discovery and carries traffic.
    for a in hosts:
        for b in hosts:
            if a is not b:
                assert_pings(mesh.container(a), mesh.ip(b), hosts, count=3)
    assert "Peers: 3 (with 6 established connections)" in weave(hosts[0], "status")


def test_iperf3_tcp_across_the_sleeve(mesh: Mesh) -> None:
    h1, h2 = mesh.up(2)
    c1, c2 = mesh.container(h1), mesh.container(h2)
    wait_ping(c1, mesh.ip(h2), [h1, h2])
    sent_before = counter(h1, "pyweave_sleeve_datagrams_sent_total")
    end = iperf3(c1, c2, mesh.ip(h2), 3, [h1, h2])
    gbit = end["sum_received"]["bits_per_second"] / 1e9
    moved = end["sum_received"]["bytes"]
    print(f"iperf3 {'encrypted' if mesh.encrypted else 'plain'} sleeve: {gbit:.2f} Gbit/s, {moved} bytes")
    assert moved > 5_000_000, end["sum_received"]
    assert gbit > 0.02, f"{gbit:.3f} Gbit/s"
    # The bytes went through the sleeve (it sent datagrams), and the link is still up.
    assert counter(h1, "pyweave_sleeve_datagrams_sent_total") > sent_before
    assert conn_to(h1, h2.name) is not None
    for host in (h1, h2):
        assert "Traceback" not in log_text(host)


# ---------------------------------------------------------------- hostile datagrams


def test_malformed_datagrams_are_dropped_and_counted(plain_mesh: Mesh) -> None:
    h1, h2, h3 = plain_mesh.up(3)
    c1, c2 = plain_mesh.container(h1), plain_mesh.container(h2)
    pid = weaver_pid(h2)
    n1, n2, n3 = (bytes.fromhex(peer_name(h).replace(":", "")) for h in (h1, h2, h3))
    before = sleeve_drops(h2)

    rng = secrets.SystemRandom()
    garbage = [secrets.token_bytes(rng.randrange(7, 1400)) for _ in range(40)]  # unknown senders
    tiny = [b"", b"\x00", secrets.token_bytes(5)]  # shorter than a peer name
    header = bytes(6) + bytes(6)  # src, dst peer (anything)
    truncated = [
        n1,  # a known sender and no frames at all
        n1 + secrets.token_bytes(9),  # a frame header cut short
        n1 + header + (1000).to_bytes(2, "big") + secrets.token_bytes(100),  # frame longer than the datagram
        n1 + header + (3).to_bytes(2, "big") + secrets.token_bytes(3),  # frame shorter than Ethernet
        n3 + header + (60).to_bytes(2, "big") + secrets.token_bytes(30),  # via another known link
    ]
    # Well-formed datagrams from a known sender whose frames make no sense: peers nobody
    # knows, a virtio header the kernel must refuse, noise addressed to host2 itself.
    bogus_vnet = bytes([1, 1]) + b"\xff\xff" * 4  # NEEDS_CSUM, TCPv4 GSO, every offset 0xffff
    nonsense = [
        n1 + secrets.token_bytes(12) + (60).to_bytes(2, "big") + secrets.token_bytes(60),
        n1 + n1 + n3 + (60).to_bytes(2, "big") + secrets.token_bytes(60),
        n1 + n1 + n2 + (70).to_bytes(2, "big") + bogus_vnet + secrets.token_bytes(60),
        n1 + n1 + n2 + (70).to_bytes(2, "big") + bytes(10) + b"\xff" * 12 + secrets.token_bytes(48),
    ]
    send_datagrams(h3, h2, garbage + tiny + truncated + nonsense)

    def counted() -> dict[str, float] | None:
        d = sleeve_drops(h2)
        grew = {k: d.get(k, 0) - before.get(k, 0) for k in ("unknown_sender", "malformed")}
        ok = grew["unknown_sender"] >= len(garbage) and grew["malformed"] >= len(tiny) + len(truncated)
        return d if ok else None

    wait_for(counted, "the drops to be counted", 10, [h2],
             lambda: f"before {before}, now {sleeve_drops(h2)}")

    # The daemon is still up, nothing crashed, and traffic still flows both ways.
    assert alive(pid) and weaver_pid(h2) == pid
    assert "Connections: 2 (2 established)" in weave(h2, "status")
    assert_pings(c1, plain_mesh.ip(h2), [h1, h2, h3])
    assert_pings(c2, plain_mesh.ip(h1), [h1, h2, h3])
    log = log_text(h2)
    assert "Traceback" not in log and "sleeve-udp failed" not in log, log[-3000:]


def test_replayed_and_forged_encrypted_datagrams_are_dropped(encrypted_mesh: Mesh) -> None:
    h1, h2, h3 = encrypted_mesh.up(3)
    c1, c2 = encrypted_mesh.container(h1), encrypted_mesh.container(h2)
    wait_ping(c1, encrypted_mesh.ip(h2), [h1, h2])
    pid = weaver_pid(h2)

    # Capture one encrypted datagram host1 -> host2 (carrying at least one frame) on host1's
    # switch port (the veth end in the switch namespace is named after host1's namespace).
    least = 6 + 8 + 16 + 14 + 14
    argv = ["ip", "netns", "exec", encrypted_mesh.tb.switch_netns, sys.executable, "-c", CAPTURE,
            h1.netns, h1.address, h2.address, "6783", str(least)]
    with background(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as cap:
        assert cap.stdout is not None
        assert cap.stdout.readline().strip() == "ready"
        ping(c1, encrypted_mesh.ip(h2), count=5, interval=0.1)
        try:
            out, err = cap.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            out, err = "", "timed out"
    assert cap.returncode == 0 and out.strip(), f"no datagram captured: {err}"
    original = bytes.fromhex(out.strip())
    assert original[:6] == bytes.fromhex(peer_name(h1).replace(":", ""))

    before = sleeve_drops(h2)
    seq = int.from_bytes(original[6:14], "big")
    flipped = bytearray(original)
    flipped[-1] ^= 0x01  # altered, but its sequence number was seen: a replay all the same
    replays = [original] * 5 + [bytes(flipped)]
    # Fresh sequence numbers that fail authentication: the original sealed under another
    # nonce, and noise far ahead of anything host1 sent.
    renumbered = original[:6] + (seq + 1000).to_bytes(8, "big") + original[14:]
    far_ahead = original[:6] + (1 << 40).to_bytes(8, "big") + secrets.token_bytes(len(original) - 14)
    forged = [renumbered, far_ahead]
    truncated = [original[:10], original[:14 + 15]]  # no full seq field; seq field but no room for a tag
    send_datagrams(h3, h2, replays + forged + truncated)

    def counted() -> dict[str, float] | None:
        d = sleeve_drops(h2)
        grew = {k: d.get(k, 0) - before.get(k, 0) for k in ("replayed", "decryption_failed", "truncated")}
        ok = (grew["replayed"] >= len(replays) and grew["decryption_failed"] >= len(forged)
              and grew["truncated"] >= len(truncated))
        return d if ok else None

    wait_for(counted, "the replays and forgeries to be counted", 10, [h2],
             lambda: f"before {before}, now {sleeve_drops(h2)}")

    # A forged datagram far ahead in sequence must not have moved the replay window:
    # host1's next datagrams (lower sequence numbers) still get through.
    assert alive(pid) and weaver_pid(h2) == pid
    assert_pings(c1, encrypted_mesh.ip(h2), [h1, h2, h3])
    assert_pings(c2, encrypted_mesh.ip(h1), [h1, h2, h3])
    assert conn_to(h2, h1.name) is not None
    assert "Traceback" not in log_text(h2)


# ---------------------------------------------------------------- relaying


@pytest.mark.parametrize("password", [None, PASSWORD], ids=["plain", "encrypted"])
def test_line_topology_relays_through_the_middle(password: str | None) -> None:
    with make_testbed(3) as tb:
        a, b, c = tb.hosts
        tb.partition(a, c)  # A and C cannot reach each other on the underlay
        mesh = Mesh(tb, password)
        mesh.launch(b)
        mesh.launch(a, b.address)
        mesh.launch(c, b.address)
        ca, cc = mesh.container(a), mesh.container(c)
        wait_connected(tb.hosts, [(a, b), (b, a), (c, b), (b, c)])
        # A learns of C through gossip (it is a peer), but has no link to it.
        wait_for(lambda: "(host3)" in weave(a, "status", "peers"), "host1 to hear of host3", 15, tb.hosts)
        assert not a.ping(c.address, timeout=0.3), "the partition does not hold"

        assert_pings(ca, mesh.ip(c), tb.hosts)
        assert_pings(cc, mesh.ip(a), tb.hosts)
        tcp_stream(ca, cc, mesh.ip(c), 2_000_000, tb.hosts)
        assert conn_to(a, c.name) is None and conn_to(c, a.name) is None
        # It went through B's sleeve: B, which has no container, received and sent plenty.
        assert counter(b, "pyweave_sleeve_datagrams_received_total") > 100
        assert counter(b, "pyweave_sleeve_datagrams_sent_total") > 100
        for host in tb.hosts:
            assert "Traceback" not in log_text(host)


# ---------------------------------------------------------------- path MTU


@pytest.mark.parametrize("password", [None, PASSWORD], ids=["plain", "encrypted"])
def test_lower_path_mtu_is_discovered(password: str | None) -> None:
    path = 1300
    with make_testbed(2) as tb:
        h1, h2 = tb.hosts
        # host2's port on the switch (and its own NIC) takes 1300 bytes: bigger frames from
        # host1 vanish in the switch without any ICMP, so host1 can only find out by probing.
        tb.set_mtu(h2, path)
        mesh = Mesh(tb, password)
        mesh.launch(h1)
        mesh.launch(h2, h1.address)
        c1, c2 = mesh.container(h1), mesh.container(h2)
        wait_connected(tb.hosts)
        want = expected_mtu(path, mesh.encrypted)
        assert want < CONTAINER_MTU

        def discovered() -> Conn | None:
            conn = conn_to(h1, h2.name)
            return conn if conn is not None and conn.mtu == want else None

        started = time.monotonic()
        wait_for(discovered, f"host1 to find the overlay MTU {want}", 60, tb.hosts,
                 lambda: f"host1 shows {conn_to(h1, h2.name)}")
        print(f"PMTU discovery settled at {want} after {time.monotonic() - started:.1f} s more")
        conn2 = conn_to(h2, h1.name)
        assert conn2 is not None and conn2.mtu == want, conn2  # host2 knows its own NIC's MTU

        dst = mesh.ip(h2)
        wait_ping(c1, dst, tb.hosts)
        # The largest DF packet that fits goes through...
        fits = ping(c1, dst, "-M", "do", "-s", str(want - 28), count=3, interval=0.1)
        assert received(fits) >= 2, fits.stdout + fits.stderr
        # ...one byte more is refused with "fragmentation needed", telling the right MTU.
        big = ping(c1, dst, "-M", "do", "-s", str(want - 28 + 1), count=3, interval=0.1)
        text = big.stdout + big.stderr
        assert received(big) == 0, text
        assert re.search(r"[Ff]rag needed|[Mm]essage too long", text), text
        mtus = {int(m) for m in re.findall(r"mtu ?= ?(\d+)", text)}
        assert mtus == {want}, text
        # A DF ping bigger than the path but within the container MTU, as a user would try it.
        big2 = ping(c1, dst, "-M", "do", "-s", str(CONTAINER_MTU - 28), count=2, interval=0.1)
        text2 = big2.stdout + big2.stderr
        assert received(big2) == 0 and {int(m) for m in re.findall(r"mtu ?= ?(\d+)", text2)} == {want}, text2
        assert counter(h1, "pyweave_sleeve_frag_needed_total") >= 1
        # Without DF the sleeve splits what does not fit.
        nodf = ping(c1, dst, "-M", "dont", "-s", str(CONTAINER_MTU - 28), count=3, interval=0.1)
        assert received(nodf) >= 2, nodf.stdout + nodf.stderr

        # Bulk TCP both ways still completes intact (TCP learns the MTU from the ICMP).
        tcp_stream(c1, c2, dst, 5_000_000, tb.hosts)
        tcp_stream(c2, c1, mesh.ip(h1), 5_000_000, tb.hosts)
        for host in tb.hosts:
            assert "Traceback" not in log_text(host)


# ---------------------------------------------------------------- restarts (last: they disturb the mesh)


PING_LINE = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [\d.]+: icmp_seq=(\d+)")


def reply_times(path: Path) -> list[float]:
    text = path.read_text() if path.exists() else ""
    return [float(m[1]) for m in map(PING_LINE.match, text.splitlines()) if m]


def test_router_restart_mid_stream(plain_mesh: Mesh) -> None:
    h1, h2, h3 = plain_mesh.up(3)
    hosts = [h1, h2, h3]
    c1, c2 = plain_mesh.container(h1), plain_mesh.container(h2)
    wait_ping(c1, plain_mesh.ip(h2), hosts)
    out = plain_mesh.tb.state_root / f"ping-{secrets.token_hex(3)}.log"
    argv = c1.exec_argv(["ping", "-n", "-D", "-O", "-i", "0.1", "-W", "1", plain_mesh.ip(h2)])

    def replies_after(t: float) -> bool:
        return any(ts > t for ts in reply_times(out))

    started = time.time()
    with open(out, "w") as f, background(argv, stdout=f, stderr=subprocess.STDOUT) as pinger:
        wait_for(lambda: replies_after(started), "the ping to get going", 10, hosts)

        # 1. `weave stop` on host2 (the pinged side), then launch it again with the same state.
        old_name = peer_name(h2)
        assert "stopped" in weave(h2, "stop")
        stopped = time.time()
        time.sleep(1.0)
        assert not replies_after(stopped + 0.5), "pings answered while the router was stopped"
        relaunched = time.time()
        plain_mesh.launch(h2, h1.address)
        wait_for(lambda: replies_after(relaunched), "traffic to resume after weave stop + launch", 30, hosts)
        print(f"weave stop + launch: traffic back {time.time() - relaunched:.1f} s after the launch began")
        assert peer_name(h2) == old_name, "the peer name must survive a restart"
        ps = weave(h2, "ps")
        assert c2.netns in ps and plain_mesh.ip(h2) in ps, ps

        # 2. host1 (the pinging side, which dialled nobody) crashes: SIGKILL, then launch again.
        pid = weaver_pid(h1)
        os.kill(pid, signal.SIGKILL)
        # Wait for the process to be reaped, not just dead: `weave launch` takes a zombie
        # for a running router (see the report; PID 1 here reaps orphans ~1 s late).
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the killed router to be reaped", 10, hosts)
        killed = time.time()
        time.sleep(1.0)
        assert not replies_after(killed + 0.5), "pings answered while the router was dead"
        relaunched = time.time()
        plain_mesh.launch(h1)
        wait_for(lambda: replies_after(relaunched + 0.5), "traffic to resume after a crash + launch", 30, hosts)
        print(f"SIGKILL + launch: traffic back {time.time() - relaunched:.1f} s after the launch began")
        wait_connected(hosts)
        pinger.send_signal(signal.SIGINT)
        pinger.wait(5)

    summary = out.read_text()
    assert re.search(r"\d+ packets transmitted, \d+ received", summary), summary[-500:]
    # After both restarts the link is whole again: a steady ping loses nothing.
    assert_pings(c1, plain_mesh.ip(h2), hosts)
    assert_pings(c2, plain_mesh.ip(h1), hosts)
    for host in hosts:
        assert "Traceback" not in log_text(host)
