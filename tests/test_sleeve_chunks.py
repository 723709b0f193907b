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
