"""What allocator calls return, and the events that end requests which had to wait."""

from __future__ import annotations

from dataclasses import dataclass

from ipam_crdt.address import CIDR
from router.gossip_api import Action


@dataclass(frozen=True)
class Allocated:
    ident: str
    subnet: CIDR
    cidr: CIDR


@dataclass(frozen=True)
class AllocateFailed:
    ident: str
    subnet: CIDR
    reason: str


@dataclass(frozen=True)
class Claimed:
    ident: str
    cidr: CIDR


@dataclass(frozen=True)
class ClaimFailed:
    ident: str
    cidr: CIDR
    reason: str


@dataclass(frozen=True)
class Primed:
    pass


Event = Allocated | AllocateFailed | Claimed | ClaimFailed | Primed


@dataclass(frozen=True)
class AllocateResult:
    """`cidr` is the address (with the subnet's prefix) or None while pending.

    A pending request ends later with an `Allocated` or `AllocateFailed` event.
    """

    cidr: CIDR | None
    actions: list[Action]
    error: str | None = None

    @property
    def pending(self) -> bool:
        return self.cidr is None and self.error is None


@dataclass(frozen=True)
class ClaimResult:
    done: bool
    actions: list[Action]
    error: str | None = None
