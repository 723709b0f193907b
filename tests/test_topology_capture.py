"""Topology gossip from real Weave Net 2.8 routers (shared/reference/captures)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from unittest import mock

import pytest

from router import topology
from router.gob import STRING_MAP, Decoder, decode_int, decode_uint
from router.peername import parse_peer_name
from router.protocol import GOSSIP_TAGS, FrameReader, decode_gossip, split_message
from router.routes import Routes
from router.topology import (
    CONN_LIST,
    CONN_SUMMARY,
    PEER_SUMMARY,
    ConnectionSummary,
    Peers,
    PeerSummary,
    decode_topology,
    encode_topology,
    supersedes,
)
from tests.captures import tcp_streams

CAPTURES = {
    "plain-startup.pcap": ("02:98:00:00:00:0", "wv-"),
    "ipam-dns.pcap": ("02:99:00:00:00:0", "wv"),
}
HEADER = b"weave\x01\x02"


@dataclass
class Captured:
    src_ip: str
    dst_ip: str
    features: dict[str, str]
    sender: int
    payload: bytes


def connection_streams(capture: str) -> list[tuple[object, dict[str, str], list[bytes]]]:
    """(stream, feature map, later frames) for every mesh TCP direction."""
    out = []
    for stream in tcp_streams(capture):
        assert stream.data[:7] == HEADER
        assert stream.data[7] == 0  # no encryption
        frames = FrameReader().feed(stream.data[8:])
        out.append((stream, Decoder(frames[0]).decode(STRING_MAP), frames[1:]))
    return out


def topology_messages(capture: str) -> list[Captured]:
    out = []
    for stream, features, frames in connection_streams(capture):
        for frame in frames:
            split = split_message(frame)
            assert split is not None
            tag, body = split
            if tag not in GOSSIP_TAGS:
                continue
            msg = decode_gossip(tag, body)
            if msg.channel == "topology":
                out.append(Captured(stream.src[0], stream.dst[0], features, msg.src, msg.payload))
    return out


def sender_type_ids(payload: bytes) -> dict:
    """The sending process's gob ids: peerSummary is defined first, then its slice's element."""
    _, pos = decode_uint(payload, 0)
    first, _ = decode_int(payload, pos)
    assert first < 0, "a fresh encoder starts with a definition"
    return {PEER_SUMMARY: -first, CONN_SUMMARY: -first + 1, CONN_LIST: -first + 2}


@pytest.fixture(scope="module", params=sorted(CAPTURES))
def capture(request: pytest.FixtureRequest) -> tuple[str, list[Captured]]:
    return request.param, topology_messages(request.param)


def test_every_topology_payload_decodes_to_the_three_routers(capture: tuple[str, list[Captured]]) -> None:
    name, messages = capture
    prefix, nick = CAPTURES[name]
    names = {parse_peer_name(f"{prefix}{i}"): f"{nick}{i}" for i in (1, 2, 3)}
    assert len(messages) >= 20
    seen_peers, seen_links = set(), set()
    for msg in messages:
        entries = decode_topology(msg.payload)
        assert entries, "Weave never gossips an empty topology"
        assert msg.sender == parse_peer_name(msg.features["Name"])
        for summary, conns in entries:
            assert names[summary.name] == summary.nickname
            assert summary.uid != 0 and summary.has_short_id
            seen_peers.add(summary.name)
            for conn in conns:
                assert conn.name in names and conn.name != summary.name
                assert conn.remote_tcp_addr.startswith("10.")
                seen_links.add((summary.name, conn.name))
    assert seen_peers == set(names)
    assert seen_links == {(a, b) for a in names for b in names if a != b}


def test_uids_and_short_ids_agree_with_feature_maps(capture: tuple[str, list[Captured]]) -> None:
    _, messages = capture
    features = {parse_peer_name(m.features["Name"]): m.features for m in messages}
    assert len(features) == 3
    checked = 0
    for msg in messages:
        for summary, _ in decode_topology(msg.payload):
            feats = features[summary.name]
            assert summary.uid == int(feats["UID"])
            assert summary.short_id == int(feats["ShortID"])
            checked += 1
    assert checked > 40


def test_golden_payload_reencodes_byte_identically() -> None:
    """gob.md §9.3: wv-2's first topology gossip to wv-1."""
    first = topology_messages("plain-startup.pcap")[0]
    assert (first.src_ip, first.dst_ip) == ("10.98.0.2", "10.98.0.1")
    assert len(first.payload) == 312
    entries = decode_topology(first.payload)
    assert entries == [
        (PeerSummary(0x029800000001, "wv-1", 16688643072860935279, 0, 3759, True), []),
        (
            PeerSummary(0x029800000002, "wv-2", 8495489660513727374, 1, 3234, True),
            [ConnectionSummary(0x029800000001, "10.98.0.1:6783", True, False)],
        ),
    ]
    ids = {PEER_SUMMARY: 75, CONN_SUMMARY: 76, CONN_LIST: 77}
    assert sender_type_ids(first.payload) == ids
    assert encode_topology(entries, ids) == first.payload


def test_captured_payloads_take_the_fast_path(capture: tuple[str, list[Captured]]) -> None:
    for msg in capture[1]:
        fast = topology._decode_known_layout(msg.payload)
        assert fast is not None
        with mock.patch.object(topology, "_decode_known_layout", lambda _: None):
            generic = decode_topology(msg.payload)
        assert [(peer, conns()) for peer, conns in fast] == generic


def test_every_captured_payload_round_trips(capture: tuple[str, list[Captured]]) -> None:
    _, messages = capture
    for msg in messages:
        entries = decode_topology(msg.payload)
        assert decode_topology(encode_topology(entries)) == entries
        # With the sender's own type ids (they differ per router) the bytes are Go's.
        assert encode_topology(entries, sender_type_ids(msg.payload)) == msg.payload


def router_model(capture: str, router_ip: str, messages: list[Captured], order_seed: int | None) -> Peers:
    """Rebuild one router's view: its own connections from the handshakes, then the gossip it received."""
    streams = connection_streams(capture)
    own = next(f for s, f, _ in streams if s.src[0] == router_ip)
    model = Peers(
        parse_peer_name(own["Name"]),
        own["NickName"],
        int(own["UID"]),
        int(own["ShortID"]),
        rng=random.Random(0),
    )
    for stream, feats, _ in streams:
        if stream.dst[0] != router_ip:
            continue
        remote = parse_peer_name(feats["Name"])
        model.register_remote(remote, feats["NickName"], int(feats["UID"]), int(feats["ShortID"]))
        outbound = stream.src[1] == 6783  # the remote accepted, so we dialled
        model.add_connection(remote, f"{stream.src[0]}:{stream.src[1]}", outbound)
    for remote in list(model.ourself.connections):
        model.set_connection_established(remote)
    received = [m.payload for m in messages if m.dst_ip == router_ip]
    assert received
    if order_seed is not None:
        random.Random(order_seed).shuffle(received)
    for payload in received:
        model.apply_update(payload)
    return model


@pytest.mark.parametrize("order_seed", [None, 1, 2, 3])
def test_each_router_ends_with_the_full_three_mesh(
    capture: tuple[str, list[Captured]], order_seed: int | None
) -> None:
    name, messages = capture
    latest: dict[int, tuple[PeerSummary, frozenset[ConnectionSummary]]] = {}
    for msg in messages:
        for summary, conns in decode_topology(msg.payload):
            if summary.name not in latest or supersedes(summary, latest[summary.name][0]):
                latest[summary.name] = (summary, frozenset(conns))
    routers = sorted({m.dst_ip for m in messages})
    assert len(routers) == 3
    for ip in routers:
        model = router_model(name, ip, messages, order_seed)
        assert len(model) == 3
        me = model.ourself
        # Our own entry, rebuilt from the handshakes, matches what the router gossiped.
        assert (me.summary(), frozenset(me.connections.values())) == latest[me.name]
        for peer in model.by_name.values():
            assert (peer.summary(), frozenset(peer.connections.values())) == latest[peer.name]
            assert set(peer.connections) == set(model) - {peer.name}
            assert all(c.established for c in peer.connections.values())
        routes = Routes.compute(model)
        others = set(model) - {me.name}
        assert {dst: routes.next_hop(dst) for dst in others} == {dst: dst for dst in others}
        assert sorted(routes.broadcast(me.name)) == sorted(others)
        for origin in others:
            assert routes.broadcast(origin) == []  # in a full mesh the origin reaches everyone itself
