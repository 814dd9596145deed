"""The ASGI application: ``/v2`` goes to the relay, the rest to a small starlette app.

``create_app()`` builds the app from Settings (read from the environment when not
given); ``worker_app`` is the factory uvicorn calls in every worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import allocator, sizing
from gateway.auth.authorizer import authorizer_for
from gateway.auth.grants import Grants
from gateway.auth.tokens import TokenCache
from gateway.blobs import herd
from gateway.http.asgi import ASGIApp, Receive, Scope, Send, error_headers
from gateway.http.errors import UNSUPPORTED, ConfigError, RegistryError
from gateway.http.forwarded import ForwardedHeadersMiddleware
from gateway.net.breaker import Breaker
from gateway.net.egress import route_transport
from gateway.observe import metrics, tracing
from gateway.observe.log import AccessLogMiddleware, configure_logging
from gateway.observe.recent import Recent
from gateway.relay.dispatch import Relay
from gateway.relay.manifest_cache import ManifestCache
from gateway.relay.status import StatusPage
from gateway.routing.access import AccessControl, ClientAuth, RateLimiter
from gateway.routing.budget import BudgetStore
from gateway.routing.reference import BUDGET_STATUS_PATH, TOKEN_PATH, is_api_path
from gateway.routing.routes import RouteTable
from gateway.routing.routes_file import load_routes
from gateway.settings import Settings
from gateway.upstream.client import UpstreamClient
from gateway.upstream.passthrough import TokenRelay

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# How often each worker counts its asyncio tasks for /metrics (``metrics.sample_tasks``).
TASK_SAMPLE_SECONDS = 5.0


class App:
    """Dispatch on the path: the registry API and the token relay are raw ASGI, the rest is starlette."""

    def __init__(self, relay: Relay, tokens: TokenRelay, other: ASGIApp) -> None:
        self.relay = relay
        self.tokens = tokens
        self.other = other

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and is_api_path(path):
            await self.relay(scope, receive, send)
        elif scope["type"] == "http" and path == TOKEN_PATH:
            await self.tokens(scope, receive, send)
        else:
            await self.other(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    error = RegistryError(status, UNSUPPORTED, "not found" if status == 404 else "method not allowed")
    headers = error_headers(error)
    return Response(error.body(), status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def build_clients(
    table: RouteTable,
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
    budgets: BudgetStore | None = None,
) -> dict[str, UpstreamClient]:
    """One UpstreamClient per route; ``transport`` replaces every route's own (the in-process tests).

    ``budgets``: the pull budgets the relay records, which the authorizers read to pick an account."""
    tokens = TokenCache()
    timeouts = settings.timeouts()
    budgets = budgets if budgets is not None else BudgetStore(settings.budget_thresholds())
    clients: dict[str, UpstreamClient] = {}
    for route in table.routes:
        wire = transport or route_transport(route, settings.pool_limits(), settings.upstream_transport)
        clients[route.name] = UpstreamClient(
            route,
            wire,
            authorizer_for(route, tokens, wire, timeouts, budgets),
            timeouts=timeouts,
            max_redirects=settings.max_redirects,
            breaker=Breaker(settings.breaker_failures, settings.breaker_cooldown),
        )
    return clients


def worker_app() -> ASGIApp:
    """The factory uvicorn calls in each worker process: logging first, then the app.

    Workers are fresh processes (uvicorn spawns them), so logging configured in the
    parent does not reach them.
    """
    settings = Settings()
    configure_logging(settings.log_level)
    # Per worker: malloc's thresholds are the process's own (``allocator.py``).
    allocator.keep_freed_memory()
    return create_app(settings)


def check_settings(settings: Settings, table: RouteTable) -> ClientAuth | None:
    """Settings that contradict the routes raise ConfigError with one line; returns the parsed client logins."""
    secret = settings.token_secret
    if secret is not None and len(secret.get_secret_value().encode()) < 32:
        raise ConfigError("GATEWAY_TOKEN_SECRET must be at least 32 bytes (for example: openssl rand -hex 32)")
    if not settings.client_auth_enabled:
        return None
    for route in table.routes:
        if route.auth.uses_client_logins:
            raise ConfigError(
                f'route {route.name!r} passes logins through (auth = "passthrough"), which cannot be combined '
                "with GATEWAY_HTPASSWD / GATEWAY_AUTH_TOKENS_FILE: both use the client's Authorization header"
            )
    return ClientAuth(settings.htpasswd, settings.auth_tokens_file)  # parse errors surface at start-up


def create_app(
    settings: Settings | None = None,
    *,
    table: RouteTable | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    tracer_provider: TracerProvider | None = None,
) -> ASGIApp:
    """The whole app. ``transport`` replaces every route's upstream transport and ``tracer_provider``
    the tracing set up from ``OTEL_*`` (both for tests)."""
    settings = settings or Settings()
    table = table or load_routes(settings.routes)
    # Everything that can be refused is checked before anything is built (connection pools).
    auth = check_settings(settings, table)
    budgets = BudgetStore(settings.budget_thresholds())
    clients = build_clients(table, settings, transport, budgets)
    cache = None
    if settings.manifest_cache_bytes > 0:
        cache = ManifestCache(
            max_bytes=settings.manifest_cache_bytes,
            tag_ttl=settings.manifest_cache_tag_ttl,
            digest_ttl=settings.manifest_cache_digest_ttl,
            stale_if_error=settings.manifest_stale_if_error,
        )
    memory = sizing.budget(settings.shared_memory_bytes, settings.workers, sizing.container_limit()).per_worker
    metrics.SHARED_WINDOW_BUDGET.set(memory)
    board = herd.Board(
        settings.shared_window_bytes,
        memory,
        on_held=metrics.SHARED_WINDOW_BYTES.inc,
        on_merge=lambda key: metrics.SHARED_MERGES.labels(key[0]).inc(),
        on_wait=lambda key, seconds: metrics.SHARED_WAIT_SECONDS.labels(key[0]).inc(seconds),
        retain=settings.shared_retain_bytes,
        patience=settings.shared_patience_seconds,
    )
    # Without a configured secret each process signs with its own (``__main__`` gives its workers one).
    secret = settings.token_secret.get_secret_value().encode() if settings.token_secret else secrets.token_bytes(32)
    grants = Grants(secret)
    relay = Relay(
        table,
        clients,
        cache,
        blob_resumes=settings.blob_resumes,
        resume_same_upstream=settings.blob_resume_same_upstream,
        budgets=budgets,
        board=board,
        grants=grants,
    )

    # /status: open like /metrics (it reveals topology, not secrets; docs/operations.md).
    recent = Recent(keep_clients=settings.status_show_clients)
    status = StatusPage(table, clients, budgets, board, recent, show_clients=settings.status_show_clients)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        return JSONResponse({"status": "ready", "routes": [r.name for r in table.routes]})

    async def metrics_endpoint(request: Request) -> Response:
        metrics.count_tasks()  # exact for this worker at every scrape; the others' are a moment old
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def budget_status(request: Request) -> Response:
        # This worker's view: the last answer it saw per route and credential (metrics: all workers).
        return JSONResponse(
            {"budgets": budgets.snapshot(), "warn_at": list(budgets.warn_at), "pid": os.getpid()},
            headers={"cache-control": "no-store"},
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sampler = asyncio.get_running_loop().create_task(metrics.sample_tasks(TASK_SAMPLE_SECONDS))
        try:
            yield
        finally:
            sampler.cancel()
            for client in clients.values():
                await client.aclose()
            tracing.shutdown()

    other = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/status", status.endpoint, methods=["GET"]),
            Route(BUDGET_STATUS_PATH, budget_status, methods=["GET"]),
        ],
        exception_handlers={404: _not_found, 405: _not_found},
        lifespan=lifespan,
    )
    limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None
    inner: ASGIApp = App(relay, TokenRelay(table, clients, grants), other)
    if auth is not None or limiter is not None:
        inner = AccessControl(inner, limiter=limiter, auth=auth)
    if tracing.configure(provider=tracer_provider):
        inner = tracing.TracingMiddleware(inner)
    app = AccessLogMiddleware(inner, observers=[metrics.observe, recent.observe])
    return ForwardedHeadersMiddleware(app, settings.forwarded_allow_ips)
