"""router/containers.py against the real kernel: resolve, attach, detach, list_attached."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from router import bridge as br
from router import containers as ct
from router.containers import Attachment, ContainerError, Detachment
from router.testbed import Container, Host, Testbed

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
                       reason="needs root, iproute2 and nftables (network namespaces)"),
]

A1 = ipaddress.IPv4Interface("10.40.0.1/24")
A2 = ipaddress.IPv4Interface("10.40.0.2/24")
B1 = ipaddress.IPv4Interface("10.41.0.1/16")


@pytest.fixture
def host(module_testbed: Testbed) -> Host:
    h = module_testbed.add_host()
    br.ensure_bridge(netns=h.netns)
    return h


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes (e.g. holding an anonymous netns); all killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", netns, "-j", "-d", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def links(netns: str) -> dict[str, dict[str, Any]]:
    return {x["ifname"]: x for x in ip_json(netns, "link", "show")}


def addrs(netns: str, ifname: str) -> set[ipaddress.IPv4Interface]:
    out = set()
    for link in ip_json(netns, "-4", "addr", "show", "dev", ifname):
        for a in link.get("addr_info", []):
            out.add(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
    return out


def host_veths(host: Host) -> set[str]:
    return {n for n in links(host.netns) if n.startswith("vethwepl")}


def wait_sleeping(p: subprocess.Popen[bytes]) -> None:
    """Wait until the process started by `unshare -n` has its own namespace."""
    own = os.stat("/proc/self/ns/net").st_ino
    for _ in range(200):
        try:
            if os.stat(f"/proc/{p.pid}/ns/net").st_ino != own:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError("unshare did not start")


# --- resolve -------------------------------------------------------------------------------


def test_resolve_name_path_pid(host: Host, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    c = host.add_container("c1")
    by_name = ct.resolve(c.netns)
    assert by_name.container == c.netns and by_name.path == f"/run/netns/{c.netns}"
    assert ct.resolve(f"/run/netns/{c.netns}") == by_name
    assert ct.resolve(f"/var/run/netns/{c.netns}") == by_name
    p = spawn(c.exec_argv(["sleep", "30"]))
    for _ in range(200):  # until `ip netns exec` has entered the namespace
        if os.stat(f"/proc/{p.pid}/ns/net").st_ino == by_name.inode:
            break
        time.sleep(0.01)
    assert ct.resolve(p.pid) == by_name  # a PID in a named netns resolves to the name
    assert ct.resolve(str(p.pid)) == by_name
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    r = ct.resolve(anon.pid)
    assert r.container == r.path == f"/proc/{anon.pid}/ns/net"


def test_resolve_errors(tmp_path: Any) -> None:
    with pytest.raises(ContainerError, match="named netns 'pwt-nonexistent' does not exist"):
        ct.resolve("pwt-nonexistent")
    with pytest.raises(ContainerError, match="process 999999999 does not exist"):
        ct.resolve(999999999)
    with pytest.raises(ContainerError, match="does not exist"):
        ct.resolve(tmp_path / "nope")
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ContainerError, match="not a network namespace"):
        ct.resolve(str(regular))
    with pytest.raises(ContainerError, match="not a network namespace"):
        ct.resolve("/proc/self/ns/uts")
    with pytest.raises(ContainerError, match="invalid"):
        ct.resolve("")


def test_host_veth_name_scheme() -> None:
    names = {ct.host_veth_name(i) for i in (4026531840, 4026531841, 4026532999, 2**32 - 1)}
    assert len(names) == 4
    assert all(len(n) == 15 and n.startswith("vethwepl") for n in names)
    assert ct._inode_from_name(ct.host_veth_name(4026532999)) == 4026532999
    big = ct.host_veth_name(2**40)
    assert len(big) == 15 and big == ct.host_veth_name(2**40)


# --- attach ------------------------------------------------------------------------------


def test_attach_sets_up_both_ends(host: Host) -> None:
    c = host.add_container("c1")
    att = ct.attach(c.netns, [A1], netns=host.netns)
    ns = ct.resolve(c.netns)
    assert att == Attachment(container=c.netns, netns=f"/run/netns/{c.netns}",
                             host_ifname=ct.host_veth_name(ns.inode), mac=att.mac, addresses=(A1,), ifname="ethwe")
    hl = links(host.netns)[att.host_ifname]
    assert hl["master"] == "weave" and "UP" in hl["flags"] and hl["mtu"] == 1376
    assert hl["linkinfo"]["info_kind"] == "veth"
    cl = links(c.netns)
    assert set(cl) == {"lo", "ethwe"}
    assert cl["ethwe"]["mtu"] == 1376 and "UP" in cl["ethwe"]["flags"] and cl["ethwe"]["address"] == att.mac
    assert "UP" in cl["lo"]["flags"]
    assert addrs(c.netns, "ethwe") == {A1}
    routes = ip_json(c.netns, "route", "show", "224.0.0.0/4")
    assert [(r["dst"], r["dev"], r.get("scope")) for r in routes] == [("224.0.0.0/4", "ethwe", "link")]
    assert c.run(["cat", "/proc/sys/net/ipv4/neigh/ethwe/ucast_solicit"]).stdout.strip() == "1"
    assert br.get_tx_checksum("ethwe", netns=c.netns) is True


def test_attach_is_idempotent_and_adds_missing(host: Host, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    c = host.add_container("c1")
    first = ct.attach(c.netns, [A1], netns=host.netns)
    assert ct.attach(c.netns, [A1], netns=host.netns) == first
    assert ct.attach(f"/run/netns/{c.netns}", ["10.40.0.1/24"], netns=host.netns) == first
    p = spawn(c.exec_argv(["sleep", "30"]))
    ino = ct.resolve(c.netns).inode
    for _ in range(200):
        if os.stat(f"/proc/{p.pid}/ns/net").st_ino == ino:
            break
        time.sleep(0.01)
    assert ct.attach(p.pid, [A1], netns=host.netns) == first
    more = ct.attach(c.netns, [A1, B1], netns=host.netns)
    assert more == Attachment(first.container, first.netns, first.host_ifname, first.mac, (A1, B1))
    assert addrs(c.netns, "ethwe") == {A1, B1}
    assert len(host_veths(host)) == 1


def test_ping_between_two_attached_containers(host: Host) -> None:
    c1, c2 = host.add_container("c1"), host.add_container("c2")
    a1 = ct.attach(c1.netns, [A1], netns=host.netns)
    a2 = ct.attach(c2.netns, [A2], netns=host.netns)
    assert a1.host_ifname != a2.host_ifname
    assert c1.ping(str(A2.ip), count=3)
    assert c2.ping(str(A1.ip), count=3)


def _nothing_left(host: Host, c: Container) -> None:
    assert host_veths(host) == set()
    assert set(links(c.netns)) == {"lo"}


@pytest.mark.parametrize("bad", ["224.1.1.1/24", "10.40.0.0/24", "10.40.0.255/24", "0.0.0.0/8",
                                 "127.0.0.2/8", "fd00::1/64", "10.40.0.300/24", "nonsense"])
def test_attach_bad_address(host: Host, bad: str) -> None:
    c = host.add_container("c1")
    with pytest.raises(ContainerError, match="bad address"):
        ct.attach(c.netns, [A1, bad], netns=host.netns)
    _nothing_left(host, c)
    first = ct.attach(c.netns, [A1], netns=host.netns)
    with pytest.raises(ContainerError, match="bad address"):
        ct.attach(c.netns, [B1, bad], netns=host.netns)
    assert ct.list_attached(netns=host.netns) == [first]


def test_attach_rolls_back_a_new_veth(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    c = host.add_container("c1")
    real = ct._configure_inside

    def half_way(index: int, mtu: int, new: Any, added: list[Any], gso: Any) -> Any:
        real(index, mtu, new[:1], added, gso)
        raise OSError(5, "injected failure")

    monkeypatch.setattr(ct, "_configure_inside", half_way)
    with pytest.raises(ContainerError, match="could not attach .*injected failure"):
        ct.attach(c.netns, [A1, B1], netns=host.netns)
    _nothing_left(host, c)


def test_attach_rolls_back_only_what_it_added(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    c = host.add_container("c1")
    first = ct.attach(c.netns, [A1], netns=host.netns)
    real = ct._configure_inside

    def half_way(index: int, mtu: int, new: Any, added: list[Any], gso: Any) -> Any:
        real(index, mtu, new, added, gso)
        raise OSError(5, "injected failure")

    monkeypatch.setattr(ct, "_configure_inside", half_way)
    with pytest.raises(ContainerError, match="injected failure"):
        ct.attach(c.netns, [A1, B1], netns=host.netns)
    assert addrs(c.netns, "ethwe") == {A1}
    assert ct.list_attached(netns=host.netns) == [first]


def test_attach_missing_container_or_bridge(module_testbed: Testbed, host: Host) -> None:
    with pytest.raises(ContainerError, match="does not exist"):
        ct.attach("pwt-no-such-container", [A1], netns=host.netns)
    assert host_veths(host) == set()
    bare = module_testbed.add_host()  # no bridge
    c = bare.add_container("c1")
    with pytest.raises(ContainerError, match="bridge 'weave' not present"):
        ct.attach(c.netns, [A1], netns=bare.netns)
    assert set(links(c.netns)) == {"lo"}
    with pytest.raises(ContainerError, match="host namespace"):
        ct.attach(c.netns, [A1], netns="pwt-no-such-host")


def test_attach_name_clash_in_container(host: Host) -> None:
    c = host.add_container("c1")
    c.run(["ip", "link", "add", "ethwe", "type", "veth", "peer", "name", "other"])
    with pytest.raises(ContainerError, match="'ethwe' already exists in the container"):
        ct.attach(c.netns, [A1], netns=host.netns)
    assert host_veths(host) == set()
    assert set(links(c.netns)) == {"lo", "ethwe", "other"}
    att = ct.attach(c.netns, [A1], ifname="eth1", netns=host.netns)
    assert att.ifname == "eth1" and addrs(c.netns, "eth1") == {A1}


def test_attach_host_name_clash(host: Host) -> None:
    c = host.add_container("c1")
    name = ct.host_veth_name(ct.resolve(c.netns).inode)
    host.run(["ip", "link", "add", name, "type", "veth", "peer", "name", "squatter"])
    with pytest.raises(ContainerError, match="does not lead into container"):
        ct.attach(c.netns, [A1], netns=host.netns)
    assert name in links(host.netns) and set(links(c.netns)) == {"lo"}
    with pytest.raises(ContainerError, match="does not lead into container"):
        ct.detach(c.netns, netns=host.netns)
    with pytest.raises(ContainerError, match="host's own namespace"):
        ct.attach(host.netns, [A1], netns=host.netns)


def test_attach_tx_checksum_off_and_gso_max_size(host: Host) -> None:
    c = host.add_container("c1")
    att = ct.attach(c.netns, [A1], tx_checksum=False, gso_max_size=32000, mtu=1400, netns=host.netns)
    assert br.get_tx_checksum(att.host_ifname, netns=host.netns) is False
    assert br.get_tx_checksum("ethwe", netns=c.netns) is False
    ethwe = links(c.netns)["ethwe"]
    assert ethwe["gso_max_size"] == 32000 and ethwe["mtu"] == 1400
    assert links(host.netns)[att.host_ifname]["mtu"] == 1400


def test_reattach_after_bridge_recreated(host: Host) -> None:
    c = host.add_container("c1")
    first = ct.attach(c.netns, [A1], netns=host.netns)
    host.run(["ip", "link", "del", "weave"])
    assert ct.list_attached(netns=host.netns) == []
    br.ensure_bridge(netns=host.netns)
    assert ct.attach(c.netns, [A1], netns=host.netns) == first
    assert links(host.netns)[first.host_ifname]["master"] == "weave"


# --- detach ------------------------------------------------------------------------------


def test_detach_addresses_then_all(host: Host) -> None:
    c = host.add_container("c1")
    att = ct.attach(c.netns, [A1, B1], netns=host.netns)
    d = ct.detach(c.netns, [B1, "10.99.0.1/24"], netns=host.netns)
    assert d == Detachment(c.netns, att.host_ifname, (B1,), False)
    assert addrs(c.netns, "ethwe") == {A1}
    d = ct.detach(c.netns, [A1], netns=host.netns)  # the last address: the veth goes too
    assert d == Detachment(c.netns, att.host_ifname, (A1,), True)
    _nothing_left(host, c)
    assert ct.detach(c.netns, netns=host.netns) == Detachment(c.netns, att.host_ifname, (), False)


def test_detach_whole_and_missing(host: Host) -> None:
    c = host.add_container("c1")
    att = ct.attach(c.netns, [A1, B1], netns=host.netns)
    assert ct.detach(c.netns, netns=host.netns) == Detachment(c.netns, att.host_ifname, (A1, B1), True)
    _nothing_left(host, c)
    with pytest.raises(ContainerError, match="does not exist"):
        ct.detach("pwt-gone", netns=host.netns)
    assert ct.detach("pwt-gone", missing_ok=True, netns=host.netns).link_removed is False


# --- list_attached ---------------------------------------------------------------------------


def test_list_attached_named_and_anonymous(host: Host, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    assert ct.list_attached(netns=host.netns) == []
    c1, c2 = host.add_container("c1"), host.add_container("c2")
    a1 = ct.attach(c1.netns, [A1], netns=host.netns)
    a2 = ct.attach(c2.netns, [A2, B1], netns=host.netns)
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    a3 = ct.attach(anon.pid, ["10.40.0.3/24"], netns=host.netns)
    assert a3.container == a3.netns == f"/proc/{anon.pid}/ns/net"
    # A veth on the bridge that is not ours, and one of ours that is not on the bridge, are ignored.
    host.run(["ip", "link", "add", "foreign0", "master", "weave", "type", "veth", "peer", "name", "foreign1"])
    listed = ct.list_attached(netns=host.netns)
    assert listed == sorted([a1, a2, a3], key=lambda a: a.container)
    anon.kill()
    anon.wait()
    for _ in range(100):  # the namespace (and with it the veth) goes once its last process is gone
        if len(host_veths(host)) == 2:
            break
        time.sleep(0.02)
    assert ct.list_attached(netns=host.netns) == sorted([a1, a2], key=lambda a: a.container)
    assert ct.list_attached("nosuchbridge", netns=host.netns) == []


def test_list_attached_finds_a_namespace_only_an_fd_holds(host: Host,
                                                          spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    fd = os.open(f"/proc/{anon.pid}/ns/net", os.O_RDONLY)
    try:
        att = ct.attach(anon.pid, [A1], netns=host.netns)
        anon.kill()
        anon.wait()
        (found,) = ct.list_attached(netns=host.netns)
        assert found.netns.startswith("/proc/") and "/fd/" in found.netns
        assert os.stat(found.netns).st_ino == os.fstat(fd).st_ino
        assert (found.host_ifname, found.mac, found.addresses) == (att.host_ifname, att.mac, att.addresses)
    finally:
        os.close(fd)


# --- containers Weave Net attached (adopted in place) --------------------------------------


def weave_attached(host: Host, pid: int, *cidrs: str, mtu: int = 1376) -> str:
    """Plug the namespace of process `pid` into the bridge as Weave Net does: host end
    ``vethwepl<pid>`` with hairpin on, container end ``ethwe``, both MTU `mtu`, TX checksum
    offload off (sleeve mode). Returns the host end's name."""
    veth = f"vethwepl{pid}"
    host.run(["ip", "link", "add", veth, "mtu", str(mtu), "type", "veth",
              "peer", "name", "ethwe", "mtu", str(mtu), "netns", str(pid)])
    host.run(["ip", "link", "set", veth, "master", "weave", "up"])
    host.run(["ip", "link", "set", veth, "type", "bridge_slave", "hairpin", "on"])
    inside = ["nsenter", f"--net=/proc/{pid}/ns/net"]
    for cidr in cidrs:
        subprocess.run([*inside, "ip", "addr", "add", cidr, "dev", "ethwe"], check=True)
    subprocess.run([*inside, "ip", "link", "set", "ethwe", "up"], check=True)
    br.set_tx_checksum(veth, False, netns=host.netns)
    br.set_tx_checksum("ethwe", False, netns=f"/proc/{pid}/ns/net")
    return veth


def test_weave_attached_container_is_listed(host: Host, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    veth = weave_attached(host, anon.pid, "10.40.0.1/16")
    (att,) = ct.list_attached(netns=host.netns)
    assert (att.container, att.host_ifname, att.ifname) == (f"/proc/{anon.pid}/ns/net", veth, "ethwe")
    assert att.addresses == (ipaddress.IPv4Interface("10.40.0.1/16"),)


def test_listing_weave_attached_containers_needs_no_fd_scan(
        host: Host, spawn: Callable[..., subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The PID in Weave's veth name leads to the namespace; scanning every process's fds
    (the last resort) would be paid on every listing of a host that ran Weave."""
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    weave_attached(host, anon.pid, "10.40.0.1/16")
    scans: list[bool] = []
    real = ct._candidate_paths

    def counting(with_fds: bool = False) -> dict[int, list[str]]:
        scans.append(with_fds)
        return real(with_fds)

    monkeypatch.setattr(ct, "_candidate_paths", counting)
    (att,) = ct.list_attached(netns=host.netns)
    assert att.container == f"/proc/{anon.pid}/ns/net" and scans == [False]


def test_detach_a_weave_attached_container(host: Host, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """detach finds Weave's veth (named by PID, not by our inode scheme) and removes it."""
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    veth = weave_attached(host, anon.pid, "10.40.0.1/16", "10.40.0.9/16")
    d = ct.detach(anon.pid, ["10.40.0.9/16"], netns=host.netns)
    assert d == Detachment(f"/proc/{anon.pid}/ns/net", veth, (ipaddress.IPv4Interface("10.40.0.9/16"),), False)
    d = ct.detach(anon.pid, netns=host.netns)
    assert d == Detachment(f"/proc/{anon.pid}/ns/net", veth, (ipaddress.IPv4Interface("10.40.0.1/16"),), True)
    assert host_veths(host) == set()


def test_attach_to_a_weave_attached_container(host: Host, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """attach adds to Weave's interface instead of failing on the existing ethwe."""
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    veth = weave_attached(host, anon.pid, "10.40.0.1/16")
    att = ct.attach(anon.pid, ["10.40.0.2/16"], netns=host.netns)
    assert att.host_ifname == veth and host_veths(host) == {veth}
    assert att.addresses == tuple(ipaddress.IPv4Interface(f"10.40.0.{i}/16") for i in (1, 2))
    assert ct.list_attached(netns=host.netns) == [att]
    # Weave's MTU on the container stays as Weave set it when it matches the bridge's.
    assert links(host.netns)[veth]["mtu"] == 1376


def test_adopting_a_bridge_warns_of_container_mtus(module_testbed: Testbed,
                                                  spawn: Callable[..., subprocess.Popen[bytes]],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Containers Weave made with a larger WEAVE_MTU would lose their big frames in silence."""
    h = module_testbed.add_host()
    h.run(["ip", "link", "add", "weave", "mtu", "8916", "type", "bridge"])
    anon = spawn(["unshare", "-n", "sleep", "30"])
    wait_sleeping(anon)
    weave_attached(h, anon.pid, "10.40.0.1/16", mtu=8916)
    with caplog.at_level("WARNING", logger="router.bridge"):
        assert br.ensure_bridge(netns=h.netns).mtu == 1376
    assert f"1 container veth(s) on it have MTU 8916 (vethwepl{anon.pid})" in caplog.text
    assert "--mtu 8916" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="router.bridge"):
        br.ensure_bridge(mtu=8916, netns=h.netns)
    assert caplog.text == ""
