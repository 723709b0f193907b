"""IPAM persistence: sqlite in a directory, durability, restarts, and discarding stale data."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from ipam_crdt.address import CIDR
from ipam_crdt.allocator import Allocator, AllocatorConfig, SeedMode
from ipam_crdt.errors import StoreError
from ipam_crdt.ring import Entry, Ring
from ipam_crdt.store import DB_FILE, MemoryStore, OwnedData, SqliteStore
from router.gob import decode_all

UNIVERSE = CIDR.parse("10.40.0.0/16")
P1, P2 = 0x020000000001, 0x020000000002


def a_ring(peer: int = P1) -> Ring:
    r = Ring(UNIVERSE.range().start, UNIVERSE.range().end, peer)
    r.claim_for_peers([P1, P2])
    return r


def allocator(directory: Path, name: int = P1, universe: CIDR = UNIVERSE, uid: int = 1) -> Allocator:
    return Allocator(AllocatorConfig(name, uid, universe, SeedMode((P1, P2)), store=SqliteStore(directory)))


def test_round_trip(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    ring = a_ring()
    ring.entries[0] = Entry(ring.entries[0].token, P1, 4, 100)
    store.save_ring(P1, ring)
    store.save_owned("c1", OwnedData(True, [CIDR.parse("10.40.0.1/16"), CIDR.parse("10.40.7.1/24")]))
    store.save_owned("weave:expose", OwnedData(False, [CIDR.parse("10.40.0.2/16")]))
    store.save_owned("gone", OwnedData(True, [CIDR.parse("10.40.0.3/16")]))
    store.save_owned("gone", None)
    store.close()

    loaded = SqliteStore(tmp_path).load(P1, UNIVERSE.range())
    assert loaded is not None
    assert loaded.ring.state() == ring.state() and loaded.ring.peer == P1
    assert loaded.owned == {
        "c1": OwnedData(True, [CIDR.parse("10.40.0.1/16"), CIDR.parse("10.40.7.1/24")]),
        "weave:expose": OwnedData(False, [CIDR.parse("10.40.0.2/16")]),
    }


def test_ring_is_stored_in_weaves_gob_format(tmp_path: Path) -> None:
    SqliteStore(tmp_path).save_ring(P1, a_ring())
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        (blob,) = db.execute("SELECT value FROM meta WHERE key = 'ring'").fetchone()
    [ring] = decode_all(blob)
    assert ring.type_name == "Ring" and ring["Seeds"] == [P1, P2] and len(ring["Entries"]) == 2


def test_nothing_stored(tmp_path: Path) -> None:
    assert SqliteStore(tmp_path / "new" / "dir").load(P1, UNIVERSE.range()) is None


@pytest.mark.parametrize(
    ("name", "universe", "message"),
    [
        (P2, UNIVERSE, "Deleting persisted data for peername 02:00:00:00:00:01"),
        (P1, CIDR.parse("10.41.0.0/16"),
         "Deleting persisted data for IPAM range 10.40.0.0-10.40.255.255; our range is 10.41.0.0-10.41.255.255"),
    ],
)  # fmt: skip
def test_stale_data_is_discarded_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: int, universe: CIDR, message: str
) -> None:
    store = SqliteStore(tmp_path)
    store.save_ring(P1, a_ring())
    store.save_owned("c1", OwnedData(True, [CIDR.parse("10.40.0.1/16")]))
    with caplog.at_level(logging.INFO, logger="ipam_crdt.store"):
        assert store.load(name, universe.range()) is None
    assert message in caplog.text
    # Gone for good: nothing comes back under the original name either.
    assert store.load(P1, UNIVERSE.range()) is None
    assert store.owned_snapshot() == {}


def test_schema_version_mismatch(tmp_path: Path) -> None:
    SqliteStore(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'version'")
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(tmp_path)


def test_unreadable_data_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStore(tmp_path)
    store.save_ring(P1, a_ring())
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("UPDATE meta SET value = x'0102' WHERE key = 'ring'")
    with caplog.at_level(logging.WARNING, logger="ipam_crdt.store"):
        assert store.load(P1, UNIVERSE.range()) is None
    assert "unreadable ring" in caplog.text


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open IPAM database"):
        SqliteStore(tmp_path)


def test_allocation_is_committed_before_it_is_returned(tmp_path: Path) -> None:
    alloc = allocator(tmp_path)
    cidr = alloc.allocate("c1", UNIVERSE).cidr
    # A separate connection (another process, after a crash) already sees it.
    other = SqliteStore(tmp_path)
    assert other.owned_snapshot() == {"c1": OwnedData(True, [cidr])}  # type: ignore[list-item]
    alloc.free("c1")
    assert other.owned_snapshot() == {}


def test_restart_keeps_addresses(tmp_path: Path) -> None:
    first = allocator(tmp_path, uid=1)
    a = first.allocate("a", UNIVERSE).cidr
    b = first.allocate("b", UNIVERSE).cidr
    first.free("a")
    c = first.allocate("c", UNIVERSE).cidr
    assert c == a  # lowest free first
    ring = first.ring.state()

    second = allocator(tmp_path, uid=2)
    assert second.ring.state() == ring
    assert second.owned_addresses() == {"b": [b], "c": [c]}
    assert second.allocate("b", UNIVERSE).cidr == b
    d = second.allocate("d", UNIVERSE).cidr
    assert d not in (b, c) and second.space.num_used() == 3


def test_restart_under_another_name_starts_afresh(tmp_path: Path) -> None:
    allocator(tmp_path, name=P1).allocate("a", UNIVERSE)
    again = allocator(tmp_path, name=P2)
    assert again.owned == {}
    assert again.ring.seeds == [P1, P2]  # rebuilt from the seed, not loaded


def test_memory_store_snapshot_is_independent() -> None:
    store = MemoryStore()
    store.save_ring(P1, a_ring())
    store.save_owned("c", OwnedData(True, [CIDR.parse("10.40.0.1/16")]))
    snap = store.snapshot()
    store.save_owned("c", None)
    assert snap.load(P1, UNIVERSE.range()) is not None
    assert snap.owned == {"c": OwnedData(True, [CIDR.parse("10.40.0.1/16")])}
    assert store.owned == {}


def _filled_database(directory: Path, containers: int = 120) -> Path:
    """A real IPAM database (written by the store) of more than five pages."""
    alloc = allocator(directory)
    for i in range(containers):
        alloc.allocate(f"container-{i:04d}-" + "x" * 200, UNIVERSE)
    alloc.store.close()  # type: ignore[attr-defined]
    return directory / DB_FILE


def test_corrupt_page_refuses_to_open_and_keeps_the_file(tmp_path: Path) -> None:
    path = _filled_database(tmp_path)
    with sqlite3.connect(path) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    assert pages > 5 and page_size <= 4096  # offset 16384 is a page, and not the last one
    with path.open("r+b") as f:
        f.seek(16384)
        f.write(b"\xa5" * 4096)  # the page at offset 16384, overwritten with junk
    damaged = path.read_bytes()
    with pytest.raises(StoreError, match=r"damaged.*kept for inspection"):
        SqliteStore(tmp_path)
    assert path.read_bytes() == damaged  # not deleted, not repaired, not written to


def test_intact_database_opens(tmp_path: Path) -> None:
    _filled_database(tmp_path, 50)
    store = SqliteStore(tmp_path)
    assert len(store.owned_snapshot()) == 50
    store.close()


@pytest.mark.parametrize(
    "schema",
    [
        ["CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER)"],  # some other program's
        ["CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
         "CREATE TABLE owned (ident TEXT PRIMARY KEY, address TEXT)"],  # our names, other columns
        ["CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
         "CREATE TABLE owned (ident TEXT PRIMARY KEY, is_container INTEGER NOT NULL, cidrs TEXT NOT NULL)",
         "CREATE TABLE extra (x)"],  # a table we never made
    ],
)
def test_unknown_schema_is_refused_and_left_alone(tmp_path: Path, schema: list[str]) -> None:
    path = tmp_path / DB_FILE
    with sqlite3.connect(path) as db:
        for sql in schema:
            db.execute(sql)
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not an IPAM database of this program"):
        SqliteStore(tmp_path)
    assert path.read_bytes() == before


def test_not_a_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open IPAM database"):
        SqliteStore(tmp_path)
    assert path.read_bytes() == b"this is not sqlite" * 100
