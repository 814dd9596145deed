"""The ASGI vocabulary, and the two ways the gateway answers: a whole body, or a stream.

The relay speaks raw ASGI instead of using starlette's response classes: the body
loop is the hot path of every blob pull, and it needs two things those classes do
not give: closing the upstream the moment the client goes away (uvicorn silently
drops ``send`` after a disconnect, so without a watcher the gateway would keep
downloading a multi-GB blob for nobody), and aborting the client's connection when
the upstream breaks mid-body (a clean end would hand the client a short blob).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from enum import StrEnum
from typing import Any

from gateway.http.errors import RegistryError
from gateway.http.util import Chunk

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Headers = list[tuple[bytes, bytes]]

API_VERSION_HEADER = (b"docker-distribution-api-version", b"registry/2.0")
JSON_CONTENT_TYPE = (b"content-type", b"application/json")


def header_value(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (ASGI header names are lowercase)."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def send_body(send: Send, status: int, headers: Headers, body: bytes, *, head: bool = False) -> None:
    """A complete response. For HEAD the Content-Length of ``body`` is kept and no body is sent."""
    headers = [(k, v) for k, v in headers if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def error_headers(exc: RegistryError) -> Headers:
    """The headers of a registry error answer: the API version, JSON, and the error's own."""
    headers: Headers = [API_VERSION_HEADER, JSON_CONTENT_TYPE]
    headers.extend((k.lower().encode(), v.encode()) for k, v in exc.headers.items())
    return headers


async def send_error(send: Send, exc: RegistryError, *, head: bool = False) -> None:
    """The one way an error is answered: registry JSON with its status (body omitted for HEAD)."""
    await send_body(send, exc.status, error_headers(exc), exc.body(), head=head)


async def send_json(send: Send, status: int, doc: Any, headers: Headers | None = None, *, head: bool = False) -> None:
    body = json.dumps(doc, separators=(",", ":")).encode()
    await send_body(send, status, [JSON_CONTENT_TYPE, *(headers or [])], body, head=head)


class StreamEnd(StrEnum):
    COMPLETE = "complete"
    CLIENT_GONE = "client_disconnected"
    UPSTREAM_BROKE = "upstream_broke"


async def stream_body(
    send: Send,
    receive: Receive,
    chunks: AsyncIterator[Chunk],
    *,
    upstream_errors: tuple[type[BaseException], ...],
) -> tuple[StreamEnd, int]:
    """Relay ``chunks`` as the response body; returns how it ended and the bytes sent.

    The response must already be started. On ``UPSTREAM_BROKE`` the response is left
    incomplete on purpose: uvicorn then closes the connection, so the client sees a
    truncated transfer (fewer bytes than Content-Length, or no final chunk).
    """
    task = asyncio.current_task()
    assert task is not None
    state = {"done": False, "gone": False}

    async def watch_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state["done"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch_disconnect())
    sent = 0
    try:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
        state["done"] = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return StreamEnd.COMPLETE, sent
    except asyncio.CancelledError:
        if state["gone"]:
            task.uncancel()
            return StreamEnd.CLIENT_GONE, sent
        raise
    except upstream_errors:
        state["done"] = True
        return StreamEnd.UPSTREAM_BROKE, sent
    finally:
        state["done"] = True
        watcher.cancel()
