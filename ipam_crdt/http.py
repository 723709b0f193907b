"""Weave's IPAM HTTP API (paths, methods, bodies and status codes of Weave Net 2.8), on Starlette.

`ipam_routes(service)` returns the routes to add to the daemon's app:

    POST   /ip/{id}                        allocate in the default subnet -> 200 "10.32.0.1/12"
    POST   /ip/{id}/{ip}/{prefixlen}       allocate in that subnet        -> 200 "10.2.1.1/24"
    PUT    /ip/{id}/{ip}/{prefixlen}       claim that address             -> 204
    PUT    /ip/{id}/{ip}                   claim, default subnet's prefix -> 204
    GET    /ip/{id}                        addresses in the default subnet (space-separated, may be empty)
    GET    /ip/{id}/{ip}/{prefixlen}       addresses in that subnet
    GET    /ip                             {"owned": [{"containerid": ..., "addrs": [...]}]}
    DELETE /ip/{id}                        free all of id's addresses     -> 204
    DELETE /ip/{id}/{ip}                   free one                       -> 204
    GET    /ring                           wait until the ring exists (`weave prime`) -> 200
    GET    /ipinfo/defaultsubnet           -> 200 "10.32.0.0/12"
    GET    /ipinfo/tracker                 -> 200 "" (no awsvpc/no-masq-local tracker)
    DELETE /peer                           hand our space to a live peer and stop (`weave reset`) -> 204;
                                           409 while containers are attached here
    DELETE /peer/{id}                      rmpeer by name or nickname -> 200 "N IPs taken over from id\\n"
    GET    /status/ipam                    `weave status ipam`

Query flags, as Weave: `check-alive=true` (POST, PUT), `noErrorOnUnknown=true` (PUT);
pyweave adds `force=true` on DELETE /peer/{id} for a peer that is still connected.

Errors answer with the message as text/plain: 400 malformed input, a subnet outside the
range or a claim of a network/broadcast address; 404 nothing to free or an unknown peer;
409 a claim of someone else's address, rmpeer of a live peer, or DELETE /peer while
containers are attached; 503 timed out waiting for
consensus/space, or shutting down; 500 the database failed. Weave answers every error with
400; its clients read only the message.
A container found dead with `check-alive` answers 200 "cancelled", as Weave does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ipam_crdt.address import CIDR
from ipam_crdt.service import BadRequest, ContainerNotRunning, IpamService, IpamServiceError

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() == "true"


def _cidr_param(request: Request) -> str:
    return f"{request.path_params['ip']}/{request.path_params['prefixlen']}"


def _text(body: str, status_code: int = 200) -> PlainTextResponse:
    return PlainTextResponse(body, status_code=status_code)


def _errors(fn: Endpoint) -> Endpoint:
    """Turn service errors into the status and message they carry."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ContainerNotRunning as exc:
            log.info("[allocator]: %s", exc)
            return _text("cancelled")
        except IpamServiceError as exc:
            if exc.status_code >= 500:
                log.error("[allocator]: %s %s: %s", request.method, request.url.path, exc)
            else:
                log.warning("[allocator]: %s %s: %s", request.method, request.url.path, exc)
            return _text(f"{exc}\n", exc.status_code)

    return endpoint


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, fn: Callable[[], Awaitable[Response]]) -> Response:
    """Run a long-polling request; if the client goes away, withdraw it (Weave's CloseNotify)."""
    result: list[Response] = []
    failure: list[IpamServiceError] = []

    async def watch(cancel: trio.CancelScope) -> None:
        await _until_disconnected(request)
        log.info("[allocator]: client gone; withdrawing %s %s", request.method, request.url.path)
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            result.append(await fn())
        except IpamServiceError as exc:
            failure.append(exc)  # raised out here, not wrapped in the nursery's ExceptionGroup
        nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return result[0] if result else Response(status_code=499)


def ipam_routes(service: IpamService) -> list[Route]:
    """The IPAM endpoints of Weave's HTTP API, served by `service`."""

    async def allocate(request: Request, subnet: str | None) -> Response:
        ident = request.path_params["id"]

        async def run() -> Response:
            cidr = await service.allocate(ident, subnet, check_alive=_flag(request, "check-alive"))
            return _text(str(cidr))

        return await _unless_disconnected(request, run)

    @_errors
    async def post_ip(request: Request) -> Response:
        return await allocate(request, None)

    @_errors
    async def post_ip_subnet(request: Request) -> Response:
        return await allocate(request, _cidr_param(request))

    async def claim(request: Request, cidr: str) -> Response:
        ident = request.path_params["id"]

        async def run() -> Response:
            await service.claim(
                ident,
                cidr,
                check_alive=_flag(request, "check-alive"),
                no_error_on_unknown=_flag(request, "noErrorOnUnknown"),
            )
            return Response(status_code=204)

        return await _unless_disconnected(request, run)

    @_errors
    async def put_ip_cidr(request: Request) -> Response:
        return await claim(request, _cidr_param(request))

    @_errors
    async def put_ip(request: Request) -> Response:
        addr = service.parse_addr(request.path_params["ip"])
        return await claim(request, str(CIDR(addr, service.default_subnet.prefix_len)))

    @_errors
    async def get_ip(request: Request) -> Response:
        cidrs = service.lookup(request.path_params["id"], service.default_subnet)
        return _text(" ".join(str(c) for c in cidrs))

    @_errors
    async def get_ip_subnet(request: Request) -> Response:
        cidrs = service.lookup(request.path_params["id"], _cidr_param(request))
        return _text(" ".join(str(c) for c in cidrs))

    async def get_all(request: Request) -> Response:
        owned = [
            {"containerid": ident, "addrs": [str(c) for c in cidrs]}
            for ident, cidrs in service.owned().items()
        ]
        return JSONResponse({"owned": owned or None})

    @_errors
    async def delete_ip(request: Request) -> Response:
        await service.free(request.path_params["id"])
        return Response(status_code=204)

    @_errors
    async def delete_ip_addr(request: Request) -> Response:
        await service.free(request.path_params["id"], request.path_params["ip"])
        return Response(status_code=204)

    @_errors
    async def get_ring(request: Request) -> Response:
        await _unless_disconnected(request, _primed)
        return Response(status_code=200)

    async def _primed() -> Response:
        await service.prime()
        return Response(status_code=200)

    async def get_default_subnet(request: Request) -> Response:
        return _text(str(service.default_subnet))

    async def get_tracker(request: Request) -> Response:
        return _text(service.tracker)

    @_errors
    async def delete_peer(request: Request) -> Response:
        await service.hand_over()
        return Response(status_code=204)

    @_errors
    async def delete_peer_id(request: Request) -> Response:
        ident = request.path_params["id"]
        if not ident.strip():
            raise BadRequest("rmpeer needs a peer name or nickname")
        gained = await service.rmpeer(ident, force=_flag(request, "force"))
        return _text(f"{gained} IPs taken over from {ident}\n")

    async def get_status_ipam(request: Request) -> Response:
        return _text(service.ranges_text())

    return [
        Route("/ip", get_all, methods=["GET"]),
        Route("/ip/{id}", post_ip, methods=["POST"]),
        Route("/ip/{id}", get_ip, methods=["GET"]),
        Route("/ip/{id}", delete_ip, methods=["DELETE"]),
        Route("/ip/{id}/{ip}", put_ip, methods=["PUT"]),
        Route("/ip/{id}/{ip}", delete_ip_addr, methods=["DELETE"]),
        Route("/ip/{id}/{ip}/{prefixlen}", post_ip_subnet, methods=["POST"]),
        Route("/ip/{id}/{ip}/{prefixlen}", put_ip_cidr, methods=["PUT"]),
        Route("/ip/{id}/{ip}/{prefixlen}", get_ip_subnet, methods=["GET"]),
        Route("/ring", get_ring, methods=["GET"]),
        Route("/ipinfo/defaultsubnet", get_default_subnet, methods=["GET"]),
        Route("/ipinfo/tracker", get_tracker, methods=["GET"]),
        Route("/peer", delete_peer, methods=["DELETE"]),
        Route("/peer/{id}", delete_peer_id, methods=["DELETE"]),
        Route("/status/ipam", get_status_ipam, methods=["GET"]),
    ]
