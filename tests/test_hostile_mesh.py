"""Hostile inputs against real routers (issue 12): peers and local callers that send
what an honest router or user never would. Each test checks the routers stay up, the
mesh stays whole, the log says why the input was refused, and nothing wrote a traceback.

The evil peer is `tests.attacks.evil_peer`, run inside a test host's namespace.
"""

from __future__ import annotations

import re

from router.testbed import Host, Testbed
from tests.routers import evil_peer, launch, log_text, router_test_marks, wait_for, weave
from tests.test_mesh_integration import mesh_problems, report, wait_full_mesh

pytestmark = router_test_marks("curl")

LAUNCH_FLAGS = ("--no-fastdp",)  # the data path plays no part here


def alive(host: Host) -> bool:
    return host.run(["weave", "status"], env=host.env, check=False, timeout=10).returncode == 0


def curl(host: Host, *args: str) -> tuple[int, str]:
    """curl inside the host against its own API: (HTTP status, body)."""
    res = host.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args], timeout=60)
    body, _, code = res.stdout.rpartition("\n")
    return int(code), body


API = "http://127.0.0.1:6784"


# ---------------------------------------------------------------- defect 1

BAD_GOSSIP_ADDRESSES = (
    "a" * 64 + ":6783",  # getaddrinfo: UnicodeError (IDNA label too long)
    "x..y:6783",  # IDNA: empty label
    "10.0.0.1:99999",
)


def test_a_poisoned_topology_leaves_every_router_up(module_testbed: Testbed) -> None:
    tb = module_testbed
    h1, h2, h3, evil = (tb.add_host() for _ in range(4))
    launch(h1, *LAUNCH_FLAGS)
    launch(h2, *LAUNCH_FLAGS, h1.address)
    launch(h3, *LAUNCH_FLAGS, h1.address)
    routers = [h1, h2, h3]
    wait_full_mesh(routers)

    args = [arg for address in BAD_GOSSIP_ADDRESSES for arg in ("--address", address)]
    out = evil_peer(evil, h1, "poison-topology", *args, "--hold", "4")
    assert "sent" in out and "closed by router" not in out, out
    # The poisoned entry was relayed: every router dialled (or tried to) a bad address.
    out = evil_peer(evil, h2, "poison-topology", "--inbound", "--address", "a" * 64 + ":1", "--hold", "2")
    assert "sent" in out, out

    for h in routers:
        assert alive(h), f"{h.name} died:\n{log_text(h)[-3000:]}"
    # Once the evil peer has gone, the three form a full mesh again, alone.
    wait_for(lambda: not mesh_problems({h.name: report(h) for h in routers}), "the mesh of 3 alone", 30, routers)
    for h in routers:
        text = log_text(h)
        assert "Traceback" not in text, f"{h.name}:\n{text}"
        why = r"ignoring peer address from gossip: invalid peer address '(a{64}:6783|x\.\.y:6783|10\.0\.0\.1:99999)'"
        assert re.search(why, text), f"{h.name} does not say why it refused the address:\n{text[-3000:]}"
        # Each of them was refused (the log line is rate limited; the count is not).
        _, metrics = curl(h, f"{API}/metrics")
        found = re.search(r'pyweave_inputs_rejected_total\{component="mesh",reason="bad_gossip_address"\} (\S+)',
                          metrics)
        assert found and float(found.group(1)) >= len(BAD_GOSSIP_ADDRESSES), metrics
        targets = weave(h, "status", "targets")
        assert "aaaa" not in targets and "x..y" not in targets, targets
    for h in routers:
        weave(h, "stop")


# ---------------------------------------------------------------- defect 2


def test_bad_peers_from_the_api_and_the_cli_are_refused(module_testbed: Testbed) -> None:
    tb = module_testbed
    h1, h2 = tb.add_host(), tb.add_host()
    launch(h1, *LAUNCH_FLAGS, "10.98.0.250")
    before = weave(h1, "status", "targets")
    assert "10.98.0.250:6783" in before, before

    for data in ("peer=%ff", "peer=" + "a" * 64, "peer=%e2%98%83", "peer=10.98.0.251&peer=%ff", "peer=h:0"):
        code, body = curl(h1, "-X", "POST", f"{API}/connect", "--data", data)
        assert code == 400, (data, code, body)
        assert "invalid peer address" in body, (data, body)
    code, body = curl(h1, "-X", "POST", f"{API}/forget", "--data", "peer=%ff&peer=" + "a" * 64)
    assert code == 400 and "invalid peer address" in body, (code, body)

    # The CLI: one line saying why, a non-zero exit, no traceback.
    for bad in ("\udcff", "a" * 64, "\u2603"):
        for command in ("connect", "forget"):
            res = h1.run(["weave", command, bad.encode("utf-8", "surrogateescape")],  # type: ignore[list-item]
                         env=h1.env, check=False, timeout=30)
            assert res.returncode != 0, res
            assert "Traceback" not in res.stderr, res.stderr
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "invalid peer address" in lines[0], res.stderr
    # A body whose length is absurd or too big is refused, not read.
    code, _ = curl(h1, "-X", "POST", f"{API}/connect", "-H", "Content-Length: 99999999999999999999",
                   "--data", "peer=10.98.0.252")
    assert code in (400, 413), code
    code, _ = curl(h1, "-X", "POST", f"{API}/connect", "-H", "Content-Length: x", "--data", "peer=10.98.0.252")
    assert code == 400, code
    big = h1.state_dir / "big-body"
    big.write_text("peer=" + "1" * (2 << 20))
    for how in (("-H", "Expect:"), ("-H", "Transfer-Encoding: chunked")):  # with a length, and without
        code, _ = curl(h1, "-X", "POST", f"{API}/connect", *how, "--data-binary", f"@{big}")
        assert code == 413, (how, code)

    # The daemon lives on, with nothing added.
    wait_for(lambda: alive(h1), "the router to answer", 20, [h1])
    assert weave(h1, "status", "targets") == before
    assert "Traceback" not in log_text(h1)

    # {{.DNS.Entries}} renders as Go's text/template would.
    # No entries: Weave's nil slice, which Go prints as [] (and its json func as null).
    assert weave(h1, "report", "-f", "{{.DNS.Entries}}").strip() == "[]"
    assert weave(h1, "report", "-f", "{{json .DNS.Entries}} {{.Router.Encryption}}").strip() == "null false"

    # `weave launch` with a bad peer refuses before starting anything.
    res = h2.run(["weave", "launch", "--nickname", "host2", "a" * 64], env=h2.env, check=False, timeout=60)
    assert res.returncode != 0, res.stdout
    assert "invalid peer address" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    status = h2.run(["weave", "status"], env=h2.env, check=False, timeout=30)
    assert status.returncode != 0 and "weave is not running" in status.stderr, status
    assert not (h2.state_dir / "weaver.pid").exists()
    weave(h1, "stop")
