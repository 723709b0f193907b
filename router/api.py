"""The HTTP API on 127.0.0.1:6784 (Starlette app, served by Hypercorn on trio)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ipam_crdt.http import ipam_routes
from router import ratelog, status
from router.mesh import Mesh
from weavedns.http import dns_routes

log = logging.getLogger(__name__)

CONNECTION_STATES = ("established", "pending", "retrying", "failed", "connecting")
# The largest request body the API reads: its forms are a few peer addresses or names.
MAX_BODY = 1 << 20
# After refusing a body, what more of it is read and dropped (so that closing the
# connection does not reset it before the client has read the refusal), at most.
DRAIN_BYTES = 4 << 20
DRAIN_SECONDS = 2.0


class BodyLimit:
    """ASGI middleware: a request body is read whole, up to `max_bytes`, before the app
    sees it; a larger one gets 413, a malformed Content-Length 400, and neither is read.
    (Hypercorn has no body limit of its own, and Starlette reads whatever arrives.)"""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        lengths = {value.strip() for name, value in headers if name.lower() == b"content-length"}
        if len(lengths) > 1 or any(not (v.isdigit() and len(v) <= 20) for v in lengths):
            await self._refuse(scope, receive, send, 400, "malformed Content-Length")
            return
        if lengths and int(lengths.pop()) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, f"request body over {self.max_bytes} bytes")
            await self._drain(receive)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, f"request body over {self.max_bytes} bytes")
                if message.get("more_body", False):
                    await self._drain(receive)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    @staticmethod
    async def _drain(receive: Receive) -> None:
        drained = 0
        with trio.move_on_after(DRAIN_SECONDS):
            while drained < DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status_code: int, reason: str) -> None:
        ratelog.reject(log, "api", f"body_{status_code}", "refusing %s %s: %s",
                       scope.get("method"), scope.get("path"), reason)
        response = PlainTextResponse(reason + "\n", status_code=status_code, headers={"Connection": "close"})
        try:
            await response(scope, receive, send)
        except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
            # The client kept sending the body we refused: hypercorn's reading task then
            # answers the protocol error on the same stream while this one sends (trio
            # refuses two senders). The connection is going away either way.
            ratelog.count("api", "refused_client_kept_sending")


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


# Go's zero value as text/template prints it, for report fields that are nil in Weave
# (JSON null here): nil slices print as [], nil maps as map[], other nils as <nil>.
_GO_NIL = {"Entries": "[]", "Targets": "[]", "Peers": "[]", "Connections": "[]", "Attrs": "map[]"}
# Report fields that are Go maps (printed map[k:v ...], keys sorted); other objects are
# structs (printed {v1 v2 ...}, fields in order).
_GO_MAPS = frozenset({"Attrs", "OverlayDiagnostics"})


def _go_text(value: Any, field: str = "") -> str:
    """`value` (from the JSON report) as Go's text/template prints the Go value it came from."""
    if value is None:
        return _GO_NIL.get(field, "<nil>")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(_go_text(v) for v in value) + "]"
    if isinstance(value, dict):
        if field in _GO_MAPS:
            return "map[" + " ".join(f"{k}:{_go_text(value[k])}" for k in sorted(value)) + "]"
        return "{" + " ".join(_go_text(v, k) for k, v in value.items()) + "}"
    return str(value)


def _template(fmt: str, data: Any) -> str:
    """The subset of Go templates people use with `weave report -f`: {{.A.B}} and
    {{json .A}}, printed as Go's text/template prints them."""

    def lookup(path: str) -> tuple[Any, str]:
        value, field = data, ""
        for part in filter(None, path.strip().lstrip(".").split(".")):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(path)
            value, field = value[part], part
        return value, field

    def render(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        if expr.startswith("json "):
            return json.dumps(lookup(expr[5:])[0])
        if expr == ".":
            return _go_text(data)
        return _go_text(*lookup(expr))

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
        errors = mesh.forget([str(p) for p in form.getlist("peer")])
        if errors:
            return PlainTextResponse("\n".join(errors) + "\n", status_code=400)
        return Response(status_code=200)

    async def get_metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(
        middleware=[Middleware(BodyLimit, max_bytes=MAX_BODY)],
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
