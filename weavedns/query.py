"""The edge of weaveDNS: one strict reading of a query's bytes (sans-IO).

Every query the server receives is read here once, before anything looks at what it
asks: the header, the single question (uncompressed labels of 1-63 bytes, a name of at
most 255 bytes), every record of the other sections (so nothing malformed is ever
forwarded upstream) and the EDNS OPT record (RFC 6891). What fails gets the error reply
the RFCs give it, never an exception: a message shorter than a header is dropped,
responses are dropped, other opcodes get NOTIMP, anything malformed gets FORMERR
(RFC 1035 §4.1.1), more than one OPT record or an OPT outside the additional section or
with a non-root owner gets FORMERR (RFC 6891 §6.1.1), and an EDNS version we do not
implement gets BADVERS (RFC 6891 §6.1.3).

dnslib is not used here: it accepts the reserved label types 01 and 10 as lengths
(then fails to encode them again) and refuses labels that are not UTF-8, which the DNS
allows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "HEADER_SIZE", "MAX_NAME", "EDNS_VERSION", "RCODE_FORMERR", "RCODE_NOTIMP", "RCODE_BADVERS",
    "BadQuery", "Edns", "Query", "read_query", "read_records", "read_additional",
]

HEADER_SIZE = 12
MAX_NAME = 255
# The EDNS version we implement (RFC 6891): 0, the only one defined.
EDNS_VERSION = 0

TYPE_OPT = 41
RCODE_FORMERR = 1
RCODE_NOTIMP = 4
RCODE_BADVERS = 16  # extended: 4 bits in the header, 8 in the OPT record's TTL

# Weave's DNS library (miekg) refuses queries with more than this many records per section.
MAX_QUESTIONS = 1
MAX_ANSWERS = 1
MAX_AUTHORITY = 1
MAX_ADDITIONAL = 2
# Compression pointers followed for one owner name; a valid name needs far fewer.
_MAX_POINTERS = 32

_QR = 0x8000


class BadQuery(Exception):
    """A query that gets an error reply, or none. `reason` is a constant (a metric label),
    `detail` a short explanation for the log; `rcode` is None when nothing is sent."""

    def __init__(self, reason: str, rcode: int | None, detail: str, edns: Edns | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.rcode = rcode
        self.detail = detail
        self.edns = edns


@dataclass(frozen=True, slots=True)
class Edns:
    """The query's OPT record: the requester's UDP payload size, its version and DO bit."""

    udp_size: int
    version: int
    do: bool


@dataclass(frozen=True, slots=True)
class Query:
    """A query that passed every check.

    `question` is the question in wire form (an uncompressed name, type, class), `labels`
    its name's labels as sent. Nothing follows the last record (that is refused)."""

    qid: int
    flags: int
    question: bytes
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    edns: Edns | None


def _formerr(detail: str) -> BadQuery:
    return BadQuery("formerr", RCODE_FORMERR, detail)


def read_query(raw: bytes) -> Query:
    """Read and check a whole query; raises BadQuery saying what to answer."""
    n = len(raw)
    if n < HEADER_SIZE:
        raise BadQuery("runt", None, "shorter than a DNS header")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", raw)
    if flags & _QR:
        raise BadQuery("response", None, "a response, not a query")
    if (flags >> 11) & 0xF != 0:
        raise BadQuery("notimp", RCODE_NOTIMP, "opcode is not QUERY")
    if qd != MAX_QUESTIONS or an > MAX_ANSWERS or ns > MAX_AUTHORITY or ar > MAX_ADDITIONAL:
        raise _formerr("unsupported record counts")
    labels, pos = _read_question_name(raw, HEADER_SIZE)
    if pos + 4 > n:
        raise _formerr("question cut short")
    qtype, qclass = struct.unpack_from("!HH", raw, pos)
    pos += 4
    question = raw[HEADER_SIZE:pos]  # canonical already: no pointers are accepted in it
    pos, _ = read_records(raw, pos, an + ns, opt_allowed=False)
    edns = read_additional(raw, pos, ar)
    return Query(qid, flags, question, labels, qtype, qclass, edns)


def read_additional(raw: bytes, pos: int, count: int) -> Edns | None:
    """Check the additional section (the last one) from `pos` to the end of the message and
    return its OPT record: FORMERR if malformed or followed by more bytes, then BADVERS
    for an EDNS version other than ours. Raises BadQuery."""
    end, edns = read_records(raw, pos, count, opt_allowed=True)
    if end != len(raw):
        raise _formerr("bytes after the last record")
    if edns is not None and edns.version != EDNS_VERSION:
        raise BadQuery("badvers", RCODE_BADVERS, "EDNS version not implemented", edns)
    return edns


def _read_question_name(raw: bytes, pos: int) -> tuple[tuple[bytes, ...], int]:
    """The question name's labels and the offset after it. A pointer there could only
    point back into the header or into the name itself, so none is accepted."""
    n = len(raw)
    labels: list[bytes] = []
    start = pos
    while True:
        if pos >= n:
            raise _formerr("question name runs past the end")
        length = raw[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            raise _formerr("question name has a pointer or a reserved label type")
        if pos + 1 + length > n:
            raise _formerr("question label runs past the end")
        labels.append(raw[pos + 1 : pos + 1 + length])
        pos += 1 + length
        if pos - start + 1 > MAX_NAME:
            raise _formerr("question name longer than 255 bytes")
    return tuple(labels), pos


def _skip_name(raw: bytes, pos: int) -> tuple[int, bool]:
    """Check an owner name (pointers allowed, backwards only); returns the offset after it
    in the record and whether the name is the root."""
    n = len(raw)
    after = -1
    total = 0
    hops = 0
    root = True
    while True:
        if pos >= n:
            raise _formerr("record name runs past the end")
        length = raw[pos]
        if length == 0:
            return (pos + 1 if after < 0 else after), root
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 2 > n:
                raise _formerr("record name pointer cut short")
            target = ((length & 0x3F) << 8) | raw[pos + 1]
            hops += 1
            if target >= pos or hops > _MAX_POINTERS:
                raise _formerr("record name pointer does not point back")
            if after < 0:
                after = pos + 2
            pos = target
            continue
        if kind:
            raise _formerr("record name has a reserved label type")
        total += length + 1
        if total + 1 > MAX_NAME:
            raise _formerr("record name longer than 255 bytes")
        if pos + 1 + length > n:
            raise _formerr("record label runs past the end")
        root = False
        pos += 1 + length


def read_records(raw: bytes, pos: int, count: int, opt_allowed: bool) -> tuple[int, Edns | None]:
    """Check `count` resource records from `pos`; returns the offset after them and the OPT
    record's contents (only where `opt_allowed`, the additional section). Raises BadQuery."""
    n = len(raw)
    edns: Edns | None = None
    opts = 0
    for _ in range(count):
        pos, root = _skip_name(raw, pos)
        if pos + 10 > n:
            raise _formerr("record header cut short")
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", raw, pos)
        pos += 10
        if pos + rdlen > n:
            raise _formerr("record data runs past the end")
        if rtype == TYPE_OPT:
            if not opt_allowed:
                raise _formerr("OPT record outside the additional section")
            opts += 1
            if opts > 1:
                raise _formerr("more than one OPT record")
            if not root:
                raise _formerr("OPT record owner is not the root")
            _check_options(raw, pos, pos + rdlen)
            edns = Edns(rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000))
        pos += rdlen
    return pos, edns


def _check_options(raw: bytes, pos: int, end: int) -> None:
    while pos < end:
        if pos + 4 > end:
            raise _formerr("EDNS option header cut short")
        size = (raw[pos + 2] << 8) | raw[pos + 3]
        pos += 4 + size
        if pos > end:
            raise _formerr("EDNS option runs past its record")
