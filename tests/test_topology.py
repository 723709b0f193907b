"""Topology payload codec and the merge rules of the Peers model (weave-net.md §2.7)."""

from __future__ import annotations

import random
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import topology
from router.errors import GobError, ProtocolError, WireError
from router.gob import BOOL, BYTES, STRING, UINT, Encoder, Field, SliceType, StructType
from router.topology import (
    CONN_LIST,
    CONN_SUMMARY,
    MAX_SHORT_ID,
    PEER_SUMMARY,
    ConnectionSummary,
    Peer,
    Peers,
    PeerSummary,
    choose_short_id,
    decode_topology,
    encode_topology,
    short_id_owners,
    supersedes,
)

A, B, C, D, E = (0x02_00_00_00_00_00 + i for i in range(1, 6))


def make_peers(name: int = A, uid: int = 1000, short_id: int | None = 1, version: int = 0) -> Peers:
    return Peers(name, f"n{name & 0xFF}", uid, short_id, rng=random.Random(0), version=version)


def connect(
    model: Peers, remote: int, uid: int, established: bool = True, short_id: int | None = None
) -> None:
    model.register_remote(remote, f"n{remote & 0xFF}", uid, short_id)
    model.add_connection(remote, f"10.0.0.{remote & 0xFF}:6783", outbound=True, established=established)


def ps(name: int, uid: int, version: int, short_id: int = 0, has_short_id: bool = False) -> PeerSummary:
    return PeerSummary(name, f"n{name & 0xFF}", uid, version, short_id, has_short_id)


def cs(name: int, established: bool = True) -> ConnectionSummary:
    return ConnectionSummary(name, f"10.0.0.{name & 0xFF}:6783", False, established)


# ---------------------------------------------------------------- codec

names = st.integers(0, (1 << 48) - 1)
peer_summaries = st.builds(
    PeerSummary,
    name=names,
    nickname=st.text(max_size=12),
    uid=st.integers(0, (1 << 64) - 1),
    version=st.integers(0, (1 << 64) - 1),
    short_id=st.integers(0, MAX_SHORT_ID),
    has_short_id=st.booleans(),
)
conn_summaries = st.builds(
    ConnectionSummary,
    name=names,
    remote_tcp_addr=st.text(max_size=21),
    outbound=st.booleans(),
    established=st.booleans(),
)
topologies = st.lists(st.tuples(peer_summaries, st.lists(conn_summaries, max_size=5)), max_size=6)


@given(topologies)
def test_decode_inverts_encode(entries: list[tuple[PeerSummary, list[ConnectionSummary]]]) -> None:
    assert decode_topology(encode_topology(entries)) == entries


@given(topologies)
def test_joined_payload_equals_a_fresh_encoders_stream(entries: list) -> None:
    # encode_topology(type_ids=None) joins cached value messages; it must be exactly the
    # stream a fresh gob encoder (ids from 65, in Go's order) writes.
    fresh_ids = {PEER_SUMMARY: 65, CONN_SUMMARY: 66, CONN_LIST: 67}
    assert encode_topology(entries) == encode_topology(entries, fresh_ids)


def test_model_payload_tracks_every_change() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 1), [cs(A), cs(C)])])
    before = model.encode_full()
    assert before == encode_topology(model.entries())
    model.apply_update([(PeerSummary(B, "renamed", 50, 2), [cs(A)])])
    after = model.encode_full()
    assert after != before and after == encode_topology(model.entries())
    assert model.encode_peers([B, D]) == encode_topology(model.entries([B]))


def test_bad_connection_list_of_a_new_peer_changes_nothing() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    bad_conn = {"NameByte": b"\x01\x02", "RemoteTCPAddr": "", "Outbound": False, "Established": True}
    enc = Encoder()
    bad = enc.encode(ps(B, 50, 3).to_gob(), PEER_SUMMARY) + enc.encode([cs(A).to_gob()], CONN_LIST)
    bad += enc.encode(ps(C, 7, 1).to_gob(), PEER_SUMMARY) + enc.encode([bad_conn], CONN_LIST)
    before = model.entries()
    with pytest.raises(WireError, match="NameByte must be 6 bytes"):
        model.apply_update(bad)
    assert model.entries() == before  # B's newer summary in front was not applied either


def test_stale_entries_are_not_decoded_beyond_their_summary() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 5), [cs(A)])])
    # Version 4 is older than what we have: its connection list is skipped, not decoded.
    enc = Encoder()
    bad_conn = {"NameByte": b"\x01", "RemoteTCPAddr": "", "Outbound": False, "Established": True}
    stale = enc.encode(ps(B, 50, 4).to_gob(), PEER_SUMMARY) + enc.encode([bad_conn], CONN_LIST)
    result = model.apply_update(stale)
    assert result.improved == frozenset() and result.received == {B}


@given(topologies, st.integers(65, 1000))
def test_any_type_ids_decode(entries: list[tuple[PeerSummary, list[ConnectionSummary]]], first: int) -> None:
    ids = {PEER_SUMMARY: first + 5, CONN_SUMMARY: first, CONN_LIST: first + 1}
    assert decode_topology(encode_topology(entries, ids)) == entries


def test_empty_payload_is_no_peers() -> None:
    assert decode_topology(b"") == []


def _raw_payload(peer: dict, conns: list[dict]) -> bytes:
    enc = Encoder()
    return enc.encode(peer, PEER_SUMMARY) + enc.encode(conns, CONN_LIST)


def test_short_name_byte_is_rejected() -> None:
    with pytest.raises(WireError, match="NameByte must be 6 bytes, got 5"):
        decode_topology(_raw_payload({"NameByte": b"\x02\x00\x00\x00\x01", "UID": 1}, []))


def test_missing_name_byte_is_rejected() -> None:
    with pytest.raises(WireError, match="NameByte must be 6 bytes"):
        decode_topology(_raw_payload({"UID": 1}, []))


def test_connection_name_byte_is_checked() -> None:
    payload = _raw_payload({"NameByte": bytes(6), "UID": 1}, [{"NameByte": b"\x01" * 7}])
    with pytest.raises(WireError, match="connection of 00:00:00:00:00:00: NameByte must be 6 bytes, got 7"):
        decode_topology(payload)


def test_short_id_above_12_bits_is_rejected() -> None:
    payload = _raw_payload({"NameByte": bytes(6), "ShortID": 4096, "HasShortID": True}, [])
    with pytest.raises(WireError, match="ShortID 4096"):
        decode_topology(payload)


def test_peer_without_connection_list_is_rejected() -> None:
    payload = Encoder().encode({"NameByte": bytes(6)}, PEER_SUMMARY)
    with pytest.raises(WireError, match="no connection list"):
        decode_topology(payload)


def test_wrong_gob_type_is_a_gob_error() -> None:
    not_topology = Encoder().encode("topology", STRING)
    with pytest.raises(GobError, match="bad peerSummary #0"):
        decode_topology(not_topology)


def test_field_of_wrong_kind_is_a_gob_error() -> None:
    odd = StructType("peerSummary", (Field("NameByte", BYTES), Field("UID", STRING)))
    payload = Encoder().encode({"NameByte": bytes(6), "UID": "x"}, odd)
    with pytest.raises(GobError):
        decode_topology(payload)


def test_extra_wire_fields_are_skipped_as_go_does() -> None:
    newer = StructType("peerSummary", PEER_SUMMARY.fields + (Field("Extra", UINT),))
    newer_conn = StructType("connectionSummary", CONN_SUMMARY.fields + (Field("Weight", BOOL),))
    enc = Encoder()
    payload = enc.encode({"NameByte": bytes(5) + b"\x07", "UID": 9, "Extra": 5}, newer)
    payload += enc.encode([{"NameByte": bytes(5) + b"\x08", "Weight": True}], SliceType(newer_conn))
    assert decode_topology(payload) == [(PeerSummary(7, uid=9), [ConnectionSummary(8)])]


@given(st.binary(max_size=200))
def test_garbage_raises_only_wire_errors(data: bytes) -> None:
    try:
        decode_topology(data)
    except WireError:
        pass


@given(topologies, st.data())
def test_corrupted_payload_raises_only_wire_errors(entries: list, data: st.DataObject) -> None:
    payload = bytearray(encode_topology(entries))
    if not payload:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode_topology(bytes(payload))
    except WireError:
        pass


def generic_decode(payload: bytes) -> list:
    """decode_topology without the fast path for the usual layout."""
    with mock.patch.object(topology, "_decode_known_layout", lambda _: None):
        return decode_topology(payload)


def outcome(decode, payload: bytes) -> object:  # noqa: ANN001
    try:
        return decode(payload)
    except WireError:
        return WireError


@given(topologies, st.sampled_from([None, 65, 75, 300]))
def test_usual_layout_takes_the_fast_path(entries: list, first: int | None) -> None:
    ids = None if first is None else {PEER_SUMMARY: first + 10, CONN_SUMMARY: first, CONN_LIST: first + 1}
    payload = encode_topology(entries, ids)
    fast = topology._decode_known_layout(payload)
    if not entries:
        assert fast is None and decode_topology(payload) == []
        return
    assert fast is not None
    assert [(peer, conns()) for peer, conns in fast] == entries == generic_decode(payload)


@given(topologies, st.data())
def test_fast_path_agrees_with_the_generic_decoder_on_damaged_payloads(entries: list, data: st.DataObject) -> None:
    payload = bytearray(encode_topology(entries))
    if not payload:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    for damaged in (bytes(payload), bytes(payload[:cut])):
        assert outcome(decode_topology, damaged) == outcome(generic_decode, damaged)


def test_unknown_fields_take_the_generic_way() -> None:
    newer = StructType("peerSummary", PEER_SUMMARY.fields + (Field("Extra", UINT),))
    enc = Encoder()
    payload = enc.encode({"NameByte": bytes(5) + b"\x07", "UID": 9, "Extra": 5}, newer) + enc.encode([], CONN_LIST)
    assert topology._decode_known_layout(payload) is None
    assert decode_topology(payload) == [(PeerSummary(7, uid=9), [])]


# ---------------------------------------------------------------- merge rules


def test_supersedes_orders_by_version_then_uid_then_short_id() -> None:
    base = ps(B, uid=50, version=3)
    assert supersedes(ps(B, 1, 4), base)  # higher version wins even with lower UID
    assert not supersedes(ps(B, 99, 2), base)
    assert supersedes(ps(B, 51, 3), base)
    assert not supersedes(ps(B, 49, 3), base)
    assert supersedes(ps(B, 50, 3, 7, True), base)
    assert not supersedes(base, base)
    with_id = ps(B, 50, 3, 7, True)
    assert not supersedes(ps(B, 50, 3, 9, True), with_id)
    assert not supersedes(base, with_id)


@pytest.mark.parametrize(
    ("incoming", "accepted"),
    [
        (ps(B, 50, 6), True),
        (ps(B, 50, 4), False),
        (ps(B, 60, 5), True),
        (ps(B, 40, 5), False),
        (ps(B, 50, 5, 9, True), True),
        (PeerSummary(B, "same version, uid and no short id", 50, 5), False),
    ],
)
def test_apply_update_follows_the_merge_rule(incoming: PeerSummary, accepted: bool) -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 5), [cs(A)])])
    result = model.apply_update([(incoming, [cs(A), cs(C)])])
    assert (B in result.improved) is accepted
    assert (model.get(B).summary() == incoming) is accepted
    assert (C in model) is accepted  # only an accepted entry's connections count
    assert result.received == {B}


def test_accepted_entry_replaces_nickname_and_connections() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 1), [cs(A), cs(C)])])
    model.apply_update([(PeerSummary(B, "renamed", 50, 2), [cs(A)])])
    peer = model.get(B)
    assert peer.nickname == "renamed"
    assert set(peer.connections) == {A}
    assert C not in model  # only B listed C, and B no longer does


def test_unknown_connection_targets_become_placeholders() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    result = model.apply_update([(ps(B, 50, 2), [cs(A), cs(C)])])
    placeholder = model.get(C)
    assert placeholder == Peer(C)
    assert placeholder.is_placeholder and placeholder.connections == {}
    assert result.improved == {B}  # placeholders are not relayed
    assert result.new == {C}
    # The placeholder is gossiped like any peer: name only, everything else zero.
    assert (PeerSummary(C), []) in decode_topology(model.encode_full())


def test_placeholder_is_filled_by_any_real_summary() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 2), [cs(A), cs(C)])])
    result = model.apply_update([(ps(C, 70, 0), [cs(B)])])
    assert result.improved == {C}
    assert result.restarted == set() and result.new == set()
    assert model.get(C).uid == 70


@pytest.mark.parametrize("c_first", [False, True])
def test_new_peer_is_taken_whatever_its_version(c_first: bool) -> None:
    # A peer described in the update is new even if another entry of the same update
    # lists it first: its own summary is taken, even an all-zero one.
    model = make_peers()
    connect(model, B, uid=50)
    entries = [(ps(B, 50, 1), [cs(A), cs(C)]), (PeerSummary(C, "c"), [cs(B)])]
    result = model.apply_update(entries[::-1] if c_first else entries)
    assert result.improved == {B, C}
    assert result.new == {C}
    assert model.get(C).nickname == "c"
    assert set(model.get(C).connections) == {B}


def test_known_placeholder_ignores_an_all_zero_summary() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 1), [cs(A), cs(C)])])
    result = model.apply_update([(PeerSummary(C, "c"), [cs(B)])])
    assert result.improved == set()
    assert model.get(C) == Peer(C)


def test_restarted_peer_is_reported() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 3), [cs(A)])])
    result = model.apply_update([(ps(B, 51, 4), [cs(A)])])
    assert result.restarted == {B}
    assert result.improved == {B}
    assert model.get(B).uid == 51


def test_restarted_peer_with_lower_version_waits() -> None:
    # The new incarnation starts at a low version; it is taken only once it has
    # outdone the old one (which it does on hearing about it, see the next test).
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 9), [cs(A)])])
    result = model.apply_update([(ps(B, 51, 2), [cs(A)])])
    assert result.restarted == set() and result.improved == set()
    assert model.get(B).uid == 50


def test_old_incarnation_of_ourselves_bumps_our_version() -> None:
    model = make_peers(uid=1000)
    connect(model, B, uid=50)
    assert model.ourself.version == 1
    result = model.apply_update([(ps(A, 999, 7), [cs(B)])])
    assert result.local_modified
    assert model.ourself.version == 8
    assert model.ourself.uid == 1000
    assert A not in result.improved
    assert set(model.ourself.connections) == {B}  # our own entry is never replaced


def test_older_old_incarnation_changes_nothing() -> None:
    model = make_peers(uid=1000, version=10)
    result = model.apply_update([(ps(A, 999, 3), [])])
    assert not result.local_modified
    assert model.ourself.version == 10


def test_our_own_entry_echoed_back_is_ignored() -> None:
    model = make_peers(uid=1000)
    connect(model, B, uid=50)
    echo = model.ourself.summary()
    result = model.apply_update([(PeerSummary(A, "x", 1000, 99), [])])
    assert not result.local_modified
    assert model.ourself.summary() == echo


def test_local_connection_changes_bump_version() -> None:
    model = make_peers()
    assert model.register_remote(B, "b", 50, 2) is True
    assert model.register_remote(B, "b", 50, 2) is False
    model.add_connection(B, "10.0.0.2:6783", outbound=True)
    assert model.ourself.version == 1
    assert model.ourself.connections[B] == ConnectionSummary(B, "10.0.0.2:6783", True, False)
    assert model.set_connection_established(B)
    assert model.ourself.version == 2
    assert model.ourself.connections[B].established
    assert not model.set_connection_established(C)
    assert model.ourself.version == 2
    model.release_remote(B)
    model.release_remote(B)
    assert model.remove_connection(B) == [model_peer_b := Peer(B, "b", 50, 0, 2, True)]
    assert model_peer_b not in model.by_name.values()
    assert model.ourself.version == 3
    assert model.remove_connection(B) == []
    assert model.ourself.version == 3


def test_registering_ourselves_or_unknown_connections_fail() -> None:
    model = make_peers()
    with pytest.raises(ProtocolError, match="ourself"):
        model.register_remote(A, "a", 1000, 1)
    with pytest.raises(ValueError, match="not a registered remote"):
        model.add_connection(B, "10.0.0.2:6783", outbound=True)
    with pytest.raises(ValueError, match="no reference"):
        model.release_remote(B)
    with pytest.raises(ValueError):
        Peers(A, "a", 0, 1, rng=random.Random(0))


def test_known_peer_keeps_gossiped_state_on_register() -> None:
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update([(ps(B, 50, 4), [cs(A)])])
    model.register_remote(B, "other", 77, 3)
    assert model.get(B).summary() == ps(B, 50, 4)


# ---------------------------------------------------------------- garbage collection


def chain_model() -> Peers:
    """A -> B -> C -> D, all gossiped to A."""
    model = make_peers()
    connect(model, B, uid=50)
    model.apply_update(
        [(ps(B, 50, 1), [cs(A), cs(C)]), (ps(C, 60, 1), [cs(B), cs(D)]), (ps(D, 70, 1), [cs(C)])]
    )
    return model


def test_gc_keeps_peers_reachable_over_unestablished_links() -> None:
    model = make_peers()
    connect(model, B, uid=50, established=False)
    model.apply_update([(ps(B, 50, 1), [cs(A, False), cs(C, False)]), (ps(C, 60, 1), [cs(B, False)])])
    assert model.garbage_collect() == []
    assert set(model) == {A, B, C}


def test_gc_drops_what_a_lost_connection_cut_off() -> None:
    model = chain_model()
    assert set(model) == {A, B, C, D}
    model.release_remote(B)
    removed = model.remove_connection(B)
    assert {p.name for p in removed} == {B, C, D}
    assert set(model) == {A}


def test_gc_spares_referenced_peers() -> None:
    model = chain_model()
    removed = model.remove_connection(B)  # B is still registered (connection being torn down)
    assert {p.name for p in removed} == {C, D}
    assert set(model) == {A, B}
    model.release_remote(B)
    assert [p.name for p in model.garbage_collect()] == [B]


def test_update_about_unreachable_peers_is_dropped() -> None:
    model = chain_model()
    result = model.apply_update([(ps(E, 90, 1), [cs(0x0A)])])
    assert {p.name for p in result.removed} == {E, 0x0A}
    assert result.improved == set() and result.new == set()
    assert E not in model


def test_update_cutting_a_branch_reports_removed_peers() -> None:
    model = chain_model()
    result = model.apply_update([(ps(C, 60, 2), [cs(B)])])
    assert result.improved == {C}
    assert [p.name for p in result.removed] == [D]


# ---------------------------------------------------------------- short ids


def test_choose_short_id_avoids_ids_in_use() -> None:
    rng = random.Random(3)
    in_use = set(range(0, 4096, 2))
    for _ in range(50):
        assert choose_short_id(in_use, rng) % 2 == 1


def test_choose_short_id_scans_when_nearly_full() -> None:
    in_use = set(range(4096)) - {1234}
    for seed in range(5):
        assert choose_short_id(in_use, random.Random(seed)) == 1234
    assert choose_short_id(set(range(4096)), random.Random(0)) is None


@given(st.sets(st.integers(0, MAX_SHORT_ID), max_size=4095), st.randoms(use_true_random=False))
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=50)
def test_choose_short_id_always_finds_a_free_one(in_use: set[int], rng: random.Random) -> None:
    chosen = choose_short_id(in_use, rng)
    assert chosen is not None and 0 <= chosen <= MAX_SHORT_ID and chosen not in in_use


def test_short_id_owner_is_lowest_name() -> None:
    owners = short_id_owners(
        [ps(C, 1, 1, 7, True), ps(B, 1, 1, 7, True), ps(A, 1, 1, 8, True), ps(D, 1, 1, 7)]
    )
    assert owners == {7: B, 8: A}


def test_short_id_collision_with_lower_name_makes_us_repick() -> None:
    model = make_peers(name=C, short_id=7)
    connect(model, B, uid=50, short_id=9)
    version = model.ourself.version
    result = model.apply_update([(ps(B, 50, 1, 9, True), [cs(C), cs(A)]), (ps(A, 40, 1, 7, True), [cs(B)])])
    assert result.local_modified
    assert model.ourself.short_id not in (7, 9)
    assert model.ourself.version == version + 1
    assert model.peer_by_short_id(7).name == A
    assert model.peer_by_short_id(model.ourself.short_id).name == C


def test_short_id_collision_with_higher_name_keeps_ours() -> None:
    model = make_peers(name=A, short_id=7)
    connect(model, B, uid=50)
    result = model.apply_update([(ps(B, 50, 1, 7, True), [cs(A)])])
    assert not result.local_modified
    assert model.ourself.short_id == 7
    assert model.peer_by_short_id(7).name == A


def test_registering_a_lower_named_peer_with_our_short_id_repicks() -> None:
    model = make_peers(name=C, short_id=7)
    model.register_remote(A, "a", 40, 7)
    assert model.ourself.short_id != 7
    assert model.ourself.version == 1


# ---------------------------------------------------------------- encoding the model


def test_encode_full_and_encode_peers_round_trip() -> None:
    model = chain_model()
    assert decode_topology(model.encode_full()) == model.entries()
    partial = decode_topology(model.encode_peers([D, B, 0x0B]))
    assert [s.name for s, _ in partial] == [B, D]
    assert partial == model.entries([B, D])


def test_full_gossip_recreates_the_view_elsewhere() -> None:
    model = chain_model()
    other = make_peers(name=E, uid=90, short_id=5)
    other.register_remote(A, "nA", 1000, 1)
    other.add_connection(A, "10.0.0.1:6783", outbound=True)
    result = other.apply_update(model.encode_full())
    assert result.improved == {A, B, C, D}
    assert result.new == {B, C, D}
    mine = {n: p for n, p in other.by_name.items() if n != E}
    assert mine == dict(model.by_name)


# ---------------------------------------------------------------- order insensitivity


def view(model: Peers) -> dict[int, tuple[PeerSummary, frozenset[ConnectionSummary]]]:
    return {n: (p.summary(), frozenset(p.connections.values())) for n, p in model.by_name.items()}


@st.composite
def update_sets(draw: st.DrawFn) -> tuple[list[int], dict[int, list], list]:
    """Names, our local neighbours, and single-peer updates (several versions per peer)."""
    n = draw(st.integers(2, 7))
    names = [A + i for i in range(n)]  # names[0] is us
    ghosts = [0x0F_00_00_00_00_00 + i for i in range(2)]  # referenced but never described
    neighbours = draw(st.lists(st.sampled_from(names[1:]), unique=True, max_size=n - 1))
    updates = []
    for i, name in enumerate(names[1:], start=1):
        versions = draw(st.lists(st.integers(0, 20), unique=True, min_size=1, max_size=3))
        for v in versions:
            uid = draw(st.sampled_from([100 + i, 200 + i]))
            conns = draw(st.lists(st.sampled_from(names + ghosts), unique=True, max_size=4))
            summary = PeerSummary(name, f"p{i}-{v}", uid, v, i, True)
            updates.append((summary, [cs(c, draw(st.booleans())) for c in conns if c != name]))
    for v in draw(st.lists(st.integers(0, 20), max_size=2)):
        updates.append((PeerSummary(names[0], "old me", 7, v, 0, True), []))
    return names, neighbours, updates


def expected_view(names: list[int], initial: list, updates: list, local: Peer) -> dict:
    """Each peer's best state (registered or gossiped), for the peers reachable from us."""
    best: dict[int, tuple[PeerSummary, list]] = {}
    for summary, conns in initial + updates:
        if summary.name == names[0]:
            continue
        if summary.name not in best or supersedes(summary, best[summary.name][0]):
            best[summary.name] = (summary, conns)
    reached, frontier = {names[0]}, [names[0]]
    while frontier:
        current = frontier.pop()
        conns = local.connections.values() if current == names[0] else best.get(current, (None, []))[1]
        for c in conns:
            if c.name not in reached:
                reached.add(c.name)
                frontier.append(c.name)
    out = {}
    for name in reached - {names[0]}:
        if name in best:
            out[name] = (best[name][0], frozenset(best[name][1]))
        else:
            out[name] = (PeerSummary(name), frozenset())
    return out


@given(update_sets(), st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_merge_converges_whatever_the_order(case: tuple, rng: random.Random) -> None:
    names, neighbours, updates = case
    model = Peers(names[0], "me", 1000, 0, rng=random.Random(0), version=3)
    for nb in neighbours:
        connect(model, nb, uid=0x77, short_id=names.index(nb))
    local = model.ourself
    initial = [p.entry() for n, p in model.by_name.items() if n != names[0]]
    # Gossip is repeated (periodic full state), so deliver every update, in a fresh random
    # order with duplicates, until a round improves nothing.
    for _ in range(len(names) + 2):
        batch = updates + rng.choices(updates, k=len(updates) // 2) if updates else []
        rng.shuffle(batch)
        improved = False
        for update in batch:
            improved |= bool(model.apply_update([update]).improved)
        if not improved:
            break
    else:
        pytest.fail("gossip did not settle")
    got = view(model)
    me = got.pop(names[0])
    assert got == expected_view(names, initial, updates, local)
    old_me = [s.version + 1 for s, _ in updates if s.name == names[0]]
    assert me[0].version == max([local.version, *old_me])
    assert me[1] == frozenset(local.connections.values())


# ---------------------------------------------------------------- a simulated mesh


@st.composite
def meshes(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], set[tuple[int, int]]]:
    n = draw(st.integers(2, 6))
    edges = {(draw(st.integers(0, i - 1)), i) for i in range(1, n)}  # a spanning tree
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=n))
    edges |= {(min(a, b), max(a, b)) for a, b in extra if a != b}
    established = draw(st.sets(st.sampled_from(sorted(edges))))
    return n, sorted(edges), established


@given(meshes(), st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_gossiping_peers_converge_to_one_view(mesh: tuple, seed: int) -> None:
    n, edges, established = mesh
    rng = random.Random(seed)
    names = [A + i for i in range(n)]
    models = [Peers(names[i], f"p{i}", 500 + i, i, rng=random.Random(i)) for i in range(n)]
    neighbours: dict[int, list[int]] = {i: [] for i in range(n)}
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
        for x, y in ((a, b), (b, a)):
            me = models[y].ourself
            models[x].register_remote(me.name, me.nickname, me.uid, me.short_id)
            models[x].add_connection(me.name, f"10.0.0.{y}:6783", outbound=x < y)
    for a, b in established:
        models[a].set_connection_established(names[b])
        models[b].set_connection_established(names[a])

    queue: list[tuple[int, int, bytes]] = []

    def deliver_all() -> bool:
        any_improved = False
        budget = 10_000
        while queue:
            budget -= 1
            assert budget > 0, "gossip storm"
            i = rng.randrange(len(queue))
            dst, src, payload = queue[i] if rng.random() < 0.2 else queue.pop(i)  # maybe a duplicate
            result = models[dst].apply_update(payload)
            relay = set(result.improved) | ({names[dst]} if result.local_modified else set())
            any_improved |= bool(result.improved)
            if relay:
                delta = models[dst].encode_peers(relay)
                queue.extend((nb, dst, delta) for nb in neighbours[dst] if nb != src)
        return any_improved

    for a, b in edges:  # a new connection sends the full state both ways
        queue += [(b, a, models[a].encode_full()), (a, b, models[b].encode_full())]
    deliver_all()
    for _ in range(n + 1):  # periodic full gossip until nothing improves
        for i in range(n):
            queue.extend((nb, i, models[i].encode_full()) for nb in neighbours[i])
        if not deliver_all():
            break
    else:
        pytest.fail("gossip did not settle")

    truth = {names[i]: view(models[i])[names[i]] for i in range(n)}
    for model in models:
        assert view(model) == truth


small_pool = st.sampled_from([A, B, C, D, E])
pool_updates = st.lists(
    st.tuples(
        st.builds(ps, small_pool, st.integers(1, 3), st.integers(0, 4)),
        st.lists(st.builds(cs, small_pool, st.booleans()), max_size=4),
    ),
    max_size=5,
)


@given(st.lists(pool_updates, max_size=8), st.booleans())
def test_no_unreachable_peer_outlives_an_update(updates: list, linked: bool) -> None:
    # apply_update collects garbage only when a peer is new or lost a connection: check
    # that a full collection after any update never finds anything left behind.
    model = make_peers(A)
    if linked:
        connect(model, B, uid=2)
    for update in updates:
        model.apply_update(update)
        assert model.garbage_collect() == []


# ---------------------------------------------------------------- bounds

BOUND = getattr(topology, "MAX_PEERS", 4096)


def _wide_update(first: int, count: int, via: int = B) -> bytes:
    """`via` claims connections to `count` new peers, which each claim one back."""
    hub = (ps(via, 2000, 50), [cs(A)] + [cs(first + i) for i in range(count)])
    return encode_topology([hub] + [(ps(first + i, 5000 + i, 1), [cs(via)]) for i in range(count)])


def test_an_update_that_would_exceed_the_peer_bound_is_refused_whole() -> None:
    # A 10 MB topology frame names ~200k made-up peers: seconds of CPU per frame and about
    # 1 KB of state each, from one connection. Meshes stay far below topology.MAX_PEERS.
    model = make_peers()
    connect(model, B, 2000)
    before = model.encode_full()
    with pytest.raises(WireError, match="peers"):
        model.apply_update(_wide_update(0x03_00_00_00_00_00, BOUND))
    assert model.encode_full() == before  # nothing changed
    model.apply_update(_wide_update(0x03_00_00_00_00_00, 100))  # a big but honest mesh is fine
    assert len(model) == 102


def test_peers_added_over_several_updates_are_bounded_too() -> None:
    model = Peers(A, "a", 1000, 1, rng=random.Random(0), max_peers=300)
    connect(model, B, 2000)
    model.apply_update(_wide_update(0x03_00_00_00_00_00, 200))
    with pytest.raises(WireError, match="peers"):
        model.apply_update(_wide_update(0x04_00_00_00_00_00, 200))
    assert len(model) == 202


def test_a_payload_with_more_entries_than_the_bound_is_refused_while_decoding() -> None:
    payload = encode_topology([(ps(0x03_00_00_00_00_00 + i, 1 + i, 1), []) for i in range(BOUND + 1)])
    with mock.patch.object(topology, "_peer_summary", wraps=topology._peer_summary) as read:
        with pytest.raises(WireError, match="peers"):
            topology.decode_topology_lazily(payload)
    assert read.call_count <= BOUND + 1


def test_a_connection_list_longer_than_the_bound_is_refused() -> None:
    payload = encode_topology([(ps(B, 2000, 1), [cs(0x03_00_00_00_00_00 + i) for i in range(BOUND + 1)])])
    with pytest.raises(WireError, match="connections"):
        decode_topology(payload)
