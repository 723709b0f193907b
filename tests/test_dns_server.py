"""The weaveDNS server for real: UDP and TCP on 127.0.0.1, a fake upstream on 127.0.0.2."""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from weavedns.answer import AnswerEngine, Forward
from weavedns.records import Nameserver
from weavedns.server import DNSServer, make_server
from weavedns.upstream import Forwarder
from weavedns.wire import parse_addr

US = 0x029900000001
LOOPBACK = "127.0.0.1"
UPSTREAM_HOST = "127.0.0.2"
DEAD_HOST = "127.0.0.3"
BIG = [f"192.0.2.{i}" for i in range(1, 61)]


def query(name: str, qtype: str = "A", qid: int = 0x5151, edns: int | None = None) -> bytes:
    q = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


def addrs(reply: DNSRecord) -> list[str]:
    return sorted(str(rr.rdata) for rr in reply.rr)


# ----------------------------------------------------------------- fake upstream


@dataclass
class FakeUpstream:
    """Answers example.com, big.example.com (TC over UDP), never answers slow.example.com."""

    address: tuple[str, int] = ("", 0)
    seen_ids: list[int] = field(default_factory=list)
    tcp_queries: int = 0

    def reply(self, data: bytes, tcp: bool) -> bytes | None:
        request = DNSRecord.parse(data)
        self.seen_ids.append(request.header.id)
        name = str(request.q.qname).lower()
        reply = request.reply()
        if name == "slow.example.com.":
            return None
        if name == "example.com.":
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.80"), ttl=300))
        elif name == "big.example.com.":
            if tcp:
                for a in BIG:
                    reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(a), ttl=300))
            else:
                reply.header.tc = 1
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind((UPSTREAM_HOST, 0))
        port = udp.getsockname()[1]
        listeners = await trio.open_tcp_listeners(port, host=UPSTREAM_HOST)
        self.address = (UPSTREAM_HOST, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._tcp, listeners)
            task_status.started(self.address)
            with udp:
                while True:
                    data, addr = await udp.recvfrom(4096)
                    out = self.reply(data, tcp=False)
                    if out is not None:
                        await udp.sendto(out, addr)

    async def _tcp(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = await stream.receive_some(2)
            size = struct.unpack("!H", head)[0]
            data = b""
            while len(data) < size:
                data += await stream.receive_some(size - len(data))
            self.tcp_queries += 1
            out = self.reply(data, tcp=True)
            if out is not None:
                await stream.send_all(struct.pack("!H", len(out)) + out)


def dead_port() -> int:
    """A UDP port on DEAD_HOST with nothing listening (queries get ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((DEAD_HOST, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- fixtures


@dataclass
class Harness:
    server: DNSServer
    zone: Nameserver
    upstream: FakeUpstream
    address: tuple[str, int]

    async def udp(self, data: bytes, timeout: float = 3.0) -> DNSRecord:
        return DNSRecord.parse(await self.udp_raw(data, timeout))

    async def udp_raw(self, data: bytes, timeout: float = 3.0) -> bytes:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            await s.connect(self.address)
            await s.send(data)
            with trio.fail_after(timeout):
                return await s.recv(65535)

    async def tcp(self, *messages: bytes, expect: int | None = None) -> list[DNSRecord]:
        expect = len(messages) if expect is None else expect
        stream = await trio.open_tcp_stream(*self.address)
        replies: list[DNSRecord] = []
        async with stream:
            await stream.send_all(b"".join(struct.pack("!H", len(m)) + m for m in messages))
            buf = b""
            with trio.fail_after(3):
                while len(replies) < expect:
                    buf += await stream.receive_some(65536)
                    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                        size = struct.unpack("!H", buf[:2])[0]
                        replies.append(DNSRecord.parse(buf[2 : 2 + size]))
                        buf = buf[2 + size :]
        return replies


@asynccontextmanager
async def running(servers: list[tuple[str, int]] | None = None, timeout: float = 1.0,
                  forward: bool = True) -> AsyncIterator[Harness]:
    zone = Nameserver(US, lambda p: True)
    zone.add_entry("alpha.weave.local.", "c1", parse_addr("10.40.0.1"))
    zone.add_entry("alpha.weave.local.", "c3", parse_addr("10.40.128.1"))
    upstream = FakeUpstream()
    async with trio.open_nursery() as nursery:
        up_addr = await nursery.start(upstream.serve)
        upstreams = [up_addr] if servers is None else [up_addr if s == ("upstream", 0) else s for s in servers]
        forwarder = Forwarder(lambda: upstreams, timeout=timeout, rng=random.Random(11)) if forward else None
        server = DNSServer(AnswerEngine(zone, rng=random.Random(1)), forwarder, LOOPBACK, 0)
        address = await nursery.start(server.run)
        try:
            yield Harness(server, zone, upstream, address)
        finally:
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------- tests


async def test_local_names_over_udp_and_tcp() -> None:
    async with running() as h:
        r = await h.udp(query("alpha.weave.local", qid=77))
        assert r.header.id == 77 and r.header.aa == 1 and addrs(r) == ["10.40.0.1", "10.40.128.1"]
        [t] = await h.tcp(query("alpha", qid=78))
        assert t.header.id == 78 and addrs(t) == ["10.40.0.1", "10.40.128.1"]
        r = await h.udp(query("1.0.40.10.in-addr.arpa", "PTR"))
        assert [str(rr.rdata) for rr in r.rr] == ["alpha.weave.local."]
        h.zone.add_entry("late.weave.local.", "c9", parse_addr("10.40.9.9"))
        assert addrs(await h.udp(query("late.weave.local"))) == ["10.40.9.9"]


async def test_nxdomain_and_empty_noerror() -> None:
    async with running() as h:
        r = await h.udp(query("nosuch.weave.local"))
        assert r.header.rcode == RCODE.NXDOMAIN and r.rr == []
        [t] = await h.tcp(query("nosuch.weave.local"))
        assert t.header.rcode == RCODE.NXDOMAIN
        r = await h.udp(query("alpha.weave.local", "AAAA"))
        assert r.header.rcode == RCODE.NOERROR and r.rr == []
        assert h.upstream.seen_ids == []  # none of these were forwarded


async def test_forwarding_over_udp_and_tcp() -> None:
    async with running() as h:
        r = await h.udp(query("example.com", qid=4321))
        assert r.header.id == 4321 and addrs(r) == ["192.0.2.80"]
        [t] = await h.tcp(query("Example.COM", qid=4322))
        assert t.header.id == 4322 and addrs(t) == ["192.0.2.80"]
        r = await h.udp(query("other.example.net"))
        assert r.header.rcode == RCODE.NXDOMAIN  # the upstream's answer, passed on
        r = await h.udp(query("9.9.9.10.in-addr.arpa", "PTR"))  # address we don't hold
        assert r.header.rcode == RCODE.NXDOMAIN
        assert len(h.upstream.seen_ids) == 4
        assert not {4321, 4322} & set(h.upstream.seen_ids)  # upstream queries get fresh random IDs
        assert h.server.stats.forwarded == 4


async def test_truncated_upstream_reply_udp_passes_tc_tcp_retries() -> None:
    async with running() as h:
        r = await h.udp(query("big.example.com"))
        assert r.header.tc == 1 and r.rr == []
        [t] = await h.tcp(query("big.example.com"))
        assert t.header.tc == 0 and addrs(t) == sorted(BIG)
        assert h.upstream.tcp_queries == 1


async def test_servfail_when_upstream_dead() -> None:
    async with running(servers=[(DEAD_HOST, dead_port())]) as h:
        with trio.fail_after(2):
            r = await h.udp(query("example.com", qid=9))
        assert (r.header.id, r.header.rcode, r.header.ra) == (9, RCODE.SERVFAIL, 1)
        [t] = await h.tcp(query("example.com"))
        assert t.header.rcode == RCODE.SERVFAIL
        assert h.server.stats.servfail == 2


async def test_timeout_then_next_server() -> None:
    async with running(servers=[("upstream", 0)], timeout=0.3) as h:
        r = await h.udp(query("slow.example.com"))
        assert r.header.rcode == RCODE.SERVFAIL
    async with running(servers=[(DEAD_HOST, dead_port()), ("upstream", 0)]) as h:
        r = await h.udp(query("example.com"))
        assert addrs(r) == ["192.0.2.80"]


async def test_no_upstream_configured_is_servfail() -> None:
    async with running(forward=False) as h:
        r = await h.udp(query("example.com"))
        assert r.header.rcode == RCODE.SERVFAIL
        assert addrs(await h.udp(query("alpha"))) == ["10.40.0.1", "10.40.128.1"]


async def test_malformed_packets_do_not_stop_the_server() -> None:
    async with running() as h:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            await s.connect(h.address)
            for junk in [b"", b"\x00", b"\xff" * 11, query("alpha")[:2] + b"\x81\x80" + query("alpha")[4:],
                         bytes(range(256)), b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc"]:
                await s.send(junk)
        # The last junk gets FORMERR (Weave's DNS library answers a readable header).
        raw = await h.udp_raw(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc")
        assert raw == b"\x12\x34\x81\x01" + b"\x00" * 8
        r = await h.udp(query("alpha.weave.local"))
        assert addrs(r) == ["10.40.0.1", "10.40.128.1"]
        # TCP: a bad message, then a good one on the same connection.
        bad, good = await h.tcp(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07", query("alpha"))
        assert bad.header.rcode == RCODE.FORMERR and addrs(good) == ["10.40.0.1", "10.40.128.1"]
        assert h.server.stats.errors == 0


async def test_many_queries_in_flight() -> None:
    async with running() as h:
        got: set[int] = set()
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            await s.connect(h.address)

            async def receive() -> None:
                while len(got) < 300:
                    got.add(DNSRecord.parse(await s.recv(4096)).header.id)

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    for i in range(300):
                        await s.send(query("alpha.weave.local" if i % 3 else "example.com", qid=i))
                        if i % 50 == 49:
                            await trio.sleep(0.01)  # stay within the client's socket buffer
        assert got == set(range(300))
        assert h.server.stats.forwarded == 100


async def test_edns_client_gets_larger_udp_answers() -> None:
    async with running() as h:
        for i in range(60):
            h.zone.add_entry("wide.weave.local.", f"w{i}", parse_addr(f"10.60.0.{i + 1}"))
        small = await h.udp(query("wide.weave.local"))
        large = await h.udp(query("wide.weave.local", edns=4096))
        assert small.header.tc == 1 and 0 < len(small.rr) < 60
        assert large.header.tc == 0 and len(large.rr) == 60


async def test_stop_releases_the_port() -> None:
    async with running() as h:
        address = h.address
        assert addrs(await h.udp(query("alpha"))) == ["10.40.0.1", "10.40.128.1"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(address)  # the UDP port is free again, so the thread let go of it
    assert not [t for t in threading.enumerate() if t.name == f"weavedns-udp-{address[1]}"]


async def test_fixed_port_in_use_is_an_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        server = DNSServer(AnswerEngine(Nameserver(US, lambda p: True)), None, LOOPBACK, taken.getsockname()[1])
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError):
                await nursery.start(server.run)


class ExplodingEngine(AnswerEngine):
    def answer(self, query: bytes, tcp: bool = False, source: object = None) -> bytes | Forward | None:
        if b"\x04boom" in query:
            raise RuntimeError("engine bug")
        return super().answer(query, tcp, source)


async def test_an_engine_error_answers_servfail_and_serving_goes_on() -> None:
    zone = Nameserver(US, lambda p: True)
    zone.add_entry("alpha.weave.local.", "c1", parse_addr("10.40.0.1"))
    server = DNSServer(ExplodingEngine(zone), None, LOOPBACK, 0)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.run)
        h = Harness(server, zone, FakeUpstream(), address)
        r = await h.udp(query("boom.weave.local"))
        assert r.header.rcode == RCODE.SERVFAIL and str(r.q.qname) == "boom.weave.local."
        boom, reply = await h.tcp(query("boom"), query("alpha"))
        assert boom.header.rcode == RCODE.SERVFAIL and addrs(reply) == ["10.40.0.1"]
        assert addrs(await h.udp(query("alpha"))) == ["10.40.0.1"]
        assert server.stats.errors == 2
        nursery.cancel_scope.cancel()


async def test_make_server_from_weaver_style_settings(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nnameserver 127.0.0.4\nnameserver 172.17.0.1\n")
    zone = Nameserver(US, lambda p: True)
    zone.add_entry("web.cluster.test.", "c1", parse_addr("10.40.0.9"))
    server = make_server(zone, f"{LOOPBACK}:0", domain="cluster.test", ttl=7, resolv_conf=str(resolv),
                         effective_address="172.17.0.1", fallback_timeout=0.5)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.run)
        h = Harness(server, zone, FakeUpstream(), address)
        r = await h.udp(query("web"))
        assert addrs(r) == ["10.40.0.9"] and r.rr[0].ttl == 7
        report = server.report(zone)
        assert report["Domain"] == "cluster.test." and report["TTL"] == 7
        assert report["Upstream"] == ["127.0.0.4"]  # our own addresses filtered out
        assert report["Entries"] == [e.to_report() for e in zone.entries()]
        nursery.cancel_scope.cancel()
