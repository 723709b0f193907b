"""Issue 12, defects 7 and 8, on real routers in network namespaces.

7: `DELETE /peer` gave a running router's space away while its containers kept their
   addresses, so another host handed them out again. Now it is refused (409) while
   containers are attached, and when it is done (`weave reset` detaches first) the router
   stops.
8: a router that lost its peer-name file came back under a new name and forgot its
   containers' addresses; after `rmpeer` of the old name another host handed them out.
   Now it claims every address in use on the host under its new name at start.

A small range (/27, 30 usable addresses) makes a double hand-out certain on the old code:
the other host runs out of its own half and then hands out the freed one from the start.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

import pytest

from tests.routers import router_test_marks, wait_for
from tests.test_ipam_integration import (
    Bed,
    allocate_many,
    assert_unique_and_in_range,
    http,
    ipam_status,
    make_bed,
    own_ranges,
    owned,
    peer_name,
    ps,
    weave,
)

pytestmark = router_test_marks()

SMALL = ipaddress.IPv4Network("10.45.0.0/27")


@pytest.fixture
def bed2() -> Iterator[Bed]:
    yield from make_bed(2, ["--ipalloc-range", str(SMALL), "--ipalloc-init", "consensus"], SMALL)


def _in(ip: str, spans: list[tuple[int, int]]) -> bool:
    return any(a <= int(ipaddress.IPv4Address(ip)) < b for a, b in spans)


def _fill(bed: Bed, host_index: int, count: int, prefix: str) -> dict[str, str]:
    """Allocate `count` addresses on one host, one request at a time (donations between)."""
    host = bed.hosts[host_index]
    got: dict[str, str] = {}
    for i in range(count):
        got.update(allocate_many(host, [f"{prefix}-{i:02d}"]))
    return got


def test_delete_peer_refused_while_containers_attached(bed2: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = bed2
    show_logs(bed)
    h1, h2 = bed.hosts
    att = bed.attach(h1, "keeper")
    mine = own_ranges(h1)
    assert _in(att.ip, mine)

    ((status, body),) = http(h1, ("DELETE", "/peer"))
    assert status == 409, (status, body)
    assert att.container.netns in body and "detach" in body, body
    # Nothing moved: A keeps its space and goes on serving; B cannot take the address.
    assert own_ranges(h1) == mine
    name1 = peer_name(h1)
    assert ipam_status(h1)[name1].ips == sum(b - a for a, b in mine)
    allocate_many(h1, ["after-refusal"])
    ((status, body),) = http(h2, ("PUT", f"/ip/intruder/{att.cidr}"))
    assert status == 409, (status, body)
    # B fills the whole range, asking A for space as it runs out: never A's container's address.
    for i in range(6):
        allocate_many(h2, [f"b-{i}"])
    assert att.ip not in {c.split("/")[0] for cidrs in owned(h2).values() for c in cidrs}
    assert_unique_and_in_range(bed.hosts, SMALL)
    assert att.container.ping(att.ip, count=1, timeout=1)

    # `weave reset` still hands the space over: it detaches the containers first.
    out = weave(h1, "reset")
    assert "removed" in out.stdout and "could not hand over" not in out.stderr, (out.stdout, out.stderr)
    wait_for(lambda: ipam_status(h2).get(name1) is None or ipam_status(h2)[name1].ips == 0,
             "host2 to see host1's space handed over", 15, bed.hosts)
    assert sum(s.ips for s in ipam_status(h2).values()) == SMALL.num_addresses


def test_lost_peer_name_reclaims_the_hosts_addresses(bed2: Bed, show_logs: Callable[[Bed], None]) -> None:
    bed = bed2
    show_logs(bed)
    h1, h2 = bed.hosts
    kept = [bed.attach(h1, f"r{i}") for i in range(2)]
    ips = {a.ip for a in kept}
    old = peer_name(h1)
    before = owned(h1)

    # A plain restart: same name, same addresses.
    assert "stopped" in weave(h1, "stop").stdout
    bed.launch(h1)
    assert peer_name(h1) == old and owned(h1) == before

    # The peer-name file is lost: a new name, and still the same addresses, now its own.
    assert "stopped" in weave(h1, "stop").stdout
    (h1.state_dir / "peername").unlink()
    bed.launch(h1)
    new = peer_name(h1)
    assert new != old

    def reclaimed() -> bool:
        mine = own_ranges(h1)
        return owned(h1) == before and all(_in(ip, mine) for ip in ips)

    wait_for(reclaimed, "host1's new name to own its containers' addresses", 30, bed.hosts,
             describe=lambda: f"owned {owned(h1)} ranges {own_ranges(h1)} status {ipam_status(h1)}")
    wait_for(lambda: ipam_status(h2).get(old) is None or ipam_status(h2)[old].ips == 0,
             "host2 to see the old name own nothing", 15, bed.hosts)
    assert ps(h1) == {a.container.netns: [a.cidr] for a in kept}

    # rmpeer of the old name from B finds nothing to take, and B's new containers never
    # get an address in use on A, even when B fills the range.
    out = weave(h2, "rmpeer", old, check=False)
    assert out.returncode != 0 or out.stdout == f"0 IPs taken over from {old}\n", (out.stdout, out.stderr)
    new_on_b = [bed.attach(h2, f"b{i}") for i in range(3)]
    for i in range(14):  # more than B's half: A donates, but never what its containers use
        allocate_many(h2, [f"fill-{i}"])
    on_b = {c.split("/")[0] for cidrs in owned(h2).values() for c in cidrs}
    assert not on_b & ips, (on_b & ips)
    assert not {a.ip for a in new_on_b} & ips
    assert_unique_and_in_range(bed.hosts, SMALL)
