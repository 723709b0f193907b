"""Forged fastdp heartbeats and junk VXLAN from a stranger on the underlay (issue 12, defect 5).

Two routers (host1, host2) on fastdp; host3 runs no router and plays the attacker on the
same underlay switch. It sends to host2's UDP 6784, both from its own address and with
host1's address forged (a raw socket: the strongest form, which only the MAC on probe
frames can stop):

- a heartbeat in the old unauthenticated format claiming seq 2^63 (before the fix this
  one datagram made every real heartbeat look old: the link went to the sleeve for good);
- the same in the current format under a made-up key;
- a replay of a real heartbeat it overheard;
- a burst of random datagrams, and VXLAN frames with the right VNI carrying Ethernet
  frames from made-up MACs (before the fix the bridge learned them).

The link must stay on fastdp, host2's /metrics must count the rejected frames, and none
of the made-up MACs may appear in host2's forwarding database. Then the link loses its
heartbeats for real (UDP 6784 blocked), and forgeries sent as they resume must not keep
it from coming back.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
import sys
import time
from collections.abc import Callable

from fastdp.vxlan import DEFAULT_VNI
from router.testbed import Host, Testbed
from tests.routers import diagnostics, launch, router_test_marks, wait_for, weave
from tests.test_fastdp_integration import links

pytestmark = router_test_marks()

CONVERGE = 20.0
WATCH = 6.0  # seconds the link must stay on fastdp after the attack
RETURN_BUDGET = 10.0  # seconds to return to fastdp after a repair (as tests/test_fastdp_integration.py)
VNI = DEFAULT_VNI
ETHERTYPE = 0x88B5

# Prints (hex) the UDP payload of the first IPv4 datagram from argv[2] to UDP 6784 carrying a
# probe frame (inner ethertype 0x88B5) seen on interface argv[1] within argv[3] seconds.
CAPTURE = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((sys.argv[1], 0))
s.settimeout(0.5)
src, deadline = socket.inet_aton(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        pkt = s.recv(65535)
    except socket.timeout:
        continue
    ip = pkt[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or ip[12:16] != src:
        continue
    payload = ip[ihl + 8:]
    if struct.unpack_from("!H", ip, ihl + 2)[0] == 6784 and payload[20:22] == b"\x88\xb5":
        print(payload.hex())
        break
"""

# Sends the datagrams in the JSON list on stdin, [[source or null, hex payload], ...], to
# argv[1]:6784: from an ordinary socket when the source is null, else from a raw socket
# with that source address forged.
ATTACK = r"""
import json, socket, struct, sys
dst = sys.argv[1]
plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for src, hexed in json.load(sys.stdin):
    payload = bytes.fromhex(hexed)
    if src is None:
        plain.sendto(payload, (dst, 6784))
        continue
    udp = struct.pack("!HHHH", 45678, 6784, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    raw.sendto(ip + udp, (dst, 0))
print("sent")
"""

METRICS = ("import urllib.request;"
           "print(urllib.request.urlopen('http://127.0.0.1:6784/metrics', timeout=5).read().decode())")
REJECTED_RE = re.compile(r'^pyweave_inputs_rejected_total\{component="fastdp",reason="([^"]+)"\} (\S+)$',
                         re.MULTILINE)


def fastdp_rejections(host: Host) -> dict[str, float]:
    text = host.run([sys.executable, "-c", METRICS]).stdout
    return {m[1]: float(m[2]) for m in REJECTED_RE.finditer(text)}


def peer_name(host: Host) -> int:
    return int(json.loads(weave(host, "report"))["Router"]["Name"].replace(":", ""), 16)


def probe_mac(name: int) -> bytes:
    """fastdp.probe.probe_mac, restated so this test reads the wire as an outsider would."""
    import hashlib

    digest = hashlib.sha256(b"pyweave fastdp probe" + name.to_bytes(6, "big")).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def vxlan(inner: bytes) -> bytes:
    return struct.pack("!B3xI", 0x08, VNI << 8) + inner


def forged_heartbeat(version: int, dst: int, src: int, conn_uid: int, seq: int, size: int = 1390) -> bytes:
    """A heartbeat from `src` to `dst` claiming `seq`: version 1 has no MAC; version 2 ends in
    16 bytes of MAC, here made with a key the attacker made up."""
    header = (probe_mac(dst) + probe_mac(src) + struct.pack("!H", ETHERTYPE)
              + struct.pack("!4sBBH6sQQQ", b"PWhb", version, 1, size, src.to_bytes(6, "big"), conn_uid, seq,
                            time.monotonic_ns()))
    body = header + bytes(size - len(header) - (16 if version >= 2 else 0))
    if version >= 2:
        import hashlib

        body += hashlib.blake2b(body, key=secrets.token_bytes(32), digest_size=16).digest()
    return vxlan(body)


def junk_frame(mac: bytes) -> bytes:
    """A broadcast ARP-ish Ethernet frame from a made-up source MAC, in VXLAN with the right VNI."""
    return vxlan(b"\xff" * 6 + mac + b"\x08\x06" + secrets.token_bytes(46))


def learned_macs(host: Host) -> set[str]:
    return {line.split()[0] for line in host.run(["bridge", "fdb", "show"]).stdout.splitlines() if line}


def on_fastdp(a: Host, b: Host) -> bool:
    la, lb = links(a).get(b.name), links(b).get(a.name)
    return la is not None and lb is not None and la.overlay == "fastdp" and lb.overlay == "fastdp"


def test_forged_heartbeats_and_junk_vxlan_do_not_move_a_fastdp_link(make_testbed: Callable[[int], Testbed]) -> None:
    tb = make_testbed(3)
    h1, h2, attacker = tb.hosts
    launch(h1)
    launch(h2, h1.address)
    wait_for(lambda: on_fastdp(h1, h2), "host1 <-> host2 on fastdp", CONVERGE, [h1, h2])
    name1, name2 = peer_name(h1), peer_name(h2)

    # What an eavesdropper on the underlay learns: a real heartbeat, its sender and ConnUID.
    captured = h2.run([sys.executable, "-c", CAPTURE, h2.interface, h1.address, "10"]).stdout.strip()
    assert captured, "no heartbeat from host1 seen on host2's underlay interface"
    real = bytes.fromhex(captured)
    inner = real[8:]
    assert inner[12:14] == struct.pack("!H", ETHERTYPE) and inner[14:18] == b"PWhb", inner[:40].hex()
    assert int.from_bytes(inner[22:28], "big") == name1
    conn_uid = int.from_bytes(inner[28:36], "big")

    before = fastdp_rejections(h2)
    macs_before = learned_macs(h2)
    junk_macs = [bytes([0x02 | (secrets.randbelow(64) << 2)]) + secrets.token_bytes(5) for _ in range(50)]
    datagrams: list[tuple[str | None, bytes]] = []
    for source in (h1.address, None):  # host1's address forged, then the attacker's own
        for version in (1, 2):
            datagrams.append((source, forged_heartbeat(version, name2, name1, conn_uid, 1 << 63)))
            datagrams.append((source, forged_heartbeat(version, name2, name1, conn_uid, 1 << 63, 100)))
    datagrams.append((h1.address, real))  # a replay: old news
    datagrams += [(None, secrets.token_bytes(secrets.randbelow(1400) + 1)) for _ in range(1000)]
    datagrams += [(None, junk_frame(mac)) for mac in junk_macs]
    payload = json.dumps([[src, data.hex()] for src, data in datagrams])
    out = attacker.run([sys.executable, "-c", ATTACK, h2.address], input=payload).stdout
    assert out.strip() == "sent"

    # The link stays on fastdp, both ways, for the whole watch.
    deadline = time.monotonic() + WATCH
    while time.monotonic() < deadline:
        assert on_fastdp(h1, h2), f"the attack moved host1 <-> host2 off fastdp\n{diagnostics([h1, h2])}"
        time.sleep(0.3)

    after = fastdp_rejections(h2)
    rose = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    # The forged-source frames reached the probe port and were refused there: the made-up
    # key's two heartbeats by their MAC, version 1's two as malformed.
    assert rose.get("bad_mac", 0) >= 2 and rose.get("malformed", 0) >= 2, (before, after)
    # Frames from the attacker's own address never got past the source filter.
    new_macs = learned_macs(h2) - macs_before
    junk = {":".join(f"{b:02x}" for b in mac) for mac in junk_macs}
    assert not new_macs & junk, sorted(new_macs & junk)

    # A link that lost its heartbeats comes back once they flow again, even if forgeries
    # land just as they resume (before the fix, seq 2^63 then kept it on the sleeve for good).
    tb.block(h1, h2, "udp", 6784)
    wait_for(lambda: not on_fastdp(h1, h2), "host1 <-> host2 off fastdp while UDP 6784 is blocked", 10,
             [h1, h2])
    tb.unblock(h1, h2, "udp", 6784)
    healed = time.monotonic()
    forged = [[h1.address, forged_heartbeat(v, name2, name1, conn_uid, 1 << 63, size).hex()]
              for v in (1, 2) for size in (1390, 100)]
    attacker.run([sys.executable, "-c", ATTACK, h2.address], input=json.dumps(forged))
    wait_for(lambda: on_fastdp(h1, h2), "host1 <-> host2 back on fastdp", RETURN_BUDGET, [h1, h2])
    print(f"back on fastdp {time.monotonic() - healed:.1f} s after the repair")
