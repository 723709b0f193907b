"""The fastdp VXLAN driver on the real kernel: two hosts (network namespaces) on an underlay.

Layout (all in namespaces made by router.testbed, prefix "pwf" + random hex)::

    switch netns: bridge br0 ── host1 (10.98.0.1) ── host2 (10.98.0.2)
    each host:    bridge "weave" (MTU 1376) ── vxlan-6784 ── veth to a container (10.40.0.N/16)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from fastdp import vxlan
from fastdp.vxlan import ZERO_MAC, VxlanError, netns_context, open_ipr
from router.testbed import Container, Host, Testbed

pytestmark = pytest.mark.netns

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

MTU = 1376


@dataclass
class Fabric:
    """A test bed with a weave bridge, vxlan-6784 and one container on each of two hosts."""

    tb: Testbed
    hosts: list[Host]
    containers: list[Container] = field(default_factory=list)

    def container_ip(self, i: int) -> str:
        return f"10.40.0.{i + 1}"


def make_bridge(netns: str, name: str = "weave", mtu: int = MTU) -> int:
    with open_ipr(netns) as ipr:
        ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, state="up")
        return index


def add_container(host: Host, index: int, bridge: str = "weave") -> Container:
    """A container netns with eth0 (10.40.0.index+1/16) on `host`'s bridge."""
    c = host.add_container(f"c{index}")
    port = f"pwfc{index}"
    with open_ipr(host.netns) as ipr:
        ipr.link("add", ifname=port, kind="veth", mtu=MTU,
                 peer={"ifname": "eth0", "mtu": MTU, "net_ns_fd": str(c.netns_path)})
        j = ipr.link_lookup(ifname=port)[0]
        ipr.link("set", index=j, master=ipr.link_lookup(ifname=bridge)[0])
        ipr.link("set", index=j, state="up")
    with open_ipr(c.netns) as ipr:
        j = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=j, address=f"10.40.0.{index + 1}", prefixlen=16)
        ipr.link("set", index=j, state="up")
    return c


def build_fabric(tb: Testbed, containers: bool = True) -> Fabric:
    fab = Fabric(tb, [tb.add_host(), tb.add_host()])
    for i, h in enumerate(fab.hosts):
        make_bridge(h.netns)
        vxlan.ensure_vxlan(netns=h.netns)
        if containers:
            fab.containers.append(add_container(h, i))
    h1, h2 = fab.hosts
    vxlan.add_peer(h2.address, netns=h1.netns)
    vxlan.add_peer(h1.address, netns=h2.netns)
    return fab


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Testbed(prefix="pwf" + secrets.token_hex(2)) as tb:
        yield build_fabric(tb)


@pytest.fixture
def lone_netns() -> Iterator[str]:
    """One empty namespace with a weave bridge."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    name = "pwf" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        make_bridge(name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def links(netns: str) -> set[str]:
    with open_ipr(netns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


# --- tests -----------------------------------------------------------------------------------


@needs_root
def test_available(lone_netns: str) -> None:
    ok, reason = vxlan.available(lone_netns)
    assert ok, reason
    assert links(lone_netns) == {"lo", "weave"}  # the throwaway device is gone


@needs_root
def test_ensure_vxlan_settings(lone_netns: str) -> None:
    index = vxlan.ensure_vxlan(netns=lone_netns)
    info = vxlan.describe(netns=lone_netns)
    assert info is not None and info.ifindex == index and info.name == "vxlan-6784"
    assert (info.vni, info.port, info.mtu) == (vxlan.DEFAULT_VNI, 6784, MTU)
    assert info.learning and info.up and info.udp_csum
    assert info.df == vxlan.IFLA_VXLAN_DF_SET
    with open_ipr(lone_netns) as ipr:
        assert info.master == ipr.link_lookup(ifname="weave")[0]
    assert info.isolated is True and info.bridge_learning is True
    assert vxlan.peers(netns=lone_netns) == []


@needs_root
def test_ensure_vxlan_replaces_a_stale_device(lone_netns: str) -> None:
    first = vxlan.ensure_vxlan(netns=lone_netns, vni=4242)
    vxlan.add_peer("10.99.0.7", netns=lone_netns)
    second = vxlan.ensure_vxlan(netns=lone_netns)
    assert second != first
    info = vxlan.describe(netns=lone_netns)
    assert info is not None and info.vni == vxlan.DEFAULT_VNI
    assert vxlan.peers(netns=lone_netns) == []  # stale FDB went with the stale device


@needs_root
def test_ensure_vxlan_options(lone_netns: str) -> None:
    vxlan.ensure_vxlan(netns=lone_netns, port=6790, vni=77, mtu=1400, local_ip="10.99.0.1")
    info = vxlan.describe(port=6790, netns=lone_netns)
    assert info is not None and (info.name, info.port, info.vni, info.mtu) == ("vxlan-6790", 6790, 77, 1400)
    assert vxlan.teardown(port=6790, netns=lone_netns)


@needs_root
def test_ensure_vxlan_errors(lone_netns: str) -> None:
    with pytest.raises(VxlanError, match="bridge 'nosuch' does not exist"):
        vxlan.ensure_vxlan(bridge="nosuch", netns=lone_netns)
    with pytest.raises(ValueError):
        vxlan.ensure_vxlan(vni=1 << 24, netns=lone_netns)
    with pytest.raises(VxlanError, match="does not exist"):
        vxlan.add_peer("10.99.0.2", netns=lone_netns)
    vxlan.ensure_vxlan(netns=lone_netns)
    with pytest.raises(ValueError):
        vxlan.add_peer("not-an-ip", netns=lone_netns)


@needs_root
def test_add_peer_is_idempotent_append(lone_netns: str) -> None:
    vxlan.ensure_vxlan(netns=lone_netns)
    assert vxlan.add_peer("10.99.0.2", netns=lone_netns)
    assert vxlan.add_peer("10.99.0.10", netns=lone_netns)
    assert not vxlan.add_peer("10.99.0.2", netns=lone_netns)
    assert vxlan.peers(netns=lone_netns) == ["10.99.0.2", "10.99.0.10"]
    entries = vxlan.fdb_entries(netns=lone_netns)
    assert sorted((e.mac, e.dst, e.static) for e in entries) == [
        (ZERO_MAC, "10.99.0.10", True), (ZERO_MAC, "10.99.0.2", True)]
    assert vxlan.remove_peer("10.99.0.2", netns=lone_netns) == 1
    assert vxlan.remove_peer("10.99.0.2", netns=lone_netns) == 0
    assert vxlan.peers(netns=lone_netns) == ["10.99.0.10"]


@needs_root
def test_add_peers_appends_many_over_one_socket(lone_netns: str) -> None:
    vxlan.ensure_vxlan(netns=lone_netns)
    vxlan.add_peer("10.99.0.2", netns=lone_netns)
    # One already there, two new, one twice: each ends up with exactly one entry.
    outcome = vxlan.add_peers(["10.99.0.2", "10.99.0.3", "10.99.0.4", "10.99.0.3"], netns=lone_netns)
    assert outcome == {"10.99.0.2": None, "10.99.0.3": None, "10.99.0.4": None}
    entries = vxlan.fdb_entries(netns=lone_netns)
    assert sorted(e.dst for e in entries) == ["10.99.0.2", "10.99.0.3", "10.99.0.4"]
    assert all(e.mac == ZERO_MAC and e.static for e in entries)
    with pytest.raises(ValueError):
        vxlan.add_peers(["10.99.0.5", "not-an-ip"], netns=lone_netns)
    assert vxlan.peers(netns=lone_netns) == ["10.99.0.2", "10.99.0.3", "10.99.0.4"]


@needs_root
def test_teardown_leaves_nothing(lone_netns: str) -> None:
    vxlan.ensure_vxlan(netns=lone_netns)
    vxlan.add_peer("10.99.0.2", netns=lone_netns)
    assert vxlan.teardown(netns=lone_netns)
    assert links(lone_netns) == {"lo", "weave"}
    assert vxlan.describe(netns=lone_netns) is None
    with open_ipr(lone_netns) as ipr:
        assert [m for m in ipr.fdb("dump") if m.get_attr("NDA_DST") == "10.99.0.2"] == []
    assert not vxlan.teardown(netns=lone_netns)


@needs_root
def test_netns_context_restores_the_namespace(lone_netns: str) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino
    with pytest.raises(RuntimeError), netns_context(lone_netns):
        assert os.stat("/proc/thread-self/ns/net").st_ino != before
        raise RuntimeError("boom")
    assert os.stat("/proc/thread-self/ns/net").st_ino == before
    with pytest.raises(FileNotFoundError), netns_context("pwf-does-not-exist-" + uuid.uuid4().hex[:6]):
        pass
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


@needs_root
def test_containers_talk_through_vxlan(fabric: Fabric) -> None:
    c1, c2 = fabric.containers
    h1, h2 = fabric.hosts
    assert c1.ping(fabric.container_ip(1), count=3)
    assert c2.ping(fabric.container_ip(0), count=3)
    # The traffic went through the tunnel: h1's vxlan learned c2's MAC behind h2.
    learned = [e for e in vxlan.fdb_entries(netns=h1.netns) if e.mac != ZERO_MAC]
    assert learned and all(e.dst == h2.address and not e.static for e in learned)


@needs_root
def test_remove_peer_flushes_learned_entries(fabric: Fabric) -> None:
    c1, _ = fabric.containers
    h1, h2 = fabric.hosts
    assert c1.ping(fabric.container_ip(1), count=3)
    learned = {e.mac for e in vxlan.fdb_entries(netns=h1.netns) if e.mac != ZERO_MAC}
    assert learned
    try:
        # h2 first, so that nothing it still sends (ARP, ND) re-teaches h1 while we look.
        vxlan.remove_peer(h1.address, netns=h2.netns)
        removed = vxlan.remove_peer(h2.address, netns=h1.netns)
        assert removed >= len(learned) + 1
        assert vxlan.fdb_entries(netns=h1.netns) == []
        assert vxlan.peers(netns=h1.netns) == []
        # The bridge forgot that those MACs live behind the VXLAN port, too.
        with open_ipr(h1.netns) as ipr:
            index = ipr.link_lookup(ifname="vxlan-6784")[0]
            on_port = {m.get_attr("NDA_LLADDR") for m in ipr.fdb("dump") if m["ifindex"] == index}
        assert not on_port & learned
        # Without its FDB entry, h1 has no way to h2 (no sleeve here).
        assert not c1.ping(fabric.container_ip(1), count=1, timeout=0.5)
    finally:
        vxlan.add_peer(h1.address, netns=h2.netns)
        vxlan.add_peer(h2.address, netns=h1.netns)
    assert c1.ping(fabric.container_ip(1), count=3)
