"""The IPAM service on real in-process meshes (TCP on 127.0.0.1), and its HTTP API served by Hypercorn.

Every test starts its own routers: a `router.mesh.Mesh` and an `IpamService` per peer,
each with its own state directory (so its own sqlite database), bootstrapped by
`--ipalloc-init consensus=N` exactly as `weave launch` would. The timer runs every 0.1 s
instead of 5 s so that retries (consensus proposals, space requests) happen quickly.
"""

from __future__ import annotations

import argparse
import functools
import sqlite3
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette

from ipam_crdt.address import CIDR, ip_str
from ipam_crdt.config import AllocatorConfig
from ipam_crdt.http import ipam_routes
from ipam_crdt.service import (
    AllocationTimeout,
    BadRequest,
    ClaimRejected,
    IpamConfigError,
    IpamService,
    IpamSettings,
    NotFoundError,
    PeerStillConnected,
    ShuttingDown,
    UnknownPeer,
)
from ipam_crdt.store import DB_FILE, SqliteStore
from router.mesh import Mesh, MeshConfig
from router.peername import format_peer_name, random_peer_name

HOST = "127.0.0.1"
TICK = 0.1
WAIT = 10.0  # seconds a small mesh may take to agree on something (it takes well under 1 s)


async def wait_until(probe: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    with trio.move_on_after(timeout):
        while not probe():
            await trio.sleep(0.02)
        return
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Router:
    """One peer: a mesh and its IPAM service, stoppable on its own."""

    def __init__(
        self, nick: str, name: int, state_dir: Path, peers: list[Router], init: str, universe: str
    ) -> None:
        self.nick = nick
        self.name = name
        self.state_dir = state_dir
        self.port = 0  # the kernel picks one; known once the mesh listens
        self.mesh = Mesh(
            MeshConfig(
                name=self.name,
                nickname=nick,
                port=0,
                host=HOST,
                discovery=False,
                initial_peers=[f"{HOST}:{p.port}" for p in peers],
            )
        )
        self.ipam = IpamService(
            self.mesh,
            IpamSettings(ipalloc_range=universe, ipalloc_init=init),
            state_dir,
            allocate_timeout=WAIT,
            tick_interval=TICK,
        )
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.ipam.run)
                    await nursery.start(self.mesh.run)
                    self.port = self.mesh.listening[0][1]
                    task_status.started()
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()

    def connected(self, others: list[Router]) -> bool:
        return all(o.name in self.mesh.connections for o in others if o is not self)


class Cluster:
    def __init__(self, nursery: trio.Nursery, tmp: Path, universe: str, init: str) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.universe = universe
        self.init = init
        self.routers: dict[str, Router] = {}
        # Random names: parallel test runs on one machine must never take each other's peers for their own.
        self.names: dict[str, int] = {}

    async def start(self, nick: str) -> Router:
        """Start the router `nick`; again after a stop, with the same name and state directory."""
        peers = [r for r in self.routers.values() if r.nick != nick and not r.stopped.is_set()]
        name = self.names.setdefault(nick, random_peer_name())
        r = Router(nick, name, self.tmp / nick, peers, self.init, self.universe)
        self.routers[nick] = r
        await self.nursery.start(r.run)
        return r

    def live(self) -> list[Router]:
        return [r for r in self.routers.values() if not r.stopped.is_set()]

    async def connected(self) -> None:
        live = self.live()
        await wait_until(lambda: all(r.connected(live) for r in live), "a full mesh")

    async def rings_agree(self) -> None:
        """Wait until every peer sees the same owners (free counts travel with later gossip)."""

        def agree() -> bool:
            states = {ownership(r) for r in self.live()}
            return len(states) == 1 and not self.live()[0].ipam.alloc.ring.is_empty()

        await wait_until(agree, "every peer to hold the same ring")


@asynccontextmanager
async def cluster(
    tmp: Path, nicks: str = "abc", universe: str = "10.40.0.0/24", init: str = "consensus=3"
) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, tmp, universe, init)
        for nick in nicks:
            await c.start(nick)
        await c.connected()
        yield c
        nursery.cancel_scope.cancel()


def ownership(r: Router) -> tuple[tuple[int, int], ...]:
    return tuple((e.token, e.peer) for e in r.ipam.alloc.ring.entries)


def persisted(r: Router) -> dict[str, str]:
    """What the router's database holds, read through a connection of our own."""
    db = sqlite3.connect(r.state_dir / DB_FILE)
    try:
        return dict(db.execute("SELECT ident, cidrs FROM owned").fetchall())
    finally:
        db.close()


def all_addresses(routers: list[Router]) -> list[int]:
    return [c.addr for r in routers for cidrs in r.ipam.owned().values() for c in cidrs]


# ---------------------------------------------------------------- over the mesh


async def test_allocations_never_collide_and_space_is_donated(tmp_path: Path) -> None:
    # 62 usable addresses split 32/16/16 by consensus: 20 containers on every peer
    # cannot be served without donations.
    async with cluster(tmp_path, universe="10.40.0.0/26") as c:
        got: dict[str, CIDR] = {}

        async def one(r: Router, ident: str) -> None:
            got[ident] = await r.ipam.allocate(ident)

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for r in c.live():
                for i in range(20):
                    nursery.start_soon(one, r, f"{r.nick}-{i}")
        print("60 allocations took", trio.current_time() - t0)

        assert len(got) == 60
        addrs = [cidr.addr for cidr in got.values()]
        assert len(set(addrs)) == 60, "an address was handed out twice"
        universe = CIDR.parse("10.40.0.0/26")
        assert all(universe.host_range().contains(a) and cidr.prefix_len == 26 for a, cidr in
                   zip(addrs, got.values(), strict=True))
        assert sorted(all_addresses(c.live())) == sorted(addrs)
        # Durable before returned: every address is in its router's database.
        for r in c.live():
            on_disk = persisted(r)
            for ident, cidr in got.items():
                if ident.startswith(r.nick):
                    assert on_disk[ident] == str(cidr)
        # Idempotent per ident.
        for r in c.live():
            assert await r.ipam.allocate(f"{r.nick}-3") == got[f"{r.nick}-3"]
        assert len(all_addresses(c.live())) == 60
        # What each peer believes it owns never overlaps. (A donation goes to the asker
        # alone; the third peer hears of it with the next periodic gossip, as in Weave.)
        def owned() -> list[tuple[int, int]]:
            return sorted((r.start, r.end) for p in c.live() for r in p.ipam.owned_ranges())

        # A donation may still be on its way (the donor has let go, the asker not yet heard).
        await wait_until(lambda: sum(e - s for s, e in owned()) == 64, "donations in flight to land")
        assert all(x[1] <= y[0] for x, y in zip(owned(), owned()[1:], strict=False))
        status = c.routers["a"].ipam.status_section()
        assert "Status: ready" in status and "Range: 10.40.0.0/26" in status


async def test_claim_free_subnet_and_donation_on_demand(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a, b, cc = c.routers["a"], c.routers["b"], c.routers["c"]
        first = await a.ipam.allocate("one")
        assert await a.ipam.allocate("one") == first
        assert a.ipam.lookup("one") == [first]
        await c.rings_agree()

        # A subnet that another peer owns entirely: space is donated on demand.
        owner_of = a.ipam.alloc.ring.owner
        subnet = CIDR.parse("10.40.0.192/28")
        donor = owner_of(subnet.addr)
        asker = next(r for r in (a, b, cc) if r.name != donor)
        got = await asker.ipam.allocate("sub", "10.40.0.192/28")
        assert subnet.host_range().contains(got.addr) and got.prefix_len == 28

        # Claim a specific free address owned by another peer: it is asked for and given.
        target_owner = owner_of(CIDR.parse("10.40.0.130/24").addr)
        claimer = next(r for r in (a, b, cc) if r.name != target_owner)
        await claimer.ipam.claim("fixed", "10.40.0.130/24")
        assert [str(x) for x in claimer.ipam.lookup("fixed")] == ["10.40.0.130/24"]
        assert persisted(claimer)["fixed"] == "10.40.0.130/24"
        await claimer.ipam.claim("fixed", "10.40.0.130/24")  # idempotent
        # The same address for another container, here or on another peer: refused.
        with pytest.raises(ClaimRejected, match="10.40.0.130"):
            await claimer.ipam.claim("other", "10.40.0.130/24")
        elsewhere = next(r for r in (a, b, cc) if r is not claimer)
        with pytest.raises(ClaimRejected, match="owned by other peer"):
            await elsewhere.ipam.claim("other", "10.40.0.130/24", timeout=5)

        # Free then re-allocate: the lowest free address comes back.
        await a.ipam.free("one")
        assert a.ipam.lookup("one") == []
        assert "one" not in persisted(a)
        again = await a.ipam.allocate("two")
        assert again == first
        with pytest.raises(NotFoundError, match="no addresses for one"):
            await a.ipam.free("one")
        with pytest.raises(NotFoundError, match="not found"):
            await a.ipam.free("two", "10.40.0.77")
        await a.ipam.free("two", ip_str(first.addr))
        assert a.ipam.lookup("two") == []

        # Bad input changes nothing.
        before = {r.nick: r.ipam.owned() for r in (a, b, cc)}
        for bad in ("10.40.0.5/28", "192.168.0.0/24", "10.40.0.0/33", "nonsense"):
            with pytest.raises(BadRequest):
                await a.ipam.allocate("bad", bad)
        with pytest.raises(BadRequest):
            await a.ipam.claim("bad", "10.40.0.300/24")
        assert {r.nick: r.ipam.owned() for r in (a, b, cc)} == before
        assert sorted(set(all_addresses([a, b, cc]))) == sorted(all_addresses([a, b, cc]))


async def test_restart_keeps_addresses_then_rmpeer_reclaims(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a, b = c.routers["a"], c.routers["b"]
        old = c.routers["c"]
        mine = {f"k{i}": await old.ipam.allocate(f"k{i}") for i in range(3)}
        await c.rings_agree()
        ranges = old.ipam.owned_ranges()
        assert ranges

        await old.stop()
        await wait_until(lambda: old.name not in a.mesh.connections, "a to notice c stopped")
        new = await c.start("c")  # same name, same state directory, new port and UID
        assert new.mesh.uid != old.mesh.uid
        assert {k: new.ipam.lookup(k) for k in mine} == {k: [v] for k, v in mine.items()}
        assert new.ipam.owned_ranges() == ranges
        await c.connected()
        for k, v in mine.items():
            assert await new.ipam.allocate(k) == v
        fresh = await new.ipam.allocate("after-restart")
        assert fresh.addr not in {v.addr for v in mine.values()}
        await c.rings_agree()

        # rmpeer: refused for unknown, live and ourselves; works for a stopped peer.
        with pytest.raises(UnknownPeer):
            await b.ipam.rmpeer("no-such-host")
        with pytest.raises(PeerStillConnected):
            await b.ipam.rmpeer("c")
        with pytest.raises(BadRequest):
            await b.ipam.rmpeer(format_peer_name(b.name))
        await new.stop()
        await wait_until(lambda: new.name not in b.mesh.peers and new.name not in a.mesh.peers,
                         "a and b to forget c")
        gained = await b.ipam.rmpeer("c")
        assert gained == sum(r.size for r in new.ipam.owned_ranges())
        assert new.name not in b.ipam.alloc.ring.peer_names()
        await wait_until(lambda: ownership(a) == ownership(b), "a to see the takeover")
        assert new.name not in a.ipam.alloc.ring.peer_names()
        assert await b.ipam.rmpeer("c") == 0  # again: nothing left to take


async def test_shutdown_handoff_moves_space_to_a_live_peer(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        a, b, cc = c.routers["a"], c.routers["b"], c.routers["c"]
        await a.ipam.prime()
        await c.rings_agree()
        ours = sum(r.size for r in a.ipam.owned_ranges())
        assert ours > 0
        heir = await a.ipam.shutdown_handoff()
        assert heir in (b.name, cc.name)
        heir_router = b if heir == b.name else cc
        await wait_until(lambda: a.name not in b.ipam.alloc.ring.peer_names()
                         and a.name not in cc.ipam.alloc.ring.peer_names(), "the handover to arrive")
        assert sum(r.size for r in heir_router.ipam.owned_ranges()) >= ours
        with pytest.raises(ShuttingDown, match="weave reset"):
            await a.ipam.allocate("x")
        # The others keep allocating from the whole range.
        got = {await b.ipam.allocate(f"b{i}") for i in range(3)} | {await cc.ipam.allocate(f"c{i}") for i in range(3)}
        assert len(got) == 6


async def test_delete_peer_is_refused_while_the_guard_says_so(tmp_path: Path) -> None:
    async with cluster(tmp_path, nicks="ab", init="consensus=2") as c:
        a = c.routers["a"]
        port = await serve_api(c.nursery, a.ipam)
        assert (await http(port, "POST", "/ip/c1"))[0] == 200
        ranges = a.ipam.owned_ranges()
        refusal: list[str | None] = ["1 container(s) attached here: c1"]
        entered: list[bool] = []
        stopped: list[bool] = []

        @asynccontextmanager
        async def guard() -> AsyncIterator[str | None]:
            entered.append(True)
            yield refusal[0]

        a.ipam.handover_guard = guard
        a.ipam.on_handed_over = lambda: stopped.append(True)
        status, body = await http(port, "DELETE", "/peer")
        assert (status, "attached here: c1" in body) == (409, True), body
        assert a.ipam.owned_ranges() == ranges and not a.ipam.alloc.shutting_down and not stopped
        assert (await http(port, "POST", "/ip/c2"))[0] == 200  # still serving
        refusal[0] = None
        assert await http(port, "DELETE", "/peer") == (204, "")
        assert entered == [True, True] and stopped == [True]
        assert a.ipam.owned_ranges() == [] and a.ipam.alloc.shutting_down


async def test_damaged_database_refuses_to_start(tmp_path: Path) -> None:
    from tests.test_ipam_store import _filled_database

    path = _filled_database(tmp_path)
    with path.open("r+b") as f:
        f.seek(16384)
        f.write(b"\x5a" * 4096)
    damaged = path.read_bytes()
    mesh = Mesh(MeshConfig(name=random_peer_name(), nickname="x", port=0, host=HOST))
    with pytest.raises(IpamConfigError, match="ipam.sqlite3 is damaged"):
        IpamService(mesh, IpamSettings(), tmp_path)
    assert path.read_bytes() == damaged


async def test_allocate_before_consensus_times_out_clearly(tmp_path: Path) -> None:
    async with cluster(tmp_path, nicks="a") as c:
        a = c.routers["a"]
        with trio.fail_after(5):
            with pytest.raises(AllocationTimeout) as info:
                await a.ipam.allocate("lonely", timeout=0.3)
        message = str(info.value)
        assert "no address for lonely" in message and "awaiting consensus (quorum: 2, known: 1)" in message
        assert a.ipam.alloc.pending_allocates == []  # withdrawn
        with pytest.raises(AllocationTimeout, match="no IP allocation ring"):
            await a.ipam.prime(timeout=0.2)
        # A cancelled caller withdraws too.
        with trio.move_on_after(0.2):
            await a.ipam.allocate("impatient")
        assert a.ipam.alloc.pending_allocates == []
        # Once the others turn up, consensus is reached and allocation works.
        await c.start("b")
        await c.start("c")
        await c.connected()
        assert CIDR.parse("10.40.0.0/24").host_range().contains((await a.ipam.allocate("lonely")).addr)


# ---------------------------------------------------------------- HTTP


async def http(port: int, method: str, path: str) -> tuple[int, str]:
    def call() -> tuple[int, str]:
        req = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await trio.to_thread.run_sync(call)


async def serve_api(nursery: trio.Nursery, service: IpamService) -> int:
    config = HypercornConfig()
    config.bind = [f"{HOST}:0"]
    config.accesslog = None
    binds = await nursery.start(functools.partial(serve, Starlette(routes=ipam_routes(service)), config))
    return int(binds[0].rsplit(":", 1)[1])


async def test_http_api(tmp_path: Path) -> None:
    async with cluster(tmp_path, nicks="a", init="consensus=1") as c:
        a = c.routers["a"]
        port = await serve_api(c.nursery, a.ipam)
        me = format_peer_name(a.name)

        assert await http(port, "GET", "/ring") == (200, "")
        assert await http(port, "GET", "/ipinfo/defaultsubnet") == (200, "10.40.0.0/24")
        assert await http(port, "GET", "/ipinfo/tracker") == (200, "")
        assert await http(port, "POST", "/ip/c1") == (200, "10.40.0.1/24")
        assert await http(port, "POST", "/ip/c1") == (200, "10.40.0.1/24")
        assert await http(port, "POST", "/ip/c2?check-alive=true") == (200, "10.40.0.2/24")
        assert await http(port, "POST", "/ip/c3/10.40.0.128/25") == (200, "10.40.0.129/25")
        assert await http(port, "GET", "/ip/c1") == (200, "10.40.0.1/24")
        assert await http(port, "GET", "/ip/c3/10.40.0.128/25") == (200, "10.40.0.129/25")
        assert await http(port, "GET", "/ip/c3") == (200, "10.40.0.129/25")
        assert await http(port, "GET", "/ip/nobody") == (200, "")
        assert await http(port, "PUT", "/ip/c4/10.40.0.50/24") == (204, "")
        assert await http(port, "PUT", "/ip/c4/10.40.0.50/24?noErrorOnUnknown=true") == (204, "")
        assert await http(port, "PUT", "/ip/c5/10.40.0.60") == (204, "")
        assert await http(port, "GET", "/ip/c5") == (200, "10.40.0.60/24")
        assert await http(port, "PUT", "/ip/ext/192.168.7.7/24") == (204, "")  # outside: recorded

        async def is_alive(ident: str) -> bool:
            return ident != "dead"

        a.ipam.is_alive = is_alive
        assert await http(port, "POST", "/ip/dead?check-alive=true") == (200, "cancelled")  # as Weave
        assert await http(port, "POST", "/ip/dead") == (200, "10.40.0.3/24")  # no check asked for
        assert await http(port, "DELETE", "/ip/dead") == (204, "")
        status, body = await http(port, "GET", "/ip")
        assert status == 200 and '"containerid":"c4"' in body and "10.40.0.50/24" in body
        assert a.ipam.lookup("c4") == [CIDR.parse("10.40.0.50/24")]
        status, body = await http(port, "GET", "/status/ipam")
        assert status == 200 and f"{me}(a)" in body and "(100.0% of total) (5 active)" in body

        before = a.ipam.owned()
        for method, path, code, words in [
            ("PUT", "/ip/c6/10.40.0.50/24", 409, "already owned by c4"),
            ("POST", "/ip/c6/10.40.0.5/25", 400, "bits after network prefix"),
            ("POST", "/ip/c6/192.168.0.0/24", 400, "outside the IP allocation range"),
            # A subnet that only overlaps the range would hand out its addresses with its prefix.
            ("POST", "/ip/c6/0.0.0.0/0", 400, "outside the IP allocation range"),
            ("POST", "/ip/c6/10.0.0.0/8", 400, "outside the IP allocation range"),
            ("GET", "/ip/c6/0.0.0.0/0", 400, "outside the IP allocation range"),
            ("POST", "/ip/c6/10.40.0.0/31", 400, "smaller than minimum size"),
            ("POST", "/ip/c6/10.40.0.0/32", 400, "smaller than minimum size"),
            ("PUT", "/ip/c6/10.40.0.9/0", 400, "/0"),
            ("POST", "/ip/c6/10.40.0.0/40", 400, "invalid CIDR"),
            ("GET", "/ip/c6/10.40.0.0/nope", 400, "invalid CIDR"),
            ("PUT", "/ip/c6/10.40.0.256/24", 400, "invalid IPv4 address"),
            ("PUT", "/ip/c6/banana", 400, "invalid IPv4 address"),
            ("PUT", "/ip/c6/10.40.0.0/24", 400, "network address"),
            ("PUT", "/ip/c6/10.40.0.127/25", 400, "broadcast address"),
            ("DELETE", "/ip/c1/10.40.0.999", 400, "invalid IPv4 address"),
            ("DELETE", "/ip/c1/10.40.0.2", 404, "Unable to free"),
            ("DELETE", "/ip/nobody", 404, "no addresses for nobody"),
            ("DELETE", "/peer/no-such-peer", 404, "unknown peer"),
            ("DELETE", f"/peer/{me}", 400, "ourselves"),
            ("DELETE", "/peer/a", 400, "ourselves"),
            ("PATCH", "/ip/c1", 405, ""),
        ]:
            status, body = await http(port, method, path)
            assert (status, words in body) == (code, True), (method, path, status, body)
        assert a.ipam.owned() == before

        assert await http(port, "DELETE", "/ip/c1/10.40.0.1") == (204, "")
        assert await http(port, "DELETE", "/ip/c2") == (204, "")
        assert await http(port, "POST", "/ip/c7") == (200, "10.40.0.1/24")
        assert await http(port, "DELETE", "/peer/0e:00:00:00:00:09") == (404, "unknown peer '0e:00:00:00:00:09': "
                                                                        "not the name or nickname of a peer IPAM knows\n")
        assert await http(port, "DELETE", "/peer") == (204, "")
        status, body = await http(port, "POST", "/ip/c8")
        assert status == 503 and "weave reset" in body


async def test_http_client_gone_withdraws_the_request(tmp_path: Path) -> None:
    async with cluster(tmp_path, nicks="a") as c:  # consensus=3 with one peer: no ring
        a = c.routers["a"]
        port = await serve_api(c.nursery, a.ipam)
        stream = await trio.open_tcp_stream(HOST, port)
        await stream.send_all(b"POST /ip/waiting HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        await wait_until(lambda: a.ipam.alloc.pending_allocates, "the request to be pending")
        await stream.aclose()
        await wait_until(lambda: not a.ipam.alloc.pending_allocates, "the request to be withdrawn", 5)
        status, body = await http(port, "GET", "/status/ipam")
        assert status == 200 and body == ""


# ---------------------------------------------------------------- configuration


async def test_settings_are_checked(tmp_path: Path) -> None:
    mesh = Mesh(MeshConfig(name=random_peer_name(), nickname="x", port=0, host=HOST, initial_peers=["h:1"] * 3))
    for settings, words in [
        (IpamSettings(ipalloc_range="10.32.0.1/12"), "--ipalloc-range: invalid subnet"),
        (IpamSettings(ipalloc_range="10.32.0.0/31"), "smaller than minimum size"),
        (IpamSettings(ipalloc_init="consensus=0"), "consensus=N needs a positive count"),
        (IpamSettings(ipalloc_init="seed=zz"), "invalid --ipalloc-init"),
        (IpamSettings(ipalloc_default_subnet="10.0.0.0/16"), "not inside --ipalloc-range"),
        (IpamSettings(ipalloc_default_subnet="10.0.0.0/8"), "not inside --ipalloc-range"),
    ]:
        with pytest.raises(IpamConfigError, match=words):
            IpamService(mesh, settings)
    ns = argparse.Namespace(ipalloc_range="10.2.0.0/16", ipalloc_init="", ipalloc_default_subnet="10.2.3.0/24")
    svc = IpamService(mesh, IpamSettings.from_namespace(ns), tmp_path)
    assert (str(svc.universe), str(svc.default_subnet)) == ("10.2.0.0/16", "10.2.3.0/24")
    assert svc.alloc.paxos is not None and svc.alloc.paxos.status().quorum == 3  # consensus: (3 targets+1)/2+1
    assert svc.alloc.config.is_known_peer(mesh.name) and not svc.alloc.config.is_known_peer(1)
    assert (tmp_path / DB_FILE).exists()
    # An AllocatorConfig is taken as given, with the mesh's topology and a store in the state dir.
    config = AllocatorConfig(our_name=mesh.name, our_uid=mesh.uid, universe=CIDR.parse("10.9.0.0/24"))
    svc2 = IpamService(mesh, config, tmp_path / "other")
    assert svc2.alloc.config.is_known_peer is not AllocatorConfig.is_known_peer
    assert isinstance(svc2.alloc.store, SqliteStore)
    svc.close()
    svc2.close()
    with pytest.raises(ShuttingDown):
        await svc.allocate("late")
    with pytest.raises(IpamConfigError, match="the mesh is"):
        IpamService(mesh, AllocatorConfig(our_name=5, our_uid=1, universe=CIDR.parse("10.9.0.0/24")))
