"""IPv4 addresses as integers, half-open ranges and CIDR blocks (Weave's `net/address`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ipam_crdt.errors import InvalidRequest

MAX_ADDRESS = (1 << 32) - 1
# First and last address of a subnet are excluded from allocation (RFC 1122), so a
# subnet needs at least 4 addresses to hold 2 hosts.
MIN_SUBNET_SIZE = 4


def ip_str(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def parse_ip(text: str) -> int:
    try:
        return int(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise InvalidRequest(f"invalid IPv4 address {text!r}") from None


@dataclass(frozen=True, order=True)
class Range:
    """Addresses [start, end); start <= end."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def overlaps(self, other: Range) -> bool:
        return not (self.start >= other.end or self.end <= other.start)

    def __str__(self) -> str:
        return f"{ip_str(self.start)}-{ip_str(self.end - 1)}"

    def as_cidr_string(self) -> str:
        size = self.size
        if size > 0 and size & (size - 1) == 0 and self.start % size == 0:
            return str(CIDR(self.start, 32 - (size.bit_length() - 1)))
        return str(self)


@dataclass(frozen=True, order=True)
class CIDR:
    """An address with a prefix length; `addr` need not be the network address."""

    addr: int
    prefix_len: int

    @classmethod
    def parse(cls, text: str) -> CIDR:
        addr_text, sep, plen_text = text.strip().partition("/")
        # isdigit() alone lets through superscripts, which int() refuses, and other scripts' digits.
        if not sep or not (plen_text.isascii() and plen_text.isdigit()) or not 0 <= int(plen_text) <= 32:
            raise InvalidRequest(f"invalid CIDR {text!r}: expected a.b.c.d/len")
        return cls(parse_ip(addr_text), int(plen_text))

    @classmethod
    def parse_subnet(cls, text: str) -> CIDR:
        """A CIDR that must be a network address of a usable size, as for --ipalloc-range."""
        cidr = cls.parse(text)
        if not cidr.is_subnet():
            raise InvalidRequest(f"invalid subnet - bits after network prefix are not all zero: {text}")
        if cidr.size < MIN_SUBNET_SIZE:
            raise InvalidRequest(f"invalid subnet - smaller than minimum size {MIN_SUBNET_SIZE}: {text}")
        return cidr

    @property
    def size(self) -> int:
        return 1 << (32 - self.prefix_len)

    @property
    def network(self) -> int:
        return self.addr & ~(self.size - 1) & MAX_ADDRESS

    def is_subnet(self) -> bool:
        return self.addr & (self.size - 1) == 0

    def range(self) -> Range:
        return Range(self.network, self.network + self.size)

    def host_range(self) -> Range:
        return Range(self.network + 1, self.network + self.size - 1)

    def with_addr(self, addr: int) -> CIDR:
        return CIDR(addr, self.prefix_len)

    def __str__(self) -> str:
        return f"{ip_str(self.addr)}/{self.prefix_len}"


def biggest_cidr_range(r: Range) -> Range:
    """The largest CIDR-aligned block inside `r`; the lowest one if several fit."""
    if r.size <= 0:
        return Range(r.start, r.start)
    size = 1 << (r.size.bit_length() - 1)
    while size > 1:
        aligned = -(-r.start // size) * size
        if aligned + size <= r.end:
            return Range(aligned, aligned + size)
        size //= 2
    return Range(r.start, r.start + 1)
