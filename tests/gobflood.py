"""Hostile gob input for the bound tests: floods of type definitions, built fast."""

from __future__ import annotations

from router.gob import INT, Encoder, Field, StructType, encode_int, encode_uint

FIRST_ID = 64


def slice_definition(type_id: int, elem: int = 6) -> bytes:
    """One definition message: type `type_id` is a slice of `elem` ([]string by default).

    Hand-encoded (wireType{SliceT: sliceType{CommonType{Id}, Elem}}) because a flood
    of 20k of them through Encoder would dominate the test's run time.
    """
    body = encode_int(-type_id) + b"\x02\x01\x02" + encode_int(type_id) + b"\x00\x01" + encode_int(elem)
    body += b"\x00\x00"
    return encode_uint(len(body)) + body


def definition_flood(count: int, first: int = FIRST_ID) -> bytes:
    return b"".join(slice_definition(first + i) for i in range(count))


def wide_struct_definition(type_id: int, fields: int) -> bytes:
    """A struct definition with `fields` int fields: a few big messages instead of many small."""
    wide = StructType(f"Wide{type_id}", tuple(Field(f"F{i}", INT) for i in range(fields)))
    return Encoder(type_ids={wide: type_id}).definitions(wide)
