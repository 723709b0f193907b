"""The HTTP API on 127.0.0.1:6784 (Starlette app, served by Hypercorn on trio)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ipam_crdt.http import ipam_routes
from router import ratelog, status
from router.mesh import Mesh
from weavedns.http import dns_routes

log = logging.getLogger(__name__)

CONNECTION_STATES = ("established", "pending", "retrying", "failed", "connecting")


class MeshCollector:
    """Weave's metric names, computed from the mesh at scrape time."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def collect(self):  # type: ignore[no-untyped-def]
        conns = GaugeMetricFamily(
            "weave_connections", "Number of peer-to-peer connections.", labels=["state", "type", "encryption"]
        )
        counts: dict[tuple[str, str, str], int] = {(s, "unknown", ""): 0 for s in CONNECTION_STATES}
        for c in status.router_report(self.mesh)["Connections"]:
            attrs = c["Attrs"] or {}
            key = (c["State"], attrs.get("name", "unknown"), "yes" if attrs.get("encrypted") else "")
            counts[key] = counts.get(key, 0) + 1
        for (state, kind, enc), n in sorted(counts.items()):
            conns.add_metric([state, kind, enc], n)
        yield conns
        yield CounterMetricFamily(
            "weave_connection_terminations", "Number of peer-to-peer connections terminated.",
            value=self.mesh.termination_count,
        )
        # pyweave's own: gossip traffic by channel (frames as written, length prefix included).
        for name, help_text, counts in (
            ("pyweave_gossip_bytes_sent", "Bytes of gossip sent, by channel.", self.mesh.gossip_bytes_sent),
            (
                "pyweave_gossip_messages_sent",
                "Gossip messages sent, by channel.",
                self.mesh.gossip_messages_sent,
            ),
            (
                "pyweave_gossip_bytes_received",
                "Bytes of gossip received (decrypted), by channel.",
                self.mesh.gossip_bytes_received,
            ),
            (
                "pyweave_gossip_messages_received",
                "Gossip messages received, by channel.",
                self.mesh.gossip_messages_received,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["channel"])
            for channel in sorted({"topology", *counts}):
                family.add_metric([channel], counts.get(channel, 0))
            yield family
        stats = getattr(self.mesh.overlay, "datapath_stats", None)
        if stats is not None:
            yield from sleeve_metrics(stats())
        yield rejected_inputs_metric(ratelog.REJECTS.snapshot())


def rejected_inputs_metric(counts: dict[tuple[str, str], int]) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "pyweave_inputs_rejected",
        "Inputs from outside (packets, frames, requests) rejected, by component and reason.",
        labels=["component", "reason"],
    )
    for (component, reason), n in sorted(counts.items()):
        family.add_metric([component, reason], n)
    return family


# DataPath.stats keys that count datagrams or frames the sleeve dropped, by reason.
SLEEVE_DROPS = {
    "malformed": "malformed",
    "unknown_sender": "unknown_sender",
    "dropped_replayed": "replayed",
    "dropped_too_old": "too_old",
    "dropped_decryption_failed": "decryption_failed",
    "dropped_truncated": "truncated",
    "dropped_malformed": "malformed",
    "no_link_drops": "no_link",
    "bad_frames": "bad_frame",
}


def sleeve_metrics(stats: dict[str, int]):  # type: ignore[no-untyped-def]
    drops = CounterMetricFamily(
        "pyweave_sleeve_dropped", "Datagrams or frames the sleeve dropped, by reason.", labels=["reason"]
    )
    totals: dict[str, int] = dict.fromkeys(sorted(set(SLEEVE_DROPS.values())), 0)
    for key, reason in SLEEVE_DROPS.items():
        totals[reason] += stats.get(key, 0)
    for reason, n in totals.items():
        drops.add_metric([reason], n)
    yield drops
    for key, help_text in (
        ("datagrams_sent", "UDP datagrams the sleeve sent."),
        ("datagrams_received", "UDP datagrams the sleeve accepted."),
        ("frag_needed", "ICMP 'fragmentation needed' replies synthesised for DF frames over the MTU."),
        ("segmented", "TCP super-frames segmented in userspace for a peer that takes MTU-sized frames."),
        ("chunked", "Sleeve datagrams larger than the path, sent as chunks (UDP GSO) to pyweave peers."),
        ("send_errors", "Sends that failed."),
        ("inject_errors", "Frames that could not be written to the bridge's TAP."),
    ):
        yield CounterMetricFamily(f"pyweave_sleeve_{key}", help_text, value=stats.get(key, 0))


def _template(fmt: str, data: Any) -> str:
    """The subset of Go templates people use with `weave report -f`: {{.A.B}} and {{json .A}}."""

    def lookup(path: str) -> Any:
        value = data
        for part in filter(None, path.strip().lstrip(".").split(".")):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(path)
            value = value[part]
        return value

    def render(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        if expr.startswith("json "):
            return json.dumps(lookup(expr[5:]))
        if expr == ".":
            return json.dumps(data)
        value = lookup(expr)
        return json.dumps(value) if isinstance(value, dict | list) else str(value)

    return re.sub(r"\{\{(.*?)\}\}", render, fmt)


def build_app(
    mesh: Mesh, *, dns: Any = None, ipam: Any = None, routes: list[Route] | None = None
) -> Starlette:
    """The API; `dns` and `ipam` are the services when they run, `routes` extra endpoints."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MeshCollector(mesh))  # type: ignore[arg-type]

    def full_report() -> dict[str, Any]:
        rep = status.report(mesh)
        if ipam is not None:
            section = ipam.report()
            if section is not None:
                rep["IPAM"] = section
        if dns is not None:
            section = dns.report()
            if section is not None:
                rep["DNS"] = section
        return rep

    def summary(rep: dict[str, Any]) -> str:
        text = status.status_text(rep)
        if ipam is not None:
            text += "\n" + ipam.status_section()
        lines = dns.status_summary() if dns is not None else []
        if lines:
            text += "\n" + "".join(f"{k:>15}: {v}\n" for k, v in lines)
        return text

    def service_lines(service: Any) -> Callable[[dict[str, Any]], str]:
        return lambda rep: "".join(f"{line}\n" for line in service.status_lines()) if service else ""

    async def get_status(request: Request) -> Response:
        rep = full_report()
        sub = request.path_params.get("sub")
        render = {
            None: summary,
            "peers": status.peers_text,
            "connections": status.connections_text,
            "targets": status.targets_text,
            "dns": service_lines(dns),
        }.get(sub)
        if render is None:
            return PlainTextResponse(f"unknown status section {sub!r}\n", status_code=404)
        return PlainTextResponse(render(rep))

    async def get_report(request: Request) -> Response:
        rep = full_report()
        fmt = request.query_params.get("format")
        if fmt is None:
            return JSONResponse(rep)
        try:
            return PlainTextResponse(_template(fmt, rep))
        except KeyError as exc:
            return PlainTextResponse(f"template: no field {exc.args[0]!r} in the report\n", status_code=400)

    async def post_connect(request: Request) -> Response:
        form = await request.form()
        peers = [str(p) for p in form.getlist("peer")]
        replace = str(form.get("replace", "")).lower() == "true"
        errors = mesh.connect(peers, replace=replace)
        if errors:
            return PlainTextResponse("\n".join(errors) + "\n", status_code=400)
        return Response(status_code=200)

    async def post_forget(request: Request) -> Response:
        form = await request.form()
        mesh.forget([str(p) for p in form.getlist("peer")])
        return Response(status_code=200)

    async def get_metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(
        routes=[
            # IPAM's own /status/ipam must match before /status/{sub}.
            *(ipam_routes(ipam) if ipam is not None else []),
            Route("/status", get_status),
            Route("/status/{sub}", get_status),
            Route("/report", get_report),
            Route("/connect", post_connect, methods=["POST"]),
            Route("/forget", post_forget, methods=["POST"]),
            Route("/metrics", get_metrics),
            *(dns_routes(dns) if dns is not None else []),
            *(routes or []),
        ]
    )
