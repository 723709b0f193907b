"""Moving a cluster from Weave Net to pyweave host by host, in the netns test bed (issue 13).

Each host starts as Weave Net leaves it after `weave stop` of its router: a `weave` bridge,
containers on it attached exactly as Weave attaches them (host end ``vethwepl<pid>``,
hairpin on; container end ``ethwe``, MTU 1376, TX checksum offload off as in sleeve
mode), holding the addresses the sample Weave databases give them, and Weave's BoltDB
file. There is no Weave router here, so a veth pair between the two hosts' bridges
stands in for Weave's overlay while a host still "runs Weave": it carries the
containers' frames between the bridges as Weave's router would. Deleting it is
`weave stop` of that host's Weave router.

The move: host 2 first (pyweave launched on its Weave file while host 1 still runs
"Weave"), then host 1 (its Weave stopped, pyweave launched on its file, peer host 2).
Containers ping each other the whole time; the longest gap in replies is the outage.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam_crdt.address import parse_ip
from ipam_crdt.weavedb import parse_weave_db
from router import bridge as br
from router.peername import parse_peer_name
from router.testbed import Host, Testbed
from tests.routers import diagnostics, launch, log_text, router_test_marks, wait_for, weave
from tests.test_ipam_integration import http

pytestmark = router_test_marks("ping", "nsenter", "unshare")

DB_DIR = Path(__file__).parent / "data" / "captures" / "weave-db"
RANGE = "10.40.0.0/16"
WV1, WV2 = 0x029900000001, 0x029900000002
# Containers Weave attached, with the addresses the databases own for them (the sample
# README's table). c3 and c6 own addresses too but have no container running.
RUNNING = {"h1": {"c1": "10.40.0.1/16", "c2": "10.40.0.2/16"}, "h2": {"c4": "10.40.128.0/16", "c5": "10.40.128.1/16"}}
STOPPED = {"h1": {"c3": "10.40.0.3/16", "c6": "10.40.200.7/16"}, "h2": {}}
MAX_GAP = 5.0  # seconds without a ping reply the issue allows
NEW_CONTAINERS = 6
STANDIN = "wvoverlay"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts outside the test bed (container holders, pings); killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()


def weave_bridge(host: Host) -> None:
    """The bridge as Weave makes it (before pyweave has seen it)."""
    host.run(["ip", "link", "add", "weave", "type", "bridge", "stp_state", "0"])
    host.run(["ip", "link", "set", "weave", "mtu", "1376", "up"])


def weave_container(host: Host, cidr: str, procs: list[subprocess.Popen[bytes]]) -> int:
    """A container (a process in its own netns) attached to `host`'s bridge as Weave does; its PID."""
    p = subprocess.Popen(["unshare", "-n", "sleep", "900"], stdin=subprocess.DEVNULL)
    procs.append(p)
    own = Path("/proc/self/ns/net").stat().st_ino
    deadline = time.monotonic() + 5
    while Path(f"/proc/{p.pid}/ns/net").stat().st_ino == own:
        assert time.monotonic() < deadline, "unshare did not start"
        time.sleep(0.01)
    veth = f"vethwepl{p.pid}"
    host.run(["ip", "link", "add", veth, "mtu", "1376", "type", "veth",
              "peer", "name", "ethwe", "mtu", "1376", "netns", str(p.pid)])
    host.run(["ip", "link", "set", veth, "master", "weave", "up"])
    host.run(["ip", "link", "set", veth, "type", "bridge_slave", "hairpin", "on"])
    inside(p.pid, "ip", "addr", "add", cidr, "dev", "ethwe")
    inside(p.pid, "ip", "link", "set", "ethwe", "up")
    inside(p.pid, "ip", "link", "set", "lo", "up")
    br.set_tx_checksum(veth, False, netns=host.netns)
    br.set_tx_checksum("ethwe", False, netns=f"/proc/{p.pid}/ns/net")
    return p.pid


def inside(pid: int, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], check=True, capture_output=True,
                          text=True, timeout=30).stdout


def start_ping(pid: int, address: str, out: Path, procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Ping `address` from container `pid` every 0.1 s, replies time-stamped into `out` line by line."""
    with out.open("wb") as f:
        p = subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", "stdbuf", "-oL", "ping", "-n", "-D",
                              "-i", "0.1", "-W", "1", address], stdout=f, stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def reply_times(out: Path) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out.read_text(), re.M)]


def longest_gap(out: Path, since: float, until: float) -> float:
    """The longest time between `since` and `until` (wall clock) without a reply.

    A gap open at `since` counts from the last reply before it; one open at `until` up
    to `until` only, so that two windows side by side do not both count the same gap.
    """
    times = reply_times(out)
    assert times and times[0] < since, f"{out.name}: no replies before {since}: {out.read_text()[-2000:]}"
    assert times[-1] > until, f"{out.name}: no replies after {until}: {out.read_text()[-2000:]}"
    edges = [max(t for t in times if t < since), *(t for t in times if since <= t <= until), until]
    return max(b - a for a, b in zip(edges, edges[1:], strict=False))


def ps(host: Host) -> dict[str, tuple[str, ...]]:
    """`weave ps`: container -> its addresses."""
    out = {}
    for line in weave(host, "ps").splitlines():
        container, _mac, *addrs = line.split()
        out[container] = tuple(addrs)
    return out


def owned(host: Host) -> dict[str, list[str]]:
    ((status, body),) = http(host, ("GET", "/ip"))
    assert status == 200, body
    return {e["containerid"]: sorted(e["addrs"]) for e in json.loads(body)["owned"] or []}


def connected(h1: Host) -> bool:
    return "established" in weave(h1, "status", "connections", check=False, timeout=10)


def test_weave_hosts_move_to_pyweave_in_place(
    tmp_path: Path, make_testbed: Callable[[int], Testbed], show_logs: Callable[[Any], None],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    tb = make_testbed(2)
    show_logs(tb)
    h1, h2 = tb.hosts
    hosts = {"h1": h1, "h2": h2}
    pids: dict[str, int] = {}
    for name, host in hosts.items():
        weave_bridge(host)
        for ident, cidr in RUNNING[name].items():
            pids[ident] = weave_container(host, cidr, processes)
    # Weave's overlay while both hosts run Weave: the bridges joined at layer 2.
    h1.run(["ip", "link", "add", STANDIN, "type", "veth", "peer", "name", STANDIN, "netns", h2.netns])
    for host in (h1, h2):
        host.run(["ip", "link", "set", STANDIN, "master", "weave", "up"])
    c1, c2 = pids["c1"], pids["c2"]
    inside(c1, "ping", "-c", "1", "-W", "5", "10.40.128.0")  # Weave's containers talk across hosts
    cross, local = tmp_path / "c1-c4.ping", tmp_path / "c1-c2.ping"
    pings = [start_ping(c1, "10.40.128.0", cross, processes), start_ping(c1, "10.40.0.2", local, processes)]
    wait_for(lambda: len(reply_times(cross)) > 5 and len(reply_times(local)) > 5, "pings under Weave")

    def migrate(host: Host, name: str, *peers: str) -> None:
        source = tmp_path / f"{name}-weavedata.db"
        shutil.copyfile(DB_DIR / f"{name}-weavedata.db", source)
        launch(host, f"--migrate-from-weave={source}", "--ipalloc-range", RANGE, "--no-fastdp", *peers)

    # Host 2 moves while host 1 still runs Weave: its containers keep talking.
    start2 = time.time()
    migrate(h2, "h2")
    wait_for(lambda: "weaver ready" in log_text(h2), "h2's router ready", hosts=[h2])
    time.sleep(2)
    end2 = time.time()
    # Host 1 moves: `weave stop` of its Weave router ends the stand-in overlay.
    start1 = time.time()
    h1.run(["ip", "link", "del", STANDIN])
    migrate(h1, "h1", h2.address)
    wait_for(lambda: connected(h1), "h1 connected to h2", hosts=tb.hosts)
    wait_for(lambda: reply_times(cross)[-1] > time.time() - 0.5, "c1 -> c4 replies again", hosts=tb.hosts,
             timeout=30)
    time.sleep(2)
    end1 = time.time()
    time.sleep(1)
    for p in pings:
        p.send_signal(signal.SIGINT)
        p.wait(10)
    gaps = {"h2 moves: c1 -> c4": longest_gap(cross, start2, end2),
            "h2 moves: c1 -> c2": longest_gap(local, start2, end2),
            "h1 moves: c1 -> c4": longest_gap(cross, start1, end1),
            "h1 moves: c1 -> c2": longest_gap(local, start1, end1)}
    print("longest ping gaps (s):", {k: round(v, 2) for k, v in gaps.items()})
    assert max(gaps.values()) <= MAX_GAP, f"{gaps}\n{diagnostics(tb.hosts)}"

    # Weave's peer names carried over; the bridge and Weave's veths were adopted, not remade.
    assert parse_peer_name((h1.state_dir / "peername").read_text()) == WV1
    assert parse_peer_name((h2.state_dir / "peername").read_text()) == WV2
    for name, host in hosts.items():
        for ident in RUNNING[name]:
            port = host.run(["ip", "-d", "-o", "link", "show", f"vethwepl{pids[ident]}"]).stdout
            assert "master weave" in port and "hairpin on" in port, port
        # weave ps lists the adopted containers; IPAM owns their addresses, and the stopped
        # containers' addresses too.
        listed = ps(host)
        held = owned(host)
        for ident, cidr in RUNNING[name].items():
            container = f"/proc/{pids[ident]}/ns/net"
            assert listed.get(container) == (cidr,), listed
            assert held.get(container) == [cidr], held
        for ident, cidr in STOPPED[name].items():
            assert held.get(ident) == [cidr], held
    status = weave(h1, "status", "ipam")
    assert "02:99:00:00:00:01" in status and "Problem" not in status, status

    # New containers get fresh addresses, from their host's own part of Weave's ring.
    taken = {c for per_host in (*RUNNING.values(), *STOPPED.values()) for c in per_host.values()}
    rings = {name: parse_weave_db((DB_DIR / f"{name}-weavedata.db").read_bytes()).ring for name in hosts}
    new: dict[str, str] = {}
    for name, host, peer in (("h1", h1, WV1), ("h2", h2, WV2)):
        for i in range(NEW_CONTAINERS if name == "h1" else 2):
            c = host.add_container(f"new{i}")
            (cidr,) = weave(host, "attach", c.netns).split()
            assert cidr not in taken and cidr not in new.values(), (cidr, taken, new)
            ring = rings[name]
            assert ring is not None and ring.owner(parse_ip(cidr.split("/")[0])) == peer, (name, cidr)
            new[f"{name}/{c.netns}"] = cidr
    # ... and reach the adopted containers on both hosts.
    fresh = next(iter(h1.containers.values()))
    for target in ("10.40.0.1", "10.40.128.1"):
        fresh.run(["ping", "-c", "1", "-W", "5", target])

    # An adopted container's DNS name, registered again (`weave dns-add`), resolves.
    weave(h1, "dns-add", f"/proc/{c2}/ns/net", "-h", "db.weave.local")
    assert weave(h1, "dns-lookup", "db").split() == ["10.40.0.2"]

    # Detaching an adopted container frees its address and name, and removes Weave's veth.
    weave(h1, "detach", str(c2))
    assert weave(h1, "dns-lookup", "db").split() == []
    assert f"vethwepl{c2}" not in h1.run(["ip", "-o", "link", "show"]).stdout
    assert f"/proc/{c2}/ns/net" not in owned(h1) and f"/proc/{c2}/ns/net" not in ps(h1)
    # An adopted container that dies is noticed as pyweave's own are: its address is freed.
    c5 = next(p for p in processes if p.pid == pids["c5"])
    c5.kill()
    c5.wait()
    wait_for(lambda: f"/proc/{pids['c5']}/ns/net" not in owned(h2), "c5's address freed", hosts=[h2])
    assert owned(h2).get(f"/proc/{pids['c4']}/ns/net") == ["10.40.128.0/16"]
    for host in (h1, h2):
        log = log_text(host)
        assert "Traceback" not in log and "cannot find the namespace" not in log, log
