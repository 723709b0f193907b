"""Weave Net's persisted state (two files from live Weave routers), decoded and imported."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam_crdt.address import CIDR, ip_str, parse_ip
from ipam_crdt.allocator import Allocator, AllocatorConfig, ConsensusMode
from ipam_crdt.store import (
    IMPORT_KEY,
    MigrationError,
    SqliteStore,
    import_weave_state,
    migrate_from_weave,
)
from ipam_crdt.weavedb import (
    BAD_OWNED,
    BAD_PEERNAME,
    BAD_RING,
    BAD_VERSION,
    CIDR_TYPE,
    MISSING_KEY,
    OWNED_ADDRESSES,
    WeaveDBError,
    WeaveOwned,
    WeaveState,
    parse_weave_db,
)
from router import config as router_config
from router.config import ConfigError, parse_args
from router.gob import UINT, Encoder
from router.peername import format_peer_name, parse_peer_name
from router.testbed import Testbed
from tests.routers import launch, log_text, router_test_marks, wait_for, weave
from tests.test_boltdb import CAPTURES, PAGE, database, inline_bucket, leaf_page

UNIVERSE = CIDR.parse("10.40.0.0/16")


def router_marks(fn: Callable[..., None]) -> Callable[..., None]:
    for mark in router_test_marks():
        fn = mark(fn)
    return fn


WV1, WV2 = 0x029900000001, 0x029900000002
# The allocations made on each router (the README's table).
OWNED = {
    "h1": {"c1": "10.40.0.1/16", "c2": "10.40.0.2/16", "c3": "10.40.0.3/16", "c6": "10.40.200.7/16"},
    "h2": {"c4": "10.40.128.0/16", "c5": "10.40.128.1/16"},
}


def real(host: str) -> bytes:
    return (CAPTURES / f"{host}-weavedata.db").read_bytes()


def report(host: str) -> dict:  # type: ignore[type-arg]
    return json.loads((CAPTURES / f"report-{host}.json").read_text())


def state(host: str) -> WeaveState:
    return parse_weave_db(real(host))


# ------------------------------------------------------------ decoding the real files


@pytest.mark.parametrize("host", ["h1", "h2"])
def test_state_matches_the_routers_reports(host: str) -> None:
    rep = report(host)
    s = state(host)
    assert format_peer_name(s.peer_name) == rep["Router"]["Name"]
    assert s.ring is not None
    assert s.ring.range == CIDR.parse(rep["IPAM"]["Range"]).range()
    assert s.ring.peer == s.peer_name
    entries = s.ring.entries
    got = [
        (ip_str(e.token), s.ring._distance(e.token, entries[(i + 1) % len(entries)].token),
         format_peer_name(e.peer), e.version)
        for i, e in enumerate(entries)
    ]  # fmt: skip
    want = [(e["Token"], e["Size"], e["Peer"], e["Version"]) for e in rep["IPAM"]["Entries"]]
    assert got == want
    assert s.ring.seeds == [WV1, WV2]
    assert {k: [str(c) for c in v.cidrs] for k, v in s.owned.items()} == {
        k: [v] for k, v in OWNED[host].items()
    }
    # Made through the HTTP API without ?check-alive=true, which Weave records as not a container.
    assert not any(v.is_container for v in s.owned.values())
    assert len(s.owned) == rep["IPAM"]["ActiveIPs"]
    # status-ipam: "(N active)" on this host's own line.
    status = (CAPTURES / f"status-ipam-{host}.txt").read_text().splitlines()[0]
    assert status.startswith(rep["Router"]["Name"]) and f"({len(s.owned)} active)" in status
    assert s.direct_peers == ("10.201.0.1", "10.201.0.2")


def test_owned_addresses_lie_in_the_hosts_own_ranges() -> None:
    for host in ("h1", "h2"):
        s = state(host)
        assert s.ring is not None
        for data in s.owned.values():
            for cidr in data.cidrs:
                assert s.ring.owner(cidr.addr) == s.peer_name


# ------------------------------------------------------------ damage and foreign files


def reason_of(data: bytes) -> str:
    with pytest.raises(WeaveDBError) as info:
        parse_weave_db(data)
    return info.value.reason


def top_bucket(values: dict[bytes, bytes]) -> bytes:
    """A file like Weave's: bucket `top` (inline) holding these keys."""
    inline = inline_bucket([(k, v, 0) for k, v in sorted(values.items())])
    return database({2: leaf_page(2, [(b"top", inline, 1)])})


def values(host: str) -> dict[bytes, bytes]:
    from ipam_crdt.boltdb import BoltDB

    return dict(BoltDB(real(host)).bucket(b"top").items())


def test_damaged_files() -> None:
    data = real("h1")
    both_metas = bytearray(data)
    both_metas[0x40] ^= 1
    both_metas[PAGE + 0x40] ^= 1
    assert reason_of(bytes(both_metas)) == "bad_checksum"
    assert reason_of(data[: 3 * PAGE]) == "truncated"
    assert reason_of(data[:10]) == "truncated"
    cycle = bytearray(data)
    cycle[4 * PAGE + 8 : 4 * PAGE + 10] = b"\x01\x00"  # the root leaf page becomes a branch ...
    cycle[4 * PAGE + 16 : 4 * PAGE + 32] = (16).to_bytes(4, "little") + bytes(4) + (4).to_bytes(8, "little")
    assert reason_of(bytes(cycle)) == "cycle"  # ... whose one child is itself
    assert reason_of(b"\0" * 3 * PAGE) == "bad_magic"


def test_rebuilt_file_reads_like_the_original() -> None:
    # The test writer's files are read as Weave's own, so the cases below test the decoding.
    rebuilt, original = parse_weave_db(top_bucket(values("h1"))), state("h1")
    assert rebuilt.ring is not None and original.ring is not None
    assert rebuilt.ring.state() == original.ring.state()
    assert (rebuilt.peer_name, rebuilt.owned, rebuilt.direct_peers) == (
        original.peer_name,
        original.owned,
        original.direct_peers,
    )


def test_values_not_as_weave_writes_them() -> None:
    good = values("h1")
    assert reason_of(top_bucket({**good, b"version": b"\x02\x00"})) == BAD_VERSION
    assert reason_of(top_bucket({k: v for k, v in good.items() if k != b"version"})) == MISSING_KEY
    assert reason_of(top_bucket({k: v for k, v in good.items() if k != b"peername"})) == MISSING_KEY
    assert reason_of(top_bucket({**good, b"peername": Encoder().encode(0, UINT)})) == BAD_PEERNAME
    assert reason_of(top_bucket({**good, b"peername": Encoder().encode(1 << 60, UINT)})) == BAD_PEERNAME
    assert reason_of(top_bucket({**good, b"peername": b"\x03\x0c\x00\x00"})) == BAD_PEERNAME  # a string
    # h2's ring under h1's name: written by another peer.
    assert reason_of(top_bucket({**good, b"ring": values("h2")[b"ring"]})) == BAD_RING
    assert reason_of(top_bucket({**good, b"ring": good[b"ring"][:-9]})) == BAD_RING
    assert reason_of(top_bucket({**good, b"ownedAddresses": b"\x01"})) == BAD_OWNED
    no_ring = {k: v for k, v in good.items() if k != b"ring"}
    assert reason_of(top_bucket(no_ring)) == BAD_OWNED  # addresses with no ring


def owned_blob(owned: dict[str, list[tuple[int, int]]]) -> bytes:
    value = {
        ident: {"IsContainer": True, "Cidrs": [{"Addr": a, "PrefixLen": p} for a, p in cidrs]}
        for ident, cidrs in owned.items()
    }
    return Encoder().encode(value, OWNED_ADDRESSES)


def test_owned_addresses_checked() -> None:
    good = values("h1")
    a = parse_ip("10.40.0.9")
    ok = parse_weave_db(top_bucket({**good, b"ownedAddresses": owned_blob({"x": [(a, 16)], "empty": []})}))
    assert ok.owned == {"x": WeaveOwned(True, (CIDR(a, 16),))}  # an ident with nothing is dropped
    for bad in ({"x": [(a, 16)], "y": [(a, 16)]}, {"x": [(a, 33)]}, {"x": [(1 << 32, 16)]}, {"": [(a, 16)]},
                {"x\n": [(a, 16)]}, {"x" * 2000: [(a, 16)]}):  # fmt: skip
        assert reason_of(top_bucket({**good, b"ownedAddresses": owned_blob(bad)})) == BAD_OWNED, bad
    assert CIDR_TYPE.name == "CIDR"


def test_a_file_without_ipam_state() -> None:
    good = values("h1")
    bare = {k: good[k] for k in (b"version", b"peername")}
    s = parse_weave_db(top_bucket(bare))
    assert (s.peer_name, s.ring, s.owned, s.direct_peers, s.universe) == (WV1, None, {}, (), None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    host=st.sampled_from(["h1", "h2"]),
    edits=st.lists(st.tuples(st.integers(0, 0x2E0), st.integers(0, 255)), min_size=1, max_size=6),
    page=st.sampled_from([2, 4]),
)
def test_mutated_values_give_a_state_or_weave_db_error(
    host: str, edits: list[tuple[int, int]], page: int
) -> None:
    # Edits land in a tree page (the metas' checksums do not cover it): in element headers,
    # keys, bucket headers and the gob values, so they reach the value decoding too.
    data = bytearray(real(host))
    for offset, value in edits:
        data[page * PAGE + offset] = value
    started = time.monotonic()
    try:
        parse_weave_db(bytes(data))
    except WeaveDBError:
        pass
    assert time.monotonic() - started < 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=32), st.integers(0, 6 * PAGE), st.booleans())
def test_mutated_files_anywhere(garbage: bytes, offset: int, cut: bool) -> None:
    data = bytearray(real("h1"))
    data[offset : offset + len(garbage)] = garbage
    if cut:
        del data[offset:]
    try:
        parse_weave_db(bytes(data))
    except WeaveDBError:
        pass


# ------------------------------------------------------------ the import


def weave_file(tmp_path: Path, host: str = "h1") -> Path:
    path = tmp_path / "weave" / "weavedata.db"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(real(host))
    path.chmod(0o444)
    return path


def test_import_then_the_allocator_owns_the_same_addresses(tmp_path: Path) -> None:
    source = weave_file(tmp_path)
    before = (source.read_bytes(), source.stat().st_mtime_ns)
    pyweave = tmp_path / "state"
    result = migrate_from_weave(source, pyweave, universe=UNIVERSE.range())
    assert (result.peer_name, result.imported, result.owned) == (WV1, True, 4)
    assert (source.read_bytes(), source.stat().st_mtime_ns) == before  # never written
    assert parse_peer_name((pyweave / "peername").read_text()) == WV1

    store = SqliteStore(pyweave)
    alloc = Allocator(AllocatorConfig(WV1, 7, UNIVERSE, ConsensusMode(2), store=store))
    weave = state("h1")
    assert weave.ring is not None
    assert alloc.ring.state() == weave.ring.state()
    assert alloc.owned_addresses() == {k: [CIDR.parse(v)] for k, v in OWNED["h1"].items()}
    assert alloc.allocate("c1", UNIVERSE).cidr == CIDR.parse("10.40.0.1/16")
    new = alloc.allocate("c7", UNIVERSE).cidr
    assert new is not None and str(new) not in OWNED["h1"].values()
    assert alloc.ring.owner(new.addr) == WV1
    assert alloc.space.num_used() == 5
    store.close()


def test_import_is_done_once(tmp_path: Path) -> None:
    source = weave_file(tmp_path)
    pyweave = tmp_path / "state"
    migrate_from_weave(source, pyweave, universe=UNIVERSE.range())
    store = SqliteStore(pyweave)
    alloc = Allocator(AllocatorConfig(WV1, 7, UNIVERSE, ConsensusMode(2), store=store))
    alloc.free("c2")
    alloc.allocate("c8", UNIVERSE)
    after_use = alloc.owned_addresses()
    store.close()
    # The same launch line again: recognised, nothing is imported over what happened since.
    again = migrate_from_weave(source, pyweave, universe=UNIVERSE.range())
    assert not again.imported
    store = SqliteStore(pyweave)
    assert {k: v.cidrs for k, v in store.peek()[1].items()} == after_use
    store.close()
    # A lost peername file is written again.
    (pyweave / "peername").unlink()
    migrate_from_weave(source, pyweave, universe=UNIVERSE.range())
    assert parse_peer_name((pyweave / "peername").read_text()) == WV1


def test_import_refuses_over_other_state(tmp_path: Path) -> None:
    pyweave = tmp_path / "state"
    migrate_from_weave(weave_file(tmp_path, "h1"), pyweave, universe=UNIVERSE.range())
    other = tmp_path / "other.db"
    other.write_bytes(real("h2"))
    with pytest.raises(MigrationError, match="another Weave database"):
        migrate_from_weave(other, pyweave, universe=UNIVERSE.range())

    # pyweave ran here before, under its own name.
    ran = tmp_path / "ran"
    ran.mkdir()
    (ran / "peername").write_text("02:00:00:00:00:09\n")
    with pytest.raises(MigrationError, match="already ran here as 02:00:00:00:00:09"):
        migrate_from_weave(other, ran, universe=UNIVERSE.range())
    # A store with state and no import mark (same name as Weave's).
    used = tmp_path / "used"
    store = SqliteStore(used)
    store.save_ring(WV2, state("h2").ring)  # type: ignore[arg-type]
    store.close()
    with pytest.raises(MigrationError, match="already holds state"):
        migrate_from_weave(other, used, universe=UNIVERSE.range())
    assert not (used / "peername").exists()
    store = SqliteStore(used)
    assert store.imported_from() is None
    store.close()


def test_import_refuses_a_different_configuration(tmp_path: Path) -> None:
    source = weave_file(tmp_path)
    pyweave = tmp_path / "state"
    with pytest.raises(MigrationError, match="--ipalloc-range 10.40.0.0/16"):
        migrate_from_weave(source, pyweave, universe=CIDR.parse("10.32.0.0/12").range())
    with pytest.raises(MigrationError, match="IPAM is off"):
        migrate_from_weave(source, pyweave, universe=None)
    with pytest.raises(MigrationError, match="differs from Weave's peer name 02:99:00:00:00:01"):
        migrate_from_weave(source, pyweave, universe=UNIVERSE.range(), name=WV2)
    assert not (pyweave / "peername").exists()
    # --name equal to Weave's is fine.
    assert migrate_from_weave(source, pyweave, universe=UNIVERSE.range(), name=WV1).imported


def test_import_refuses_while_weave_holds_its_file(tmp_path: Path) -> None:
    source = weave_file(tmp_path)
    fd = os.open(source, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running Weave router's bbolt does
        with pytest.raises(MigrationError, match="Weave is still running"):
            migrate_from_weave(source, tmp_path / "state", universe=UNIVERSE.range())
    finally:
        os.close(fd)


def test_import_of_a_bad_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="cannot open"):
        migrate_from_weave(tmp_path / "nothere.db", tmp_path / "state", universe=UNIVERSE.range())
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\0" * 3 * PAGE)
    with pytest.raises(MigrationError, match="magic"):
        migrate_from_weave(bad, tmp_path / "state", universe=UNIVERSE.range())
    with pytest.raises(MigrationError, match="not a regular file"):
        migrate_from_weave(tmp_path, tmp_path / "state", universe=UNIVERSE.range())
    assert not (tmp_path / "state" / "peername").exists()


def test_import_marker_is_the_files_digest(tmp_path: Path) -> None:
    pyweave = tmp_path / "state"
    import_weave_state(state("h2"), "abc", pyweave, universe=UNIVERSE.range())
    store = SqliteStore(pyweave)
    assert store.imported_from() == "abc"
    store.close()
    assert IMPORT_KEY == "weave_import"
    migrate_from_weave(weave_file(tmp_path, "h2"), tmp_path / "s2", universe=UNIVERSE.range())
    store = SqliteStore(tmp_path / "s2")
    assert store.imported_from() == hashlib.sha256(real("h2")).hexdigest()
    store.close()


# ------------------------------------------------------------ weave launch --migrate-from-weave


def test_launch_flag_imports_before_the_peer_name_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    monkeypatch.setenv("WEAVE_STATE_DIR", str(state_dir))
    source = weave_file(tmp_path)
    argv = [f"--migrate-from-weave={source}", "--ipalloc-range", "10.40.0.0/16"]
    cfg = parse_args(argv)
    assert (cfg.name, cfg.migrate_from_weave) == (WV1, source)
    store = SqliteStore(state_dir)
    assert store.load(WV1, UNIVERSE.range()) is not None
    store.close()
    # The daemon parses the same line again: the same import, nothing done.
    assert parse_args(argv).name == WV1
    # Without the flag, the imported name stays.
    assert parse_args(["--ipalloc-range", "10.40.0.0/16"]).name == WV1


def test_launch_flag_without_path_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEAVE_STATE_DIR", str(tmp_path / "state"))
    source = weave_file(tmp_path)
    monkeypatch.setattr(router_config, "DEFAULT_WEAVE_DB", str(source))
    # Bare, the default path; a word after it is a peer, not the path.
    cfg = parse_args(["--migrate-from-weave", "--ipalloc-range=10.40.0.0/16", "10.0.0.5"])
    assert cfg.migrate_from_weave == source and cfg.name == WV1 and cfg.peers == ["10.0.0.5:6783"]
    with pytest.raises(ConfigError, match="--migrate-from-weave: .*--ipalloc-range 10.40.0.0/16"):
        parse_args(["--migrate-from-weave"], "weave launch")  # the default range, 10.32.0.0/12
    with pytest.raises(ConfigError, match="--migrate-from-weave: .*cannot open"):
        parse_args([f"--migrate-from-weave={tmp_path / 'none.db'}", "--ipalloc-range=10.40.0.0/16"])


@router_marks
def test_routers_launched_on_weaves_files(
    tmp_path: Path, make_testbed: Callable[[int], Testbed], show_logs: Callable[[Any], None]
) -> None:
    """Two routers take over the two Weave routers' state: their names, the ring, and the
    addresses, which they keep and do not hand out again; their rings merge cleanly."""
    from tests.test_ipam_integration import http

    tb = make_testbed(2)
    show_logs(tb)
    h1, h2 = tb.hosts
    for host, other, name in ((h1, h2, "h1"), (h2, h1, "h2")):
        (tmp_path / name).mkdir()
        source = weave_file(tmp_path / name, name)
        launch(host, f"--migrate-from-weave={source}", "--ipalloc-range", "10.40.0.0/16", other.address)
    assert parse_peer_name((h1.state_dir / "peername").read_text()) == WV1
    assert parse_peer_name((h2.state_dir / "peername").read_text()) == WV2
    for host, name in ((h1, "h1"), (h2, "h2")):
        answers = http(host, *(("GET", f"/ip/{ident}") for ident in OWNED[name]))
        assert [body.strip() for _status, body in answers] == list(OWNED[name].values())
    wait_for(
        lambda: "established" in weave(h1, "status", "connections", check=False, timeout=10),
        "h1 connected to h2",
        hosts=tb.hosts,
    )
    taken = {a for owned in OWNED.values() for a in owned.values()}
    (status, new1), (_status, again) = http(h1, ("POST", "/ip/c7"), ("POST", "/ip/c1"))
    assert status == 200 and new1.strip() not in taken and again.strip() == "10.40.0.1/16"
    ((status, new2),) = http(h2, ("POST", "/ip/c8"))
    assert status == 200 and new2.strip() not in taken | {new1.strip()}
    assert parse_ip(new2.split("/")[0]) >= parse_ip("10.40.128.0")  # h2's own range
    for host in (h1, h2):
        log = log_text(host)
        assert "Deleting persisted data" not in log and "Traceback" not in log, log
