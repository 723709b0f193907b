#!/usr/bin/env python3
"""weaveDNS throughput: the pyweave DNS server against dnsmasq, measured with dnsperf in one run.

Both servers answer the same N names (default 1000; pyweave from its record store,
dnsmasq from a hosts file) on loopback ports, and dnsperf queries every name in turn
for a fixed duration, alternating between the servers for several rounds. It prints
queries per second for each and the ratio (target: pyweave >= 0.25 x dnsmasq; Weave's
Go server measured 0.23 x), plus the answer engine's per-query cost on its fast path
and on the dnslib path, and writes everything as JSON.

Needs the Debian packages dnsperf and dnsmasq (apt-get install -y dnsperf dnsmasq).
Everything binds to 127.0.0.1 only.

    python bench/bench_dns.py [--duration 10] [--rounds 3] [--names 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOMAIN = "weave.local"
HOST = "127.0.0.1"


def name_addr(i: int) -> tuple[str, str]:
    n = i + 1
    return f"host{i}.{DOMAIN}", f"10.{40 + (n >> 16)}.{(n >> 8) & 0xFF}.{n & 0xFF}"


def free_port() -> int:
    """A port free for both UDP and TCP on HOST."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((HOST, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


# ----------------------------------------------------------------- the pyweave server process


def serve(port: int, names: int) -> None:
    import trio

    from weavedns.answer import AnswerEngine
    from weavedns.records import Nameserver
    from weavedns.server import DNSServer
    from weavedns.wire import parse_addr

    zone = Nameserver(0x020000000001, lambda p: True)
    for i in range(names):
        name, addr = name_addr(i)
        zone.add_entry(name + ".", f"c{i}", parse_addr(addr))

    async def main() -> None:
        server = DNSServer(AnswerEngine(zone), None, HOST, port)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            print("READY", flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------- measuring


def dns_query(name: str) -> bytes:
    qname = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\x00"
    return b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"


def wait_answering(port: int, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(dns_query(name), (HOST, port))
            try:
                reply = s.recv(512)
            except OSError:
                continue
            if reply[:2] == b"\xab\xcd" and reply[3] & 0x0F == 0 and reply[7] > 0:
                return
    raise RuntimeError(f"server on port {port} did not answer {name}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, queries: Path, duration: float, clients: int, outstanding: int) -> dict[str, float]:
    cmd = [
        "dnsperf", "-s", HOST, "-p", str(port), "-d", str(queries), "-l", str(duration),
        "-c", str(clients), "-q", str(outstanding),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def grab(pattern: str) -> float:
        m = re.search(pattern, out)
        if not m:
            raise RuntimeError(f"unexpected dnsperf output:\n{out}")
        return float(m.group(1))

    return {
        "qps": grab(r"Queries per second:\s+([\d.]+)"),
        "completed": grab(r"Queries completed:\s+(\d+)"),
        "lost": grab(r"Queries lost:\s+(\d+)"),
        "avg_latency_ms": grab(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "noerror": grab(r"NOERROR (\d+)") if "NOERROR" in out else 0.0,
    }


def engine_costs(names: int) -> dict[str, float]:
    """Microseconds per query of AnswerEngine.answer: cached fast path vs the dnslib path."""
    from dnslib import DNSRecord

    from weavedns.answer import AnswerEngine
    from weavedns.records import Nameserver
    from weavedns.wire import parse_addr

    zone = Nameserver(1, lambda p: True)
    for i in range(names):
        name, addr = name_addr(i)
        zone.add_entry(name + ".", f"c{i}", parse_addr(addr))
    zone.add_entry(name_addr(0)[0] + ".", "extra", parse_addr("10.99.0.1"))  # host0: two answers
    engine = AnswerEngine(zone, rng=random.Random(1))
    one, two, miss = dns_query(name_addr(1)[0]), dns_query(name_addr(0)[0]), dns_query(f"nosuch.{DOMAIN}")
    n = 200_000
    result = {}
    cases = (("fast_path_1_answer_us", one), ("fast_path_2_answers_us", two), ("fast_path_nxdomain_us", miss))
    for label, q in cases:
        engine.answer(q)
        result[label] = min(timeit.repeat(lambda q=q: engine.answer(q), number=n, repeat=3)) / n * 1e6
    m = 20_000
    result["dnslib_path_1_answer_us"] = (
        min(timeit.repeat(lambda: engine.answer_record(DNSRecord.parse(one)), number=m, repeat=3)) / m * 1e6
    )
    # The cost of a cache miss: compile the entry, then answer.
    result["cache_miss_us"] = (
        min(timeit.repeat(lambda: (engine._cache.clear(), engine.answer(one)), number=m, repeat=3)) / m * 1e6
    )
    return result


# ----------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=1, help="dnsperf -c")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dns.json")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve is not None:
        serve(args.serve, args.names)
        return 0

    missing = [tool for tool in ("dnsperf", "dnsmasq") if shutil.which(tool) is None]
    if missing:
        print(f"missing {', '.join(missing)}: apt-get install -y dnsperf dnsmasq", file=sys.stderr)
        return 2

    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[dict[str, float]]] = {"pyweave": [], "dnsmasq": []}
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        hosts, queries = Path(tmp) / "hosts", Path(tmp) / "queries"
        pairs = [name_addr(i) for i in range(args.names)]
        hosts.write_text("".join(f"{addr} {name}\n" for name, addr in pairs))
        queries.write_text("".join(f"{name} A\n" for name, _ in pairs))
        ports = {"pyweave": free_port(), "dnsmasq": free_port()}
        try:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--serve", str(ports["pyweave"]), "--names", str(args.names)],
                stdout=subprocess.DEVNULL,
            ))
            dnsmasq = [
                "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                "--bind-interfaces", f"--listen-address={HOST}", "-p", str(ports["dnsmasq"]),
                "--cache-size=10000", "--local-ttl=1", "--pid-file=", "--log-facility=-",
            ]
            if os.geteuid() == 0:
                dnsmasq.append("--user=root")
            procs.append(subprocess.Popen(dnsmasq, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            pids = {"pyweave": procs[0].pid, "dnsmasq": procs[1].pid}
            for port in ports.values():
                wait_answering(port, pairs[-1][0])
            for port in ports.values():  # warm-up
                dnsperf(port, queries, 1, args.clients, args.outstanding)
            for rnd in range(args.rounds):
                for server, port in ports.items():
                    pid = pids[server]
                    before = cpu_seconds(pid)
                    r = dnsperf(port, queries, args.duration, args.clients, args.outstanding)
                    r["server_cpu_us_per_query"] = (cpu_seconds(pid) - before) / max(r["completed"], 1) * 1e6
                    results[server].append(r)
                    print(f"round {rnd + 1} {server:8s} {r['qps']:10.0f} qps  lost {r['lost']:.0f}  "
                          f"latency {r['avg_latency_ms']:.3f} ms  "
                          f"server CPU {r['server_cpu_us_per_query']:.2f} us/query", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()

    median = {s: statistics.median(r["qps"] for r in rs) for s, rs in results.items()}
    ratios = [p["qps"] / d["qps"] for p, d in zip(results["pyweave"], results["dnsmasq"], strict=True)]
    cpu = {s: statistics.median(r["server_cpu_us_per_query"] for r in rs) for s, rs in results.items()}
    costs = engine_costs(args.names)
    report = {
        "names": args.names,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "dnsperf": {"clients": args.clients, "outstanding": args.outstanding},
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        },
        "runs": results,
        "median_qps": median,
        "ratio_of_medians": median["pyweave"] / median["dnsmasq"],
        "ratio_per_round": ratios,
        "target_ratio": 0.25,
        # dnsperf shares the machine; CPU per answered query shows each server's capacity
        # even when the load generator, not the server, limits the qps.
        "server_cpu_us_per_query": cpu,
        "cpu_capacity_ratio": cpu["dnsmasq"] / cpu["pyweave"],
        "engine_us_per_query": costs,
    }
    print(f"\npyweave median {median['pyweave']:.0f} qps, dnsmasq median {median['dnsmasq']:.0f} qps, "
          f"ratio {report['ratio_of_medians']:.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"target >= 0.25)")
    print(f"server CPU per query: pyweave {cpu['pyweave']:.2f} us, dnsmasq {cpu['dnsmasq']:.2f} us "
          f"(capacity ratio {report['cpu_capacity_ratio']:.2f})")
    print("answer engine, us/query: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
