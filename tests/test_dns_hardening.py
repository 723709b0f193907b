"""weaveDNS against hostile queries (issue 12, defect 4): every input gets the reply the
RFCs give it, or none, never an exception; each rejection is counted and logged at most
once per interval; TCP clients holding connections cannot lock out honest ones."""

from __future__ import annotations

import logging
import random
import socket
import struct

import pytest
import trio
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from router import ratelog
from weavedns.answer import AnswerEngine, Forward
from weavedns.records import Nameserver
from weavedns.server import DNSServer
from weavedns.upstream import Forwarder
from weavedns.wire import Entry, GossipMessage, decode_gossip, encode_gossip, parse_addr

US = 0x029900000001
NOW = 1_795_241_052
LOOPBACK = "127.0.0.1"


def make_zone() -> Nameserver:
    ns = Nameserver(US, lambda p: True, clock=lambda: NOW)
    ns.add_entry("alpha.weave.local.", "ca", parse_addr("10.40.0.1"))
    for i in range(60):
        ns.add_entry("many.weave.local.", f"cm{i}", parse_addr(f"10.50.0.{i + 1}"))
    return ns


ZONE = make_zone()


@pytest.fixture(autouse=True)
def fresh_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with its own rate-limit state (other tests' lines hold back ours)."""
    monkeypatch.setattr(ratelog, "REJECTS", ratelog.RateLimitedLog())


@pytest.fixture
def engine() -> AnswerEngine:
    return AnswerEngine(ZONE, rng=random.Random(7))


def header(qid: int = 0x4242, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


QUESTION = b"\x05alpha\x05weave\x05local\x00\x00\x01\x00\x01"
# The attack packet: one label of length 0x40 (label type bits 01, reserved), 82 bytes.
LABEL_0X40 = header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"


def opt(version: int = 0, udp: int = 1232, owner: bytes = b"\x00", rdata: bytes = b"") -> bytes:
    return owner + struct.pack("!HHIH", 41, udp, version << 16, len(rdata)) + rdata


def query(name: str, qtype: str = "A", qid: int = 0x1234, edns: int | None = None) -> bytes:
    q = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


def formerr(reply: object, qid: int = 0x4242) -> bool:
    """A header-only FORMERR echoing `qid` (RFC 1035: QR=1, RCODE=1)."""
    if not isinstance(reply, bytes) or len(reply) != 12:
        return False
    r = DNSRecord.parse(reply)
    return (r.header.id, r.header.qr, r.header.rcode) == (qid, 1, RCODE.FORMERR)


def rejected(reason: str) -> int:
    return ratelog.REJECTS.counts[("dns", reason)]


# ----------------------------------------------------------------- the answer core


def test_reserved_label_type_gets_formerr_with_the_same_id(engine: AnswerEngine) -> None:
    assert len(LABEL_0X40) == 82
    assert formerr(engine.answer(LABEL_0X40))
    assert formerr(engine.answer(LABEL_0X40, tcp=True))
    # Label type 10 (0x80) too, and a 0x40 label after a good one.
    assert formerr(engine.answer(header() + b"\x80" + b"a" * 10 + b"\x00\x00\x01\x00\x01"))
    assert formerr(engine.answer(header() + b"\x05alpha\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"))


def test_malformed_names_and_records_get_formerr(engine: AnswerEngine) -> None:
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 bytes
    cases = [
        header() + long_name + b"\x00\x01\x00\x01",
        header() + b"\xc0\x0c\x00\x01\x00\x01",  # a pointer in the question
        header() + QUESTION + b"junk",  # bytes after the last record
        header(ar=1) + QUESTION + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x05",  # rdata cut short
        header(ar=1) + QUESTION + b"\xc0\x40" + b"\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00",  # forward pointer
        header(ar=1) + QUESTION + opt(owner=b"\x01a\x00"),  # OPT owner not the root
        header(ar=1) + QUESTION + opt(rdata=b"\x00\x0a\x00\x08abc"),  # option runs past its record
        header(an=1) + QUESTION + opt(),  # OPT in the answer section
    ]
    for raw in cases:
        assert formerr(engine.answer(raw)), raw


def test_edns_version_1_gets_badvers_with_an_opt_record(engine: AnswerEngine) -> None:
    local = header(ar=1) + QUESTION + opt(version=1)
    forwarded = header(ar=1) + b"\x07example\x03com\x00\x00\x01\x00\x01" + opt(version=255)
    for raw in (local, forwarded):
        for tcp in (False, True):
            reply = engine.answer(raw, tcp=tcp)
            assert isinstance(reply, bytes)
            r = DNSRecord.parse(reply)
            assert (r.header.id, r.header.qr) == (0x4242, 1)
            [o] = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
            extended = ((o.ttl >> 24) << 4) | r.header.rcode
            assert extended == 16  # BADVERS (RFC 6891 §6.1.3)
            assert (o.ttl >> 16) & 0xFF == 0  # the version we implement
            assert r.rr == []


def test_two_opt_records_get_formerr(engine: AnswerEngine) -> None:
    assert formerr(engine.answer(header(ar=2) + QUESTION + opt() + opt()))
    # ...even when the second one is a version we would refuse: FORMERR comes first.
    assert formerr(engine.answer(header(ar=2) + QUESTION + opt() + opt(version=1)))
    # One OPT plus another record is fine.
    a_rr = b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x04\x0a\x00\x00\x01"
    reply = engine.answer(header(ar=2) + QUESTION + a_rr + opt())
    assert isinstance(reply, bytes) and DNSRecord.parse(reply).header.rcode == RCODE.NOERROR


def test_less_than_a_header_gets_no_reply_and_is_counted(engine: AnswerEngine) -> None:
    before = rejected("runt")
    for n in range(12):
        assert engine.answer(LABEL_0X40[:n]) is None
    assert rejected("runt") - before == 12


def test_malformed_queries_are_never_forwarded(engine: AnswerEngine) -> None:
    good = b"\x07example\x03com\x00\x00\x01\x00\x01"
    assert engine.answer(header() + good) == Forward(512)
    for raw in (header() + good + b"\x00", header(ar=1) + good + opt() + opt(),
                header(ar=1) + good + b"\x00\x00\x29"):
        assert not isinstance(engine.answer(raw), Forward)


def test_udp_size_is_capped(engine: AnswerEngine) -> None:
    # A (spoofable) query asking for 65535-byte UDP answers gets at most our 4096.
    assert engine.answer(query("example.com", edns=65535)) == Forward(4096)


def _labels_readable(reply: bytes) -> bool:
    """Whether a message's question labels are UTF-8 (dnslib refuses others, the DNS allows them)."""
    pos = 12
    while pos < len(reply) and reply[pos]:
        label = reply[pos + 1 : pos + 1 + reply[pos]]
        try:
            label.decode()
        except UnicodeDecodeError:
            return False
        pos += 1 + reply[pos]
    return True


def _question_end(raw: bytes) -> int | None:
    pos = 12
    while pos < len(raw) and raw[pos]:
        if raw[pos] > 63:
            return None
        pos += 1 + raw[pos]
    return pos + 5 if pos + 5 <= len(raw) else None


LABEL = st.one_of(st.binary(min_size=1, max_size=70), st.integers(0, 255).map(lambda b: bytes((b,))))
NAME = st.lists(LABEL, max_size=5).map(lambda ls: b"".join(bytes((len(x) % 256,)) + x for x in ls) + b"\x00")
RECORD = st.one_of(
    st.builds(opt, st.integers(0, 3), st.integers(0, 0xFFFF), st.sampled_from([b"\x00", b"\x01a\x00", b"\xc0\x0c"]),
              st.binary(max_size=12)),
    st.binary(max_size=16),
)
SHAPED = st.builds(
    lambda h, name, tail, recs: h + name + tail + b"".join(recs),
    st.builds(header, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2), st.integers(0, 2),
              st.integers(0, 1), st.integers(0, 3)),
    NAME, st.binary(min_size=0, max_size=5), st.lists(RECORD, max_size=3),
)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=120), SHAPED), st.booleans())
def test_any_bytes_get_a_parseable_reply_or_none(data: bytes, tcp: bool) -> None:
    engine = AnswerEngine(ZONE, rng=random.Random(0))
    reply = engine.answer(data, tcp=tcp)
    if reply is None:
        return
    if isinstance(reply, Forward):
        # Only well-formed queries go upstream. dnslib is stricter than the DNS about the
        # other records' data (it refuses any empty one but OPT), so it reads the question.
        end = _question_end(data)
        assert end is not None and data[2] & 0x80 == 0
        if _labels_readable(data):
            DNSRecord.parse(data[:4] + b"\x00\x01" + b"\x00" * 6 + data[12:end])
        return
    assert isinstance(reply, bytes) and reply[:2] == data[:2] and reply[2] & 0x80
    if _labels_readable(reply):
        DNSRecord.parse(reply)
    assert len(reply) <= (65535 if tcp else 4096)


def test_2000_bad_packets_log_a_few_lines_and_count_2000(
    engine: AnswerEngine, caplog: pytest.LogCaptureFixture
) -> None:
    before = rejected("formerr")
    with caplog.at_level(logging.DEBUG):
        for _ in range(2000):
            assert formerr(engine.answer(LABEL_0X40, source="192.0.2.9"))
    assert rejected("formerr") - before == 2000
    lines = [r for r in caplog.records if r.name.startswith("weavedns")]
    assert len(lines) <= 3
    assert all(r.exc_info is None for r in lines)


# ----------------------------------------------------------------- the server


def zone_with_alpha() -> Nameserver:
    zone = Nameserver(US, lambda p: True)
    zone.add_entry("alpha.weave.local.", "c1", parse_addr("10.40.0.1"))
    return zone


async def udp_exchange(address: tuple[str, int], data: bytes, timeout: float = 2.0) -> bytes:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.connect(address)
        await s.send(data)
        with trio.fail_after(timeout):
            return await s.recv(65535)


async def test_server_answers_the_attack_packet_and_logs_little(caplog: pytest.LogCaptureFixture) -> None:
    server = DNSServer(AnswerEngine(zone_with_alpha()), None, LOOPBACK, 0)
    before = rejected("formerr")
    with caplog.at_level(logging.DEBUG, logger="weavedns"):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.run)
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                await s.connect(address)
                got = 0
                with trio.move_on_after(10):
                    for i in range(2000):
                        await s.send(LABEL_0X40)
                        if i % 50 == 49:
                            # Read what came back so far, keeping the socket buffer from overflowing.
                            while got < i + 1:
                                with trio.move_on_after(1) as cs:
                                    reply = await s.recv(512)
                                if cs.cancelled_caught:
                                    break
                                assert formerr(reply)
                                got += 1
            nursery.cancel_scope.cancel()
    assert got >= 1900  # UDP on loopback under load: allow a few to be lost
    assert rejected("formerr") - before >= got
    lines = [r for r in caplog.records if r.name.startswith("weavedns") and r.levelno >= logging.WARNING]
    assert len(lines) <= 3 and all(r.exc_info is None for r in lines)
    assert server.stats.errors == 0


class ExplodingEngine(AnswerEngine):
    def answer(self, query: bytes, tcp: bool = False, source: object = None) -> bytes | Forward | None:
        raise RuntimeError("engine bug")


async def test_an_internal_error_answers_servfail_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    server = DNSServer(ExplodingEngine(zone_with_alpha()), None, LOOPBACK, 0)
    with caplog.at_level(logging.DEBUG, logger="weavedns"):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.run)
            for qid in range(30):
                r = DNSRecord.parse(await udp_exchange(address, query("alpha.weave.local", qid=qid)))
                assert (r.header.id, r.header.rcode) == (qid, RCODE.SERVFAIL)
            nursery.cancel_scope.cancel()
    lines = [r for r in caplog.records if r.name.startswith("weavedns") and r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 2
    assert all(r.exc_info is None for r in lines) and "RuntimeError" in lines[0].getMessage()


async def tcp_query(address: tuple[str, int], data: bytes) -> DNSRecord:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(struct.pack("!H", len(data)) + data)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed without a reply"
            buf += chunk
        return DNSRecord.parse(buf[2:])


async def open_idle(address: tuple[str, int], n: int) -> list[socket.socket]:
    """`n` TCP connections to `address` that never send anything (blocking sockets, made
    in a thread so the server keeps accepting meanwhile)."""

    def make() -> list[socket.socket]:
        out = []
        for _ in range(n):
            s = socket.create_connection(address, timeout=5)
            out.append(s)
        return out

    return await trio.to_thread.run_sync(make)


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_300_idle_tcp_connections_do_not_lock_out_an_honest_client() -> None:
    server = DNSServer(AnswerEngine(zone_with_alpha()), None, LOOPBACK, 0)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.run)
        idle = await open_idle(address, 300)
        try:
            await trio.sleep(0.3)  # let the server accept them all
            for _ in range(3):
                with trio.fail_after(1):
                    r = await tcp_query(address, query("alpha.weave.local", qid=99))
                assert r.header.id == 99 and [str(rr.rdata) for rr in r.rr] == ["10.40.0.1"]
            assert server.stats.tcp_refused == 0
        finally:
            for s in idle:
                s.close()
        nursery.cancel_scope.cancel()


async def test_idle_tcp_connections_are_closed_after_the_idle_bound() -> None:
    server = DNSServer(AnswerEngine(zone_with_alpha()), None, LOOPBACK, 0)
    server.tcp_idle_timeout = 0.5  # the constructor takes it too; this is the bound in use
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.run)
        idle = await open_idle(address, 5)
        # A slow sender: half a length prefix, then nothing.
        idle[0].sendall(b"\x00")
        try:
            await trio.sleep(0.2)
            assert not any(closed_by_server(s) for s in idle)
            await trio.sleep(1.0)
            assert all(closed_by_server(s) for s in idle)
        finally:
            for s in idle:
                s.close()
        nursery.cancel_scope.cancel()


async def test_default_idle_bound_is_a_few_seconds() -> None:
    server = DNSServer(AnswerEngine(zone_with_alpha()), None, LOOPBACK, 0)
    assert 1.0 <= getattr(server, "tcp_idle_timeout", 10.0) <= 5.0


# ----------------------------------------------------------------- gossip from peers

PEER = 0x0AAA00000002


def gossip(*entries: Entry) -> bytes:
    return encode_gossip(GossipMessage(NOW, entries))


def test_gossip_claiming_our_entry_at_the_largest_version_cannot_break_our_gossip() -> None:
    # Once, this made us override it at version 2**63, which gob cannot encode: every
    # periodic gossip of our full state (and every new connection's) then raised.
    ns = Nameserver(US, lambda p: True, clock=lambda: NOW)
    ns.add_entry("alpha.weave.local.", "ca", parse_addr("10.40.0.1"))
    before = rejected("gossip_entry_range")
    for version in (2**63 - 1, 2**63 - 2, -5):
        ns.on_gossip(gossip(Entry("alpha.weave.local.", US, "ca", parse_addr("10.40.0.1"), version, 0)))
        ns.on_gossip(gossip(Entry("ghost.weave.local.", US, "cg", parse_addr("10.40.0.2"), version, 0)))
        ns.on_gossip(gossip(Entry("other.weave.local.", PEER, "co", parse_addr("10.40.0.3"), 0, version)))
    [payload] = ns.gossip().encode()
    decode_gossip(payload, NOW)
    assert ns.lookup("alpha.weave.local.") == (parse_addr("10.40.0.1"),)
    assert ns.delete(hostname="alpha.weave.local.") is not None
    ns.gossip().encode()
    assert rejected("gossip_entry_range") - before == 9


def test_gossip_entries_that_dns_cannot_serve_are_dropped_not_the_message() -> None:
    ns = Nameserver(US, lambda p: True, clock=lambda: NOW)
    good = Entry("good.weave.local.", PEER, "c1", parse_addr("10.40.0.9"), 1, 0)
    huge = Entry("h" * 100_000 + ".weave.local.", PEER, "c2", parse_addr("10.40.0.8"), 1, 0)
    long_id = Entry("x.weave.local.", PEER, "c" * 5000, parse_addr("10.40.0.7"), 1, 0)
    ns.on_gossip(gossip(good, huge, long_id))
    assert [e.hostname for e in ns.entries()] == ["good.weave.local."]


def test_one_peer_cannot_fill_our_memory_with_entries() -> None:
    from weavedns import records

    ns = Nameserver(US, lambda p: True, clock=lambda: NOW)
    limit = getattr(records, "MAX_ENTRIES_PER_ORIGIN", 32768)
    before = rejected("gossip_entry_limit")
    batch = 4096
    for start in range(0, limit + batch, batch):
        ns.on_gossip(gossip(*(Entry(f"n{i}.weave.local.", PEER, f"c{i}", i, 0, 0)
                              for i in range(start, start + batch))))
    assert len(ns) == limit
    assert rejected("gossip_entry_limit") - before == batch
    # Our own names and updates of entries already held still get in.
    ns.add_entry("mine.weave.local.", "cm", parse_addr("10.40.1.1"))
    ns.on_gossip(gossip(Entry("n0.weave.local.", PEER, "c0", 0, 1, NOW)))
    assert ns.lookup("mine.weave.local.") and not ns.lookup("n0.weave.local.")


def test_an_edns_query_gets_our_opt_record_back(engine: AnswerEngine) -> None:
    """RFC 6891 §7: a responder that got an OPT record includes one; DO is copied (RFC 3225)."""
    for name, edns in (("alpha.weave.local", 1232), ("many.weave.local", 1232), ("many.weave.local", 512)):
        r = DNSRecord.parse(engine.answer(query(name, edns=edns)))  # type: ignore[arg-type]
        [o] = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
        assert (o.rclass, o.ttl) == (4096, 0) and r.header.rcode == RCODE.NOERROR
    with_do = header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0)
    [o] = DNSRecord.parse(engine.answer(with_do)).ar  # type: ignore[arg-type]
    assert o.ttl == 0x8000
    assert DNSRecord.parse(engine.answer(query("alpha.weave.local"))).ar == []  # type: ignore[arg-type]


class BrokenForwarder(Forwarder):
    async def query(self, query: bytes, tcp: bool = False) -> bytes | None:
        raise UnicodeError("label too long")  # what getaddrinfo raised in defect 1


async def test_a_forwarding_bug_answers_servfail_and_the_server_stays_up() -> None:
    server = DNSServer(AnswerEngine(zone_with_alpha()), BrokenForwarder(lambda: []), LOOPBACK, 0)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.run)
        for _ in range(3):
            r = DNSRecord.parse(await udp_exchange(address, query("example.com", qid=5)))
            assert (r.header.id, r.header.rcode) == (5, RCODE.SERVFAIL)
            with trio.fail_after(2):
                r = await tcp_query(address, query("example.com", qid=6))
            assert (r.header.id, r.header.rcode) == (6, RCODE.SERVFAIL)
        r = DNSRecord.parse(await udp_exchange(address, query("alpha.weave.local", qid=7)))
        assert [str(rr.rdata) for rr in r.rr] == ["10.40.0.1"]
        nursery.cancel_scope.cancel()


def test_per_entry_gossip_logs_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    ns = Nameserver(US, lambda p: p == PEER, clock=lambda: NOW)
    with caplog.at_level(logging.DEBUG, logger="weavedns"):
        for i in range(500):
            ns.on_gossip(gossip(Entry(f"s{i}.weave.local.", 0x0BBB00000003, "c", i, 0, 0)))  # unknown peer
            ns.on_gossip(gossip(Entry(f"m{i}.weave.local.", US, "c", i, 0, 0)))  # claims to be ours
    assert len([r for r in caplog.records if r.name.startswith("weavedns")]) <= 4
    assert rejected("gossip_unknown_origin") == 500 and rejected("gossip_claims_ours") == 500
