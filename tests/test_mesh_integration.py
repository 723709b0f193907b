"""Real router processes meshing in network namespaces (issue 3).

Every test builds hosts with `router.testbed.Testbed`, starts routers the way a user
does (`weave launch --nickname hostN ...` inside each host's namespace, with the host's
own WEAVE_STATE_DIR), and judges them by what `weave report` / `weave status` say and by
the daemons' logs. Fake peers (tiny Python programs speaking the real protocol with
`router.handshake`) stand in for routers where a test needs to send what a router never
would. Nothing leaves the namespaces the test bed creates.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.peername import format_peer_name, random_peer_name
from router.testbed import Host, Testbed
from tests.routers import (
    diagnostics,
    evil_peer,
    launch,
    log_text,
    router_test_marks,
    spawn_evil_peer,
    wait_for,
    weave,
)

pytestmark = router_test_marks()

POLL = 0.15  # seconds between polls
CONVERGE = 20.0  # seconds a small mesh may take to form (it takes ~1 s)
HEARTBEAT = 0.5  # PYWEAVE_HEARTBEAT_INTERVAL for the partition test: read timeout 1 s



# ---------------------------------------------------------------- helpers


def report(host: Host) -> dict[str, Any]:
    """The router section of `weave report`."""
    return json.loads(weave(host, "report"))["Router"]


def own_name(rep: dict[str, Any]) -> str:
    return rep["Name"]


def peer_entry(rep: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in rep["Peers"] if p["Name"] == name), None)


def established_to(rep: dict[str, Any], name: str) -> set[str]:
    """Names of the peers that `name` lists an established connection to, in this report."""
    entry = peer_entry(rep, name)
    if entry is None:
        return set()
    return {c["Name"] for c in entry["Connections"] if c["Established"]}


def mesh_problems(reports: dict[str, dict[str, Any]]) -> list[str]:
    """What stops these reports (by host) from showing a full mesh; [] when they do."""
    names = {own_name(r) for r in reports.values()}
    problems = []
    for host, rep in reports.items():
        known = {p["Name"] for p in rep["Peers"]}
        if known != names:
            problems.append(f"{host} knows {sorted(known)}, not {sorted(names)}")
            continue
        for name in names:
            missing = names - {name} - established_to(rep, name)
            if missing:
                problems.append(f"in {host}'s report {name} lacks {sorted(missing)}")
        conns = [c for c in rep["Connections"] if c["State"] == "established"]
        if len(conns) != len(names) - 1:
            problems.append(f"{host} has {len(conns)} established connections, not {len(names) - 1}")
    return problems


def wait_full_mesh(hosts: list[Host], timeout: float = CONVERGE) -> dict[str, dict[str, Any]]:
    last: list[str] = []

    def probe() -> dict[str, dict[str, Any]] | None:
        reports = {h.name: report(h) for h in hosts}
        last[:] = mesh_problems(reports)
        return None if last else reports

    return wait_for(probe, f"a full mesh of {len(hosts)}", timeout, hosts, lambda: "\n".join(last))


# ---------------------------------------------------------------- meshes


def test_three_hosts_form_a_full_mesh(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(3)
    h1, h2, h3 = tb.hosts
    launch(h1)
    launch(h2, h1.address)
    launch(h3, h1.address)
    reports = wait_full_mesh(tb.hosts)

    # Each router knows the others by the nicknames they were launched with.
    for rep in reports.values():
        assert sorted(p["NickName"] for p in rep["Peers"]) == ["host1", "host2", "host3"]
    # host3 was told only about host1; its link to host2 came from discovery.
    assert reports["host3"]["Targets"] == [f"{h1.address}:6783"]
    assert h2.address in {c["Address"].rpartition(":")[0] for c in reports["host3"]["Connections"]}

    status = weave(h1, "status")
    assert re.search(r"Connections: 2 \(2 established\)", status), status
    assert re.search(r"Peers: 3 \(with 6 established connections\)", status), status
    assert "Encryption: disabled" in status
    conns = weave(h3, "status", "connections")
    assert conns.count("established") == 2, conns
    peers = weave(h2, "status", "peers")
    for nick in ("host1", "host2", "host3"):
        assert f"({nick})" in peers


def test_launch_fails_clearly_and_starts_once_the_cause_is_gone(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(1)
    (h1,) = tb.hosts
    bad_flag = weave(h1, "launch", "--no-such-flag", check=False)
    assert "weave router started" not in bad_flag

    def refused(*args: str) -> str:
        res = h1.run(["weave", "launch", *args], env=h1.env, check=False, timeout=60)
        assert res.returncode != 0, res.stdout
        return res.stderr

    assert "--no-such-flag" in refused("--no-such-flag")
    # Something else holds TCP 6783.
    h1.spawn([sys.executable, "-c", "import socket, time\n"
                       "s = socket.create_server(('0.0.0.0', 6783))\nprint('listening', flush=True)\ntime.sleep(60)"],
                      "holder")
    wait_for(lambda: "listening" in h1.log_path("holder").read_text(), "the port holder", hosts=[])
    assert "TCP port 6783 is already in use" in refused()
    h1.stop("holder")
    # A router that dies while starting: a non-bridge link already has the bridge's name.
    h1.run(["ip", "link", "add", "weave", "type", "veth", "peer", "name", "weave-peer"])
    message = refused()
    assert re.search(r"the router exited \(code [1-9]\d*\)", message), message
    assert "weave" in message.split("exited", 1)[1]  # the log's last lines say why
    assert weave(h1, "status", check=False) == "" or "not running" in weave(h1, "status", check=False)
    h1.run(["ip", "link", "del", "weave"])
    launch(h1)
    assert "Peers: 1" in weave(h1, "status")


def test_five_hosts_in_a_line_become_a_full_mesh(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(5)
    hosts = tb.hosts
    launch(hosts[0])
    for prev, host in zip(hosts, hosts[1:], strict=False):
        launch(host, prev.address)
    reports = wait_full_mesh(hosts, timeout=30)
    # Nobody was told about more than its neighbour: the rest is discovery.
    for prev, host in zip(hosts, hosts[1:], strict=False):
        assert reports[host.name]["Targets"] == [f"{prev.address}:6783"]
    assert reports["host1"]["Targets"] == []
    assert all(r["PeerDiscovery"] for r in reports.values())


# ---------------------------------------------------------------- failures and recovery


def test_partition_then_heal(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(3)
    h1, h2, h3 = tb.hosts
    fast = {"PYWEAVE_HEARTBEAT_INTERVAL": str(HEARTBEAT)}
    launch(h1, env=fast)
    launch(h2, h1.address, env=fast)
    launch(h3, h1.address, env=fast)
    before = wait_full_mesh(tb.hosts)
    n1, n2, n3 = (own_name(before[h.name]) for h in (h1, h2, h3))
    assert "read timeout 1 s" in log_text(h1)  # the knob took effect

    tb.partition(h1, h2)
    parted_at = time.monotonic()

    def split() -> dict[str, dict[str, Any]] | None:
        r1, r2, r3 = report(h1), report(h2), report(h3)
        if n2 in established_to(r1, n1) or n1 in established_to(r2, n2):
            return None
        if n2 in established_to(r3, n1) or n1 in established_to(r3, n2):
            return None
        return {"host1": r1, "host2": r2, "host3": r3}

    reports = wait_for(split, "host1 and host2 to drop their connection", 15, tb.hosts)
    assert time.monotonic() - parted_at < 10, "a dead connection outlived twice the read timeout by far"
    for host, rep in reports.items():
        # Everyone still knows everyone: host3 links the two halves.
        assert {p["Name"] for p in rep["Peers"]} == {n1, n2, n3}, host
        assert established_to(rep, n3) == {n1, n2}, host
    # The drop was the read timeout, on the side(s) that noticed it.
    assert "no message for 1 s" in log_text(h1) + log_text(h2)
    # Routes go round the partition.
    via = {r["Dest"]: r["Via"] for r in reports["host1"]["UnicastRoutes"]}
    assert via[n2] == n3

    tb.heal(h1, h2)
    after = wait_full_mesh(tb.hosts, timeout=40)
    assert after["host1"]["TerminationCount"] >= 1
    assert after["host2"]["TerminationCount"] >= 1


def test_restarted_router_is_recognised(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(3)
    h1, h2, h3 = tb.hosts
    launch(h1)
    launch(h2, h1.address)
    launch(h3, h1.address)
    before = wait_full_mesh(tb.hosts)
    n2 = own_name(before["host2"])
    old_uid = peer_entry(before["host2"], n2)["UID"]  # type: ignore[index]
    assert peer_entry(before["host1"], n2)["UID"] == old_uid  # type: ignore[index]

    out = weave(h2, "stop")
    assert "stopped" in out

    def gone() -> bool:
        return all(n2 not in established_to(report(h), own_name(before[h.name])) for h in (h1, h3))

    wait_for(gone, "host1 and host3 to notice host2 stopped", 15, tb.hosts)

    launch(h2, h1.address)
    after = wait_full_mesh(tb.hosts)
    assert own_name(after["host2"]) == n2, "the peer name must survive a restart (state dir)"
    new_uid = peer_entry(after["host2"], n2)["UID"]  # type: ignore[index]
    assert new_uid != old_uid
    for host in ("host1", "host3"):
        assert peer_entry(after[host], n2)["UID"] == new_uid, host  # type: ignore[index]
    assert after["host1"]["TerminationCount"] >= 1


def test_wrong_password_is_rejected_on_both_sides(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(3)
    h1, h2, h3 = tb.hosts
    launch(h1, "--password", "right-password")
    launch(h2, "--password", "wrong-password", h1.address)
    # A peer with the right password still gets in, encrypted.
    launch(h3, "--password", "right-password", h1.address)
    # And one without a password is told why it cannot get in.
    h4 = tb.add_host()
    launch(h4, h1.address)

    pattern = re.compile(r"connection (to|from) .* closed: .*(password|decrypt)", re.IGNORECASE)

    def rejected() -> bool:
        return bool(pattern.search(log_text(h1))) and bool(pattern.search(log_text(h2)))

    wait_for(rejected, "both sides to log the password failure", 15, tb.hosts)
    wait_for(
        lambda: "no password specificed, but peer requested an encrypted connection" in log_text(h4)
        and "password specified, but peer requested an unencrypted connection" in log_text(h1),
        "the password/no-password mismatch to be logged",
        15,
        tb.hosts,
    )
    for h in (h1, h2):
        lines = [line for line in log_text(h).splitlines() if pattern.search(line)]
        assert any("password" in line for line in lines), lines
        assert "Traceback" not in log_text(h)

    # Nobody crashed: both still answer, h2 still has h1 as a target and keeps trying.
    r2 = report(h2)
    assert r2["Encryption"] is True
    assert [p["Name"] for p in r2["Peers"]] == [own_name(r2)]
    target = [c for c in r2["Connections"] if c["Address"] == f"{h1.address}:6783"]
    assert target and target[0]["State"] in ("retrying", "connecting", "failed"), target
    assert "Encryption: enabled" in weave(h2, "status")
    assert "Encryption: disabled" in weave(h4, "status")

    def h1_h3_meshed() -> dict[str, Any] | None:
        r1 = report(h1)
        ok = len(r1["Peers"]) == 2 and established_to(r1, own_name(r1)) == {own_name(report(h3))}
        return r1 if ok else None

    r1 = wait_for(h1_h3_meshed, "host1 and host3 (same password) to connect", 15, tb.hosts)
    est = [c for c in r1["Connections"] if c["State"] == "established"]
    assert len(est) == 1 and est[0]["Attrs"]["encrypted"] is True
    assert "encrypted" in weave(h1, "status", "connections")
    assert "Encryption: enabled" in weave(h1, "status")


# Connects to argv[1]:6783 and misbehaves in the way argv[2] names; prints what the
# router did ("closed" when it closed the connection, "open" if it kept it).
GARBAGE_CLIENT = r"""
import socket, sys, time
addr, mode = sys.argv[1], sys.argv[2]
s = socket.create_connection((addr, 6783), timeout=5)
if mode == "junk":
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
elif mode == "bad-flag":
    s.sendall(b"weave\x01\x02" + b"\x07" + b"\x00" * 64)
elif mode == "huge-frame":
    s.sendall(b"weave\x01\x02" + b"\x00" + (0x7fffffff).to_bytes(4, "big") + b"\x00" * 64)
elif mode == "bad-version":
    s.sendall(b"weave\x09\x09")
s.settimeout(5)
received = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            print("closed", len(received))
            break
        received += chunk
except socket.timeout:
    print("open", len(received))
except ConnectionResetError:
    print("closed", len(received), "(reset)")
"""


def test_garbage_closes_only_that_connection(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(3)
    h1, h2, h3 = tb.hosts
    launch(h1)
    launch(h2, h1.address)
    before = wait_full_mesh([h1, h2])
    n1, n2 = own_name(before["host1"]), own_name(before["host2"])

    for mode in ("junk", "bad-flag", "huge-frame", "bad-version"):
        out = h3.run([sys.executable, "-c", GARBAGE_CLIENT, h1.address, mode], timeout=20).stdout
        assert out.startswith("closed"), f"{mode}: router kept the connection: {out}"

    # A peer that passes the handshake and then sends a garbled gossip message.
    out = run_fake_peer(h3, h1, "garbage", "garbage-gossip", timeout=20)
    assert "closed by router" in out, out

    r1, r2 = report(h1), report(h2)
    assert established_to(r1, n1) == {n2} and established_to(r2, n2) == {n1}
    assert not mesh_problems({"host1": r1, "host2": r2})
    assert r1["TerminationCount"] == before["host1"]["TerminationCount"] + 1  # the fake peer's
    assert r2["TerminationCount"] == before["host2"]["TerminationCount"]
    log1 = log_text(h1)
    assert re.search(r"connection from 10\.98\.0\.3:\d+ closed: .*header", log1), log1
    assert re.search(r"closed: .*ncryption flag", log1), log1
    assert re.search(r"closed: .*exceeds maximum size", log1), log1
    assert re.search(r"closed: .*version", log1), log1
    assert re.search(r"connection from .*\(fake-garbage\).* closed: protocol error", log1), log1
    assert "Traceback" not in log1
    assert "Connections: 1 (1 established)" in weave(h1, "status")


def test_peers_vanishing_mid_send_do_not_take_the_router_down(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(3)
    h1, h2, h3 = tb.hosts
    launch(h1)
    launch(h2, h1.address)
    before = wait_full_mesh([h1, h2])
    for _ in range(8):
        out = run_fake_peer(h3, h1, "reset", timeout=20)
        assert "connected to" in out, out
    time.sleep(0.3)
    log1 = log_text(h1)
    assert "Traceback" not in log1, log1
    assert len(re.findall(r"connection from .*\(fake-reset\).* closed: connection lost", log1)) >= 1, log1
    after = {"host1": report(h1), "host2": report(h2)}
    assert not mesh_problems(after)
    assert own_name(after["host1"]) == own_name(before["host1"])
    terminated = after["host1"]["TerminationCount"] - before["host1"]["TerminationCount"]
    assert 1 <= terminated <= 8


def _connection_counts(rep: dict[str, Any]) -> int:
    """The most connections a report shows for its router: established ones, or links
    in its own topology entry."""
    established = len([c for c in rep["Connections"] if c["State"] == "established"])
    return max(established, len(established_to(rep, own_name(rep))))


def test_connection_limit_holds(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(5)
    h1, h2, h3, h4, h5 = tb.hosts
    # host1 accepts one connection though three routers dial it.
    launch(h1, "--conn-limit", "1")
    for h in (h2, h3, h4):
        launch(h, h1.address)
    # host5 may make one connection though it is told of two peers (and discovers more).
    launch(h5, "--conn-limit", "1", h2.address, h3.address)

    refused = re.compile(r"connection from .* closed: Connection limit reached \(1\)")
    most = {"host1": 0, "host5": 0}
    deadline = time.monotonic() + 5  # watch both for this long at least
    while True:
        r1, r5 = report(h1), report(h5)
        for name, rep in (("host1", r1), ("host5", r5)):
            most[name] = max(most[name], _connection_counts(rep))
            assert most[name] <= 1, f"{name} had {most[name]} connections with --conn-limit 1:\n{rep}"
        limited = [c for c in r5["Connections"] if "Connection limit reached (1)" in c["Info"]]
        done = min(most.values()) == 1 and refused.search(log_text(h1)) and limited
        if time.monotonic() > deadline and done:
            break
        if time.monotonic() > deadline + 15:
            pytest.fail(f"no connection, no refusal logged or no limited target\n{r5}\n{diagnostics(tb.hosts)}")
        time.sleep(POLL)

    # host5's other target shows why it is not dialled (what Weave reports too).
    assert limited[0]["State"] in ("retrying", "failed"), limited
    # Exactly one of host2-4 got into host1; the others were refused and keep retrying.
    reports = {h.name: report(h) for h in (h2, h3, h4)}
    n1 = own_name(r1)
    into_h1 = [name for name, r in reports.items() if n1 in established_to(r, own_name(r))]
    assert len(into_h1) == 1, {n: established_to(r, own_name(r)) for n, r in reports.items()}
    assert established_to(r1, n1) == {own_name(reports[into_h1[0]])}
    for name, r in reports.items():
        if name in into_h1:
            continue
        target = [c for c in r["Connections"] if c["Address"] == f"{h1.address}:6783"]
        assert target and target[0]["State"] in ("retrying", "connecting"), target
    assert len(refused.findall(log_text(h1))) >= 2
    assert "Traceback" not in log_text(h1) + log_text(h5)


# ---------------------------------------------------------------- unknown gossip channels


# The fake peers are `tests.attacks.evil_peer` (real handshake, topology gossip with a
# link to the router): `listen` keeps the connection up and prints each message it
# receives on CHANNEL as a JSON line, `garbage-gossip` sends a gossip body that is not
# gob (nickname fake-garbage), `reset` resets the connection (RST) straight after the handshake.
CHANNEL = "nosuchchannel"


def run_fake_peer(host: Host, router: Host, mode: str, attack: str = "", timeout: float = 20) -> str:
    return evil_peer(host, router, "--nickname", f"fake-{mode}", attack or mode, timeout=timeout)


def spawn_fake_peer(host: Host, router: Host, mode: str, name: str, *args: str) -> Path:
    return spawn_evil_peer(host, router, f"fake-{mode}", "--name", name, "--nickname", f"fake-{mode}",
                           "listen", "--channel", CHANNEL, *args)


def _messages(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_unknown_gossip_channel_is_relayed(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(4)
    h1, h2, fake_host_a, fake_host_b = tb.hosts
    launch(h1)
    launch(h2, h1.address)
    meshed = wait_full_mesh([h1, h2])
    n1, n2 = own_name(meshed["host1"]), own_name(meshed["host2"])

    name_a = format_peer_name(random_peer_name())
    name_b = format_peer_name(random_peer_name())
    trigger = tb.state_root / f"go-{secrets.token_hex(4)}"
    log_b = spawn_fake_peer(fake_host_b, h2, "recv", name_b)
    sends = ("broadcast:broadcast-1", "unicast:unicast-1", "gossip:gossip-1", "gossip:gossip-1", "gossip:gossip-2")
    log_a = spawn_fake_peer(fake_host_a, h1, "send", name_a, "--trigger", str(trigger), "--to", name_b,
                            *(arg for spec in sends for arg in ("--send", spec)))

    # Wait until both routers have both fake peers (and their links) in their topology,
    # so the broadcast tree and unicast routes through host1 -> host2 exist.
    def both_known() -> bool:
        for h in (h1, h2):
            rep = report(h)
            if established_to(rep, name_a) != {n1} or established_to(rep, name_b) != {n2}:
                return False
        return True

    wait_for(both_known, "both routers to learn both fake peers", 15, tb.hosts)
    trigger.touch()

    def got_everything() -> list[dict[str, Any]] | None:
        msgs = _messages(log_b)
        return msgs if any(m["payload"] == "gossip-2" for m in msgs) and len(msgs) >= 4 else None

    msgs = wait_for(
        got_everything,
        "fake peer B to receive the relayed messages",
        15,
        [h1, h2],
        lambda: f"A: {log_a.read_text()}\nB: {log_b.read_text()}",
    )
    time.sleep(0.5)  # anything duplicated would have arrived by now
    msgs = _messages(log_b)
    by_payload: dict[str, list[dict[str, Any]]] = {}
    for m in msgs:
        by_payload.setdefault(m["payload"], []).append(m)
    assert set(by_payload) == {"broadcast-1", "unicast-1", "gossip-1", "gossip-2"}, msgs
    # The broadcast keeps its origin; it arrives once.
    (bcast,) = by_payload["broadcast-1"]
    assert bcast["tag"] == 6 and bcast["src"] == name_a
    # The unicast is relayed hop by hop to its destination, source unchanged.
    (uni,) = by_payload["unicast-1"]
    assert uni["tag"] == 5 and uni["src"] == name_a and uni["dst"] == name_b
    # Gossip is passed on by each hop in its own name; the duplicate was dropped.
    assert len(by_payload["gossip-1"]) == 1, msgs
    assert by_payload["gossip-1"][0]["tag"] == 4 and by_payload["gossip-1"][0]["src"] == n2
    # The sender hears nothing back on the channel (it is excluded from the relay).
    assert not _messages(log_a), log_a.read_text()
    for h in (h1, h2):
        assert "relaying gossip channel 'nosuchchannel'" in log_text(h)
        assert "Traceback" not in log_text(h)
    # The relay shows in the gossip byte counters, under "other" (a name from a peer is no label).
    metrics = weave_metrics(h1)
    assert metrics.get('pyweave_gossip_bytes_sent_total{channel="other"}', 0) > 0, metrics


def weave_metrics(host: Host) -> dict[str, float]:
    """/metrics of the host's router (via curl-less Python inside the namespace)."""
    code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:6784/metrics').read().decode())"
    text = host.run([sys.executable, "-c", code]).stdout
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
