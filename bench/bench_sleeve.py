#!/usr/bin/env python3
"""Sleeve throughput: iperf3 TCP between containers over pyweave's sleeve, beside the kernel.

Paths, all in network namespaces made by router.testbed (needs root and iperf3):

(a) underlay:        host1 eth0 -> switch bridge -> host2 eth0 (MTU 1500), host to host
(b) raw vxlan:       a hand-made kernel VXLAN pair in host1/host2 (fixed remote, MTU 1376,
                     10.97.0.0/24 on the devices), host to host
(c) sleeve plain:    container on host1 -> bridge "weave" -> TAP -> weaver (Python) -> UDP 6783
                     -> weaver -> TAP -> bridge -> container on host2 (routers from `weave launch`)
(d) sleeve encrypted: the same on host3/host4, whose routers were launched with --password

Routers run with --no-fastdp, so container traffic takes the sleeve even where the kernel
VXLAN path (fastdp) would be available.

Rounds interleave the paths, so drift in the machine's load hits every path alike; the
median is reported with its ratio to the underlay, and for (c)/(d) the routers' CPU:
utime+stime of both weaver processes (pid from $WEAVE_STATE_DIR/weaver.pid) over the run,
in cores (CPU seconds per wall second). With --profile DIR, one more plain run is profiled
with py-spy (raw folded stacks per router in DIR) and the top functions are printed.

    python bench/bench_sleeve.py [--duration 5] [--rounds 3] [--json FILE] [--profile DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from router.testbed import Container, Host, Testbed, _Namespace, iperf3_end  # noqa: E402

log = logging.getLogger("bench_sleeve")

VXLAN_MTU = 1376
VXLAN_VNI = 4243
VXLAN_PORT = 4789
VXLAN_DEV = "pwsvx0"
VXLAN_NET = "10.97.0"
OVERLAY_NET = "10.32.1"  # containers: 10.32.1.<host index>/12
PASSWORD = "bench-sleeve-secret"
IPERF_PORT = 5201
# Targets (fractions of the underlay's throughput).
TARGETS = {"sleeve_plain": 0.25, "sleeve_encrypted": 0.15}
PATHS = ("underlay", "raw_vxlan", "sleeve_plain", "sleeve_encrypted")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- set-up


def launch(host: Host, *args: str) -> int:
    """`weave launch` with the sleeve only (--no-fastdp); returns the router's pid."""
    out = host.run(["weave", "launch", "--nickname", host.name, "--no-fastdp", *args], timeout=60).stdout
    if "weave router started" not in out:
        raise RuntimeError(f"{host.name}: weave launch said {out!r}")
    return weaver_pid(host)


def weaver_pid(host: Host) -> int:
    return int((host.state_dir / "weaver.pid").read_text().strip())


def attach(host: Host) -> Container:
    c = host.add_container(f"c{host.index}")
    host.run(["weave", "attach", "--without-dns", f"{OVERLAY_NET}.{host.index}/12", c.netns], timeout=60)
    return c


def make_vxlan(host: Host, peer: Host, index: int) -> str:
    """A kernel VXLAN device in `host` towards `peer` with 10.97.0.<index>/24; returns the address."""
    address = f"{VXLAN_NET}.{index}"
    host.run(["ip", "link", "add", VXLAN_DEV, "type", "vxlan", "id", str(VXLAN_VNI), "local", host.address,
              "remote", peer.address, "dstport", str(VXLAN_PORT), "dev", host.interface])
    host.run(["ip", "link", "set", VXLAN_DEV, "mtu", str(VXLAN_MTU)])
    host.run(["ip", "addr", "add", f"{address}/24", "dev", VXLAN_DEV])
    host.run(["ip", "link", "set", VXLAN_DEV, "up"])
    return address


def wait_established(hosts: list[Host], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(h.run(["weave", "status", "connections"]).stdout.count("established") == 1 for h in hosts):
            return
        time.sleep(0.2)
    raise RuntimeError("sleeve connections did not establish:\n" + "\n".join(
        h.run(["weave", "status", "connections"], check=False).stdout for h in hosts))


def wait_reachable(ns: _Namespace, address: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.ping(address, timeout=0.3):
            return
    raise RuntimeError(f"{address} is not reachable from {ns.netns}")


def status_line(host: Host) -> str:
    out = host.run(["weave", "status", "connections"]).stdout
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else ""


# ---------------------------------------------------------------- measuring


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def iperf(client: _Namespace, server: _Namespace, address: str, duration: float,
          pids: Sequence[int] = ()) -> dict[str, Any]:
    """One iperf3 TCP run to a one-shot server on `address`; CPU of `pids` over the run."""
    with server.iperf3_server(address, IPERF_PORT):
        before = {pid: cpu_ticks(pid) for pid in pids}
        started = time.monotonic()
        proc = client.run(["iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", str(duration), "-J"],
                          check=False, timeout=duration + 60)
        wall = time.monotonic() - started
        after = {pid: cpu_ticks(pid) for pid in pids}
    end = iperf3_end(proc)
    cores = [(after[p] - before[p]) / CLK_TCK / wall for p in pids]
    return {
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits", 0),
        "router_cores": cores,  # per router: sender side first
        "iperf_cpu_client_pct": end.get("cpu_utilization_percent", {}).get("host_total", 0.0),
        "iperf_cpu_server_pct": end.get("cpu_utilization_percent", {}).get("remote_total", 0.0),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "gbit_s": statistics.median(r["gbit_s"] for r in runs),
        "retransmits": statistics.median(r["retransmits"] for r in runs),
        "samples_gbit_s": [round(r["gbit_s"], 3) for r in runs],
    }
    if runs[0]["router_cores"]:
        per_router = list(zip(*(r["router_cores"] for r in runs), strict=True))
        out["router_cores"] = [round(statistics.median(c), 3) for c in per_router]
        out["router_cores_total"] = round(sum(out["router_cores"]), 3)
        # CPU seconds both routers spend per gigabit moved.
        gbit = out["gbit_s"]
        out["router_cpu_s_per_gbit"] = round(out["router_cores_total"] / gbit, 3) if gbit else None
    return out


# ---------------------------------------------------------------- profiling


PY_SPY_RATE = 200  # samples per second


def _py_spy(pid: int, seconds: int, path: Path, gil: bool) -> subprocess.Popen[str]:
    argv = ["py-spy", "record", "-d", str(seconds), "-r", str(PY_SPY_RATE), "--threads", "-p", str(pid),
            "-o", str(path), "-f", "raw", "--nonblocking", *(["--gil"] if gil else [])]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def profile_plain(client: Container, server: Container, address: str, pids: dict[str, int],
                  duration: float, out_dir: Path) -> dict[str, Any]:
    """py-spy on both plain routers during one more (twice as long) iperf3 run.

    First half: every non-idle sample (where the threads spend their time, syscalls
    included). Second half: only samples of the thread holding the GIL (--gil), whose
    count tells how busy the interpreter itself is.
    """
    if shutil.which("py-spy") is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = max(2, int(duration))
    report: dict[str, Any] = {}

    def record(gil: bool) -> None:
        kind = "gil" if gil else "cpu"
        spies = {}
        for role, pid in pids.items():
            path = out_dir / f"sleeve-{role}-{kind}-{pid}.txt"
            spies[role] = (path, _py_spy(pid, seconds, path, gil))
        for role, (path, proc) in spies.items():
            _, err = proc.communicate(timeout=seconds + 60)
            if not path.exists():
                raise RuntimeError(f"py-spy on the {role} router wrote nothing: {err.strip()}")
            summary = folded_summary(path)
            if gil:
                report[role]["gil_held"] = round(summary["samples"] / (PY_SPY_RATE * seconds), 3)
                report[role]["gil_self"] = summary["self"]
            else:
                report[role] = {"file": str(path), **summary}

    errors: list[BaseException] = []

    def profile() -> None:
        try:
            time.sleep(0.5)
            record(gil=False)
            record(gil=True)
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    worker = threading.Thread(target=profile)
    worker.start()
    try:
        iperf(client, server, address, 2 * seconds + 2)
    finally:
        worker.join()
    if errors:
        raise errors[0]
    return report


def _function(frame: str) -> str:
    """'name (file.py:123)' -> 'name (file.py)': py-spy's raw frames carry line numbers."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def folded_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Self time by function, and samples by thread, from py-spy's raw (folded) output."""
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(count_text)
        total += n
        frames = stack.split(";")
        threads[frames[0]] += n
        funcs = [_function(f) for f in frames[1:]]
        own[funcs[-1] if funcs else "?"] += n
        for f in set(funcs):
            inclusive[f] += n
    return {
        "samples": total,
        "threads": {t: round(n / total, 3) for t, n in threads.most_common(8)} if total else {},
        "self": [(f, round(n / total, 3)) for f, n in own.most_common(top)] if total else [],
        "inclusive": [(f, round(n / total, 3)) for f, n in inclusive.most_common(top)] if total else [],
    }


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the four paths (median reported)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--profile", metavar="DIR", help="also profile the plain routers with py-spy into DIR")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if os.geteuid() != 0:
        print("bench_sleeve: needs root (network namespaces)", file=sys.stderr)
        return 2
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    load_before = os.getloadavg()
    links: dict[str, str] = {}
    profile: dict[str, Any] | None = None
    with Testbed(n_hosts=4, prefix="pws" + secrets.token_hex(2)) as tb:
        h1, h2, h3, h4 = tb.hosts
        pids = {"plain": [launch(h1)], "encrypted": [launch(h3, "--password", PASSWORD)]}
        pids["plain"].insert(0, launch(h2, h1.address))  # sender side (host2) first
        pids["encrypted"].insert(0, launch(h4, "--password", PASSWORD, h3.address))
        c1, c2, c3, c4 = (attach(h) for h in tb.hosts)
        v1 = make_vxlan(h1, h2, 1)
        make_vxlan(h2, h1, 2)
        wait_established([h1, h2])
        wait_established([h3, h4])
        links = {"sleeve_plain": status_line(h2), "sleeve_encrypted": status_line(h4)}
        for name, line in links.items():
            if " sleeve " not in line:
                raise RuntimeError(f"{name}: the connection is not on the sleeve: {line}")
        plain_dst, enc_dst = f"{OVERLAY_NET}.{h1.index}", f"{OVERLAY_NET}.{h3.index}"
        for ns, address in ((h2, h1.address), (h2, v1), (c2, plain_dst), (c4, enc_dst)):
            wait_reachable(ns, address)
        for i in range(args.rounds):
            samples["underlay"].append(iperf(h2, h1, h1.address, args.duration))
            samples["raw_vxlan"].append(iperf(h2, h1, v1, args.duration))
            samples["sleeve_plain"].append(iperf(c2, c1, plain_dst, args.duration, pids["plain"]))
            samples["sleeve_encrypted"].append(iperf(c4, c3, enc_dst, args.duration, pids["encrypted"]))
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{p} {samples[p][-1]['gbit_s']:.2f}" for p in PATHS) + " Gbit/s", flush=True)
        if args.profile:
            roles = {"sender": pids["plain"][0], "receiver": pids["plain"][1]}
            profile = profile_plain(c2, c1, plain_dst, roles, args.duration, Path(args.profile))
    results = {name: summarise(runs) for name, runs in samples.items()}
    for name, runs in samples.items():
        # Each round's paths ran back to back, so a per-round ratio shrugs off slow drift
        # in the machine's load better than a ratio of medians.
        ratios = [r["gbit_s"] / u["gbit_s"] for r, u in zip(runs, samples["underlay"], strict=True)]
        results[name]["ratio_per_round"] = [round(x, 3) for x in ratios]
        results[name]["ratio_per_round_median"] = round(statistics.median(ratios), 3)
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}

    base = results["underlay"]["gbit_s"]
    print(f"\nmedian of {args.rounds} runs of {args.duration:g} s each; iperf3 TCP, one stream, "
          f"{os.cpu_count()} CPUs, kernel {platform.release()}, load average {load['before'][0]} before, "
          f"{load['after'][0]} after (other work on the machine skews every path)")
    print(f"{'path':<18} {'Gbit/s':>7} {'retr':>6} {'x underlay':>10} {'per round':>9} {'target':>11}  "
          f"{'router CPU (send+recv cores)':<30} samples (Gbit/s)")
    for name, r in results.items():
        ratio = r["gbit_s"] / base if base else 0.0
        r["ratio_to_underlay"] = round(ratio, 3)
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            r["target_ratio"] = target
            r["meets_target"] = ratio >= target
            verdict = f">={target:.2f} {'ok' if ratio >= target else 'MISS'}"
        cores = r.get("router_cores")
        cpu = f"{cores[0]:.2f} + {cores[1]:.2f} = {r['router_cores_total']:.2f}" if cores else "-"
        print(f"{name:<18} {r['gbit_s']:7.2f} {int(r['retransmits']):6d} {ratio:9.2f}x "
              f"{r['ratio_per_round_median']:8.2f}x {verdict:>11}  {cpu:<30} {r['samples_gbit_s']}")
    for name, line in links.items():
        print(f"{name}: {line}")
    if profile:
        for role, prof in profile.items():
            print(f"\npy-spy, plain {role} router ({prof['samples']} samples, {prof['file']}):")
            print("  threads: " + ", ".join(f"{t} {share:.0%}" for t, share in prof["threads"].items()))
            print(f"  GIL held {prof.get('gil_held', 0):.0%} of the time; while held: " + ", ".join(
                f"{f} {share:.0%}" for f, share in prof.get("gil_self", [])[:4]))
            print("  self time:")
            for func, share in prof["self"][:10]:
                print(f"    {share:6.1%}  {func}")
            print("  inclusive:")
            for func, share in prof["inclusive"][:10]:
                print(f"    {share:6.1%}  {func}")
    if args.json:
        doc = {"benchmark": "sleeve", "duration_s": args.duration, "rounds": args.rounds,
               "vxlan_mtu": VXLAN_MTU, "cpus": os.cpu_count(), "kernel": platform.release(), "links": links,
               "targets": TARGETS, "load_average": load, "results": results, "profile": profile}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
