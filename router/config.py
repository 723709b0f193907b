"""The router's flags (Weave's names), its state directory and its persistent identity."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ipam_crdt.address import CIDR
from ipam_crdt.errors import IPAMError
from ipam_crdt.store import migrate_from_weave
from router.errors import WireError
from router.peername import (
    PEERNAME_FILE,
    parse_peer_name,
    random_peer_name,
    read_peer_name_file,
    write_peer_name_file,
)
from router.targets import normalise_address

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/weave"
DEFAULT_HTTP_ADDR = "127.0.0.1:6784"
DEFAULT_MTU = 1376
DEFAULT_WEAVE_DB = "/var/lib/weave/weavedata.db"
MIGRATE_FLAG = "--migrate-from-weave"

# Weave flags whose features arrive with later work; refused with this reason until then.
NOT_YET = {
    "--no-bridged-fastdp": "fastdp",
    "--datapath": "fastdp",
    "--plugin": "the Docker plugin",
    "--plugin-v2": "the Docker plugin",
    "--proxy": "the Docker API proxy (not planned)",
    "--awsvpc": "AWS VPC mode (not planned)",
    "--expect-npc": "network policy (not planned)",
    "--no-masq-local": "IP address management (ipam_crdt)",
    "--token": "Weave Cloud discovery (the service no longer exists)",
}


def state_dir() -> Path:
    return Path(os.environ.get("WEAVE_STATE_DIR", DEFAULT_STATE_DIR))


def http_addr() -> str:
    return os.environ.get("WEAVE_HTTP_ADDR", DEFAULT_HTTP_ADDR)


@dataclass
class RouterConfig:
    name: int
    nickname: str
    port: int = 6783
    host: str = ""
    password: bytes | None = None
    trusted_subnets: list[ipaddress.IPv4Network] = field(default_factory=list)
    conn_limit: int = 200
    discovery: bool = True
    min_protocol_version: int = 1
    http_addr: str = DEFAULT_HTTP_ADDR
    log_level: str = "info"
    peers: list[str] = field(default_factory=list)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    mtu: int = DEFAULT_MTU
    bridge: str = "weave"
    dns: bool = True
    dns_domain: str = "weave.local."
    dns_listen_address: str = ""
    dns_ttl: int = 1
    dns_fallback_timeout: float = 5.0
    resolv_conf: str = "/etc/resolv.conf"
    ipalloc_range: str = "10.32.0.0/12"  # "" turns IPAM off, as in Weave
    ipalloc_init: str = "consensus"
    ipalloc_default_subnet: str = ""
    fastdp: bool = True
    # Weave Net's BoltDB file whose state was imported at launch (--migrate-from-weave).
    migrate_from_weave: Path | None = None


class ConfigError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser(prog: str = "weaver") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="pyweave router daemon", allow_abbrev=False)
    p.add_argument("--port", type=int, default=int(os.environ.get("WEAVE_PORT", 6783)))
    p.add_argument("--host", default="")
    p.add_argument("--name", default="")
    p.add_argument("--nickname", default="")
    p.add_argument("--password", default=None)
    p.add_argument("--trusted-subnets", default="")
    p.add_argument("--min-protocol-version", type=int, default=1, choices=(1, 2))
    p.add_argument("--conn-limit", type=int, default=200)
    p.add_argument("--no-discovery", action="store_true")
    p.add_argument("--http-addr", default=None)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-fastdp", action="store_true", help="use the sleeve only (also WEAVE_NO_FASTDP)")
    p.add_argument("--no-restart", action="store_true", help="accepted for compatibility")
    p.add_argument("--mtu", type=int, default=None, help="MTU of the bridge and containers (WEAVE_MTU)")
    p.add_argument("--weave-bridge", default="weave", help="name of the bridge containers attach to")
    p.add_argument("--ipalloc-range", default="10.32.0.0/12", help='IPAM range; "" turns IPAM off')
    p.add_argument("--ipalloc-init", default="consensus", help="consensus[=N], seed=PEER,... or observer")
    p.add_argument("--ipalloc-default-subnet", default="", help="subnet of net:default (default: the range)")
    p.add_argument("--no-dns", action="store_true", help="do not run weaveDNS")
    p.add_argument("--dns-domain", default="weave.local.")
    p.add_argument("--dns-listen-address", default="", help="default 169.254.53.1:53")
    p.add_argument("--dns-ttl", type=int, default=1)
    p.add_argument("--dns-fallback-timeout", type=float, default=5.0, help="seconds for upstream resolvers")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf", help="the host's resolvers, for other names")
    p.add_argument(
        MIGRATE_FLAG, default=None, metavar="PATH",
        help=f"take over Weave Net's peer name and IPAM state from PATH once (bare: {DEFAULT_WEAVE_DB})",
    )  # fmt: skip
    p.add_argument("peers", nargs="*")
    return p


def refuse_unsupported(argv: list[str]) -> None:
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in NOT_YET:
            raise ConfigError(
                f"{flag} is not supported yet: it needs {NOT_YET[flag]}, which pyweave does not have yet"
            )


def parse_args(argv: list[str], prog: str = "weaver") -> RouterConfig:
    refuse_unsupported(argv)
    # PATH is optional and, as in GNU tools, attached with "="; a separate word is a peer.
    argv = [f"{MIGRATE_FLAG}={DEFAULT_WEAVE_DB}" if a == MIGRATE_FLAG else a for a in argv]
    args = build_parser(prog).parse_args(argv)
    directory = state_dir()
    if not 0 < args.port < 65535:
        raise ConfigError(f"--port {args.port}: must be 1..65534 (the overlay also uses port+1)")
    if args.conn_limit < 0:
        raise ConfigError("--conn-limit must be 0 (unlimited) or more")
    trusted = []
    for part in filter(None, (s.strip() for s in args.trusted_subnets.split(","))):
        try:
            trusted.append(ipaddress.IPv4Network(part, strict=False))
        except ValueError:
            raise ConfigError(f"--trusted-subnets: {part!r} is not an IPv4 CIDR") from None
    mtu = args.mtu
    if mtu is None:
        try:
            mtu = int(os.environ.get("WEAVE_MTU") or DEFAULT_MTU)
        except ValueError:
            raise ConfigError(f"WEAVE_MTU={os.environ['WEAVE_MTU']!r} is not a number") from None
    if not 576 <= mtu <= 65535:
        raise ConfigError(f"--mtu {mtu}: must be between 576 and 65535")
    if not 0 < len(args.weave_bridge) <= 15:
        raise ConfigError(f"--weave-bridge {args.weave_bridge!r}: must be 1 to 15 characters")
    if args.dns_ttl < 0:
        raise ConfigError("--dns-ttl must be 0 or more")
    if args.dns_fallback_timeout <= 0:
        raise ConfigError("--dns-fallback-timeout must be positive")
    peers = []
    for peer in args.peers:
        try:
            peers.append(str(normalise_address(peer, args.port)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    domain = args.dns_domain if args.dns_domain.endswith(".") else args.dns_domain + "."
    password = args.password if args.password is not None else os.environ.get("WEAVE_PASSWORD")
    try:
        given_name = parse_peer_name(args.name) if args.name else None
    except WireError as exc:
        raise ConfigError(f"--name: {exc}") from None
    migrated = None
    if args.migrate_from_weave is not None:
        # Before the peer name is read: the import writes Weave's into the state directory.
        migrated = Path(args.migrate_from_weave)
        _migrate(migrated, directory, args.ipalloc_range, given_name)
    name = given_name if given_name is not None else load_or_create_name(directory)
    return RouterConfig(
        name=name,
        nickname=args.nickname or socket.gethostname(),
        port=args.port,
        host=args.host,
        password=password.encode() if password else None,
        trusted_subnets=trusted,
        conn_limit=args.conn_limit,
        discovery=not args.no_discovery,
        min_protocol_version=args.min_protocol_version,
        http_addr=args.http_addr or http_addr(),
        log_level=args.log_level,
        peers=peers,
        state_dir=directory,
        mtu=mtu,
        bridge=args.weave_bridge,
        dns=not args.no_dns,
        dns_domain=domain,
        dns_listen_address=args.dns_listen_address,
        dns_ttl=args.dns_ttl,
        dns_fallback_timeout=args.dns_fallback_timeout,
        resolv_conf=args.resolv_conf,
        ipalloc_range=args.ipalloc_range,
        ipalloc_init=args.ipalloc_init,
        ipalloc_default_subnet=args.ipalloc_default_subnet,
        fastdp=not (args.no_fastdp or os.environ.get("WEAVE_NO_FASTDP", "") not in ("", "0")),
        migrate_from_weave=migrated,
    )


def _migrate(source: Path, directory: Path, ipalloc_range: str, name: int | None) -> None:
    """Import Weave's state (once; a relaunch with the same file does nothing)."""
    try:
        universe = CIDR.parse_subnet(ipalloc_range).range() if ipalloc_range else None
        migrate_from_weave(source, directory, universe=universe, name=name)  # it logs what it did
    except IPAMError as exc:
        raise ConfigError(f"{MIGRATE_FLAG}: {exc}") from None


def load_or_create_name(directory: Path) -> int:
    """The peer name persisted in the state directory, made on first launch."""
    path = directory / PEERNAME_FILE
    try:
        name = read_peer_name_file(path)
    except WireError:
        log.warning("ignoring unreadable peer name in %s; making a new one", path)
        name = None
    if name is not None:
        return name
    name = random_peer_name()
    directory.mkdir(parents=True, exist_ok=True)
    write_peer_name_file(path, name)
    return name
