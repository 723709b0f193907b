"""The replay window of one sleeve decryptor (sans-IO).

Sequence numbers are split into blocks of 2^20. The window keeps two bitsets: the
highest block seen so far ("current") and the one before it ("previous"). A number is
acceptable when it is in a block above current (the window will slide up), or in
current or previous and not yet seen; anything in an older block is too old.

The caller checks first and commits only after the packet decrypted, so a forged
packet (which fails authentication) can neither slide the window nor burn a number::

    if window.check(seq) is Verdict.FRESH:
        plain = open(...)          # may fail: no commit then
        window.commit(seq)

The bitsets are bytearrays (setting a bit in a 2^20-bit Python int would copy 128 KiB);
each is allocated the first time it is needed.
"""

from __future__ import annotations

import enum

WINDOW_BITS = 20
WINDOW_SIZE = 1 << WINDOW_BITS
_MASK = WINDOW_SIZE - 1
_BYTES = WINDOW_SIZE // 8


class Verdict(enum.Enum):
    FRESH = "fresh"
    DUPLICATE = "duplicate"
    TOO_OLD = "too old"


FRESH = Verdict.FRESH
DUPLICATE = Verdict.DUPLICATE
TOO_OLD = Verdict.TOO_OLD


class ReplayWindow:
    """Accepts each sequence number at most once, within the current and previous 2^20 block."""

    __slots__ = ("_block", "_current", "_previous")

    def __init__(self) -> None:
        self._block = 0
        self._current: bytearray | None = None
        self._previous: bytearray | None = None

    @property
    def block(self) -> int:
        """Index (``seq >> 20``) of the highest block committed so far."""
        return self._block

    def check(self, seq: int) -> Verdict:
        """Whether ``seq`` may be accepted; does not change the window."""
        block = seq >> WINDOW_BITS
        cur = self._block
        if block > cur:
            return FRESH
        if block == cur:
            bits = self._current
        elif block == cur - 1:
            bits = self._previous
        else:
            return TOO_OLD
        if bits is None:
            return FRESH
        bit = seq & _MASK
        return DUPLICATE if bits[bit >> 3] >> (bit & 7) & 1 else FRESH

    def commit(self, seq: int) -> None:
        """Record ``seq`` as seen, sliding the window if it is in a higher block.

        Committing a number that is already seen or too old changes nothing.
        """
        if seq < 0:
            raise ValueError(f"sequence number {seq} is negative")
        block = seq >> WINDOW_BITS
        cur = self._block
        if block == cur:
            bits = self._current
            if bits is None:
                bits = self._current = bytearray(_BYTES)
        elif block > cur:
            self._previous = self._current if block == cur + 1 else None
            bits = self._current = bytearray(_BYTES)
            self._block = block
        elif block == cur - 1:
            bits = self._previous
            if bits is None:
                bits = self._previous = bytearray(_BYTES)
        else:
            return
        bit = seq & _MASK
        bits[bit >> 3] |= 1 << (bit & 7)

    def accept(self, seq: int) -> bool:
        """Check and commit at once (for callers with nothing to verify in between)."""
        if self.check(seq) is not FRESH:
            return False
        self.commit(seq)
        return True
