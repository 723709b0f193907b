#!/usr/bin/env python3
"""IPAM service: allocations per second on one host, and time to the first allocation by consensus.

Part 1, throughput: one router (a mesh with nobody to talk to, `--ipalloc-init
consensus=1`) and its IpamService; `--count` allocations for distinct containers, one
after another through `IpamService.allocate` (each durable before it returns), then as
many frees. Store variants:
  sqlite-full  the SqliteStore as the daemon uses it (PRAGMA synchronous=FULL: an fsync per write)
  sqlite-off   the same with synchronous=OFF (no fsync; not crash-safe - for comparison only)
  memory       MemoryStore (no persistence at all: the cost of the core and the service)
  http-full    sqlite-full driven over HTTP: POST /ip/<id> on Hypercorn, keep-alive client
The state directory decides what an fsync costs; pass --state-dir to measure a given disk.

Part 2, bootstrap: N routers on 127.0.0.1 (N = 3 and 10, `--ipalloc-init consensus=N`,
each told the addresses of the routers started before it), default 5 s IPAM timer.
  cold_s  from starting all N routers to the first allocation (issued at once, on the last
          router: it waits for the mesh to form and for Paxos)
  warm_s  with the mesh already formed: from the allocate call to its return
  connect_s  until every router had a connection to every other (cold runs)
Medians over --rounds runs.

    python bench/bench_ipam.py [--count 2000] [--sizes 3,10] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypercorn.config import Config as HypercornConfig  # noqa: E402
from hypercorn.trio import serve  # noqa: E402
from starlette.applications import Starlette  # noqa: E402

from ipam_crdt.address import CIDR  # noqa: E402
from ipam_crdt.config import AllocatorConfig, ConsensusMode  # noqa: E402
from ipam_crdt.http import ipam_routes  # noqa: E402
from ipam_crdt.service import IpamService, IpamSettings  # noqa: E402
from ipam_crdt.store import MemoryStore, SqliteStore  # noqa: E402
from router.mesh import Mesh, MeshConfig  # noqa: E402
from router.peername import random_peer_name  # noqa: E402

HOST = "127.0.0.1"
RANGE = "10.32.0.0/12"


def filesystem_of(path: Path) -> str:
    """The mount (type) holding `path`, from /proc/mounts."""
    best, fstype = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, kind
    except OSError:
        pass
    return f"{fstype} at {best or '?'}"


def new_mesh(nick: str, peers: list[int], name: int | None = None) -> Mesh:
    return Mesh(
        MeshConfig(
            name=name if name is not None else random_peer_name(),
            nickname=nick,
            port=0,
            host=HOST,
            discovery=False,
            initial_peers=[f"{HOST}:{p}" for p in peers],
        )
    )


# ---------------------------------------------------------------- part 1: throughput


class KeepAliveClient:
    """The least HTTP/1.1 client: one connection, one request at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _receive(self) -> bytes:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    async def request(self, method: str, path: str) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n"
        await self.stream.send_all(head.encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += await self._receive()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
        while len(rest) < length:
            rest += await self._receive()
        self.buf = rest[length:]
        return status, rest[:length]


async def throughput(variant: str, count: int, state_root: Path) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix=f"ipam-{variant}-", dir=state_root))
    mesh = new_mesh("bench", [])
    if variant == "memory":
        config: AllocatorConfig | IpamSettings = AllocatorConfig(
            our_name=mesh.name, our_uid=mesh.uid, universe=CIDR.parse(RANGE),
            bootstrap=ConsensusMode(1), store=MemoryStore(), now=time.time(),
        )
        service = IpamService(mesh, config)
    else:
        service = IpamService(mesh, IpamSettings(RANGE, "consensus=1"), state_dir)
        if variant == "sqlite-off":
            store = service.alloc.store
            assert isinstance(store, SqliteStore)
            store._db.execute("PRAGMA synchronous=OFF")  # bench only: the store has no such setting
    result: dict[str, Any] = {"variant": variant, "count": count}
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await nursery.start(mesh.run)
        await service.prime()
        if variant.startswith("http"):
            http = HypercornConfig()
            http.bind = [f"{HOST}:0"]
            http.accesslog = None
            http.loglevel = "WARNING"
            http.keep_alive_max_requests = 3 * count  # Hypercorn closes after 1000 by default
            app = Starlette(routes=ipam_routes(service))
            binds = await nursery.start(functools.partial(serve, app, http))
            port = int(binds[0].rsplit(":", 1)[1])
            client = KeepAliveClient(await trio.open_tcp_stream(HOST, port))
            t0 = time.perf_counter()
            for i in range(count):
                status, _ = await client.request("POST", f"/ip/c{i}")
                assert status == 200, status
            t1 = time.perf_counter()
            for i in range(count):
                status, _ = await client.request("DELETE", f"/ip/c{i}")
                assert status == 204, status
            t2 = time.perf_counter()
            await client.stream.aclose()
        else:
            t0 = time.perf_counter()
            for i in range(count):
                await service.allocate(f"c{i}")
            t1 = time.perf_counter()
            for i in range(count):
                await service.free(f"c{i}")
            t2 = time.perf_counter()
        result["alloc_per_s"] = round(count / (t1 - t0), 1)
        result["alloc_ms"] = round((t1 - t0) / count * 1000, 3)
        result["free_per_s"] = round(count / (t2 - t1), 1)
        nursery.cancel_scope.cancel()
    return result


# ---------------------------------------------------------------- part 2: bootstrap


class Peer:
    def __init__(self, i: int, n: int, state_root: Path, peers: list[int]) -> None:
        self.mesh = new_mesh(f"p{i}", peers)
        state_dir = Path(tempfile.mkdtemp(prefix=f"p{i}-", dir=state_root))
        self.ipam = IpamService(self.mesh, IpamSettings(RANGE, f"consensus={n}"), state_dir)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.ipam.run)
            await nursery.start(self.mesh.run)
            task_status.started(self.mesh.listening[0][1])


async def bootstrap(n: int, state_root: Path, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"n": n}
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        peers: list[Peer] = []
        ports: list[int] = []
        for i in range(n):
            p = Peer(i, n, state_root, list(ports))
            ports.append(await nursery.start(p.run))
            peers.append(p)

        async def connected() -> None:
            while not all(len(p.mesh.connections) == n - 1 for p in peers):
                await trio.sleep(0.005)
            result["connect_s"] = round(trio.current_time() - t0, 3)

        nursery.start_soon(connected)
        with trio.fail_after(timeout):
            await peers[-1].ipam.allocate("first")
        result["cold_s"] = round(trio.current_time() - t0, 3)
        with trio.fail_after(timeout):
            while not all(not p.ipam.alloc.ring.is_empty() for p in peers):
                await trio.sleep(0.005)
        result["all_have_ring_s"] = round(trio.current_time() - t0, 3)
        nursery.cancel_scope.cancel()

    # Warm: the mesh formed first, then the first allocation.
    async with trio.open_nursery() as nursery:
        peers, ports = [], []
        for i in range(n):
            p = Peer(i, n, state_root, list(ports))
            ports.append(await nursery.start(p.run))
            peers.append(p)
        with trio.fail_after(timeout):
            while not all(len(p.mesh.connections) == n - 1 for p in peers):
                await trio.sleep(0.005)
        t1 = trio.current_time()
        with trio.fail_after(timeout):
            await peers[-1].ipam.allocate("first")
        result["warm_s"] = round(trio.current_time() - t1, 4)
        nursery.cancel_scope.cancel()
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 4)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    state_root = args.state_dir or Path(tempfile.mkdtemp(prefix="bench-ipam-"))
    state_root.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "ipam",
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()
        },
        "state_dir_filesystem": filesystem_of(state_root),
        "throughput": [],
        "bootstrap": [],
    }
    for variant in args.variants.split(","):
        print(f"throughput {variant} ...", file=sys.stderr, flush=True)
        doc["throughput"].append(await throughput(variant, args.count, state_root))
    for n in (int(s) for s in args.sizes.split(",") if s.strip()):
        runs = []
        for r in range(args.rounds):
            print(f"bootstrap N={n} round {r + 1} ...", file=sys.stderr, flush=True)
            runs.append(await bootstrap(n, state_root, args.timeout))
        doc["bootstrap"].append({
            "n": n,
            "rounds": runs,
            **{k: median_of(runs, k) for k in ("connect_s", "cold_s", "all_have_ring_s", "warm_s")},
        })
    return doc


def print_tables(doc: dict[str, Any]) -> None:
    print(f"state dir on {doc['state_dir_filesystem']}")
    print(f"{'variant':<12} {'count':>6} {'alloc/s':>9} {'ms/alloc':>9} {'free/s':>9}")
    for r in doc["throughput"]:
        print(f"{r['variant']:<12} {r['count']:>6} {r['alloc_per_s']:>9.1f} {r['alloc_ms']:>9.3f} "
              f"{r['free_per_s']:>9.1f}")
    print()
    print(f"{'peers':>5} {'connect_s':>10} {'cold_s':>8} {'all_ring_s':>10} {'warm_s':>8}   (medians)")
    for b in doc["bootstrap"]:
        print(f"{b['n']:>5} {b['connect_s']:>10.3f} {b['cold_s']:>8.3f} {b['all_have_ring_s']:>10.3f} "
              f"{b['warm_s']:>8.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="allocations per throughput variant")
    p.add_argument("--variants", default="sqlite-full,sqlite-off,memory,http-full")
    p.add_argument("--sizes", default="3,10", help="comma-separated consensus sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed for a first allocation")
    p.add_argument("--state-dir", type=Path, help="where the databases go (default: a new temp dir)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    doc = trio.run(main_async, args)
    print_tables(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
