import os
from collections.abc import Iterator

import pytest

from router.testbed import Testbed


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
