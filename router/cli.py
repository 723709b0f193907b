"""`weave`: the command line. Talks to the daemon of its own network namespace over HTTP."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import os
import select
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from router import __version__
from router.config import (
    ConfigError,
    RouterConfig,
    http_addr,
    parse_args,
    state_dir,
)

LAUNCH_TIMEOUT = 20.0
LISTEN_BACKLOG = 128


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _form_bytes(text: str) -> bytes:
    # Arguments that are not valid UTF-8 reach us with surrogate escapes; they go to the
    # daemon as the bytes they were, so its one validation says what is wrong with them.
    return text.encode("utf-8", "surrogateescape")


def _request(method: str, path: str, form: list[tuple[str, str]] | None = None, timeout: float = 10) -> str:
    url = f"http://{http_addr()}{path}"
    data = None
    if form is not None:
        data = urllib.parse.urlencode([(_form_bytes(k), _form_bytes(v)) for k, v in form]).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip()
        raise CliError(body or f"HTTP {exc.code}", 4 if exc.code == 404 else 1) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"weave is not running (cannot reach {url}: {reason})") from None


def _pid_file() -> Path:
    return state_dir() / "weaver.pid"


def _running_pid() -> int | None:
    """The daemon's pid, if it runs: not a zombie, and not a reused pid of another program."""
    try:
        pid = int(_pid_file().read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"weave" in cmdline else None


def _listen(cfg: RouterConfig) -> list[socket.socket]:
    """The mesh's TCP listeners, bound here before the daemon starts: a port in use is
    reported at once, and peers that dial us while the daemon is still starting wait in
    the backlog instead of being refused and backing off for seconds."""
    try:
        infos = socket.getaddrinfo(
            cfg.host or None, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise CliError(f"weave launch: --host {cfg.host!r}: {exc.strerror}") from None
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT and len(infos) > 1:
                    continue  # e.g. no IPv6 in this kernel: the other family will do
                raise
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for sock in listeners:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CliError(f"weave launch: TCP port {cfg.port} is already in use") from None
        raise CliError(f"weave launch: cannot listen on TCP port {cfg.port}: {exc.strerror or exc}") from None
    if not listeners:
        raise CliError(f"weave launch: cannot listen on TCP port {cfg.port}: no usable address family")
    return listeners


def _spawn_weaver(args: list[str], log_path: Path, listeners: list[socket.socket], ready_fd: int) -> int:
    """Fork the daemon from this process: it has already paid for the interpreter's
    start-up, which matters when many routers start at once on a small machine."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return pid
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # No cyclic GC passes over the import-time objects while starting; the daemon
        # freezes them and turns the collector back on once it is up.
        gc.disable()
        from router.weaver import main as weaver_main

        code = weaver_main(args, listeners=listeners, ready_fd=ready_fd)
    except BaseException:  # the child must never return into the CLI
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_code(pid: int) -> int | None:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _wait_ready(child: int, ready_r: int, log_path: Path) -> None:
    """Block until the daemon says it is ready (a byte on the pipe) or goes away (end
    of file: the daemon held the only write end)."""
    tty = sys.stderr.isatty()
    poller = select.poll()
    poller.register(ready_r, select.POLLIN)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(min(left, 0.5) * 1000):
            if tty:
                print(".", end="", file=sys.stderr, flush=True)
            continue
        if os.read(ready_r, 1):
            if tty:
                print(file=sys.stderr)
            return
        code = None
        for _ in range(50):  # the exit status follows the end of file closely
            code = _exit_code(child)
            if code is not None:
                break
            time.sleep(0.02)
        _pid_file().unlink(missing_ok=True)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        detail = "\n  ".join(tail)
        raise CliError(f"weave launch: the router exited (code {code}):\n  {detail}")
    os.kill(child, signal.SIGTERM)
    _pid_file().unlink(missing_ok=True)
    raise CliError(f"weave launch: the router did not answer within {LAUNCH_TIMEOUT:.0f} s; see {log_path}")


def cmd_launch(args: list[str]) -> int:
    if os.geteuid() != 0:
        raise CliError("weave launch must be run as root")
    try:
        cfg = parse_args(args, "weave launch")
    except ConfigError as exc:
        raise CliError(f"weave launch: {exc}") from None
    pid = _running_pid()
    if pid is not None:
        raise CliError(f"weave is already running (pid {pid}); `weave stop` first")
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    listeners = _listen(cfg)
    log_path = directory / "weaver.log"
    ready_r, ready_w = os.pipe()
    try:
        child = _spawn_weaver(args, log_path, listeners, ready_w)
    finally:
        os.close(ready_w)
        for sock in listeners:
            sock.close()
    _pid_file().write_text(f"{child}\n")
    try:
        _wait_ready(child, ready_r, log_path)
    finally:
        os.close(ready_r)
    print(f"weave router started (pid {child}); log: {log_path}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        # A zombie (exited, not yet reaped by whoever adopted the forked daemon) is gone.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmd_stop(_: list[str]) -> int:
    pid = _running_pid()
    if pid is None:
        print("weave is not running")
        return 0
    with contextlib.suppress(ProcessLookupError):  # it was stopping already (weave reset)
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _pid_file().unlink(missing_ok=True)
    print("weave router stopped")
    return 0


STATE_FILES = ("peername", "weaver.log", "weaver.ready", "ipam.sqlite3", "dns-entries.json")


def cmd_reset(args: list[str]) -> int:
    """Hand our IP space to a live peer, stop, and remove the state and the kernel objects."""
    if _running_pid() is not None:
        try:
            # The router hands its space over only with no container attached (then stops).
            for att in json.loads(_request("GET", "/ps?format=json")):
                _request("POST", "/detach", [("container", att["Container"])])
            _request("DELETE", "/peer", timeout=10)
        except CliError as exc:
            print(f"weave reset: could not hand over IP space: {exc}", file=sys.stderr)
    cmd_stop(args)
    directory = state_dir()
    for item in STATE_FILES:
        for path in directory.glob(item + "*"):
            path.unlink(missing_ok=True)
    from router.bridge import teardown
    from router.expose import remove_nat
    from weavedns.service import HostDnsSetup, remove_host_setup

    try:
        remove_host_setup(HostDnsSetup())
        remove_nat()
        removed = teardown()
    except Exception as exc:  # best effort: the state is gone either way
        print(f"weave reset: could not remove every kernel object: {exc}", file=sys.stderr)
        removed = []
    also = f" and {', '.join(removed)}" if removed else ""
    print(f"weave reset: removed the router's state in {directory}{also}")
    return 0


def cmd_expose(args: list[str]) -> int:
    print(_request("POST", "/expose", [("addr", a) for a in args], timeout=60), end="")
    return 0


def cmd_hide(args: list[str]) -> int:
    print(_request("POST", "/hide", [("addr", a) for a in args]), end="")
    return 0


def cmd_prime(_: list[str]) -> int:
    _request("GET", "/ring", timeout=130)
    return 0


def cmd_rmpeer(args: list[str]) -> int:
    if not args:
        raise CliError("usage: weave rmpeer PEER... (a peer name or nickname)", 2)
    for peer in args:
        print(_request("DELETE", f"/peer/{urllib.parse.quote(peer)}"), end="")
    return 0


STATUS_SECTIONS = ("peers", "connections", "targets", "dns", "ipam")


def cmd_status(args: list[str]) -> int:
    sub = args[0] if args else ""
    if sub and sub not in STATUS_SECTIONS:
        raise CliError(f"weave status: unknown section {sub!r} ({', '.join(STATUS_SECTIONS)})", 2)
    print(_request("GET", f"/status/{sub}" if sub else "/status"), end="")
    return 0


def cmd_report(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="weave report")
    p.add_argument("-f", "--format")
    opts = p.parse_args(args)
    if opts.format:
        print(_request("GET", "/report?" + urllib.parse.urlencode({"format": opts.format})))
    else:
        print(json.dumps(json.loads(_request("GET", "/report")), indent=4))
    return 0


def cmd_connect(args: list[str]) -> int:
    replace = "--replace" in args
    peers = [a for a in args if a != "--replace"]
    form = [("peer", p) for p in peers]
    if replace:
        form.append(("replace", "true"))
    _request("POST", "/connect", form)
    return 0


def cmd_forget(args: list[str]) -> int:
    _request("POST", "/forget", [("peer", p) for p in args])
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, add_help=False)
    p.add_argument("--help", action="help")
    return p


def cmd_attach(args: list[str]) -> int:
    p = _parser("weave attach")
    p.add_argument("--without-dns", action="store_true", help="no resolver set-up, no DNS name")
    p.add_argument("-h", "--hostname", default="", help="register this name in weaveDNS")
    p.add_argument("--rewrite-hosts", action="store_true", help="accepted for compatibility")
    p.add_argument("items", nargs="+", metavar="[ADDR...] CONTAINER")
    opts = p.parse_args(args)
    *addrs, container = opts.items
    form = [("container", container), *(("addr", a) for a in addrs)]
    if opts.hostname:
        form.append(("hostname", opts.hostname))
    if opts.without_dns:
        form.append(("without-dns", "true"))
    print(_request("POST", "/attach", form, timeout=60), end="")
    return 0


def cmd_detach(args: list[str]) -> int:
    if not args:
        raise CliError("usage: weave detach [ADDR...] CONTAINER", 2)
    *addrs, container = args
    print(_request("POST", "/detach", [("container", container), *(("addr", a) for a in addrs)]), end="")
    return 0


def cmd_ps(args: list[str]) -> int:
    text = _request("GET", "/ps")
    wanted = set(args)
    for line in text.splitlines():
        if not wanted or line.split(" ", 1)[0] in wanted:
            print(line)
    return 0


def _dns_args(prog: str, args: list[str]) -> tuple[list[str], str, str]:
    """[IP...] CONTAINER [-h FQDN] -> (ips, container, fqdn); IPs default to the container's."""
    p = _parser(prog)
    p.add_argument("-h", "--hostname", default="")
    p.add_argument("items", nargs="+", metavar="[IP...] CONTAINER")
    opts = p.parse_args(args)
    items = list(opts.items)
    ips = [i for i in items if _is_ip(i)]
    rest = [i for i in items if not _is_ip(i)]
    if len(rest) > 1:
        raise CliError(f"{prog}: expected [IP...] CONTAINER, got {' '.join(items)}", 2)
    container = rest[0] if rest else ""
    if not ips and container:
        for entry in json.loads(_request("GET", "/ps?format=json")):
            if entry["Container"] == container:
                ips = [a.split("/")[0] for a in entry["Addresses"]]
        if not ips:
            raise CliError(f"{prog}: {container} has no addresses; give them", 1)
    return ips, container, opts.hostname


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def cmd_dns_add(args: list[str]) -> int:
    ips, container, fqdn = _dns_args("weave dns-add", args)
    if not fqdn:
        raise CliError("weave dns-add: -h FQDN is required (a netns has no hostname of its own)", 2)
    for ip in ips:
        _request("PUT", f"/name/{urllib.parse.quote(container or 'weave:extern')}/{ip}", [("fqdn", fqdn)])
    return 0


def cmd_dns_remove(args: list[str]) -> int:
    ips, container, fqdn = _dns_args("weave dns-remove", args)
    form = [("fqdn", fqdn)] if fqdn else None
    target = urllib.parse.quote(container or "*")
    for ip in ips or ["*"]:
        path = f"/name/{target}/{ip}" if ip != "*" else f"/name/{target}"
        query = "?" + urllib.parse.urlencode(form) if form else ""
        _request("DELETE", path + query)
    return 0


def cmd_dns_lookup(args: list[str]) -> int:
    if len(args) != 1:
        raise CliError("usage: weave dns-lookup NAME", 2)
    import socket

    from dnslib import QTYPE, DNSRecord

    address, _, port = _request("GET", "/dns-address-port").strip().rpartition(":")
    domain = _request("GET", "/domain").strip()
    name = args[0] if "." in args[0].rstrip(".") else f"{args[0]}.{domain}"
    query = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(query.pack(), (address, int(port)))
        reply = DNSRecord.parse(s.recv(65535))
    for rr in reply.rr:
        if rr.rtype == QTYPE.A:
            print(rr.rdata)
    return 0


def cmd_version(_: list[str]) -> int:
    print(f"weave script {__version__}")
    try:
        rep = json.loads(_request("GET", "/report", timeout=2))
        print(f"weave router {rep['Version']}")
    except CliError:
        print("weave router not running")
    return 0


def cmd_demo(args: list[str]) -> int:
    from router.demo import main as demo_main

    return demo_main(args)


COMMANDS = {
    "launch": cmd_launch,
    "stop": cmd_stop,
    "reset": cmd_reset,
    "status": cmd_status,
    "report": cmd_report,
    "connect": cmd_connect,
    "forget": cmd_forget,
    "version": cmd_version,
    "demo": cmd_demo,
    "attach": cmd_attach,
    "detach": cmd_detach,
    "ps": cmd_ps,
    "dns-add": cmd_dns_add,
    "dns-remove": cmd_dns_remove,
    "dns-lookup": cmd_dns_lookup,
    "expose": cmd_expose,
    "hide": cmd_hide,
    "prime": cmd_prime,
    "rmpeer": cmd_rmpeer,
}

USAGE = """usage: weave <command> [args]

  launch [flags] [peer ...]   start the router daemon (flags as in Weave: --password, --name, ...)
  stop                        stop the router
  reset                       hand IP space to a live peer, stop, remove state and kernel objects
  status [peers|connections|targets|dns|ipam]
  report [-f FORMAT]          the JSON report, or FORMAT (a Go-template subset) applied to it
  connect [--replace] peer... add connection targets
  forget peer...              remove connection targets
  attach [--without-dns] [-h NAME] [ADDR...] CONTAINER
                              plug a container (a netns name, PID or netns path) into the network;
                              ADDR is CIDR, ip:CIDR, net:CIDR or net:default (the default, by IPAM)
  detach [ADDR...] CONTAINER  unplug it (or remove just these addresses)
  ps [CONTAINER...]           attached containers: name, MAC, addresses
  dns-add [IP...] CONTAINER -h FQDN
  dns-remove [IP...] CONTAINER [-h FQDN]
  dns-lookup NAME             ask weaveDNS
  expose [ADDR...]            give the host an address on the network, with NAT (hide undoes it)
  prime                       wait until IPAM is ready
  rmpeer PEER...              take over the IP space of a dead peer
  version
  demo [--keep]               simulated hosts in network namespaces, meshed, shown, cleaned up

Environment: WEAVE_STATE_DIR (default /var/lib/weave), WEAVE_HTTP_ADDR (127.0.0.1:6784), WEAVE_PASSWORD.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"weave: unknown command {argv[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
