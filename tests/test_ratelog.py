"""The rate-limited rejection log: every rejection counted, at most one line per interval."""

from __future__ import annotations

import logging

from router.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_interval_and_all_counted(caplog) -> None:
    clock = Clock()
    rl = RateLimitedLog(interval=10.0, clock=clock)
    logger = logging.getLogger("test.ratelog")
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        written = [rl.reject(logger, "dns", "formerr", "bad query from %s", "h") for _ in range(1000)]
        assert written.count(True) == 1
        clock.now += 10.0
        assert rl.reject(logger, "dns", "formerr", "bad query from %s", "h")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad query from h", "bad query from h (999 more like it in the last 10 s not logged)"]
    assert rl.counts[("dns", "formerr")] == 1001


def test_keys_are_independent() -> None:
    rl = RateLimitedLog(interval=10.0, clock=Clock())
    logger = logging.getLogger("test.ratelog")
    assert rl.reject(logger, "dns", "formerr", "x")
    assert rl.reject(logger, "dns", "badvers", "y")
    assert rl.reject(logger, "mesh", "formerr", "z")
    assert not rl.reject(logger, "dns", "formerr", "x")
    assert sum(rl.counts.values()) == 4
