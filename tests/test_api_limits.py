"""The HTTP API's edge (issue 12 minors): request bodies are bounded before the app
reads them, and `weave report -f` templates print as Go's text/template does."""

from __future__ import annotations

from typing import Any

import pytest

from router.api import MAX_BODY, BodyLimit, _go_text, _template


async def _call(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, bytes, bytes | None]:
    """One POST through BodyLimit around an app that echoes the body it read:
    (status, response body, what the app read or None if it was never called)."""
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/connect", "headers": headers, "query_string": b""}
    await BodyLimit(app, MAX_BODY)(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, seen[0] if seen else None


@pytest.mark.parametrize(
    ("length", "status"),
    [(b"99999999999999999999", 413), (str(MAX_BODY + 1).encode(), 413), (b"x", 400), (b"-1", 400),
     (b"1" * 30, 400)],
)
async def test_absurd_content_length_is_refused_unread(length: bytes, status: int) -> None:
    code, body, read = await _call([(b"content-length", length)], [b"peer=10.0.0.1"])
    assert (code, read) == (status, None), body
    assert body.endswith(b"\n") and len(body.splitlines()) == 1


async def test_conflicting_content_lengths_are_refused() -> None:
    code, _, read = await _call([(b"content-length", b"3"), (b"Content-Length", b"4")], [b"abc"])
    assert (code, read) == (400, None)


async def test_a_body_over_the_cap_is_refused_however_it_arrives() -> None:
    chunk = b"1" * (64 << 10)
    code, _, read = await _call([(b"transfer-encoding", b"chunked")], [chunk] * (MAX_BODY // len(chunk) + 1))
    assert (code, read) == (413, None)


async def test_a_body_within_the_cap_reaches_the_app() -> None:
    chunks = [b"peer=", b"10.0.0.1"]
    assert await _call([(b"content-length", b"13")], chunks) == (200, b"peer=10.0.0.1", b"peer=10.0.0.1")
    assert (await _call([], [b"x" * MAX_BODY]))[0] == 200


REPORT = {
    "Router": {"Name": "aa:bb", "Encryption": False, "Targets": ["10.0.0.1:6783"],
               "Connections": [{"Address": "10.0.0.2:6783", "Attrs": None, "Outbound": True}]},
    "DNS": {"Domain": "weave.local.", "Entries": None},
}


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("{{.DNS.Entries}}", "[]"),  # Weave's nil slice; this printed None
        ("{{json .DNS.Entries}}", "null"),
        ("{{.Router.Encryption}}", "false"),
        ("{{.Router.Targets}}", "[10.0.0.1:6783]"),
        ("{{.Router.Connections}}", "[{10.0.0.2:6783 map[] true}]"),
        ("n={{.Router.Name}} d={{ .DNS.Domain }}", "n=aa:bb d=weave.local."),
    ],
)
def test_templates_print_like_go(fmt: str, expected: str) -> None:
    assert _template(fmt, REPORT) == expected


def test_go_text_of_a_map_sorts_its_keys() -> None:
    assert _go_text({"b": 1, "a": True}, "Attrs") == "map[a:true b:1]"
    assert _go_text(None, "Sleeve") == "<nil>"


async def test_a_refusal_the_client_talks_over_is_counted_not_raised() -> None:
    """Hypercorn answers a client that keeps sending a refused body from its reading task,
    on the same stream: trio refuses the second sender (BusyResourceError), which used to
    reach hypercorn as an application error with a traceback in the router's log."""
    import trio

    from router import ratelog

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise trio.BusyResourceError("another task is currently sending data on this SocketStream")

    before = ratelog.REJECTS.snapshot().get(("api", "refused_client_kept_sending"), 0)
    scope = {"type": "http", "method": "POST", "path": "/connect", "headers": []}
    await BodyLimit._refuse(scope, receive, send, 413, "request body over 1048576 bytes")
    assert ratelog.REJECTS.snapshot()[("api", "refused_client_kept_sending")] == before + 1
