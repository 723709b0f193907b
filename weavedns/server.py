"""The weaveDNS server driver: UDP and TCP on one address.

UDP is served by a dedicated thread running a tight blocking ``recvfrom``/``sendto``
loop over `AnswerEngine.answer` (whose cache makes a local answer a dict lookup plus a
concatenation); only queries that must be forwarded upstream are handed to trio, with
`TrioToken.run_sync_soon` so the loop never waits for them. TCP (rare, low volume) and
forwarding run as trio tasks. `DNSServer.run` is a trio task: start it with
``await nursery.start(server.run)``; cancelling it stops everything.

Bad input never stops the server: the engine checks every query once and drops it or
answers FORMERR/NOTIMP/BADVERS; an unexpected error answering one query gets SERVFAIL.
Every such event is counted in /metrics and logged at most once per interval
(router.ratelog), never with a traceback per packet.

TCP connections are bounded so that an honest client is always served (RFC 7766 §6.2.3
leaves the numbers to the server): a connection must deliver each whole query within
`tcp_idle_timeout` of the previous reply (or of opening), and read its reply within as
long; a source address holds at most `tcp_per_source` connections and all sources at
most `tcp_max_connections`. A new connection over either bound closes the oldest *idle*
connection in its way (one waiting for a query, possibly mid-way through a slow one)
rather than being refused; it is refused only when every connection in its way is busy
answering, which the upstream timeout bounds.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import trio

from router import ratelog
from weavedns.answer import DEFAULT_DOMAIN, DEFAULT_TTL, AnswerEngine, Forward
from weavedns.records import Nameserver
from weavedns.upstream import DEFAULT_TIMEOUT, Forwarder, UpstreamConfig

log = logging.getLogger(__name__)

__all__ = ["DNSServer", "ServerStats", "make_server"]

# Queries are small; anything longer than this is cut by the kernel and then fails to parse.
_UDP_RECV_SIZE = 4096
# A larger receive buffer absorbs bursts while the UDP thread waits for the GIL.
_UDP_RCVBUF = 1 << 20
# Stub resolvers (glibc after a TC reply) send their query as soon as they connect and
# close after the answer, so a few seconds is plenty for them, while a client holding
# connections open costs us a slot for no more than that. RFC 7766 suggests more for
# idle keep-alive, but these bounds only bite a client that sends nothing.
TCP_IDLE_TIMEOUT = 5.0
MAX_TCP_CONNECTIONS = 256
# One container (one address) rarely needs more than a few at once.
MAX_TCP_PER_SOURCE = 16
# Forwards waiting for an upstream at once; beyond this new ones get SERVFAIL at once.
_MAX_PENDING_FORWARDS = 1024


@dataclass
class ServerStats:
    udp_queries: int = 0
    tcp_queries: int = 0
    forwarded: int = 0
    servfail: int = 0
    errors: int = 0
    tcp_evicted: int = 0
    tcp_refused: int = 0
    tcp_timeouts: int = 0


@dataclass(eq=False)
class _TcpConn:
    """One TCP client: `busy` while a query is being answered (it is then not idle)."""

    source: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    busy: bool = False


class DNSServer:
    """weaveDNS on `host`:`port` (port 0 picks a free port, the same for UDP and TCP)."""

    def __init__(
        self,
        engine: AnswerEngine,
        forwarder: Forwarder | None,
        host: str = "0.0.0.0",
        port: int = 53,
        *,
        tcp: bool = True,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        tcp_max_connections: int = MAX_TCP_CONNECTIONS,
        tcp_per_source: int = MAX_TCP_PER_SOURCE,
    ) -> None:
        self.engine = engine
        self.forwarder = forwarder
        self.host = host
        self.port = port
        self.tcp = tcp
        self.stats = ServerStats()
        self.address: tuple[str, int] | None = None
        self._udp: socket.socket | None = None
        self._stopping = False
        self._pending_forwards = 0
        # Forward bookkeeping is touched by the UDP thread and the trio thread.
        self._lock = threading.Lock()
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_connections = tcp_max_connections
        self.tcp_per_source = tcp_per_source
        # Oldest first (dicts keep insertion order): where eviction looks.
        self._tcp_conns: dict[_TcpConn, None] = {}
        self._tcp_per_source: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None

    def report(self, nameserver: Nameserver) -> dict[str, Any]:
        """The DNS section of Weave's /report."""
        return {
            "Domain": self.engine.domain,
            "Upstream": [host for host, _ in self.forwarder.servers()] if self.forwarder else [],
            "Address": f"{self.host}:{self.port}",
            "TTL": self.engine.ttl,
            "Entries": [e.to_report() for e in nameserver.entries()],
        }

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        udp, listeners = await self._bind()
        self._udp = udp
        self._stopping = False
        self.address = udp.getsockname()[:2]
        token = trio.lowlevel.current_trio_token()
        thread: threading.Thread | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                name = f"weavedns-udp-{self.address[1]}"
                thread = threading.Thread(target=self._udp_loop, args=(udp, token), name=name, daemon=True)
                thread.start()
                if listeners:
                    nursery.start_soon(self._serve_tcp, listeners)
                log.info("weaveDNS listening on %s:%d (domain %s)", *self.address, self.engine.domain)
                task_status.started(self.address)
                await trio.sleep_forever()
        finally:
            self._stopping = True
            if thread is not None:
                self._wake(udp)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(thread.join, 2.0)
                if thread.is_alive():
                    log.warning("UDP thread did not stop in time")
            udp.close()
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _bind(self) -> tuple[socket.socket, list[trio.SocketListener]]:
        attempts = 20 if self.port == 0 else 1
        for attempt in range(attempts):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
                udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                listeners = [await self._tcp_listener(port)] if self.tcp else []
                return udp, listeners
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
            except BaseException:
                udp.close()
                raise
        raise AssertionError("unreachable")

    async def _tcp_listener(self, port: int) -> trio.SocketListener:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((self.host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return trio.SocketListener(sock)

    def _wake(self, udp: socket.socket) -> None:
        """Unblock the UDP thread's recvfrom with an empty datagram to ourselves."""
        host, port = udp.getsockname()[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"", (host, port))
        except OSError as exc:
            log.debug("could not wake UDP thread: %s", exc)

    # ------------------------------------------------------------ UDP

    def _udp_loop(self, sock: socket.socket, token: trio.lowlevel.TrioToken) -> None:
        recv = sock.recvfrom
        send = sock.sendto
        answer = self.engine.answer
        stats = self.stats
        while True:
            try:
                data, addr = recv(_UDP_RECV_SIZE)
            except OSError as exc:
                if self._stopping:
                    return
                ratelog.reject(log, "dns", "udp_receive_failed", "UDP receive failed: %s", exc,
                               level=logging.DEBUG)
                continue
            if self._stopping:
                return
            stats.udp_queries += 1
            try:
                reply = answer(data, False, addr[0])
            except Exception as exc:
                reply = self._internal_error(data, exc, addr[0])
            if isinstance(reply, Forward):
                reply = self._dispatch_forward(token, data, addr, reply)
            if reply is None:
                continue
            try:
                send(reply, addr)
            except OSError as exc:
                ratelog.reject(log, "dns", "udp_send_failed", "UDP send to %s failed: %s", addr, exc,
                               level=logging.DEBUG)

    def _internal_error(self, data: bytes, exc: Exception, source: str) -> bytes | None:
        """SERVFAIL for a query whose answering raised: a bug, counted and logged
        rate-limited with the exception's type but no traceback (one per packet would
        fill the disk)."""
        with self._lock:
            self.stats.errors += 1
            self.stats.servfail += 1
        ratelog.reject(log, "dns", "internal_error", "error answering a DNS query from %s: %s: %s",
                       source, type(exc).__name__, exc, level=logging.ERROR)
        try:
            return self.engine.error_response(data)
        except Exception:  # as broken as the engine: send nothing
            return None

    def _dispatch_forward(
        self, token: trio.lowlevel.TrioToken, data: bytes, addr: tuple[str, int], decision: Forward
    ) -> bytes | None:
        """Hand a forward to trio; returns a reply to send now if that is not possible."""
        with self._lock:
            busy = self.forwarder is None or self._pending_forwards >= _MAX_PENDING_FORWARDS
            if busy:
                self.stats.servfail += 1
            else:
                self._pending_forwards += 1
        if busy:
            return self.engine.error_response(data)
        try:
            token.run_sync_soon(self._start_udp_forward, data, addr, decision.max_size)
        except trio.RunFinishedError:
            self._forward_done()
        return None

    def _forward_done(self) -> None:
        with self._lock:
            self._pending_forwards -= 1

    def _start_udp_forward(self, data: bytes, addr: tuple[str, int], max_size: int | None) -> None:
        if self._nursery is None:
            self._forward_done()
            return
        try:
            self._nursery.start_soon(self._udp_forward, data, addr, max_size)
        except RuntimeError:  # nursery closed: shutting down
            self._forward_done()

    async def _udp_forward(self, data: bytes, addr: tuple[str, int], max_size: int | None) -> None:
        try:
            reply = await self._forward(data, tcp=False, max_size=max_size)
        except Exception as exc:  # a bug: this query gets SERVFAIL, the server goes on
            reply = self._internal_error(data, exc, addr[0])
        finally:
            self._forward_done()
        if reply is not None and self._udp is not None and not self._stopping:
            try:
                self._udp.sendto(reply, addr)
            except OSError as exc:
                ratelog.reject(log, "dns", "udp_send_failed", "UDP send to %s failed: %s", addr, exc,
                               level=logging.DEBUG)

    async def _forward(self, data: bytes, tcp: bool, max_size: int | None) -> bytes | None:
        with self._lock:
            self.stats.forwarded += 1
        response = await self.forwarder.query(data, tcp=tcp) if self.forwarder is not None else None
        if response is None:
            with self._lock:
                self.stats.servfail += 1
            return self.engine.error_response(data)
        return self.engine.relay(data, response, max_size)

    # ------------------------------------------------------------ TCP

    async def _serve_tcp(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._tcp_connection, listeners)

    async def _tcp_connection(self, stream: trio.SocketStream) -> None:
        try:
            source = str(stream.socket.getpeername()[0])
        except OSError:  # already gone
            await stream.aclose()
            return
        conn = _TcpConn(source)
        if not self._admit(conn):
            self.stats.tcp_refused += 1
            ratelog.reject(log, "dns", "tcp_busy", "refusing a DNS TCP connection from %s: %d busy",
                           source, len(self._tcp_conns))
            await trio.aclose_forcefully(stream)
            return
        try:
            with conn.scope:
                await self._tcp_serve(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # a bug: it ends this connection, never the listener
            ratelog.reject(log, "dns", "internal_error", "error on a DNS TCP connection from %s: %s: %s",
                           conn.source, type(exc).__name__, exc, level=logging.ERROR)
        finally:
            self._release(conn)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _tcp_serve(self, stream: trio.SocketStream, conn: _TcpConn) -> None:
        buf = bytearray()
        while True:
            data = await self._read_message(stream, buf)
            if data is None:
                return
            conn.busy = True
            reply = await self._tcp_reply(data, conn.source)
            if reply is not None:
                with trio.move_on_after(self.tcp_idle_timeout) as sending:
                    await stream.send_all(struct.pack("!H", len(reply)) + reply)
                if sending.cancelled_caught:
                    self.stats.tcp_timeouts += 1
                    return  # it does not read its replies
            conn.busy = False

    def _admit(self, conn: _TcpConn) -> bool:
        """Make room for `conn` under both bounds by closing older idle connections; False
        (refuse it) if the connections in its way are all busy."""
        if self._tcp_per_source.get(conn.source, 0) >= self.tcp_per_source:
            if not self._evict(conn.source):
                return False
        if len(self._tcp_conns) >= self.tcp_max_connections:
            if not self._evict(None):
                return False
        self._tcp_conns[conn] = None
        self._tcp_per_source[conn.source] = self._tcp_per_source.get(conn.source, 0) + 1
        return True

    def _evict(self, source: str | None) -> bool:
        """Close the oldest idle connection (from `source`, if given); False if none."""
        old = next(
            (c for c in self._tcp_conns if not c.busy and (source is None or c.source == source)), None
        )
        if old is None:
            return False
        old.scope.cancel()
        self._release(old)  # its slot is free at once; its task closes the socket
        self.stats.tcp_evicted += 1
        ratelog.reject(log, "dns", "tcp_evicted", "closing an idle DNS TCP connection from %s to make room",
                       old.source, level=logging.INFO)
        return True

    def _release(self, conn: _TcpConn) -> None:
        if conn not in self._tcp_conns:
            return
        del self._tcp_conns[conn]
        left = self._tcp_per_source[conn.source] - 1
        if left:
            self._tcp_per_source[conn.source] = left
        else:
            del self._tcp_per_source[conn.source]

    async def _read_message(self, stream: trio.SocketStream, buf: bytearray) -> bytes | None:
        """The next length-prefixed message, or None on EOF or when the whole message did
        not arrive within the idle bound (a slow sender counts as idle)."""
        with trio.move_on_after(self.tcp_idle_timeout):
            while True:
                if len(buf) >= 2:
                    size = (buf[0] << 8) | buf[1]
                    if len(buf) >= 2 + size:
                        data = bytes(buf[2 : 2 + size])
                        del buf[: 2 + size]
                        return data
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                buf += chunk
        self.stats.tcp_timeouts += 1
        return None

    async def _tcp_reply(self, data: bytes, source: str) -> bytes | None:
        self.stats.tcp_queries += 1
        try:
            reply = self.engine.answer(data, True, source)
        except Exception as exc:
            return self._internal_error(data, exc, source)
        if isinstance(reply, Forward):
            try:
                return await self._forward(data, tcp=True, max_size=None)
            except Exception as exc:
                return self._internal_error(data, exc, source)
        return reply


def make_server(
    nameserver: Nameserver,
    listen: str = "0.0.0.0:53",
    *,
    domain: str = DEFAULT_DOMAIN,
    ttl: int = DEFAULT_TTL,
    resolv_conf: str | None = "/etc/resolv.conf",
    effective_address: str | None = None,
    fallback_timeout: float = DEFAULT_TIMEOUT,
) -> DNSServer:
    """weaveDNS as weaver's --dns-* flags describe it (resolv_conf None: no forwarding).

    `effective_address` (the address containers are told to use, e.g. the docker0 IP)
    is filtered out of the upstream list, as is the listen host.
    """
    host, _, port = listen.rpartition(":")
    host = host or "0.0.0.0"
    forwarder = None
    if resolv_conf is not None:
        exclude = [a for a in (host, effective_address) if a and a != "0.0.0.0"]
        forwarder = Forwarder(UpstreamConfig(resolv_conf, exclude=exclude).servers, timeout=fallback_timeout)
    return DNSServer(AnswerEngine(nameserver, domain=domain, ttl=ttl), forwarder, host, int(port))
