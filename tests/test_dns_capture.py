"""Every nameserver gossip message in the real Weave 2.8 captures decodes and re-encodes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from router.errors import WireError
from router.gob import Encoder, decode_all, decode_int, decode_uint
from router.peername import format_peer_name, parse_peer_name
from tests.captures import capture_path, tcp_streams
from tests.golden import NAMESERVER_FRAME
from weavedns.records import Nameserver
from weavedns.wire import (
    CHANNEL,
    DNS_GOSSIP,
    Entry,
    GossipMessage,
    NameserverWireError,
    decode_gossip,
    encode_gossip,
    format_addr,
    parse_addr,
)

WV1, WV2, WV3 = (parse_peer_name(f"02:99:00:00:00:0{i}") for i in (1, 2, 3))



@dataclass
class NameserverMessage:
    src: tuple[str, int]
    dst: tuple[str, int]
    tag: int
    sender: int
    payload: bytes


def nameserver_messages(name: str) -> list[NameserverMessage]:
    out = []
    for stream in tcp_streams(name):
        data = stream.data
        assert data[:7] == b"weave\x01\x02" and data[7] == 0
        pos = 8
        frames = []
        while pos < len(data):
            size = int.from_bytes(data[pos : pos + 4], "big")
            frames.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
        assert pos == len(data)
        for frame in frames[1:]:  # the first frame is the feature map
            if frame[0] not in (4, 5, 6):
                continue
            values = decode_all(frame[1:])
            if values[0] == CHANNEL:
                out.append(NameserverMessage(stream.src, stream.dst, frame[0], values[1], values[-1]))
    return out


def first_type_id(payload: bytes) -> int:
    """The id the sender gave GossipData: the first definition in the stream."""
    _, pos = decode_uint(payload, 0)
    type_id, _ = decode_int(payload, pos)
    assert type_id < 0, "a fresh stream starts with a type definition"
    return -type_id


@pytest.mark.parametrize(("capture", "count"), [("plain-startup.pcap", 6), ("ipam-dns.pcap", 14)])
def test_every_nameserver_message_decodes_and_reencodes(capture: str, count: int) -> None:
    messages = nameserver_messages(capture)
    assert len(messages) == count
    for msg in messages:
        decoded = decode_gossip(msg.payload)
        # Byte-exact: Weave sorts entries case-sensitively and uses a fresh encoder,
        # numbered from wherever that router's process had got to.
        assert encode_gossip(decoded, first_id=first_type_id(msg.payload)) == msg.payload
        assert decode_gossip(encode_gossip(decoded)) == decoded


def test_ipam_dns_capture_content() -> None:
    messages = nameserver_messages("ipam-dns.pcap")
    entries = {(m.tag, e) for m in messages for e in decode_gossip(m.payload).entries}
    alpha = {e for _, e in entries if e.hostname == "alpha.weave.local."}
    assert {(format_peer_name(e.origin), e.container_id, format_addr(e.addr)) for e in alpha} == {
        ("02:99:00:00:00:01", "cont11", "10.40.0.1"),
        ("02:99:00:00:00:03", "cont31", "10.40.128.1"),
    }
    beta = sorted((e for _, e in entries if e.hostname == "beta.weave.local."), key=lambda e: e.version)
    assert [(e.version, e.tombstone) for e in beta] == [(0, 0), (1, 1795241052)]
    assert {e.origin for e in beta} == {WV2}
    # Changes travel as broadcasts (tag 6); periodic/new-connection gossip (tag 4) was empty.
    assert {tag for tag, _ in entries} == {6}
    # The envelope's sender of a broadcast is the entries' origin.
    for m in messages:
        for e in decode_gossip(m.payload).entries:
            assert m.sender == e.origin


def test_capture_replayed_into_wv1_matches_its_report() -> None:
    """Feed wv1 what it received; its entries must equal wv1's own /report DNS section."""
    report = json.loads(capture_path("ipam-dns-report.json").read_text())["DNS"]
    incoming = [m for m in nameserver_messages("ipam-dns.pcap") if m.dst[0] == "10.201.0.1"]
    clock_now = max(decode_gossip(m.payload).timestamp for m in incoming)
    ns = Nameserver(WV1, lambda p: p in (WV1, WV2, WV3), clock=lambda: clock_now)
    ns.add_entry("alpha.weave.local.", "cont11", parse_addr("10.40.0.1"))
    for m in incoming:
        if m.tag == 6:
            ns.on_gossip_broadcast(m.sender, m.payload)
        else:
            ns.on_gossip(m.payload)
    assert ns.take_broadcasts() == []
    assert [e.to_report() for e in ns.entries()] == report["Entries"]
    assert ns.lookup("alpha.weave.local.") == (parse_addr("10.40.0.1"), parse_addr("10.40.128.1"))
    assert ns.lookup("beta.weave.local.") == ()


def test_golden_frame_from_gob_reference() -> None:
    assert int.from_bytes(NAMESERVER_FRAME[:4], "big") == len(NAMESERVER_FRAME) - 4
    channel, sender, payload = decode_all(NAMESERVER_FRAME[5:])
    assert (channel, sender) == (CHANNEL, 0x029800000002)
    assert decode_gossip(payload) == GossipMessage(1795238366, ())
    assert encode_gossip(GossipMessage(1795238366, ()), first_id=86) == payload
    assert first_type_id(payload) == 86  # wv-2 numbered GossipData 86, Entry 87, Entries 88


def test_entry_with_address_over_32_bits_rejected() -> None:
    good = encode_gossip(GossipMessage(5, (Entry("a.", WV1, "c", 1),)))
    bad = Encoder().encode(
        {"Timestamp": 5, "Entries": [{"ContainerID": "c", "Origin": WV1, "Addr": 1 << 32, "Hostname": "a."}]},
        DNS_GOSSIP,
    )
    assert decode_gossip(good).entries[0].addr == 1
    with pytest.raises(NameserverWireError, match="32 bits"):
        decode_gossip(bad)


def test_wrong_payload_type_rejected() -> None:
    with pytest.raises(WireError):
        decode_gossip(Encoder().encode("not gossip", DNS_GOSSIP.fields[0].type))
