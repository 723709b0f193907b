"""`weave demo`: simulated hosts in network namespaces, meshed, shown, cleaned up."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterable

from router.testbed import Host, Testbed


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _weave(host: Host, *args: str, check: bool = True) -> str:
    result = host.run(["weave", *args], env=host.env, check=check, timeout=60)
    return result.stdout


def _full_mesh(hosts: list[Host]) -> bool:
    for host in hosts:
        report = json.loads(_weave(host, "report", check=False) or "{}")
        peers = report.get("Router", {}).get("Peers", [])
        if len(peers) != len(hosts):
            return False
        for peer in peers:
            if sum(1 for c in peer["Connections"] if c["Established"]) != len(hosts) - 1:
                return False
    return True


def _containers(hosts: list[Host]) -> list[str]:
    """A container per host, pinging across hosts by address and finding each other by name."""
    _say("a container (a network namespace) on each host, attached with a name; IPAM picks the address")
    containers = []
    addresses = []
    for i, host in enumerate(hosts, start=1):
        c = host.add_container(f"web{i}")
        print(f"    {host.name}$ weave attach -h web{i} {c.netns}")
        address = _weave(host, "attach", "-h", f"web{i}", c.netns).split()[0]
        print(f"    {address}")
        containers.append(c)
        addresses.append(address.split("/")[0])
    _say(f"{hosts[0].name}$ weave status ipam (the range, shared out by the peers that needed space)")
    print(_weave(hosts[0], "status", "ipam"), end="")
    last = hosts[-1]
    _say(f"{last.name}$ weave ps")
    print(_weave(last, "ps"), end="")
    first = containers[0]
    for i, host in enumerate(hosts[1:], start=2):
        _say(f"web1 ({hosts[0].name}) pings web{i} on {host.name} at {addresses[i - 1]}")
        result = first.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", addresses[i - 1]], check=False)
        _show(line for line in result.stdout.splitlines() if "packet" in line or "bytes from" in line)
    asker = f"web{len(hosts)}"
    _say(f"names resolve through weaveDNS: {asker} asks for web1")
    result = containers[-1].run(["dig", "+short", "web1.weave.local"], check=False)
    _show([f"{asker}$ dig +short web1.weave.local", result.stdout.strip() or result.stderr.strip()])
    result = containers[-1].run(["ping", "-c", "1", "-W", "2", "web1"], check=False)
    answer = result.stdout.splitlines()[1] if result.returncode == 0 else result.stderr.strip()
    _show([f"{asker}$ ping -c 1 web1", answer])
    return addresses


# Sent from a container: a DNS query whose label has the reserved type 0x40; prints the
# reply's RCODE (1 is FORMERR).
_BAD_DNS_QUERY = r"""
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
query = struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\0\0\1\0\1"
s.sendto(query, ("169.254.53.1", 53))
print("rcode", s.recv(512)[3] & 15)
"""


def _hostile(hosts: list[Host]) -> None:
    """Inputs no honest peer or user sends are refused with a reason, and counted."""
    first = hosts[0]
    bad = "a" * 64 + ".example"
    _say(f"hostile input is refused and counted: {first.name}$ weave connect {bad[:8]}...{bad[-12:]}")
    result = first.run(["weave", "connect", bad], env=first.env, check=False, timeout=30)
    _show([(result.stderr or result.stdout).strip() or f"exit {result.returncode}"])
    container = first.containers["web1"]
    result = container.run([sys.executable, "-c", _BAD_DNS_QUERY], check=False, timeout=30)
    _show([f"web1: a DNS query with a reserved label type -> {result.stdout.strip() or result.stderr.strip()}"
           " (FORMERR)"])
    scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:6784/metrics').read().decode())"
    metrics = first.run([sys.executable, "-c", scrape], check=False, timeout=30)
    _show(line for line in metrics.stdout.splitlines() if line.startswith("pyweave_inputs_rejected_total"))


def _link_line(host: Host, peer: Host) -> str:
    for line in _weave(host, "status", "connections", check=False).splitlines():
        if f"({peer.name})" in line:
            return " ".join(line.split())
    return f"(no connection to {peer.name})"


def _wait_link(host: Host, peer: Host, word: str, limit: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if f" {word} " in _link_line(host, peer) + " ":
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def _fallback(testbed: Testbed, hosts: list[Host], target: str) -> None:
    """Block the kernel path between two hosts: traffic moves to the sleeve, then back."""
    a, b = hosts[0], hosts[1]
    if _wait_link(a, b, "fastdp", 5) is None:
        _say(f"the {a.name}-{b.name} link is not on fastdp ({_link_line(a, b)}); skipping the fallback")
        return
    _say(f"{a.name}<->{b.name} runs on fastdp (kernel VXLAN):")
    _show([_link_line(a, b)])
    _say(f"blocking UDP 6784 (VXLAN) between {a.name} and {b.name} on the underlay switch")
    testbed.block(a, b, "udp", 6784)
    took = _wait_link(a, b, "sleeve", 10)
    _show([_link_line(a, b), f"fell back to the sleeve after {took:.1f} s" if took else "no fallback seen"])
    c = a.add_container("probe")
    _weave(a, "attach", c.netns)
    result = c.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", target], check=False)
    _show(line for line in result.stdout.splitlines() if "packet" in line)
    _say("unblocking: the health checks pass again and traffic returns to the kernel")
    testbed.unblock(a, b, "udp", 6784)
    took = _wait_link(a, b, "fastdp", 15)
    _show([_link_line(a, b), f"back on fastdp after {took:.1f} s" if took else "still on the sleeve"])


def _show(lines: Iterable[str]) -> None:
    for line in lines:
        print(f"    {line}")


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM cleans up like Ctrl-C does.
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="weave demo", description=__doc__)
    parser.add_argument("--hosts", type=int, default=3, help="how many simulated hosts (default 3)")
    parser.add_argument("--keep", action="store_true", help="leave the hosts and routers running")
    parser.add_argument("--clean", action="store_true", help="only remove what an earlier --keep left")
    opts = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("weave demo must be run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    if opts.hosts < 2:
        print("weave demo needs at least 2 hosts", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    removed = Testbed.cleanup_stale()
    if removed:
        print(f"removed {len(removed)} namespaces left by an earlier demo or test run")
    if opts.clean:
        return 0
    testbed = Testbed(opts.hosts, keep=opts.keep)
    try:
        hosts = testbed.hosts
        _say(f"{len(hosts)} simulated hosts on one underlay switch (network namespaces):")
        for host in hosts:
            print(f"    {host.name:<6} netns {host.netns:<12} underlay {host.address}")
        _say(f"launching a router on each; every host is told only about {hosts[0].name}")
        for host in hosts:
            peers = [] if host is hosts[0] else [hosts[0].address]
            print(f"    {host.name}$ weave launch --nickname {host.name} {' '.join(peers)}".rstrip())
            _weave(host, "launch", "--nickname", host.name, *peers)
        started = time.monotonic()
        while not _full_mesh(hosts):
            if time.monotonic() - started > 30:
                print("the mesh did not form within 30 s; see the routers' logs", file=sys.stderr)
                return 1
            time.sleep(0.2)
        _say(f"full mesh after {time.monotonic() - started:.1f} s (peers found each other through gossip)")
        first = hosts[0]
        _say(f"{first.name}$ weave status")
        print(_weave(first, "status"), end="")
        _say(f"{hosts[-1].name}$ weave status connections")
        print(_weave(hosts[-1], "status", "connections"), end="")
        _say(f"{first.name}$ weave status peers")
        print(_weave(first, "status", "peers"), end="")
        addresses = _containers(hosts)
        _hostile(hosts)
        _fallback(testbed, hosts, addresses[1])
        if opts.keep:
            _say("left running (--keep). Try for example:")
            print(f"    ip netns exec {first.netns} env WEAVE_STATE_DIR={first.state_dir} weave status")
            print("    the next `weave demo` (or `weave demo --clean`) removes them")
            testbed.detach()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if not opts.keep:
            _say("cleaning up: routers stopped, namespaces and state removed")
            testbed.close()
