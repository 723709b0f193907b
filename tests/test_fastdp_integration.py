"""fastdp with real routers and real traffic, in network namespaces (DESIGN.md §4, §9).

Routers are started the way a user starts them (`weave launch` in each test host's
namespace, with the host's own WEAVE_STATE_DIR), containers are namespaces plugged in
with `weave attach`, and the verdicts come from `weave status connections` /
`weave report` and from traffic between the containers (ping, iperf3). Faults are the
test bed's nftables rules and MTU changes in namespaces the test bed made; nothing is
sent outside them.

One three-host test bed is shared by the tests that leave it as they found it (every
one of them starts by waiting until every link is back on fastdp); the tests that stop,
kill or reconfigure routers get their own.

PYWEAVE_FASTDP_TIMES=FILE makes the failover test write its measured failover and
return times there as JSON (for the bench and the notes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router.testbed import Container, Host, Testbed, TestbedError, iperf3_end
from tests.routers import diagnostics, launch, log_text, router_test_marks, wait_for, weave

pytestmark = router_test_marks("ping", "iperf3")


CONVERGE = 20.0  # seconds a small mesh may take to form and confirm fastdp (it takes ~1 s)
FAILOVER_BUDGET = 3.0  # a blocked VXLAN path must be on the sleeve within this (seconds)
RETURN_BUDGET = 10.0  # and back on fastdp within this after the repair
PING_INTERVAL = 0.1
OVERLAY_MTU = 1376
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
SMALL_UNDERLAY_MTU = 1400  # < OVERLAY_MTU + VXLAN_OVERHEAD = 1426
CIDR_PREFIX = 12  # containers are 10.32.<host>.<n>/12
KERNEL_OBJECTS = ("vxlan-6784", "vethwe-pbr", "vethwe-probe")

SLEEVE_REASONS = (
    "fastdp heartbeats lost",
    "encrypted, untrusted",
    "peer is Weave Net",
    "fastdp off (--no-fastdp)",
    "fastdp not yet confirmed",
)


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Link:
    """One established connection as `weave report` shows it, keyed by the peer's nickname."""

    overlay: str  # "fastdp" or "sleeve"
    detail: str  # the reason for the sleeve ("" on fastdp)
    encrypted: bool
    mtu: int


_INFO_RE = re.compile(r"^(\S+) \S+\((\S+)\)$")


def links(host: Host) -> dict[str, Link]:
    """The established connections of `host`'s router, by peer nickname."""
    proc = host.run(["weave", "report"], check=False, timeout=20)
    if proc.returncode != 0:
        return {}
    out = {}
    for c in json.loads(proc.stdout)["Router"]["Connections"]:
        m = _INFO_RE.match(c.get("Info") or "")
        if c["State"] != "established" or m is None:
            continue
        attrs = c.get("Attrs") or {}
        out[m.group(2)] = Link(str(attrs.get("name", m.group(1))), str(attrs.get("detail", "")),
                               bool(attrs.get("encrypted")), int(attrs.get("mtu", 0)))
    return out


Expect = dict[tuple[str, str], str]  # (host, peer) -> "fastdp" / "sleeve"


def overlay_problems(hosts: list[Host], expect: Expect) -> list[str]:
    asked = [h for h in hosts if any(a == h.name for a, _ in expect)]
    with ThreadPoolExecutor(max_workers=len(asked) or 1) as pool:  # in parallel: less lag when timing
        seen = dict(zip([h.name for h in asked], pool.map(links, asked), strict=True))
    problems = []
    for (a, b), want in sorted(expect.items()):
        link = seen.get(a, {}).get(b)
        if link is None:
            problems.append(f"{a} has no established connection to {b}")
        elif link.overlay != want:
            problems.append(f"{a}->{b} is {link.overlay} ({link.detail}), not {want}")
    return problems


def wait_overlays(hosts: list[Host], expect: Expect, timeout: float = CONVERGE, what: str = "") -> float:
    """Wait until every (host, peer) link in `expect` uses the expected path; returns the time taken."""
    start = time.monotonic()
    last: list[str] = []

    def probe() -> bool:
        last[:] = overlay_problems(hosts, expect)
        return not last

    wait_for(probe, what or f"links {expect}", timeout, hosts, lambda: "\n".join(last))
    return time.monotonic() - start


def pairs(hosts: list[Host], overlay: str = "fastdp", *, except_for: Iterable[tuple[str, str]] = (),
          other: str = "sleeve") -> Expect:
    """Both directions of every pair of `hosts`: `overlay`, or `other` for the pairs in `except_for`."""
    odd = {frozenset(p) for p in except_for}
    return {(a.name, b.name): other if frozenset((a.name, b.name)) in odd else overlay
            for a in hosts for b in hosts if a is not b}


def container_ip(host: Host, n: int = 1) -> str:
    return f"10.32.{host.index}.{n}"


def attach(host: Host, name: str, n: int = 1) -> Container:
    c = host.add_container(name)
    out = weave(host, "attach", "-h", name, f"{container_ip(host, n)}/{CIDR_PREFIX}", c.netns)
    assert container_ip(host, n) in out, out
    return c


def ping(c: Container, address: str, count: int = 3, size: int | None = None,
         deadline: float = 5) -> subprocess.CompletedProcess[str]:
    argv = ["ping", "-n", "-c", str(count), "-i", "0.2", "-w", str(deadline)]
    if size is not None:
        argv += ["-s", str(size)]
    return c.run([*argv, address], check=False, timeout=deadline + 10)


def received(out: str) -> int:
    m = re.search(r"(\d+) (?:packets )?received", out)
    return int(m.group(1)) if m else 0


def fresh_ping(c: Container, address: str) -> tuple[bool, str]:
    """Forget every neighbour (so the first packet needs ARP, a broadcast), then ping."""
    c.run(["ip", "neigh", "flush", "all"], check=False)
    proc = ping(c, address, count=1, deadline=3)
    return received(proc.stdout) > 0, proc.stdout + proc.stderr


def ping_all_pairs(containers: dict[str, Container]) -> list[str]:
    """Fresh pings between the containers of every pair of hosts, both ways; the failures."""
    failures = []
    for a, ca in containers.items():
        for b, cb in containers.items():
            if a == b:
                continue
            ok, out = fresh_ping(ca, container_ip(cb.host))
            if not ok:
                failures.append(f"{a} -> {b}: {out.strip()}")
    return failures


def iperf3(client: Container, server: Container, *args: str, timeout: float = 60) -> dict[str, Any]:
    """One iperf3 TCP run (client -> one-shot server); the parsed `end` section."""
    address = container_ip(server.host)
    with server.iperf3_server(address):
        proc = client.run(["iperf3", "-c", address, "-J", *args], check=False, timeout=timeout)
    try:
        return iperf3_end(proc)
    except TestbedError as exc:
        pytest.fail(f"iperf3 {client.name} -> {server.name}: {exc}\n{diagnostics([client.host, server.host])}")


# A TCP sink: listens on argv[1]:argv[2], reads one connection to its end, answers with
# the byte count and SHA-256 of what it got.
SINK = r"""
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(float(sys.argv[3]))
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[3]))
h, n = hashlib.sha256(), 0
while data := conn.recv(1 << 16):
    h.update(data)
    n += len(data)
conn.sendall(f"{n} {h.hexdigest()}".encode())
conn.close()
"""

# A TCP source: sends argv[3] bytes (a fixed pattern) to argv[1]:argv[2], half-closes,
# prints the sink's answer and its own count and digest.
SOURCE = r"""
import hashlib, socket, sys, time
size, timeout = int(sys.argv[3]), float(sys.argv[4])
payload = (bytes(range(256)) * (size // 256 + 1))[:size]
for _ in range(50):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=timeout)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
s.settimeout(timeout)
start = time.monotonic()
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
answer = b""
while data := s.recv(256):
    answer += data
print(answer.decode(), size, hashlib.sha256(payload).hexdigest(), f"{time.monotonic() - start:.3f}")
"""


def tcp_transfer(client: Container, server: Container, size: int, timeout: float = 30) -> float:
    """Send `size` bytes over TCP from `client` to `server`; asserts all arrived intact; the seconds taken."""
    address, port = container_ip(server.host), "7777"
    sink = subprocess.Popen(server.exec_argv([sys.executable, "-c", SINK, address, port, str(timeout)]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.2)
        proc = client.run([sys.executable, "-c", SOURCE, address, port, str(size), str(timeout)], check=False,
                          timeout=timeout + 15)
    finally:
        if sink.poll() is None:
            sink.kill()
        sink_out = sink.communicate()[0]
    fields = proc.stdout.split()
    if proc.returncode != 0 or len(fields) != 5 or fields[:2] != fields[2:4]:
        pytest.fail(f"TCP transfer of {size} bytes {client.name} -> {server.name} failed:\n"
                    f"source: {proc.stdout}{proc.stderr}\nsink: {sink_out}\n"
                    f"{diagnostics([client.host, server.host])}")
    return float(fields[4])


def host_links(host: Host) -> set[str]:
    out = host.run(["ip", "-o", "link", "show"]).stdout
    return {line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def router_pid(host: Host) -> int:
    return int((host.state_dir / "weaver.pid").read_text().strip())


_LOG_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def switch_time(host: Host, peer: Host, event: str, after: float) -> float | None:
    """Wall-clock time of the first "overlay: <peer> <event>" line in `host`'s log after `after`."""
    for line in log_text(host).splitlines():
        m = _LOG_TIME_RE.match(line)
        if m is None or f"({peer.name}) {event}" not in line or "overlay:" not in line:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        if t >= after - 0.002:
            return t
    return None


class PingTrace:
    """`ping -i 0.1` from a container for a while; tells which sequence numbers were lost when."""

    def __init__(self, c: Container, address: str, interval: float = PING_INTERVAL) -> None:
        self.interval = interval
        self.started = time.time()
        self.proc = subprocess.Popen(c.exec_argv(["ping", "-n", "-D", "-i", str(interval), "-W", "1", address]),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = ""
        self.replies: dict[int, float] = {}  # icmp_seq -> wall-clock time of the reply
        self.sent = 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.output, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output, _ = self.proc.communicate()
        for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from \S+ icmp_seq=(\d+)", self.output, re.M):
            self.replies.setdefault(int(m.group(2)), float(m.group(1)))
        total = re.search(r"(\d+) packets transmitted", self.output)
        self.sent = int(total.group(1)) if total else max(self.replies, default=0)

    def lost(self) -> list[tuple[int, float]]:
        """(seq, approximate send time) of every unanswered echo, times from the neighbours' replies."""
        got = sorted(self.replies.items())
        if not got:
            return [(s, self.started + s * self.interval) for s in range(1, self.sent + 1)]
        out = []
        for seq in range(1, self.sent + 1):
            if seq in self.replies:
                continue
            before = [(s, t) for s, t in got if s < seq]
            s0, t0 = before[-1] if before else got[0]
            out.append((seq, t0 + (seq - s0) * self.interval))
        return out

    def longest_gap(self) -> float:
        """The longest run of consecutive lost echoes, in seconds."""
        best = run = 0
        for seq in range(1, self.sent + 1):
            run = run + 1 if seq not in self.replies else 0
            best = max(best, run)
        return best * self.interval


# ---------------------------------------------------------------- test beds


@dataclass
class Mesh:
    tb: Testbed
    hosts: list[Host]
    containers: dict[str, Container] = field(default_factory=dict)  # by host name

    def c(self, host: Host) -> Container:
        return self.containers[host.name]


def build_mesh(tb: Testbed, extra_args: dict[str, list[str]] | None = None,
               env: dict[str, dict[str, str]] | None = None) -> Mesh:
    """Launch a router on every host of `tb` (each told about host1) and attach one container each."""
    mesh = Mesh(tb, list(tb.hosts))
    first = mesh.hosts[0]
    for h in mesh.hosts:
        peers = [] if h is first else [first.address]
        launch(h, *(extra_args or {}).get(h.name, []), *peers, env=(env or {}).get(h.name))
    for h in mesh.hosts:
        mesh.containers[h.name] = attach(h, f"c{h.index}")
    return mesh


@pytest.fixture
def failure_logs(request: pytest.FixtureRequest) -> Iterator[list[Host]]:
    """Hosts whose router logs are printed (in the test's report) if the test fails."""
    hosts: list[Host] = []
    failed_before = request.session.testsfailed
    yield hosts
    if request.session.testsfailed > failed_before and hosts:
        print(diagnostics(hosts, lines=80))


@pytest.fixture
def testbed(failure_logs: list[Host]) -> Iterator[Callable[[int], Testbed]]:
    """Make a test bed of n hosts for this test only; closed (everything killed) afterwards."""
    beds: list[Testbed] = []

    def make(n: int) -> Testbed:
        tb = Testbed(n)
        beds.append(tb)
        failure_logs.extend(tb.hosts)
        return tb

    yield make
    for tb in beds:
        tb.close()
        assert not tb.cleanup_errors, tb.cleanup_errors


@pytest.fixture(scope="module")
def shared_mesh() -> Iterator[Mesh]:
    tb = Testbed(3)
    try:
        mesh = build_mesh(tb)
        yield mesh
    finally:
        tb.close()


def underlay_mtus(tb: Testbed, host: Host) -> tuple[int, int]:
    """The MTU of `host`'s underlay veth: (its end in the host, its end on the switch)."""
    inner = host.run(["cat", f"/sys/class/net/{host.interface}/mtu"]).stdout.strip()
    outer = subprocess.run(["ip", "netns", "exec", tb.switch_netns, "cat", f"/sys/class/net/{host.netns}/mtu"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return int(inner), int(outer)


def set_switch_mtu(tb: Testbed, host: Host, mtu: int) -> None:
    """Lower (or restore) the MTU of the switch's port towards `host` only: the host keeps
    its 1500, so larger frames vanish in the switch without any ICMP (an L2 blackhole)."""
    subprocess.run(["ip", "-n", tb.switch_netns, "link", "set", host.netns, "mtu", str(mtu)], check=True)


@pytest.fixture
def mesh3(shared_mesh: Mesh, failure_logs: list[Host]) -> Mesh:
    """The shared three-host mesh, with no faults and every link on fastdp."""
    tb = shared_mesh.tb
    failure_logs.extend(shared_mesh.hosts)
    if tb.active_faults():
        tb.heal_all()
    for h in shared_mesh.hosts:
        if underlay_mtus(tb, h) != (1500, 1500):
            tb.set_mtu(h, 1500)
    wait_overlays(shared_mesh.hosts, pairs(shared_mesh.hosts), timeout=30,
                  what="every link of the shared mesh on fastdp")
    return shared_mesh


# ---------------------------------------------------------------- tests


STATUS_FASTDP_RE = r"established\s+fastdp \S+\({peer}\)\s+unencrypted mtu={mtu}"
STATUS_SLEEVE_RE = r"established\s+sleeve \S+\({peer}\) \((.+?)\)\s+unencrypted mtu=\d+"


def test_three_hosts_on_fastdp_carry_traffic(mesh3: Mesh) -> None:
    h1, h2, h3 = mesh3.hosts
    for h in mesh3.hosts:
        status = weave(h, "status", "connections")
        for peer in mesh3.hosts:
            if peer is not h:
                assert re.search(STATUS_FASTDP_RE.format(peer=peer.name, mtu=OVERLAY_MTU), status), status
        assert "sleeve" not in status, status
        # The kernel carries each peer: one all-zero FDB entry per peer on vxlan-6784.
        fdb = h.run(["bridge", "fdb", "show", "dev", "vxlan-6784"]).stdout
        for peer in mesh3.hosts:
            if peer is not h:
                assert re.search(rf"00:00:00:00:00:00 dst {re.escape(peer.address)}\b", fdb), fdb

    failures = ping_all_pairs(mesh3.containers)
    assert not failures, "\n".join(failures)

    end = iperf3(mesh3.c(h1), mesh3.c(h2), "-t", "2")
    gbit = end["sum_received"]["bits_per_second"] / 1e9
    print(f"iperf3 host1 -> host2 over fastdp: {gbit:.2f} Gbit/s")
    assert end["sum_received"]["bytes"] > 0
    # Traffic really went through the kernel: the VXLAN device moved it, the sleeve did not.
    stats = json.loads(h1.run(["ip", "-j", "-s", "link", "show", "vxlan-6784"]).stdout)[0]["stats64"]
    assert stats["tx"]["bytes"] > 0.8 * end["sum_sent"]["bytes"], stats
    assert links(h3) == {"host1": Link("fastdp", "", False, OVERLAY_MTU), "host2": Link("fastdp", "", False,
                                                                                       OVERLAY_MTU)}


def test_two_hosts_fastdp_stop_cleans_up_and_restart_returns(testbed: Callable[[int], Testbed]) -> None:
    tb = testbed(2)
    mesh = build_mesh(tb)
    h1, h2 = mesh.hosts
    wait_overlays(mesh.hosts, pairs(mesh.hosts), what="host1 <-> host2 on fastdp")
    ok, out = fresh_ping(mesh.c(h1), container_ip(h2))
    assert ok, out
    end = iperf3(mesh.c(h2), mesh.c(h1), "-t", "1")
    assert end["sum_received"]["bytes"] > 0

    # `weave stop` removes what fastdp made in the kernel; the bridge stays (as in Weave).
    assert set(KERNEL_OBJECTS) <= host_links(h2)
    allowed = h2.run(["nft", "list", "set", "inet", "pyweave_fastdp", "peers"]).stdout
    assert h1.address in allowed, allowed
    assert "weave router stopped" in weave(h2, "stop")
    left = host_links(h2)
    assert not set(KERNEL_OBJECTS) & left, f"left behind after weave stop: {sorted(left)}"
    # ... and the source filter on UDP 6784 (fastdp.srcfilter) went with it.
    assert h2.run(["nft", "list", "table", "inet", "pyweave_fastdp"], check=False).returncode != 0
    assert "weave" in left
    assert "vethwe-sleeve" not in left
    wait_for(lambda: "host2" not in links(h1), "host1 to drop host2", 15, mesh.hosts)

    # Relaunched with the same state dir: fastdp comes back, the container still reachable.
    launch(h2, h1.address)
    took = wait_overlays(mesh.hosts, pairs(mesh.hosts), what="fastdp back after weave stop + launch")
    print(f"fastdp back {took:.1f} s after the relaunch (weave stop + weave launch)")
    ok, out = fresh_ping(mesh.c(h1), container_ip(h2))
    assert ok, out

    # A crash (SIGKILL) leaves the kernel objects behind; a new router takes them over.
    pid = router_pid(h2)
    os.kill(pid, signal.SIGKILL)
    # (until it is reaped, not just a zombie: `weave launch` refuses while the pid exists)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the killed router to be reaped", 15, mesh.hosts)
    assert set(KERNEL_OBJECTS) <= host_links(h2)
    launch(h2, h1.address)
    took = wait_overlays(mesh.hosts, pairs(mesh.hosts), what="fastdp back after a crash and relaunch")
    print(f"fastdp back {took:.1f} s after the relaunch (SIGKILL + weave launch)")
    for a, b in ((h1, h2), (h2, h1)):
        ok, out = fresh_ping(mesh.c(a), container_ip(b))
        assert ok, out
    assert "weave router stopped" in weave(h2, "stop")
    assert not set(KERNEL_OBJECTS) & host_links(h2)


def test_blocked_vxlan_port_fails_over_to_sleeve_and_back(mesh3: Mesh) -> None:
    tb = mesh3.tb
    h1, h2, h3 = mesh3.hosts
    trace = PingTrace(mesh3.c(h1), container_ip(h2))
    try:
        time.sleep(1.0)  # some clean pings first
        blocked_at = time.time()
        tb.block(h1, h2, "udp", 6784)
        failover = wait_overlays([h1, h2], {("host1", "host2"): "sleeve", ("host2", "host1"): "sleeve"},
                                 timeout=FAILOVER_BUDGET + 7, what="host1 <-> host2 on the sleeve")
        on_sleeve_at = time.time()
        # While the pair is on the sleeve, the mesh is mixed: the other links stay on fastdp
        # and every pair of containers reaches each other, ARP broadcasts included.
        mixed = pairs(mesh3.hosts, except_for=[("host1", "host2")])
        assert not overlay_problems(mesh3.hosts, mixed), overlay_problems(mesh3.hosts, mixed)
        for a, b in ((h1, h2), (h2, h1)):
            link = links(a)[b.name]
            assert link.detail.startswith("fastdp heartbeats lost"), link
            status = weave(a, "status", "connections")
            m = re.search(STATUS_SLEEVE_RE.format(peer=b.name), status)
            assert m and re.fullmatch(r"fastdp heartbeats lost \d+ s ago", m.group(1)), status
        failures = ping_all_pairs(mesh3.containers)
        assert not failures, "\n".join(failures)
        time.sleep(1.0)  # ping keeps going over the sleeve

        unblocked_at = time.time()
        tb.unblock(h1, h2, "udp", 6784)
        back = wait_overlays(mesh3.hosts, pairs(mesh3.hosts), timeout=RETURN_BUDGET + 10,
                             what="host1 <-> host2 back on fastdp")
        back_at = time.time()
        time.sleep(1.0)  # and over fastdp again
    finally:
        trace.stop()
        tb.heal_all()

    lost = trace.lost()
    during_failover = [s for s, t in lost if blocked_at - 0.2 <= t <= on_sleeve_at + 0.3]
    around_return = [s for s, t in lost if unblocked_at - 0.2 <= t <= back_at + 0.5]
    elsewhere = [s for s, t in lost if s not in during_failover and s not in around_return]
    # When the routers themselves switched, from their logs (status polling adds its lag).
    switched = [t for a, b in ((h1, h2), (h2, h1)) if (t := switch_time(a, b, "back on sleeve", blocked_at))]
    returned = [t for a, b in ((h1, h2), (h2, h1)) if (t := switch_time(a, b, "on fastdp", unblocked_at))]
    times = {
        "failover_s": round(failover, 3),
        "return_s": round(back, 3),
        "failover_router_s": round(max(switched) - blocked_at, 3) if len(switched) == 2 else None,
        "return_router_s": round(max(returned) - unblocked_at, 3) if len(returned) == 2 else None,
        "ping_interval_s": PING_INTERVAL,
        "ping_sent": trace.sent,
        "ping_lost": len(lost),
        "ping_lost_during_failover": len(during_failover),
        "ping_lost_around_return": len(around_return),
        "ping_lost_elsewhere": len(elsewhere),
        "ping_longest_gap_s": round(trace.longest_gap(), 3),
    }
    print("fastdp failover/return:", json.dumps(times))
    if path := os.environ.get("PYWEAVE_FASTDP_TIMES"):
        Path(path).write_text(json.dumps(times, indent=2) + "\n")

    assert failover <= FAILOVER_BUDGET, f"failover took {failover:.2f} s ({times})"
    assert back <= RETURN_BUDGET, f"return to fastdp took {back:.2f} s ({times})"
    assert trace.sent >= 30, trace.output[-2000:]
    # The only outage is the detection window (the kernel path is blackholed until the
    # heartbeats are declared lost); handing over and back loses at most a few echoes.
    assert trace.longest_gap() <= FAILOVER_BUDGET, times
    assert len(lost) <= FAILOVER_BUDGET / PING_INTERVAL + 5, (times, lost)
    assert len(around_return) <= 3, (times, around_return)
    assert len(elsewhere) <= 3, (times, elsewhere, trace.output[-3000:])


def test_blocked_vxlan_port_loses_at_most_a_few_pings(mesh3: Mesh) -> None:
    # Another pair than the failover test's, so the flap damping of that pair does not apply.
    tb = mesh3.tb
    h1, h2, h3 = mesh3.hosts
    trace = PingTrace(mesh3.c(h2), container_ip(h3))
    try:
        time.sleep(0.5)
        tb.block(h2, h3, "udp", 6784)
        wait_overlays([h2, h3], {("host2", "host3"): "sleeve", ("host3", "host2"): "sleeve"},
                      timeout=FAILOVER_BUDGET + 7, what="host2 <-> host3 on the sleeve")
        time.sleep(0.5)
        tb.unblock(h2, h3, "udp", 6784)
        wait_overlays(mesh3.hosts, pairs(mesh3.hosts), timeout=RETURN_BUDGET + 10,
                      what="host2 <-> host3 back on fastdp")
        time.sleep(0.5)
    finally:
        trace.stop()
        tb.heal_all()
    lost = trace.lost()
    print(f"host2 <-> host3 block/unblock: {len(lost)} of {trace.sent} echoes lost, "
          f"longest gap {trace.longest_gap():.1f} s")
    # fastdp declares the path dead 0.9 s after its last heartbeat (HealthConfig.timeout);
    # the kernel sends into the blocked tunnel until then: about a second of echoes at -i 0.1,
    # one at ping's default interval.
    assert trace.longest_gap() <= 1.5 and len(lost) <= 15, (
        f"{len(lost)} of {trace.sent} echoes lost (longest gap {trace.longest_gap():.1f} s)"
    )


def test_small_underlay_mtu_falls_back_to_sleeve_without_blackhole(mesh3: Mesh) -> None:
    tb = mesh3.tb
    h1, h2, h3 = mesh3.hosts
    c1, c3 = mesh3.c(h1), mesh3.c(h3)
    try:
        tb.set_mtu(h3, SMALL_UNDERLAY_MTU)
        took = wait_overlays(mesh3.hosts, pairs(mesh3.hosts, except_for=[("host1", "host3"), ("host2", "host3")]),
                             timeout=FAILOVER_BUDGET + 7, what="host3's links on the sleeve (underlay MTU 1400)")
        print(f"links over a {SMALL_UNDERLAY_MTU}-byte underlay left fastdp after {took:.1f} s")
        for a, b in ((h1, h3), (h3, h1), (h2, h3), (h3, h2)):
            link = links(a)[b.name]
            assert link.overlay == "sleeve" and link.detail, link
        # They stay there: full-size heartbeats cannot cross, so fastdp never comes back.
        time.sleep(4.0)
        problems = overlay_problems(mesh3.hosts, pairs(mesh3.hosts, except_for=[("host1", "host3"),
                                                                               ("host2", "host3")]))
        assert not problems, problems

        # No blackhole: large packets get through, in both directions.
        for src, dst in ((c1, c3), (c3, c1)):
            took = tcp_transfer(src, dst, 5 * 2**20)
            print(f"5 MB {src.name} -> {dst.name} over the sleeve (underlay MTU {SMALL_UNDERLAY_MTU}): {took:.2f} s")
            _check_large_packets(src, dst)
        failures = ping_all_pairs(mesh3.containers)
        assert not failures, "\n".join(failures)
    finally:
        tb.set_mtu(h3, 1500)
    took = wait_overlays(mesh3.hosts, pairs(mesh3.hosts), timeout=RETURN_BUDGET + 10,
                         what="fastdp back once the underlay MTU is 1500 again")
    print(f"fastdp back {took:.1f} s after the underlay MTU was restored")


def test_password_keeps_traffic_on_encrypted_sleeve(testbed: Callable[[int], Testbed]) -> None:
    tb = testbed(2)
    mesh = build_mesh(tb, extra_args={h.name: ["--password", "fastdp-test-secret"] for h in tb.hosts})
    h1, h2 = mesh.hosts
    wait_overlays(mesh.hosts, pairs(mesh.hosts, "sleeve"), what="an encrypted sleeve link")
    time.sleep(1.0)  # fastdp would have been confirmed by now: it must not even be tried
    for a, b in ((h1, h2), (h2, h1)):
        assert links(a)[b.name] == Link("sleeve", "encrypted, untrusted", True, links(a)[b.name].mtu)
        status = weave(a, "status", "connections")
        assert re.search(rf"established\s+sleeve \S+\({b.name}\) \(encrypted, untrusted\)\s+encrypted\s+mtu=\d+",
                         status), status
        # The kernel carries nothing for the peer: no FDB entry towards it.
        fdb = a.run(["bridge", "fdb", "show", "dev", "vxlan-6784"], check=False).stdout
        assert b.address not in fdb, fdb
    for a, b in ((h1, h2), (h2, h1)):
        ok, out = fresh_ping(mesh.c(a), container_ip(b))
        assert ok, out
    tcp_transfer(mesh.c(h1), mesh.c(h2), 2 * 2**20)


def test_mixed_mesh_with_fastdp_off_on_some_routers(testbed: Callable[[int], Testbed]) -> None:
    tb = testbed(4)
    mesh = build_mesh(tb, extra_args={"host3": ["--no-fastdp"]}, env={"host4": {"WEAVE_NO_FASTDP": "1"}})
    h1, h2, h3, h4 = mesh.hosts
    sleeve_pairs = [(a, b) for a in ("host1", "host2", "host3", "host4") for b in ("host3", "host4") if a != b]
    wait_overlays(mesh.hosts, pairs(mesh.hosts, except_for=sleeve_pairs), what="the mixed mesh")
    # A router told not to use fastdp makes no kernel VXLAN objects and says why.
    for h in (h3, h4):
        assert not set(KERNEL_OBJECTS) & host_links(h), host_links(h)
        for peer, link in links(h).items():
            assert link == Link("sleeve", "fastdp off (--no-fastdp)", False, link.mtu), (h.name, peer, link)
    for h in (h1, h2):
        for peer in ("host3", "host4"):
            link = links(h)[peer]
            assert link.overlay == "sleeve" and link.detail, (h.name, peer, link)
            assert any(link.detail.startswith(r) for r in SLEEVE_REASONS) or "vxlan" in link.detail, link
    status = weave(h3, "status", "connections")
    for peer in ("host1", "host2", "host4"):
        m = re.search(STATUS_SLEEVE_RE.format(peer=peer), status)
        assert m and m.group(1) == "fastdp off (--no-fastdp)", status
    assert re.search(STATUS_FASTDP_RE.format(peer="host2", mtu=OVERLAY_MTU), weave(h1, "status", "connections"))

    failures = ping_all_pairs(mesh.containers)
    assert not failures, "\n".join(failures)
    # Nothing is delivered twice in a mixed mesh.
    for b in (h2, h3, h4):
        proc = ping(mesh.c(h1), container_ip(b), count=5, deadline=5)
        assert received(proc.stdout) == 5 and "DUP" not in proc.stdout, proc.stdout


def _check_large_packets(a: Container, b: Container, sizes: Iterable[int] = (1300, 1348)) -> None:
    """Pings up to the overlay MTU (1348 + 28 = 1376) are answered, after a frag-needed at most."""
    for size in sizes:
        proc = ping(a, container_ip(b.host), count=4, size=size, deadline=5)
        first = proc.stdout + proc.stderr
        if received(first) > 0:
            continue
        assert re.search(r"Frag needed|mtu", first, re.I), f"ping -s {size} {a.name} -> {b.name}: {first}"
        proc = ping(a, container_ip(b.host), count=3, size=size, deadline=4)
        assert received(proc.stdout) > 0, f"ping -s {size} after frag-needed: {first}\n{proc.stdout}"


def test_small_switch_mtu_from_the_start_keeps_link_on_sleeve(testbed: Callable[[int], Testbed]) -> None:
    tb = testbed(2)
    h1, h2 = tb.hosts
    set_switch_mtu(tb, h2, SMALL_UNDERLAY_MTU)  # before the routers start
    mesh = build_mesh(tb)
    c1, c2 = mesh.c(h1), mesh.c(h2)
    sleeve = pairs(mesh.hosts, "sleeve")

    # Full-size heartbeats never cross, so fastdp is never confirmed; the sleeve finds the
    # path MTU with its probes and says so.
    def settled() -> dict[str, Link] | None:
        assert not overlay_problems(mesh.hosts, sleeve), overlay_problems(mesh.hosts, sleeve)
        seen = {"host1": links(h1).get("host2"), "host2": links(h2).get("host1")}
        ok = all(link is not None and "not confirmed" in link.detail
                 and link.mtu <= SMALL_UNDERLAY_MTU - 28 for link in seen.values())
        return seen if ok else None  # type: ignore[return-value]

    seen = wait_for(settled, "fastdp given up and the sleeve MTU below the 1400-byte path", 40, mesh.hosts)
    print(f"sleeve MTU over a {SMALL_UNDERLAY_MTU}-byte switch port: {seen}")
    for a, b in ((c1, c2), (c2, c1)):
        took = tcp_transfer(a, b, 5 * 2**20)
        print(f"5 MB {a.name} -> {b.name} over the sleeve: {took:.2f} s")
        _check_large_packets(a, b)
    assert not overlay_problems(mesh.hosts, sleeve)


def test_switch_mtu_shrinking_under_a_live_link_does_not_blackhole(mesh3: Mesh) -> None:
    tb = mesh3.tb
    h1, h2, h3 = mesh3.hosts
    c1, c3 = mesh3.c(h1), mesh3.c(h3)
    try:
        set_switch_mtu(tb, h3, SMALL_UNDERLAY_MTU)
        wait_overlays(mesh3.hosts, pairs(mesh3.hosts, except_for=[("host1", "host3"), ("host2", "host3")]),
                      timeout=FAILOVER_BUDGET + 7, what="host3's links on the sleeve (switch port MTU 1400)")
        # The fallback makes the sleeve probe its MTU again: it finds the shrunk path.
        limit = SMALL_UNDERLAY_MTU - 62  # UDP/IP 28, sleeve packet and frame headers 34

        def link_mtu(host: Host, peer: str) -> int:
            for line in weave(host, "status", "connections").splitlines():
                if f"({peer})" in line:
                    return int(re.findall(r"mtu=(\d+)", line)[0])
            return 0

        deadline = time.monotonic() + 15
        while not (link_mtu(h1, "host3") <= limit and link_mtu(h3, "host1") <= limit):
            assert time.monotonic() < deadline, f"sleeve MTU not lowered below {limit}"
            time.sleep(0.3)
        for a, b in ((c1, c3), (c3, c1)):
            tcp_transfer(a, b, 5 * 2**20, timeout=10)
            _check_large_packets(a, b)
    finally:
        set_switch_mtu(tb, h3, 1500)
