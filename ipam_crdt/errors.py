"""IPAM error types.

Errors caused by data from another peer derive from `router.errors.WireError`, so the mesh
treats them as Weave does: it logs the message and drops the connection it came on. The
messages use Weave's wording, because operators search for them.
"""

from __future__ import annotations

from router.errors import WireError


class IPAMError(ValueError):
    """Base of every error raised by the IPAM core."""


class IPAMWireError(IPAMError, WireError):
    """An IPAM message from another peer that we cannot accept."""


class RingInvariantError(IPAMWireError):
    """A ring (ours after a merge, or a received one) breaks the ring's invariants."""


class RingNotSorted(RingInvariantError):
    def __init__(self) -> None:
        super().__init__("Ring not sorted")


class TokenRepeated(RingInvariantError):
    def __init__(self) -> None:
        super().__init__("Token appears twice in ring")


class TokenOutOfRange(RingInvariantError):
    def __init__(self) -> None:
        super().__init__("Token is out of range")


class TooMuchFreeSpace(RingInvariantError):
    pass


class MergeError(IPAMWireError):
    """A merge that would break the rule that only the owner changes its entries."""


class InvalidMergeResult(MergeError):
    """Merging was possible but the result is not a valid ring."""


class DifferentSeeds(MergeError):
    """The other ring was created from a different set of seed peers (weave#3908)."""

    def __init__(self, received: list[int], ours: list[int], message: str | None = None) -> None:
        super().__init__(message or "Received ring was seeded differently from ours")
        self.received = received
        self.ours = ours


class DifferentRange(MergeError):
    """The other ring covers a different address range (`--ipalloc-range` differs)."""

    def __init__(self, received: object, ours: object, message: str | None = None) -> None:
        super().__init__(message or "Received range differs from ours")
        self.received = received
        self.ours = ours


class InconsistentEntry(MergeError):
    """Same token and version, different owner, and we have allocations there."""


class EntryInMyRange(MergeError):
    """A foreign token splits one of our ranges that holds allocations."""


class NewerVersion(MergeError):
    """Someone else changed one of our entries and we cannot accept it."""


class RingStateError(IPAMError):
    """An operation that the current ring does not allow (a bug in the caller)."""


class InvalidRequest(IPAMError):
    """A local request (HTTP, CLI, plugin) with bad arguments."""


class NotFound(IPAMError):
    """Free/lookup of something that is not there."""


class StoreError(IPAMError):
    """The persisted IPAM data cannot be read or written."""
