"""Regression tests for what the fuzz targets found, each a minimal reproducer."""

from __future__ import annotations

import pytest

from ipam_crdt.address import CIDR
from ipam_crdt.errors import InvalidRequest
from ipam_crdt.service import BadRequest, IpamService


@pytest.mark.parametrize("text", ["10.32.0.1/²4", "10.32.0.1/1²", "10.32.0.0/١٢"])
def test_cidr_prefix_of_non_ascii_digits_is_a_bad_request(text: str) -> None:
    # str.isdigit() accepts superscripts and other scripts' digits, which int() refuses:
    # POST /ip/c1/10.32.0.1/%C2%B24 answered 500 with a traceback (api_ipam_params).
    with pytest.raises(InvalidRequest):
        CIDR.parse(text)
    with pytest.raises(BadRequest):
        IpamService.parse_cidr(text)
