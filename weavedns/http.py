"""weaveDNS's part of the HTTP API (Weave's paths and answers), as Starlette routes.

| Method + path | Success | Errors |
|---|---|---|
| ``PUT /name/{container}/{ip}`` (``fqdn=`` in the form or query) | 204 | 400 |
| ``DELETE /name/{container}/{ip}``, ``/name/{container}``, ``/name`` (optional ``fqdn=``) | 204 | 400 |
| ``GET /name`` | 200 JSON list of entries (``null`` if none) | |
| ``GET /domain`` | 200 text, e.g. ``weave.local.`` | |
| ``GET /dns-address`` / ``GET /dns-address-port`` | 200 text ``169.254.53.1`` / ``169.254.53.1:53`` | |

With DNS disabled (``--no-dns``) every path answers 404, as Weave (which does not mount
them) does. ``*`` as the container or IP of a DELETE matches any, as in Weave.

Deliberate differences from Weave: a name outside the domain, an empty or malformed name,
or a bad container id gets 400 with the reason instead of a silent 204 (nothing changes
either way); ``GET /name`` does not insist on ``Accept: application/json``;
``check-alive=true`` is accepted and ignored (there is no Docker to ask).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from router import ratelog
from weavedns.service import DnsInputError, DnsService
from weavedns.wire import format_addr

log = logging.getLogger(__name__)

__all__ = ["dns_routes"]

_Handler = Callable[[Request], Awaitable[Response]]


async def _param(request: Request, name: str) -> str | None:
    """A value from the query string, else from a urlencoded body (Go's FormValue)."""
    value = request.query_params.get(name)
    if value is not None:
        return value
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = await request.form()
        found = form.get(name)
        return found if isinstance(found, str) else None
    return None


def _bad_request(exc: DnsInputError) -> Response:
    ratelog.reject(log, "dns", "api_bad_request", "DNS API: %s", exc, level=logging.INFO)
    return PlainTextResponse(f"{exc}\n", status_code=400)


def dns_routes(service: DnsService) -> list[Route]:
    """The DNS routes, to add to the router's Starlette app."""

    def guarded(handler: _Handler) -> _Handler:
        async def wrapper(request: Request) -> Response:
            if not service.enabled:
                return PlainTextResponse("weaveDNS is disabled (--no-dns)\n", status_code=404)
            return await handler(request)

        return wrapper

    async def put_name(request: Request) -> Response:
        container = request.path_params["container"]
        ip = request.path_params["ip"]
        fqdn = await _param(request, "fqdn")
        try:
            service.add(container, ip, fqdn or "")
        except DnsInputError as exc:
            return _bad_request(exc)
        return Response(status_code=204)

    async def delete_name(request: Request) -> Response:
        container = request.path_params.get("container")
        ip = request.path_params.get("ip")
        fqdn = await _param(request, "fqdn")
        try:
            service.remove(container, ip, fqdn)
        except DnsInputError as exc:
            return _bad_request(exc)
        return Response(status_code=204)

    async def get_names(request: Request) -> Response:
        # Go's JSON for []Entry: Origin is a number (PeerName has no JSON form), Addr dotted.
        body = [
            {
                "ContainerID": e.container_id,
                "Origin": e.origin,
                "Addr": format_addr(e.addr),
                "Hostname": e.hostname,
                "Version": e.version,
                "Tombstone": e.tombstone,
            }
            for e in service.entries()
        ]
        text = json.dumps(body or None) + "\n"
        return Response(text, media_type="application/json")

    async def get_domain(request: Request) -> Response:
        return PlainTextResponse(service.domain)

    async def get_dns_address(request: Request) -> Response:
        return PlainTextResponse(service.dns_address)

    async def get_dns_address_port(request: Request) -> Response:
        return PlainTextResponse(service.dns_address_port)

    # A container named by its netns path (a process's or Docker's: every container Weave
    # attached that pyweave adopts) has slashes in its ident.
    return [
        Route("/name/{container:path}/{ip}", guarded(put_name), methods=["PUT"]),
        Route("/name/{container:path}/{ip}", guarded(delete_name), methods=["DELETE"]),
        Route("/name/{container}", guarded(delete_name), methods=["DELETE"]),
        Route("/name", guarded(delete_name), methods=["DELETE"]),
        Route("/name", guarded(get_names), methods=["GET"]),
        Route("/domain", guarded(get_domain), methods=["GET"]),
        Route("/dns-address", guarded(get_dns_address), methods=["GET"]),
        Route("/dns-address-port", guarded(get_dns_address_port), methods=["GET"]),
    ]
