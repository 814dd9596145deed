"""What the in-process tests share: one clock, one fake registry, one way to build the app.

The app is the one that ships: ``create_app`` with an ``httpx.MockTransport`` injected at the
upstream seam (``egress.send``), so every request takes the production send path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.http.asgi import ASGIApp
from gateway.routing.routes import RouteTable
from gateway.routing.routes_file import parse_routes
from gateway.settings import Settings
from tests.unit.fake_registry import FakeRegistry


class Clock:
    """An injectable monotonic clock: tests move time by setting ``now``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def in_process_app(
    fake: FakeRegistry,
    routes: Sequence[Mapping[str, Any]] | RouteTable,
    settings: Settings | None = None,
    env: Mapping[str, str] | None = None,
) -> ASGIApp:
    """The gateway over ``fake``; the manifest cache is off unless ``settings`` turns it on."""
    table = (
        routes if isinstance(routes, RouteTable) else parse_routes({"route": list(routes)}, "routes.toml", env or {})
    )
    return create_app(settings or Settings(manifest_cache_bytes=0), table=table, transport=httpx.MockTransport(fake))


def in_process_client(app: ASGIApp, client: tuple[str, int] = ("127.0.0.1", 1234)) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://gw.test")


GatewayClient = Callable[..., httpx.AsyncClient]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def gateway_client(fake: FakeRegistry) -> GatewayClient:
    """``gateway_client(routes, settings=None, env=None, client=(ip, port), registry=fake)``: a client of a new app."""

    def make(
        routes: Sequence[Mapping[str, Any]] | RouteTable,
        settings: Settings | None = None,
        env: Mapping[str, str] | None = None,
        client: tuple[str, int] = ("127.0.0.1", 1234),
        registry: FakeRegistry | None = None,
    ) -> httpx.AsyncClient:
        return in_process_client(in_process_app(registry or fake, routes, settings, env), client)

    return make


async def asgi_get(app: Any, path: str) -> tuple[int, bytes, bool]:
    """GET ``path`` of a raw ASGI app; status, body, and whether the response was completed (False: aborted)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gw.test")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 5000),
    }
    messages: list[dict[str, Any]] = []
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if asked:
            await asyncio.Event().wait()  # the client stays connected
        asked = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    complete = bool(bodies) and not bodies[-1].get("more_body", False)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in bodies), complete
