"""`weaver`: the router daemon. One trio nursery owns the mesh and the HTTP API."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from fastdp.service import FastdpService
from ipam_crdt.reclaim import scan_bridge
from ipam_crdt.service import IpamConfigError, IpamService, IpamSettings
from router.api import build_app
from router.attach import Attacher, IpamAllocator, attach_routes, handover_refusal
from router.bridge import DEFAULT_TAP, DriverError, ensure_bridge, ensure_tap
from router.config import ConfigError, RouterConfig, parse_args
from router.expose import Exposer, expose_routes
from router.mesh import Mesh, MeshConfig
from router.overlay_switch import OverlaySwitch
from sleeve.datapath import DataPath, open_df_socket, open_udp_socket
from sleeve.service import SleeveOverlay
from sleeve.switch import Switch
from weavedns.service import DEFAULT_LISTEN, DnsService

log = logging.getLogger(__name__)


def mesh_config(cfg: RouterConfig) -> MeshConfig:
    return MeshConfig(
        name=cfg.name,
        nickname=cfg.nickname,
        port=cfg.port,
        host=cfg.host,
        password=cfg.password,
        trusted_subnets=cfg.trusted_subnets,
        conn_limit=cfg.conn_limit,
        discovery=cfg.discovery,
        min_version=cfg.min_protocol_version,
        initial_peers=cfg.peers,
    )


async def start_sleeve(cfg: RouterConfig, mesh: Mesh) -> SleeveOverlay:
    """The bridge, its sleeve TAP port and the UDP sockets."""
    await trio.to_thread.run_sync(functools.partial(ensure_bridge, cfg.bridge, cfg.mtu))
    tap = functools.partial(ensure_tap, DEFAULT_TAP, cfg.bridge, cfg.mtu, vnet_hdr=True, nonblocking=True)
    tap_fd = await trio.to_thread.run_sync(tap)
    sock = open_udp_socket(cfg.host, cfg.port)
    switch = Switch(mesh.name, lambda: mesh.data_routes, time.monotonic)
    datapath = DataPath(mesh.name, tap_fd, True, sock, switch, df_sock=open_df_socket())
    return SleeveOverlay(mesh, datapath, cfg.port)


async def run(
    cfg: RouterConfig, listeners: Sequence[socket.socket] = (), ready_fd: int | None = None
) -> None:
    """The daemon. `listeners` are mesh sockets bound by `weave launch`; `ready_fd` is a
    pipe to write one byte to once the API answers."""
    mesh = Mesh(mesh_config(cfg))
    sleeve = await start_sleeve(cfg, mesh)
    fastdp = FastdpService(mesh.name, cfg.bridge, cfg.mtu, cfg.port + 1) if cfg.fastdp else None
    overlay = OverlaySwitch(sleeve, fastdp, "" if cfg.fastdp else "fastdp off (--no-fastdp)")
    mesh.overlay = overlay
    # Services that gossip register their channels before the mesh makes connections.
    dns = DnsService(
        mesh,
        cfg.dns_listen_address or DEFAULT_LISTEN,
        domain=cfg.dns_domain,
        ttl=cfg.dns_ttl,
        resolv_conf=cfg.resolv_conf,
        state_dir=cfg.state_dir,
        enabled=cfg.dns,
        bridge=cfg.bridge,
        fallback_timeout=cfg.dns_fallback_timeout,
    )
    ipam = None
    if cfg.ipalloc_range:  # "" turns IPAM off, as in Weave
        settings = IpamSettings(cfg.ipalloc_range, cfg.ipalloc_init, cfg.ipalloc_default_subnet or None)
        # Before IPAM serves anyone: the addresses this host's containers already use
        # are claimed first, whatever the database remembers (ipam_crdt.reclaim).
        ports = await trio.to_thread.run_sync(scan_bridge, cfg.bridge)
        ipam = IpamService(mesh, settings, cfg.state_dir, host_ports=ports)
    attacher = Attacher(
        cfg.bridge,
        cfg.mtu,
        dns=dns if cfg.dns else None,
        ipam=IpamAllocator(ipam) if ipam is not None else None,
        dns_domain=cfg.dns_domain,
    )
    stop = trio.Event()
    if ipam is not None:
        ipam.handover_guard = functools.partial(_handover_guard, attacher)
    exposer = Exposer(cfg.bridge, attacher.ipam)
    app = build_app(mesh, dns=dns, ipam=ipam, routes=[*attach_routes(attacher), *expose_routes(exposer)])
    http = HypercornConfig()
    http.bind = [cfg.http_addr]
    http.accesslog = None
    http.errorlog = logging.getLogger("router.http")
    async with trio.open_nursery() as nursery:
        if ipam is not None:
            # DELETE /peer gave our space away: stop, once its answer has gone out.
            ipam.on_handed_over = functools.partial(nursery.start_soon, _stop_soon, stop)
        await nursery.start(sleeve.run)
        if fastdp is not None:
            await nursery.start(fastdp.run)
        mesh.config.overlays = overlay.overlays()
        if ipam is not None:
            await nursery.start(ipam.run)
        await nursery.start(mesh.run, listeners)
        await nursery.start(dns.run)
        await nursery.start(attacher.watch)
        await nursery.start(serve, app, http)
        (cfg.state_dir / "weaver.ready").write_text(str(os.getpid()))
        if ready_fd is not None:
            with contextlib.suppress(OSError):  # `weave launch` gave up waiting (^C): no reader
                os.write(ready_fd, b"1")
            os.close(ready_fd)
        gc.freeze()  # start-up's objects live as long as the daemon: no GC passes over them
        gc.enable()
        cpu = time.process_time()
        log.info("weaver ready: API on http://%s (%.2f s CPU since start)", cfg.http_addr, cpu)
        await nursery.start(_on_signal, stop)
        await stop.wait()
        nursery.cancel_scope.cancel()


async def _on_signal(
    stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()
            return


async def _stop_soon(stop: trio.Event, delay: float = 0.3) -> None:
    log.info("IP space handed over (DELETE /peer): shutting down")
    await trio.sleep(delay)
    stop.set()


@contextlib.asynccontextmanager
async def _handover_guard(attacher: Attacher) -> AsyncIterator[str | None]:
    """For DELETE /peer: attaches held off; why to refuse if containers are attached."""
    async with attacher.held() as attached:
        yield handover_refusal(attached)


def main(
    argv: list[str] | None = None, *, listeners: Sequence[socket.socket] = (), ready_fd: int | None = None
) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"weaver: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / "weaver.ready").unlink(missing_ok=True)
    try:
        trio.run(run, cfg, listeners, ready_fd)
    except IpamConfigError as exc:
        log.error("cannot start: %s", exc)
        print(f"weaver: {exc}", file=sys.stderr)
        return 2
    except (OSError, DriverError) as exc:
        log.error("cannot start: %s", exc)
        print(f"weaver: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        (cfg.state_dir / "weaver.ready").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
