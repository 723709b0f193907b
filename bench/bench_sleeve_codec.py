"""Throughput of the sleeve codec (sans-IO): encode, decode, encrypt, decrypt.

For each frame size (default 1438 bytes, the sleeve MTU on a 1500-byte underlay, and
32 KiB super-frames) two packings are timed:

- ``single``: one frame per datagram (the DF path: datagrams within the path MTU);
- ``batched``: as many frames as fit a 65507-byte datagram, up to 100 (the non-DF path).

``encode`` = frames to plain datagrams (Batcher), ``decode`` = plain datagrams to frames,
``encrypt`` = frames to sealed datagrams (Batcher + secretbox), ``decrypt`` = sealed
datagrams to frames (replay window + secretbox + decode). Gbit/s counts frame bytes only.

    python bench/bench_sleeve_codec.py [--sizes 1438,32768] [--seconds 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sleeve.crypto import SleeveCipher  # noqa: E402
from sleeve.wire import (  # noqa: E402
    ENCRYPTED_PACKET_OVERHEAD,
    FRAME_OVERHEAD,
    MAX_FRAMES_PER_PACKET,
    MAX_UDP_PAYLOAD,
    PLAIN_PACKET_OVERHEAD,
    Batcher,
    Frame,
    decode_packet,
)

LOCAL = 0x02_98_00_00_00_01
REMOTE = 0x02_98_00_00_00_02
KEY = bytes(range(32))


def frames_per_datagram(size: int, packing: str, encrypted: bool) -> int:
    if packing == "single":
        return 1
    overhead = ENCRYPTED_PACKET_OVERHEAD if encrypted else PLAIN_PACKET_OVERHEAD
    return max(1, min(MAX_FRAMES_PER_PACKET, (MAX_UDP_PAYLOAD - overhead) // (size + FRAME_OVERHEAD)))


def measure(run: Callable[[], int], seconds: float) -> tuple[float, int]:
    """Frames per second of ``run`` (which returns how many frames it handled), over >= ``seconds``."""
    run()
    frames = 0
    start = time.perf_counter()
    while True:
        frames += run()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return frames / elapsed, frames


def cases(size: int, packing: str, workload: int) -> dict[str, Callable[[], int]]:
    frame = os.urandom(size)
    per_plain = frames_per_datagram(size, packing, encrypted=False)
    per_sealed = frames_per_datagram(size, packing, encrypted=True)
    plain_budget = PLAIN_PACKET_OVERHEAD + per_plain * (size + FRAME_OVERHEAD)
    sealed_budget = ENCRYPTED_PACKET_OVERHEAD + per_sealed * (size + FRAME_OVERHEAD)
    count = max(per_plain, per_sealed) * max(1, workload // max(per_plain, per_sealed))
    frames: list[Frame] = [(LOCAL, REMOTE, frame)] * count

    plain_batcher = Batcher.plain(LOCAL, plain_budget)
    sealed_batcher = Batcher.sealed(sealed_budget)
    plain_packets = plain_batcher.pack(frames)
    sender = SleeveCipher(KEY, LOCAL, outbound=True)
    sealed_packets = [sender.seal(body, True) for body in sealed_batcher.pack(frames)]
    assert sum(len(decode_packet(p)[1]) for p in plain_packets) == count

    def encode() -> int:
        plain_batcher.pack(frames)
        return count

    def decode() -> int:
        n = 0
        for packet in plain_packets:
            n += len(decode_packet(packet)[1])
        return n

    def encrypt() -> int:
        seal = sender.seal
        for body in sealed_batcher.pack(frames):
            seal(body, True)
        return count

    def decrypt() -> int:
        # A fresh receiver each round: the same packets again would be replays.
        decode = SleeveCipher(KEY, REMOTE, outbound=False).decode
        n = 0
        for packet in sealed_packets:
            n += len(decode(packet)[1])
        return n

    return {"encode": encode, "decode": decode, "encrypt": encrypt, "decrypt": decrypt}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1438,32768", help="comma-separated frame sizes in bytes")
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time per measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    results: dict[str, Any] = {
        "benchmark": "sleeve_codec",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "runs": [],
    }
    print(f"{'op':8} {'frame B':>8} {'packing':>8} {'frames/dgram':>12} {'frames/s':>12} {'Gbit/s':>8}")
    for size in sizes:
        for packing in ("single", "batched"):
            if packing == "batched" and frames_per_datagram(size, packing, encrypted=True) == 1:
                continue
            workload = 2000 if size < 8192 else 200
            for op, run in cases(size, packing, workload).items():
                rate, frames = measure(run, args.seconds)
                per = frames_per_datagram(size, packing, encrypted=op in ("encrypt", "decrypt"))
                row = {
                    "op": op,
                    "frame_bytes": size,
                    "packing": packing,
                    "frames_per_datagram": per,
                    "frames_per_s": round(rate),
                    "gbit_per_s": round(rate * size * 8 / 1e9, 3),
                    "frames_timed": frames,
                }
                results["runs"].append(row)
                print(f"{op:8} {size:>8} {packing:>8} {per:>12} {rate:>12,.0f} {row['gbit_per_s']:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
