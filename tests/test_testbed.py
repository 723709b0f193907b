"""The namespace test bed against the real kernel: underlay, faults, NAT, processes, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from router.testbed import (
    IFNAMSIZ,
    REGISTRY_DIR,
    CommandError,
    Container,
    Host,
    Testbed,
    TestbedError,
    list_netns,
    root_snapshot,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the test bed needs root (network namespaces, nftables)"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("nft") is None,
                       reason="the test bed needs iproute2 (ip) and nftables (nft)"),
]

REPO = Path(__file__).resolve().parents[1]
FAIL_TIMEOUT = 0.3  # seconds to wait for a reply that must not come

# UDP echo + TCP "who are you" server on 0.0.0.0:<port>; both answer with the peer's address.
SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
u.bind(("0.0.0.0", port))
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port))
t.listen(16)
def udp():
    while True:
        data, addr = u.recvfrom(2048)
        u.sendto(addr[0].encode(), addr)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, addr = t.accept()
    c.sendall(addr[0].encode())
    c.close()
"""

# argv: udp|tcp address port timeout. Prints the server's answer; exit 1 if none came.
CLIENT = r"""
import socket, sys
proto, addr, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.sendto(b"hello", (addr, port))
        print(s.recvfrom(2048)[0].decode())
    else:
        s = socket.create_connection((addr, port), timeout=timeout)
        s.settimeout(timeout)
        print(s.recv(2048).decode())
except OSError as e:
    print(repr(e), file=sys.stderr)
    sys.exit(1)
"""


def reach(src: Host, proto: str, dst: str, port: int = 6784, timeout: float = FAIL_TIMEOUT) -> str | None:
    """The peer address the server at dst saw, or None if nothing came back."""
    proc = src.run([sys.executable, "-c", CLIENT, proto, dst, str(port), str(timeout)], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def wait_for_log(host: Host, name: str, text: str, timeout: float = 5) -> None:
    """Wait until the process spawned as `name` has written `text`."""
    deadline = time.monotonic() + timeout
    while text not in host.log_path(name).read_text():
        assert host.is_running(name), host.log_path(name).read_text()
        assert time.monotonic() < deadline, f"{name} did not write {text!r}"
        time.sleep(0.02)


def start_server(host: Host, port: int = 6784) -> None:
    host.spawn([sys.executable, "-c", SERVER, str(port)], name="server")
    wait_for_log(host, "server", "ready")


def pings_fail(a: Host | Container, b: Host | str) -> bool:
    """No reply to two pings (short timeouts, so expected failures don't slow the suite)."""
    return not a.ping(b if isinstance(b, str) else b.address, count=2, timeout=FAIL_TIMEOUT)


def pings_ok(a: Host, b: Host | str) -> bool:
    return a.ping(b if isinstance(b, str) else b.address, count=3, timeout=1)


@pytest.fixture
def make_testbed() -> Iterator[Callable[..., Testbed]]:
    """Build test beds; close them at teardown and check that the root namespace is unchanged."""
    before = root_snapshot()
    made: list[Testbed] = []

    def make(*args: object, **kwargs: object) -> Testbed:
        tb = Testbed(*args, **kwargs)  # type: ignore[arg-type]
        made.append(tb)
        return tb

    yield make
    for tb in made:
        tb.close()
    after = root_snapshot()
    assert after.links == before.links
    for tb in made:
        assert not [ns for ns in after.netns if ns.startswith(tb.prefix + "-")]
        assert tb.cleanup_errors == []


@pytest.fixture
def tb3(make_testbed: Callable[..., Testbed]) -> Testbed:
    return make_testbed(3)


def test_hosts_ping_each_other_over_the_underlay(tb3: Testbed) -> None:
    h1, h2, h3 = tb3.hosts
    assert [h.name for h in tb3.hosts] == ["host1", "host2", "host3"]
    assert [h.address for h in tb3.hosts] == ["10.98.0.1", "10.98.0.2", "10.98.0.3"]
    assert pings_ok(h1, h2) and pings_ok(h2, h1) and pings_ok(h3, h1)
    assert pings_fail(h1, "10.98.0.99")
    # Names are recognisable and fit an interface name.
    for ns in tb3.namespaces:
        assert ns.startswith(tb3.prefix + "-") and ns.startswith("pw") and len(ns) <= IFNAMSIZ
    assert set(tb3.namespaces) <= list_netns()
    # The address really is on eth0 inside the host namespace, and loopback is up.
    out = h1.run(["ip", "-br", "addr", "show"]).stdout
    assert "10.98.0.1/24" in out and "eth0" in out
    assert "UP" in h1.run(["ip", "-br", "link", "show", "lo"]).stdout
    assert h1.ping("127.0.0.1")


def test_host_state_dir_env_and_run_errors(tb3: Testbed) -> None:
    h1, h2, _ = tb3.hosts
    assert h1.state_dir.is_dir() and h1.state_dir != h2.state_dir
    assert h1.env["WEAVE_STATE_DIR"] == str(h1.state_dir)
    assert h1.run(["sh", "-c", "echo $WEAVE_STATE_DIR"]).stdout.strip() == str(h1.state_dir)
    assert h1.run(["sh", "-c", "echo $X"], env={"X": "y"}).stdout.strip() == "y"
    with pytest.raises(CommandError) as info:
        h1.run(["sh", "-c", "echo oops-on-stderr >&2; exit 3"])
    message = str(info.value)
    assert "exit code 3" in message and "oops-on-stderr" in message and "sh -c" in message
    assert info.value.returncode == 3
    assert h1.run(["sh", "-c", "exit 4"], check=False).returncode == 4
    with pytest.raises(CommandError, match="timed out"):
        h1.run(["sleep", "5"], timeout=0.2)


def test_partition_and_heal(tb3: Testbed) -> None:
    h1, h2, h3 = tb3.hosts
    tb3.partition(h1, h2)
    tb3.partition(h2, h1)  # idempotent, same fault
    assert tb3.active_faults() == ["partition 10.98.0.1 10.98.0.2"]
    assert pings_fail(h1, h2) and pings_fail(h2, h1)
    assert pings_ok(h3, h1) and pings_ok(h3, h2)
    tb3.heal(h2, h1)
    assert tb3.active_faults() == []
    assert pings_ok(h1, h2) and pings_ok(h2, h1)


def test_isolate_and_unisolate(tb3: Testbed) -> None:
    h1, h2, h3 = tb3.hosts
    tb3.isolate(h1)
    assert pings_fail(h1, h2) and pings_fail(h3, h1)
    assert pings_ok(h2, h3)
    tb3.unisolate(h1)
    assert pings_ok(h1, h2) and pings_ok(h3, h1)


def test_udp_port_block_spares_tcp(tb3: Testbed) -> None:
    h1, h2, _ = tb3.hosts
    start_server(h1)
    start_server(h2)
    assert reach(h1, "udp", h2.address, timeout=2) == h1.address
    tb3.block(h1, h2, proto="udp", port=6784)
    assert reach(h1, "udp", h2.address) is None
    assert reach(h2, "udp", h1.address) is None
    assert reach(h1, "tcp", h2.address, timeout=2) == h1.address
    assert reach(h2, "tcp", h1.address, timeout=2) == h2.address
    assert pings_ok(h1, h2)
    tb3.unblock(h1, h2)
    assert reach(h1, "udp", h2.address, timeout=2) == h1.address
    assert tb3.active_faults() == []

    # One way: h1 -> h2 UDP is dropped, h2 -> h1 still gets through.
    tb3.block(h1, h2, one_way=True)
    assert reach(h1, "udp", h2.address) is None
    assert reach(h2, "udp", h1.address, timeout=2) == h2.address
    tb3.unblock(h1, h2, one_way=True)

    # A TCP port block stops TCP to that port only.
    tb3.block(h1, h2, proto="tcp", port=6784)
    assert reach(h1, "tcp", h2.address) is None
    assert reach(h1, "udp", h2.address, timeout=2) == h1.address
    tb3.unblock(h1, h2, proto="tcp", port=6784)
    assert reach(h1, "tcp", h2.address, timeout=2) == h1.address
    with pytest.raises(ValueError):
        tb3.block(h1, h2, proto="sctp")


def test_loss(tb3: Testbed) -> None:
    h1, h2, h3 = tb3.hosts
    tb3.loss(h1, h2, 30)
    tb3.loss(h1, h2, 100)  # replaces the 30 % rules
    assert sorted(tb3.active_faults()) == ["loss 10.98.0.1>10.98.0.2", "loss 10.98.0.2>10.98.0.1"]
    assert len(tb3._fault_rules()) == 2
    assert pings_fail(h1, h2) and pings_fail(h2, h1)
    assert pings_ok(h1, h3)
    tb3.clear_loss(h1, h2)
    assert pings_ok(h1, h2)
    # One-way loss: requests h1 -> h2 dropped; h2 -> h1 requests arrive but replies are dropped.
    tb3.loss(h1, h2, 100, one_way=True)
    assert tb3.active_faults() == ["loss 10.98.0.1>10.98.0.2"]
    assert pings_fail(h1, h2) and pings_fail(h2, h1)
    tb3.clear_loss(h1, h2, one_way=True)
    assert pings_ok(h2, h1)
    with pytest.raises(ValueError):
        tb3.loss(h1, h2, 101)


def test_heal_all(tb3: Testbed) -> None:
    h1, h2, h3 = tb3.hosts
    tb3.partition(h1, h2)
    tb3.isolate(h3)
    tb3.block(h1, h3, proto="tcp", port=22)
    tb3.loss(h2, h3, 100)
    assert len(tb3.active_faults()) == 6  # block and loss are one fault per direction
    tb3.heal_all()
    assert tb3.active_faults() == []
    assert pings_ok(h1, h2) and pings_ok(h2, h3) and pings_ok(h3, h1)


def test_nat_host_reaches_out_but_not_in(tb3: Testbed) -> None:
    h1 = tb3.hosts[0]
    nat = tb3.add_nat_host()
    gw = nat.gateway
    assert gw is not None
    assert nat.name == "host4" and nat.address == "192.168.77.2" and gw.address == "10.98.0.201"
    assert nat.underlay_address == gw.address
    start_server(h1)
    start_server(nat)
    # Outbound works and is masqueraded behind the gateway's underlay address.
    assert pings_ok(nat, h1)
    assert reach(nat, "tcp", h1.address, timeout=2) == gw.address
    assert reach(nat, "udp", h1.address, timeout=2) == gw.address
    # Inbound doesn't, even with a route to the private LAN via the gateway.
    h1.run(["ip", "route", "add", gw.lan_subnet, "via", gw.address])
    assert pings_fail(h1, nat)
    assert reach(h1, "tcp", nat.address) is None
    assert reach(h1, "udp", nat.address) is None
    assert pings_ok(h1, gw.address)  # the gateway itself is on the underlay
    # Faults on a NATed host act on its public (gateway) address.
    tb3.partition(h1, nat)
    assert pings_fail(nat, h1)
    tb3.heal(h1, nat)
    assert pings_ok(nat, h1)
    # A second host behind the same gateway shares its LAN.
    nat2 = tb3.add_nat_host(gw)
    assert nat2.address == "192.168.77.3" and nat2.gateway is gw
    assert pings_ok(nat2, nat) and pings_ok(nat2, h1)


def test_spawn_stop_kill(tb3: Testbed) -> None:
    h1 = tb3.hosts[0]
    proc = h1.spawn(["sh", "-c", "echo $WEAVE_STATE_DIR; echo started; exec sleep 60"], name="sleeper")
    assert h1.is_running("sleeper")
    wait_for_log(h1, "sleeper", "started")
    with pytest.raises(TestbedError):
        h1.spawn(["sleep", "60"], name="sleeper")
    # It really runs inside the host namespace.
    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(h1.netns_path).st_ino
    assert h1.kill("sleeper") == -signal.SIGKILL
    assert not h1.is_running("sleeper")
    log = h1.log_path("sleeper").read_text()
    assert "started" in log and str(h1.state_dir) in log
    # Spawn again under the same name; stop with SIGTERM.
    h1.spawn(["sleep", "60"], name="sleeper")
    assert h1.stop("sleeper") == -signal.SIGTERM
    # A process ignoring SIGTERM is killed after the timeout.
    h1.spawn(["sh", "-c", "trap '' TERM; echo trapped; while :; do sleep 0.05; done"], name="stubborn")
    wait_for_log(h1, "stubborn", "trapped")
    assert h1.stop("stubborn", timeout=0.3) == -signal.SIGKILL
    assert not h1.is_running("nonexistent")


def test_containers(tb3: Testbed) -> None:
    h1, h2, _ = tb3.hosts
    c1 = h1.add_container("web")
    c2 = h2.add_container("web")  # same display name on another host is fine
    assert c1.netns != c2.netns and {c1.netns, c2.netns} <= list_netns()
    assert c1.netns.startswith(tb3.prefix + "-") and len(c1.netns) <= IFNAMSIZ
    assert h1.containers["web"] is c1 and c1.host is h1
    with pytest.raises(TestbedError):
        h1.add_container("web")
    links = c1.run(["ip", "-br", "link"]).stdout.split("\n")
    assert [line.split()[0] for line in links if line] == ["lo"]
    assert c1.ping("127.0.0.1")
    assert pings_fail(c1, h1)  # not plugged into anything yet


def test_cleanup_after_exception_leaves_nothing(make_testbed: Callable[..., Testbed]) -> None:
    before = root_snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(2) as tb:
            h1, h2 = tb.hosts
            h1.add_container("c")
            tb.add_nat_host()
            tb.partition(h1, h2)
            spawned = h1.spawn(["sleep", "60"], name="sleeper")
            # A process started behind the test bed's back, inside a host namespace.
            other = subprocess.Popen(h2.exec_argv(["sleep", "60"]), start_new_session=True)
            time.sleep(0.1)
            namespaces, state_root, marker = list(tb.namespaces), tb.state_root, tb._marker
            assert marker.exists() and state_root.is_dir()
            raise RuntimeError("boom")
    assert tb.closed and tb.cleanup_errors == []
    assert spawned.poll() is not None
    assert other.wait(5) in (-signal.SIGTERM, -signal.SIGKILL)
    after = root_snapshot()
    assert after.links == before.links
    assert not set(namespaces) & after.netns
    assert not state_root.exists() and not marker.exists()
    tb.close()  # twice is harmless


def test_keep_state(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(1, keep=True)
    h1 = tb.hosts[0]
    h1.spawn(["sh", "-c", "echo kept"], name="echo").wait(5)
    tb.close()
    try:
        assert (h1.log_path("echo")).read_text().strip() == "kept"
        assert not set(tb.namespaces) & list_netns()
    finally:
        shutil.rmtree(tb.state_root)


def test_cleanup_stale_removes_only_dead_owners(make_testbed: Callable[..., Testbed]) -> None:
    live = make_testbed(1)
    # A run that dies without cleaning up, leaving namespaces and a process behind.
    crasher = (
        "import os, signal\n"
        "from router.testbed import Testbed\n"
        "tb = Testbed(2)\n"
        "p = tb.hosts[0].spawn(['sleep', '60'], name='orphan')\n"
        "print(tb.prefix, p.pid, tb.state_root, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", crasher], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    prefix, pid_text, state_root = proc.stdout.split()
    orphan = int(pid_text)
    stale = {ns for ns in list_netns() if ns.startswith(prefix + "-")}
    assert stale == {f"{prefix}-sw", f"{prefix}-h1", f"{prefix}-h2"}
    assert (REGISTRY_DIR / f"{prefix}.json").exists()
    assert json.loads((REGISTRY_DIR / f"{prefix}.json").read_text())["state_root"] == state_root
    try:
        os.kill(orphan, 0)
    except ProcessLookupError:
        pytest.fail("the orphan should still be running")

    removed = Testbed.cleanup_stale(rf"^({prefix}|{live.prefix})-")
    assert set(removed) == stale
    assert not {ns for ns in list_netns() if ns.startswith(prefix + "-")}
    assert set(live.namespaces) <= list_netns()  # the live test bed is untouched
    assert pings_ok(live.hosts[0], "127.0.0.1")
    assert not Path(state_root).exists()
    assert not (REGISTRY_DIR / f"{prefix}.json").exists()
    deadline = time.monotonic() + 3
    while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{orphan}").exists()


def test_prefix_validation_and_mtu(make_testbed: Callable[..., Testbed]) -> None:
    with pytest.raises(ValueError):
        Testbed(prefix="not-ours")
    tb = make_testbed(2)
    h1, h2 = tb.hosts
    tb.set_mtu(h1, 1280)
    assert "mtu 1280" in h1.run(["ip", "link", "show", "eth0"]).stdout
    assert tb.host("host2") is h2
    with pytest.raises(KeyError):
        tb.host("host9")


def test_atexit_cleans_up_a_testbed_left_open() -> None:
    script = (
        "import sys\n"
        "from router.testbed import Testbed\n"
        "tb = Testbed(1)\n"
        "tb.hosts[0].spawn(['sleep', '60'], name='s')\n"
        "print(tb.prefix, tb.state_root, flush=True)\n"
        "sys.exit(3)\n"  # no close(): the atexit handler must do it
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stderr
    prefix, state_root = proc.stdout.split()
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]
    assert not Path(state_root).exists()
    assert not (REGISTRY_DIR / f"{prefix}.json").exists()
