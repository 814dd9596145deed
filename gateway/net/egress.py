"""How requests leave the gateway: one httpx transport per route, and the one way it is called.

A route's transport is chosen once, here, and every upstream request (registry,
redirect target, token endpoint) goes through ``send``: a request built the same way
each time, handed to ``transport.handle_async_request``. The in-process tests inject an
``httpx.MockTransport`` at exactly this seam, so they run the code that ships.

- ``lean`` (``transport.py``, the default) or httpx's own httpcore transport
  (``upstream_transport = "httpx"``), both behind the route's address guard
  (``netguard.py``).
- An egress proxy from the environment (``HTTPS_PROXY``, ``NO_PROXY``: gateways often
  sit behind a corporate proxy) wraps that transport in an httpx client, which routes
  each URL through the proxy or not, as httpx does for any program.
- No cookie is ever stored: one client's cookie must not ride on another's request.
"""

from __future__ import annotations

import http.cookiejar
import urllib.request

import httpcore
import httpx

from gateway import __version__
from gateway.net.netguard import AddressGuard, GuardedBackend
from gateway.net.transport import LeanTransport, shared_ssl_context
from gateway.routing.routes import Route
from gateway.settings import PoolLimits, Timeouts

USER_AGENT = f"registry-gateway/{__version__}"


class _NoCookies(http.cookiejar.CookiePolicy):
    """Upstream cookies are never stored (the egress-proxy client is the only holder of a jar)."""

    netscape = True
    rfc2965 = False
    hide_cookie2 = True

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: object) -> bool:
        return False

    def path_return_ok(self, path: str, request: object) -> bool:
        return False


def _httpx_limits(limits: PoolLimits) -> httpx.Limits:
    return httpx.Limits(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
    )


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the address guard as its network backend.

    httpx does not expose httpcore's ``network_backend``; the pool is rebuilt with the
    same settings plus the guard.
    """

    def __init__(self, backend: GuardedBackend, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=shared_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


class _ThroughEnvironmentProxy(httpx.AsyncBaseTransport):
    """The route's transport, behind the egress proxies the environment names.

    httpx's client knows ``HTTPS_PROXY``/``NO_PROXY`` (and mounts a proxy transport per
    pattern); its ``send`` takes the request as built, so nothing else changes: no
    redirects followed, no auth flow, no cookies kept.
    """

    def __init__(self, direct: httpx.AsyncBaseTransport, limits: PoolLimits) -> None:
        self._client = httpx.AsyncClient(
            transport=direct,
            limits=_httpx_limits(limits),
            follow_redirects=False,
            cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
            trust_env=True,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._client.send(request, stream=True)

    async def aclose(self) -> None:
        await self._client.aclose()


def route_transport(route: Route, limits: PoolLimits, kind: str = "lean") -> httpx.AsyncBaseTransport:
    """The transport for a route's upstreams: ``lean`` or httpx's own, guarded, through any egress proxy."""
    named = [*route.upstreams, *route.mirrors]  # the operator named them: reachable wherever they are
    guard = AddressGuard([(u.host, u.port) for u in named], route.allow_private_addresses)
    direct: httpx.AsyncBaseTransport
    if kind == "lean":
        direct = LeanTransport(limits=limits, guard=guard)
    else:
        direct = _GuardedTransport(GuardedBackend(guard), _httpx_limits(limits))
    if urllib.request.getproxies():
        return _ThroughEnvironmentProxy(direct, limits)
    return direct


async def send(
    transport: httpx.AsyncBaseTransport,
    method: str,
    url: str | httpx.URL,
    headers: dict[str, str],
    timeouts: Timeouts,
    content: bytes | None = None,
) -> httpx.Response:
    """Send one request and return its response with the body still streaming; the caller closes it.

    ``headers`` (lowercase names) are sent as given, with the gateway's User-Agent unless
    they carry the client's: no ``Accept`` is added when the client sent none, so it gets
    the upstream's default answer, exactly as it would without the gateway. httpx's and the
    transport's exceptions pass through: the caller maps them (``upstream_errors.py``).
    ``content``: a request body held whole (the OAuth2 token form), sent with its Content-Length.
    """
    request = httpx.Request(
        method,
        url,
        headers={"user-agent": USER_AGENT, **headers},
        content=content,
        extensions={"timeout": timeouts.per_request()},
    )
    response = await transport.handle_async_request(request)
    response.request = request
    return response
