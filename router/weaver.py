"""`weaver`: the router daemon. One trio nursery owns the mesh and the HTTP API."""

from __future__ import annotations

import logging
import os
import signal
import sys

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from router.api import build_app
from router.config import ConfigError, RouterConfig, parse_args
from router.mesh import Mesh, MeshConfig

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


async def run(cfg: RouterConfig) -> None:
    mesh = Mesh(mesh_config(cfg))
    http = HypercornConfig()
    http.bind = [cfg.http_addr]
    http.accesslog = None
    http.errorlog = logging.getLogger("router.http")
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        await nursery.start(serve, build_app(mesh), http)
        (cfg.state_dir / "weaver.ready").write_text(str(os.getpid()))
        log.info("weaver ready: API on http://%s", cfg.http_addr)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                shutdown.set()
                break
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
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
        trio.run(run, cfg)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        print(f"weaver: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        (cfg.state_dir / "weaver.ready").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
