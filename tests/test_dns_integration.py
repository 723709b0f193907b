"""weaveDNS end to end: real routers in network namespaces, real `dig` in real containers.

One three-host mesh is shared by every test in this module (building it takes a few
seconds): each router is launched the way a user does (`weave launch` inside the host's
namespace, its own WEAVE_STATE_DIR) with ``--resolv-conf`` pointing at a file the test
writes, which lists only a resolver on the loopback of the host namespaces
(``127.0.0.77``); the one test that needs an answer from it runs a tiny dnslib
responder there. Containers are namespaces attached with ``weave attach`` (no IPAM:
addresses are given), so their /etc/netns/NAME/resolv.conf points at weaveDNS on
169.254.53.1 and ``ip netns exec NAME dig web`` works. Each test uses names of its own,
so the tests do not depend on one another's order. Nothing leaves the namespaces the
test bed creates.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from router.testbed import Container, Host, Testbed
from tests.routers import diagnostics, log_text, router_test_marks, wait_for, weave

pytestmark = router_test_marks("dig")

REPO = Path(__file__).resolve().parents[1]
DNS_ADDRESS = "169.254.53.1"
DOMAIN = "weave.local."
UPSTREAM = "127.0.0.77"  # the "host's resolver": loopback of each host namespace
FALLBACK_TIMEOUT = 1.0  # --dns-fallback-timeout



# ---------------------------------------------------------------- helpers


def dig(ns: Host | Container, *args: str) -> str:
    """`dig` inside `ns` (a container uses its /etc/netns resolv.conf, i.e. weaveDNS)."""
    return ns.run(["dig", "+time=3", "+tries=1", *args], timeout=30).stdout


def dig_short(ns: Host | Container, *args: str) -> list[str]:
    return [line for line in dig(ns, "+short", *args).splitlines() if line.strip()]


def status_of(dig_output: str) -> str:
    m = re.search(r"status: (\w+)", dig_output)
    assert m, f"no reply header in dig output:\n{dig_output}"
    return m.group(1)


def flags_of(dig_output: str) -> set[str]:
    m = re.search(r";; flags: ([a-z ]+);", dig_output)
    assert m, f"no flags in dig output:\n{dig_output}"
    return set(m.group(1).split())


def answer_count(dig_output: str) -> int:
    m = re.search(r"ANSWER: (\d+)", dig_output)
    assert m, dig_output
    return int(m.group(1))


def a_records(dig_output: str) -> list[str]:
    return re.findall(r"\sIN\s+A\s+(\d+\.\d+\.\d+\.\d+)", dig_output)


def query_time_ms(dig_output: str) -> int:
    m = re.search(r"Query time: (\d+) msec", dig_output)
    assert m, dig_output
    return int(m.group(1))


def router_pid(host: Host) -> int:
    return int((host.state_dir / "weaver.pid").read_text().strip())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# A poller run inside a container: asks the nameserver of /etc/resolv.conf (weaveDNS) for
# argv[1] every few ms until the answer matches argv[2] ("A=<ip>" or "NXDOMAIN"), then
# prints {"t": CLOCK_MONOTONIC at that answer, ...}. The first line, "ready <rcode>", comes
# after the first answer, so the caller knows the server was reachable before the change.
POLLER = r"""
import json, socket, sys, time
from dnslib import QTYPE, RCODE, DNSRecord
name, want, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
server = next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.1)
deadline = time.monotonic() + limit
first = None
n = 0
while time.monotonic() < deadline:
    q = DNSRecord.question(name, "A")
    n += 1
    s.sendto(q.pack(), (server, 53))
    try:
        r = DNSRecord.parse(s.recv(4096))
    except (socket.timeout, OSError):
        continue
    t = time.monotonic()
    if r.header.id != q.header.id:
        continue
    rcode = RCODE.get(r.header.rcode)
    addrs = sorted(str(rr.rdata) for rr in r.rr if rr.rtype == QTYPE.A)
    if first is None:
        first = rcode
        print("ready", rcode, flush=True)
    if (want == "NXDOMAIN" and rcode == "NXDOMAIN") or (want.startswith("A=") and want[2:] in addrs):
        print(json.dumps({"t": t, "first": first, "queries": n, "rcode": rcode, "addrs": addrs}), flush=True)
        sys.exit(0)
    time.sleep(0.005)
print(json.dumps({"t": None, "first": first, "queries": n}), flush=True)
sys.exit(1)
"""

# PUT /name/{container}/{ip}?fqdn=... on the local router; prints CLOCK_MONOTONIC taken
# just before the request went out.
PUT_NAME = r"""
import sys, time, urllib.request
container, ip, fqdn = sys.argv[1:4]
req = urllib.request.Request(f"http://127.0.0.1:6784/name/{container}/{ip}?fqdn={fqdn}", method="PUT", data=b"")
t = time.monotonic()
with urllib.request.urlopen(req, timeout=10) as resp:
    assert resp.status == 204, resp.status
print(t)
"""

# The "host's resolver": answers every A question with 192.0.2.77 (argv[2] == "answer"),
# or reads queries and never answers ("silent"). Logs each question it sees.
RESOLVER = r"""
import socket, sys
from dnslib import QTYPE, RR, A, DNSRecord
addr, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, 53))
print("ready", mode, flush=True)
while True:
    data, peer = s.recvfrom(4096)
    try:
        q = DNSRecord.parse(data)
    except Exception as exc:
        print("unparsable", exc, flush=True)
        continue
    print("query", q.q.qname, QTYPE.get(q.q.qtype), flush=True)
    if mode == "answer":
        r = q.reply(aa=0)
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.77"), ttl=30))
        s.sendto(r.pack(), peer)
"""

# Bad input for weaveDNS, sent from inside a container to argv[1]:53. Prints one JSON
# object: for each case the reply (hex) or null, and for TCP whether the server closed.
ABUSE = r"""
import json, random, socket, struct, sys
server = sys.argv[1]
rng = random.Random(6753)
out = {"udp": [], "tcp": []}

def question(name, qtype=1):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0" + struct.pack("!HH", qtype, 1)

def header(qid, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)

def udp(case, payload, wait=0.4):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(wait)
    s.sendto(payload, (server, 53))
    try:
        data = s.recv(65535).hex()
    except socket.timeout:
        data = None
    s.close()
    out["udp"].append({"case": case, "sent": payload.hex(), "reply": data})

def tcp(case, payload, shut=True):
    s = socket.create_connection((server, 53), timeout=3)
    s.sendall(payload)
    if shut:
        s.shutdown(socket.SHUT_WR)
    buf = b""
    closed = False
    try:
        while True:
            chunk = s.recv(65535)
            if not chunk:
                closed = True
                break
            buf += chunk
            if len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                break
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
    s.close()
    out["tcp"].append({"case": case, "sent": payload.hex(), "reply": buf.hex(), "closed": closed})

for i in range(30):
    udp(f"random-{i}", rng.randbytes(rng.randint(1, 300)), wait=0.15)
udp("empty", b"")
udp("short-header", b"\x12\x34\x01\x00\x00")
udp("zero-questions", header(0x1111, qd=0))
udp("two-questions", header(0x2222, qd=2) + question("web.weave.local") + question("db.weave.local"))
udp("cut-question", header(0x3333) + b"\x03we")
udp("bad-label", header(0x4444) + b"\xff" + rng.randbytes(20))
udp("three-answers", header(0x5555, an=3) + question("web.weave.local"))
udp("response", header(0x6666, flags=0x8180) + question("web.weave.local"), wait=0.3)
# A burst that nobody waits for.
burst = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(300):
    burst.sendto(rng.randbytes(rng.randint(0, 512)), (server, 53))
burst.close()

def framed(msg):
    return struct.pack("!H", len(msg)) + msg

tcp("random-framed", framed(rng.randbytes(40)))
tcp("zero-questions", framed(header(0x7777, qd=0)))
tcp("two-questions", framed(header(0x8888, qd=2) + question("web.weave.local") + question("db.weave.local")))
tcp("http-junk", b"GET / HTTP/1.0\r\nHost: weave\r\n\r\n" + rng.randbytes(64))
tcp("short-frame", struct.pack("!H", 100) + b"0123456789")
tcp("empty-frame", framed(b""))
tcp("random-unframed", rng.randbytes(2000))
print(json.dumps(out))
"""


def popen_in(ns: Container, argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ns.exec_argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return ""
    return proc.stdout.readline()


@dataclass
class Poller:
    container: Container
    proc: subprocess.Popen[str]

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines, f"poller in {self.container} printed nothing useful: {out!r} {err!r}"
        return dict(json.loads(lines[-1]))


def start_pollers(containers: list[Container], name: str, want: str, limit: float,
                  ready_rcode: str) -> list[Poller]:
    """Pollers that have each had one answer (with rcode `ready_rcode`) before this returns."""
    pollers = []
    try:
        for c in containers:
            proc = popen_in(c, [sys.executable, "-c", POLLER, name, want, str(limit)])
            pollers.append(Poller(c, proc))
        for p in pollers:
            line = read_line(p.proc, 10)
            assert line.split() == ["ready", ready_rcode], (
                f"poller in {p.container}: {line!r} {p.proc.stderr.read() if p.proc.poll() is not None else ''}"
            )
    except BaseException:
        for p in pollers:
            p.proc.kill()
            p.proc.wait()
        raise
    return pollers


@dataclass
class Mesh:
    tb: Testbed
    hosts: list[Host]
    peer_names: dict[str, str]
    clients: dict[str, Container]  # host name -> a client container on that host
    web: Container  # on host1, "web", 10.32.1.1
    db: list[Container]  # on host1 and host2, both "db"
    resolv_conf: Path
    addresses: dict[str, str] = field(default_factory=dict)  # container netns -> IP


def attach(host: Host, cidr: str, container: Container, hostname: str = "") -> None:
    args = ["attach", *(["-h", hostname] if hostname else []), cidr, container.netns]
    out = weave(host, *args)
    assert out.strip() == cidr, out


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    tb = Testbed(3)
    try:
        h1, h2, h3 = tb.hosts
        resolv_conf = tb.state_root / "host-resolv.conf"
        resolv_conf.write_text(f"# the test's upstream resolver (loopback of each host netns)\nnameserver {UPSTREAM}\n")
        common = [
            "--ipalloc-range", "", "--resolv-conf", str(resolv_conf),
            "--dns-fallback-timeout", str(FALLBACK_TIMEOUT),
        ]
        for h, peers in ((h1, []), (h2, [h1.address]), (h3, [h1.address])):
            out = weave(h, "launch", "--nickname", h.name, *common, *peers)
            assert "weave router started" in out, out

        def meshed() -> dict[str, str] | None:
            reps = {h.name: json.loads(weave(h, "report"))["Router"] for h in tb.hosts}
            if any(len(r["Peers"]) != 3 for r in reps.values()):
                return None
            if any(len([c for c in r["Connections"] if c["State"] == "established"]) != 2 for r in reps.values()):
                return None
            return {name: r["Name"] for name, r in reps.items()}

        peer_names = wait_for(meshed, "a full mesh of 3", hosts=tb.hosts)
        web = h1.add_container("web")
        attach(h1, "10.32.1.1/12", web, "web")
        db = [h1.add_container("db"), h2.add_container("db")]
        attach(h1, "10.32.1.2/12", db[0], "db")
        attach(h2, "10.32.2.2/12", db[1], "db")
        clients = {}
        for i, h in enumerate(tb.hosts, 1):
            c = h.add_container("client")
            attach(h, f"10.32.{i}.100/12", c)
            clients[h.name] = c
        m = Mesh(tb, tb.hosts, peer_names, clients, web, db, resolv_conf)
        m.addresses = {web.netns: "10.32.1.1", db[0].netns: "10.32.1.2", db[1].netns: "10.32.2.2"}
        yield m
    finally:
        tb.close()
        assert not tb.cleanup_errors, tb.cleanup_errors


def assert_removed_everywhere(
    clients: list[Container], fqdn: str, remove: Callable[[], object], what: str
) -> None:
    """Run `remove` (a command) while every client polls `fqdn`, and check it turns
    NXDOMAIN everywhere within 2 s of the command's end."""
    pollers = start_pollers(clients, fqdn, "NXDOMAIN", 10, "NOERROR")
    try:
        t0 = time.monotonic()
        remove()
        took = time.monotonic() - t0
        results = [p.result(timeout=15) for p in pollers]
    finally:
        for p in pollers:
            p.proc.kill()
            p.proc.wait()
    delays = [r["t"] - t0 if r["t"] is not None else None for r in results]
    shown = [f"{d * 1000:.0f} ms" if d is not None else d for d in delays]
    print(f"\n{what} -> NXDOMAIN on host1..3: {shown} (from the command's start; it took {took * 1000:.0f} ms)")
    # The removal happens somewhere inside the command: NXDOMAIN everywhere within 2 s of its end.
    assert all(d is not None and d - took < 2.0 for d in delays), (delays, took, results)


def wait_resolves(m: Mesh, c: Container, name: str, expected: set[str], *args: str) -> list[str]:
    def probe() -> list[str] | None:
        got = dig_short(c, *args, name)
        return got if set(got) == expected else None

    return wait_for(probe, f"{name} -> {sorted(expected)} in {c}", hosts=m.hosts)


# ---------------------------------------------------------------- tests


def test_attached_container_resolves_and_container_resolv_conf(mesh: Mesh) -> None:
    client3 = mesh.clients["host3"]
    text = Path(f"/etc/netns/{client3.netns}/resolv.conf").read_text()
    assert f"nameserver {DNS_ADDRESS}" in text and "search weave.local" in text, text
    # The route and the permanent neighbour entry `weave attach` adds for the DNS address.
    assert f"{DNS_ADDRESS} dev ethwe" in client3.run(["ip", "route"]).stdout
    assert "PERMANENT" in client3.run(["ip", "neigh", "show", DNS_ADDRESS]).stdout
    # A name registered on host1 by `weave attach -h web`, asked from a container on host3.
    wait_resolves(mesh, client3, "web", {"10.32.1.1"})
    out = dig(client3, "web.weave.local")
    assert status_of(out) == "NOERROR"
    assert {"qr", "aa", "ra"} <= flags_of(out), out
    assert a_records(out) == ["10.32.1.1"]
    assert re.search(r"web\.weave\.local\.\s+1\s+IN\s+A", out), "TTL must be --dns-ttl (1 s)\n" + out
    assert f"SERVER: {DNS_ADDRESS}#53" in out
    # An unknown name in the domain: NXDOMAIN (not forwarded).
    assert status_of(dig(client3, "nosuchname.weave.local")) == "NXDOMAIN"
    # A known name, another type: NOERROR, empty (RFC 4074).
    out = dig(client3, "AAAA", "web.weave.local")
    assert status_of(out) == "NOERROR" and answer_count(out) == 0, out


def test_name_added_on_host1_resolves_on_host3_within_1s(mesh: Mesh) -> None:
    h1 = mesh.tb.host("host1")
    client3 = mesh.clients["host3"]
    fqdn = "fresh.weave.local."
    (poller,) = start_pollers([client3], fqdn, "A=10.32.1.50", 10, "NXDOMAIN")
    try:
        put = h1.run([sys.executable, "-c", PUT_NAME, "fresh-ctr", "10.32.1.50", urllib.parse.quote(fqdn)])
        t0 = float(put.stdout.strip())
        res = poller.result(timeout=15)
    finally:
        poller.proc.kill()
        poller.proc.wait()
    assert res["t"] is not None, f"never resolved on host3: {res}\n{diagnostics(mesh.hosts)}"
    delay = res["t"] - t0
    print(f"\npropagation host1 -> container on host3: {delay * 1000:.1f} ms ({res['queries']} queries)")
    assert res["first"] == "NXDOMAIN"
    assert delay < 1.0, f"took {delay:.3f} s"
    assert dig_short(client3, "fresh") == ["10.32.1.50"]  # and real dig agrees


def test_one_name_on_two_hosts_alternates(mesh: Mesh) -> None:
    expected = {"10.32.1.2", "10.32.2.2"}
    for host in ("host3", "host1"):
        client = mesh.clients[host]
        wait_resolves(mesh, client, "db", expected)
        loop = "for i in $(seq 24); do dig +time=3 +tries=1 +short db; echo --; done"
        out = client.run(["sh", "-c", loop], timeout=60).stdout
        answers = [[line for line in block.splitlines() if line.strip()] for block in out.split("--")[:-1]]
        assert len(answers) == 24, out
        for a in answers:
            assert sorted(a) == sorted(expected), f"{host}: {a}"
        firsts = [a[0] for a in answers]
        counts = {ip: firsts.count(ip) for ip in expected}
        print(f"\nfirst record from {host} over 24 queries: {counts}")
        assert set(firsts) == expected, f"{host}: the first record never changes: {firsts}"


def test_removed_names_turn_nxdomain_everywhere(mesh: Mesh) -> None:
    h2, h3 = mesh.tb.host("host2"), mesh.tb.host("host3")
    clients = list(mesh.clients.values())
    # 1. `weave detach` of the only container with a name.
    gone = h2.add_container("gone")
    attach(h2, "10.32.2.3/12", gone, "gone")
    for c in clients:
        wait_resolves(mesh, c, "gone", {"10.32.2.3"})

    def detach() -> None:
        assert weave(h2, "detach", gone.netns).strip() == "10.32.2.3/12"

    assert_removed_everywhere(clients, "gone.weave.local.", detach, "detach")
    assert not Path(f"/etc/netns/{gone.netns}/resolv.conf").exists()
    for c in clients:
        assert status_of(dig(c, "gone")) == "NXDOMAIN"

    # 2. `weave dns-remove` of a container-less name added with `weave dns-add`.
    weave(h3, "dns-add", "10.32.3.9", "-h", "extra.weave.local.")
    for c in clients:
        wait_resolves(mesh, c, "extra", {"10.32.3.9"})
    assert_removed_everywhere(
        clients, "extra.weave.local.",
        lambda: weave(h3, "dns-remove", "10.32.3.9", "-h", "extra.weave.local."), "dns-remove",
    )
    # Other names are untouched.
    assert dig_short(mesh.clients["host1"], "web") == ["10.32.1.1"]


def test_reverse_lookup_from_another_host(mesh: Mesh) -> None:
    client2 = mesh.clients["host2"]
    wait_resolves(mesh, client2, "web", {"10.32.1.1"})
    out = dig(client2, "-x", "10.32.1.1")
    assert status_of(out) == "NOERROR", out
    assert re.search(r"1\.1\.32\.10\.in-addr\.arpa\.\s+1\s+IN\s+PTR\s+web\.weave\.local\.", out), out
    assert "aa" in flags_of(out)
    assert dig_short(mesh.clients["host3"], "-x", "10.32.2.2") == ["db.weave.local."]


def test_external_names_are_forwarded_then_servfail(mesh: Mesh) -> None:
    h3 = mesh.tb.host("host3")
    client3 = mesh.clients["host3"]
    assert f"Upstream: {UPSTREAM}" in weave(h3, "status")

    def start_resolver(mode: str) -> None:
        h3.spawn([sys.executable, "-c", RESOLVER, UPSTREAM, mode], "resolver")
        log = h3.log_path("resolver")
        wait_for(lambda: f"ready {mode}" in log.read_text(), f"the {mode} resolver", 10, mesh.hosts)

    log = h3.log_path("resolver")
    start_resolver("answer")
    try:
        out = dig(client3, "www.example.test")
        assert status_of(out) == "NOERROR", out
        assert a_records(out) == ["192.0.2.77"], out
        assert "aa" not in flags_of(out)  # the upstream's reply, relayed as it is
        assert re.search(r"www\.example\.test\.\s+30\s+IN\s+A", out), out  # its TTL too
        assert "query www.example.test. A" in log.read_text()
    finally:
        h3.stop("resolver")

    # The resolver is gone: its port is closed, so the failure is immediate.
    out = dig(client3, "gone.example.test")
    assert status_of(out) == "SERVFAIL", out
    assert query_time_ms(out) < FALLBACK_TIMEOUT * 1000 + 500, out

    # A resolver that reads and never answers: SERVFAIL once the fallback timeout expires.
    start_resolver("silent")
    try:
        t = time.monotonic()
        out = dig(client3, "+time=5", "slow.example.test")
        elapsed = time.monotonic() - t
        assert status_of(out) == "SERVFAIL", out
        print(f"\nSERVFAIL from a silent upstream after {query_time_ms(out)} ms (dig), {elapsed:.2f} s wall")
        assert FALLBACK_TIMEOUT * 1000 * 0.9 <= query_time_ms(out) <= FALLBACK_TIMEOUT * 1000 + 1500, out
        assert "query slow.example.test. A" in log.read_text()
    finally:
        h3.stop("resolver")
    # Local names are still answered at once.
    assert dig_short(client3, "web") == ["10.32.1.1"]


def test_large_answer_is_truncated_over_udp_and_whole_over_tcp(mesh: Mesh) -> None:
    h1 = mesh.tb.host("host1")
    client3 = mesh.clients["host3"]
    ips = [f"10.32.200.{i}" for i in range(1, 101)]
    weave(h1, "dns-add", *ips, "-h", "big.weave.local.")
    wait_resolves(mesh, client3, "big", set(ips), "+tcp")

    out = dig(client3, "+tcp", "big")
    assert status_of(out) == "NOERROR" and "(TCP)" in out, out
    assert answer_count(out) == 100 and sorted(a_records(out)) == sorted(ips), out
    assert "tc" not in flags_of(out)

    # UDP with dig's default EDNS0 buffer (1232): a truncated prefix, TC set.
    out = dig(client3, "+notcp", "+ignore", "big")
    assert "tc" in flags_of(out), out
    n = answer_count(out)
    assert 0 < n < 100 and set(a_records(out)) <= set(ips), out
    size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert size <= 1232, out
    # Without EDNS0: at most 512 bytes.
    out = dig(client3, "+notcp", "+ignore", "+noedns", "big")
    assert "tc" in flags_of(out), out
    n512 = answer_count(out)
    size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < n512 < n and size <= 512, out
    print(f"\n100 records: {n} over UDP/EDNS 1232, {n512} over UDP/512, 100 over TCP")
    # dig's default (UDP, retry over TCP on TC) gets them all.
    assert len(dig_short(client3, "big")) == 100


def _header(hexdata: str) -> tuple[int, int, int] | None:
    data = bytes.fromhex(hexdata)
    if len(data) < 12:
        return None
    qid, flags = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:4], "big")
    return qid, flags, flags & 0x0F


FORMERR, NOTIMP = 1, 4


def test_malformed_packets_do_not_stop_the_server(mesh: Mesh) -> None:
    h3 = mesh.tb.host("host3")
    client3 = mesh.clients["host3"]
    pid = router_pid(h3)
    wait_resolves(mesh, client3, "web", {"10.32.1.1"})
    out = client3.run([sys.executable, "-c", ABUSE, DNS_ADDRESS], timeout=120).stdout
    res = json.loads(out)
    udp = {r["case"]: r for r in res["udp"]}
    tcp = {r["case"]: r for r in res["tcp"]}

    def rcode(case: dict[str, Any]) -> int | None:
        if not case["reply"]:
            return None
        hdr = _header(case["reply"][4:] if "closed" in case else case["reply"])
        assert hdr is not None, case
        qid, flags, code = hdr
        assert flags & 0x8000, f"reply without QR: {case}"
        sent = bytes.fromhex(case["sent"][4:] if "closed" in case else case["sent"])
        assert qid == int.from_bytes(sent[:2], "big"), f"reply ID does not match: {case}"
        return code

    # Header-level rejections, as miekg/dns (Weave's library) does them.
    assert rcode(udp["zero-questions"]) == FORMERR, udp["zero-questions"]
    assert rcode(udp["two-questions"]) == FORMERR, udp["two-questions"]
    assert rcode(udp["three-answers"]) == FORMERR, udp["three-answers"]
    assert rcode(udp["cut-question"]) in (FORMERR, None), udp["cut-question"]
    assert rcode(udp["bad-label"]) in (FORMERR, None), udp["bad-label"]
    assert udp["empty"]["reply"] is None and udp["short-header"]["reply"] is None
    assert udp["response"]["reply"] is None, "a response must not be answered"
    # Random bytes: dropped, FORMERR, or NOTIMP when the random opcode is not QUERY.
    for i in range(30):
        case = udp[f"random-{i}"]
        assert rcode(case) in (None, FORMERR, NOTIMP), case
    answered = sum(1 for i in range(30) if udp[f"random-{i}"]["reply"])
    print(f"\nrandom datagrams answered: {answered}/30 (the rest dropped)")

    assert rcode(tcp["zero-questions"]) in (FORMERR, None), tcp["zero-questions"]
    assert rcode(tcp["two-questions"]) in (FORMERR, None), tcp["two-questions"]
    for name in ("random-framed", "http-junk", "short-frame", "empty-frame", "random-unframed"):
        case = tcp[name]
        assert case["closed"] or case["reply"], f"TCP {name}: connection neither answered nor closed"
        if case["reply"] and name in ("random-framed", "empty-frame"):
            assert rcode(case) in (FORMERR, NOTIMP), case

    # Still serving, over UDP and TCP, and the router is the same process.
    assert dig_short(client3, "web") == ["10.32.1.1"]
    assert dig_short(client3, "+tcp", "web") == ["10.32.1.1"]
    assert alive(pid) and router_pid(h3) == pid
    assert "Service: dns" in weave(h3, "status")
    text = log_text(h3)
    assert "Traceback" not in text and "error answering" not in text, text[-3000:]


def test_weave_status_dns_and_dns_lookup(mesh: Mesh) -> None:
    h1 = mesh.tb.host("host1")
    def listed(host: Host) -> list[str] | None:
        lines = weave(host, "status", "dns").splitlines()
        ok = any(line.split()[:2] == ["web", "10.32.1.1"] for line in lines)
        return lines if ok else None

    for host in mesh.hosts:
        lines = wait_for(lambda h=host: listed(h), f"web in `weave status dns` on {host.name}", hosts=mesh.hosts)
        rows = {(f[0], f[1]): f for f in (line.split() for line in lines) if len(f) >= 4}
        web = rows[("web", "10.32.1.1")]
        assert web[2] == mesh.web.netns[:12] and web[3] == mesh.peer_names["host1"], web
        db1, db2 = rows[("db", "10.32.1.2")], rows[("db", "10.32.2.2")]
        assert db1[3] == mesh.peer_names["host1"] and db2[3] == mesh.peer_names["host2"], (db1, db2)
        assert db1[2] == mesh.db[0].netns[:12] and db2[2] == mesh.db[1].netns[:12]
        assert weave(host, "dns-lookup", "web").split() == ["10.32.1.1"]
        assert sorted(weave(host, "dns-lookup", "db.weave.local.").split()) == ["10.32.1.2", "10.32.2.2"]
        assert weave(host, "dns-lookup", "nosuchname").strip() == ""
    summary = weave(h1, "status")
    assert "Service: dns" in summary and "Domain: weave.local." in summary, summary
    assert re.search(r"Entries: \d+", summary)
    # GET /name over HTTP agrees.
    code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:6784/name').read().decode())"
    entries = json.loads(h1.run([sys.executable, "-c", code]).stdout)
    assert any(e["Hostname"] == "web.weave.local." and e["Addr"] == "10.32.1.1" for e in entries), entries
