"""A read-only reader of BoltDB files (bbolt's format, version 2), enough for Weave's state.

No maintained pure-Python BoltDB reader exists, and Weave's file needs only a sliver of
the format: the two meta pages, branch and leaf pages, buckets and inline buckets. This
module takes the file's bytes and gives back buckets of keys and values; it writes
nothing and never touches a file.

The input is treated as hostile (it may be damaged, or not Weave's at all): every offset
and count is checked against the bytes present before it is used, a tree may visit each
page once (which rules out cycles and bounds the work by the page count), and nesting is
bounded. Every problem raises `BoltError` with one of the `Reason` constants.

Layout facts (little-endian throughout):
- page header, 16 bytes: id u64, flags u16, count u16, overflow u32 (the pages after this
  one that belong to it);
- meta (after the header of pages 0 and 1): magic u32 0xED0CDAED, version u32 (2),
  page size u32, flags u32, root bucket (root pgid u64, sequence u64), freelist pgid u64,
  high-water pgid u64, txid u64, checksum u64 = FNV-1a 64 of the 56 bytes before it;
- branch element, 16 bytes: pos u32, ksize u32, child pgid u64; leaf element, 16 bytes:
  flags u32 (1: the value is a bucket), pos u32, ksize u32, vsize u32; `pos` counts from
  the element's own first byte;
- a bucket value: root pgid u64, sequence u64; root 0 means an inline bucket, whose leaf
  page follows in the value itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER_SIZE = 16
ELEMENT_SIZE = 16
BUCKET_HEADER_SIZE = 16
META_SIZE = 64
_META_CHECKSUMMED = 56

BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
BUCKET_LEAF = 0x01

# bbolt uses the OS page size: 4 KiB on most hosts, 16 or 64 KiB on some arm64/ppc64 ones.
PAGE_SIZES = (4096, 8192, 16384, 32768, 65536, 1024, 2048)
# Weave's file is a few pages; a file this big is not one we should hold in memory.
MAX_FILE_BYTES = 64 * 1024 * 1024
# A B+tree over MAX_FILE_BYTES of 1 KiB pages is under 10 levels deep.
MAX_DEPTH = 32
MAX_KEYS = 1 << 20

_HEADER = struct.Struct("<QHHI")
_META = struct.Struct("<IIIIQQQQQQ")
_BRANCH = struct.Struct("<IIQ")
_LEAF = struct.Struct("<IIII")
_BUCKET = struct.Struct("<QQ")

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_U64 = (1 << 64) - 1


class Reason(StrEnum):
    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_PAGE_SIZE = "bad_page_size"
    BAD_CHECKSUM = "bad_checksum"
    BAD_META = "bad_meta"
    PAGE_OUT_OF_RANGE = "page_out_of_range"
    BAD_PAGE_ID = "bad_page_id"
    UNKNOWN_FLAGS = "unknown_flags"
    BAD_ELEMENT = "bad_element"
    CYCLE = "cycle"
    TOO_DEEP = "too_deep"
    TOO_MANY_KEYS = "too_many_keys"
    UNSORTED = "unsorted"
    NOT_A_BUCKET = "not_a_bucket"
    BAD_BUCKET = "bad_bucket"


class BoltError(ValueError):
    """A file that is not a sound BoltDB file; `reason` says which check failed."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"BoltDB: {message}")
        self.reason = reason


def fnv64a(data: bytes | memoryview) -> int:
    h = _FNV_OFFSET
    for b in bytes(data):
        h = ((h ^ b) * _FNV_PRIME) & _U64
    return h


@dataclass(frozen=True)
class Meta:
    page_size: int
    root: int
    freelist: int
    high_water: int
    txid: int


def _parse_meta(data: bytes, offset: int, expected_id: int) -> Meta:
    if offset + PAGE_HEADER_SIZE + META_SIZE > len(data):
        raise BoltError(Reason.TRUNCATED, f"file too short for meta page {expected_id}")
    pid, flags, _count, _overflow = _HEADER.unpack_from(data, offset)
    body = offset + PAGE_HEADER_SIZE
    fields = _META.unpack_from(data, body)
    magic, version, page_size, mflags, root, _seq, freelist, hwm, txid, checksum = fields
    if magic != MAGIC:
        raise BoltError(Reason.BAD_MAGIC, f"meta page {expected_id}: magic {magic:#010x}, not {MAGIC:#010x}")
    if version != VERSION:
        raise BoltError(Reason.BAD_VERSION, f"meta page {expected_id}: version {version}, not {VERSION}")
    if fnv64a(data[body : body + _META_CHECKSUMMED]) != checksum:
        raise BoltError(Reason.BAD_CHECKSUM, f"meta page {expected_id}: checksum does not match")
    # Checked after the checksum, so these describe a meta page that bbolt really wrote.
    if pid != expected_id or flags != META_PAGE:
        raise BoltError(Reason.BAD_META, f"meta page {expected_id}: header says page {pid}, flags {flags:#x}")
    if page_size not in PAGE_SIZES:
        raise BoltError(Reason.BAD_PAGE_SIZE, f"meta page {expected_id}: page size {page_size}")
    if mflags != 0:
        raise BoltError(Reason.UNKNOWN_FLAGS, f"meta page {expected_id}: flags {mflags:#x}")
    if not 2 <= root < hwm or not 2 <= freelist < hwm:
        raise BoltError(
            Reason.PAGE_OUT_OF_RANGE,
            f"meta page {expected_id}: root {root} or freelist {freelist} outside pages 2..{hwm - 1}",
        )
    return Meta(page_size, root, freelist, hwm, txid)


def _choose_meta(data: bytes) -> Meta:
    """The newest meta page that checks out, as bbolt opens the file.

    A torn write of the newer meta is bbolt's normal crash case (its transaction was never
    committed), so the older one is then the state to read; only both failing is an error.
    """
    errors: list[BoltError] = []
    metas: list[Meta] = []
    try:
        metas.append(_parse_meta(data, 0, 0))
    except BoltError as exc:
        errors.append(exc)
    # Page 1 sits one page in; without a good page 0 we try each page size bbolt may use.
    sizes = (metas[0].page_size,) if metas else PAGE_SIZES
    for size in sizes:
        try:
            meta1 = _parse_meta(data, size, 1)
        except BoltError as exc:
            errors.append(exc)
            continue
        if meta1.page_size == size:
            metas.append(meta1)
            break
        wrong = f"meta page 1 at offset {size} says page size {meta1.page_size}"
        errors.append(BoltError(Reason.BAD_PAGE_SIZE, wrong))
    if not metas:
        raise errors[0]
    if len({m.page_size for m in metas}) > 1:
        raise BoltError(Reason.BAD_PAGE_SIZE, "the two meta pages disagree on the page size")
    return max(metas, key=lambda m: m.txid)


class BoltDB:
    """A BoltDB file's bytes, checked and ready to read."""

    def __init__(self, data: bytes) -> None:
        if len(data) > MAX_FILE_BYTES:
            raise BoltError(Reason.TOO_LARGE, f"file of {len(data)} bytes, more than {MAX_FILE_BYTES}")
        self.data = bytes(data)
        self.meta = _choose_meta(self.data)
        self.page_size = self.meta.page_size
        # bbolt grows the file before it writes pages, so every page below the high-water
        # mark is in a sound file; pages past the mark hold nothing live.
        self.page_count = self.meta.high_water
        if len(self.data) < self.page_count * self.page_size:
            raise BoltError(
                Reason.TRUNCATED,
                f"file of {len(self.data)} bytes, but the database has {self.page_count} pages "
                f"of {self.page_size}",
            )

    def root(self) -> Bucket:
        """The root bucket, whose keys are the top-level buckets."""
        return Bucket(self, self.meta.root, None)

    def bucket(self, *names: bytes) -> Bucket:
        """A bucket by its path from the root; `BoltError(NOT_A_BUCKET)` if it is absent."""
        b = self.root()
        for name in names:
            b = b.bucket(name)
        return b

    # ------------------------------------------------------------ pages

    def page(self, pgid: int) -> memoryview:
        """A page with its overflow pages, header included, after checking its header."""
        if not 2 <= pgid < self.page_count:
            raise BoltError(
                Reason.PAGE_OUT_OF_RANGE, f"page {pgid} is outside pages 2..{self.page_count - 1}"
            )
        offset = pgid * self.page_size
        pid, _flags, _count, overflow = _HEADER.unpack_from(self.data, offset)
        if pid != pgid:
            raise BoltError(Reason.BAD_PAGE_ID, f"page {pgid}: header says page {pid}")
        if pgid + overflow >= self.page_count:
            raise BoltError(
                Reason.PAGE_OUT_OF_RANGE, f"page {pgid}: {overflow} overflow pages run past the end"
            )
        return memoryview(self.data)[offset : offset + (overflow + 1) * self.page_size]


class Bucket:
    """One bucket's keys and values, in key order, read all at once.

    `root` is the bucket's root page, or None with `inline` holding an inline bucket's page.
    """

    def __init__(self, db: BoltDB, root: int | None, inline: memoryview | None, depth: int = 0) -> None:
        self._db = db
        self._depth = depth
        # key -> (is a bucket, value)
        self._items: dict[bytes, tuple[bool, bytes]] = {}
        self._last: bytes | None = None
        if root is None:
            assert inline is not None
            self._read_leaf(inline, "inline bucket")
        else:
            self._walk(root, set(), depth)

    def _walk(self, pgid: int, seen: set[int], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise BoltError(Reason.TOO_DEEP, f"tree deeper than {MAX_DEPTH} levels")
        if pgid in seen:
            # A sound tree reaches each page once; a second time means a loop or shared page.
            raise BoltError(Reason.CYCLE, f"page {pgid} is reached twice")
        seen.add(pgid)
        page = self._db.page(pgid)
        _pid, flags, count, _overflow = _HEADER.unpack_from(page)
        if flags == LEAF_PAGE:
            self._read_leaf(page, f"page {pgid}")
            return
        if flags != BRANCH_PAGE:
            raise BoltError(Reason.UNKNOWN_FLAGS, f"page {pgid}: flags {flags:#x} where a tree page belongs")
        if count == 0:
            raise BoltError(Reason.BAD_ELEMENT, f"branch page {pgid} has no elements")
        _check_fits(page, count, f"page {pgid}")
        for _key, child in _branch_elements(page, count, f"page {pgid}"):
            self._walk(child, seen, depth + 1)

    def _read_leaf(self, page: memoryview, where: str) -> None:
        _pid, flags, count, _overflow = _HEADER.unpack_from(page)
        if flags != LEAF_PAGE:
            raise BoltError(Reason.UNKNOWN_FLAGS, f"{where}: flags {flags:#x}, not a leaf page")
        if len(self._items) + count > MAX_KEYS:
            raise BoltError(Reason.TOO_MANY_KEYS, f"more than {MAX_KEYS} keys in one bucket")
        _check_fits(page, count, where)
        for key, eflags, value in _leaf_elements(page, count, where):
            if eflags & ~BUCKET_LEAF:
                raise BoltError(Reason.UNKNOWN_FLAGS, f"{where}: element flags {eflags:#x}")
            if self._last is not None and key <= self._last:
                raise BoltError(Reason.UNSORTED, f"{where}: keys out of order")
            self._last = key
            self._items[key] = (bool(eflags & BUCKET_LEAF), value)

    # ------------------------------------------------------------ reading

    def keys(self) -> list[bytes]:
        return list(self._items)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Plain key/value pairs (sub-buckets left out)."""
        return ((k, v) for k, (is_bucket, v) in self._items.items() if not is_bucket)

    def get(self, key: bytes) -> bytes | None:
        """A plain value, or None when the key is absent or names a bucket (as bbolt's Get)."""
        item = self._items.get(key)
        if item is None or item[0]:
            return None
        return item[1]

    def bucket(self, name: bytes) -> Bucket:
        item = self._items.get(name)
        if item is None or not item[0]:
            raise BoltError(Reason.NOT_A_BUCKET, f"no bucket {name!r}")
        value = item[1]
        if len(value) < BUCKET_HEADER_SIZE:
            raise BoltError(Reason.BAD_BUCKET, f"bucket {name!r}: value of {len(value)} bytes")
        if self._depth + 1 > MAX_DEPTH:
            raise BoltError(Reason.TOO_DEEP, f"buckets nested more than {MAX_DEPTH} deep")
        root, _sequence = _BUCKET.unpack_from(value)
        if root != 0:
            return Bucket(self._db, root, None, self._depth + 1)
        inline = memoryview(value)[BUCKET_HEADER_SIZE:]
        if len(inline) < PAGE_HEADER_SIZE:
            raise BoltError(Reason.BAD_BUCKET, f"inline bucket {name!r} too short for a page")
        return Bucket(self._db, None, inline, self._depth + 1)


def _check_fits(page: memoryview, count: int, where: str) -> None:
    if PAGE_HEADER_SIZE + count * ELEMENT_SIZE > len(page):
        raise BoltError(Reason.BAD_ELEMENT, f"{where}: {count} elements do not fit in the page")


def _branch_elements(page: memoryview, count: int, where: str) -> Iterator[tuple[bytes, int]]:
    """(key, child pgid) per element."""
    for i in range(count):
        at = PAGE_HEADER_SIZE + i * ELEMENT_SIZE
        pos, ksize, child = _BRANCH.unpack_from(page, at)
        yield _slice(page, at + pos, ksize, where), child


def _leaf_elements(page: memoryview, count: int, where: str) -> Iterator[tuple[bytes, int, bytes]]:
    """(key, flags, value) per element."""
    for i in range(count):
        at = PAGE_HEADER_SIZE + i * ELEMENT_SIZE
        flags, pos, ksize, vsize = _LEAF.unpack_from(page, at)
        key = _slice(page, at + pos, ksize, where)
        yield key, flags, _slice(page, at + pos + ksize, vsize, where)


def _slice(page: memoryview, start: int, size: int, where: str) -> bytes:
    if start + size > len(page):
        raise BoltError(Reason.BAD_ELEMENT, f"{where}: an element's data runs past the page")
    return bytes(page[start : start + size])
