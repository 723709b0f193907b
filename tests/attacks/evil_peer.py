"""An evil peer: completes a plain handshake with a router, then sends what no honest
router would. Run inside a test host's namespace:

    python -m tests.attacks.evil_peer ROUTER_IP [--port 6783] ATTACK [options]

Each attack is one function registered with :func:`attack`, which gets a connected
:class:`Session` (handshake done, codec ready) and its parsed options; the connection
and the handshake are shared. The script prints ``connected to NAME`` after the
handshake, ``sent`` once the attack is out, and ``closed by router`` if the router hangs
up, so a test can tell what happened; it exits 0 unless it could not connect.

Attacks:
    poison-topology --address ADDR...   topology gossip in which we have connections to
                                        made-up peers at ADDR (the router dials them)
    flood-channels --count N            gossip once on each of N made-up channel names
    gob-flood --megabytes M             (with --max-version 1) gob type definitions in a
                                        loop, as long as the router reads them
    garbage-gossip                      a gossip message whose body is not gob
    reset                               a TCP RST straight after announcing ourselves
    listen [--channel C] [--trigger F] [--flood N] [--send KIND:PAYLOAD...] [--on O] [--to NAME]
                                        stay connected, print one JSON line per gossip
                                        message received (on C, or on any channel but
                                        topology); once file F exists gossip on N made-up
                                        channels and/or send each KIND (gossip, broadcast,
                                        unicast to NAME) message on O (default C), then
                                        print ``sent``
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.handshake import Handshake, PeerIdentity
from router.peername import format_peer_name, parse_peer_name, random_peer_name
from router.protocol import GossipMessage, Tag, decode_gossip, encode_gossip, encode_message
from router.topology import ConnectionSummary, PeerSummary, encode_topology


@dataclass
class Session:
    """One handshaken connection to the router."""

    sock: socket.socket
    hs: Handshake
    name: int
    nickname: str
    uid: int
    router_address: str
    router_port: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def router_name(self) -> int:
        return self.hs.remote.name

    def send(self, tag: int, body: bytes = b"") -> None:
        with self.lock:
            self.sock.sendall(self.hs.codec.encode_frame(encode_message(tag, body)))

    def gossip(self, channel: str, payload: bytes, tag: Tag = Tag.GOSSIP, dst: int | None = None) -> None:
        self.send(tag, encode_gossip(GossipMessage(tag, channel, self.name, payload, dst)))

    def link_to_router(self) -> ConnectionSummary:
        """Our (honest) entry for the connection we have to the router."""
        return ConnectionSummary(self.router_name, f"{self.router_address}:{self.router_port}", True, True)

    def announce(self, *extra: ConnectionSummary) -> None:
        """Topology gossip: us, with our link to the router and `extra` connections."""
        me = PeerSummary(self.name, self.nickname, self.uid, 1)
        self.gossip("topology", encode_topology([(me, [self.link_to_router(), *extra])]))

    def heartbeats(self, interval: float = 0.5) -> None:
        """Keep the connection alive from a thread (the router drops silent ones)."""

        def loop() -> None:
            try:
                while True:
                    time.sleep(interval)
                    self.send(Tag.HEARTBEAT)
            except OSError:
                pass

        threading.Thread(target=loop, daemon=True).start()

    def hold(self, seconds: float) -> bool:
        """Read (and drop) what the router sends for `seconds`; False if it hung up."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return False
            except TimeoutError:
                break
            except OSError:
                return False
        return True


def connect(router: str, port: int, nickname: str, name: int | None = None, max_version: int = 2,
            password: bytes | None = None, overlays: Sequence[str] = ("sleeve",),
            short_id: int | None = None) -> Session:
    """Dial the router and complete the handshake (SystemExit if the router hangs up)."""
    name = name if name is not None else random_peer_name()
    uid = secrets.randbits(63) + 1
    sock = socket.create_connection((router, port), timeout=10)
    hs = Handshake(outbound=True, local=PeerIdentity(name, nickname, uid, short_id),
                   conn_id=secrets.randbits(64), overlays=tuple(overlays), max_version=max_version,
                   password=password)
    sock.sendall(hs.initiate())
    while not hs.complete:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("router closed the connection during the handshake")
        out = hs.receive_data(data)
        if out:
            sock.sendall(out)
    return Session(sock, hs, name, nickname, uid, router, port)


# ---------------------------------------------------------------- attacks

Attack = Callable[[Session, argparse.Namespace], None]
ATTACKS: dict[str, tuple[Attack, Callable[[argparse.ArgumentParser], None]]] = {}


def attack(name: str, options: Callable[[argparse.ArgumentParser], None] = lambda p: None):  # type: ignore[no-untyped-def]
    """Register an attack as subcommand `name`; `options` adds its arguments."""

    def register(fn: Attack) -> Attack:
        ATTACKS[name] = (fn, options)
        return fn

    return register


def _poison_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", action="append", required=True, help="address of a made-up peer (repeatable)")
    p.add_argument("--inbound", action="store_true", help="list the made-up connections as inbound ones")
    p.add_argument("--hold", type=float, default=3.0, help="seconds to stay connected afterwards")


@attack("poison-topology", _poison_options)
def poison_topology(session: Session, opts: argparse.Namespace) -> None:
    """Issue 12 defect 1: every router that learns of a connection dials its address;
    one that getaddrinfo cannot even encode (a 64-character label) killed them all."""
    made_up = [ConnectionSummary(random_peer_name(), address, not opts.inbound, True) for address in opts.address]
    session.heartbeats()
    session.announce(*made_up)
    print("sent", flush=True)
    if not session.hold(opts.hold):
        print("closed by router", flush=True)


def _flood_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=70, help="made-up channel names to gossip on")
    p.add_argument("--hold", type=float, default=2.0, help="seconds to stay connected afterwards")


@attack("flood-channels", _flood_options)
def flood_channels(session: Session, opts: argparse.Namespace) -> None:
    """Issue 12 defect 3: made-up channel names used to fill the router's one table of
    unknown channels for good, and then it closed honest peers relaying new ones."""
    session.heartbeats()
    session.announce()
    for i in range(opts.count):
        session.gossip(f"made-up-{i}-{secrets.token_hex(4)}", b"junk")
    print("sent", flush=True)
    if not session.hold(opts.hold):
        print("closed by router", flush=True)


def _gob_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megabytes", type=float, default=8.0, help="definitions to send at most")


@attack("gob-flood", _gob_options)
def gob_flood(session: Session, opts: argparse.Namespace) -> None:
    """Issue 12 defect 6: a v1 peer sending gob type definitions in a loop grew the router
    by ~180 MB with quadratic CPU (the definitions are in clear, before any decryption)."""
    from tests.gobflood import definition_flood

    sent, goal, next_id = 0, int(opts.megabytes * 1e6), 1000
    session.sock.settimeout(20)
    try:
        while sent < goal:
            chunk = definition_flood(4000, first=next_id)
            session.sock.sendall(chunk)
            sent += len(chunk)
            next_id += 4000
        while session.sock.recv(65536):
            pass
        print("closed by router after", sent, "bytes", flush=True)
    except (BrokenPipeError, ConnectionResetError):
        print("closed by router after", sent, "bytes", flush=True)
    except TimeoutError:
        print("open after", sent, "bytes", flush=True)


@attack("garbage-gossip", lambda p: p.add_argument("--hold", type=float, default=10.0))
def garbage_gossip(session: Session, opts: argparse.Namespace) -> None:
    """A gossip message that is no gob stream: the router closes this connection only."""
    session.announce()
    session.send(Tag.GOSSIP, b"\xff\xfe this is not a gob stream")
    print("sent", flush=True)
    if not session.hold(opts.hold):
        print("closed by router", flush=True)


@attack("reset")
def reset(session: Session, opts: argparse.Namespace) -> None:
    """Vanish with a TCP RST while the router is still sending us its topology."""
    session.announce()
    session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    session.sock.close()


GOSSIP_TAGS = {"gossip": Tag.GOSSIP, "broadcast": Tag.GOSSIP_BROADCAST, "unicast": Tag.GOSSIP_UNICAST}


def print_gossip(session: Session, channel: str | None) -> None:
    """Print each gossip message received (on `channel`, or on any but topology) as a JSON
    line, until the router hangs up; then print ``closed by router`` and end the process."""
    session.sock.settimeout(None)
    frames = list(session.hs.codec.feed(b""))
    while True:
        for frame in frames:
            if not frame or frame[0] not in GOSSIP_TAGS.values():
                continue
            msg = decode_gossip(frame[0], frame[1:])
            if msg.channel == channel or (channel is None and msg.channel != "topology"):
                print(json.dumps({"tag": int(msg.tag), "channel": msg.channel, "src": format_peer_name(msg.src),
                                  "dst": None if msg.dst is None else format_peer_name(msg.dst),
                                  "payload": msg.payload.decode(errors="replace")}), flush=True)
        try:
            data = session.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            print("closed by router", flush=True)
            os._exit(1)
        frames = list(session.hs.codec.feed(data))


def _send_spec(text: str) -> tuple[Tag, bytes]:
    kind, sep, payload = text.partition(":")
    if not sep or kind not in GOSSIP_TAGS:
        raise argparse.ArgumentTypeError(f"not KIND:PAYLOAD with KIND one of {', '.join(GOSSIP_TAGS)}: {text!r}")
    return GOSSIP_TAGS[kind], payload.encode()


def _listen_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channel", help="print messages on this channel only (default: all but topology)")
    p.add_argument("--on", help="the channel to --send on (default: --channel)")
    p.add_argument("--trigger", help="a file: send nothing until it exists")
    p.add_argument("--flood", type=int, default=0, help="made-up channel names to gossip on, once triggered")
    p.add_argument("--send", type=_send_spec, action="append", default=[], metavar="KIND:PAYLOAD",
                   help="a message to send on --on once triggered (repeatable, in order)")
    p.add_argument("--to", default="", help="the destination peer of unicast messages")


@attack("listen", _listen_options)
def listen(session: Session, opts: argparse.Namespace) -> None:
    """A peer that stays up and shows what is relayed to it: for tests of gossip relay
    (issue 3) and of one peer's made-up channels costing others nothing (issue 12, defect 3)."""
    send_on = opts.on or opts.channel
    if opts.send and send_on is None:
        raise SystemExit("--send needs --on or --channel")
    dst = parse_peer_name(opts.to) if opts.to else None
    session.announce()
    session.heartbeats()
    threading.Thread(target=print_gossip, args=(session, opts.channel), daemon=True).start()
    if opts.trigger:
        while not os.path.exists(opts.trigger):
            time.sleep(0.05)
    for i in range(opts.flood):
        session.gossip(f"made-up-{i}-{secrets.token_hex(4)}", b"junk")
    for tag, payload in opts.send:
        session.gossip(send_on, payload, tag, dst if tag == Tag.GOSSIP_UNICAST else None)
    if opts.flood or opts.send:
        print("sent", flush=True)
    while True:
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evil_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("router", help="the router's IP address")
    p.add_argument("--port", type=int, default=6783)
    p.add_argument("--name", default="", help="our peer name (default: random)")
    p.add_argument("--nickname", default="evil")
    p.add_argument("--max-version", type=int, default=2, help="highest protocol version to offer")
    p.add_argument("--password", default="", help="the mesh password to use (default: none)")
    sub = p.add_subparsers(dest="attack", required=True)
    for name, (_, options) in ATTACKS.items():
        options(sub.add_parser(name))
    opts = p.parse_args(argv)
    session = connect(opts.router, opts.port, opts.nickname, parse_peer_name(opts.name) if opts.name else None,
                      opts.max_version, opts.password.encode() or None)
    print("connected to", format_peer_name(session.router_name), flush=True)
    fn, _ = ATTACKS[opts.attack]
    try:
        fn(session, opts)
    except OSError as exc:  # the router hung up on us mid-attack: that is its right
        print("closed by router", repr(exc), flush=True)
    finally:
        session.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
