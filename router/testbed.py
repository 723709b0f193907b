"""A network test bed built from Linux network namespaces (DESIGN.md §9).

One "switch" namespace holds the underlay bridge; every simulated host is a namespace
joined to that bridge by a veth pair, with an address on 10.98.0.0/24, its own state
directory and environment (``WEAVE_STATE_DIR``). Containers are further namespaces that
the router plugs in later (``weave attach``). Faults are nftables rules (family
``bridge``) in the switch namespace; a NAT gateway namespace puts hosts behind
masquerading, like an "other data centre".

Everything lives in namespaces this module creates, named ``<prefix>-<role><n>`` where
the prefix is ``pw`` plus a few random characters, so leftovers from crashed runs are
recognisable (:meth:`Testbed.cleanup_stale`). The root namespace's interfaces, routes
and firewall are never touched. The module is synchronous and not thread-safe.

Example::

    with Testbed(n_hosts=2) as tb:
        h1, h2 = tb.hosts
        assert h1.ping(h2.address)
        tb.partition(h1, h2)
        assert not h1.ping(h2.address)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IFNAMSIZ = 15  # usable characters in a Linux interface name
NETNS_DIR = Path("/run/netns")
# One JSON file per live test bed (owner pid + start time), so cleanup_stale can tell a
# crashed run's leftovers from a concurrent run's namespaces.
REGISTRY_DIR = Path(os.environ.get("PYWEAVE_TESTBED_REGISTRY", "/run/pyweave-testbed"))
PREFIX_RE = re.compile(r"^pw[0-9a-z]{1,6}$")
# Every namespace a test bed creates matches this.
STALE_PATTERN = r"^pw[0-9a-z]{1,6}-"

UNDERLAY_NET = "10.98.0"  # /24; hosts get .1-.199, NAT gateways .201-.250
UNDERLAY_PREFIXLEN = 24
MAX_HOSTS = 199
MAX_GATEWAYS = 50
LAN_NET = "192.168.{}"  # gateway g gets 192.168.(76+g).0/24; its LAN side is .1
HOST_IFNAME = "eth0"  # the underlay interface inside every host and gateway
SWITCH_BRIDGE = "br0"
GATEWAY_LAN_BRIDGE = "lan0"
FAULT_CHAIN = "faults"
SUPPORTED_PROTOS = ("udp", "tcp")

# Sends ICMP echo requests from a raw socket (no `ping` binary is assumed) and exits 0
# as soon as one matching echo reply arrives. argv: address count timeout-per-packet.
_PING_SCRIPT = r"""
import os, socket, struct, sys, time
dst, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
ident = os.getpid() & 0xFFFF
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
except OSError as e:
    sys.exit("ping: %s" % e)
for seq in range(count):
    body = struct.pack("!d", time.time()) + b"pyweave-testbed!"
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + body), ident, seq) + body
    try:
        s.sendto(pkt, (dst, 0))
    except OSError:
        time.sleep(timeout)
        continue
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(65535)
        except (TimeoutError, OSError):
            break
        ihl = (data[0] & 0x0F) * 4
        if len(data) < ihl + 8:
            continue
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if typ == 0 and rid == ident and rseq == seq and addr[0] == dst:
            sys.exit(0)
sys.exit(1)
"""


class TestbedError(RuntimeError):
    """The test bed could not do what was asked."""

    __test__ = False  # not a pytest test class


class CommandError(TestbedError):
    """A command run by the test bed failed; the message has argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 detail: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = detail or f"exit code {returncode}"
        super().__init__(f"command {_quote(self.argv)} failed ({what}): {stderr.strip() or '<no stderr>'}")


def _quote(argv: Sequence[str]) -> str:
    return " ".join(subprocess.list2cmdline([a]) for a in argv)


def _run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float | None = 30,
         env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=dict(env) if env is not None else None, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CommandError(args, None, out, err, detail=f"timed out after {timeout} s") from None
    except OSError as e:
        raise CommandError(args, None, "", str(e), detail="could not start") from None
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return _run(argv).stdout


def _nft(netns: str, script: str) -> str:
    """Run an nft script (several commands, applied atomically) inside a namespace."""
    return _run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script).stdout


def _check_ifname(name: str) -> str:
    if len(name) > IFNAMSIZ:
        raise TestbedError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return name


# --- root namespace snapshot ---------------------------------------------------------------


@dataclass(frozen=True)
class RootSnapshot:
    """What the root namespace holds: named network namespaces and link names."""

    netns: frozenset[str]
    links: frozenset[str]


def _remove_etc_netns(ns: str) -> None:
    """`weave attach` writes /etc/netns/NS/resolv.conf for a container; it goes with the netns."""
    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def list_netns() -> set[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_snapshot() -> RootSnapshot:
    """Snapshot the root namespace so tests can assert that nothing leaked."""
    out = _run(["ip", "-o", "link", "show"]).stdout
    links = set()
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            links.add(parts[1].strip().split("@")[0])
    return RootSnapshot(netns=frozenset(list_netns()), links=frozenset(links))


# --- processes inside namespaces ----------------------------------------------------------


def _netns_pids(netns: str) -> list[int]:
    """Pids of the processes whose network namespace is `netns` (like ``ip netns pids``)."""
    try:
        st = os.stat(NETNS_DIR / netns)
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone, a zombie or a kernel thread
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def _terminate_netns_processes(namespaces: Sequence[str], grace: float, kill_wait: float = 3.0) -> list[int]:
    """SIGTERM every process inside the namespaces, SIGKILL what is left after `grace`.

    Processes are handled through pidfds (opened, then re-checked to still be inside
    the namespace) so a recycled pid can never be signalled. Returns the pids that
    were still alive at the end.
    """
    fds: dict[int, int] = {}
    for ns in namespaces:
        for pid in _netns_pids(ns):
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            if pid in _netns_pids(ns):
                fds[pid] = fd
            else:
                os.close(fd)
    try:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
            alive = {pid: fd for pid, fd in fds.items() if not _pidfd_exited(fd)}
            if not alive:
                return []
            for pid, fd in alive.items():
                try:
                    signal.pidfd_send_signal(fd, sig)
                    log.debug("sent %s to pid %d", sig.name, pid)
                except ProcessLookupError:
                    pass
                except OSError as e:
                    log.warning("could not send %s to pid %d: %s", sig.name, pid, e)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not all(_pidfd_exited(fd) for fd in alive.values()):
                time.sleep(0.02)
        return [pid for pid, fd in fds.items() if not _pidfd_exited(fd)]
    finally:
        for fd in fds.values():
            os.close(fd)


def _pidfd_exited(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _start_time(pid: int) -> int | None:
    """The process start time in clock ticks (field 22 of /proc/pid/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group of a spawned process (it leads its own session)."""
    if proc.poll() is not None:
        # The leader is gone (and reaped); its pgid may be reused, so don't signal it.
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


IPERF3_PORT = 5201


def iperf3_end(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The `end` section of an `iperf3 -c ... -J` run; TestbedError (with its output) if it failed."""
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        detail = f"{proc.stdout[-1500:]} {proc.stderr}"
        raise TestbedError(f"iperf3 gave no JSON (exit {proc.returncode}): {detail}") from None
    if "error" in doc or proc.returncode != 0:
        raise TestbedError(f"iperf3 failed (exit {proc.returncode}): {doc.get('error', proc.stderr)}")
    return doc["end"]



# --- namespaces ---------------------------------------------------------------------------


class _Namespace:
    """Something with a named network namespace that commands can run in."""

    netns: str

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    def exec_argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The argv that runs `argv` inside this namespace (for callers that spawn themselves)."""
        return ["ip", "netns", "exec", self.netns] + [os.fspath(a) for a in argv]

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**os.environ, **(env or {})}

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        check: bool = True,
        timeout: float | None = 30,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and capture its output (text).

        Raises :class:`CommandError` (argv, exit code, stderr in the message) if it
        exits non-zero and `check` is set, or if it times out.
        """
        return _run(self.exec_argv(argv), check=check, timeout=timeout, env=self._env(env), input=input)

    def wait_listening(self, port: int, timeout: float = 10) -> None:
        """Return once something listens on TCP `port` here; TestbedError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip():
            if time.monotonic() > deadline:
                raise TestbedError(f"nothing listens on TCP port {port} in {self.netns} after {timeout} s")
            time.sleep(0.05)

    @contextlib.contextmanager
    def iperf3_server(self, address: str, port: int = IPERF3_PORT) -> Iterator[None]:
        """A one-shot iperf3 server on `address`:`port` here, listening when the body
        starts and gone (killed if need be) when it ends."""
        argv = self.exec_argv(["iperf3", "-s", "-1", "-B", address, "-p", str(port)])
        quiet = subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdin=quiet, stdout=quiet, stderr=quiet)
        try:
            self.wait_listening(port)
            yield
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def ping(self, address: str, count: int = 1, timeout: float = 1) -> bool:
        """True if at least one of `count` ICMP echoes to `address` is answered within `timeout` s each."""
        proc = self.run([sys.executable, "-c", _PING_SCRIPT, address, str(count), str(timeout)],
                        check=False, timeout=count * timeout + 10)
        if proc.returncode not in (0, 1):
            raise CommandError(self.exec_argv(["ping", address]), proc.returncode, proc.stdout, proc.stderr)
        return proc.returncode == 0


class Container(_Namespace):
    """A namespace standing for a container on a host (loopback up, no other interfaces)."""

    def __init__(self, name: str, host: Host, netns: str) -> None:
        self.name = name
        self.host = host
        self.netns = netns

    def __repr__(self) -> str:
        return f"Container({self.name!r} on {self.host.name}, netns={self.netns!r})"


class Gateway(_Namespace):
    """A NAT gateway: `address` on the underlay, `lan_address` on its private LAN."""

    def __init__(self, testbed: Testbed, index: int, netns: str, address: str, lan_net: str) -> None:
        self.testbed = testbed
        self.index = index
        self.name = f"gateway{index}"
        self.netns = netns
        self.address = address
        self.underlay_address = address
        self.lan_net = lan_net  # e.g. "192.168.77"
        self.lan_address = f"{lan_net}.1"
        self.lan_subnet = f"{lan_net}.0/24"
        self.hosts: list[Host] = []

    def __repr__(self) -> str:
        return f"Gateway({self.name!r}, netns={self.netns!r}, address={self.address}, lan={self.lan_subnet})"


class Host(_Namespace):
    """A simulated host: a namespace on the underlay (or behind a NAT gateway).

    `address` is the host's own address; `underlay_address` is what the switch sees
    (the gateway's address for a NATed host), which is what fault rules match.
    """

    def __init__(self, testbed: Testbed, index: int, netns: str, address: str, state_dir: Path,
                 gateway: Gateway | None = None) -> None:
        self.testbed = testbed
        self.index = index
        self.name = f"host{index}"
        self.netns = netns
        self.address = address
        self.interface = HOST_IFNAME
        self.gateway = gateway
        self.underlay_address = gateway.address if gateway else address
        self.state_dir = state_dir
        self.env: dict[str, str] = {**os.environ, "WEAVE_STATE_DIR": str(state_dir)}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.containers: dict[str, Container] = {}

    def __repr__(self) -> str:
        nat = f", behind {self.gateway.name}" if self.gateway else ""
        return f"Host({self.name!r}, netns={self.netns!r}, address={self.address}{nat})"

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.env, **(env or {})}

    def log_path(self, name: str) -> Path:
        """Where the output of the process spawned as `name` goes."""
        return self.state_dir / "logs" / f"{name}.log"

    def spawn(self, argv: Sequence[str | os.PathLike[str]], name: str,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the host namespace, tracked as `name`.

        stdout and stderr go (appended) to :meth:`log_path`; the environment is
        ``host.env`` updated with `env`. The process leads its own process group, so
        :meth:`stop` and :meth:`kill` reach its children too.
        """
        if self.is_running(name):
            raise TestbedError(f"{self.name}: a process named {name!r} is already running")
        path = self.log_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        args = self.exec_argv(argv)
        with open(path, "ab") as logfile:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                                    env=self._env(env), start_new_session=True)
        self.processes[name] = proc
        log.info("%s: spawned %s (pid %d): %s", self.name, name, proc.pid, _quote(args))
        return proc

    def is_running(self, name: str) -> bool:
        proc = self.processes.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 5) -> int:
        """Send `sig` to the process group of `name`; SIGKILL it after `timeout` s. Returns the exit code."""
        proc = self.processes[name]
        _kill_group(proc, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s: %s (pid %d) ignored signal %d for %s s, killing it", self.name, name, proc.pid,
                        sig, timeout)
            return self.kill(name)

    def kill(self, name: str) -> int:
        """SIGKILL the process group of `name` (a crash, as far as it knows). Returns the exit code."""
        proc = self.processes[name]
        _kill_group(proc, signal.SIGKILL)
        return proc.wait(10)

    def add_container(self, name: str) -> Container:
        """Create a namespace for a container called `name` on this host (loopback up)."""
        if name in self.containers:
            raise TestbedError(f"{self.name} already has a container named {name!r}")
        container = Container(name, self, self.testbed._new_netns("c"))
        _ip("link", "set", "lo", "up", netns=container.netns)
        self.containers[name] = container
        self.testbed.containers.append(container)
        log.info("%s: added container %s (netns %s)", self.name, name, container.netns)
        return container


# --- the test bed -------------------------------------------------------------------------

_LIVE: set[Testbed] = set()


def _close_live_testbeds() -> None:
    for tb in list(_LIVE):
        if tb.owner_pid != os.getpid():
            continue  # a forked child exiting: the test bed belongs to the parent
        log.warning("cleaning up test bed %s at exit", tb.prefix)
        tb.close()


atexit.register(_close_live_testbeds)


class Testbed:
    """A switch namespace with an underlay bridge, hosts, containers, NAT gateways, faults.

    Use it as a context manager (or call :meth:`close`): cleanup kills every process in
    its namespaces, deletes the namespaces and removes the state directories (unless
    `keep`). An ``atexit`` handler closes test beds still open when the interpreter exits.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, n_hosts: int = 0, prefix: str | None = None, keep: bool = False,
                 state_base: str | os.PathLike[str] | None = None) -> None:
        self.keep = keep
        self.hosts: list[Host] = []
        self.gateways: list[Gateway] = []
        self.containers: list[Container] = []
        self.namespaces: list[str] = []  # every namespace created, in creation order
        self.cleanup_errors: list[str] = []
        self.closed = False
        self.owner_pid = os.getpid()
        self._counters: dict[str, int] = {}
        self.prefix = self._reserve_prefix(prefix)
        self.table = self.prefix  # nftables table (family bridge) in the switch namespace
        self.switch_netns = f"{self.prefix}-sw"
        _LIVE.add(self)
        try:
            self.state_root = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir=state_base))
            self._write_marker()
            self._make_switch()
            for _ in range(n_hosts):
                self.add_host()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Testbed({self.prefix!r}, hosts={[h.name for h in self.hosts]})"

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- naming and bookkeeping

    @staticmethod
    def _reserve_prefix(prefix: str | None) -> str:
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            candidate = prefix or "pw" + secrets.token_hex(3)[:5]
            if not PREFIX_RE.match(candidate):
                raise ValueError(f"test bed prefix {candidate!r} must match {PREFIX_RE.pattern}")
            in_use = any(ns.startswith(candidate + "-") for ns in list_netns())
            if not in_use:
                try:
                    # O_EXCL: two processes can't pick the same prefix.
                    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
                    fd = os.open(REGISTRY_DIR / f"{candidate}.json", flags, 0o644)
                    os.close(fd)
                    return candidate
                except FileExistsError:
                    in_use = True
            if prefix:
                raise TestbedError(f"test bed prefix {prefix!r} is in use (try Testbed.cleanup_stale())")
        raise TestbedError("could not find a free test bed prefix")

    @property
    def _marker(self) -> Path:
        return REGISTRY_DIR / f"{self.prefix}.json"

    def _write_marker(self) -> None:
        info = {"pid": os.getpid(), "start": _start_time(os.getpid()), "state_root": str(self.state_root),
                "keep": self.keep}
        self._marker.write_text(json.dumps(info))

    def _next(self, kind: str) -> int:
        self._counters[kind] = self._counters.get(kind, 0) + 1
        return self._counters[kind]

    def _new_netns(self, role: str, index: int | None = None) -> str:
        name = _check_ifname(f"{self.prefix}-{role}{index if index is not None else self._next(role)}")
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        return name

    def host(self, name: str) -> Host:
        """The host called `name` (e.g. "host2")."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    # -- building

    def _make_switch(self) -> None:
        _run(["ip", "netns", "add", self.switch_netns])
        self.namespaces.append(self.switch_netns)
        ns = self.switch_netns
        _ip("link", "set", "lo", "up", netns=ns)
        _ip("link", "add", SWITCH_BRIDGE, "type", "bridge", netns=ns)
        _ip("link", "set", SWITCH_BRIDGE, "up", netns=ns)
        _nft(ns, f"table bridge {self.table} {{\n"
                 f"  chain {FAULT_CHAIN} {{ type filter hook forward priority 0; policy accept; }}\n"
                 "}\n")
        log.info("test bed %s: switch namespace %s ready", self.prefix, ns)

    def _plug(self, outer_ns: str, bridge: str, port: str, inner_ns: str, cidr: str) -> None:
        """veth `port` (in `outer_ns`, enslaved to `bridge`) <-> eth0 in `inner_ns` with address `cidr`."""
        _ip("link", "add", _check_ifname(port), "type", "veth",
            "peer", "name", HOST_IFNAME, "netns", inner_ns, netns=outer_ns)
        _ip("link", "set", port, "master", bridge, "up", netns=outer_ns)
        _ip("addr", "add", cidr, "dev", HOST_IFNAME, netns=inner_ns)
        _ip("link", "set", HOST_IFNAME, "up", netns=inner_ns)
        _ip("link", "set", "lo", "up", netns=inner_ns)

    def _new_host(self, gateway: Gateway | None) -> Host:
        index = len(self.hosts) + 1
        if index > MAX_HOSTS:
            raise TestbedError(f"at most {MAX_HOSTS} hosts")
        netns = self._new_netns("h", index)
        if gateway is None:
            address = f"{UNDERLAY_NET}.{index}"
            self._plug(self.switch_netns, SWITCH_BRIDGE, netns, netns, f"{address}/{UNDERLAY_PREFIXLEN}")
        else:
            address = f"{gateway.lan_net}.{len(gateway.hosts) + 2}"
            self._plug(gateway.netns, GATEWAY_LAN_BRIDGE, netns, netns, f"{address}/24")
            _ip("route", "add", "default", "via", gateway.lan_address, netns=netns)
        state_dir = self.state_root / f"host{index}"
        state_dir.mkdir()
        host = Host(self, index, netns, address, state_dir, gateway)
        self.hosts.append(host)
        if gateway is not None:
            gateway.hosts.append(host)
        log.info("test bed %s: added %r", self.prefix, host)
        return host

    def add_host(self) -> Host:
        """A new host on the underlay: ``hostN`` with address 10.98.0.N/24."""
        return self._new_host(None)

    def add_gateway(self) -> Gateway:
        """A NAT gateway: underlay address 10.98.0.(200+g), private LAN 192.168.(76+g).0/24.

        Hosts on its LAN reach the underlay through masquerading; nothing on the
        underlay can open a connection to them (forwarding from the underlay side is
        dropped unless it belongs to a connection opened from inside).
        """
        index = len(self.gateways) + 1
        if index > MAX_GATEWAYS:
            raise TestbedError(f"at most {MAX_GATEWAYS} gateways")
        netns = self._new_netns("g", index)
        address = f"{UNDERLAY_NET}.{200 + index}"
        self._plug(self.switch_netns, SWITCH_BRIDGE, netns, netns, f"{address}/{UNDERLAY_PREFIXLEN}")
        gateway = Gateway(self, index, netns, address, LAN_NET.format(76 + index))
        _ip("link", "add", GATEWAY_LAN_BRIDGE, "type", "bridge", netns=netns)
        _ip("addr", "add", f"{gateway.lan_address}/24", "dev", GATEWAY_LAN_BRIDGE, netns=netns)
        _ip("link", "set", GATEWAY_LAN_BRIDGE, "up", netns=netns)
        _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        _nft(netns, "table ip nat {\n"
                    "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
                    f'    oifname "{HOST_IFNAME}" masquerade\n'
                    "  }\n"
                    "  chain forward { type filter hook forward priority filter; policy drop;\n"
                    "    ct state established,related accept\n"
                    f'    iifname "{GATEWAY_LAN_BRIDGE}" accept\n'
                    "  }\n"
                    "}\n")
        self.gateways.append(gateway)
        log.info("test bed %s: added %r", self.prefix, gateway)
        return gateway

    def add_nat_host(self, gateway: Gateway | None = None) -> Host:
        """A new host behind a NAT gateway (a new gateway unless one is given)."""
        return self._new_host(gateway or self.add_gateway())

    def set_mtu(self, host: Host, mtu: int) -> None:
        """Set the MTU of the host's underlay link (both veth ends)."""
        outer = host.gateway.netns if host.gateway else self.switch_netns
        _ip("link", "set", host.netns, "mtu", str(mtu), netns=outer)
        _ip("link", "set", HOST_IFNAME, "mtu", str(mtu), netns=host.netns)

    # -- faults (nftables rules in the switch namespace, one comment per rule set)

    @staticmethod
    def _addr(x: Host | Gateway) -> str:
        return x.underlay_address

    def _pair(self, a: Host | Gateway, b: Host | Gateway) -> tuple[str, str]:
        return tuple(sorted((self._addr(a), self._addr(b))))  # type: ignore[return-value]

    def _fault_rules(self) -> list[tuple[int, str]]:
        out = _run(["ip", "netns", "exec", self.switch_netns, "nft", "-j", "list", "chain", "bridge",
                    self.table, FAULT_CHAIN]).stdout
        rules = []
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if rule is not None:
                rules.append((rule["handle"], rule.get("comment", "")))
        return rules

    def active_faults(self) -> list[str]:
        """The faults in force, one label per rule set (e.g. "partition 10.98.0.1 10.98.0.2")."""
        seen: list[str] = []
        for _, comment in self._fault_rules():
            if comment not in seen:
                seen.append(comment)
        return seen

    def _add_fault(self, label: str, matches: Sequence[str], replace: bool = False) -> None:
        if replace:
            self._remove_fault(label)
        elif label in self.active_faults():
            return
        script = "".join(f'add rule bridge {self.table} {FAULT_CHAIN} {m} drop comment "{label}"\n'
                         for m in matches)
        _nft(self.switch_netns, script)
        log.info("test bed %s: fault on: %s", self.prefix, label)

    def _remove_fault(self, label: str) -> None:
        handles = [h for h, comment in self._fault_rules() if comment == label]
        if handles:
            _nft(self.switch_netns, "".join(f"delete rule bridge {self.table} {FAULT_CHAIN} handle {h}\n"
                                            for h in handles))
            log.info("test bed %s: fault off: %s", self.prefix, label)

    def partition(self, a: Host | Gateway, b: Host | Gateway) -> None:
        """Drop all IPv4 between `a` and `b`, both directions."""
        x, y = self._pair(a, b)
        self._add_fault(f"partition {x} {y}", [f"ip saddr {x} ip daddr {y}", f"ip saddr {y} ip daddr {x}"])

    def heal(self, a: Host | Gateway, b: Host | Gateway) -> None:
        """Undo :meth:`partition`."""
        self._remove_fault("partition {} {}".format(*self._pair(a, b)))

    def isolate(self, host: Host | Gateway) -> None:
        """Drop all IPv4 from and to `host` on the underlay."""
        x = self._addr(host)
        self._add_fault(f"isolate {x}", [f"ip saddr {x}", f"ip daddr {x}"])

    def unisolate(self, host: Host | Gateway) -> None:
        """Undo :meth:`isolate`."""
        self._remove_fault(f"isolate {self._addr(host)}")

    @staticmethod
    def _port_match(proto: str, port: int | None) -> str:
        if proto not in SUPPORTED_PROTOS:
            raise ValueError(f"proto must be one of {SUPPORTED_PROTOS}, not {proto!r}")
        return f"{proto} dport {int(port)}" if port is not None else f"ip protocol {proto}"

    def _directions(self, a: Host | Gateway, b: Host | Gateway, one_way: bool) -> list[tuple[str, str]]:
        x, y = self._addr(a), self._addr(b)
        return [(x, y)] if one_way else [(x, y), (y, x)]

    def block(self, a: Host | Gateway, b: Host | Gateway, proto: str = "udp", port: int | None = 6784,
              one_way: bool = False) -> None:
        """Drop `proto` to destination `port` (None: any) from `a` to `b`, and back unless `one_way`."""
        match = self._port_match(proto, port)
        for x, y in self._directions(a, b, one_way):
            self._add_fault(f"block {x}>{y} {proto}/{port}", [f"ip saddr {x} ip daddr {y} {match}"])

    def unblock(self, a: Host | Gateway, b: Host | Gateway, proto: str = "udp", port: int | None = 6784,
                one_way: bool = False) -> None:
        """Undo :meth:`block` (for the same arguments)."""
        self._port_match(proto, port)
        for x, y in self._directions(a, b, one_way):
            self._remove_fault(f"block {x}>{y} {proto}/{port}")

    def loss(self, a: Host | Gateway, b: Host | Gateway, percent: float, one_way: bool = False) -> None:
        """Drop a random `percent` % (0.01 % steps) of IPv4 from `a` to `b`, and back unless `one_way`.

        Calling it again for the same direction replaces the earlier loss rate; 0 clears it.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be within 0..100, not {percent}")
        basis_points = round(percent * 100)
        for x, y in self._directions(a, b, one_way):
            label = f"loss {x}>{y}"
            if basis_points == 0:
                self._remove_fault(label)
                continue
            match = f"ip saddr {x} ip daddr {y}"
            if basis_points < 10000:  # `mod N < N` is out of nft's range; 100 % is a plain drop
                match += f" numgen random mod 10000 < {basis_points}"
            self._add_fault(label, [match], replace=True)

    def clear_loss(self, a: Host | Gateway, b: Host | Gateway, one_way: bool = False) -> None:
        """Undo :meth:`loss`."""
        for x, y in self._directions(a, b, one_way):
            self._remove_fault(f"loss {x}>{y}")

    def heal_all(self) -> None:
        """Remove every fault."""
        _nft(self.switch_netns, f"flush chain bridge {self.table} {FAULT_CHAIN}\n")
        log.info("test bed %s: all faults healed", self.prefix)

    # -- cleanup

    def _try(self, what: str, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception as e:  # cleanup goes on whatever fails
            msg = f"{what}: {e}"
            self.cleanup_errors.append(msg)
            log.error("test bed %s cleanup: %s", getattr(self, "prefix", "?"), msg)

    def close(self, grace: float = 2.0) -> None:
        """Kill every process in the test bed's namespaces, delete them, remove the state.

        SIGTERM first, SIGKILL after `grace` s. Each step carries on when another fails;
        failures are logged and kept in ``cleanup_errors``. Safe to call twice.
        """
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        procs = [(h, name, p) for h in self.hosts for name, p in h.processes.items()]
        for _, _, proc in procs:
            self._try(f"SIGTERM pid {proc.pid}", _kill_group, proc, signal.SIGTERM)
        namespaces = list(reversed(self.namespaces))
        leftover: list[int] = []
        try:
            leftover = _terminate_netns_processes(namespaces, grace)
        except Exception as e:
            self.cleanup_errors.append(f"terminating processes: {e}")
            log.error("test bed %s cleanup: terminating processes: %s", self.prefix, e)
        if leftover:
            msg = f"processes survived SIGKILL: {leftover}"
            self.cleanup_errors.append(msg)
            log.error("test bed %s cleanup: %s", self.prefix, msg)
        for host, name, proc in procs:
            self._try(f"kill {host.name}/{name}", _kill_group, proc, signal.SIGKILL)
            self._try(f"reap {host.name}/{name}", proc.wait, 5)
        for ns in namespaces:
            self._try(f"delete netns {ns}", _run, ["ip", "netns", "delete", ns])
            _remove_etc_netns(ns)
        state_root = getattr(self, "state_root", None)
        if state_root is not None:
            if self.keep:
                log.info("test bed %s: state kept in %s", self.prefix, state_root)
            else:
                self._try(f"remove {state_root}", shutil.rmtree, state_root)
        self._try(f"remove {self._marker}", self._marker.unlink, True)
        log.info("test bed %s closed%s", self.prefix,
                 f" with {len(self.cleanup_errors)} errors" if self.cleanup_errors else "")

    def detach(self) -> None:
        """Leave everything running: no cleanup now or at exit (a later cleanup_stale removes it)."""
        self.keep = True
        self.closed = True
        _LIVE.discard(self)

    @staticmethod
    def snapshot() -> RootSnapshot:
        """See :func:`root_snapshot`."""
        return root_snapshot()

    @staticmethod
    def cleanup_stale(pattern: str = STALE_PATTERN, grace: float = 1.0) -> list[str]:
        """Remove namespaces (and state) left by test beds whose process died.

        Only namespaces whose name matches `pattern` are considered, and of those only
        the ones whose test bed's owner (recorded in the registry) is gone, so test beds
        of concurrent runs are left alone. Returns the namespaces deleted.
        """
        regex = re.compile(pattern)
        by_prefix: dict[str, list[str]] = {}
        for ns in sorted(list_netns()):
            if regex.search(ns):
                by_prefix.setdefault(ns.split("-", 1)[0], []).append(ns)
        markers = {p.stem: p for p in REGISTRY_DIR.glob("*.json")} if REGISTRY_DIR.is_dir() else {}
        for prefix in markers:
            if regex.search(prefix + "-"):
                by_prefix.setdefault(prefix, [])
        removed: list[str] = []
        for prefix, namespaces in by_prefix.items():
            info: dict[str, object] = {}
            marker = markers.get(prefix)
            if marker is not None:
                try:
                    info = json.loads(marker.read_text() or "{}")
                except (OSError, ValueError):
                    info = {}
                pid = info.get("pid")
                if not info and time.time() - _mtime(marker) < 60:
                    continue  # a marker being written right now
                start = info.get("start")
                if isinstance(pid, int) and start is not None and _start_time(pid) == start:
                    continue  # its owner is alive
            log.warning("removing stale test bed %s: %s", prefix, namespaces)
            left = _terminate_netns_processes(namespaces, grace)
            if left:
                log.error("stale test bed %s: processes survived SIGKILL: %s", prefix, left)
            for ns in namespaces:
                try:
                    _run(["ip", "netns", "delete", ns])
                    removed.append(ns)
                except CommandError as e:
                    log.error("stale test bed %s: %s", prefix, e)
                _remove_etc_netns(ns)
            state_root = info.get("state_root")
            ours = isinstance(state_root, str) and Path(state_root).name.startswith(prefix + "-")
            if ours and not info.get("keep"):
                shutil.rmtree(state_root, ignore_errors=True)
            if marker is not None:
                with contextlib.suppress(OSError):
                    marker.unlink()
        return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
