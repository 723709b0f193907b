"""Structure-aware mutation of seed inputs, shared by the hypothesis tests and bench/fuzz.py.

Random bytes rarely get past a length prefix or a gob type id, so most inputs are a real
message (a seed) with a few small edits: the edits keep the framing intact often enough
to reach the code behind it, and the interesting values (0, -1, 2^31, 2^63, gob's
multi-byte counts) are the ones that break bounds checks. An edit is a plain
``(op, position, value)`` triple so that hypothesis can draw and shrink it.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

Op = tuple[int, int, int]

INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x07, 0x0F, 0x10, 0x20, 0x3F, 0x40, 0x7E, 0x7F, 0x80, 0x81, 0xF8,
                     0xFA, 0xFC, 0xFE, 0xFF)
# Encodings that make a length, count or type id huge, zero or negative.
INTERESTING_WORDS = (
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\x80\x00\x00\x00",
    b"\x00\x00\xff\xff",
    b"\x00\xa0\x00\x00",
    b"\xfc\x7f\xff\xff\xff",  # gob uint 2^31 - 1
    b"\xf8\xff\xff\xff\xff\xff\xff\xff\xff",  # gob uint 2^64 - 1
    b"\xf8\x7f\xff\xff\xff\xff\xff\xff\xff",
    b"\xfe\x01\x00",  # gob uint 256
    b"\xfd\x01\x00\x00",
    b"\xff\x81",  # gob int -65: a type definition
    b"\x01",
    b"\x00",
)
N_OPS = 12


def apply(seed: bytes, ops: Sequence[Op], pool: Sequence[bytes] = (), max_size: int = 1 << 16) -> bytes:
    """``seed`` with the edits applied in order; ``pool`` supplies splices."""
    data = bytearray(seed)
    for op, pos, value in ops:
        n = len(data)
        op %= N_OPS
        at = pos % (n + 1)
        if op == 0 and n:  # flip one bit
            data[at % n] ^= 1 << (value & 7)
        elif op == 1 and n:  # an interesting byte
            data[at % n] = INTERESTING_BYTES[value % len(INTERESTING_BYTES)]
        elif op == 2 and n:  # any byte
            data[at % n] = value & 0xFF
        elif op == 3 and n:  # delete a run
            del data[at : at + 1 + value % 32]
        elif op == 4:  # insert a run of one byte
            data[at:at] = bytes((value & 0xFF,)) * (1 + (pos >> 8) % 16)
        elif op == 5 and n:  # duplicate a chunk in place
            chunk = data[at : at + 1 + value % 64]
            data[at:at] = chunk
        elif op == 6:  # truncate
            del data[at:]
        elif op == 7:  # overwrite with an interesting word
            word = INTERESTING_WORDS[value % len(INTERESTING_WORDS)]
            data[at : at + len(word)] = word
        elif op == 8 and pool:  # splice in part of another seed
            other = pool[value % len(pool)]
            start = (pos >> 4) % (len(other) + 1)
            data[at:] = other[start:]
        elif op == 9 and n:  # nudge a byte up or down
            data[at % n] = (data[at % n] + (1 if value & 1 else -1)) & 0xFF
        elif op == 10 and n >= 2:  # nudge a 16-bit big-endian field
            i = at % (n - 1)
            (v,) = struct.unpack_from(">H", data, i)
            struct.pack_into(">H", data, i, (v + (value % 33) - 16) & 0xFFFF)
        elif op == 11:  # append random-ish bytes
            rng = random.Random(pos ^ (value << 16))
            data += rng.randbytes(1 + value % 64)
        if len(data) > max_size:
            del data[max_size:]
    return bytes(data)


def random_ops(rng: random.Random, n_max: int = 8) -> list[Op]:
    """A few random edits; most inputs get one or two, as fuzzers find works best."""
    count = 1 + min(int(rng.expovariate(0.6)), n_max - 1)
    return [(rng.randrange(N_OPS), rng.getrandbits(24), rng.getrandbits(16)) for _ in range(count)]


def mutate(rng: random.Random, seeds: Sequence[bytes], max_size: int = 1 << 16) -> bytes:
    """One random input: mostly a mutated seed, sometimes random bytes."""
    if not seeds or rng.random() < 0.04:
        return rng.randbytes(rng.randrange(0, 256))
    seed = seeds[rng.randrange(len(seeds))]
    return apply(seed, random_ops(rng), seeds, max_size)
