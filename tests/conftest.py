import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Remove namespaces left by an earlier run that was killed before it could clean up.
    if os.geteuid() == 0:
        from router.testbed import Testbed

        Testbed.cleanup_stale()
