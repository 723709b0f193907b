"""Rate-limited logging of per-input errors, with a count of every input rejected.

Anything that logs once per packet, frame or request from outside hands an attacker a
way to fill the disk and burn CPU. Code that rejects an input calls :func:`reject`: the
rejection is always counted (``pyweave_inputs_rejected{component,reason}`` in /metrics),
and logged at most once per interval for each (component, reason), with the number of
like rejections that were not logged since the previous line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

INTERVAL = 10.0
# Bound on distinct (component, reason) keys remembered; reasons are code constants, so
# this is only reached by a bug (a reason built from input), and then keys recycle.
MAX_KEYS = 1024


@dataclass
class _Slot:
    last_logged: float
    suppressed: int = 0


class RateLimitedLog:
    """At most one log line per key per `interval`; the rest are counted, and the next
    line that is written says how many were held back. Thread-safe: the data paths'
    threads and the trio thread share the process's instance."""

    def __init__(self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.counts: Counter[tuple[str, str]] = Counter()
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._lock = threading.Lock()

    def count(self, component: str, reason: str) -> None:
        """Count a rejection that is logged some other way (or not at all)."""
        with self._lock:
            self.counts[(component, reason)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        """The counts so far (a copy: another thread may be adding to them)."""
        with self._lock:
            return dict(self.counts)

    def reject(
        self,
        logger: logging.Logger,
        component: str,
        reason: str,
        msg: str,
        *args: object,
        level: int = logging.WARNING,
    ) -> bool:
        """Count one rejected input and log `msg % args` unless this key logged within the
        interval. Returns whether a line was written."""
        key = (component, reason)
        with self._lock:
            self.counts[key] += 1
            now = self.clock()
            slot = self._slots.get(key)
            if slot is not None and now - slot.last_logged < self.interval:
                slot.suppressed += 1
                return False
            held = slot.suppressed if slot is not None else 0
            if slot is None and len(self._slots) >= MAX_KEYS:
                self._slots.pop(next(iter(self._slots)))
            self._slots[key] = _Slot(now)
        if held:
            suffix = " (%d more like it in the last %.0f s not logged)"
            logger.log(level, msg + suffix, *args, held, self.interval)
        else:
            logger.log(level, msg, *args)
        return True


# The process's own: the daemon has one of each component, and /metrics reads this one.
REJECTS = RateLimitedLog()


def reject(logger: logging.Logger, component: str, reason: str, msg: str, *args: object,
           level: int = logging.WARNING) -> bool:
    """:meth:`RateLimitedLog.reject` on the process's log (see module docstring)."""
    return REJECTS.reject(logger, component, reason, msg, *args, level=level)


def count(component: str, reason: str) -> None:
    """:meth:`RateLimitedLog.count` on the process's log."""
    REJECTS.count(component, reason)
