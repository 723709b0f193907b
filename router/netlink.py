"""pyroute2's IPRoute and NetlinkError, without importing all of pyroute2 up front.

`import pyroute2` runs a package ``__init__`` that loads every API the library has (NDB,
IPDB, conntrack, ethtool, IPVS, nftables, ...): about two thirds of its import time, paid
by every router at start-up (many at once, when a mesh starts together). The daemon uses
only IPRoute and NetlinkError, so the package is registered here without running its
``__init__``; its submodules import as usual. Any other name asked of ``pyroute2`` (by a
test, or a library) runs the real ``__init__`` then, so nothing else changes.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any

_lock = threading.Lock()


def _register_bare_package() -> None:
    with _lock:
        if "pyroute2" in sys.modules:
            return
        spec = importlib.util.find_spec("pyroute2")
        if spec is None or spec.loader is None:
            raise ImportError("pyroute2 is not installed")
        package = importlib.util.module_from_spec(spec)
        loaded = False

        def load_all(name: str) -> Any:
            nonlocal loaded
            if importlib.util.find_spec(f"pyroute2.{name}") is not None:
                return importlib.import_module(f"pyroute2.{name}")  # `from pyroute2 import config`
            with _lock:
                if not loaded:
                    loaded = True
                    spec.loader.exec_module(package)  # type: ignore[union-attr]
            try:
                return package.__dict__[name]
            except KeyError:
                raise AttributeError(f"module 'pyroute2' has no attribute {name!r}") from None

        package.__getattr__ = load_all  # type: ignore[method-assign]
        sys.modules["pyroute2"] = package


_register_bare_package()

from pyroute2.iproute.linux import IPRoute  # type: ignore[import-untyped]  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]  # noqa: E402

__all__ = ["IPRoute", "NetlinkError"]
