"""The BoltDB reader against two files written by live Weave routers, and against damage."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam_crdt.boltdb import (
    BRANCH_PAGE,
    LEAF_PAGE,
    MAGIC,
    MAX_DEPTH,
    META_PAGE,
    BoltDB,
    BoltError,
    Reason,
    fnv64a,
)

CAPTURES = Path(__file__).parent / "data" / "captures" / "weave-db"
PAGE = 4096


def real(host: str) -> bytes:
    return (CAPTURES / f"{host}-weavedata.db").read_bytes()


# ------------------------------------------------------------ a small BoltDB writer


def meta_page(pgid: int, root: int, high_water: int, txid: int, page_size: int = PAGE) -> bytes:
    body = struct.pack("<IIIIQQQQQ", MAGIC, 2, page_size, 0, root, 0, high_water - 1, high_water, txid)
    page = struct.pack("<QHHI", pgid, META_PAGE, 0, 0) + body + struct.pack("<Q", fnv64a(body))
    return page.ljust(page_size, b"\0")


def leaf_page(pgid: int, items: list[tuple[bytes, bytes, int]], overflow: int = 0, pad: bool = True) -> bytes:
    """items: (key, value, element flags)."""
    head = struct.pack("<QHHI", pgid, LEAF_PAGE, len(items), overflow)
    elements, data = b"", b""
    for i, (key, value, flags) in enumerate(items):
        pos = (len(items) - i) * 16 + len(data)
        elements += struct.pack("<IIII", flags, pos, len(key), len(value))
        data += key + value
    page = head + elements + data
    return page.ljust(PAGE * (overflow + 1), b"\0") if pad else page


def branch_page(pgid: int, children: list[tuple[bytes, int]]) -> bytes:
    head = struct.pack("<QHHI", pgid, BRANCH_PAGE, len(children), 0)
    elements, data = b"", b""
    for i, (key, child) in enumerate(children):
        pos = (len(children) - i) * 16 + len(data)
        elements += struct.pack("<IIQ", pos, len(key), child)
        data += key
    return (head + elements + data).ljust(PAGE, b"\0")


def database(pages: dict[int, bytes], root: int = 2) -> bytes:
    """Meta pages 0 and 1 (1 the newer) over the given pages; the free-list page is left empty."""
    high_water = max(pgid + len(p) // PAGE for pgid, p in pages.items()) + 1
    out = bytearray(meta_page(0, root, high_water, 1) + meta_page(1, root, high_water, 2))
    out += b"\0" * (PAGE * high_water - len(out))
    for pgid, page in pages.items():
        out[pgid * PAGE : pgid * PAGE + len(page)] = page
    return bytes(out)


def inline_bucket(items: list[tuple[bytes, bytes, int]]) -> bytes:
    return struct.pack("<QQ", 0, 0) + leaf_page(0, items, pad=False)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def reason(data: bytes, *path: bytes) -> Reason:
    with pytest.raises(BoltError) as info:
        BoltDB(data).bucket(*path)
    return info.value.reason


# ------------------------------------------------------------ the real files


@pytest.mark.parametrize(("host", "txid"), [("h1", 24), ("h2", 18)])
def test_reads_weaves_files(host: str, txid: int) -> None:
    db = BoltDB(real(host))
    assert (db.page_size, db.meta.txid, db.meta.root) == (PAGE, txid, 4)
    assert db.root().keys() == [b"top"]
    top = db.bucket(b"top")
    assert top.keys() == [b"directPeers", b"ownedAddresses", b"peername", b"ring", b"version"]
    assert top.get(b"version") == b"\x01\x00"
    assert top.get(b"peername") == bytes.fromhex("090600fa02990000000" + host[1])
    assert top.get(b"nothere") is None


def test_a_torn_newer_meta_falls_back_to_the_older_one() -> None:
    # bbolt writes the meta page last; a torn one means its transaction never committed.
    data = real("h1")
    broken = patch(data, 0x40, b"\xff")  # meta 0 (txid 24): its txid field
    db = BoltDB(broken)
    assert db.meta.txid == 23 and db.meta.root == 2
    assert db.bucket(b"top").keys() == BoltDB(data).bucket(b"top").keys()


def test_both_metas_damaged() -> None:
    data = patch(patch(real("h1"), 0x40, b"\xff"), PAGE + 0x40, b"\xff")
    assert reason(data) == Reason.BAD_CHECKSUM
    assert reason(patch(patch(real("h1"), 0x10, b"\0"), PAGE + 0x10, b"\0")) == Reason.BAD_MAGIC
    assert reason(b"") == Reason.TRUNCATED
    assert reason(b"SQLite format 3\0" + b"\0" * 8192) == Reason.BAD_MAGIC


def test_bad_version_and_page_size() -> None:
    page = bytearray(meta_page(0, 2, 3, 1))
    page[20:24] = struct.pack("<I", 1)  # bolt's version 1 (2014) had another layout
    page[72:80] = struct.pack("<Q", fnv64a(bytes(page[16:72])))
    assert reason(bytes(page) + b"\0" * PAGE * 2) == Reason.BAD_VERSION
    odd = meta_page(0, 2, 3, 1, page_size=3000)
    assert reason(odd + b"\0" * PAGE * 2) == Reason.BAD_PAGE_SIZE


def test_truncated_file() -> None:
    data = real("h1")
    assert reason(data[:100]) == Reason.TRUNCATED
    # Both metas are fine, but pages they count on are missing.
    assert reason(data[: 4 * PAGE]) == Reason.TRUNCATED


# ------------------------------------------------------------ trees we build


def test_branch_pages_and_inline_buckets() -> None:
    sub = inline_bucket([(b"a", b"1", 0), (b"b", b"2", 0)])
    data = database({
        2: branch_page(2, [(b"k0", 3), (b"k5", 4)]),
        3: leaf_page(3, [(b"k0", b"zero", 0), (b"k1", sub, 1)]),
        4: leaf_page(4, [(b"k5", b"x" * 5000, 0)], overflow=1),
    })  # fmt: skip
    db = BoltDB(data)
    root = db.root()
    assert root.keys() == [b"k0", b"k1", b"k5"]
    assert root.get(b"k0") == b"zero" and root.get(b"k5") == b"x" * 5000
    assert root.get(b"k1") is None  # a bucket, as bbolt's Get
    assert dict(db.bucket(b"k1").items()) == {b"a": b"1", b"b": b"2"}
    with pytest.raises(BoltError) as info:
        root.bucket(b"k0")
    assert info.value.reason == Reason.NOT_A_BUCKET


def test_cycle() -> None:
    assert reason(database({2: branch_page(2, [(b"a", 2)])})) == Reason.CYCLE
    # Reaching one leaf from two branch elements is as wrong, and would double the work.
    twice = database({2: branch_page(2, [(b"a", 3), (b"b", 3)]), 3: leaf_page(3, [(b"a", b"", 0)])})
    assert reason(twice) == Reason.CYCLE
    # And in the real file: the root leaf page made a branch pointing at itself.
    data = real("h1")
    selfref = patch(
        data, 4 * PAGE, struct.pack("<QHHI", 4, BRANCH_PAGE, 1, 0) + struct.pack("<IIQ", 16, 0, 4)
    )
    assert reason(selfref) == Reason.CYCLE


def test_too_deep() -> None:
    depth = MAX_DEPTH + 2
    pages = {2 + i: branch_page(2 + i, [(b"a", 3 + i)]) for i in range(depth)}
    pages[2 + depth] = leaf_page(2 + depth, [(b"a", b"", 0)])
    assert reason(database(pages)) == Reason.TOO_DEEP


def test_page_checks() -> None:
    leaf = leaf_page(2, [(b"a", b"1", 0)])
    assert reason(database({2: branch_page(2, [(b"a", 9)])})) == Reason.PAGE_OUT_OF_RANGE
    assert reason(database({2: branch_page(2, [(b"a", 0)])})) == Reason.PAGE_OUT_OF_RANGE
    assert reason(database({2: patch(leaf, 0, struct.pack("<Q", 7))})) == Reason.BAD_PAGE_ID
    assert reason(database({2: patch(leaf, 8, struct.pack("<H", 0x10))})) == Reason.UNKNOWN_FLAGS
    assert reason(database({2: patch(leaf, 16, struct.pack("<I", 4))})) == Reason.UNKNOWN_FLAGS
    assert reason(database({2: patch(leaf, 12, struct.pack("<I", 5))})) == Reason.PAGE_OUT_OF_RANGE
    assert reason(database({2: patch(leaf, 10, struct.pack("<H", 300))})) == Reason.BAD_ELEMENT
    assert reason(database({2: patch(leaf, 28, struct.pack("<I", 1 << 31))})) == Reason.BAD_ELEMENT
    unsorted = leaf_page(2, [(b"b", b"", 0), (b"a", b"", 0)])
    assert reason(database({2: unsorted})) == Reason.UNSORTED
    short = database({2: leaf_page(2, [(b"s", b"short", 1)])})
    assert reason(short, b"s") == Reason.BAD_BUCKET


def test_too_large() -> None:
    with pytest.raises(BoltError) as info:
        BoltDB(b"\0" * (64 * 1024 * 1024 + 1))
    assert info.value.reason == Reason.TOO_LARGE


# ------------------------------------------------------------ mutations


def walk(db: BoltDB) -> int:
    """Every key of the file, sub-buckets included, the way a reader would go through it."""
    count = 0
    pending = [db.root()]
    while pending and count < 10_000:
        bucket = pending.pop()
        for key in bucket.keys():
            count += 1
            if bucket.get(key) is None:
                pending.append(bucket.bucket(key))
    return count


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    host=st.sampled_from(["h1", "h2"]),
    edits=st.lists(st.tuples(st.integers(0, 6 * PAGE - 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 6 * PAGE)),
)
def test_mutations_give_a_result_or_bolt_error(
    host: str, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(real(host))
    for offset, value in edits:
        data[offset] = value
    if cut is not None:
        del data[cut:]
    started = time.monotonic()
    try:
        walk(BoltDB(bytes(data)))
    except BoltError:
        pass
    assert time.monotonic() - started < 2


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 4 * PAGE))
def test_mutated_pages_near_the_tree(garbage: bytes, offset: int) -> None:
    # Aimed at the tree pages (2 to 5), where a random edit of the whole file rarely lands.
    data = bytearray(real("h1"))
    start = 2 * PAGE + offset
    data[start : start + len(garbage)] = garbage
    try:
        walk(BoltDB(bytes(data[: 6 * PAGE])))
    except BoltError:
        pass
