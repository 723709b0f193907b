"""Upstream resolvers for names weaveDNS does not own.

Pure part: `parse_resolv_conf` and `ResolvConfWatcher`, which decides when the file is
looked at again (at most every 5 s, re-read only when its mtime changed) and keeps the
last good list, with weaveDNS's own address filtered out (weave-net.md §6).

Driver part: `UpstreamConfig` does the stat/read for the watcher, and `Forwarder` is
the trio client: servers are tried in order, each with a fresh random query ID and a
timeout (default 5 s); a UDP reply with TC set is retried over TCP when the client
came over TCP (a UDP client gets the truncated reply and retries over TCP itself);
None means every server failed, so the caller answers SERVFAIL.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence

import trio

from router import ratelog

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHECK_INTERVAL", "DEFAULT_TIMEOUT", "parse_resolv_conf", "ResolvConfWatcher",
    "UpstreamConfig", "Forwarder",
]

DEFAULT_CHECK_INTERVAL = 5.0
DEFAULT_TIMEOUT = 5.0
DNS_PORT = 53
# Weave's upstream UDP client reads replies of up to this size.
UDP_BUFFER = 4096


def _normalise(addr: str) -> str | None:
    try:
        return str(ipaddress.ip_address(addr.split("%", 1)[0]))
    except ValueError:
        return None


def parse_resolv_conf(text: str, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The `nameserver` addresses in resolv.conf text, in order, minus `exclude`."""
    skip = {n for a in exclude if (n := _normalise(a)) is not None}
    servers: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        addr = _normalise(fields[1])
        if addr is None:
            log.warning("ignoring invalid nameserver %r in resolv.conf", fields[1])
        elif addr not in skip:
            servers.append(addr)
    return tuple(servers)


class ResolvConfWatcher:
    """When to look at resolv.conf again, and the servers it last listed (sans-IO)."""

    def __init__(self, exclude: Iterable[str] = (), check_interval: float = DEFAULT_CHECK_INTERVAL) -> None:
        self.exclude = tuple(exclude)
        self.check_interval = check_interval
        self.servers: tuple[str, ...] = ()
        self._last_check: float | None = None
        self._mtime: float | None = None

    def due(self, now: float) -> bool:
        """True if the file's mtime should be looked at (at most once per interval)."""
        return self._last_check is None or now - self._last_check >= self.check_interval

    def checked(self, now: float, mtime: float | None) -> bool:
        """Record a stat at `now` (mtime None: file missing); True if it must be re-read."""
        self._last_check = now
        return mtime is not None and mtime != self._mtime

    def load(self, text: str, mtime: float) -> tuple[str, ...]:
        self.servers = parse_resolv_conf(text, self.exclude)
        self._mtime = mtime
        log.info("upstream DNS servers: %s", ", ".join(self.servers) or "(none)")
        return self.servers


class UpstreamConfig:
    """The watcher on a real file: `servers()` stats (and re-reads) it when due."""

    def __init__(
        self,
        path: str = "/etc/resolv.conf",
        exclude: Iterable[str] = (),
        port: int = DNS_PORT,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.port = port
        self.watcher = ResolvConfWatcher(exclude, check_interval)
        self._clock = clock

    def servers(self) -> list[tuple[str, int]]:
        now = self._clock()
        if self.watcher.due(now):
            try:
                mtime: float | None = os.stat(self.path).st_mtime
            except OSError as exc:
                log.warning("cannot stat %s: %s", self.path, exc)
                mtime = None
            if self.watcher.checked(now, mtime) and mtime is not None:
                try:
                    with open(self.path, encoding="utf-8", errors="replace") as fh:
                        self.watcher.load(fh.read(), mtime)
                except OSError as exc:
                    log.warning("cannot read %s: %s", self.path, exc)
        return [(s, self.port) for s in self.watcher.servers]


def _is_reply_to(data: bytes, qid: int) -> bool:
    return len(data) >= 12 and data[0] == qid >> 8 and data[1] == qid & 0xFF and data[2] & 0x80 != 0


class Forwarder:
    """Sends queries to the upstream servers (trio)."""

    def __init__(
        self,
        servers: Callable[[], Sequence[tuple[str, int]]],
        timeout: float = DEFAULT_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self._servers = servers
        self.timeout = timeout
        self._rng = rng if rng is not None else random.SystemRandom()

    def servers(self) -> list[tuple[str, int]]:
        return list(self._servers())

    async def query(self, query: bytes, tcp: bool = False) -> bytes | None:
        """The first usable upstream reply (with our random ID; see AnswerEngine.relay), or None."""
        if len(query) < 12:
            return None
        for host, port in self._servers():
            qid = self._rng.getrandbits(16)
            request = struct.pack("!H", qid) + query[2:]
            try:
                with trio.fail_after(self.timeout):
                    reply = await self._udp(host, port, request, qid)
                if reply[2] & 0x02 and tcp:  # TC: the client can take it all over TCP
                    with trio.fail_after(self.timeout):
                        reply = await self._tcp(host, port, request, qid)
                return reply
            except trio.TooSlowError:
                ratelog.reject(log, "dns", "upstream_timeout", "upstream %s:%d timed out", host, port,
                               level=logging.DEBUG)
            except (OSError, EOFError) as exc:
                ratelog.reject(log, "dns", "upstream_failed", "upstream %s:%d failed: %s", host, port, exc,
                               level=logging.DEBUG)
        return None

    @staticmethod
    def _family(host: str) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    async def _udp(self, host: str, port: int, request: bytes, qid: int) -> bytes:
        with trio.socket.socket(self._family(host), socket.SOCK_DGRAM) as sock:
            # Connected: the kernel only hands us datagrams from this server.
            await sock.connect((host, port))
            await sock.send(request)
            while True:
                data = await sock.recv(UDP_BUFFER)
                if _is_reply_to(data, qid):
                    return data
                ratelog.reject(log, "dns", "upstream_stray", "ignoring stray datagram from upstream %s:%d",
                               host, port, level=logging.DEBUG)

    async def _tcp(self, host: str, port: int, request: bytes, qid: int) -> bytes:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(struct.pack("!H", len(request)) + request)
            size = struct.unpack("!H", await _read_exactly(stream, 2))[0]
            data = await _read_exactly(stream, size)
        if not _is_reply_to(data, qid):
            raise OSError(errno.EPROTO, "upstream TCP reply does not match the query")
        return data


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError("connection closed mid-message")
        buf += chunk
    return bytes(buf)
