"""The fastdp service on the real kernel: trio services driving vxlan-6784 in host namespaces.

Layout (router.testbed, one module-wide test bed)::

    switch netns: br0 ── host1 (10.98.0.1) ── host2 (10.98.0.2) ── host3 (10.98.0.3)
    each host:    bridge "weave" (MTU 1376) ── container c (10.40.0.N/16, router.containers.attach)

Most tests run one FastdpService per host inside the test's own trio run, each with
``netns=<host namespace>``: every netlink call and both probe sockets are made inside
that namespace, exactly as the daemon makes them inside its own. One test runs the
service the daemon's way instead: a Python process started inside the host namespace
(``netns=None``) that prints its state changes as JSON lines and stops on SIGTERM.
There is no sleeve here, so a container ping that works went through the VXLAN device.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from fastdp import probe, vxlan
from fastdp.health import HealthConfig, LinkState
from fastdp.service import FastdpService, FastdpState
from router.bridge import ensure_bridge
from router.containers import attach
from router.testbed import Container, Host, Testbed

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("nft") is None,
                       reason="the test bed needs iproute2 (ip) and nftables (nft)"),
]

REPO = Path(__file__).resolve().parents[1]
MTU = 1376
BRIDGE = "weave"
NAME_BASE = 0x02_00_00_F0_00_00


@dataclass
class Site:
    index: int
    host: Host
    container: Container
    name: int  # peer name

    @property
    def ip(self) -> str:
        return self.host.address

    @property
    def container_ip(self) -> str:
        return f"10.40.0.{self.index + 1}"


@dataclass
class Fabric:
    tb: Testbed
    sites: list[Site]


def conn_uid(a: Site, b: Site) -> int:
    """Both ends of a mesh connection know the same ConnUID."""
    lo, hi = sorted((a.index, b.index))
    return 0xC0FF_EE00_0000_0000 | lo << 8 | hi


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    with Testbed() as tb:
        sites = []
        for i in range(3):
            host = tb.add_host()
            ensure_bridge(BRIDGE, MTU, netns=host.netns)
            c = host.add_container("c")
            attach(c.netns, [f"10.40.0.{i + 1}/16"], BRIDGE, MTU, netns=host.netns)
            sites.append(Site(i, host, c, NAME_BASE + i + 1))
        yield Fabric(tb, sites)


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # trio time
    site: int
    state: FastdpState


@dataclass
class Run:
    services: dict[int, FastdpService] = field(default_factory=dict)  # site index -> service
    events: list[Event] = field(default_factory=list)
    started: float = 0.0  # trio time when every service ran and knew its peers

    def record(self, site: int, peer: int, state: FastdpState) -> None:
        assert peer == state.peer
        self.events.append(Event(trio.current_time(), site, state))

    def healthy(self, a: Site, b: Site) -> bool | None:
        st = self.services[a.index].state(b.name)
        return None if st is None else st.healthy

    def changes(self, a: Site, b: Site, since: float = 0.0) -> list[Event]:
        return [e for e in self.events if e.site == a.index and e.state.peer == b.name and e.at >= since]


@asynccontextmanager
async def services(sites: list[Site], config: HealthConfig | None = None,
                   pairs: list[tuple[Site, Site]] | None = None) -> AsyncIterator[Run]:
    """One FastdpService per site (in its host namespace), each monitoring the others."""
    run = Run()
    async with trio.open_nursery() as nursery:
        for s in sites:
            svc = FastdpService(s.name, BRIDGE, MTU, on_change=functools.partial(run.record, s.index),
                                config=config, netns=s.host.netns)
            await nursery.start(svc.run)
            assert svc.available, svc.unavailable_reason
            run.services[s.index] = svc
        shares = {}
        for a, b in pairs if pairs is not None else [(a, b) for a in sites for b in sites if a is not b]:
            shares[a.index, b.index] = run.services[a.index].add_peer(b.name, conn_uid(a, b), b.ip)
        for (a_i, b_i), share in shares.items():  # what the switch sends over the mesh connection
            if (b_i, a_i) in shares and share is not None:
                run.services[b_i].set_peer_share(sites_by_index(sites, a_i).name, conn_uid(
                    sites_by_index(sites, a_i), sites_by_index(sites, b_i)), share)
        run.started = trio.current_time()
        yield run
        nursery.cancel_scope.cancel()


def sites_by_index(sites: list[Site], index: int) -> Site:
    return next(s for s in sites if s.index == index)


async def wait_until(probe_: Callable[[], object], what: str, timeout: float) -> float:
    """Poll until `probe_()` is true; returns how long it took."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not probe_():
            await trio.sleep(0.01)
        return trio.current_time() - start
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


async def in_thread(fn: Callable[..., object], *args: object) -> object:
    return await trio.to_thread.run_sync(fn, *args)


def fdb_peers(site: Site) -> list[str]:
    return vxlan.peers(netns=site.host.netns)


def learned_behind(site: Site, peer: Site) -> list[str]:
    """MACs `site`'s kernel sends to `peer` (but not the peer's probe MAC, learned from its heartbeats)."""
    harmless = {vxlan.ZERO_MAC, ":".join(f"{x:02x}" for x in probe.probe_mac(peer.name))}
    return [e.mac for e in vxlan.fdb_entries(netns=site.host.netns) if e.dst == peer.ip and e.mac not in harmless]


def vxlan_tx_packets(site: Site) -> int:
    with vxlan.open_ipr(site.host.netns) as ipr:
        (link,) = ipr.get_links(ipr.link_lookup(ifname=vxlan.device_name())[0])
        return int(link.get_attr("IFLA_STATS64")["tx_packets"])


def link_names(site: Site) -> set[str]:
    with vxlan.open_ipr(site.host.netns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def assert_nothing_left(site: Site) -> None:
    names = link_names(site)
    assert not names & {vxlan.device_name(), probe.PORT_IFNAME, probe.PROBE_IFNAME}, names
    assert BRIDGE in names  # the bridge is not the service's


async def ping(src: Site, dst: Site, count: int = 2, timeout: float = 1.0) -> bool:
    return bool(await in_thread(src.container.ping, dst.container_ip, count, timeout))


# --- tests -----------------------------------------------------------------------------------


async def test_peers_become_healthy_and_carry_container_traffic(fabric: Fabric) -> None:
    a, b = fabric.sites[:2]
    async with services([a, b]) as run:
        took = await wait_until(lambda: run.healthy(a, b) and run.healthy(b, a), "both links healthy", 3.0)
        print(f"\nconfirmed after {took:.3f} s")
        assert took < 1.0
        for x, y in ((a, b), (b, a)):
            assert await in_thread(fdb_peers, x) == [y.ip]
            st = run.services[x.index].state(y.name)
            assert st is not None and st.link is LinkState.HEALTHY and st.reason.startswith("confirmed")
            assert st.peer_ip == y.ip and st.conn_uid == conn_uid(x, y) and st.rtt is not None
            assert [e.state.healthy for e in run.changes(x, y)] == [True]  # reported once, after the kernel
            info = await in_thread(vxlan.describe, vxlan.DEFAULT_PORT, x.host.netns)
            assert isinstance(info, vxlan.VxlanInfo) and info.mtu == MTU and info.isolated

        tx_before = [await in_thread(vxlan_tx_packets, s) for s in (a, b)]
        assert await ping(a, b, count=3)
        tx_after = [await in_thread(vxlan_tx_packets, s) for s in (a, b)]
        assert all(after > before for before, after in zip(tx_before, tx_after, strict=True)), (tx_before, tx_after)
        assert await in_thread(learned_behind, a, b)  # the kernel learned b's container behind b

        # Idempotent calls from the switch change nothing.
        svc = run.services[a.index]
        svc.add_peer(b.name, conn_uid(a, b), b.ip)
        svc.remove_peer(b.name, conn_uid(a, b) + 1)  # not its connection
        await trio.sleep(0.3)
        assert run.healthy(a, b) and len(run.changes(a, b)) == 1
        with pytest.raises(ValueError):
            svc.add_peer(b.name, 1, "not-an-ip")
        with pytest.raises(ValueError):
            svc.add_peer(a.name, 1, a.ip)
        stopped_at = trio.current_time()
    # Leaving the block cancelled both services: the links they carried are reported down.
    for x, y in ((a, b), (b, a)):
        stopped = [e.state for e in run.changes(x, y, stopped_at)]
        assert [(st.healthy, st.reason) for st in stopped] == [(False, "fastdp stopped")]
        await in_thread(assert_nothing_left, x)


async def test_blocked_port_fails_over_and_comes_back(fabric: Fabric) -> None:
    a, b = fabric.sites[:2]
    tb = fabric.tb
    async with services([a, b]) as run:
        await wait_until(lambda: run.healthy(a, b) and run.healthy(b, a), "both links healthy", 3.0)
        assert await ping(a, b)
        assert await in_thread(learned_behind, a, b)

        await in_thread(tb.block, a.host, b.host, "udp", 6784)
        try:
            broke = trio.current_time()
            took = await wait_until(lambda: run.healthy(a, b) is False and run.healthy(b, a) is False,
                                    "both links unhealthy", 6.0)
            print(f"\nfailover detected and applied after {took:.3f} s")
            assert took < 3.0
            for x, y in ((a, b), (b, a)):
                assert await in_thread(fdb_peers, x) == []
                assert await in_thread(learned_behind, x, y) == []
                st = run.services[x.index].state(y.name)
                assert st is not None and st.link is LinkState.UNHEALTHY
                assert st.reason.startswith("heartbeats lost"), st.reason
                assert st.failovers == 1 and st.last_failover is not None and st.last_failover < 3.0
                print(f"  {x.host.name}: {st.reason}; failover {st.last_failover:.3f} s after the last heartbeat")
                assert [e.state.healthy for e in run.changes(x, y, broke)] == [False]
            assert not await ping(a, b, count=1, timeout=0.5)  # no sleeve here: nothing carries it
        finally:
            await in_thread(tb.unblock, a.host, b.host, "udp", 6784)
        healed = trio.current_time()
        took = await wait_until(lambda: run.healthy(a, b) and run.healthy(b, a), "both links healthy again", 12.0)
        print(f"returned to fastdp {took:.3f} s after the port was unblocked")
        assert took < 10.0
        for x, y in ((a, b), (b, a)):
            assert await in_thread(fdb_peers, x) == [y.ip]
            st = run.services[x.index].state(y.name)
            assert st is not None and st.returns == 1 and st.last_return is not None
            assert st.reason.startswith("healthy again")
            assert st.since >= healed and st.last_transition is not None
            print(f"  {x.host.name}: {st.reason}; return {st.last_return:.3f} s after the clean run began")
        assert await ping(a, b, count=3)


STRAY_MAC = "02:5a:5a:5a:5a:01"


def send_stray_frame(src: Site, dst: Site) -> None:
    """A broadcast from a made-up MAC, VXLAN-encapsulated from src's namespace to dst:6784."""
    inner = b"\xff" * 6 + bytes.fromhex(STRAY_MAC.replace(":", "")) + b"\x88\xb6" + bytes(46)
    with vxlan.netns_context(src.host.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.sendto(probe.encode_vxlan(vxlan.DEFAULT_VNI, inner), (dst.ip, vxlan.DEFAULT_PORT))


async def test_one_way_block_and_macs_learned_behind_a_dead_peer(fabric: Fabric) -> None:
    a, b = fabric.sites[:2]
    tb = fabric.tb
    async with services([a, b]) as run:
        await wait_until(lambda: run.healthy(a, b) and run.healthy(b, a), "both links healthy", 3.0)
        await in_thread(functools.partial(tb.block, a.host, b.host, "udp", 6784, one_way=True))
        try:
            took = await wait_until(lambda: run.healthy(a, b) is False and run.healthy(b, a) is False,
                                    "both links unhealthy", 6.0)
            assert took < 3.0
            reasons = {x.host.name: run.services[x.index].state(y.name).reason  # type: ignore[union-attr]
                       for x, y in ((a, b), (b, a))}
            assert all(r.startswith("heartbeats lost") for r in reasons.values()), reasons
            # b -> a still works, so a frame from b makes a's kernel learn a MAC behind b
            # again (as one sent by b's kernel a moment before b, too, gave up would).
            svc = run.services[a.index]
            before = svc.stats["swept"]
            await in_thread(send_stray_frame, b, a)
            await wait_until(lambda: svc.stats["swept"] > before, "the stray MAC swept", 3.0)
            assert STRAY_MAC not in await in_thread(learned_behind, a, b)
            assert await in_thread(fdb_peers, a) == []
        finally:
            await in_thread(functools.partial(tb.unblock, a.host, b.host, "udp", 6784, one_way=True))


async def test_three_hosts_one_broken_pair(fabric: Fabric) -> None:
    a, b, c = fabric.sites
    tb = fabric.tb
    pairs = [(x, y) for x in fabric.sites for y in fabric.sites if x is not y]
    async with services(fabric.sites) as run:
        took = await wait_until(lambda: all(run.healthy(x, y) for x, y in pairs), "all six links healthy", 3.0)
        assert took < 1.0
        for x in fabric.sites:
            assert await in_thread(fdb_peers, x) == sorted(y.ip for y in fabric.sites if y is not x)

        await in_thread(tb.block, a.host, c.host, "udp", 6784)
        try:
            broke = trio.current_time()
            took = await wait_until(lambda: run.healthy(a, c) is False and run.healthy(c, a) is False,
                                    "a-c unhealthy", 6.0)
            assert took < 3.0
            await trio.sleep(0.3)
            for x, y in pairs:
                if {x.index, y.index} != {a.index, c.index}:
                    assert run.healthy(x, y) and not run.changes(x, y, broke), (x.host.name, y.host.name)
            assert await in_thread(fdb_peers, a) == [b.ip]
            assert await in_thread(fdb_peers, c) == [b.ip]
            assert await in_thread(fdb_peers, b) == [a.ip, c.ip]
            assert await ping(a, b, count=1)
            assert not await ping(a, c, count=1, timeout=0.5)
        finally:
            await in_thread(tb.unblock, a.host, c.host, "udp", 6784)
        took = await wait_until(lambda: all(run.healthy(x, y) for x, y in pairs), "all links healthy again", 12.0)
        assert took < 10.0
        # c1's ARP entry for c3 may still be failing from the blocked attempt: give it a few tries.
        assert await ping(a, c, count=3)


async def test_too_small_path_mtu_keeps_the_peer_off_fastdp(fabric: Fabric) -> None:
    a, b = fabric.sites[:2]
    switch_port = b.host.netns  # the switch-side veth is named after the host's namespace
    config = HealthConfig(confirm_timeout=1.0)
    await in_thread(_set_switch_mtu, fabric.tb, switch_port, 1400)
    try:
        async with services([a, b], config=config) as run:
            await wait_until(lambda: all(run.changes(x, y) for x, y in ((a, b), (b, a))), "not confirmed", 3.0)
            for x, y in ((a, b), (b, a)):
                (event,) = run.changes(x, y)
                assert not event.state.healthy and event.state.link is LinkState.UNHEALTHY
                assert event.state.reason.startswith("not confirmed"), event.state.reason
                assert await in_thread(fdb_peers, x) == []
            # Small frames would cross, full-size ones would vanish: no entry, so no blackhole.
            st = run.services[a.index].state(b.name)
            assert st is not None and not st.healthy
            await in_thread(_set_switch_mtu, fabric.tb, switch_port, 1500)
            took = await wait_until(lambda: run.healthy(a, b) and run.healthy(b, a), "healthy once it fits", 3.0)
            assert took < 1.5
    finally:
        await in_thread(_set_switch_mtu, fabric.tb, switch_port, 1500)


def _set_switch_mtu(tb: Testbed, port: str, mtu: int) -> None:
    with vxlan.open_ipr(tb.switch_netns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=port)[0], mtu=mtu)


async def test_remove_peer_and_cancellation_leave_nothing(fabric: Fabric) -> None:
    a, b = fabric.sites[:2]
    async with services([a, b]) as run:
        await wait_until(lambda: run.healthy(a, b) and run.healthy(b, a), "both links healthy", 3.0)
        assert await ping(a, b)
        svc = run.services[a.index]
        svc.remove_peer(b.name, conn_uid(a, b))
        svc.remove_peer(b.name, conn_uid(a, b))
        assert svc.state(b.name) is None
        await wait_until(lambda: len(run.changes(a, b)) == 2, "a reports b gone", 2.0)
        gone = run.changes(a, b)[-1].state
        assert not gone.healthy and gone.reason == "connection closed" and gone.failovers == 0
        assert await in_thread(fdb_peers, a) == []
        # b still sends (it has not noticed yet); what a's kernel learns meanwhile is swept.
        await wait_until(lambda: run.healthy(b, a) is False, "b gives up on a", 3.0)
        await trio.sleep(0.1)
        await wait_until(lambda: not learned_behind(a, b), "nothing learned behind b", 2.0)
        for s in (a, b):
            assert {vxlan.device_name(), probe.PORT_IFNAME, probe.PROBE_IFNAME} <= await in_thread(link_names, s)
    for s in (a, b):
        assert not run.services[s.index].running
        await in_thread(assert_nothing_left, s)


async def test_unavailable_kernel_is_reported_once(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(vxlan, "available", lambda netns=None: (False, "cannot create a vxlan device: nope"))
    svc = FastdpService(NAME_BASE + 1, BRIDGE, MTU)
    with caplog.at_level(logging.INFO, logger="fastdp"):
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            svc.add_peer(NAME_BASE + 2, 1, "10.98.0.2")
    assert not svc.available and svc.unavailable_reason == "cannot create a vxlan device: nope"
    assert svc.state(NAME_BASE + 2) is None
    lines = [r for r in caplog.records if r.name.startswith("fastdp")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "unavailable" in lines[0].getMessage()


async def test_setup_failure_is_unavailable_and_leaves_nothing(fabric: Fabric) -> None:
    site = fabric.sites[2]
    svc = FastdpService(site.name, "nosuchbr", MTU, netns=site.host.netns)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
    assert not svc.available
    assert svc.unavailable_reason is not None and "nosuchbr" in svc.unavailable_reason
    await in_thread(assert_nothing_left, site)


# --- the daemon's way: a process inside the host namespace -----------------------------------

DAEMON = r"""
import json, logging, signal, sys, time
import trio
from fastdp import linkkey
from fastdp.service import FastdpService

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
ourself, peers = int(sys.argv[1]), json.loads(sys.argv[2])
# The test plays the mesh connection: each side's key share is known to the other.
linkkey.new_share = lambda: ourself.to_bytes(32, "big")

def emit(**kw):
    print(json.dumps({"t": time.time(), **kw}), flush=True)

def on_change(peer, st):
    emit(event="change", peer=peer, healthy=st.healthy, link=st.link.value, reason=st.reason)

async def main():
    svc = FastdpService(ourself, "weave", 1376, on_change=on_change)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            for name, uid, ip in peers:
                svc.add_peer(name, uid, ip)
                svc.set_peer_share(name, uid, name.to_bytes(32, "big"))
            emit(event="started", available=svc.available)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    emit(event="stopped")

trio.run(main)
"""


def read_events(host: Host, name: str) -> list[dict[str, object]]:
    path = host.log_path(name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_events(host: Host, name: str, pred: Callable[[list[dict[str, object]]], bool], timeout: float
                ) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = read_events(host, name)
        if pred(events):
            return events
        time.sleep(0.02)
    log = host.log_path(name).read_text() if host.log_path(name).exists() else "<no log>"
    pytest.fail(f"{host.name}/{name}: timed out after {timeout} s; log:\n{log}")


def test_daemon_process_in_host_namespace(fabric: Fabric) -> None:
    a, b = fabric.sites[:2]
    name = f"fastdp-{os.getpid()}"
    env = {"PYTHONPATH": str(REPO)}
    for x, y in ((a, b), (b, a)):
        peers = json.dumps([[y.name, conn_uid(x, y), y.ip]])
        x.host.spawn([sys.executable, "-c", DAEMON, str(x.name), peers], name, env=env)
    try:
        evs = {}
        for x in (a, b):
            evs[x.index] = wait_events(x.host, name, lambda e: any(v.get("healthy") for v in e), 15.0)
        started = max(next(v["t"] for v in evs[x.index] if v["event"] == "started") for x in (a, b))
        healthy = max(next(v["t"] for v in evs[x.index] if v.get("healthy")) for x in (a, b))
        assert isinstance(started, float) and isinstance(healthy, float)
        print(f"\nhealthy {healthy - started:.3f} s after the second daemon started")
        assert healthy - started < 1.0
        assert fdb_peers(a) == [b.ip] and fdb_peers(b) == [a.ip]
        assert a.container.ping(b.container_ip, count=2)
    finally:
        codes = [x.host.stop(name, signal.SIGTERM, timeout=10) for x in (a, b)]
    assert codes == [0, 0]
    for x in (a, b):
        events = read_events(x.host, name)
        assert events[-1]["event"] == "stopped"
        assert events[-2]["event"] == "change" and events[-2]["healthy"] is False
        assert_nothing_left(x)
