"""The CI fuzz pass: every registered decoder, a few seconds each (bench/fuzz.py runs long passes).

Each input is a seed (real bytes) with a few structure-aware edits, a splice of two
seeds, or plain random bytes; it must give a valid result or one of the target's clean
errors, within the deadline. PYWEAVE_FUZZ_SCALE multiplies the number of examples.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import mutate
from tests.fuzz.targets import TARGETS, Target

SCALE = float(os.environ.get("PYWEAVE_FUZZ_SCALE", "1"))
DEADLINE = timedelta(milliseconds=float(os.environ.get("PYWEAVE_FUZZ_DEADLINE_MS", "1000")))

_OPS = st.tuples(st.integers(0, mutate.N_OPS - 1), st.integers(0, (1 << 24) - 1), st.integers(0, 0xFFFF))


def inputs(target: Target) -> st.SearchStrategy[bytes]:
    seeds = target.seeds()
    raw = st.binary(max_size=512)
    if not seeds:
        return raw

    mutated = st.builds(
        lambda seed, ops: mutate.apply(seed, ops, seeds),
        st.sampled_from(seeds),
        st.lists(_OPS, min_size=1, max_size=6),
    )
    return st.one_of(mutated, mutated, mutated, raw)


def check(target: Target, data: bytes) -> None:
    try:
        target.run(data)
    except target.errors:
        pass


CASES = [pytest.param(t, id=t.name) for t in TARGETS.values()]


@pytest.fixture(autouse=True)
def _quiet() -> object:
    # Rejections log at debug/info; thousands of examples must not flood the captured log.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("target", CASES)
def test_seeds_decode_cleanly(target: Target) -> None:
    """The seeds themselves (real traffic, our encoders' output) never make a finding."""
    seeds = target.seeds()
    assert seeds, f"{target.name} has no seed corpus"
    for seed in seeds:
        check(target, seed)


@pytest.mark.parametrize(
    "target", [c for c in CASES if c.values[0].reproducers()]  # type: ignore[union-attr]
)
def test_past_findings(target: Target) -> None:
    """Minimal inputs of the findings made while issue 12 was fixed: each is refused cleanly."""
    for data in target.reproducers():
        check(target, data)


@pytest.mark.parametrize("target", CASES)
def test_fuzz(target: Target) -> None:
    @settings(
        max_examples=max(1, int(target.examples * SCALE)),
        deadline=DEADLINE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(inputs(target))
    def run(data: bytes) -> None:
        check(target, data)

    run()


def test_registry_is_complete() -> None:
    """One entry per decoder that takes outside bytes (see issue 12's list)."""
    wanted = {
        "gob_v2_values", "gob_v1_stream", "handshake_plain", "handshake_password", "session_v2_sealed",
        "session_v1_sealed", "mesh_frames", "gossip_envelope", "topology_update", "ipam_gossip",
        "ipam_unicast", "dns_gossip", "sleeve_plain", "sleeve_encrypted", "fastdp_probe_frame",
        "dns_udp_query", "dns_tcp_stream", "api_connect_peer", "api_ipam_params", "api_dns_params",
    }
    assert wanted <= set(TARGETS)
