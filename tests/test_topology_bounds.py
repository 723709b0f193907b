"""The topology fast path keeps the gob decoder's bounds (issue 12, defect 6).

Topology payloads in the usual layout bypass the generic gob decoder, so its bounds
on definitions and on objects per value must hold on that path too.
"""

from __future__ import annotations

import pytest

from router import topology
from router.errors import WireError
from router.gob import MAX_DEFINITION_BYTES, decode_int, decode_uint, encode_int, encode_uint
from router.topology import ConnectionSummary, PeerSummary, decode_topology, encode_topology
from tests.gobflood import definition_flood


def _message(type_id: int, body: bytes) -> bytes:
    body = encode_int(type_id) + body
    return encode_uint(len(body)) + body


def test_hostile_definitions_are_not_kept_in_the_layout_cache() -> None:
    # Megabytes of definitions in front of a peer summary and a list: the cache of
    # layouts (keyed by the definition bytes) must not keep them.
    junk = definition_flood(10_000, first=1000)
    assert len(junk) > MAX_DEFINITION_BYTES
    payload = junk + _message(64, b"\x00") + _message(65, b"\x00")
    with pytest.raises(WireError):
        decode_topology(payload)
    assert all(len(key[0]) + len(key[1]) <= MAX_DEFINITION_BYTES for key in topology._LAYOUTS)


def test_a_huge_connection_list_is_refused_before_it_is_built() -> None:
    me = PeerSummary(0x02AA00000001, "a", 1, 1)
    link = ConnectionSummary(0x02AA00000002, "1:2", True, True)
    payload = encode_topology([(me, [link])])
    # The connection list is the last message: type id, 00 marker, count 1, one entry.
    start = 0
    while True:
        length, body = decode_uint(payload, start)
        if body + length == len(payload):
            break
        start = body + length
    list_type, pos = decode_int(payload, body)
    assert payload[pos : pos + 2] == b"\x00\x01"
    entry = payload[pos + 2 :]
    # Each entry becomes a ConnectionSummary: one more than a peer may list.
    count = topology.MAX_PEERS + 1
    flood = payload[:start] + _message(list_type, b"\x00" + encode_uint(count) + entry * count)
    [(_, conns)] = topology.decode_topology_lazily(flood)
    with pytest.raises(topology.TopologyTooLarge, match="more than 4096 connections"):
        conns()
    # Within the budget the same list is fine.
    small = payload[:start] + _message(list_type, b"\x00" + encode_uint(1000) + entry * 1000)
    [(_, conns)] = topology.decode_topology_lazily(small)
    assert conns() == [link] * 1000
