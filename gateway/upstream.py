"""One upstream registry: its connection pool, its auth, its redirects.

``UpstreamClient.open`` sends one client request upstream and returns the final
response, still streaming. Redirects are followed here, one hop at a time, and not
by httpx, because auth must be decided per hop (research: httpx runs its auth flow
around the whole redirect chain, so a Bearer auth that meets a 401 at a redirect
target would resend the first URL forever):

- ``Authorization`` goes only to the origin that asked for it: the upstream itself,
  or a redirect target that challenges on its own (registry.k8s.io redirects
  manifests to Artifact Registry, which has its own token realm). A CDN that never
  challenges never sees it; S3-style signed URLs even answer 400 when it is sent.
- The route's credentials are used only for challenges from the upstream's own
  origin; a redirect target's challenge is answered anonymously.
- ``Range`` and ``If-Range`` ride along on every hop, so resumed pulls resume.

Every httpx exception becomes a RegistryError here and nowhere else.
"""

from __future__ import annotations

import http.cookiejar
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from gateway import __version__, metrics
from gateway.auth import Token, TokenCache, TokenKey, basic_authorization, fetch_token
from gateway.challenge import Challenge, parse_challenges, pick_challenge
from gateway.errors import UNAVAILABLE, RegistryError
from gateway.httputil import REDIRECT_STATUSES, origin_of
from gateway.routes import Credentials, Route

_REPO_IN_PATH_RE = re.compile(r"/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")


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
    connect: float = 10.0
    read: float = 300.0
    write: float = 60.0
    pool: float = 30.0
    token: float = 30.0

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 512
    max_keepalive_connections: int = 128
    keepalive_expiry: float = 60.0


def new_http_client(
    timeouts: Timeouts, limits: PoolLimits, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeouts.httpx(),
        limits=httpx.Limits(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        ),
        follow_redirects=False,
        headers={"user-agent": f"registry-gateway/{__version__}"},
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
    redirects: int = 0


def repository_in_path(path: str) -> str | None:
    match = _REPO_IN_PATH_RE.match(path)
    return match.group(1) if match else None


class UpstreamClient:
    """Requests to one route's upstream, with its token auth and redirect policy."""

    def __init__(
        self,
        route: Route,
        http: httpx.AsyncClient,
        tokens: TokenCache,
        *,
        timeouts: Timeouts,
        max_redirects: int = 5,
    ) -> None:
        self.route = route
        self.http = http
        self.tokens = tokens
        self.timeouts = timeouts
        self.max_redirects = max_redirects
        self._origin = route.upstream.origin
        # The last challenge each origin sent: lets later requests attach a token up
        # front instead of paying a 401 round trip every time.
        self._challenges: dict[tuple[str, str, int], Challenge] = {}
        self._token_timeout = httpx.Timeout(timeouts.token, connect=timeouts.connect)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def open(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str],
        repository: str,
        follow_redirects: bool = True,
    ) -> Opened:
        """Send a request to ``path`` on the upstream; the caller must close ``.response``.

        ``headers`` must have lowercase names.
        """
        url = self.route.upstream.url + path + (f"?{query}" if query else "")
        for hop in range(self.max_redirects + 1):
            resp = await self._send_authorized(method, url, headers, repository)
            location = resp.headers.get("location")
            if not (follow_redirects and resp.status_code in REDIRECT_STATUSES and location):
                return Opened(response=resp, url=url, redirects=hop)
            await resp.aclose()
            url = urljoin(url, location)
            if not url.startswith(("https://", "http://")):
                raise RegistryError(502, UNAVAILABLE, f"upstream {self.route.name} redirected to a non-HTTP URL")
        metrics.upstream_error(self.route.name, "redirects")
        raise RegistryError(
            502, UNAVAILABLE, f"upstream {self.route.name} redirected more than {self.max_redirects} times"
        )

    async def _send_authorized(
        self, method: str, url: str, headers: Mapping[str, str], repository: str
    ) -> httpx.Response:
        """One hop: attach what this origin is known to want, answer one 401 challenge."""
        origin = origin_of(url)
        own = origin == self._origin
        credentials = self.route.credentials if own else None
        hop_repository = repository if own else (repository_in_path(httpx.URL(url).path) or repository)
        authorization: str | None = None
        known = self._challenges.get(origin)
        if known is not None:
            authorization = await self._authorization(known, hop_repository, credentials, None)
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
                return await fetch_token(self.http, key, credentials, timeout=self._token_timeout)
            except RegistryError:
                metrics.upstream_error(self.route.name, "token")
                raise

        return "Bearer " + await self.tokens.obtain(key, fetch)

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], authorization: str | None
    ) -> httpx.Response:
        request = self.http.build_request(method, url, headers=headers)
        if "accept" not in headers:
            # httpx adds "Accept: */*" by default; a client that sent no Accept gets the
            # upstream's default answer, exactly as it would without the gateway.
            del request.headers["accept"]
        if authorization is not None:
            request.headers["authorization"] = authorization
        try:
            return await self.http.send(request, stream=True)
        except httpx.TimeoutException:
            metrics.upstream_error(self.route.name, "timeout")
            raise RegistryError(
                504, UNAVAILABLE, f"upstream {self.route.name} timed out ({httpx.URL(url).host})"
            ) from None
        except httpx.HTTPError as exc:
            metrics.upstream_error(self.route.name, "connect" if isinstance(exc, httpx.ConnectError) else "protocol")
            raise RegistryError(
                502,
                UNAVAILABLE,
                f"upstream {self.route.name} is unreachable ({httpx.URL(url).host}): {type(exc).__name__}",
            ) from None
