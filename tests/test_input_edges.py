"""Inputs that used to escape as the wrong exception type (issue 12's audit): non-ASCII
digits that pass str.isdigit() but not int(), a NUL byte that os.stat refuses with
ValueError, and an exception in a callback the sleeve's receiving thread hands to trio
(which would end the whole trio run, i.e. the daemon)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ipam_crdt.config import parse_ipalloc_init
from ipam_crdt.errors import InvalidRequest
from router import ratelog
from router.containers import ContainerError, resolve
from sleeve.service import SleeveOverlay


@pytest.mark.parametrize("spec", ["²", "١٢٣", "c\0", "/proc/1/ns/net\0"])
def test_container_specs_that_are_not_names_are_container_errors(spec: str) -> None:
    with pytest.raises(ContainerError):
        resolve(spec)


@pytest.mark.parametrize("text", ["consensus=²", "consensus=١"])
def test_ipalloc_init_with_non_ascii_digits_is_an_invalid_request(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_ipalloc_init(text)


def test_a_failing_special_frame_handler_is_counted_not_raised() -> None:
    def boom(sender: int, address: tuple[str, int], frame: bytes) -> None:
        raise IndexError("a bug")

    before = ratelog.REJECTS.snapshot().get(("sleeve", "internal_error"), 0)
    SleeveOverlay._special_safely(SimpleNamespace(_special=boom), 1, ("192.0.2.1", 6783), b"")  # type: ignore[arg-type]
    assert ratelog.REJECTS.snapshot()[("sleeve", "internal_error")] == before + 1
