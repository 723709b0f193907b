"""Persistence of IPAM state: our peer name, the ring, and who owns which address.

The allocator writes through a store as it goes (the ring on every change, an ident's
addresses on every allocation or release), and each write is committed before the call
returns, so an address handed out is never handed out again after a crash.

On load, data written under another peer name or for another range is discarded, with
a log line saying why, as Weave does: reusing it would put stale ring entries into the
network.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ipam_crdt.address import CIDR, Range
from ipam_crdt.boltdb import MAX_FILE_BYTES
from ipam_crdt.errors import IPAMError, StoreError
from ipam_crdt.naming import peer_str
from ipam_crdt.ring import Ring
from ipam_crdt.weavedb import WeaveDBError, WeaveState, parse_weave_db
from ipam_crdt.wire import RingData, decode_ring, encode_ring
from router.errors import WireError
from router.peername import PEERNAME_FILE, format_peer_name, read_peer_name_file, write_peer_name_file

log = logging.getLogger(__name__)

DB_FILE = "ipam.sqlite3"
# meta key: the sha256 of the Weave file this store was made from, so a relaunch with the
# same --migrate-from-weave is recognised and does nothing.
IMPORT_KEY = "weave_import"
SCHEMA_VERSION = 1
SQLITE_HEADER = b"SQLite format 3\x00"
MAX_WEAVE_DB_BYTES = MAX_FILE_BYTES
# Our tables and their columns, in order: anything else is somebody else's file.
_TABLES = {"meta": ("key", "value"), "owned": ("ident", "is_container", "cidrs")}


@dataclass
class OwnedData:
    """The addresses one ident owns (Weave's `ownedData`)."""

    is_container: bool
    cidrs: list[CIDR] = field(default_factory=list)


@dataclass
class Persisted:
    ring: Ring
    owned: dict[str, OwnedData]


class IPAMStore(Protocol):
    def load(self, our_name: int, universe: Range) -> Persisted | None:
        """Our persisted state, or None (nothing stored, or stored for another name/range)."""
        ...

    def save_ring(self, our_name: int, ring: Ring) -> None: ...

    def peek(self) -> tuple[int | None, dict[str, OwnedData]]:
        """The peer name and allocations stored, whatever name they were written under."""
        ...

    def save_owned(self, ident: str, data: OwnedData | None) -> None:
        """Record an ident's addresses; None forgets the ident."""
        ...

    def clear(self) -> None: ...


def _check_loaded(
    our_name: int, universe: Range, name: int | None, ring: Ring | None
) -> str | None:
    """Why stored data must be discarded, or None if it is usable."""
    if name is None or ring is None:
        return "No valid persisted data"
    if name != our_name:
        return f"Deleting persisted data for peername {peer_str(name)}"
    if ring.range != universe:
        return f"Deleting persisted data for IPAM range {ring.range}; our range is {universe}"
    return None


class MemoryStore:
    """A store in memory; `snapshot()`/`restore()` model a disk that survives a restart."""

    def __init__(self) -> None:
        self.name: int | None = None
        self.ring: Ring | None = None
        self.owned: dict[str, OwnedData] = {}
        self.writes = 0

    def load(self, our_name: int, universe: Range) -> Persisted | None:
        reason = _check_loaded(our_name, universe, self.name, self.ring)
        if reason is not None:
            if self.name is not None or self.owned:
                log.info("%s", reason)
            self.clear()
            return None
        assert self.ring is not None
        return Persisted(self.ring.copy(our_name), {k: _copy_owned(v) for k, v in self.owned.items()})

    def peek(self) -> tuple[int | None, dict[str, OwnedData]]:
        return self.name, {k: _copy_owned(v) for k, v in self.owned.items()}

    def save_ring(self, our_name: int, ring: Ring) -> None:
        self.name = our_name
        self.ring = ring.copy()
        self.writes += 1

    def save_owned(self, ident: str, data: OwnedData | None) -> None:
        if data is None or not data.cidrs:
            self.owned.pop(ident, None)
        else:
            self.owned[ident] = _copy_owned(data)
        self.writes += 1

    def clear(self) -> None:
        self.name = None
        self.ring = None
        self.owned = {}

    def snapshot(self) -> MemoryStore:
        copy = MemoryStore()
        copy.name = self.name
        copy.ring = None if self.ring is None else self.ring.copy()
        copy.owned = {k: _copy_owned(v) for k, v in self.owned.items()}
        return copy


def _copy_owned(d: OwnedData) -> OwnedData:
    return OwnedData(d.is_container, list(d.cidrs))


def _owned_rows(rows: list[tuple[str, int, str]]) -> dict[str, OwnedData]:
    owned = {}
    for ident, is_container, cidrs in rows:
        try:
            owned[ident] = OwnedData(bool(is_container), [CIDR.parse(c) for c in cidrs.split(",") if c])
        except IPAMError as exc:
            log.warning("IPAM database: dropping unreadable addresses of %s (%s)", ident, exc)
    return owned


class SqliteStore:
    """IPAM state in `<directory>/ipam.sqlite3`; every write is its own committed transaction."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / DB_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._inspect()
            # The allocator is single-threaded, but a service may run it in a worker thread.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA synchronous=FULL")
            # One transaction (one round of fsyncs) for a new database's schema.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
                )
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS owned ("
                    " ident TEXT PRIMARY KEY, is_container INTEGER NOT NULL, cidrs TEXT NOT NULL)"
                )
                self._check_version()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open IPAM database {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def _inspect(self) -> None:
        """Refuse a file that is not sound and ours, before anything writes to it.

        Read-only, so that a damaged or foreign file stays exactly as found, for the
        operator to inspect or move away: starting on it could hand out an address twice
        (a lost page of `owned`), and rebuilding it would forget what it still holds.
        """
        try:
            with self.path.open("rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except FileNotFoundError:
            return
        if not header:
            return  # an empty file is a new database to sqlite
        if header != SQLITE_HEADER:
            raise StoreError(
                f"cannot open IPAM database {self.path}: file is not a database (no sqlite header); "
                "it was left as it is: move it away to start with an empty IPAM database"
            )
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("PRAGMA quick_check(5)").fetchall()
            problems = [line for (text,) in rows for line in str(text).splitlines() if line.strip()]
            if problems != ["ok"]:
                raise StoreError(
                    f"IPAM database {self.path} is damaged ({'; '.join(problems)}); it was kept for "
                    "inspection: restore it from a backup, or move it away to start afresh (this "
                    "host's containers' addresses are then claimed again from the bridge)"
                )
            tables = {
                name: tuple(col[1] for col in db.execute(f"PRAGMA table_info('{name}')").fetchall())
                for (name,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                ).fetchall()
            }
        finally:
            db.close()
        unknown = {n: cols for n, cols in tables.items() if _TABLES.get(n) != cols}
        if unknown:
            found = ", ".join(f"{n}({', '.join(cols)})" for n, cols in sorted(unknown.items()))
            raise StoreError(
                f"{self.path} is not an IPAM database of this program (tables {found}); "
                "it was left as it is: move it away to start with an empty IPAM database"
            )

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise StoreError(
                f"IPAM database {self.path} has schema version {row[0]}, this program uses {SCHEMA_VERSION}"
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed if the block ends, rolled back if it raises."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write IPAM database {self.path}: {exc}") from None

    def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        with self._transaction():
            for sql, args in statements:
                self._db.execute(sql, args)

    def load(self, our_name: int, universe: Range) -> Persisted | None:
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            rows = self._db.execute("SELECT ident, is_container, cidrs FROM owned ORDER BY rowid").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read IPAM database {self.path}: {exc}") from None
        name = meta.get("peername")
        ring = None
        if "ring" in meta:
            try:
                ring = decode_ring(meta["ring"]).to_ring()
            except (WireError, IPAMError) as exc:
                log.warning("IPAM database %s holds an unreadable ring (%s); ignoring it", self.path, exc)
        reason = _check_loaded(our_name, universe, None if name is None else int(name), ring)
        if reason is not None:
            if name is not None or rows:
                log.info("%s", reason)
            self.clear()
            return None
        assert ring is not None
        ring.peer = our_name
        return Persisted(ring, _owned_rows(rows))

    def peek(self) -> tuple[int | None, dict[str, OwnedData]]:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'peername'").fetchone()
            rows = self._db.execute("SELECT ident, is_container, cidrs FROM owned ORDER BY rowid").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read IPAM database {self.path}: {exc}") from None
        name = None
        if row is not None:
            try:
                name = int(row[0])
            except (TypeError, ValueError):
                log.warning("IPAM database %s holds an unreadable peer name %r", self.path, row[0])
        return name, _owned_rows(rows)

    def save_ring(self, our_name: int, ring: Ring) -> None:
        blob = encode_ring(RingData.of(ring))
        self._write([
            ("INSERT OR REPLACE INTO meta VALUES ('peername', ?)", (str(our_name),)),
            ("INSERT OR REPLACE INTO meta VALUES ('ring', ?)", (blob,)),
        ])

    def save_owned(self, ident: str, data: OwnedData | None) -> None:
        if data is None or not data.cidrs:
            self._write([("DELETE FROM owned WHERE ident = ?", (ident,))])
            return
        cidrs = ",".join(str(c) for c in data.cidrs)
        self._write([
            ("INSERT INTO owned VALUES (?, ?, ?) ON CONFLICT(ident) DO UPDATE SET"
             " is_container = excluded.is_container, cidrs = excluded.cidrs",
             (ident, int(data.is_container), cidrs)),
        ])  # fmt: skip

    def clear(self) -> None:
        self._write([
            ("DELETE FROM meta WHERE key IN ('peername', 'ring')", ()),
            ("DELETE FROM owned", ()),
        ])  # fmt: skip

    def imported_from(self) -> str | None:
        """The digest of the Weave file this store was imported from, if it was."""
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (IMPORT_KEY,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read IPAM database {self.path}: {exc}") from None
        return None if row is None else str(row[0])

    def import_state(
        self, our_name: int, ring: Ring | None, owned: Mapping[str, OwnedData], marker: str
    ) -> None:
        """Write an imported state in one transaction, into a store that holds none.

        The emptiness check runs inside the transaction, so a router starting meanwhile
        cannot interleave its own first writes with the import.
        """
        with self._transaction():
            held = self._db.execute(
                "SELECT (SELECT count(*) FROM meta WHERE key IN ('peername', 'ring', ?))"
                " + (SELECT count(*) FROM owned)",
                (IMPORT_KEY,),
            ).fetchone()[0]
            if held:
                raise MigrationError(f"IPAM database {self.path} already holds state; not importing over it")
            self._db.execute("INSERT INTO meta VALUES ('peername', ?)", (str(our_name),))
            if ring is not None:
                self._db.execute("INSERT INTO meta VALUES ('ring', ?)", (encode_ring(RingData.of(ring)),))
            for ident, data in owned.items():
                self._db.execute(
                    "INSERT INTO owned VALUES (?, ?, ?)",
                    (ident, int(data.is_container), ",".join(str(c) for c in data.cidrs)),
                )
            self._db.execute("INSERT INTO meta VALUES (?, ?)", (IMPORT_KEY, marker))

    def owned_snapshot(self) -> Mapping[str, OwnedData]:
        rows = self._db.execute("SELECT ident, is_container, cidrs FROM owned ORDER BY rowid").fetchall()
        return {i: OwnedData(bool(c), [CIDR.parse(x) for x in s.split(",") if x]) for i, c, s in rows}


# ------------------------------------------------------------------ migration from Weave Net


class MigrationError(StoreError):
    """Weave's state cannot be taken over; the message says why and what to do."""


@dataclass(frozen=True)
class MigrationResult:
    peer_name: int
    # False when this state directory was already made from the same Weave file.
    imported: bool
    owned: int


def read_weave_db(path: str | Path) -> bytes:
    """The bytes of Weave's BoltDB file, opened read-only; refused while Weave holds it.

    A running Weave router holds an exclusive flock on its file (bbolt does), and its state
    would move on after we read it: a shared lock that fails says it is still running.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise MigrationError(f"cannot open Weave's database {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MigrationError(f"Weave's database {path} is not a regular file")
        if info.st_size > MAX_WEAVE_DB_BYTES:
            raise MigrationError(f"Weave's database {path} is {info.st_size} bytes; Weave's are far smaller")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MigrationError(
                    f"Weave's database {path} is locked: Weave is still running; `weave stop` it first"
                ) from None
            raise MigrationError(f"cannot lock Weave's database {path}: {exc.strerror}") from None
        chunks = []
        size = 0
        while size <= MAX_WEAVE_DB_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_WEAVE_DB_BYTES:
            raise MigrationError(f"Weave's database {path} grew past {MAX_WEAVE_DB_BYTES} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def import_weave_state(
    state: WeaveState,
    marker: str,
    directory: str | Path,
    *,
    universe: Range | None,
    name: int | None = None,
) -> MigrationResult:
    """Make pyweave's state directory hold Weave's state: its peer name, ring and addresses.

    Done once: a directory already made from the same Weave file (`marker`, its digest) is
    left as it is, whatever the router did since; one holding any other state is refused,
    because merging two histories of one host could hand an address out twice.
    `universe` is our --ipalloc-range (None: IPAM off); `name` our --name, if given.
    """
    directory = Path(directory)
    weave_name = format_peer_name(state.peer_name)
    if name is not None and name != state.peer_name:
        raise MigrationError(
            f"--name {format_peer_name(name)} differs from Weave's peer name {weave_name}; "
            "drop --name, or give Weave's"
        )
    if state.ring is not None and universe is None:
        raise MigrationError(
            f"Weave's IPAM covers {state.ring.range.as_cidr_string()}, but IPAM is off here "
            '(--ipalloc-range ""): launch with --ipalloc-range as Weave had it'
        )
    if state.ring is not None and state.ring.range != universe:
        raise MigrationError(
            f"Weave's IPAM covers {state.ring.range.as_cidr_string()}, this launch "
            f"{universe.as_cidr_string() if universe else None}: launch with "
            f"--ipalloc-range {state.ring.range.as_cidr_string()}"
        )
    name_file = directory / PEERNAME_FILE
    have_name = _read_peer_name_file(name_file)
    store = SqliteStore(directory)
    try:
        marked = store.imported_from()
        if marked == marker:
            if have_name not in (None, state.peer_name):
                raise MigrationError(
                    f"{name_file} says {format_peer_name(have_name)}, but this directory was imported "
                    f"from Weave as {weave_name}"
                )
            if have_name is None:
                write_peer_name_file(name_file, state.peer_name)
            log.info("%s already holds the state imported from this Weave database; nothing to do", directory)
            return MigrationResult(state.peer_name, False, len(state.owned))
        if marked is not None:
            raise MigrationError(
                f"{directory} was imported from another Weave database; `weave reset` to start again"
            )
        if have_name not in (None, state.peer_name):
            raise MigrationError(
                f"pyweave already ran here as {format_peer_name(have_name)} ({name_file}); "
                f"Weave's state ({weave_name}) was not imported: `weave reset` first to take it over"
            )
        owned = {k: OwnedData(v.is_container, list(v.cidrs)) for k, v in state.owned.items()}
        store.import_state(state.peer_name, state.ring, owned, marker)
    finally:
        store.close()
    write_peer_name_file(name_file, state.peer_name)
    log.info(
        "imported Weave's state into %s: peer name %s, %d idents with addresses",
        directory, weave_name, len(state.owned),
    )  # fmt: skip
    return MigrationResult(state.peer_name, True, len(state.owned))


def migrate_from_weave(
    source: str | Path, directory: str | Path, *, universe: Range | None, name: int | None = None
) -> MigrationResult:
    """Read Weave's file at `source` (never writing it) and import it into `directory`."""
    data = read_weave_db(source)
    try:
        state = parse_weave_db(data)
    except WeaveDBError as exc:
        raise MigrationError(f"{source}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    return import_weave_state(state, digest, directory, universe=universe, name=name)


def _read_peer_name_file(path: Path) -> int | None:
    try:
        return read_peer_name_file(path)
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror}") from None
    except WireError:
        raise MigrationError(f"{path} holds no peer name; move it away to import Weave's") from None
