"""sleeve.replay: the 2^20-block replay window, against a set-based model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sleeve.replay import WINDOW_BITS, WINDOW_SIZE, ReplayWindow, Verdict

W = WINDOW_SIZE


class Model:
    """Every number committed, plus the window rule: blocks below (highest block - 1) are too old."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.top = 0

    def check(self, seq: int) -> Verdict:
        if seq >> WINDOW_BITS < self.top - 1:
            return Verdict.TOO_OLD
        return Verdict.DUPLICATE if seq in self.seen else Verdict.FRESH

    def commit(self, seq: int) -> None:
        if self.check(seq) is Verdict.FRESH:
            self.seen.add(seq)
            self.top = max(self.top, seq >> WINDOW_BITS)


near_blocks = st.builds(lambda k, d: max(0, k * W + d), st.integers(0, 6), st.integers(-4, 4))
seqs = st.one_of(st.integers(0, 40), near_blocks, st.integers(0, 8 * W), st.integers(0, (1 << 63) - 1))
steps = st.lists(st.tuples(st.sampled_from(["accept", "check", "commit"]), seqs), max_size=120)


@given(steps)
@settings(max_examples=300)
def test_window_matches_model(ops: list[tuple[str, int]]) -> None:
    window, model = ReplayWindow(), Model()
    accepted: set[int] = set()
    for op, seq in ops:
        expected = model.check(seq)
        assert window.check(seq) is expected
        if op == "accept":
            ok = window.accept(seq)
            assert ok == (expected is Verdict.FRESH)
            if ok:
                assert seq not in accepted
                accepted.add(seq)
            model.commit(seq)
        elif op == "commit":
            window.commit(seq)
            model.commit(seq)
        # "check" alone must not change anything; the next iteration's comparison shows it.
    for seq in accepted:
        assert window.check(seq) is not Verdict.FRESH


@given(st.integers(0, (1 << 63) - 1), st.lists(st.integers(0, 2 * W - 1), max_size=60))
def test_fresh_numbers_in_window_always_accepted(top: int, offsets: list[int]) -> None:
    window = ReplayWindow()
    window.commit(top)
    base = (top >> WINDOW_BITS) - 1
    for off in dict.fromkeys(offsets):
        seq = base * W + off
        if seq < 0 or seq == top:
            continue
        assert window.accept(seq)
        assert not window.accept(seq)


def test_basic_sequence() -> None:
    window = ReplayWindow()
    assert window.check(0) is Verdict.FRESH
    assert window.check(0) is Verdict.FRESH  # check alone commits nothing
    window.commit(0)
    assert window.check(0) is Verdict.DUPLICATE
    assert window.accept(5) and window.accept(3) and not window.accept(5)
    assert window.accept(W - 1) and window.accept(W)
    assert window.block == 1
    # Block 0 is now the previous block: still remembered, still open for fresh numbers.
    assert window.check(3) is Verdict.DUPLICATE and window.accept(4)
    assert window.accept(2 * W + 7)
    assert window.check(4) is Verdict.TOO_OLD and window.check(W + 1) is Verdict.FRESH
    assert window.check(W) is Verdict.DUPLICATE
    # A jump of two blocks forgets both bitsets.
    assert window.accept(4 * W)
    assert window.check(2 * W + 7) is Verdict.TOO_OLD
    assert window.check(3 * W + 7) is Verdict.FRESH
    window.commit(7)  # too old: ignored
    assert window.block == 4


def test_extremes() -> None:
    window = ReplayWindow()
    top = (1 << 63) - 1
    assert window.accept(top) and not window.accept(top)
    assert window.accept(top - W) and window.check(0) is Verdict.TOO_OLD
    with pytest.raises(ValueError):
        window.commit(-1)
