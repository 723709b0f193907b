"""IPAM across real routers in network namespaces (DESIGN.md §5, §9).

Hosts are `router.testbed` namespaces; each runs `weave launch` with its own
WEAVE_STATE_DIR, so IPAM (ipam_crdt) runs in the real daemon, gossips over the real mesh
and persists in each host's sqlite database. Addresses come from `weave attach` (real
containers: namespaces with a veth on the bridge) and, for bulk, from the HTTP API on
127.0.0.1:6784 inside the host's namespace (a small Python client run there: no curl).

The invariants checked after every step: no address is held by two containers, on any
host, and every address lies inside the range; the parts of the range the peers own, each
by its own account (/report's ring entries), are disjoint, and each peer handed out only
addresses from its own parts. Data-path checks ping between containers on different
hosts. Everything stays inside the namespaces the test bed makes.

Timing, as in Weave: a space donation is a unicast to the receiver, and the other peers
learn of it (and of a peer's nickname, when that peer was already reachable through
others as it connected) only by the periodic gossip, every 30 s. So the tests judge the
ring by each peer's own view, which is current at once, and wait for agreement between
peers only after a broadcast (reset, rmpeer) or on a seeded ring.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import pytest

from router.testbed import Container, Host, Testbed
from tests.routers import diagnostics, log_text, router_test_marks, wait_for

pytestmark = router_test_marks()

CONVERGE = 25.0  # seconds a mesh / ring may take to settle (it takes ~1-2 s)
DEFAULT_RANGE = ipaddress.IPv4Network("10.32.0.0/12")
HEARTBEAT = "0.5"  # PYWEAVE_HEARTBEAT_INTERVAL for the partition test: a dead link is seen in ~1 s



# ---------------------------------------------------------------- helpers


def weave(host: Host, *args: str, check: bool = True, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`weave ARGS` inside the host's namespace, with its WEAVE_STATE_DIR."""
    return host.run(["weave", *args], env={**host.env, **(env or {})}, check=check, timeout=timeout)


def launch(host: Host, *args: str, env: dict[str, str] | None = None) -> None:
    out = weave(host, "launch", "--nickname", host.name, *args, env=env).stdout
    assert "weave router started" in out, out


# Runs a list of [method, path] requests against the router's HTTP API (127.0.0.1:6784 in
# the namespace it runs in) and prints [[status, body], ...] as JSON.
HTTP_CLIENT = r"""
import json, sys, urllib.error, urllib.request
out = []
for method, path in json.loads(sys.argv[1]):
    data = b"" if method in ("POST", "PUT") else None
    req = urllib.request.Request("http://127.0.0.1:6784" + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            out.append([resp.status, resp.read().decode()])
    except urllib.error.HTTPError as exc:
        out.append([exc.code, exc.read().decode()])
print(json.dumps(out))
"""


def http(host: Host, *requests: tuple[str, str], timeout: float = 90) -> list[tuple[int, str]]:
    """Send HTTP requests to the host's router, from inside its namespace; (status, body) each."""
    proc = host.run([sys.executable, "-c", HTTP_CLIENT, json.dumps(list(requests))], timeout=timeout)
    return [(int(status), body) for status, body in json.loads(proc.stdout)]


def allocate_many(host: Host, idents: list[str], subnet: str = "") -> dict[str, str]:
    """POST /ip/{id}[/subnet] for each ident; returns ident -> "a.b.c.d/len". Fails on any error."""
    suffix = f"/{subnet}" if subnet else ""
    answers = http(host, *(("POST", f"/ip/{ident}{suffix}") for ident in idents))
    out = {}
    for ident, (status, body) in zip(idents, answers, strict=True):
        assert status == 200, f"{host.name}: POST /ip/{ident}{suffix} -> {status} {body}\n{diagnostics([host])}"
        out[ident] = body.strip()
    return out


def owned(host: Host) -> dict[str, list[str]]:
    """GET /ip: every container ident this host's IPAM has addresses for."""
    ((status, body),) = http(host, ("GET", "/ip"))
    assert status == 200, body
    return {entry["containerid"]: sorted(entry["addrs"]) for entry in json.loads(body)["owned"] or []}


def all_owned(hosts: Iterable[Host]) -> list[tuple[str, str, str]]:
    """(host, ident, address without prefix) for every address every host has handed out."""
    return [(h.name, ident, cidr.split("/")[0]) for h in hosts for ident, cidrs in owned(h).items()
            for cidr in cidrs]


def assert_unique_and_in_range(hosts: Iterable[Host], network: ipaddress.IPv4Network) -> list[str]:
    """No address held twice (on one host or across hosts), all inside `network`; returns them."""
    entries = all_owned(hosts)
    holders: dict[str, list[tuple[str, str]]] = {}
    for host, ident, addr in entries:
        holders.setdefault(addr, []).append((host, ident))
    dups = {a: who for a, who in holders.items() if len(who) > 1}
    assert not dups, f"addresses held twice: {dups}"
    outside = [e for e in entries if ipaddress.IPv4Address(e[2]) not in network]
    assert not outside, f"addresses outside {network}: {outside}"
    return [e[2] for e in entries]


def ps(host: Host) -> dict[str, list[str]]:
    """`weave ps`: container -> its CIDRs."""
    out = {}
    for line in weave(host, "ps").stdout.splitlines():
        name, _mac, *addrs = line.split()
        out[name] = sorted(addrs)
    return out


STATUS_LINE = re.compile(r"^(?P<name>[0-9a-f:]{17})\((?P<nick>[^)]*)\)\s+(?P<ips>\d+) IPs")


@dataclass(frozen=True)
class Share:
    nick: str
    ips: int
    unreachable: bool


NO_SHARE = Share("", 0, False)


def ipam_status(host: Host) -> dict[str, Share]:
    """`weave status ipam`: peer name -> the share of the range that peer owns.

    Keyed by peer name, not nickname: IPAM learns other peers' nicknames from their IPAM
    gossip, and a peer that was already reachable through others when it connected sends
    none until the periodic gossip (30 s), as in Weave.
    """
    text = weave(host, "status", "ipam").stdout
    out = {}
    for line in text.splitlines():
        m = STATUS_LINE.match(line)
        if m:
            out[m["name"]] = Share(m["nick"], int(m["ips"]), "unreachable" in line)
    return out


def peer_name(host: Host) -> str:
    return str(report(host)["Router"]["Name"])


def report(host: Host) -> dict[str, Any]:
    return json.loads(weave(host, "report").stdout)


def established(host: Host) -> int:
    return len([c for c in report(host)["Router"]["Connections"] if c["State"] == "established"])


Span = tuple[int, int]  # [start, end) as integers


def own_ranges(host: Host) -> list[Span]:
    """The parts of the range this host's IPAM says it owns (its ring entries, from /report).

    A peer's own entries are authoritative (only the owner changes them), so these views
    are current at once; other peers' views of them follow by gossip, which may take up
    to the mesh's 30 s gossip interval for a donation (as in Weave).
    """
    rep = report(host)
    me = rep["Router"]["Name"]
    out = []
    for e in rep["IPAM"]["Entries"] or []:
        if e["Peer"] == me and e["Size"] > 0:
            start = int(ipaddress.IPv4Address(e["Token"]))
            out.append((start, start + e["Size"]))
    return sorted(out)


def check_ring(hosts: Iterable[Host], network: ipaddress.IPv4Network) -> bool:
    """Assert the ring invariants over the hosts' own views: their ranges are disjoint and
    inside `network`, and every address a host handed out lies in a range it owns. Returns
    whether the ranges cover the whole network (a donation in flight may leave a gap)."""
    spans: list[tuple[Span, str]] = []
    for h in hosts:
        mine = own_ranges(h)
        spans += [(r, h.name) for r in mine]
        for ident, cidrs in owned(h).items():
            for cidr in cidrs:
                ip = int(ipaddress.IPv4Interface(cidr).ip)
                assert any(a <= ip < b for a, b in mine), f"{h.name}: {ident} has {cidr} outside its ranges"
    spans.sort()
    lo, hi = int(network.network_address), int(network.broadcast_address) + 1
    for ((a, b), who), ((c, d), other) in zip(spans, spans[1:], strict=False):
        assert b <= c, f"{who} owns [{a}, {b}) and {other} owns [{c}, {d}): they overlap"
    assert all(lo <= a and b <= hi for (a, b), _ in spans), f"ranges outside {network}: {spans}"
    return sum(b - a for (a, b), _ in spans) == network.num_addresses


def wait_ring_covered(bed: Bed, hosts: list[Host] | None = None, timeout: float = CONVERGE) -> None:
    """Wait until the hosts' own ranges cover the range (checking the invariants meanwhile)."""
    hosts = hosts or bed.hosts
    wait_for(lambda: check_ring(hosts, bed.network), "the hosts' own ranges to cover the range", timeout,
             bed.hosts, describe=lambda: "\n".join(f"{h.name}: {own_ranges(h)}" for h in hosts))


def attach(host: Host, container: Container, *addrs: str) -> str:
    """`weave attach [ADDR...] CONTAINER`; returns the one CIDR it printed."""
    out = weave(host, "attach", *addrs, container.netns).stdout.split()
    assert len(out) == 1, out
    return out[0]


@dataclass
class Attached:
    host: Host
    container: Container
    cidr: str

    @property
    def ip(self) -> str:
        return self.cidr.split("/")[0]

    def __str__(self) -> str:
        return f"{self.container.name}@{self.host.name}({self.ip})"


def ping_pairs(pairs: Iterable[tuple[Attached, Attached]], hosts: list[Host], timeout: float = CONVERGE) -> None:
    """Every pair pings: the first within `timeout` (paths may still be set up), the rest within 6 s each."""
    for i, (a, b) in enumerate(pairs):
        limit = timeout if i == 0 else 6.0
        wait_for(lambda a=a, b=b: a.container.ping(b.ip, count=1, timeout=0.5), f"{a} to reach {b}", limit, hosts)


def cross_host_pairs(atts: list[Attached]) -> list[tuple[Attached, Attached]]:
    return [(a, b) for a, b in combinations(atts, 2) if a.host is not b.host]


def daemon_pid(host: Host) -> int:
    return int((host.state_dir / "weaver.pid").read_text().strip())


def kill_router(host: Host) -> None:
    """SIGKILL the daemon `weave launch` forked on this host (a crash), by its pid file."""
    pid = daemon_pid(host)
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and _state(pid) not in ("Z", ""):
            time.sleep(0.05)
    finally:
        os.close(fd)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@dataclass
class Bed:
    tb: Testbed
    flags: list[str]
    network: ipaddress.IPv4Network
    env: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # host -> --name, when fixed
    attached: list[Attached] = field(default_factory=list)

    @property
    def hosts(self) -> list[Host]:
        return self.tb.hosts

    def peers_of(self, host: Host) -> list[str]:
        return [h.address for h in self.hosts if h is not host]

    def launch(self, host: Host) -> None:
        """Launch with the bed's flags; every router names all the others (consensus among them)."""
        name = ["--name", self.names[host.name]] if host.name in self.names else []
        launch(host, *name, *self.flags, *self.peers_of(host), env=self.env)

    def attach(self, host: Host, name: str, *addrs: str) -> Attached:
        container = host.add_container(name)
        att = Attached(host, container, attach(host, container, *addrs))
        self.attached.append(att)
        return att


def make_bed(n: int, flags: list[str], network: ipaddress.IPv4Network,
             env: dict[str, str] | None = None, names: dict[str, str] | None = None) -> Iterator[Bed]:
    with Testbed(n) as tb:
        bed = Bed(tb, flags, network, env or {}, names or {})
        for h in tb.hosts:
            bed.launch(h)
        # `weave prime` waits for the ring: consensus among the peers named at launch.
        for h in tb.hosts:
            weave(h, "prime", timeout=60)
        yield bed
    assert not tb.cleanup_errors, tb.cleanup_errors


@pytest.fixture(scope="module")
def ring3() -> Iterator[Bed]:
    """Three routers on the default range (10.32.0.0/12), consensus among them; shared by
    the tests that leave every router running (the restart test restarts one and checks it)."""
    yield from make_bed(3, ["--ipalloc-range", str(DEFAULT_RANGE), "--ipalloc-init", "consensus"], DEFAULT_RANGE)


RING4_NAMES = {f"host{i}": f"02:00:00:00:00:0{i}" for i in range(1, 5)}
# The whole range: a host whose seeded share lies outside the default subnet would ask a
# peer for space there, and that donation reaches the third peers only by periodic gossip.
RING4_ALL = "10.40.0.0/16"


@pytest.fixture(scope="module")
def ring4() -> Iterator[Bed]:
    """Four routers on 10.40.0.0/16 (net:default in 10.40.0.0/17), seeded with all four
    (fixed peer names), so every peer owns its share from the start and every view of the
    ring agrees without waiting for gossip; for the tests that take a router out for good
    (reset: host4; rmpeer: host3)."""
    flags = ["--ipalloc-range", "10.40.0.0/16", "--ipalloc-init", "seed=" + ",".join(RING4_NAMES.values()),
             "--ipalloc-default-subnet", "10.40.0.0/17"]
    yield from make_bed(4, flags, ipaddress.IPv4Network("10.40.0.0/16"), names=RING4_NAMES)


# ---------------------------------------------------------------- allocation


def test_hundred_addresses_across_three_hosts(ring3: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = ring3
    show_logs(bed)
    h1, h2, h3 = bed.hosts

    # Real containers: two per host, by `weave attach` (net:default, an explicit
    # net:CIDR and the bare default), and the host itself by `weave expose`.
    atts = [
        bed.attach(h1, "a1"),
        bed.attach(h1, "b1", "net:default"),
        bed.attach(h2, "a2", f"net:{DEFAULT_RANGE}"),
        bed.attach(h2, "b2"),
        bed.attach(h3, "a3"),
        bed.attach(h3, "b3", "net:default"),
    ]
    for att in atts:
        assert att.cidr.endswith("/12"), att.cidr
    exposed = weave(h1, "expose").stdout.split()
    assert len(exposed) == 1 and exposed[0].endswith("/12"), exposed

    # The rest of the hundred through the HTTP API, spread over the three hosts.
    by_host = {h.name: allocate_many(h, [f"bulk-{h.name}-{i:02d}" for i in range(31)]) for h in bed.hosts}

    addrs = assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE)
    assert len(addrs) == 100, sorted(addrs)
    # Each host's IPAM holds exactly what it handed out.
    for h in bed.hosts:
        mine = owned(h)
        bulk = by_host[h.name]
        assert {k: v for k, v in mine.items() if k.startswith("bulk-")} == {k: [v] for k, v in bulk.items()}
        for att in (a for a in atts if a.host is h):
            assert mine[att.container.netns] == [att.cidr], (h.name, mine)
    assert owned(h1)["weave:expose"] == exposed
    # The range is divided among the three peers (consensus, then space requests): each
    # owns a share, the shares are disjoint and cover it, and each handed out only its own.
    wait_ring_covered(bed)
    for h in bed.hosts:
        assert own_ranges(h), f"{h.name} owns nothing"
        mine = ipam_status(h)[peer_name(h)]
        assert mine.nick == h.name and mine.ips == sum(b - a for a, b in own_ranges(h)), mine

    # Idempotent: asking again for the same ident gives the same address.
    again = allocate_many(h2, ["bulk-host2-00", "bulk-host2-30"])
    assert again == {k: by_host["host2"][k] for k in again}
    ((status, body),) = http(h3, ("GET", "/ip/bulk-host3-05"))
    assert (status, body.strip()) == (200, by_host["host3"]["bulk-host3-05"])
    # `weave ps` shows the attached containers with their allocated addresses.
    for h in bed.hosts:
        listed = ps(h)
        for att in (a for a in atts if a.host is h):
            assert listed[att.container.netns] == [att.cidr], listed

    # The allocated addresses work: containers on different hosts reach each other, and
    # the exposed host reaches a container on another host.
    ping_pairs(cross_host_pairs(atts), bed.hosts)
    assert wait_for(lambda: h1.ping(atts[2].ip), "host1 (exposed) to reach a2 on host2", 10, bed.hosts)
    # `weave hide` gives the exposed address back.
    assert weave(h1, "hide").stdout.split() == exposed
    assert "weave:expose" not in owned(h1)


def test_bad_input_is_refused_and_changes_nothing(ring3: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = ring3
    show_logs(bed)
    h1, h2, _h3 = bed.hosts
    if not owned(h1):  # run on its own: give host1 something to protect
        bed.attach(h1, "p1")
    victim = next(a for a in bed.attached if a.host is h1)
    before = {h.name: owned(h) for h in bed.hosts}
    ps_before = ps(h1)
    shares_before = ipam_status(h1)
    fresh = h1.add_container("fresh")

    # The CLI: malformed CIDRs and a subnet outside the range; a non-zero exit and a
    # message naming the problem.
    cli_cases = {
        "net:10.0.0.0/99": r"not a valid",
        "ip:300.1.1.1/24": r"300",
        "10.32.1.1/40": r"not a valid",
        "net:192.168.0.0/24": r"outside",
        f"ip:{victim.cidr}": r"[Uu]nable to claim|in use|owned",
    }
    for arg, pattern in cli_cases.items():
        proc = weave(h1, "attach", arg, fresh.netns, check=False)
        assert proc.returncode != 0, f"weave attach {arg} succeeded: {proc.stdout}"
        assert re.search(pattern, proc.stderr), f"weave attach {arg}: {proc.stderr!r}"
        assert "Traceback" not in proc.stderr, proc.stderr
    # rmpeer of a live peer is refused (its ranges are in use), and of a stranger too.
    proc = weave(h1, "rmpeer", "host2", check=False)
    assert proc.returncode != 0 and "still connected" in proc.stderr, proc
    proc = weave(h1, "rmpeer", "nosuchpeer", check=False)
    assert proc.returncode != 0 and "unknown peer" in proc.stderr, proc

    # The HTTP API: 4xx with a message.
    http_cases: list[tuple[tuple[str, str], int, str]] = [
        (("POST", "/ip/x/192.168.0.0/24"), 400, "outside"),
        (("POST", "/ip/x/10.0.0.0/99"), 400, ""),
        (("POST", "/ip/x/300.1.1.1/24"), 400, ""),
        (("PUT", "/ip/x/300.1.1.1/24"), 400, ""),
        (("PUT", "/ip/x/10.32.0.0/12"), 400, "network address"),
        (("PUT", f"/ip/x/{victim.cidr}"), 409, "claim"),
        (("DELETE", "/ip/nosuchcontainer"), 404, ""),
        (("DELETE", "/peer/nosuchpeer"), 404, "unknown peer"),
    ]
    answers = http(h1, *(req for req, _, _ in http_cases))
    for (req, status, text), (got, body) in zip(http_cases, answers, strict=True):
        assert got == status, f"{req}: {got} {body!r}, expected {status}"
        assert body.strip(), f"{req}: {status} without a message"
        assert text.lower() in body.lower(), f"{req}: {body!r}"
    # The same outside subnet on another host, for good measure.
    ((status, body),) = http(h2, ("POST", "/ip/y/192.168.0.0/24"))
    assert status == 400 and "outside" in body, (status, body)

    # Nothing changed: no host holds anything new, the fresh container is not plugged in.
    after = {h.name: owned(h) for h in bed.hosts}
    assert after == before
    assert ps(h1) == ps_before
    assert ipam_status(h1) == shares_before
    links = fresh.run(["ip", "-o", "link", "show"]).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"], links
    assert http(h1, ("GET", "/ip/x"))[0] == (200, "")
    assert "Traceback" not in log_text(h1)
    # And the router still works.
    att = bed.attach(h1, "after-bad")
    assert ipaddress.IPv4Interface(att.cidr).ip in DEFAULT_RANGE
    assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE)


def test_claim_by_attach_and_release_by_detach(ring3: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = ring3
    show_logs(bed)
    h1, h2, _h3 = bed.hosts
    if not any(a.host is h2 for a in bed.attached):  # run on its own
        bed.attach(h2, "c2")
    # Two free addresses in host1's own ranges, claimed as `ip:CIDR` and as a bare CIDR.
    taken = {int(ipaddress.IPv4Address(a)) for a in assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE)}
    free = [x for a, b in own_ranges(h1) for x in range(a + 700, min(b, a + 800))
            if x not in taken and x != int(DEFAULT_RANGE.broadcast_address)][:2]
    assert len(free) == 2, own_ranges(h1)
    want = sorted(f"{ipaddress.IPv4Address(x)}/{DEFAULT_RANGE.prefixlen}" for x in free)
    claimed = h1.add_container("claimed")
    out = weave(h1, "attach", f"ip:{want[0]}", want[1], claimed.netns).stdout.split()
    assert sorted(out) == want, out
    assert owned(h1)[claimed.netns] == want
    assert ps(h1)[claimed.netns] == want
    ((status, body),) = http(h1, ("GET", f"/ip/{claimed.netns}"))
    assert status == 200 and sorted(body.split()) == want, body
    # Claiming again for the same container is fine (idempotent); the addresses work.
    assert http(h1, ("PUT", f"/ip/{claimed.netns}/{want[0]}")) == [(204, "")]
    other = next(a for a in bed.attached if a.host is h2)
    ping_pairs([(Attached(h1, claimed, want[0]), other)], bed.hosts)
    assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE)

    # `weave detach` unplugs the container and releases both addresses.
    assert sorted(weave(h1, "detach", claimed.netns).stdout.split()) == want
    assert claimed.netns not in owned(h1)
    assert claimed.netns not in ps(h1)
    assert http(h1, ("GET", f"/ip/{claimed.netns}")) == [(200, "")]
    # Released addresses can be claimed by someone else now.
    assert http(h1, ("PUT", f"/ip/reclaimer/{want[0]}")) == [(204, "")]
    assert owned(h1)["reclaimer"] == [want[0]]
    assert http(h1, ("DELETE", "/ip/reclaimer")) == [(204, "")]
    assert "reclaimer" not in owned(h1)


def test_restarted_router_keeps_its_addresses(ring3: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = ring3
    show_logs(bed)
    h1, h2, h3 = bed.hosts
    if not any(a.host is h2 for a in bed.attached):  # run on its own
        bed.attach(h1, "r1")
        bed.attach(h2, "r2")
        allocate_many(h2, [f"bulk-host2-{i:02d}" for i in range(3)])
    mine = [a for a in bed.attached if a.host is h2]
    before = owned(h2)
    ps_before = ps(h2)
    assert before

    assert "stopped" in weave(h2, "stop").stdout
    bed.launch(h2)  # same flags, same state dir

    # IPAM's database is the source: every ident has the address it had.
    assert owned(h2) == before
    ids = list(before)
    for ident, (status, body) in zip(ids, http(h2, *(("GET", f"/ip/{i}") for i in ids)), strict=True):
        assert status == 200 and sorted(body.split()) == before[ident], (ident, status, body)
    assert ps(h2) == ps_before
    # Asking again gives the same address (idempotent across the restart).
    bulk = sorted(i for i in ids if i.startswith("bulk-"))[:2]
    assert allocate_many(h2, bulk) == {i: before[i][0] for i in bulk}

    # New allocations on the restarted router (it may have to wait for the mesh to ask
    # for space) do not collide with anything anywhere.
    weave(h2, "prime", timeout=60)
    allocate_many(h2, [f"after-restart-{i}" for i in range(5)])
    new = bed.attach(h2, "new2")
    assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE)
    assert new.ip not in {a.split("/")[0] for cidrs in before.values() for a in cidrs}

    assert own_ranges(h2), "host2 owns nothing after its restart"
    wait_ring_covered(bed)
    # Its containers (old and new) still reach the others.
    others = [a for a in bed.attached if a.host is not h2][:2]
    ping_pairs([(a, b) for a in [*mine[:1], new] for b in others], bed.hosts)


# ---------------------------------------------------------------- partition


@pytest.fixture
def partition_bed() -> Iterator[Bed]:
    yield from make_bed(3, [], DEFAULT_RANGE, env={"PYWEAVE_HEARTBEAT_INTERVAL": HEARTBEAT})


def test_partition_allocate_on_both_sides_then_heal(partition_bed: Bed,
                                                    show_logs: Callable[[Bed], None]) -> None:
    bed = partition_bed
    show_logs(bed)
    tb = bed.tb
    h1, h2, h3 = bed.hosts
    # Before: one container per host, so each host owns space of its own.
    pre = [bed.attach(h, f"pre{h.index}") for h in bed.hosts]
    wait_ring_covered(bed)

    # host3 alone on one side, host1 + host2 on the other.
    tb.partition(h3, h1)
    tb.partition(h3, h2)
    wait_for(lambda: established(h3) == 0, "host3 to lose its connections", 15, bed.hosts)

    minority = [bed.attach(h3, "m3a"), bed.attach(h3, "m3b")]
    majority = [bed.attach(h1, "M1a"), bed.attach(h1, "M1b"), bed.attach(h2, "M2a")]
    allocate_many(h3, [f"p3-{i:02d}" for i in range(20)])
    allocate_many(h1, [f"p1-{i:02d}" for i in range(10)])
    allocate_many(h2, [f"p2-{i:02d}" for i in range(10)])
    assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE)
    check_ring(bed.hosts, DEFAULT_RANGE)  # each side allocated only from its own ranges
    # The majority side still works as a network.
    ping_pairs([(majority[0], majority[2])], bed.hosts)
    # host3 really is cut off.
    assert not minority[0].container.ping(majority[0].ip, count=1, timeout=0.5)

    tb.heal(h3, h1)
    tb.heal(h3, h2)
    wait_for(lambda: all(established(h) == 2 for h in bed.hosts), "the mesh to re-form", 40, bed.hosts)
    # The owners' own views still split the range between them. (The other peers' views
    # of a donation follow by periodic gossip, up to 30 s, as in Weave: not waited for.)
    assert check_ring(bed.hosts, DEFAULT_RANGE)

    # No duplicates anywhere, also after more allocations on every host.
    total = len(assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE))
    assert total == 3 + 5 + 40
    for h in bed.hosts:
        allocate_many(h, [f"healed-{h.name}-{i}" for i in range(5)])
    post = [bed.attach(h, f"post{h.index}") for h in bed.hosts]
    assert len(assert_unique_and_in_range(bed.hosts, DEFAULT_RANGE)) == total + 15 + 3

    # Every container reaches every other across the former partition (and the new ones).
    side3 = [a for a in [*pre, *minority, *post] if a.host is h3]
    side12 = [a for a in [*pre, *majority, *post] if a.host is not h3]
    ping_pairs([(a, b) for a in side3 for b in side12], bed.hosts, timeout=40)


# ---------------------------------------------------------------- reset and rmpeer


def _seeded(bed: Bed) -> dict[str, list[Span]]:
    """The seeded ring: every running peer owns a share, all views agree; own ranges by host."""
    running = [h for h in bed.hosts if (h.state_dir / "weaver.pid").exists()]
    assert check_ring(running, bed.network), {h.name: own_ranges(h) for h in running}
    views = [{name: s.ips for name, s in ipam_status(h).items()} for h in running]
    assert all(v == views[0] for v in views), views
    return {h.name: own_ranges(h) for h in running}


def test_seeded_ring_and_default_subnet(ring4: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = ring4
    show_logs(bed)
    ranges = _seeded(bed)
    quarter = bed.network.num_addresses // 4
    assert {n: sum(b - a for a, b in r) for n, r in ranges.items()} == {h.name: quarter for h in bed.hosts}
    assert set(ipam_status(bed.hosts[0])) == set(RING4_NAMES.values())
    # net:default is --ipalloc-default-subnet; net:CIDR and the HTTP subnet form pick others.
    default = ipaddress.IPv4Network("10.40.0.0/17")
    lower = next(h for h in bed.hosts if any(a < int(default.broadcast_address) for a, _ in ranges[h.name]))
    assert http(lower, ("GET", "/ipinfo/defaultsubnet")) == [(200, str(default))]
    att = bed.attach(lower, "dflt")
    assert ipaddress.IPv4Interface(att.cidr).network == default, att.cidr
    (dflt,) = allocate_many(lower, ["dflt-http"]).values()
    assert ipaddress.IPv4Interface(dflt).network == default, dflt
    (whole,) = allocate_many(lower, ["whole-http"], RING4_ALL).values()
    assert ipaddress.IPv4Interface(whole).network == bed.network, whole
    assert "DefaultSubnet: 10.40.0.0/17" in weave(lower, "status").stdout
    assert weave(lower, "detach", att.container.netns).stdout.split() == [att.cidr]
    assert http(lower, ("DELETE", "/ip/dflt-http"), ("DELETE", "/ip/whole-http")) == [(204, "")] * 2
    assert owned(lower) == {}
    bed.attached.remove(att)


def _covered(span: Span, ranges: list[Span]) -> bool:
    """Whether `ranges` (disjoint) cover all of `span`."""
    x, y = span
    return sum(max(0, min(b, y) - max(a, x)) for a, b in ranges) == y - x


def test_reset_hands_space_to_a_live_peer(ring4: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = ring4
    show_logs(bed)
    h1, h2, h3, h4 = bed.hosts
    before = _seeded(bed)
    live = [h1, h2, h3]
    allocate_many(h4, ["gone-with-host4"], RING4_ALL)
    kept = {h.name: allocate_many(h, [f"kept-{h.name}"], RING4_ALL) for h in live}
    assert before["host4"], before

    out = weave(h4, "reset")
    assert "removed" in out.stdout, out.stdout
    assert not (h4.state_dir / "ipam.sqlite3").exists()
    assert not (h4.state_dir / "peername").exists()
    assert weave(h4, "status", check=False).returncode != 0  # stopped

    # Every live peer sees host4 with no space (its range given to one live peer, by
    # broadcast, so nobody waits for periodic gossip).
    def handed_over(h: Host) -> dict[str, Share] | None:
        s = ipam_status(h)
        ok = s.get(RING4_NAMES["host4"], NO_SHARE).ips == 0 and all(s[RING4_NAMES[n.name]].ips > 0 for n in live)
        return s if ok and sum(x.ips for x in s.values()) == bed.network.num_addresses else None

    views = {h.name: wait_for(lambda h=h: handed_over(h), f"{h.name} to see host4's space handed over",
                              15, bed.hosts) for h in live}
    ips = [{name: x.ips for name, x in v.items()} for v in views.values()]
    assert ips[0] == ips[1] == ips[2], views
    wait_ring_covered(bed, live, 15)
    after = {h.name: own_ranges(h) for h in live}
    heirs = [n for n in after if all(_covered(span, after[n]) for span in before["host4"])]
    assert len(heirs) == 1, (before, after)
    gained = {n: sum(b - a for a, b in after[n]) - sum(b - a for a, b in before[n]) for n in after}
    assert gained[heirs[0]] == sum(b - a for a, b in before["host4"]), gained
    assert all(g == 0 for n, g in gained.items() if n != heirs[0]), gained

    # Allocation goes on everywhere, unique, and what the live peers had is untouched.
    for h in live:
        assert {k: v[0] for k, v in owned(h).items() if k.startswith("kept-")} == kept[h.name]
        allocate_many(h, [f"after-reset-{h.name}-{i}" for i in range(3)], RING4_ALL)
    assert_unique_and_in_range(live, bed.network)
    check_ring(live, bed.network)


def test_rmpeer_reclaims_a_dead_hosts_space(ring4: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = ring4
    show_logs(bed)
    h1, _h2, h3, _h4 = bed.hosts
    before = _seeded(bed)
    live = [h for h in bed.hosts if h is not h3 and h.name in before]
    allocate_many(h3, ["dies-with-host3"], RING4_ALL)
    bed.attach(h3, "on-dead-host", f"net:{RING4_ALL}")
    name1, name3 = RING4_NAMES["host1"], RING4_NAMES["host3"]
    dead = sum(b - a for a, b in before["host3"])
    assert dead > 0 and ipam_status(h1)[name3].ips == dead
    # `weave rmpeer host3` needs host1 to know that nickname (IPAM gossip; see ipam_status).
    wait_for(lambda: ipam_status(h1)[name3].nick == "host3", "host1 to learn host3's nickname", 40, bed.hosts)

    kill_router(h3)
    wait_for(lambda: ipam_status(h1)[name3].unreachable, "host1 to see host3 unreachable", CONVERGE, bed.hosts)

    out = weave(h1, "rmpeer", "host3").stdout
    assert re.fullmatch(r"(\d+) IPs taken over from host3\n", out), out
    assert out == f"{dead} IPs taken over from host3\n", (out, before)

    after = {name: s.ips for name, s in ipam_status(h1).items()}
    assert after.get(name3, 0) == 0, after
    assert after[name1] == sum(b - a for a, b in before["host1"]) + dead, (before, after)
    assert "unreachable" not in weave(h1, "status", "ipam").stdout
    # The others learn it by broadcast: host3 owns nothing on their rings either.
    for h in live:
        wait_for(lambda h=h: {n: s.ips for n, s in ipam_status(h).items()} == after, f"{h.name} to agree with host1",
                 15, bed.hosts, describe=lambda h=h: f"{h.name}: {ipam_status(h)}\nhost1: {after}")
    assert check_ring(live, bed.network)
    # A second rmpeer finds nothing left to take.
    assert weave(h1, "rmpeer", "host3").stdout == "0 IPs taken over from host3\n"
    # The reclaimed space is usable and nothing is duplicated.
    for h in live:
        allocate_many(h, [f"after-rmpeer-{h.name}-{i}" for i in range(3)], RING4_ALL)
    assert_unique_and_in_range(live, bed.network)
    check_ring(live, bed.network)
