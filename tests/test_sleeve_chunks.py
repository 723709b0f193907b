"""sleeve.chunks: big datagrams cut into path-sized chunks and put back together."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.errors import WireError
from sleeve.chunks import HEADER_SIZE, MARKER, PENDING_TIMEOUT, Reassembler, is_chunk, split
from sleeve.crypto import seq_field

NAME = bytes.fromhex("020000000001")


@given(st.binary(min_size=1, max_size=20_000), st.integers(HEADER_SIZE + 1, 1472), st.randoms())
def test_any_order_of_chunks_reassembles(data: bytes, segment: int, rnd) -> None:  # type: ignore[no-untyped-def]
    if -(-len(data) // (segment - HEADER_SIZE)) > 64:
        with pytest.raises(ValueError):
            split(data, NAME, 7, segment)
        return
    pieces = split(data, NAME, 7, segment)
    assert all(len(p) == segment for p in pieces[:-1]) and len(pieces[-1]) <= segment
    assert all(is_chunk(p) for p in pieces)
    rnd.shuffle(pieces)
    r = Reassembler()
    results = [r.add(p, 0.0) for p in pieces]
    assert results[-1] == data and all(x is None for x in results[:-1]) and len(r) == 0


def test_sleeve_datagrams_are_never_taken_for_chunks() -> None:
    # Plain: a frame's source peer follows the sender; encrypted: the sequence number.
    assert not is_chunk(NAME + bytes.fromhex("020000000002") + bytes(20))
    for seq in (0, 1, 65535, 2**40):
        for df in (False, True):
            assert not is_chunk(NAME + seq_field(seq, df) + bytes(40))
    assert MARKER[0] & 1  # the group bit: no peer (MAC-like) name has it


def test_incomplete_messages_expire() -> None:
    r = Reassembler()
    first = split(bytes(5000), NAME, 1, 1472)[0]
    assert r.add(first, 0.0) is None and len(r) == 1
    r.expire(PENDING_TIMEOUT + 0.1)
    assert len(r) == 0 and r.expired == 1


def test_bad_chunks_are_refused() -> None:
    r = Reassembler()
    with pytest.raises(WireError):
        r.add(NAME + MARKER + b"\x00", 0.0)
    bad = bytearray(split(bytes(3000), NAME, 1, 1472)[0])
    bad[16], bad[17] = 5, 3  # index 5 of 3
    with pytest.raises(WireError):
        r.add(bytes(bad), 0.0)


def _chunk(message_id: int, index: int, count: int, size: int) -> bytes:
    return NAME + MARKER + message_id.to_bytes(4, "big") + bytes((index, count)) + bytes(size)


def _held(r: Reassembler) -> int:
    return sum(len(p) for e in r._pending.values() for p in e.parts.values())


def test_pending_chunks_are_bounded_in_bytes() -> None:
    # 256 half-sent messages of 60 KB chunks held ~1 GB (64 chunks each) for a second:
    # spoofing a known pyweave peer's name in plain datagrams was enough.
    r = Reassembler()
    for message_id in range(256):
        for index in range(5):
            try:
                r.add(_chunk(message_id, index, 64, 60_000), 0.0)
            except WireError:
                pass
    assert _held(r) <= 16 * 1024 * 1024


def test_pending_bytes_have_a_ceiling_of_their_own() -> None:
    r = Reassembler(max_pending_bytes=100_000)
    for message_id in range(50):
        r.add(_chunk(message_id, 0, 2, 30_000), 0.0)
        assert r.pending_bytes == _held(r) <= 100_000
    assert r.add(_chunk(49, 1, 2, 5), 0.0) == bytes(30_005)  # the newest survive


def test_a_message_larger_than_any_datagram_is_refused() -> None:
    r = Reassembler()
    assert r.add(_chunk(1, 0, 64, 60_000), 0.0) is None
    with pytest.raises(WireError):
        r.add(_chunk(1, 1, 64, 60_000), 0.0)
    assert len(r) == 0 and r.pending_bytes == 0  # and forgotten


def test_a_repeated_chunk_replaces_its_piece() -> None:
    r = Reassembler()
    for _ in range(100):
        r.add(_chunk(1, 0, 2, 1000), 0.0)
    assert _held(r) == 1000
    assert r.add(_chunk(1, 1, 2, 10), 0.0) == bytes(1010)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4), st.integers(1, 5), st.integers(0, 30_000)),
                max_size=60))
def test_pending_bytes_are_what_is_held(chunks: list[tuple[int, int, int, int]]) -> None:
    r = Reassembler(max_pending_bytes=80_000)
    for message_id, index, count, size in chunks:
        try:
            r.add(_chunk(message_id, index, count, size), 0.0)
        except WireError:
            pass
        assert r.pending_bytes == _held(r) and (r.pending_bytes <= 80_000 or len(r) == 1)
