"""weaveDNS query -> response logic (sans-IO; dnslib is used as a codec only).

Rules, as Weave's nameserver applies them (weave-net.md §6):

- Names in the domain (default ``weave.local.``) and single-label names (the domain is
  appended) are answered locally: A records for live entries, shuffled per response;
  another type for a known name gives NOERROR with no answers (RFC 4074); an unknown
  name gives NXDOMAIN.
- ``<a.b.c.d>.in-addr.arpa.`` PTR queries for an address we hold are answered with the
  entry's hostname; unknown addresses are forwarded; other types there give NXDOMAIN.
- Everything else is forwarded upstream (``Forward``); all upstreams failing gives
  SERVFAIL (`error_response`).
- Local answers carry AA and RA; error replies RA only. TTL defaults to 1 s.
- UDP replies with more than one answer are cut to the largest prefix of the shuffled
  answers that fits 512 bytes (or the client's EDNS0 size, at most 4096) and get TC;
  TCP is unlimited.
- Every query is checked once, strictly, by `weavedns.query` before anything else looks
  at it (the screen of Weave's DNS library, plus RFC 1035 label rules and RFC 6891):
  responses and runts are dropped, opcodes other than QUERY get NOTIMP, anything
  malformed (counts beyond one question / one answer / one authority / two additional
  records, reserved label types, overlong names, records running past the end, bytes
  after the last record, more than one OPT) gets a header-only FORMERR, and an EDNS
  version other than 0 gets BADVERS. Each is counted and logged rate-limited
  (router.ratelog, component "dns"). Nothing malformed is forwarded.
- A query with an OPT record gets ours back (RFC 6891 §7; Weave sends none): our UDP
  size 4096, version 0, DO copied.

Fast path: a query that is a plain single question is looked up by its raw question
bytes in a cache of pre-built reply tails (counts + question + answers, one per answer
order for up to four answers), so a hit costs a dict lookup and a concatenation with
the query's ID and flags. The cache is emptied whenever the zone's `version` changes.
Only questions that the fast parse checked enter the cache; anything else is read by
`weavedns.query.read_query` and then answered from the same cache. `answer_record` is
the dnslib reference the tests hold the fast path to.
"""

from __future__ import annotations

import itertools
import logging
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dnslib import EDNS0, PTR, RR, A, DNSHeader, DNSLabel, DNSRecord

from router import ratelog
from weavedns.query import (
    EDNS_VERSION,
    MAX_ADDITIONAL,
    RCODE_BADVERS,
    TYPE_OPT,
    BadQuery,
    Edns,
    read_additional,
    read_query,
)
from weavedns.wire import format_addr

log = logging.getLogger(__name__)

__all__ = [
    "Zone", "Forward", "AnswerEngine", "DEFAULT_DOMAIN", "DEFAULT_TTL", "MIN_UDP_SIZE", "fqdn", "in_domain",
]

DEFAULT_DOMAIN = "weave.local."
DEFAULT_TTL = 1
MIN_UDP_SIZE = 512
# Our own EDNS UDP payload size: what we advertise, and the most a UDP reply holds.
MAX_UDP_SIZE = 4096
MAX_TCP_SIZE = 65535

TYPE_A = 1
TYPE_PTR = 12
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
_RCODE_NAMES = {1: "FORMERR", 2: "SERVFAIL", 4: "NOTIMP", 16: "BADVERS"}

_QR = 0x8000
_AA = 0x0400
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_CD = 0x0010
_ECHOED = _RD | _CD  # bits a reply copies from the query (miekg SetReply)

# Pre-built orders are kept for up to this many answers (4! = 24 tails).
_MAX_PREBUILT_ANSWERS = 4
_REVERSE_SUFFIX = (b"in-addr", b"arpa")
_MAX_NAME = 255


class Zone(Protocol):
    """What the answer logic needs from the records (weavedns.records.Nameserver)."""

    @property
    def version(self) -> int: ...

    def addresses(self, name: bytes) -> Sequence[int]:
        """Live IPv4 addresses for a lowercase fully-qualified name like b"a.weave.local."."""
        ...

    def hostname_for(self, addr: int) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Forward:
    """Decision: ask the upstream servers. `max_size` is the client's UDP limit (None: TCP)."""

    max_size: int | None


def fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def in_domain(hostname: str, domain: str = DEFAULT_DOMAIN) -> bool:
    """True if `hostname` is `domain` or below it (case-insensitive); Weave ignores others."""
    name, dom = fqdn(hostname).lower(), fqdn(domain).lower()
    return name == dom or name.endswith("." + dom) or dom == "."


# ------------------------------------------------------------------ decisions


@dataclass(frozen=True, slots=True)
class _Plan:
    rcode: int
    authoritative: bool
    addrs: tuple[int, ...] = ()
    ptr: tuple[bytes, ...] | None = None  # PTR target labels
    forward: bool = False


_FORWARD = _Plan(RCODE_NOERROR, False, forward=True)
_NXDOMAIN = _Plan(RCODE_NXDOMAIN, False)
_EMPTY = _Plan(RCODE_NOERROR, True)


def _name_text(labels: Sequence[bytes]) -> bytes:
    # Escape dots and backslashes inside labels (as DNS presentation format does) so a
    # label holding "." can never be taken for a label boundary.
    return b"".join(lab.replace(b"\\", b"\\\\").replace(b".", b"\\.") + b"." for lab in labels)


def _hostname_labels(hostname: str) -> tuple[bytes, ...] | None:
    """A stored hostname as wire labels, or None if it cannot be encoded."""
    raw = hostname.encode("utf-8", "surrogateescape")
    if raw.endswith(b"."):
        raw = raw[:-1]
    if not raw:
        return None
    labels = tuple(raw.split(b"."))
    if any(not 0 < len(lab) < 64 for lab in labels) or sum(len(lab) + 1 for lab in labels) + 1 > _MAX_NAME:
        return None
    return labels


def _parse_reverse(labels: Sequence[bytes]) -> int | None:
    """The address of d.c.b.a.in-addr.arpa. as an int, or None if not exactly four octets."""
    if len(labels) != 6:
        return None
    addr = 0
    for lab in reversed(labels[:4]):
        if not lab.isdigit() or len(lab) > 3 or (len(lab) > 1 and lab[0] == 0x30):
            return None
        octet = int(lab)
        if octet > 255:
            return None
        addr = (addr << 8) | octet
    return addr


def _encode_labels(labels: Sequence[bytes]) -> bytes:
    return b"".join(bytes((len(lab),)) + lab for lab in labels) + b"\x00"


# ------------------------------------------------------------------ fast-path cache entries


class _Compiled:
    """A pre-built reply for one exact question (bytes from offset 12 of the query)."""

    __slots__ = ("forward", "flags", "tails", "rrs", "question", "full_len")

    def __init__(
        self, forward: bool, base_flags: int, question: bytes, rrs: tuple[bytes, ...], rcode: int
    ) -> None:
        self.forward = forward
        self.question = question
        self.rrs = rrs
        # The two reply flag bytes for each combination of the query's RD and CD bits.
        base = base_flags | rcode
        self.flags = {echo: struct.pack("!H", base | echo) for echo in (0, _RD, _CD, _RD | _CD)}
        self.full_len = 12 + len(question) + sum(len(rr) for rr in rrs)
        if len(rrs) <= _MAX_PREBUILT_ANSWERS:
            head = struct.pack("!HHHH", 1, len(rrs), 0, 0) + question
            orders = itertools.permutations(rrs) if len(rrs) > 1 else (rrs,)
            self.tails: tuple[bytes, ...] = tuple(head + b"".join(order) for order in orders)
        else:
            self.tails = ()


# ------------------------------------------------------------------ the engine


class AnswerEngine:
    """Turns a DNS query (bytes) into a reply (bytes), a Forward decision, or None (drop)."""

    def __init__(
        self,
        zone: Zone,
        domain: str = DEFAULT_DOMAIN,
        ttl: int = DEFAULT_TTL,
        rng: random.Random | None = None,
        cache_size: int = 4096,
    ) -> None:
        self.zone = zone
        self.domain = fqdn(domain)
        self._domain_labels = tuple(
            lab.encode("ascii").lower() for lab in self.domain.rstrip(".").split(".") if lab
        )
        if not 0 <= ttl < 2**31:
            raise ValueError(f"TTL {ttl} out of range")
        self.ttl = ttl
        self._ttl_bytes = struct.pack("!I", ttl)
        self._rng = rng if rng is not None else random.Random()
        self._cache: dict[bytes, _Compiled] = {}
        self._cache_size = cache_size
        self._cache_version: int | None = None

    # ---------------------------------------------------------------- decisions

    def _decide(self, labels: tuple[bytes, ...], qtype: int) -> _Plan:
        """What to do for a question; `labels` are lowercased."""
        if not labels:
            return _FORWARD  # the root: nothing of ours (Weave would make it ".weave.local.")
        dom = self._domain_labels
        if len(labels) == 1:
            labels = labels + dom
        if labels[len(labels) - len(dom):] == dom:
            addrs = self.zone.addresses(_name_text(labels))
            if not addrs:
                return _NXDOMAIN
            if qtype != TYPE_A:
                return _EMPTY
            return _Plan(RCODE_NOERROR, True, addrs=tuple(addrs))
        if labels[-2:] == _REVERSE_SUFFIX:
            if qtype != TYPE_PTR:
                return _NXDOMAIN
            addr = _parse_reverse(labels)
            if addr is None:
                return _NXDOMAIN
            hostname = self.zone.hostname_for(addr)
            target = None if hostname is None else _hostname_labels(hostname)
            if target is None:
                return _FORWARD
            return _Plan(RCODE_NOERROR, True, ptr=target)
        return _FORWARD

    def _a_rr(self, addr: int) -> bytes:
        # Owner name: a pointer to the question name at offset 12.
        return b"\xc0\x0c\x00\x01\x00\x01" + self._ttl_bytes + b"\x00\x04" + addr.to_bytes(4, "big")

    def _ptr_rr(self, target: tuple[bytes, ...]) -> bytes:
        rdata = _encode_labels(target)
        return b"\xc0\x0c\x00\x0c\x00\x01" + self._ttl_bytes + struct.pack("!H", len(rdata)) + rdata

    # ---------------------------------------------------------------- public API

    def answer(self, query: bytes, tcp: bool = False, source: object = None) -> bytes | Forward | None:
        """The reply to send, Forward (ask upstream), or None (send nothing).

        Never raises on any input: every query is checked by weavedns.query first, and what
        fails gets its error reply (counted and logged rate-limited, naming `source`)."""
        if type(query) is not bytes:
            query = bytes(query)
        # A new dict per zone version (not clear()): a thread still filling the old one
        # after a change can then never put stale data into the current one.
        version = self.zone.version
        if version != self._cache_version:
            self._cache = {}
            self._cache_version = version
        cache = self._cache
        n = len(query)
        # Fast path: QR=0, opcode QUERY, counts 1/0/0/<=2, a question the cache holds (only
        # questions `_compile` checked get there) and a well-formed additional section.
        if n >= 17 and not query[2] & 0xF8 and query[4:10] == b"\x00\x01\x00\x00\x00\x00" and not query[10]:
            ar = query[11]
            qend = query.find(0, 12) + 5
            if ar <= MAX_ADDITIONAL and 17 <= qend <= n:
                key = query[12:qend]
                hit = cache.get(key)
                if hit is None:
                    hit = self._compile(key, cache)
                if hit is not None:
                    edns = None
                    if ar or qend != n:
                        try:
                            edns = read_additional(query, qend, ar)
                        except BadQuery as bad:
                            return self._reject(query, bad, source)
                    return self._reply(query, hit, edns, tcp)
        try:
            checked = read_query(query)
        except BadQuery as bad:
            return self._reject(query, bad, source)
        hit = cache.get(checked.question)
        if hit is None:
            hit = self._compile(checked.question, cache)
            if hit is None:  # cannot happen for a checked question; refuse rather than guess
                return self._reject(query, BadQuery("formerr", RCODE_FORMERR, "unusable question"), source)
        return self._reply(query, hit, checked.edns, tcp)

    def _reply(self, query: bytes, hit: _Compiled, edns: Edns | None, tcp: bool) -> bytes | Forward:
        max_size = MAX_TCP_SIZE if tcp else _udp_limit(edns)
        if hit.forward:
            return Forward(None if tcp else max_size)
        flags = hit.flags[((query[2] << 8) | query[3]) & _ECHOED]
        # RFC 6891 §7: a query with an OPT record gets one back (ours), DO copied (RFC 3225).
        opt = b"" if edns is None else (_OPT_DO if edns.do else _OPT)
        if hit.full_len + len(opt) > max_size and len(hit.rrs) > 1:
            return self._truncated(query[:2], hit, flags, max_size, opt)
        tails = hit.tails
        if tails:
            tail = tails[0] if len(tails) == 1 else tails[int(self._rng.random() * len(tails))]
            if opt:
                return query[:2] + flags + tail[:6] + b"\x00\x01" + tail[8:] + opt
            return query[:2] + flags + tail
        rrs = list(hit.rrs)
        self._rng.shuffle(rrs)
        counts = struct.pack("!HHHH", 1, len(rrs), 0, 1 if opt else 0)
        return query[:2] + flags + counts + hit.question + b"".join(rrs) + opt

    def _reject(self, query: bytes, bad: BadQuery, source: object) -> bytes | None:
        """Count and log (rate-limited) a refused query; its error reply, or None."""
        level = logging.INFO if bad.rcode is None else logging.WARNING
        what = "dropped" if bad.rcode is None else _RCODE_NAMES.get(bad.rcode, "dropped")
        ratelog.reject(log, "dns", bad.reason, "DNS query from %s: %s (%s)", source or "?", what, bad.detail,
                       level=level)
        if bad.rcode is None:
            return None
        if bad.rcode == RCODE_BADVERS:
            return self._badvers(query)
        return self._error(query, bad.rcode, with_question=False)

    def _badvers(self, query: bytes) -> bytes:
        """RFC 6891 §6.1.3: BADVERS (16: 0 in the header, 1 in the OPT's extended RCODE),
        with an OPT record carrying the version we do implement."""
        qid, flags = struct.unpack_from("!HH", query)
        reply_flags = _QR | (flags & _ECHOED) | _RA | (RCODE_BADVERS & 0xF)
        question = _raw_question(query) or b""
        ttl = ((RCODE_BADVERS >> 4) << 24) | (EDNS_VERSION << 16)
        opt = b"\x00" + struct.pack("!HHIH", TYPE_OPT, MAX_UDP_SIZE, ttl, 0)
        return struct.pack("!6H", qid, reply_flags, 1 if question else 0, 0, 0, 1) + question + opt

    def _compile(self, question: bytes, cache: dict[bytes, _Compiled]) -> _Compiled | None:
        """Build the cache entry for raw question bytes, or None if the fast parse does not apply."""
        labels: list[bytes] = []
        pos = 0
        end = len(question) - 5  # the terminating zero byte
        while pos < end:
            length = question[pos]
            if length > 63:
                return None  # compression pointer or extended label: use the general path
            labels.append(question[pos + 1 : pos + 1 + length].lower())
            pos += 1 + length
        if pos != end or end + 1 > _MAX_NAME:
            return None  # a zero byte inside a label: the first zero was not the terminator
        qtype = (question[-4] << 8) | question[-3]
        compiled = self._compile_plan(self._decide(tuple(labels), qtype), question)
        if len(cache) >= self._cache_size:
            cache.clear()
        cache[question] = compiled
        return compiled

    def _compile_plan(self, plan: _Plan, question: bytes) -> _Compiled:
        if plan.forward:
            return _Compiled(True, 0, question, (), 0)
        if plan.ptr is not None:
            rrs: tuple[bytes, ...] = (self._ptr_rr(plan.ptr),)
        else:
            rrs = tuple(self._a_rr(a) for a in plan.addrs)
        base = _QR | _RA | (_AA if plan.authoritative else 0)
        return _Compiled(False, base, question, rrs, plan.rcode)

    def _truncated(self, qid: bytes, hit: _Compiled, flags: bytes, max_size: int, opt: bytes) -> bytes:
        rrs = list(hit.rrs)
        self._rng.shuffle(rrs)
        room = max_size - 12 - len(hit.question) - len(opt)
        keep = 0
        used = 0
        for rr in rrs:
            if used + len(rr) > room:
                break
            used += len(rr)
            keep += 1
        flag_value = struct.unpack("!H", flags)[0] | _TC
        counts = struct.pack("!HHHHH", flag_value, 1, keep, 0, 1 if opt else 0)
        return qid + counts + hit.question + b"".join(rrs[:keep]) + opt

    # ---------------------------------------------------------------- general path (dnslib)

    def answer_record(self, request: DNSRecord, tcp: bool = False) -> bytes | Forward:
        """Answer a parsed query with dnslib encoding (the reference the fast path matches)."""
        question = request.questions[0]
        labels = tuple(bytes(lab).lower() for lab in question.qname.label)
        max_size = MAX_TCP_SIZE if tcp else MIN_UDP_SIZE
        opts = [rr for rr in request.ar if rr.rtype == TYPE_OPT]
        for rr in opts:
            if not tcp and rr.rclass > MIN_UDP_SIZE:
                max_size = min(rr.rclass, MAX_UDP_SIZE)
        plan = self._decide(labels, question.qtype)
        if plan.forward:
            return Forward(None if tcp else max_size)
        reply = DNSRecord(
            DNSHeader(
                id=request.header.id, qr=1, opcode=0, aa=int(plan.authoritative), rd=request.header.rd,
                ra=1, rcode=plan.rcode,
            ),
            q=question,
        )
        reply.header.cd = request.header.cd
        answers: list[RR] = []
        if plan.ptr is not None:
            answers.append(RR(question.qname, TYPE_PTR, ttl=self.ttl, rdata=PTR(DNSLabel(plan.ptr))))
        else:
            order = list(plan.addrs)
            self._rng.shuffle(order)
            answers = [RR(question.qname, TYPE_A, ttl=self.ttl, rdata=A(format_addr(a))) for a in order]
        reply.rr = answers
        if opts:
            reply.add_ar(EDNS0(udp_len=MAX_UDP_SIZE, flags="do" if opts[0].ttl & 0x8000 else ""))
        packed = bytes(reply.pack())
        if len(answers) > 1 and len(packed) > max_size:
            # Largest prefix that fits, as Weave's binary search finds it.
            keep = len(answers) - 1
            while keep > 0:
                reply.rr = answers[:keep]
                if len(reply.pack()) <= max_size:
                    break
                keep -= 1
            reply.rr = answers[:keep]
            reply.header.tc = 1
            packed = bytes(reply.pack())
        return packed

    # ---------------------------------------------------------------- errors and relaying

    def error_response(self, query: bytes, rcode: int = RCODE_SERVFAIL) -> bytes | None:
        """An error reply (RA set, question echoed), e.g. SERVFAIL when every upstream failed."""
        return self._error(query, rcode, with_question=True)

    def _error(self, query: bytes, rcode: int, with_question: bool) -> bytes | None:
        if len(query) < 12:
            return None
        qid, flags = struct.unpack_from("!HH", query)
        opcode = flags & 0x7800 if rcode == RCODE_NOTIMP else 0
        if not with_question:
            # miekg's reject path: header only, RD/CD copied, no RA.
            return struct.pack("!6H", qid, _QR | opcode | (flags & _ECHOED) | rcode, 0, 0, 0, 0)
        question = _raw_question(query)
        reply_flags = _QR | (flags & _ECHOED) | _RA | rcode
        if question is None:
            return struct.pack("!6H", qid, reply_flags, 0, 0, 0, 0)
        return struct.pack("!6H", qid, reply_flags, 1, 0, 0, 0) + question

    def relay(self, query: bytes, response: bytes, max_size: int | None) -> bytes:
        """An upstream's reply, given back to the client: its ID restored, fitted to UDP limits.

        Weave passes upstream replies through (compressed if too big); one that still
        exceeds the client's limit is cut to header and question with TC set.
        """
        if len(response) < 12:
            return self._error(query, RCODE_SERVFAIL, with_question=True) or b""
        response = query[:2] + response[2:]
        if max_size is None or len(response) <= max_size:
            return response
        try:
            record = DNSRecord.parse(response)
            packed = bytes(record.pack())  # dnslib compresses names
            if len(packed) <= max_size:
                return packed
            cut = DNSRecord(DNSHeader(id=record.header.id, bitmap=record.header.bitmap, tc=1), q=record.q)
            return bytes(cut.pack())
        except Exception as exc:  # dnslib cannot read it: cut it ourselves, never send it whole
            ratelog.reject(log, "dns", "upstream_reply", "cannot re-encode an upstream reply: %s", exc,
                           level=logging.DEBUG)
        flags = ((response[2] << 8) | response[3]) | _TC
        question = _raw_question(response)
        count = 1 if question is not None and struct.unpack_from("!H", response, 4)[0] >= 1 else 0
        return query[:2] + struct.pack("!5H", flags, count, 0, 0, 0) + (question if count else b"")


def _raw_question(query: bytes) -> bytes | None:
    """The first question's bytes when it is uncompressed and intact, else None."""
    if len(query) < 17:
        return None
    pos = 12
    n = len(query)
    while pos < n:
        length = query[pos]
        if length == 0:
            end = pos + 5
            return query[12:end] if end <= n else None
        if length > 63:
            return None
        pos += 1 + length
    return None


# Our OPT record in replies: root owner, our UDP size, extended RCODE 0, version 0.
_OPT = b"\x00" + struct.pack("!HHIH", TYPE_OPT, MAX_UDP_SIZE, EDNS_VERSION << 16, 0)
_OPT_DO = b"\x00" + struct.pack("!HHIH", TYPE_OPT, MAX_UDP_SIZE, (EDNS_VERSION << 16) | 0x8000, 0)


def _udp_limit(edns: Edns | None) -> int:
    """The most a UDP reply may hold: the requester's EDNS size (RFC 6891 §6.2.3: at
    least 512), capped at ours so a spoofed query cannot ask for a huge datagram."""
    if edns is None or edns.udp_size <= MIN_UDP_SIZE:
        return MIN_UDP_SIZE
    return min(edns.udp_size, MAX_UDP_SIZE)
