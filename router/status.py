"""The router's state as Weave shows it: the /report JSON and the `weave status` texts."""

from __future__ import annotations

from typing import Any

from router import __version__
from router.mesh import Mesh
from router.peername import format_peer_name

PROTOCOL_MIN = 1
PROTOCOL_MAX = 2


def _peer_label(name: int, nickname: str) -> str:
    return f"{format_peer_name(name)}({nickname})"


def router_report(mesh: Mesh) -> dict[str, Any]:
    """Weave's `Router` report section, same field names and shapes."""
    peers = []
    for peer in sorted(mesh.peers.by_name.values(), key=lambda p: p.name):
        conns = []
        for other, c in sorted(peer.connections.items()):
            known = mesh.peers.get(other)
            conns.append(
                {
                    "Name": format_peer_name(other),
                    "NickName": known.nickname if known else "",
                    "Address": c.remote_tcp_addr,
                    "Outbound": c.outbound,
                    "Established": c.established,
                }
            )
        peers.append(
            {
                "Name": format_peer_name(peer.name),
                "NickName": peer.nickname,
                "UID": peer.uid,
                "ShortID": peer.short_id,
                "Version": peer.version,
                "Connections": conns,
            }
        )
    connections = []
    for conn in sorted(mesh.all_connections, key=lambda c: c.address):
        attrs: dict[str, Any] = {}
        info = ""
        if conn.remote is not None:
            overlay = mesh.overlay.status(conn.remote.name) if mesh.overlay is not None else None
            name = overlay.overlay if overlay is not None else "none"
            attrs = {"name": name, "mtu": overlay.mtu if overlay is not None else 0}
            if overlay is not None and overlay.encrypted or overlay is None and conn.encrypted:
                attrs["encrypted"] = True
            if overlay is not None and overlay.detail:
                attrs["detail"] = overlay.detail
            info = f"{name} {_peer_label(conn.remote.name, conn.remote.nickname)}"
        connections.append(
            {
                "Address": conn.address if not conn.outbound else (conn.target or conn.address),
                "Outbound": conn.outbound,
                "State": conn.state,
                "Info": info,
                "Attrs": attrs,
            }
        )
    connected_targets = {c.target for c in mesh.all_connections if c.target}
    for target in mesh.maker.targets():
        if target.address in connected_targets:
            continue
        state = target.state.value
        if state == "waiting":
            state = "connecting"
        connections.append(
            {
                "Address": target.address,
                "Outbound": True,
                "State": state,
                "Info": target.last_error,
                "Attrs": None,
            }
        )
    return {
        "Protocol": "weave",
        "ProtocolMinVersion": mesh.config.min_version,
        "ProtocolMaxVersion": PROTOCOL_MAX,
        "Encryption": mesh.config.password is not None,
        "PeerDiscovery": mesh.config.discovery,
        "Name": format_peer_name(mesh.name),
        "NickName": mesh.config.nickname,
        "Port": mesh.config.port,
        "Peers": peers,
        "UnicastRoutes": [
            {"Dest": format_peer_name(dest), "Via": format_peer_name(via)}
            for dest, via in sorted(mesh.routes.unicast.items())
        ],
        "BroadcastRoutes": [
            {
                "Source": format_peer_name(src),
                "Via": [format_peer_name(v) for v in mesh.routes.broadcast(src)],
            }
            for src in sorted(mesh.peers.by_name)
        ],
        "Connections": connections,
        "TerminationCount": mesh.termination_count,
        "Targets": mesh.maker.direct_targets(),
        "OverlayDiagnostics": {"sleeve": None} if mesh.overlay is not None else {},
        "TrustedSubnets": [str(n) for n in mesh.config.trusted_subnets],
        "Interface": "",
        "MACs": [],
    }


def report(mesh: Mesh) -> dict[str, Any]:
    return {
        "Ready": True,
        "Version": __version__,
        # pyweave never phones home.
        "VersionCheck": {
            "Enabled": False,
            "Success": False,
            "NewVersion": "",
            "NextCheckAt": "0001-01-01T00:00:00Z",
        },
        "Router": router_report(mesh),
    }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def status_text(rep: dict[str, Any]) -> str:
    r = rep["Router"]
    states: dict[str, int] = {}
    for c in r["Connections"]:
        states[c["State"]] = states.get(c["State"], 0) + 1
    breakdown = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    total = len(r["Connections"])
    established = sum(1 for p in r["Peers"] for c in p["Connections"] if c["Established"])
    lines = [
        ("Version", f"pyweave {rep['Version']}"),
        ("", ""),
        ("Service", "router"),
        ("Protocol", f"weave {r['ProtocolMinVersion']}..{r['ProtocolMaxVersion']}"),
        ("Name", _peer_label_text(r["Name"], r["NickName"])),
        ("Encryption", "enabled" if r["Encryption"] else "disabled"),
        ("PeerDiscovery", "enabled" if r["PeerDiscovery"] else "disabled"),
        ("Targets", str(len(r["Targets"]))),
        ("Connections", f"{total}" + (f" ({breakdown})" if total else "")),
        ("Peers", f"{len(r['Peers'])} (with {_plural(established, 'established connection')})"),
        ("TrustedSubnets", ", ".join(r["TrustedSubnets"]) or "none"),
    ]
    return "\n".join(f"{k:>15}: {v}" if k else "" for k, v in lines) + "\n"


def _peer_label_text(name: str, nickname: str) -> str:
    return f"{name}({nickname})"


def connections_text(rep: dict[str, Any]) -> str:
    out = []
    for c in rep["Router"]["Connections"]:
        arrow = "->" if c["Outbound"] else "<-"
        attrs = c["Attrs"] or {}
        if attrs:
            enc = "encrypted  " if attrs.get("encrypted") else "unencrypted"
            mtu = f"mtu={attrs['mtu']}" if attrs.get("mtu") else ""
            detail = f" ({attrs['detail']})" if attrs.get("detail") else ""
            line = f"{arrow} {c['Address']:<21} {c['State']:<11} {c['Info']}{detail}  {enc} {mtu}"
            out.append(line.rstrip())
        else:
            out.append(f"{arrow} {c['Address']:<21} {c['State']:<11} {c['Info']}".rstrip())
    return "\n".join(out) + ("\n" if out else "")


def peers_text(rep: dict[str, Any]) -> str:
    out = []
    for p in rep["Router"]["Peers"]:
        out.append(_peer_label_text(p["Name"], p["NickName"]))
        for c in p["Connections"]:
            arrow = "->" if c["Outbound"] else "<-"
            state = "established" if c["Established"] else "pending"
            label = _peer_label_text(c["Name"], c["NickName"])
            out.append(f"   {arrow} {c['Address']:<21} {label:<30} {state}")
    return "\n".join(out) + "\n"


def targets_text(rep: dict[str, Any]) -> str:
    return "".join(f"{t}\n" for t in rep["Router"]["Targets"])
