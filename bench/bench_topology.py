"""Encode/decode cost of a full topology gossip message.

Builds a 100-peer topology with 20 connections per peer, then times encode_topology and
decode_topology of the whole thing (what a router sends every 30 s and on every new
connection), with pickle dumps/loads of the same entries as a reference point.

The "model" row is what a router pays: Peers.encode_full with each peer's value messages
cached, and Peers.apply_update of a payload that brings no news (the common case in
gossip: connection lists of peers that are not newer are never decoded).

    python bench/bench_topology.py [--peers 100] [--conns 20] [--seconds 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.topology import (  # noqa: E402
    ConnectionSummary,
    Peers,
    PeerSummary,
    TopologyEntry,
    decode_topology,
    encode_topology,
)


def build_topology(peers: int, conns: int, seed: int = 1) -> list[TopologyEntry]:
    """`peers` peers, each listing `conns` others (outbound to the next ones in a ring)."""
    rng = random.Random(seed)
    names = [0x02_00_00_00_00_00 | rng.getrandbits(40) for _ in range(peers)]
    entries: list[TopologyEntry] = []
    for i, name in enumerate(names):
        summary = PeerSummary(name, f"host-{i:03d}", rng.getrandbits(64) | 1, rng.randrange(1, 200), i, True)
        step = max(1, (peers - 1) // max(1, conns))
        remotes = [names[(i + 1 + k * step) % peers] for k in range(min(conns, peers - 1))]
        links = [
            ConnectionSummary(r, f"10.0.{j}.{i % 250 + 1}:6783", outbound=j % 2 == 0, established=True)
            for j, r in enumerate(remotes)
        ]
        entries.append((summary, links))
    return entries


def time_per_call(fn: Callable[[], Any], seconds: float) -> tuple[float, int]:
    """Mean seconds per call over at least `seconds` of repeated calls."""
    fn()  # warm-up
    iterations = 0
    batch = 1
    start = time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        iterations += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / iterations, iterations
        batch = min(batch * 2, 1000)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--conns", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    entries = build_topology(args.peers, args.conns)
    payload = encode_topology(entries)
    assert decode_topology(payload) == [(s, list(c)) for s, c in entries]
    pickled = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
    model = Peers(0x0A_00_00_00_00_01, "bench", 1, 4095, rng=random.Random(2))
    first = entries[0][0]
    model.register_remote(first.name, first.nickname, first.uid, first.short_id)
    model.add_connection(first.name, "10.0.0.1:6783", outbound=True, established=True)
    model.apply_update(entries)

    results: dict[str, Any] = {
        "benchmark": "topology_full_message",
        "peers": args.peers,
        "connections_per_peer": args.conns,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "gob": {"bytes": len(payload)},
        "pickle": {"bytes": len(pickled)},
        "model": {"bytes": len(model.encode_full())},
    }
    cases = {
        ("gob", "encode"): lambda: encode_topology(entries),
        ("gob", "decode"): lambda: decode_topology(payload),
        ("pickle", "encode"): lambda: pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL),
        ("pickle", "decode"): lambda: pickle.loads(pickled),
        ("model", "encode"): model.encode_full,
        ("model", "decode"): lambda: model.apply_update(payload),
    }
    for (codec, op), fn in cases.items():
        per_call, iterations = time_per_call(fn, args.seconds)
        results[codec][f"{op}_us"] = round(per_call * 1e6, 1)
        results[codec][f"{op}_iterations"] = iterations

    print(f"full topology message: {args.peers} peers x {args.conns} connections")
    print(f"{'codec':8} {'bytes':>8} {'encode µs':>12} {'decode µs':>12}")
    for codec in ("gob", "model", "pickle"):
        r = results[codec]
        print(f"{codec:8} {r['bytes']:>8} {r['encode_us']:>12.1f} {r['decode_us']:>12.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
