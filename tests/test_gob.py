"""The gob codec against gob.md's golden bytes, Go's rules, hypothesis and mutation."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ipam_crdt.wire import IPAM_GOSSIP, PEER_NAMES, RING, RING_ENTRIES, RING_ENTRY
from router.gob import (
    BOOL,
    BYTES,
    COMPLEX,
    FLOAT,
    INT,
    MAX_DEFINITION_BYTES,
    MAX_ITEMS,
    MAX_TYPES,
    STRING,
    STRING_MAP,
    UINT,
    ArrayType,
    Decoder,
    Encoder,
    Field,
    GobError,
    GobLimitError,
    GobStruct,
    MapType,
    SliceType,
    StructType,
    decode_all,
    decode_int,
    decode_uint,
    encode,
    encode_int,
    encode_stream,
    encode_uint,
)
from router.topology import CONN_LIST, CONN_SUMMARY, PEER_SUMMARY
from tests.gobflood import FIRST_ID, definition_flood, slice_definition, wide_struct_definition
from tests.golden import FEATURES_WV2, IPAM_PAYLOAD_WV2, NAMESERVER_FRAME, hx
from weavedns.wire import DNS_GOSSIP

# ----------------------------------------------------------------- scalars (gob.md §2)

UINTS = [
    (0, "00"), (7, "07"), (127, "7f"), (128, "ff 80"), (155, "ff 9b"), (256, "fe 01 00"), (317, "fe 01 3d"),
    (3759, "fe 0e af"), (0x029800000002, "fa 02 98 00 00 00 02"), (2**64 - 1, "f8 ff ff ff ff ff ff ff ff"),
]
INTS = [
    (0, "00"), (3, "06"), (-1, "01"), (-2, "03"), (22, "2c"), (74, "ff 94"), (-74, "ff 93"), (-129, "fe 01 01"),
    (1795238366, "fc d6 02 53 bc"), (-(2**63), "f8 ff ff ff ff ff ff ff ff"),
]


@pytest.mark.parametrize(("value", "wire"), UINTS)
def test_uint_golden(value: int, wire: str) -> None:
    assert encode_uint(value) == hx(wire)
    assert decode_uint(hx(wire), 0) == (value, len(hx(wire)))


@pytest.mark.parametrize(("value", "wire"), INTS)
def test_int_golden(value: int, wire: str) -> None:
    assert encode_int(value) == hx(wire)
    assert decode_int(hx(wire), 0) == (value, len(hx(wire)))


@pytest.mark.parametrize(("value", "wire"), [(17.0, "fe 31 40"), (0.5, "fe e0 3f"), (1.5, "fe f8 3f"), (2.0, "40")])
def test_float_golden(value: float, wire: str) -> None:
    # A top-level float: type id 4 (08), singleton marker, value.
    data = encode(value, FLOAT)
    assert data[1:] == hx("08 00") + hx(wire)
    assert decode_all(data) == [value]


def test_complex_golden() -> None:
    assert encode(1 + 2j, COMPLEX)[3:] == hx("fe f0 3f 40")
    assert decode_all(encode(1 + 2j, COMPLEX)) == [1 + 2j]


@pytest.mark.parametrize("bad", ["", "80", "f7 01 02 03 04 05 06 07 08 09", "fe 01", "f8 ff ff"])
def test_bad_uint(bad: str) -> None:
    with pytest.raises(GobError):
        decode_uint(hx(bad), 0)


def test_uint_not_minimal_is_accepted_like_go() -> None:
    assert decode_uint(hx("ff 05"), 0) == (5, 2)


def test_encoding_out_of_range_values() -> None:
    for bad in (-1, 2**64):
        with pytest.raises(GobError):
            encode(bad, UINT)
    with pytest.raises(GobError):
        encode(2**63, INT)
    with pytest.raises(GobError):
        encode("not bytes", BYTES)


# ----------------------------------------------------------- golden messages (gob.md §9)

def test_feature_map_golden_decode_and_reencode() -> None:
    [features] = decode_all(FEATURES_WV2, STRING_MAP)
    assert features == {
        "Name": "02:98:00:00:00:02", "NickName": "wv-2", "ShortID": "3234", "UID": "8495489660513727374",
        "ConnID": "7103302427288436631", "Trusted": "false", "Overlays": "sleeve", "PeerNameFlavour": "mac",
    }
    # Decoding keeps the wire's key order, so with Go's id the bytes come back exactly.
    assert encode(features, STRING_MAP, type_ids={STRING_MAP: 74}) == FEATURES_WV2
    # With our own numbering the stream differs only in the ids, and still decodes the same.
    ours = encode(features, STRING_MAP)
    assert ours != FEATURES_WV2
    assert decode_all(ours) == [features]


POINT = StructType("Point", (Field("X", INT), Field("Y", INT)))


def test_go_doc_point_example() -> None:
    definition = hx("1f ff 81 03 01 01 05 50 6f 69 6e 74 01 ff 82 00 01 02 01 01 58 01 04 00 01 01 59 01 04 00 00 00")
    value = hx("07 ff 82 01 2c 01 42 00")
    enc = Encoder()
    assert enc.encode({"X": 22, "Y": 33}, POINT) == definition + value
    # The second value on the same encoder carries no definition.
    assert enc.encode({"X": 22, "Y": 33}, POINT) == value
    [pt] = decode_all(definition + value)
    assert pt == {"X": 22, "Y": 33} and pt.type_name == "Point" and pt.X == 22



TOPOLOGY_BODY = hx("""
0b 0c 00 08 74 6f 70 6f 6c 6f 67 79 09 06 00 fa 02 98 00 00 00 02 fe 01 3d 0a 00
fe 01 38 62 ff 95 03 01 01 0b 70 65 65 72 53 75 6d 6d 61 72 79 01 ff 96 00 01 06 01 08 4e 61 6d
65 42 79 74 65 01 0a 00 01 08 4e 69 63 6b 4e 61 6d 65 01 0c 00 01 03 55 49 44 01 06 00 01 07 56
65 72 73 69 6f 6e 01 06 00 01 07 53 68 6f 72 74 49 44 01 06 00 01 0a 48 61 73 53 68 6f 72 74 49
44 01 02 00 00 00 21 ff 96 01 06 02 98 00 00 00 01 01 04 77 76 2d 31 01 f8 e7 99 f8 74 5d 28 d4
6f 02 fe 0e af 01 01 00 0d ff 99 02 01 02 ff 9a 00 01 ff 98 00 00 5b ff 97 03 01 01 11 63 6f 6e
6e 65 63 74 69 6f 6e 53 75 6d 6d 61 72 79 01 ff 98 00 01 04 01 08 4e 61 6d 65 42 79 74 65 01 0a
00 01 0d 52 65 6d 6f 74 65 54 43 50 41 64 64 72 01 0c 00 01 08 4f 75 74 62 6f 75 6e 64 01 02 00
01 0b 45 73 74 61 62 6c 69 73 68 65 64 01 02 00 00 00 04 ff 9a 00 00 23 ff 96 01 06 02 98 00 00
00 02 01 04 77 76 2d 32 01 f8 75 e6 0a d5 cf ec b3 8e 01 01 01 fe 0c a2 01 01 00 1f ff 9a 00 01
01 06 02 98 00 00 00 01 01 0e 31 30 2e 39 38 2e 30 2e 31 3a 36 37 38 33 01 01 00""")


def test_topology_golden_forward_references_and_reencode() -> None:
    channel, sender, payload = decode_all(TOPOLOGY_BODY)
    assert (channel, sender, len(payload)) == ("topology", 0x029800000002, 312)
    dec = Decoder(payload)
    values = []
    while not dec.at_end:
        values.append(dec.decode(PEER_SUMMARY))
        values.append(dec.decode(CONN_LIST))
    p1, c1, p2, c2 = values
    assert p1 == {"NameByte": hx("02 98 00 00 00 01"), "NickName": "wv-1", "UID": 16688643072860935279,
                  "Version": 0, "ShortID": 3759, "HasShortID": True}
    assert c1 == []
    assert p2["Version"] == 1 and p2["ShortID"] == 3234
    assert c2 == [{"NameByte": hx("02 98 00 00 00 01"), "RemoteTCPAddr": "10.98.0.1:6783",
                   "Outbound": True, "Established": False}]
    ids = {PEER_SUMMARY: 75, CONN_SUMMARY: 76, CONN_LIST: 77}
    rebuilt = encode_stream([(p1, PEER_SUMMARY), (c1, CONN_LIST), (p2, PEER_SUMMARY), (c2, CONN_LIST)], ids)
    assert rebuilt == payload
    envelope = encode_stream([(channel, STRING), (sender, UINT), (rebuilt, BYTES)])
    assert envelope == TOPOLOGY_BODY


def test_go_numbering_order_slice_after_element() -> None:
    # Fresh numbering from 75 gives Go's ids: the struct first, the slice after its element.
    enc = Encoder(first_id=75)
    enc.encode({"NameByte": b"\x00" * 6}, PEER_SUMMARY)
    enc.encode([], CONN_LIST)
    assert enc._ids[PEER_SUMMARY] == 75 and enc._ids[CONN_SUMMARY] == 76 and enc._ids[CONN_LIST] == 77


def test_nameserver_golden_frame() -> None:
    assert int.from_bytes(NAMESERVER_FRAME[:4], "big") == len(NAMESERVER_FRAME) - 4
    channel, sender, payload = decode_all(NAMESERVER_FRAME[5:])
    assert channel == "nameserver" and sender == 0x029800000002
    [data] = decode_all(payload, DNS_GOSSIP)
    assert data == {"Timestamp": 1795238366, "Entries": []}
    # Numbered from 86 the way wv-2's process did: GossipData 86, Entry 87, Entries 88.
    assert Encoder(first_id=86).encode(data, DNS_GOSSIP) == payload


def test_ipam_gossip_state_definition_order_and_struct_keys() -> None:
    """wv-2's IPAM gossip: forward references, a map keyed by a struct, a nil pointer field."""
    [state] = decode_all(IPAM_PAYLOAD_WV2, IPAM_GOSSIP)
    assert state == {"Now": 1795238366, "Nicknames": {0x029800000002: "wv-2"}, "Paxos": {}, "Ring": None}
    # wv-2 had numbered Ring and its parts 65-68 before gossipState got 78.
    ids = {RING: 65, RING_ENTRY: 66, RING_ENTRIES: 67, PEER_NAMES: 68}
    assert Encoder(ids, first_id=78).encode(state, IPAM_GOSSIP) == IPAM_PAYLOAD_WV2
    # A Paxos map with struct keys round-trips and its keys are hashable GobStructs.
    node = {"Name": 0x029800000001, "UID": 42}
    claims = {"Promise": {"Round": 1, "Proposer": node}, "Accepted": {"Round": 1, "Proposer": node},
              "AcceptedVal": {"Value": [1, 2, 3], "Origin": {"Round": 1, "Proposer": node}}}
    full = dict(state, Paxos={GobStruct("", node): claims})
    [back] = decode_all(encode(full, IPAM_GOSSIP), IPAM_GOSSIP)
    [(key, value)] = back["Paxos"].items()
    assert key == node and hash(key) == hash(GobStruct("", dict(node))) and value == claims


def test_definitions_without_expect_shape_values_by_the_wire() -> None:
    [state] = decode_all(IPAM_PAYLOAD_WV2)
    assert state.type_name == "gossipState"
    assert state["Ring"] is None and state["Paxos"] == {} and state["Now"] == 1795238366


# ------------------------------------------------------------------- Go's rules

def test_omission_rules() -> None:
    s = StructType("S", (Field("M", MapType(STRING, INT)), Field("E", StructType("E")), Field("A", ArrayType(UINT, 2)),
                         Field("L", SliceType(INT)), Field("P", POINT, optional=True)))
    enc = Encoder()
    enc.encode({"M": None, "E": {}, "A": [0, 0], "L": [], "P": None}, s)
    # nil map omitted, empty struct sent (02 00 -> field 1, end), array always sent, empty slice omitted.
    value = enc.encode({"M": None, "E": {}, "A": [0, 0], "L": [], "P": None}, s)
    assert value.endswith(hx("02 00 01 02 00 00 00"))
    with_map = enc.encode({"M": {}, "E": {}, "A": [0, 0]}, s)
    assert with_map.endswith(hx("01 00 01 00 01 02 00 00 00"))


def test_struct_fields_matched_by_name_like_go() -> None:
    wire = StructType("T", (Field("A", UINT), Field("Extra", STRING), Field("B", STRING)))
    local = StructType("T", (Field("B", STRING), Field("A", UINT), Field("Missing", INT)))
    [v] = decode_all(encode({"A": 7, "Extra": "x", "B": "b"}, wire), local)
    assert dict(v) == {"B": "b", "A": 7, "Missing": 0}


def test_kind_mismatch_is_an_error() -> None:
    wire = StructType("P", (Field("Name", INT),))
    local = StructType("P", (Field("Name", UINT),))
    with pytest.raises(GobError, match="type mismatch"):
        decode_all(encode({"Name": 5}, wire), local)
    with pytest.raises(GobError, match="type mismatch"):
        decode_all(encode("s", STRING), BYTES)
    with pytest.raises(GobError, match="type mismatch"):
        decode_all(encode([1], SliceType(INT)), STRING_MAP)


# ------------------------------------------------------------------ bad streams

BAD_STREAMS = {
    "empty message": "00",
    "length beyond input": "05 0c 00",
    "type id 0": "02 00 00",
    "unknown type id": "03 ff 82 00",
    "interface value": "02 10 00",
    "definition of a reserved id": "04 03 02 01 00",
    "string longer than message": "04 0c 00 09 41",
    "missing singleton marker": "03 0c 01 00",
    "huge slice count": "0f ff 81 02 01 02 ff 82 00 01 04 00 00 06 ff 82 00 fe ff ff",
    "field out of bounds": "1f ff 81 03 01 01 05 50 6f 69 6e 74 01 ff 82 00 01 02 01 01 58 01 04 00 01 01 59 01 04 00 "
                           "00 00 05 ff 82 05 02 00",
    "duplicate definition": "0e ff 93 04 01 02 ff 94 00 01 0c 01 0c 00 00 0e ff 93 04 01 02 ff 94 00 01 0c 01 0c 00 00",
    "extra bytes after definition": "0f ff 93 04 01 02 ff 94 00 01 0c 01 0c 00 00 00",
    "definition with two kinds": "13 ff 93 02 01 02 ff 94 00 01 0c 00 02 01 02 ff 94 00 01 0c 00",
    "truncated uint": "03 06 00 fe",
}


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
def test_bad_streams_raise_gob_error(name: str) -> None:
    with pytest.raises(GobError):
        decode_all(hx(BAD_STREAMS[name]))


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    t: object = INT
    for _ in range(80):
        t = SliceType(t)  # type: ignore[arg-type]
    value: object = [1]
    for _ in range(79):
        value = [value]
    with pytest.raises(GobError, match="too deeply"):
        encode(value, t)  # type: ignore[arg-type]
    # A recursive type (legal in gob: a slice of itself) nested 100 deep on the wire.
    definition = hx("0d ff 81 02 01 02 ff 82 00 01 ff 82 00 00")
    assert decode_all(definition + hx("07 ff 82 00 01 01 01 00")) == [[[[[]]]]]
    with pytest.raises(GobError, match="too deeply"):
        decode_all(definition + hx("68 ff 82 00") + b"\x01" * 100 + b"\x00")


def test_decoder_reports_end_of_stream() -> None:
    dec = Decoder(encode("x", STRING))
    assert dec.decode() == "x" and dec.at_end
    with pytest.raises(GobError, match="end of gob stream"):
        dec.decode()


def test_non_utf8_strings_round_trip() -> None:
    raw = hx("05 0c 00 02 ff fe")
    [s] = decode_all(raw)
    assert encode(s, STRING) == raw


# --------------------------------------------------------------- properties

SCALARS = {
    BOOL: st.booleans(),
    INT: st.integers(-(2**63), 2**63 - 1),
    UINT: st.integers(0, 2**64 - 1),
    FLOAT: st.floats(allow_nan=False),
    BYTES: st.binary(max_size=40),
    STRING: st.text(max_size=20),
    COMPLEX: st.complex_numbers(allow_nan=False, allow_infinity=False),
}
KEY_TYPES = st.sampled_from([INT, UINT, STRING, BOOL])
NAMES = st.from_regex(r"\A[A-Z][a-zA-Z0-9]{0,8}\Z")


def _types(depth: int = 3) -> st.SearchStrategy:
    leaf = st.sampled_from(list(SCALARS))
    if depth == 0:
        return leaf
    inner = st.deferred(lambda: _types(depth - 1))
    return st.one_of(
        leaf,
        st.builds(SliceType, inner, NAMES | st.just("")),
        st.builds(ArrayType, inner, st.integers(0, 3)),
        st.builds(MapType, KEY_TYPES, inner),
        st.builds(
            lambda name, fields: StructType(name, tuple(Field(n, t) for n, t in fields)),
            NAMES,
            st.lists(st.tuples(NAMES, inner), max_size=4, unique_by=lambda f: f[0]),
        ),
    )


def _values(t: object) -> st.SearchStrategy:
    if t in SCALARS:
        return SCALARS[t]  # type: ignore[index]
    if isinstance(t, SliceType):
        return st.lists(_values(t.elem), max_size=3)
    if isinstance(t, ArrayType):
        return st.lists(_values(t.elem), min_size=t.length, max_size=t.length)
    if isinstance(t, MapType):
        return st.dictionaries(_values(t.key), _values(t.elem), max_size=3)
    assert isinstance(t, StructType)
    return st.fixed_dictionaries({f.name: _values(f.type) for f in t.fields})


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_round_trip_generated_types_and_values(data: st.DataObject) -> None:
    t = data.draw(_types())
    values = data.draw(st.lists(_values(t), min_size=1, max_size=3))
    stream = encode_stream([(v, t) for v in values])
    assert decode_all(stream, t) == values
    # Without a local schema the wire definitions alone give the same data.
    assert decode_all(stream) == values
    # Re-encoding what was decoded is byte-identical (same ids, same order).
    assert encode_stream([(v, t) for v in decode_all(stream, t)]) == stream


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1))
def test_integer_round_trip(u: int, i: int) -> None:
    assert decode_uint(encode_uint(u), 0) == (u, len(encode_uint(u)))
    assert decode_int(encode_int(i), 0) == (i, len(encode_int(i)))


GOLDEN = [FEATURES_WV2, TOPOLOGY_BODY, NAMESERVER_FRAME[5:], IPAM_PAYLOAD_WV2, TOPOLOGY_BODY[30:]]


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(GOLDEN), st.data())
def test_mutated_golden_streams_raise_only_gob_errors(stream: bytes, data: st.DataObject) -> None:
    buf = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 8))]
        else:
            del buf[pos:]
    assume(bytes(buf) != stream)
    try:
        decode_all(bytes(buf))
    except GobError:
        pass


def test_skip_then_decode_at_reads_values_out_of_order() -> None:
    enc = Encoder()
    point = StructType("Point", (Field("X", INT), Field("Y", INT)))
    stream = enc.encode({"X": 1, "Y": 2}, point) + enc.encode([1, 2, 3], SliceType(INT))
    stream += enc.encode({"X": 3, "Y": 4}, point)
    dec = Decoder(stream)
    first = dec.skip()
    second = dec.skip()
    assert dec.decode(point) == {"X": 3, "Y": 4} and dec.at_end
    assert dec.decode_at(second) == [1, 2, 3]
    assert dec.decode_at(first, point) == {"X": 1, "Y": 2}
    assert dec.at_end  # decode_at leaves the stream position alone


def test_skip_checks_the_message_length() -> None:
    enc = Encoder()
    stream = enc.encode([1, 2, 3], SliceType(INT))
    with pytest.raises(GobError, match="truncated"):
        Decoder(stream[:-1]).skip()


# --------------------------------------------------------------- bounds on hostile streams
# Issue 12, defect 6: type definitions from a peer were kept without limit.


def test_real_streams_are_far_inside_the_bounds() -> None:
    # The busiest real stream (IPAM gossip) defines 12 types in 524 bytes.
    for stream in GOLDEN:
        dec = Decoder(stream)
        while not dec.at_end:
            dec.decode()
        assert dec.definition_count * 50 <= MAX_TYPES
        assert dec.definition_bytes * 100 <= MAX_DEFINITION_BYTES


def test_a_flood_of_type_definitions_stops_at_the_count_bound() -> None:
    dec = Decoder(definition_flood(20_000))
    with pytest.raises(GobLimitError, match="type definitions"):
        dec.read_definitions()
    # Nothing past the bound was parsed or kept.
    assert dec.definition_count == MAX_TYPES
    assert dec.position <= len(definition_flood(MAX_TYPES + 1))


def test_type_definition_bytes_are_bounded() -> None:
    wide = wide_struct_definition(FIRST_ID, 2000)
    assert MAX_DEFINITION_BYTES // 50 < len(wide) < MAX_DEFINITION_BYTES
    dec = Decoder(b"".join(wide_struct_definition(FIRST_ID + i, 2000) for i in range(200)))
    with pytest.raises(GobLimitError, match="bytes"):
        dec.read_definitions()
    assert dec.definition_bytes <= MAX_DEFINITION_BYTES
    assert dec.definition_count < MAX_TYPES


def test_limits_are_per_decoder_and_can_be_tightened() -> None:
    with pytest.raises(GobLimitError):
        Decoder(definition_flood(3), max_types=2).read_definitions()
    with pytest.raises(GobLimitError):
        Decoder(definition_flood(3), max_definition_bytes=20).read_definitions()
    assert len(Decoder(definition_flood(2), max_types=2).read_definitions()) == 2


def test_a_fed_decoder_reads_each_definition_once() -> None:
    # A long-lived stream (protocol v1) fed message by message keeps its definitions,
    # and the work per value does not grow with the number of definitions before it.
    dec = Decoder()
    definition = slice_definition(FIRST_ID)
    dec.feed(definition)
    dec.read_definitions()
    body = encode_int(FIRST_ID) + b"\x00\x01\x01a"  # []string{"a"}, a singleton value
    value = encode_uint(len(body)) + body
    for _ in range(100):
        dec.feed(value)
        assert dec.decode() == ["a"]
    assert dec.definition_count == 1 and dec.at_end


@settings(max_examples=500, deadline=2000)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_gob_errors(data: bytes) -> None:
    for read in (decode_all, lambda d: Decoder(d).read_definitions()):
        try:
            read(data)
        except GobError:
            pass


@settings(max_examples=300, deadline=2000)
@given(st.lists(st.integers(FIRST_ID, FIRST_ID + 40), max_size=30), st.lists(st.integers(0, 50)), st.binary())
def test_arbitrary_values_after_arbitrary_definitions(ids: list[int], elems: list[int], tail: bytes) -> None:
    # Definitions that refer to each other (and themselves) in any way, then junk.
    stream = b"".join(slice_definition(i, elems[n % len(elems)] if elems else i) for n, i in enumerate(ids))
    try:
        decode_all(stream + tail)
    except GobError:
        pass


def test_deeply_nested_struct_chain_is_refused_not_a_recursion_error() -> None:
    # Struct type i has one field of type i+1, 500 deep; a value nests all the way down.
    depth = 500
    defs = b"".join(_struct_definition(FIRST_ID + i, FIRST_ID + i + 1) for i in range(depth))
    shallow = encode_int(FIRST_ID + depth - 2) + b"\x01\x00\x00"
    assert decode_all(defs + encode_uint(len(shallow)) + shallow) == [{"N": {"N": None}}]
    value = encode_int(FIRST_ID) + b"\x01" * depth + b"\x00" * (depth + 1)
    with pytest.raises(GobError, match="too deeply"):
        decode_all(defs + encode_uint(len(value)) + value)


def _struct_definition(type_id: int, field_id: int) -> bytes:
    """wireType{StructT: structType{CommonType{Id}, Field: [{Name: "N", Id: field_id}]}}"""
    field_body = b"\x01\x01N\x01" + encode_int(field_id) + b"\x00"
    body = encode_int(-type_id) + b"\x03\x01\x02" + encode_int(type_id) + b"\x00\x01\x01" + field_body + b"\x00\x00"
    return encode_uint(len(body)) + body


def _slice_value(type_id: int, count: int, element: bytes) -> bytes:
    body = encode_int(type_id) + b"\x00" + encode_uint(count) + element * count
    return encode_uint(len(body)) + body


def test_values_that_would_make_millions_of_objects_are_refused() -> None:
    # An empty struct is one byte on the wire and a dict of zero values in memory:
    # 1 MB of them used to decode into ~250 MB.
    enc = Encoder()
    definitions = enc.definitions(CONN_LIST)
    list_id = next(i for i, d in Decoder(definitions).read_definitions().items() if d.kind == "slice")
    flood = definitions + _slice_value(list_id, 300_000, b"\x00")
    with pytest.raises(GobLimitError, match="items"):
        Decoder(flood).decode(CONN_LIST)
    # Without a local schema the wire's fields are what gets filled in.
    wide = wide_struct_definition(FIRST_ID, 3000) + slice_definition(FIRST_ID + 1, FIRST_ID)
    with pytest.raises(GobLimitError, match="items"):
        decode_all(wide + _slice_value(FIRST_ID + 1, 1000, b"\x00"))
    # Big plain values are fine, and the budget is per value, not per stream.
    ints = _slice_value(FIRST_ID, MAX_ITEMS // 2, b"\x02")
    dec = Decoder(slice_definition(FIRST_ID, 2) + ints + ints + ints)
    assert [len(dec.decode()) for _ in range(3)] == [MAX_ITEMS // 2] * 3
