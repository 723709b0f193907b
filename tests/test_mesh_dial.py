"""The mesh's connection maker under hostile or broken input (issue 12, defect 1):
nothing a dial or a peer list does may end the daemon's nursery."""

from __future__ import annotations

import logging

import pytest
import trio

from router import mesh as mesh_module
from router import ratelog
from router.mesh import Mesh, MeshConfig
from router.peername import random_peer_name
from router.targets import TargetState, normalise_address


def _mesh() -> Mesh:
    return Mesh(MeshConfig(name=random_peer_name(), nickname="t", port=6783, host="127.0.0.1"))


async def test_a_dial_that_raises_anything_is_a_failed_attempt(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def resolver_bug(host: str, port: int) -> trio.SocketStream:
        raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label too long)")

    monkeypatch.setattr(mesh_module.trio, "open_tcp_stream", resolver_bug)
    mesh = _mesh()
    target = normalise_address("peer.example:6783")
    mesh.maker.add_direct([target], trio.current_time())
    assert mesh.maker.due(trio.current_time()) == [target]
    with caplog.at_level(logging.INFO, logger="router.mesh"):
        await mesh._dial(target)  # before the fix: UnicodeError escaped into the nursery
        await mesh._dial(target)
    (t,) = mesh.maker.targets()
    assert t.state is TargetState.RETRYING and t.last_error.startswith("UnicodeError")
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and "UnicodeError" in logged[0].getMessage()  # once, with the type


async def test_connect_and_forget_are_all_or_nothing() -> None:
    mesh = _mesh()
    assert mesh.connect(["10.0.0.1", "a" * 64, "\udcff"]) == [
        f"invalid peer address {'a' * 64!r}: not an IP address or a valid host name (expected host[:port])",
        "invalid peer address '\\udcff': not ASCII (expected host[:port])",
    ]
    assert mesh.maker.targets() == []
    assert mesh.connect(["10.0.0.1", "10.0.0.2:7000"]) == []
    assert mesh.maker.direct_targets() == ["10.0.0.1:6783", "10.0.0.2:7000"]
    assert mesh.forget(["10.0.0.1", "x..y"]) != []
    assert len(mesh.maker.direct_targets()) == 2
    assert mesh.forget(["10.0.0.1"]) == []
    assert mesh.maker.direct_targets() == ["10.0.0.2:7000"]


def test_gossiped_addresses_are_validated(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelog, "REJECTS", ratelog.RateLimitedLog())
    dial = mesh_module._dial_address
    dial.cache_clear()
    with caplog.at_level(logging.WARNING, logger="router.mesh"):
        assert dial("a" * 64 + ":6783", True, 6783) is None
        assert dial("10.0.0.9:40000", False, 6783) == "10.0.0.9:6783"
        assert dial("[fd00::9]:40000", False, 6783) == "[fd00::9]:6783"
        assert dial("10.0.0.9:7000", True, 6783) == "10.0.0.9:7000"
    assert "ignoring peer address from gossip" in caplog.text
    assert ratelog.REJECTS.counts[("mesh", "bad_gossip_address")] == 1


async def test_dials_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock) -> None:
    """Gossip can name thousands of addresses: the mesh dials a bounded number at once,
    and still tries them all."""
    active, most, tried = 0, 0, set()

    async def slow_refusal(host: str, port: int) -> trio.SocketStream:
        nonlocal active, most
        active += 1
        most = max(most, active)
        tried.add(host)
        try:
            await trio.sleep(1.0)
        finally:
            active -= 1
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(mesh_module.trio, "open_tcp_stream", slow_refusal)
    mesh = _mesh()
    n = 5 * mesh_module.MAX_DIALS_IN_FLIGHT
    assert mesh.connect([f"10.1.{i // 250}.{i % 250 + 1}" for i in range(n)]) == []
    async with trio.open_nursery() as nursery:
        mesh._nursery = nursery
        nursery.start_soon(mesh._maker_loop)
        await trio.sleep(8.0)
        nursery.cancel_scope.cancel()
    assert most == mesh_module.MAX_DIALS_IN_FLIGHT
    assert len(tried) == n
