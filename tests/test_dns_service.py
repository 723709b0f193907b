"""The weaveDNS service for real: in-process meshes on 127.0.0.1 with DNS servers on 127.0.0.x,
queried over UDP/TCP with dnslib; the HTTP routes served by Hypercorn; and (as root) the
link-local listening address end to end in network namespaces."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from dnslib import QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette

from router.mesh import Mesh, MeshConfig
from router.peername import format_peer_name, parse_peer_name, random_peer_name
from tests.captures import capture_path
from weavedns.http import dns_routes
from weavedns.service import (
    DNS_ADDRESS,
    DnsInputError,
    DnsService,
    remove_netns_resolv_conf,
    write_netns_resolv_conf,
)
from weavedns.wire import TOMBSTONE_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
POLL = 0.02


class Clock:
    """A unix clock the test moves; shared by all nodes so gossip never looks skewed."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(probe: Callable[[], object], what: str, timeout: float = 5.0) -> float:
    """Poll a sync or async probe until truthy; returns the seconds it took."""
    start = trio.current_time()
    while True:
        value = probe()
        if hasattr(value, "__await__"):
            value = await value  # type: ignore[misc]
        if value:
            return trio.current_time() - start
        if trio.current_time() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await trio.sleep(POLL)


async def query(server: tuple[str, int], name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    q = DNSRecord(DNSHeader(id=secrets.randbits(16), rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    data = bytes(q.pack())
    with trio.fail_after(2):
        if tcp:
            stream = await trio.open_tcp_stream(*server)
            async with stream:
                await stream.send_all(struct.pack("!H", len(data)) + data)
                buf = b""
                while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                    chunk = await stream.receive_some(65536)
                    assert chunk, "server closed the TCP connection"
                    buf += chunk
                reply = buf[2:]
        else:
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.connect(server)
                await sock.send(data)
                reply = await sock.recv(4096)
    return DNSRecord.parse(reply)


def addrs(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


# ----------------------------------------------------------------- in-process nodes


@dataclass
class Node:
    index: int
    mesh: Mesh
    dns: DnsService
    scope: trio.CancelScope
    stopped: trio.Event

    @property
    def server(self) -> tuple[str, int]:
        assert self.dns.server.address is not None
        return self.dns.server.address

    async def resolve(self, name: str) -> list[str]:
        reply = await query(self.server, name)
        return sorted(addrs(reply)) if reply.header.rcode == RCODE.NOERROR else []

    async def rcode(self, name: str, qtype: str = "A") -> int:
        return (await query(self.server, name, qtype)).header.rcode

    async def nxdomain(self, name: str) -> bool:
        return await self.rcode(name) == RCODE.NXDOMAIN

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def start_node(
    nursery: trio.Nursery,
    index: int,
    tmp: Path,
    clock: Clock,
    peers: Sequence[str] = (),
    name: int | None = None,
    purge_interval: float = 60.0,
) -> Node:
    mesh = Mesh(
        MeshConfig(
            name=name if name is not None else random_peer_name(),
            nickname=f"n{index}",
            port=free_port(),
            host="127.0.0.1",
            discovery=False,
            initial_peers=list(peers),
        )
    )
    dns = DnsService(
        mesh,
        f"127.0.0.{10 + index}:0",
        resolv_conf=None,
        state_dir=tmp / f"n{index}",
        clock=clock,
        purge_interval=purge_interval,
    )
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                async with trio.open_nursery() as inner:
                    await inner.start(mesh.run)
                    await inner.start(dns.run)
                    task_status.started()
        finally:
            stopped.set()

    await nursery.start(run)
    return Node(index, mesh, dns, scope, stopped)


def established(mesh: Mesh) -> int:
    # No overlay here: connections carry gossip from the handshake on, without a data path.
    return len(mesh.connections)


@asynccontextmanager
async def line(tmp: Path, n: int = 3, purge_interval: float = 60.0) -> AsyncIterator[tuple[list[Node], Clock]]:
    """n nodes connected 1-2-3...: broadcasts from an end must be relayed to reach the other end."""
    clock = Clock()
    async with trio.open_nursery() as nursery:
        nodes: list[Node] = []
        for i in range(1, n + 1):
            peers = [f"127.0.0.1:{nodes[-1].mesh.config.port}"] if nodes else []
            nodes.append(await start_node(nursery, i, tmp, clock, peers, purge_interval=purge_interval))
        names = {node.mesh.name for node in nodes}

        def converged() -> bool:
            return all(set(node.mesh.peers) == names for node in nodes) and all(
                established(node.mesh) == (1 if node.index in (1, n) else 2) for node in nodes
            )

        await wait_until(converged, "the mesh to form")
        yield nodes, clock
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------- the mesh


async def test_name_added_on_one_peer_resolves_on_the_others(tmp_path: Path) -> None:
    async with line(tmp_path) as (nodes, _):
        n1, n2, n3 = nodes
        assert await n3.rcode("web.weave.local.") == RCODE.NXDOMAIN
        n1.dns.add("c1", "10.32.0.5", "web.weave.local")
        took = await wait_until(lambda: n3.resolve("web.weave.local."), "web on n3")
        assert took < 1.0
        for node in nodes:
            assert await node.resolve("web.weave.local.") == ["10.32.0.5"]
            assert await node.resolve("WEB") == ["10.32.0.5"]  # single label, case-insensitive
            assert node.dns.lookup("web") == ["10.32.0.5"]
            assert node.dns.reverse("10.32.0.5") == "web.weave.local."
        reply = await query(n3.server, "web.weave.local.")
        assert reply.header.aa == 1 and reply.rr[0].ttl == 1
        reply = await query(n2.server, "web.weave.local.", tcp=True)
        assert addrs(reply) == ["10.32.0.5"]

        ptr = await query(n3.server, "5.0.32.10.in-addr.arpa.", "PTR")
        assert ptr.header.rcode == RCODE.NOERROR
        assert [str(rr.rdata) for rr in ptr.rr] == ["web.weave.local."]

        (entry,) = n3.dns.entries()
        assert entry.origin == n1.mesh.name and entry.container_id == "c1" and entry.live
        assert n1.dns.local_entry_count() == 1 and n3.dns.local_entry_count() == 0
        # Only the origin may delete: n3 holds no entry of its own to tombstone.
        assert n3.dns.remove("c1") == 0


async def test_two_containers_with_one_name_alternate(tmp_path: Path) -> None:
    async with line(tmp_path) as (nodes, _):
        n1, n2, n3 = nodes
        n1.dns.add("c1", "10.32.0.1", "db.weave.local.")
        n3.dns.add("c3", "10.32.0.3", "db.weave.local.")
        both = ["10.32.0.1", "10.32.0.3"]
        for node in nodes:
            await wait_until(lambda node=node: node.dns.lookup("db") and sorted(node.dns.lookup("db")) == both,
                             f"both db records on n{node.index}")
        firsts = set()
        for _ in range(40):
            reply = await query(n2.server, "db.weave.local.")
            assert sorted(addrs(reply)) == both
            firsts.add(addrs(reply)[0])
        assert firsts == set(both), "answers are shuffled: each address comes first sometimes"


async def test_removal_gives_nxdomain_everywhere(tmp_path: Path) -> None:
    async with line(tmp_path) as (nodes, _):
        n1, _n2, n3 = nodes
        n1.dns.add("c1", "10.32.0.1", "api.weave.local.")
        n1.dns.add("c1", "10.32.0.1", "alias.weave.local.")
        n3.dns.add("c3", "10.32.0.3", "api.weave.local.")
        for node in nodes:
            await wait_until(lambda node=node: len(node.dns.lookup("api")) == 2, "api everywhere")
            await wait_until(lambda node=node: node.dns.lookup("alias"), "alias everywhere")

        assert n1.dns.remove("c1", "10.32.0.1", "API.weave.local") == 1  # hostnames match case-insensitively
        assert n3.dns.container_died("c3") == 1
        for node in nodes:
            await wait_until(lambda node=node: node.nxdomain("api.weave.local."), f"api gone on n{node.index}")
            assert await node.resolve("alias.weave.local.") == ["10.32.0.1"]
            assert node.dns.reverse("10.32.0.3") is None
        assert n1.dns.remove("c1") == 1
        for node in nodes:
            await wait_until(lambda node=node: node.nxdomain("alias.weave.local."), f"alias gone on n{node.index}")
            assert node.dns.reverse("10.32.0.1") is None
            # The tombstones stay (and are gossiped) until they expire.
            assert {e.hostname for e in node.dns.entries()} == {"api.weave.local.", "alias.weave.local."}
            assert all(not e.live for e in node.dns.entries())
        assert n1.dns.status_lines() == [] and n1.dns.local_entry_count() == 0


async def test_records_of_a_departed_peer_are_removed(tmp_path: Path) -> None:
    async with line(tmp_path) as (nodes, _):
        n1, n2, n3 = nodes
        n3.dns.add("c3", "10.32.0.3", "leaving.weave.local.")
        n1.dns.add("c1", "10.32.0.1", "staying.weave.local.")
        await wait_until(lambda: n1.dns.lookup("leaving"), "leaving on n1")
        await wait_until(lambda: n3.dns.lookup("staying"), "staying on n3")
        await n3.stop()
        assert CHANNEL_NAME not in n3.mesh.channels  # the service let go of the mesh
        for node in (n1, n2):
            await wait_until(lambda node=node: node.nxdomain("leaving.weave.local."),
                             f"n3's record gone on n{node.index}")
            assert n3.mesh.name not in node.mesh.peers
            assert all(e.origin != n3.mesh.name for e in node.dns.entries())
            assert await node.resolve("staying") == ["10.32.0.1"]
            assert node.dns.counters.peers_gone == 1


async def test_tombstones_expire_after_thirty_minutes(tmp_path: Path) -> None:
    async with line(tmp_path, purge_interval=0.05) as (nodes, clock):
        n1, n2, n3 = nodes
        n2.dns.add("c2", "10.32.0.2", "temp.weave.local.")
        n2.dns.add("c2", "10.32.0.2", "kept.weave.local.")
        for node in nodes:
            await wait_until(lambda node=node: len(node.dns.entries()) == 2, "entries everywhere")
        n2.dns.remove("c2", fqdn="temp.weave.local.")
        for node in nodes:
            await wait_until(lambda node=node: sum(not e.live for e in node.dns.entries()) == 1,
                             "the tombstone everywhere")
        clock.offset = TOMBSTONE_TIMEOUT - 60
        await trio.sleep(0.3)
        assert all(len(node.dns.entries()) == 2 for node in nodes), "kept for 30 minutes"
        clock.offset = TOMBSTONE_TIMEOUT + 5
        for node in nodes:
            await wait_until(lambda node=node: [e.hostname for e in node.dns.entries()] == ["kept.weave.local."],
                             f"the tombstone purged on n{node.index}")
            assert node.dns.lookup("kept") == ["10.32.0.2"]


async def test_restart_reannounces_saved_entries(tmp_path: Path) -> None:
    async with line(tmp_path, n=2) as (nodes, clock):
        n1, n2 = nodes
        n2.dns.add("c2", "10.32.0.2", "svc.weave.local.")
        n2.dns.add("c2", "10.32.0.2", "old.weave.local.")
        n2.dns.remove("c2", fqdn="old.weave.local.")
        await wait_until(lambda: n1.dns.lookup("svc"), "svc on n1")
        saved = json.loads((tmp_path / "n2" / "dns-entries.json").read_text())
        assert saved == [{"hostname": "svc.weave.local.", "container": "c2", "address": "10.32.0.2"}]
        name = n2.mesh.name
        await n2.stop()
        await wait_until(lambda: not n1.dns.lookup("svc"), "svc gone with n2")
        async with trio.open_nursery() as nursery:
            again = await start_node(nursery, 2, tmp_path, clock, [f"127.0.0.1:{n1.mesh.config.port}"], name=name)
            assert again.dns.lookup("svc") == ["10.32.0.2"]
            await wait_until(lambda: n1.dns.lookup("svc") == ["10.32.0.2"], "svc back on n1")
            assert not n1.dns.lookup("old")
            nursery.cancel_scope.cancel()


CHANNEL_NAME = "nameserver"


# ----------------------------------------------------------------- API details (one node)


def lone_service(tmp_path: Path, name: str = "02:99:00:00:00:02", **kwargs: object) -> DnsService:
    mesh = Mesh(MeshConfig(name=parse_peer_name(name), nickname="lone", port=free_port(), host="127.0.0.1"))
    return DnsService(mesh, "127.0.0.9:0", state_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_bad_input_changes_nothing(tmp_path: Path) -> None:
    dns = lone_service(tmp_path, resolv_conf=None)
    dns.add("c1", "10.32.0.1", "ok.weave.local")
    before = dns.entries()
    bad = [
        ("c1", "10.32.0.256", "a.weave.local"),
        ("c1", "10.32.0.1/12", "a.weave.local"),
        ("c1", "fe80::1", "a.weave.local"),
        ("c1", "10.32.0.1", "a.example.com"),
        ("c1", "10.32.0.1", ""),
        ("c1", "10.32.0.1", "bad name.weave.local"),
        ("c1", "10.32.0.1", "-dash.weave.local"),
        ("c1", "10.32.0.1", "a..weave.local"),
        ("c1", "10.32.0.1", "x" * 64 + ".weave.local"),
        ("", "10.32.0.1", "a.weave.local"),
        ("*", "10.32.0.1", "a.weave.local"),
    ]
    for container, ip, name in bad:
        with pytest.raises(DnsInputError):
            dns.add(container, ip, name)
    with pytest.raises(DnsInputError):
        dns.remove("c1", "300.1.1.1")
    with pytest.raises(DnsInputError):
        dns.remove("c1", fqdn="ok.example.com")
    assert dns.entries() == before
    assert dns.add("c1", "10.32.0.1", "under_score.weave.local.").hostname == "under_score.weave.local."


def test_report_matches_weave(tmp_path: Path) -> None:
    """Rebuild the DNS section of the captured Weave report: same keys, order and values."""
    empty = tmp_path / "resolv.conf"
    empty.write_text("search example\n")
    golden = json.loads(capture_path("ipam-dns-report.json").read_text())["DNS"]
    clock = Clock()
    dns = lone_service(tmp_path, resolv_conf=str(empty), clock=clock)
    assert dns.report() == {
        "Domain": "weave.local.", "Upstream": [], "Address": "127.0.0.9:0", "TTL": 1, "Entries": None,
    }
    dns.nameserver.add_entry("alpha.weave.local.", "cont11", 0x0A280001, origin=parse_peer_name("02:99:00:00:00:01"))
    dns.nameserver.add_entry("alpha.weave.local.", "cont31", 0x0A288001, origin=parse_peer_name("02:99:00:00:00:03"))
    dns.add("cont21", "10.40.64.1", "beta.weave.local.")
    clock.offset = 1795241052 - time.time()
    dns.remove("cont21")
    rep = dns.report()
    assert rep is not None
    assert list(rep) == list(golden)
    assert json.dumps({**rep, "Address": golden["Address"]}) == json.dumps(golden)

    assert dns.status_summary() == [
        ("Service", "dns"), ("Domain", "weave.local."), ("Upstream", "none"), ("TTL", "1"), ("Entries", "2"),
    ]
    assert dns.status_lines() == [
        "alpha        10.40.0.1             cont11 02:99:00:00:00:01",
        "alpha        10.40.128.1           cont31 02:99:00:00:00:03",
    ]
    dns.add("0123456789abcdef", "10.40.64.2", "a-much-longer-name.weave.local.")
    assert dns.status_lines()[0] == "a-much-longer-name 10.40.64.2      0123456789ab 02:99:00:00:00:02"


def test_disabled_service_stays_off_the_mesh(tmp_path: Path) -> None:
    dns = lone_service(tmp_path, enabled=False)
    assert CHANNEL_NAME not in dns.mesh.channels and not dns.mesh.on_peers_removed
    assert dns.report() is None and dns.status_summary() == []
    with pytest.raises(DnsInputError):
        dns.add("c1", "10.32.0.1", "a.weave.local")


def test_container_config_and_resolv_conf(tmp_path: Path) -> None:
    dns = lone_service(tmp_path)
    assert dns.dns_address == "127.0.0.9" and dns.host_setup is None
    cfg = dns.container_config()
    assert cfg.routes == () and cfg.neighbours == () and cfg.nameserver == "127.0.0.9"
    assert dns.resolv_conf_for_container().splitlines()[1:] == [
        "nameserver 127.0.0.9", "search weave.local", "options ndots:1",
    ]
    default = DnsService(Mesh(MeshConfig(name=random_peer_name(), nickname="x")), "0.0.0.0:53", state_dir=tmp_path)
    assert default.dns_address == DNS_ADDRESS and default.listen_host == DNS_ADDRESS
    assert default.host_setup is not None and default.host_setup.bridge == "weave"
    cfg = default.container_config("ethwe")
    assert [r.dst for r in cfg.routes] == [f"{DNS_ADDRESS}/32"]
    assert cfg.ip_commands("c9")[0] == ["ip", "-n", "c9", "route", "replace", f"{DNS_ADDRESS}/32", "dev", "ethwe",
                                        "scope", "link"]
    assert f"nameserver {DNS_ADDRESS}" in cfg.resolv_conf

    etc = tmp_path / "etc-netns"
    path = write_netns_resolv_conf("ctr-1", cfg.resolv_conf, etc_netns=etc)
    assert path == etc / "ctr-1" / "resolv.conf" and path.read_text() == cfg.resolv_conf
    remove_netns_resolv_conf("ctr-1", etc_netns=etc)
    assert not (etc / "ctr-1").exists()
    remove_netns_resolv_conf("ctr-1", etc_netns=etc)  # idempotent
    with pytest.raises(ValueError):
        write_netns_resolv_conf("../escape", "x", etc_netns=etc)


# ----------------------------------------------------------------- HTTP


def http(method: str, url: str, form: dict[str, str] | None = None) -> tuple[int, str, str]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers.get("Content-Type", "")


@asynccontextmanager
async def http_server(dns: DnsService) -> AsyncIterator[Callable[..., Awaitable[tuple[int, str, str]]]]:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    app = Starlette(routes=dns_routes(dns))
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        base = binds[0]

        async def call(method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, str, str]:
            return await trio.to_thread.run_sync(http, method, base + path, form)

        yield call
        nursery.cancel_scope.cancel()


async def test_http_routes(tmp_path: Path) -> None:
    dns = lone_service(tmp_path, resolv_conf=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(dns.run)
        server = dns.server.address
        assert server is not None
        async with http_server(dns) as call:
            assert await call("GET", "/name") == (200, "null\n", "application/json")
            assert await call("PUT", "/name/c1/10.32.0.5", {"fqdn": "web.weave.local"}) == (204, "", "")
            status, _, _ = await call("PUT", "/name/c2/10.32.0.6?fqdn=web.weave.local.&check-alive=true")
            assert status == 204
            reply = await query(server, "web.weave.local.")
            assert sorted(addrs(reply)) == ["10.32.0.5", "10.32.0.6"]

            status, body, ctype = await call("GET", "/name")
            assert status == 200 and ctype == "application/json"
            assert json.loads(body) == [
                {"ContainerID": c, "Origin": dns.mesh.name, "Addr": ip, "Hostname": "web.weave.local.",
                 "Version": 0, "Tombstone": 0}
                for c, ip in (("c1", "10.32.0.5"), ("c2", "10.32.0.6"))
            ]
            assert (await call("GET", "/domain"))[:2] == (200, "weave.local.")
            assert (await call("GET", "/dns-address"))[:2] == (200, "127.0.0.9")
            assert (await call("GET", "/dns-address-port"))[:2] == (200, f"127.0.0.9:{server[1]}")

            before = dns.entries()
            for path, form in [
                ("/name/c3/10.32.0.999", {"fqdn": "x.weave.local"}),
                ("/name/c3/10.32.0.7", {"fqdn": "x.example.com"}),
                ("/name/c3/10.32.0.7", {"fqdn": "not valid!.weave.local"}),
                ("/name/c3/10.32.0.7", None),
                ("/name/*/10.32.0.7", {"fqdn": "x.weave.local"}),
            ]:
                status, body, _ = await call("PUT", path, form)
                assert status == 400 and body.strip(), (path, form, status, body)
            status, body, _ = await call("DELETE", "/name/c1/nonsense")
            assert status == 400 and "invalid IPv4 address" in body
            status, body, _ = await call("DELETE", "/name/c1?fqdn=web.example.com")
            assert status == 400 and "not in the weaveDNS domain" in body
            assert dns.entries() == before
            assert (await call("POST", "/name/c1/10.32.0.5"))[0] == 405
            assert (await call("GET", "/name/c1"))[0] == 405

            assert (await call("DELETE", "/name/c1/10.32.0.5?fqdn=web.weave.local"))[0] == 204
            assert addrs(await query(server, "web.weave.local.")) == ["10.32.0.6"]
            assert (await call("DELETE", "/name/*/10.32.0.6"))[0] == 204
            assert (await query(server, "web.weave.local.")).header.rcode == RCODE.NXDOMAIN

            await call("PUT", "/name/c4/10.32.0.8", {"fqdn": "a.weave.local"})
            await call("PUT", "/name/c4/10.32.0.8", {"fqdn": "b.weave.local"})
            await call("PUT", "/name/c5/10.32.0.9", {"fqdn": "b.weave.local"})
            assert (await call("DELETE", "/name/c4"))[0] == 204
            assert dns.lookup("a") == [] and dns.lookup("b") == ["10.32.0.9"]
            assert (await call("DELETE", "/name?fqdn=b.weave.local"))[0] == 204
            assert dns.lookup("b") == []
            assert all(e["Tombstone"] for e in json.loads((await call("GET", "/name"))[1]))
        nursery.cancel_scope.cancel()


async def test_http_routes_when_disabled(tmp_path: Path) -> None:
    dns = lone_service(tmp_path, enabled=False)
    async with http_server(dns) as call:
        for method, path in [("GET", "/name"), ("PUT", "/name/c1/10.32.0.1?fqdn=a.weave.local"),
                             ("DELETE", "/name/c1"), ("GET", "/domain"), ("GET", "/dns-address")]:
            status, body, _ = await call(method, path)
            assert status == 404 and "disabled" in body


# ----------------------------------------------------------------- the link-local address, for real

ROUTER_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio
    from router.mesh import Mesh, MeshConfig
    from weavedns.service import DnsService

    async def main():
        mesh = Mesh(MeshConfig(name=0x02aa00000001, nickname="h", port=16783))
        dns = DnsService(mesh, "0.0.0.0:53", resolv_conf=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.run)
            await nursery.start(dns.run)
            dns.add("c1", "10.32.0.9", "web.weave.local")
            cfg = dns.container_config("ethwe")
            print(json.dumps({"commands": cfg.ip_commands(sys.argv[1]), "resolv_conf": cfg.resolv_conf}),
                  flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=20).stdout


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")
@pytest.mark.skipif(shutil.which("ip") is None or shutil.which("dig") is None, reason="needs iproute2 and dig")
def test_containers_reach_the_link_local_server_exposed_or_not() -> None:
    tag = secrets.token_hex(3)
    host, ctr = f"dnst-{tag}-h", f"dnst-{tag}-c"
    router: subprocess.Popen[str] | None = None
    try:
        for ns in (host, ctr):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", host, "link", "add", "weave", "type", "bridge")
        _sh("ip", "-n", host, "link", "set", "weave", "up")
        _sh("ip", "-n", host, "link", "add", "vethwepl", "type", "veth", "peer", "name", "ethwe", "netns", ctr)
        _sh("ip", "-n", host, "link", "set", "vethwepl", "master", "weave", "up")
        _sh("ip", "-n", ctr, "addr", "add", "10.32.0.9/12", "dev", "ethwe")
        _sh("ip", "-n", ctr, "link", "set", "ethwe", "up")

        router = subprocess.Popen(
            ["ip", "netns", "exec", host, sys.executable, "-c", ROUTER_SCRIPT, ctr],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert router.stdout is not None
        line_ = router.stdout.readline()
        assert line_, f"router did not start: {router.stderr.read() if router.stderr else ''}"
        setup = json.loads(line_)
        for argv in setup["commands"]:
            _sh(*argv)
        write_netns_resolv_conf(ctr, setup["resolv_conf"])

        def dig(*args: str) -> str:
            return _sh("ip", "netns", "exec", ctr, "dig", "+short", "+time=2", "+tries=1", *args).strip()

        assert dig("web") == "10.32.0.9"  # via /etc/netns/<ctr>/resolv.conf; the host is not exposed
        assert dig("+tcp", "web.weave.local") == "10.32.0.9"
        assert dig("-x", "10.32.0.9") == "web.weave.local."
        assert _sh("ip", "-n", host, "route", "show", "table", "main") == ""  # no route to containers
        _sh("ip", "-n", host, "addr", "add", "10.32.0.1/12", "dev", "weave")  # `weave expose`
        assert dig("web") == "10.32.0.9"
    finally:
        if router is not None:
            router.terminate()
            router.wait(timeout=5)
        remove_netns_resolv_conf(ctr)
        for ns in (host, ctr):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_peer_name_formatting_in_status(tmp_path: Path) -> None:
    dns = lone_service(tmp_path, name="02:99:00:00:00:07")
    dns.add("abc", "10.32.0.1", "x.weave.local")
    assert dns.status_lines() == [f"x            10.32.0.1                abc {format_peer_name(dns.mesh.name)}"]
