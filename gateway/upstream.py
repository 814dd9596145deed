"""One route's upstreams: connection pool, auth, redirects, failover.

``UpstreamClient.open`` sends one client request upstream and returns the final
response, still streaming. Redirects are followed here, one hop at a time, and not
by httpx, because auth must be decided per hop (httpx runs its auth flow around the
whole redirect chain, so a Bearer auth that meets a 401 at a redirect target would
resend the first URL forever):

- ``Authorization`` goes only to the origin that asked for it: the upstream itself,
  or a redirect target that challenges on its own (registry.k8s.io redirects
  manifests to Artifact Registry, which has its own token realm). A CDN that never
  challenges never sees it; S3-style signed URLs even answer 400 when it is sent.
- The route's credentials are used only for challenges from the one upstream they
  belong to; a redirect target's challenge is answered anonymously.
- Token realms and redirect targets must pass the route's address policy
  (``policy.py``) before anything is sent to them.
- ``Range`` and ``If-Range`` ride along on every hop, so resumed pulls resume.

A route may list several upstreams: on a connection error, a timeout or a 502/503/504
the next one is tried (nothing has reached the client yet: ``open`` returns before the
body is read), and an upstream that keeps failing is skipped for a while (``Breaker``).

Every httpx exception becomes a RegistryError here and nowhere else.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import re
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin

import httpcore
import httpx

from gateway import __version__, metrics
from gateway.auth import Token, TokenCache, TokenKey, basic_authorization, fetch_token
from gateway.challenge import Challenge, parse_challenges, pick_challenge
from gateway.errors import UNAVAILABLE, RegistryError
from gateway.httputil import REDIRECT_STATUSES, origin_of
from gateway.netguard import REFUSED, AddressGuard, GuardedBackend
from gateway.policy import TargetRefused, check_target
from gateway.routes import Credentials, Route, Upstream
from gateway.transport import LeanTransport, shared_ssl_context

USER_AGENT = f"registry-gateway/{__version__}"
_REPO_IN_PATH_RE = re.compile(r"/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")
# 500 may be one broken repository; these say the upstream itself is in trouble.
_FAILOVER_STATUSES = frozenset({502, 503, 504})


class _NoCookies(http.cookiejar.CookiePolicy):
    """Upstream cookies are never stored: one client's cookie must not ride on another's request."""

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


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream patience, in seconds (see Settings for what each one bounds)."""

    connect: float = 10.0
    token: float = 30.0
    manifest: float = 60.0
    blob_idle: float = 300.0
    write: float = 60.0
    pool: float = 30.0

    def httpx(self) -> httpx.Timeout:
        # httpx's read timeout is per read: exactly the blob idle timeout. Whole-answer
        # deadlines (token, manifest) are enforced around the calls with asyncio.timeout.
        return httpx.Timeout(connect=self.connect, read=self.blob_idle, write=self.write, pool=self.pool)


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 512
    max_keepalive_connections: int = 128
    keepalive_expiry: float = 60.0


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


def _httpx_limits(limits: PoolLimits) -> httpx.Limits:
    return httpx.Limits(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
    )


def new_transport(route: Route, limits: PoolLimits, kind: str = "lean") -> httpx.AsyncBaseTransport:
    """The route's upstream transport, with its address guard: ``lean`` or httpx's own."""
    guard = AddressGuard([(u.host, u.port) for u in route.upstreams], route.allow_private_addresses)
    if kind == "lean":
        return LeanTransport(limits=_httpx_limits(limits), guard=guard)
    return _GuardedTransport(GuardedBackend(guard), _httpx_limits(limits))


def new_http_client(
    timeouts: Timeouts, limits: PoolLimits, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeouts.httpx(),
        limits=_httpx_limits(limits),
        follow_redirects=False,
        headers={"user-agent": USER_AGENT},
        cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
        # HTTPS_PROXY / NO_PROXY / SSL_CERT_FILE from the environment apply to upstream
        # connections: gateways often sit behind a corporate egress proxy.
        trust_env=True,
    )


@dataclass(frozen=True, slots=True)
class Opened:
    """The final upstream response of one client request, and how it was reached."""

    response: httpx.Response
    url: str
    upstream: Upstream
    redirects: int = 0


def repository_in_path(path: str) -> str | None:
    match = _REPO_IN_PATH_RE.match(path)
    return match.group(1) if match else None


class Breaker:
    """Consecutive failures per upstream; after ``threshold`` the upstream rests ``cooldown`` s.

    After the rest it is tried again (half-open): one success closes it, one more failure
    sends it back to rest. The clock is injectable for tests.
    """

    def __init__(self, threshold: int = 3, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def available(self, key: str) -> bool:
        return self._clock() >= self._open_until.get(key, 0.0)

    def retry_after(self, keys: list[str]) -> float:
        now = self._clock()
        return max(0.0, min(self._open_until.get(k, 0.0) for k in keys) - now)

    def success(self, key: str) -> None:
        self._failures.pop(key, None)
        self._open_until.pop(key, None)

    def failure(self, key: str) -> None:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        if count >= self.threshold:
            self._open_until[key] = self._clock() + self.cooldown


class UpstreamClient:
    """Requests to one route's upstreams, with its token auth, redirect and failover policy."""

    def __init__(
        self,
        route: Route,
        http: httpx.AsyncClient,
        tokens: TokenCache,
        *,
        timeouts: Timeouts,
        max_redirects: int = 5,
        breaker: Breaker | None = None,
        direct: LeanTransport | None = None,
    ) -> None:
        self.route = route
        self.http = http
        self.tokens = tokens
        self.timeouts = timeouts
        self.max_redirects = max_redirects
        self.breaker = breaker or Breaker()
        self._trusted_origins = {u.origin for u in route.upstreams}
        self._timeout = timeouts.httpx().as_dict()
        # Requests go straight to the lean transport, unless an egress proxy is configured in
        # the environment: then httpx's client routes them through it.
        self._direct = direct if direct is not None and not urllib.request.getproxies() else None
        # The last challenge each origin sent: lets later requests attach a token up
        # front instead of paying a 401 round trip every time.
        self._challenges: dict[tuple[str, str, int], Challenge] = {}

    async def aclose(self) -> None:
        await self.http.aclose()

    async def upstream_challenge(self) -> Challenge:
        """The Bearer challenge of the route's first upstream (asked with ``GET /v2/``, then remembered).

        Passthrough routes need it to relay a client's token request to the right realm.
        """
        upstream = self.route.upstream
        known = self._challenges.get(upstream.origin)
        if known is None or known.scheme != "bearer":
            async with asyncio.timeout(self.timeouts.manifest):
                resp = await self._send("GET", upstream.url + "/v2/", {"accept": "application/json"}, None)
                await resp.aclose()
            challenge = pick_challenge(parse_challenges(resp.headers.get_list("www-authenticate")))
            if challenge is None or challenge.scheme != "bearer" or challenge.realm is None:
                raise RegistryError(
                    502,
                    UNAVAILABLE,
                    f"upstream {self.route.name} does not use token auth, so logins cannot be passed through",
                )
            known = Challenge(challenge.scheme, {k: v for k, v in challenge.params.items() if k != "scope"})
            self._challenges[upstream.origin] = known
        assert known.realm is not None
        self._check_target(known.realm, "sent its token realm")
        return known

    async def open(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str],
        repository: str,
        follow_redirects: bool = True,
        client_authorization: str | None = None,
    ) -> Opened:
        """Send a request to ``path`` on the first upstream that answers; the caller closes ``.response``.

        ``headers`` must have lowercase names. ``client_authorization`` is the client's own
        Authorization header, forwarded (to the upstream's origin only) on passthrough routes.
        """
        upstreams = [u for u in self.route.upstreams if self.breaker.available(u.url)]
        if not upstreams:
            wait = self.breaker.retry_after([u.url for u in self.route.upstreams])
            raise RegistryError(
                503,
                UNAVAILABLE,
                f"every upstream of {self.route.name} is failing; the gateway retries them in {wait:.0f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        failure: RegistryError | None = None
        for index, upstream in enumerate(upstreams):
            last = index == len(upstreams) - 1
            try:
                opened = await self._open_on(
                    upstream, method, path, query, headers, repository, follow_redirects, client_authorization
                )
            except RegistryError as exc:
                if not exc.retryable:
                    raise
                self.breaker.failure(upstream.url)
                failure = exc
                continue
            if opened.response.status_code in _FAILOVER_STATUSES:
                self.breaker.failure(upstream.url)
                if not last:
                    await opened.response.aclose()
                    continue
            else:
                self.breaker.success(upstream.url)
            return opened
        assert failure is not None
        raise failure

    async def _open_on(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        repository: str,
        follow_redirects: bool,
        client_authorization: str | None,
    ) -> Opened:
        url = upstream.url + path + (f"?{query}" if query else "")
        for hop in range(self.max_redirects + 1):
            resp = await self._send_authorized(method, url, headers, repository, client_authorization)
            location = resp.headers.get("location")
            if not (follow_redirects and resp.status_code in REDIRECT_STATUSES and location):
                return Opened(response=resp, url=url, upstream=upstream, redirects=hop)
            await resp.aclose()
            try:
                url = urljoin(url, location)
            except ValueError:
                url = "invalid:"  # refused just below, with the route's name in the message
            self._check_target(url, "redirected")
        metrics.upstream_error(self.route.name, "redirects")
        raise RegistryError(
            502, UNAVAILABLE, f"upstream {self.route.name} redirected more than {self.max_redirects} times"
        )

    def _check_target(self, url: str, what: str) -> None:
        try:
            check_target(
                url,
                upstream_scheme=self.route.upstream.scheme,
                trusted_origins=self._trusted_origins,
                allow_private=self.route.allow_private_addresses,
            )
        except TargetRefused as exc:
            metrics.upstream_error(self.route.name, "policy")
            raise RegistryError(
                502, UNAVAILABLE, f"upstream {self.route.name} {what} to a refused address: {exc}"
            ) from None

    async def _send_authorized(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        repository: str,
        client_authorization: str | None,
    ) -> httpx.Response:
        """One hop: attach what this origin is known to want, answer one 401 challenge."""
        origin = origin_of(url)
        if self.route.auth == "passthrough" and origin in self._trusted_origins:
            # The client's own login, to the upstream that issued its token, and nowhere else.
            return await self._send(method, url, headers, client_authorization)
        credentials = self.route.credentials if origin == self.route.credentials_origin else None
        hop_repository = repository if origin in self._trusted_origins else repository_in_path(httpx.URL(url).path)
        hop_repository = hop_repository or repository
        authorization: str | None = None
        known = self._challenges.get(origin)
        if known is not None:
            try:
                authorization = await self._authorization(known, hop_repository, credentials, None)
            except RegistryError:
                # The remembered realm fails: forget it and ask the upstream where its token
                # service is now (a registry may move it); if that fails too, the error stands.
                self._challenges.pop(origin, None)
        resp = await self._send(method, url, headers, authorization)
        if resp.status_code != 401:
            return resp
        challenge = pick_challenge(parse_challenges(resp.headers.get_list("www-authenticate")))
        if challenge is None:
            return resp
        # Remembered without its scope: the scope belongs to this one repository.
        self._challenges[origin] = Challenge(
            challenge.scheme, {k: v for k, v in challenge.params.items() if k != "scope"}
        )
        # A token that was refused is dropped, and one fresh token is tried, once.
        new_authorization = await self._authorization(challenge, hop_repository, credentials, authorization)
        if new_authorization is None or new_authorization == authorization:
            return resp
        await resp.aclose()
        return await self._send(method, url, headers, new_authorization)

    async def _authorization(
        self,
        challenge: Challenge,
        repository: str,
        credentials: Credentials | None,
        refused: str | None,
    ) -> str | None:
        """The Authorization value answering ``challenge`` for ``repository``."""
        if challenge.scheme == "basic":
            return basic_authorization(credentials) if credentials else None
        realm = challenge.realm
        if realm is None:
            return None
        self._check_target(realm, "sent its token realm")
        scope = challenge.scope or f"repository:{repository}:pull"
        key = TokenKey(
            realm=realm,
            service=challenge.service,
            scopes=tuple(scope.split(" ")),
            identity=credentials.identity if credentials else None,
        )
        if refused is not None and refused.startswith("Bearer "):
            self.tokens.invalidate(key, refused[7:])

        async def fetch() -> Token:
            try:
                return await fetch_token(self.http, key, credentials, timeout=self.timeouts.token)
            except RegistryError:
                metrics.upstream_error(self.route.name, "token")
                raise

        return "Bearer " + await self.tokens.obtain(key, fetch)

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], authorization: str | None
    ) -> httpx.Response:
        try:
            host = httpx.URL(url).host
            if self._direct is not None:
                # The lean transport, without the client's machinery around it (cookies, auth
                # and redirect flows the gateway does not use): a third of the CPU of a
                # manifest request went there (docs/performance.md).
                fields = {"user-agent": USER_AGENT, **headers}
                if authorization is not None:
                    fields["authorization"] = authorization
                request = httpx.Request(method, url, headers=fields, extensions={"timeout": self._timeout})
                response = await self._direct.handle_async_request(request)
                response.request = request
                return response
            request = self.http.build_request(method, url, headers=headers)
            if "accept" not in headers:
                # httpx adds "Accept: */*" by default; a client that sent no Accept gets the
                # upstream's default answer, exactly as it would without the gateway.
                del request.headers["accept"]
            if authorization is not None:
                request.headers["authorization"] = authorization
            return await self.http.send(request, stream=True)
        except httpx.TimeoutException:
            metrics.upstream_error(self.route.name, "timeout")
            raise RegistryError(
                504, UNAVAILABLE, f"upstream {self.route.name} timed out ({host})", retryable=True
            ) from None
        except httpx.ConnectError as exc:
            if REFUSED in str(exc):
                metrics.upstream_error(self.route.name, "policy")
                raise RegistryError(502, UNAVAILABLE, f"upstream {self.route.name}: {exc}") from None
            metrics.upstream_error(self.route.name, "connect")
            raise RegistryError(
                502, UNAVAILABLE, f"upstream {self.route.name} is unreachable ({host})", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            metrics.upstream_error(self.route.name, "protocol")
            raise RegistryError(
                502,
                UNAVAILABLE,
                f"upstream {self.route.name} broke the exchange ({host}): {type(exc).__name__}",
                retryable=True,
            ) from None
        except (httpx.InvalidURL, ValueError):
            # A host name httpx cannot encode (IDNA), from a Location or realm that passed
            # the policy's checks: the upstream's fault, never a 500.
            metrics.upstream_error(self.route.name, "protocol")
            raise RegistryError(502, UNAVAILABLE, f"upstream {self.route.name} sent an invalid URL") from None
