"""A relay in front of a distribution 2.8 registry that adds ``tags/list`` pagination (``n`` / ``last``).

distribution 2.8 ignores ``n`` and ``last``. This relay fetches the full list (with the client's Authorization
header), sorts it, applies ``last`` and ``n`` and adds a distribution-3-style relative ``Link: <...>; rel="next"``
header when more tags remain. Every other request is relayed faithfully: method, raw path, query, headers
(including Host, Authorization and Accept), streamed bodies both ways, and redirects are never followed.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TAGS_LIST = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# headers httpx adds on its own; removed again unless the client sent them
HTTPX_DEFAULTS = ("accept", "accept-encoding", "user-agent", "connection")


class PagingRelay:
    """ASGI app relaying to ``upstream`` (e.g. ``http://127.0.0.1:5000``)."""

    def __init__(self, upstream: str, *, default_page_size: int = 100) -> None:
        self.upstream = upstream.rstrip("/")
        #: page size when the client sends no ``n``: real registries (ghcr.io, quay.io) paginate by default, so
        #: clients that never ask for pages (skopeo list-tags) still have to follow ``Link``.
        self.default_page_size = default_page_size
        self._client: httpx.AsyncClient | None = None
        #: number of tags/list requests that were paginated here (for tests)
        self.paginated_requests = 0
        #: number of requests relayed as-is
        self.relayed_requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            if scope["method"] == "GET" and TAGS_LIST.match(scope["path"]):
                query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
                self.paginated_requests += 1
                await self._paginate(scope, send, query)
                return
            self.relayed_requests += 1
            await self._relay(scope, receive, send)
        except httpx.HTTPError as exc:
            await _simple(send, 502, "text/plain", f"bad gateway: {exc!r}\n".encode())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await send({"type": "lifespan.shutdown.complete"})
                return

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=10.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    def _url(self, scope: Scope) -> httpx.URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        query: bytes = scope.get("query_string", b"")
        target = raw_path + (b"?" + query if query else b"")
        return httpx.URL(self.upstream).copy_with(raw_path=target)

    async def _relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming: list[tuple[bytes, bytes]] = list(scope["headers"])
        names = {k.lower() for k, _ in incoming}
        headers = [(k, v) for k, v in incoming if k.lower().decode("latin-1") not in HOP_BY_HOP]
        content: AsyncIterator[bytes] | None = None
        if b"content-length" in names or b"transfer-encoding" in names:
            content = _request_body(receive)
        request = self.client.build_request(scope["method"], self._url(scope), headers=headers, content=content)
        for name in HTTPX_DEFAULTS:
            if name.encode() not in names and name in request.headers:
                del request.headers[name]
        response = await self.client.send(request, stream=True, follow_redirects=False)
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            if scope["method"] != "HEAD":
                async for chunk in response.aiter_raw():
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _paginate(self, scope: Scope, send: Send, query: dict[str, list[str]]) -> None:
        name = TAGS_LIST.match(scope["path"])
        assert name is not None
        repo = name.group("name")
        limit: int | None = self.default_page_size
        if "n" in query:
            try:
                limit = int(query["n"][0])
            except ValueError:
                limit = -1
            if limit < 0:
                await _error(send, 400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested")
                return
        last = query.get("last", [""])[0]

        headers = [(k, v) for k, v in scope["headers"] if k.lower() == b"authorization"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        url = httpx.URL(self.upstream).copy_with(raw_path=raw_path)
        response = await self.client.get(url, headers=headers)
        if response.status_code != 200:
            out = [(k, v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            await send({"type": "http.response.body", "body": response.content, "more_body": False})
            return
        document = response.json()
        tags = sorted(document.get("tags") or [])
        if last:
            tags = [t for t in tags if t > last]
        link: str | None = None
        if limit is not None:
            if len(tags) > limit > 0:
                link = (
                    f'</v2/{repo}/tags/list?n={limit}&last={urllib.parse.quote(tags[limit - 1], safe="")}>; rel="next"'
                )
            tags = tags[:limit]
        body = json.dumps({"name": document.get("name", repo), "tags": tags}).encode()
        out_headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        api_version = response.headers.get("docker-distribution-api-version")
        if api_version:
            out_headers.append((b"docker-distribution-api-version", api_version.encode()))
        out_headers.append((b"x-content-type-options", b"nosniff"))
        if link is not None:
            out_headers.append((b"link", link.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": out_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body: bytes = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _simple(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except Exception:  # response already started or client gone
        pass


async def _error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
    await _simple(send, status, "application/json; charset=utf-8", body)
