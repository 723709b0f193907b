"""Helpers for tests that run real routers in the test bed's network namespaces."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest

from router.testbed import Host

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
CONVERGE = 20.0  # seconds a small mesh may take to settle (it takes ~1 s)
POLL = 0.15


def router_test_marks(*tools: str) -> list[pytest.MarkDecorator]:
    """The marks of a test module that runs real routers: root, the test bed's tools (ip,
    nft) and `tools`, and the weave CLI."""
    missing = [tool for tool in ("ip", "nft", *tools) if shutil.which(tool) is None]
    return [
        pytest.mark.netns,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root: routers run in network namespaces"),
        pytest.mark.skipif(bool(missing), reason=f"missing {', '.join(missing)} (scripts/install --test installs them)"),
        pytest.mark.skipif(shutil.which("weave") is None, reason="the weave CLI is not installed (scripts/install)"),
    ]


def weave(
    host: Host, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 60
) -> str:
    """`weave ARGS` inside the host's namespace, with its WEAVE_STATE_DIR; its stdout."""
    return host.run(["weave", *args], env={**host.env, **(env or {})}, check=check, timeout=timeout).stdout


def launch(host: Host, *args: str, env: dict[str, str] | None = None) -> None:
    out = weave(host, "launch", "--nickname", host.name, *args, env=env)
    assert "weave router started" in out, out


def log_text(host: Host) -> str:
    path = host.state_dir / "weaver.log"
    return path.read_text(errors="replace") if path.exists() else ""


def diagnostics(hosts: Iterable[Host], lines: int = 30) -> str:
    """Each router's connections and the end of its log, for a failure message."""
    out = []
    for h in hosts:
        conns = weave(h, "status", "connections", check=False, timeout=10).strip() or "<router not answering>"
        tail = "\n    ".join(log_text(h).splitlines()[-lines:])
        out.append(f"--- {h.name} ({h.address}) connections:\n    {conns}\n--- weaver.log:\n    {tail}")
    return "\n".join(out)


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    timeout: float = CONVERGE,
    hosts: Iterable[Host] = (),
    describe: Callable[[], str] | None = None,
    interval: float = POLL,
) -> T:
    """Poll `probe` until it returns something truthy; fail with diagnostics on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = describe() if describe else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{detail}\n{diagnostics(hosts)}")
        time.sleep(interval)


def evil_peer_argv(router: Host, *args: str) -> list[str]:
    """`python -m tests.attacks.evil_peer ROUTER ARGS` (global options, then the attack)."""
    return [sys.executable, "-m", "tests.attacks.evil_peer", router.address, *args]


def evil_peer(host: Host, router: Host, *args: str, timeout: float = 30) -> str:
    """Run the evil peer from `host` against `router`'s router; its output (it must exit 0)."""
    res = host.run(evil_peer_argv(router, *args), env={"PYTHONPATH": str(REPO)}, timeout=timeout, check=False)
    assert res.returncode == 0, f"evil peer failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def spawn_evil_peer(host: Host, router: Host, name: str, *args: str) -> Path:
    """Start the evil peer in the background as process `name` of `host`; its log file."""
    host.spawn(evil_peer_argv(router, *args), name, env={"PYTHONPATH": str(REPO)})
    return host.log_path(name)
