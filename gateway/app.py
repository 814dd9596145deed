"""The ASGI application: ``/v2`` goes to the relay, the rest to a small starlette app.

``create_app()`` builds the app from Settings (read from the environment when not
given); ``worker_app`` is the factory uvicorn calls in every worker process.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import metrics
from gateway.asgi import ASGIApp, Receive, Scope, Send
from gateway.auth import TokenCache
from gateway.errors import UNSUPPORTED, error_body
from gateway.forwarded import ForwardedHeadersMiddleware
from gateway.log import AccessLogMiddleware, configure_logging
from gateway.proxy import Gateway
from gateway.routes import RouteTable, load_routes
from gateway.settings import Settings
from gateway.upstream import UpstreamClient, new_http_client


class App:
    """Dispatch on the path: the registry API is raw ASGI, the rest is starlette."""

    def __init__(self, gateway: Gateway, other: ASGIApp) -> None:
        self.gateway = gateway
        self.other = other

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v2" or path.startswith("/v2/")):
            await self.gateway(scope, receive, send)
        else:
            await self.other(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    message = "not found" if status == 404 else "method not allowed"
    return Response(error_body(UNSUPPORTED, message), status_code=status, media_type="application/json")


def build_clients(
    table: RouteTable, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> dict[str, UpstreamClient]:
    tokens = TokenCache()
    clients: dict[str, UpstreamClient] = {}
    for route in table.routes:
        http = new_http_client(settings.timeouts(), settings.pool_limits(), transport)
        clients[route.name] = UpstreamClient(
            route, http, tokens, timeouts=settings.timeouts(), max_redirects=settings.max_redirects
        )
    return clients


def worker_app() -> ASGIApp:
    """The factory uvicorn calls in each worker process: logging first, then the app.

    Workers are fresh processes (uvicorn spawns them), so logging configured in the
    parent does not reach them.
    """
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def create_app(
    settings: Settings | None = None,
    *,
    table: RouteTable | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ASGIApp:
    settings = settings or Settings()
    table = table or load_routes(settings.routes)
    clients = build_clients(table, settings, transport)
    gateway = Gateway(table, clients)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        return JSONResponse({"status": "ready", "routes": [r.name for r in table.routes]})

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for client in clients.values():
                await client.aclose()

    other = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={404: _not_found, 405: _not_found},
        lifespan=lifespan,
    )
    app = AccessLogMiddleware(App(gateway, other), observers=[metrics.observe])
    return ForwardedHeadersMiddleware(app, settings.forwarded_allow_ips)
