"""Real routers and a stranger flooding made-up gossip channel names (issue 12, defect 3).

host1 and host2 run routers. A fake peer on host3 (the stranger) connects to host1 and
gossips on 70 made-up channels; a fake peer on host4 (an honest Weave application)
connects to host2 and then gossips on a new channel of its own. Before the fix the
routers' one table of 64 unknown channels, shared by every connection, was full after
the flood and host2 closed the honest peer's connection ("too many unknown gossip
channels"). Now each connection is charged for its own channels: the stranger's excess
is dropped and counted on host1, every connection stays up, and the honest channel is
relayed across both routers (the stranger, a neighbour of host1, receives it).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.peername import format_peer_name, random_peer_name
from router.surrogate import MAX_CHANNELS_PER_CONNECTION
from router.testbed import Host, Testbed
from tests.routers import launch, log_text, router_test_marks, spawn_evil_peer, wait_for
from tests.test_mesh_integration import (
    established_to,
    own_name,
    peer_entry,
    report,
    wait_full_mesh,
    weave_metrics,
)

pytestmark = router_test_marks()

FLOOD = 70
HONEST_CHANNEL = "weave-app"

# The fake peers are `tests.attacks.evil_peer listen`: each keeps its connection up,
# prints one JSON line per gossip message it receives on a channel other than
# "topology" (and "closed by router" if the router hangs up), and once its trigger file
# exists sends its traffic (the stranger: FLOOD made-up channels) and prints "sent".


def spawn_fake_peer(host: Host, router: Host, mode: str, name: str, trigger: Path, *args: str) -> Path:
    return spawn_evil_peer(host, router, f"fake-{mode}", "--name", name, "--nickname", f"fake-{mode}",
                           "listen", "--trigger", str(trigger), *args)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def connected_to(rep: dict[str, Any], name: str) -> set[str]:
    """Names of the peers `name` lists a connection to, established or not (a fake peer
    runs no data path, so its connection is never established)."""
    entry = peer_entry(rep, name)
    return set() if entry is None else {c["Name"] for c in entry["Connections"]}


def messages(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path) if line.startswith("{")]


def test_a_stranger_flooding_channel_names_costs_no_honest_peer_its_connection(
    make_testbed: Callable[[int], Testbed],
) -> None:
    tb = make_testbed(4)
    h1, h2, stranger_host, honest_host = tb.hosts
    launch(h1)
    launch(h2, h1.address)
    meshed = wait_full_mesh([h1, h2])
    n1, n2 = own_name(meshed["host1"]), own_name(meshed["host2"])
    stranger = format_peer_name(random_peer_name())
    honest = format_peer_name(random_peer_name())
    flood_trigger = tb.state_root / f"flood-{secrets.token_hex(4)}"
    trigger = tb.state_root / f"go-{secrets.token_hex(4)}"
    honest_log = spawn_fake_peer(honest_host, h2, "honest", honest, trigger, "--send", "gossip:honest-1",
                                 "--on", HONEST_CHANNEL)
    stranger_log = spawn_fake_peer(stranger_host, h1, "flood", stranger, flood_trigger, "--flood", str(FLOOD))
    dump = lambda: f"stranger: {stranger_log.read_text()}\nhonest: {honest_log.read_text()}"  # noqa: E731

    def all_known() -> bool:
        r1, r2 = report(h1), report(h2)
        return all(
            established_to(r, stranger) == {n1} and established_to(r, honest) == {n2} for r in (r1, r2)
        )

    wait_for(all_known, "both routers to learn both fake peers", 15, tb.hosts, dump)
    flood_trigger.touch()

    def flooded() -> bool:
        # The stranger's channels that host1 passed on have reached the honest peer.
        made_up = [m for m in messages(honest_log) if m["channel"].startswith("made-up-")]
        return "sent" in lines(stranger_log) and len(made_up) >= MAX_CHANNELS_PER_CONNECTION

    wait_for(flooded, "the stranger's flood to reach the honest peer", 15, tb.hosts, dump)
    trigger.touch()

    def honest_relayed_or_closed() -> bool:
        return "closed by router" in lines(honest_log) or any(
            m["channel"] == HONEST_CHANNEL for m in messages(stranger_log)
        )

    wait_for(honest_relayed_or_closed, "the honest channel to cross both routers", 15, [h1, h2], dump)
    assert "closed by router" not in lines(honest_log), dump()
    (relayed,) = [m for m in messages(stranger_log) if m["channel"] == HONEST_CHANNEL]
    assert {k: relayed[k] for k in ("channel", "src", "payload")} == {
        "channel": HONEST_CHANNEL, "src": n1, "payload": "honest-1"}
    # Beyond its budget, the stranger's gossip was dropped and counted.
    rejected = 'pyweave_inputs_rejected_total{component="gossip",reason="unknown_channel_limit"}'
    assert weave_metrics(h1).get(rejected) == FLOOD - MAX_CHANNELS_PER_CONNECTION
    # Nobody was disconnected: not the honest peer, not the routers, not even the stranger.
    assert "closed by router" not in lines(honest_log) + lines(stranger_log), dump()
    r1, r2 = report(h1), report(h2)
    assert n2 in established_to(r1, n1) and n1 in established_to(r2, n2)
    assert established_to(r1, stranger) == {n1} and stranger in connected_to(r1, n1)
    assert established_to(r2, honest) == {n2} and honest in connected_to(r2, n2)
    for h in (h1, h2):
        assert "too many unknown gossip channels" not in log_text(h)
        assert "Traceback" not in log_text(h)
    # The made-up names share one /metrics label.
    labels = [k for k in weave_metrics(h1) if k.startswith("pyweave_gossip_messages_received_total")]
    assert not any("made-up" in k for k in labels), labels
