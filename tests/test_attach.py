"""router.attach / router.expose: parsing of attach arguments and the NAT table (pure parts)."""

from __future__ import annotations

import ipaddress

import pytest

from router.attach import AddressSpec, AttachError, parse_address
from router.expose import nat_script


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("10.32.1.1/12", AddressSpec("ip", "10.32.1.1/12")),
        ("ip:10.32.1.1/12", AddressSpec("ip", "10.32.1.1/12")),
        ("net:10.2.1.7/24", AddressSpec("net", "10.2.1.0/24")),
        ("net:default", AddressSpec("net", "default")),
    ],
)
def test_attach_address_forms(text: str, spec: AddressSpec) -> None:
    assert parse_address(text) == spec


@pytest.mark.parametrize("text", ["10.32.1.1", "ip:300.1.1.1/24", "net:10.0.0.0/99", "mac:aa", "net:", "", "ip:x"])
def test_bad_attach_addresses_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(AttachError) as info:
        parse_address(text)
    assert info.value.status == 400 and repr(text) in str(info.value)


def test_nat_table_masquerades_leaving_and_entering_the_range() -> None:
    script = nat_script("weave", [ipaddress.IPv4Network("10.32.0.0/12")])
    assert "delete table ip pyweave" in script  # replaced whole, in one transaction
    assert 'ip saddr 10.32.0.0/12 ip daddr != 10.32.0.0/12 oifname != "weave" masquerade' in script
    assert 'ip saddr != 10.32.0.0/12 ip daddr 10.32.0.0/12 oifname "weave" masquerade' in script
