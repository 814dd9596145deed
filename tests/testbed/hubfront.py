"""A hub front: Docker Hub's pull accounting in front of the test bed's hub registry.

Docker's docs ("Docker Hub pull usage and limits", https://docs.docker.com/docker-hub/usage/pulls/):
a pull is a manifest GET (a HEAD is not counted), counted per account for authenticated
requests and per client address for anonymous ones, and the answers say how much is left::

    ratelimit-limit: 100;w=21600
    ratelimit-remaining: 76;w=21600
    docker-ratelimit-source: 192.0.2.1

``HubFront(target, limit=5)`` listens on 127.0.0.1 (uvicorn in a thread, like the tag pager)
and relays every request to ``target`` (``testbed.hub.registry_url``), Authorization and all.
On manifest answers (GET and HEAD, any status but the registry's own 401 challenge) it adds
those three headers; a GET the registry answers 200 is one pull of the requester, whose key is
the Bearer token's subject (the test bed's token server issues JWTs: the payload's ``sub`` is
read, not verified) or, for an anonymous token, the client address. Past ``limit`` pulls in the
window such a GET is answered ``429 TOOMANYREQUESTS`` (registry JSON, ``Retry-After``, the
headers with ``remaining 0``) instead, and is not counted. ``refuse_all = True`` answers every
manifest request that way, HEADs included (an address Docker Hub refuses outright).

Counts never reset on their own (tests run within a window); ``reset()`` starts a new window.
``pulls(key)``, ``remaining(key)`` and ``requests`` (every manifest request: method, reference,
key, status) are what tests compare the gateway's view with.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._util import ThreadedUvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)
TOO_MANY = {
    "errors": [
        {
            "code": "TOOMANYREQUESTS",
            "message": "You have reached your pull rate limit. You may increase the limit by authenticating "
            "and upgrading: https://www.docker.com/increase-rate-limit",
        }
    ]
}


@dataclass(frozen=True)
class HubRequest:
    """One manifest request the front answered."""

    method: str
    name: str
    reference: str
    key: str
    status: int
    counted: bool


def token_subject(authorization: str | None) -> str | None:
    """The ``sub`` of a Bearer JWT, unverified; None for no token, an anonymous one, or not a JWT."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    parts = authorization[7:].strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    subject = payload.get("sub") if isinstance(payload, dict) else None
    return subject if isinstance(subject, str) and subject else None


class HubFront:
    """Docker Hub's accounting before ``target`` (see the module). Use as a context manager."""

    def __init__(self, target: str, *, limit: int = 100, window: int = 21600, retry_after: int = 3600) -> None:
        self.target = target.rstrip("/")
        self.limit = limit
        self.window = window
        self.retry_after = retry_after
        #: every manifest request answered 429 (HEADs too)
        self.refuse_all = False
        self._lock = threading.Lock()
        self._pulls: dict[str, int] = {}
        self._requests: list[HubRequest] = []
        self._client: httpx.AsyncClient | None = None
        self._server = ThreadedUvicorn(self, name="hub-front", lifespan="on")
        self.url = self._server.url

    # ------------------------------------------------------------------ counts
    def pulls(self, key: str) -> int:
        with self._lock:
            return self._pulls.get(key, 0)

    def remaining(self, key: str) -> int:
        return max(0, self.limit - self.pulls(key))

    @property
    def requests(self) -> list[HubRequest]:
        with self._lock:
            return list(self._requests)

    def manifest_requests(self, method: str, *, status: int | None = None) -> list[HubRequest]:
        return [r for r in self.requests if r.method == method and (status is None or r.status == status)]

    def reset(self) -> None:
        """A new window: every count back to zero, the request log emptied."""
        with self._lock:
            self._pulls.clear()
            self._requests.clear()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HubFront:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> HubFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        request = self._client_or_new().build_request(
            scope["method"],
            httpx.URL(self.target).copy_with(raw_path=raw_path + (b"?" + query if query else b"")),
            headers=[(k, v) for k, v in scope["headers"] if k.lower().decode("latin-1") not in HOP_BY_HOP],
        )
        response = await self._client_or_new().send(request, stream=True)
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in HOP_BY_HOP]
            match = MANIFEST_PATH.match(scope["path"])
            if match is None or response.status_code == 401:
                await self._relay(scope, send, response.status_code, headers, response)
                return
            await self._manifest(scope, send, match, response, headers)
        finally:
            await response.aclose()

    def _client_or_new(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(60.0), follow_redirects=False, trust_env=False)
        return self._client

    async def _manifest(
        self,
        scope: Scope,
        send: Send,
        match: re.Match[str],
        response: httpx.Response,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        method = scope["method"]
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        client = scope.get("client")
        key = token_subject(authorization) or (client[0] if client else "-")
        with self._lock:
            pulls = self._pulls.get(key, 0)
            refused = self.refuse_all or (method == "GET" and response.status_code == 200 and pulls >= self.limit)
            counted = method == "GET" and response.status_code == 200 and not refused
            if counted:
                pulls = self._pulls[key] = pulls + 1
            status = 429 if refused else response.status_code
            self._requests.append(HubRequest(method, match["name"], match["reference"], key, status, counted))
        remaining = max(0, self.limit - pulls)
        budget = [
            (b"ratelimit-limit", f"{self.limit};w={self.window}".encode()),
            (b"ratelimit-remaining", f"{0 if refused else remaining};w={self.window}".encode()),
            (b"docker-ratelimit-source", key.encode()),
        ]
        if refused:
            body = json.dumps(TOO_MANY).encode()
            out = [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self.retry_after).encode()),
                (b"docker-distribution-api-version", b"registry/2.0"),
                *budget,
            ]
            await send({"type": "http.response.start", "status": 429, "headers": out})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
            return
        await self._relay(scope, send, status, [*headers, *budget], response)

    @staticmethod
    async def _relay(
        scope: Scope, send: Send, status: int, headers: list[tuple[bytes, bytes]], response: httpx.Response
    ) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if scope["method"] != "HEAD":
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
