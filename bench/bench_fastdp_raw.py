#!/usr/bin/env python3
"""fastdp kernel path throughput: iperf3 TCP over three paths between two netns hosts.

(a) underlay:  host1 eth0 -> switch bridge -> host2 eth0 (MTU 1500)
(b) raw vxlan: a hand-made kernel VXLAN pair (fixed remote, addresses on the devices,
    MTU 1376), host to host
(c) pyweave:   container -> veth -> bridge "weave" -> vxlan-6784 (fastdp.vxlan.ensure_vxlan,
    all-zero FDB entries) -> underlay -> ... -> container, MTU 1376

Everything runs in network namespaces made by router.testbed (needs root and iperf3).

    python bench/bench_fastdp_raw.py [--duration 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastdp import vxlan  # noqa: E402
from fastdp.vxlan import open_ipr  # noqa: E402
from router.testbed import Host, Testbed, _Namespace  # noqa: E402

log = logging.getLogger("bench_fastdp_raw")

MTU = 1376
RAW_VNI = 4242
RAW_PORT = 4789


def make_bridge(netns: str) -> None:
    with open_ipr(netns) as ipr:
        ipr.link("add", ifname="weave", kind="bridge", mtu=MTU)
        ipr.link("set", index=ipr.link_lookup(ifname="weave")[0], state="up")


def add_container(tb_host: Host, index: int) -> _Namespace:
    c = tb_host.add_container(f"c{index}")
    with open_ipr(tb_host.netns) as ipr:
        ipr.link("add", ifname=f"pwfc{index}", kind="veth", mtu=MTU,
                 peer={"ifname": "eth0", "mtu": MTU, "net_ns_fd": str(c.netns_path)})
        j = ipr.link_lookup(ifname=f"pwfc{index}")[0]
        ipr.link("set", index=j, master=ipr.link_lookup(ifname="weave")[0])
        ipr.link("set", index=j, state="up")
    with open_ipr(c.netns) as ipr:
        j = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=j, address=f"10.40.0.{index + 1}", prefixlen=16)
        ipr.link("set", index=j, state="up")
    return c


def make_raw_vxlan(netns: str, local: str, remote: str, address: str) -> None:
    with open_ipr(netns) as ipr:
        ipr.link("add", ifname="pwfraw", kind="vxlan", mtu=MTU, vxlan_id=RAW_VNI, vxlan_port=RAW_PORT,
                 vxlan_group=remote, vxlan_local=local)
        j = ipr.link_lookup(ifname="pwfraw")[0]
        ipr.addr("add", index=j, address=address, prefixlen=24)
        ipr.link("set", index=j, state="up")


def iperf(client: _Namespace, server: _Namespace, address: str, duration: float) -> dict[str, float]:
    """One iperf3 TCP run from `client` to a one-shot server on `address` in `server`."""
    srv = subprocess.Popen(server.exec_argv(["iperf3", "-s", "-1", "-B", address]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if client.ping(address, timeout=0.2):
                break
        time.sleep(0.3)  # let the server listen
        out = client.run(["iperf3", "-c", address, "-t", str(duration), "-J"], timeout=duration + 30).stdout
    finally:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
    end = json.loads(out)["end"]
    return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the three paths (median reported)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    samples: dict[str, list[dict[str, float]]] = {"underlay": [], "raw_vxlan": [], "pyweave_fastdp": []}
    with Testbed(n_hosts=2, prefix="pwf" + secrets.token_hex(2)) as tb:
        h1, h2 = tb.hosts
        for h in tb.hosts:
            make_bridge(h.netns)
            vxlan.ensure_vxlan(netns=h.netns)
        vxlan.add_peer(h2.address, netns=h1.netns)
        vxlan.add_peer(h1.address, netns=h2.netns)
        c1, c2 = add_container(h1, 0), add_container(h2, 1)
        make_raw_vxlan(h1.netns, h1.address, h2.address, "10.97.0.1")
        make_raw_vxlan(h2.netns, h2.address, h1.address, "10.97.0.2")
        for _ in range(args.rounds):  # interleaved, so drift in the machine's load hits every path alike
            samples["underlay"].append(iperf(h1, h2, h2.address, args.duration))
            samples["raw_vxlan"].append(iperf(h1, h2, "10.97.0.2", args.duration))
            samples["pyweave_fastdp"].append(iperf(c1, c2, "10.40.0.2", args.duration))
    results: dict[str, dict[str, Any]] = {name: {"gbit_s": statistics.median(r["gbit_s"] for r in runs),
                      "retransmits": statistics.median(r["retransmits"] for r in runs),
                      "samples_gbit_s": [round(r["gbit_s"], 3) for r in runs]}
               for name, runs in samples.items()}
    print(f"median of {args.rounds} runs of {args.duration:g} s each")
    print(f"{'path':<16} {'Gbit/s':>8} {'retr':>6}  vs underlay")
    base = results["underlay"]["gbit_s"]
    for name, r in results.items():
        print(f"{name:<16} {r['gbit_s']:8.2f} {int(r['retransmits']):6d}  {r['gbit_s'] / base:6.2f}x"
              f"   samples {r['samples_gbit_s']}")
    if args.json:
        doc = {"benchmark": "fastdp_raw", "duration_s": args.duration, "rounds": args.rounds, "mtu": MTU,
               "kernel": platform.release(), "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
