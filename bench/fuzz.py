"""Long fuzz passes over every decoder in tests/fuzz/targets.py; prints inputs and findings per target.

The time is split evenly between the targets. A finding is an input that raised
something other than the target's clean errors, took longer than ``--max-ms``, or (for
the inputs measured under tracemalloc: every ``--mem-every``-th, and every slow one)
allocated more than ``--max-mb`` at its peak. Each distinct finding (exception type and
the line that raised it) is reported once, with its shortest input, and written to
``--findings DIR`` as a reproducer.

Engines:

- ``random`` (in-process): seeds with structure-aware edits (tests/fuzz/mutate.py); an
  input whose outcome (result type, or error type and message shape) is new joins the
  corpus, which walks the decoders' error paths one step further each time;
- ``atheris`` (one subprocess per target, libFuzzer with Python coverage feedback),
  when atheris is installed; ``auto`` picks it when each target gets at least a
  minute (a subprocess spends ~10 s instrumenting), else ``random``.

    python bench/fuzz.py [--minutes 5] [--targets gob_v2_values,sleeve_plain] [--engine auto]
                         [--json out.json] [--findings DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz import mutate  # noqa: E402

if TYPE_CHECKING:
    from tests.fuzz.targets import Target

# What atheris instruments for coverage (instrumenting everything loaded takes a minute).
PACKAGES = ("router", "sleeve", "fastdp", "ipam_crdt", "weavedns", "dnslib")

CORPUS_MAX = 2000
ATHERIS_MIN_SECONDS = 60.0
_DIGITS = re.compile(r"\d+|0x[0-9a-f]+|'[^']*'|\"[^\"]*\"")


@dataclass
class Finding:
    kind: str  # "exception", "slow", "memory"
    key: str
    message: str
    data: bytes
    where: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "message": self.message, "where": self.where,
                "input_hex": self.data.hex(), "input_len": len(self.data)}


@dataclass
class Checker:
    """Runs one target on one input at a time and keeps what it found."""

    target: Target
    max_ms: float
    max_mb: float
    mem_every: int
    inputs: int = 0
    max_seen_ms: float = 0.0
    max_seen_mb: float = 0.0
    findings: dict[str, Finding] = field(default_factory=dict)

    def _record(self, finding: Finding) -> bool:
        old = self.findings.get(finding.key)
        if old is None or len(finding.data) < len(old.data):
            self.findings[finding.key] = finding
        return old is None

    def run(self, data: bytes) -> str:
        """The input's outcome signature (for corpus feedback)."""
        self.inputs += 1
        start = time.perf_counter()
        outcome = self._call(data)
        ms = (time.perf_counter() - start) * 1000
        self.max_seen_ms = max(self.max_seen_ms, ms)
        if ms > self.max_ms:
            self._record(Finding("slow", f"slow:{outcome}", f"{ms:.0f} ms > {self.max_ms:g} ms", data))
        if self.inputs % self.mem_every == 0 or ms > self.max_ms / 10:
            self._measure_memory(data)
        return outcome

    def _call(self, data: bytes) -> str:
        try:
            result = self.target.run(data)
        except self.target.errors as exc:
            return f"{type(exc).__name__}:{_DIGITS.sub('#', str(exc))[:48]}"
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - every other exception is what we look for
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            key = f"{type(exc).__name__}@{where}"
            self._record(Finding("exception", key, f"{type(exc).__name__}: {str(exc)[:300]}", data, where))
            return key
        return f"ok:{type(result).__name__}"

    def _measure_memory(self, data: bytes) -> None:
        tracemalloc.start()
        try:
            self._call(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        mb = peak / 1e6
        self.max_seen_mb = max(self.max_seen_mb, mb)
        if mb > self.max_mb:
            self._record(Finding("memory", "memory", f"peak {mb:.1f} MB > {self.max_mb:g} MB", data))


def fuzz_random(checker: Checker, seconds: float, rng: random.Random) -> None:
    corpus = list(checker.target.seeds())
    seen: set[str] = set()
    for seed in corpus:
        seen.add(checker.run(seed))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            data = mutate.mutate(rng, corpus)
            outcome = checker.run(data)
            if outcome not in seen:
                seen.add(outcome)
                if len(corpus) < CORPUS_MAX:
                    corpus.append(data)


# ---------------------------------------------------------------- atheris


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def atheris_child(name: str, seconds: float, out: Path, args: argparse.Namespace) -> None:
    """Runs in the subprocess: libFuzzer drives one target until its time is up."""
    import importlib
    import pkgutil

    import atheris

    with atheris.instrument_imports(include=list(PACKAGES)):
        for package in PACKAGES:
            root = importlib.import_module(package)
            for info in pkgutil.walk_packages(root.__path__, f"{package}."):
                with contextlib.suppress(Exception):
                    importlib.import_module(info.name)
    from tests.fuzz.targets import TARGETS

    logging.disable(logging.CRITICAL)
    target = TARGETS[name]
    checker = Checker(target, args.max_ms, args.max_mb, args.mem_every)
    seeds = target.seeds()
    for seed in seeds:  # loads every module the target imports lazily, before instrumenting
        checker.run(seed)
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    reported: set[str] = set()

    def one(data: bytes) -> None:
        checker.run(data)
        new = checker.findings.keys() - reported
        # libFuzzer ends the process with exit(): what the parent needs is written as it goes.
        if new or checker.inputs % 4096 == 0:
            with out.open("a") as fh:
                for key in new:
                    fh.write(json.dumps(checker.findings[key].to_json()) + "\n")
                fh.write(json.dumps({"max_ms": checker.max_seen_ms, "max_mb": checker.max_seen_mb}) + "\n")
            reported.update(new)

    atheris.Setup(
        [sys.argv[0], str(corpus), f"-max_total_time={max(1, int(seconds))}", "-max_len=65536",
         "-rss_limit_mb=2048", "-timeout=30", "-print_final_stats=1", "-close_fd_mask=1"],
        one,
    )
    atheris.Fuzz()


def fuzz_atheris(checker: Checker, seconds: float, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "findings.jsonl"
        out.touch()
        cmd = [sys.executable, __file__, "--atheris-child", checker.target.name, "--child-seconds",
               str(seconds), "--child-out", str(out), "--max-ms", str(args.max_ms), "--max-mb",
               str(args.max_mb), "--mem-every", str(args.mem_every)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
        checker.inputs = int(runs[-1]) if runs else 0
        for line in out.read_text().splitlines():
            raw = json.loads(line)
            if "max_ms" in raw:
                checker.max_seen_ms, checker.max_seen_mb = raw["max_ms"], raw["max_mb"]
                continue
            checker._record(Finding(raw["kind"], raw["key"], raw["message"], bytes.fromhex(raw["input_hex"]),
                                    raw["where"]))
        if not runs:
            checker._record(Finding("exception", "atheris-child", proc.stderr[-500:], b""))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=1.0, help="total time, split between the targets")
    parser.add_argument("--targets", help="comma-separated target names (default: all)")
    parser.add_argument("--engine", choices=("auto", "random", "atheris"), default="auto")
    parser.add_argument("--seed", type=int, default=None, help="random engine seed")
    parser.add_argument("--max-ms", type=float, default=1000.0, help="an input slower than this is a finding")
    parser.add_argument("--max-mb", type=float, default=32.0, help="a larger tracemalloc peak is a finding")
    parser.add_argument("--mem-every", type=int, default=200, help="measure every n-th input's memory")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--findings", type=Path, help="write each finding's input to this directory")
    parser.add_argument("--atheris-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.atheris_child:
        atheris_child(args.atheris_child, args.child_seconds, args.child_out, args)
        return {}
    from tests.fuzz.targets import TARGETS

    names = args.targets.split(",") if args.targets else list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    engine = args.engine
    per_target = args.minutes * 60 / len(names)
    if engine == "auto":
        # A child needs ~10 s to instrument its imports: worth it only for longer slices.
        engine = "atheris" if atheris_available() and per_target >= ATHERIS_MIN_SECONDS else "random"
    elif engine == "atheris" and not atheris_available():
        parser.error("atheris is not installed (pip install atheris)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    logging.disable(logging.CRITICAL)  # rejected inputs log; millions of them must not reach stderr

    results: dict[str, Any] = {
        "benchmark": "fuzz",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "engine": engine,
        "seed": seed,
        "minutes": args.minutes,
        "targets": [],
    }
    print(f"engine {engine}, {per_target:.1f} s per target, seed {seed}")
    print(f"{'target':26} {'inputs':>10} {'inputs/s':>9} {'max ms':>8} {'max MB':>7} {'findings':>8}")
    total = 0
    for name in names:
        target = TARGETS[name]
        checker = Checker(target, args.max_ms, args.max_mb, args.mem_every)
        start = time.monotonic()
        if engine == "atheris":
            fuzz_atheris(checker, per_target, args)
        else:
            fuzz_random(checker, per_target, rng)
        elapsed = time.monotonic() - start
        total += checker.inputs
        row = {
            "target": name,
            "module": target.module,
            "inputs": checker.inputs,
            "seconds": round(elapsed, 1),
            "max_ms": round(checker.max_seen_ms, 1),
            "max_mb": round(checker.max_seen_mb, 2),
            "findings": [f.to_json() for f in checker.findings.values()],
        }
        results["targets"].append(row)
        print(f"{name:26} {checker.inputs:>10,} {checker.inputs / max(elapsed, 1e-9):>9,.0f} "
              f"{checker.max_seen_ms:>8.1f} {checker.max_seen_mb:>7.2f} {len(checker.findings):>8}")
        for finding in checker.findings.values():
            print(f"    {finding.kind}: {finding.key}: {finding.message[:120]}")
            print(f"        input ({len(finding.data)} B): {finding.data[:64].hex()}")
            if args.findings:
                args.findings.mkdir(parents=True, exist_ok=True)
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", finding.key)
                (args.findings / f"{name}-{safe}.bin").write_bytes(finding.data)
    results["total_inputs"] = total
    print(f"total: {total:,} inputs, {sum(len(t['findings']) for t in results['targets'])} findings")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
