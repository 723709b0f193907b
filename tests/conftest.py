import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from router.testbed import Testbed
from tests.routers import diagnostics


def pytest_configure(config: pytest.Config) -> None:
    # Remove namespaces left by an earlier run that was killed before it could clean up.
    if os.geteuid() == 0:
        Testbed.cleanup_stale()


@pytest.fixture(scope="module")
def module_testbed() -> Iterator[Testbed]:
    """One test bed for all the tests of a module (each adds the hosts it needs)."""
    tb = Testbed()
    try:
        yield tb
    finally:
        tb.close()


@pytest.fixture
def make_testbed() -> Iterator[Callable[[int], Testbed]]:
    """Make a test bed of n hosts; it is closed (everything killed) after the test, and
    the test fails if cleaning up did."""
    beds: list[Testbed] = []

    def make(n: int) -> Testbed:
        tb = Testbed(n)
        beds.append(tb)
        return tb

    yield make
    for tb in beds:
        tb.close()
        assert not tb.cleanup_errors, tb.cleanup_errors


@pytest.fixture
def show_logs() -> Iterator[Callable[[Any], None]]:
    """Register a bed (anything with `.hosts`): its routers' logs and IPAM status are
    printed after the test; pytest shows them only if it failed."""
    beds: list[Any] = []
    yield beds.append
    for bed in beds:
        print(diagnostics(bed.hosts, lines=80))
        for h in bed.hosts:
            if h.netns and os.path.exists(h.netns_path):
                proc = h.run(["weave", "status", "ipam"], env=h.env, check=False, timeout=10)
                print(f"--- {h.name} status ipam (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
