"""The ring CRDT: which peer owns which part of the allocation range.

The range [start, end) is cut by tokens; an entry owns [token, next token), the last one
wrapping around to the first. Each entry carries the owner, a version and the owner's
count of free addresses in it. Only the owner changes an entry (bumping its version),
except an administrator's transfer (rmpeer, shutdown), which adds 100 to the version so
that it wins over the owner's ordinary changes. Merging two rings keeps, per token, the
higher version, and refuses merges that would take ranges with allocations away from us.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from ipam_crdt.address import Range, ip_str
from ipam_crdt.errors import (
    DifferentRange,
    DifferentSeeds,
    EntryInMyRange,
    InconsistentEntry,
    InvalidMergeResult,
    NewerVersion,
    RingInvariantError,
    RingNotSorted,
    RingStateError,
    TokenOutOfRange,
    TokenRepeated,
    TooMuchFreeSpace,
)
from ipam_crdt.naming import peer_str

log = logging.getLogger(__name__)

UNKNOWN_PEER = 0
# A transfer must beat any number of ordinary updates the old owner may have made
# that we have not heard about yet.
TRANSFER_VERSION_BUMP = 100

HasAllocations = Callable[[list[Range]], bool]


@dataclass(frozen=True)
class Entry:
    token: int
    peer: int
    version: int = 0
    free: int = 0

    def same_claim(self, other: Entry) -> bool:
        """Weave's equality: the free count is advisory and does not take part."""
        return self.token == other.token and self.peer == other.peer and self.version == other.version


@dataclass(frozen=True)
class RangeInfo:
    peer: int
    range: Range
    version: int


class Ring:
    def __init__(
        self,
        start: int,
        end: int,
        peer: int,
        entries: Iterable[Entry] = (),
        seeds: Iterable[int] = (),
    ) -> None:
        if not start < end:
            raise RingStateError(f"ring range must not be empty: [{start}, {end})")
        self.start = start
        self.end = end
        self.peer = peer
        self.entries: list[Entry] = list(entries)
        self.seeds: list[int] = list(seeds)

    # ------------------------------------------------------------ basics

    def copy(self, peer: int | None = None) -> Ring:
        return Ring(self.start, self.end, self.peer if peer is None else peer, self.entries, self.seeds)

    def restore(self, other: Ring) -> None:
        """Take over a persisted ring's state (keeping our own peer name)."""
        self.start, self.end = other.start, other.end
        self.entries = list(other.entries)
        self.seeds = list(other.seeds)

    def state(self) -> tuple[int, int, tuple[Entry, ...], tuple[int, ...]]:
        """Everything that must agree between converged peers (the sender's name aside)."""
        return (self.start, self.end, tuple(self.entries), tuple(self.seeds))

    def is_empty(self) -> bool:
        return not self.entries

    @property
    def range(self) -> Range:
        return Range(self.start, self.end)

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def peer_names(self) -> set[int]:
        return {e.peer for e in self.entries}

    def __repr__(self) -> str:
        body = ", ".join(
            f"{ip_str(e.token)}->{peer_str(e.peer)} v{e.version} free {e.free}" for e in self.entries
        )
        return f"Ring[{ip_str(self.start)}, {ip_str(self.end)}) {{{body}}}"

    def _distance(self, start: int, end: int) -> int:
        """Addresses from start up to end, going round the ring if end <= start."""
        if end > start:
            return end - start
        return (self.end - start) + (end - self.start)

    @staticmethod
    def _at(entries: Sequence[Entry], i: int) -> Entry:
        return entries[i % len(entries)]

    def _index_at_or_before(self, addr: int) -> int:
        """Index of the last entry with token <= addr; -1 if addr precedes every token."""
        lo, hi = 0, len(self.entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.entries[mid].token <= addr:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    def _find(self, token: int) -> int | None:
        i = self._index_at_or_before(token)
        return i if i >= 0 and self.entries[i].token == token else None

    # ------------------------------------------------------------ invariants

    def check(self) -> None:
        self.check_entries(self.entries)

    def check_entries(self, entries: Sequence[Entry]) -> None:
        for a, b in zip(entries, entries[1:], strict=False):
            if a.token > b.token:
                raise RingNotSorted()
        for a, b in zip(entries, entries[1:], strict=False):
            if a.token == b.token:
                raise TokenRepeated()
        if not entries:
            return
        if entries[0].token < self.start or entries[-1].token >= self.end:
            raise TokenOutOfRange()
        for i, e in enumerate(entries):
            nxt = self._at(entries, i + 1)
            distance = self._distance(e.token, nxt.token)
            if e.free > distance:
                raise TooMuchFreeSpace(
                    f"Entry {ip_str(e.token)}-{ip_str(nxt.token)} reporting too much free space: "
                    f"{e.free} > {distance}"
                )

    # ------------------------------------------------------------ ranges

    def _make_ranges(self, start: int, end: int) -> list[Range]:
        return self._split_over_zero([Range(start, end)])

    def _split_over_zero(self, ranges: list[Range]) -> list[Range]:
        """Ranges are in ring order; the last one may end at or wrap past the origin."""
        if not ranges:
            return ranges
        last = ranges[-1]
        if last.end == self.start:
            ranges[-1] = Range(last.start, self.end)
        elif last.end <= last.start:
            ranges = [Range(self.start, last.end), *ranges[:-1], Range(last.start, self.end)]
        return ranges

    def owned_ranges(self, peer: int | None = None) -> list[Range]:
        """The ranges `peer` (default: us) owns, sorted, split where they wrap around."""
        who = self.peer if peer is None else peer
        ranges = [
            Range(e.token, self._at(self.entries, i + 1).token)
            for i, e in enumerate(self.entries)
            if e.peer == who
        ]
        return self._split_over_zero(ranges)

    def all_range_info(self) -> list[RangeInfo]:
        out = []
        for i, e in enumerate(self.entries):
            for r in self._make_ranges(e.token, self._at(self.entries, i + 1).token):
                out.append(RangeInfo(e.peer, r, e.version))
        return out

    def owner(self, addr: int) -> int:
        if not self.contains(addr):
            raise RingStateError(f"address {ip_str(addr)} is outside the ring {self.range}")
        if not self.entries:
            return UNKNOWN_PEER
        return self._at(self.entries, self._index_at_or_before(addr)).peer

    # ------------------------------------------------------------ local changes

    def claim_for_peers(self, peers: Sequence[int]) -> None:
        """Split an empty ring among `peers` in CIDR-aligned pieces (recursive halving)."""
        if self.entries:
            raise RingStateError("can only claim an empty ring")
        if not peers:
            raise RingStateError("cannot claim the ring for no peers")
        new: list[Entry] = []

        def subdivide(lo: int, hi: int, who: Sequence[int]) -> None:
            share = hi - lo
            if share == 0:
                return
            if share == 1 or len(who) == 1:
                new.append(Entry(lo, who[0], 0, share))
                return
            mid = lo + share // 2
            subdivide(lo, mid, who[: len(who) // 2])
            subdivide(mid + share % 2, hi, who[len(who) // 2 :])

        subdivide(self.start, self.end, list(peers))
        self.check_entries(new)
        self.entries = new
        self.seeds = list(peers)

    def grant_range_to_host(self, start: int, end: int, peer: int) -> None:
        """Give [start, end), which we own, to `peer`. Inserts at most two tokens."""
        if not (self.start <= start < end <= self.end):
            raise RingStateError(f"cannot grant [{ip_str(start)}, {ip_str(end)}): not inside the ring")
        if not self.entries:
            raise RingStateError("cannot grant from an empty ring")
        entries = self.entries
        before = self._index_at_or_before(start)
        if self._at(entries, before).peer != self.peer or any(
            e.peer != self.peer for e in entries if start < e.token < end
        ):
            raise RingStateError(f"cannot grant {Range(start, end)}: we do not own all of it")

        start_free = min(self._distance(start, self._at(entries, before + 1).token), end - start)
        prev = self._at(entries, before)
        if prev.token == start:
            idx = before % len(entries)
            entries[idx] = _updated(prev, peer, start_free)
        else:
            # The entry we split keeps [prev.token, start); its old free count is unknown now.
            idx = before + 1
            entries.insert(idx, Entry(start, peer, 0, start_free))
            prev_idx = (idx - 1) % len(entries)
            entries[prev_idx] = _updated(prev, self.peer, self._distance(prev.token, start))

        pos = idx + 1
        while pos < len(entries) and entries[pos].token < end:
            e = entries[pos]
            entries[pos] = _updated(e, peer, min(e.free, self._distance(e.token, end)))
            pos += 1

        # There is never a token at self.end: the end of the ring is exclusive.
        if end == self.end:
            end = self.start
        if self._find(end) is not None:
            return
        end_free = self._distance(end, self._at(entries, pos).token)
        self._insert(Entry(end, self.peer, 0, end_free))

    def _insert(self, entry: Entry) -> None:
        i = self._index_at_or_before(entry.token)
        if i >= 0 and self.entries[i].token == entry.token:
            raise RingStateError(f"token {ip_str(entry.token)} already in the ring")
        self.entries.insert(i + 1, entry)

    def report_free(self, freespace: Mapping[int, int]) -> bool:
        """Record our free counts, keyed by the start of each of our owned ranges."""
        if not self.entries:
            raise RingStateError("cannot report free space on an empty ring")
        free = dict(freespace)
        # owned_ranges() splits a range that wraps around; put the two halves together again.
        if self.start in free and self.entries[0].token != self.start:
            last = self.entries[-1].token
            if last not in free:
                raise RingStateError("free space reported for half of a wrapped range")
            free[last] += free.pop(self.start)
        updated = False
        for token, count in free.items():
            i = self._find(token)
            if i is None or self.entries[i].peer != self.peer:
                raise RingStateError(f"cannot report free space at {ip_str(token)}: not our token")
            e = self.entries[i]
            if count > self._distance(e.token, self._at(self.entries, i + 1).token):
                raise RingStateError(f"reporting {count} free at {ip_str(token)}, more than the range holds")
            if e.free != count:
                self.entries[i] = replace(e, free=count, version=e.version + 1)
                updated = True
        return updated

    def transfer(self, from_peer: int, to_peer: int) -> list[Range]:
        """Hand every entry of `from_peer` to `to_peer`; return the ranges that moved."""
        moved = []
        for i, e in enumerate(self.entries):
            if e.peer == from_peer:
                self.entries[i] = replace(e, peer=to_peer, version=e.version + TRANSFER_VERSION_BUMP)
                moved.append(Range(e.token, self._at(self.entries, i + 1).token))
        return self._split_over_zero(moved)

    # ------------------------------------------------------------ choosing peers

    def choose_peers_to_ask_for_space(self, start: int, end: int, rng: random.Random) -> list[int]:
        """Peers with free space overlapping [start, end), heaviest-weighted first.

        Weight = the peer's total free count there times a random number, so bigger
        donors are likelier to be asked first without everyone asking the same one.
        """
        totals: dict[int, int] = {}
        for i, e in enumerate(self.entries):
            nxt = self.entries[i + 1].token if i + 1 < len(self.entries) else self.end
            if nxt <= start:
                continue
            if e.token >= end:
                break
            if e.free == 0 or e.peer == self.peer:
                continue
            totals[e.peer] = totals.get(e.peer, 0) + e.free
        weighted = [(totals[p] * rng.random(), p) for p in sorted(totals)]
        weighted.sort(key=lambda wp: wp[0], reverse=True)
        return [p for _, p in weighted]

    def pick_peer_for_transfer(self, is_valid: Callable[[int], bool]) -> int:
        for e in self.entries:
            if e.peer != self.peer and is_valid(e.peer):
                return e.peer
        return UNKNOWN_PEER

    # ------------------------------------------------------------ merge

    def merge(self, gossip: Ring, has_allocations: HasAllocations) -> bool:
        """Merge a received ring into ours; True if ours changed.

        Raises a MergeError (or RingInvariantError for a malformed ring) and leaves our
        ring untouched if the received one cannot be accepted.
        """
        gossip.check()
        if gossip.seeds and self.seeds and gossip.seeds != self.seeds:
            raise DifferentSeeds(list(gossip.seeds), list(self.seeds))
        if (gossip.start, gossip.end) != (self.start, self.end):
            raise DifferentRange(gossip.range, self.range)

        result, updated = self._merge_entries(gossip.entries, has_allocations)

        # Accepting someone's split of a range of ours (which had no allocations) can
        # leave our free count larger than what remains; clamp it.
        for i, e in enumerate(result):
            distance = self._distance(e.token, self._at(result, i + 1).token)
            if e.peer == self.peer and e.free > distance:
                result[i] = replace(e, free=distance)

        try:
            self.check_entries(result)
        except RingInvariantError as exc:
            raise InvalidMergeResult(f"Merge of incoming data causes: {exc}") from None

        if not self.seeds:
            self.seeds = list(gossip.seeds)
        self.entries = result
        return updated

    def _merge_entries(
        self, theirs: Sequence[Entry], has_allocations: HasAllocations
    ) -> tuple[list[Entry], bool]:
        us = self.peer
        mine = self.entries
        result: list[Entry] = []
        updated = False
        # Owner of the range the next incoming token would land in, as far as we can tell.
        prev_owner: int | None = None

        def mine_after(i: int) -> int:
            return self._at(mine, i + 1).token

        i = j = 0
        while i < len(mine) and j < len(theirs):
            m, t = mine[i], theirs[j]
            if m.token < t.token:
                result.append(m)
                prev_owner = m.peer
                i += 1
                continue
            if m.token > t.token:
                if prev_owner == us and t.peer != us and has_allocations(self._make_ranges(t.token, m.token)):
                    raise EntryInMyRange(_entry_in_my_range(t))
                result.append(t)
                updated, prev_owner = True, None
                j += 1
                continue
            # Same token.
            if m.version > t.version or (m.version == t.version and m.same_claim(t)):
                result.append(m)
                prev_owner = m.peer
            elif m.version == t.version:
                if m.peer == us and has_allocations(self._make_ranges(t.token, mine_after(i))):
                    raise InconsistentEntry(
                        f"Inconsistent entries for {ip_str(m.token)}: owned by {peer_str(m.peer)} "
                        f"but incoming message says {peer_str(t.peer)}"
                    )
                # Tie-break so that both sides pick the same entry.
                if m.free >= t.free:
                    result.append(m)
                    prev_owner = m.peer
                else:
                    result.append(t)
                    updated, prev_owner = True, None
            elif m.peer != us:
                result.append(t)
                updated, prev_owner = True, None
            elif t.peer != us and not has_allocations(self._make_ranges(m.token, mine_after(i))):
                log.info(
                    "ring: repair inconsistent data by accepting token %s from %s - no allocations up to %s",
                    ip_str(t.token), peer_str(t.peer), ip_str(mine_after(i)),
                )
                result.append(t)
                updated, prev_owner = True, None
            elif t.peer == us:
                # Someone holds a newer version of our own entry (e.g. from before we
                # restarted): re-impose ours with a version that beats it.
                result.append(replace(m, version=t.version + 1))
                updated = True
            else:
                raise NewerVersion(
                    f"Received update for IP range I own at {ip_str(m.token)} v{m.version}: "
                    f"incoming message says owner {peer_str(t.peer)} v{t.version}"
                )
            i += 1
            j += 1

        result.extend(mine[i:])
        for t in theirs[j:]:
            if prev_owner == us and t.peer != us and mine and has_allocations(
                self._make_ranges(t.token, mine[0].token)
            ):
                raise EntryInMyRange(_entry_in_my_range(t))
            result.append(t)
            updated, prev_owner = True, None
        return result, updated


def _updated(e: Entry, peer: int, free: int) -> Entry:
    return Entry(e.token, peer, e.version + 1, free)


def _entry_in_my_range(t: Entry) -> str:
    return f"Peer {peer_str(t.peer)} says it owns the IP range from {ip_str(t.token)}, which I think I own"
