"""The addresses this peer owns: which are free and which are in use."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from ipam_crdt.address import Range, biggest_cidr_range, ip_str
from ipam_crdt.errors import IPAMError


class RangeSet:
    """A set of addresses kept as sorted, disjoint, non-adjacent half-open ranges."""

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for r in ranges:
            self.add(r.start, r.end)

    def __iter__(self) -> Iterator[Range]:
        return (Range(s, e) for s, e in zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return "RangeSet(" + ", ".join(f"{ip_str(r.start)}+{r.size}" for r in self) + ")"

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def contains(self, addr: int) -> bool:
        i = bisect.bisect_right(self._starts, addr) - 1
        return i >= 0 and addr < self._ends[i]

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # Every range touching or overlapping [start, end) is absorbed.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def subtract(self, start: int, end: int) -> None:
        if start >= end:
            return
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return
        new_starts, new_ends = [], []
        if self._starts[lo] < start:
            new_starts.append(self._starts[lo])
            new_ends.append(start)
        if self._ends[hi - 1] > end:
            new_starts.append(end)
            new_ends.append(self._ends[hi - 1])
        self._starts[lo:hi] = new_starts
        self._ends[lo:hi] = new_ends

    def within(self, r: Range) -> Iterator[Range]:
        """The parts of this set inside r, in order."""
        if r.start >= r.end:
            return
        i = max(bisect.bisect_right(self._ends, r.start), 0)
        while i < len(self._starts) and self._starts[i] < r.end:
            yield Range(max(self._starts[i], r.start), min(self._ends[i], r.end))
            i += 1

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    def copy(self) -> RangeSet:
        out = RangeSet()
        out._starts = list(self._starts)
        out._ends = list(self._ends)
        return out


class Space:
    """Our part of the ring, address by address: `free` plus `used` is all we own."""

    def __init__(self) -> None:
        self.free = RangeSet()
        self.used = RangeSet()

    def __repr__(self) -> str:
        return f"Space(used={self.used!r}, free={self.free!r})"

    def add(self, start: int, size: int) -> None:
        self.free.add(start, start + size)

    def add_ranges(self, ranges: Iterable[Range]) -> None:
        for r in ranges:
            self.free.add(r.start, r.end)

    def clear(self) -> None:
        self.free.clear()
        self.used.clear()

    def allocate(self, r: Range) -> int | None:
        """Take the lowest free address in r, or None if there is none."""
        for chunk in self.free.within(r):
            addr = chunk.start
            self.free.subtract(addr, addr + 1)
            self.used.add(addr, addr + 1)
            return addr
        return None

    def claim(self, addr: int) -> None:
        if not self.free.contains(addr):
            raise IPAMError(f"Address {ip_str(addr)} is not free to claim")
        self.free.subtract(addr, addr + 1)
        self.used.add(addr, addr + 1)

    def release(self, addr: int) -> None:
        """Return a used address to the free pool (Weave's Space.Free)."""
        if not self.used.contains(addr):
            raise IPAMError(f"Address {ip_str(addr)} is not ours")
        self.used.subtract(addr, addr + 1)
        self.free.add(addr, addr + 1)

    def is_used(self, addr: int) -> bool:
        return self.used.contains(addr)

    def num_used(self) -> int:
        return self.used.total()

    def num_free(self) -> int:
        return self.free.total()

    def num_free_in_range(self, r: Range) -> int:
        return sum(chunk.size for chunk in self.free.within(r))

    def has_used_in(self, ranges: Iterable[Range]) -> bool:
        return any(True for r in ranges for _ in self.used.within(r))

    def biggest_free_block(self, r: Range) -> Range:
        """The biggest CIDR-aligned free block in r; on a tie, the highest one."""
        best = Range(0, 0)
        for chunk in self.free.within(r):
            if chunk.size >= best.size:
                block = biggest_cidr_range(chunk)
                if block.size >= best.size:
                    best = block
        return best

    def donate(self, r: Range) -> Range | None:
        """Give up free space inside r: the biggest aligned block, but at most about half.

        Returns the donated range (no longer ours), or None if nothing in r is free.
        """
        block = self.biggest_free_block(r)
        if block.size == 0:
            return None
        if block.size > self.num_free_in_range(r) // 2:
            # Keep the lower half; size // 2 rounds down, so the donation is never empty.
            block = Range(block.start + block.size // 2, block.end)
        self.free.subtract(block.start, block.end)
        self.used.subtract(block.start, block.end)
        return block

    def owned_ranges(self) -> list[Range]:
        """Everything we own, used or free, as maximal contiguous ranges."""
        everything = self.used.copy()
        for r in self.free:
            everything.add(r.start, r.end)
        return list(everything)

    def update_ranges(self, ranges: Iterable[Range]) -> None:
        """Make what we own match the ring: new ranges become free, lost ones go.

        Used addresses outside the ranges are kept (they are recorded allocations; the
        ring merge refuses to take away ranges that hold them).
        """
        wanted = RangeSet(ranges)
        free = wanted.copy()
        for r in self.used:
            free.subtract(r.start, r.end)
        self.free = free
