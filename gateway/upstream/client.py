"""One route's upstreams: failover, redirects hop by hop, and the authorizer asked at each hop.

``UpstreamClient.open`` sends one client request upstream and returns the final
response, still streaming. Redirects are followed here, one hop at a time, and not
by httpx, because authorization must be decided per hop (httpx runs its auth flow
around the whole redirect chain, so a Bearer auth that meets a 401 at a redirect
target would resend the first URL forever). What each hop may carry is the route's
authorizer's decision (``authorizer.py``); here are the mechanics:

- redirect targets must pass the route's address policy (``policy.py``) before
  anything is sent to them;
- ``Range`` and ``If-Range`` ride along on every hop, so resumed pulls resume;
- every request goes through ``egress.send`` on the route's transport, and its
  failures become RegistryErrors in ``upstream_errors.py``.

A route may list several upstreams: on a connection error, a timeout or a 502/503/504
the next one is tried (nothing has reached the client yet: ``open`` returns before the
body is read), and an upstream that keeps failing is skipped for a while (``Breaker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from gateway.auth.authorizer import GATEWAY_LOGIN, Authorizer, Hop, Login
from gateway.auth.challenge import Challenge, parse_challenges, pick_challenge
from gateway.http.errors import UNAVAILABLE, RegistryError
from gateway.http.util import REDIRECT_STATUSES
from gateway.net.breaker import Breaker
from gateway.net.egress import send
from gateway.net.upstream_errors import REQUEST, check_destination, upstream_errors
from gateway.observe import metrics, tracing
from gateway.routing.policy import origin_of
from gateway.routing.routes import Route, Upstream
from gateway.settings import Timeouts

_REPO_IN_PATH_RE = re.compile(r"/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")
# 500 may be one broken repository; these say the upstream itself is in trouble.
_FAILOVER_STATUSES = frozenset({502, 503, 504})
# An upstream that served a blob's bytes wrong is not asked for that blob again for this long
# (when the route has another upstream): the client's retry goes elsewhere.
AVOID_SECONDS = 600.0
# An upstream whose bodies of a blob kept breaking is passed over for that blob this long (when
# the route has another source): later pulls of it start elsewhere (``blobs/resume.Breaks``).
PASS_OVER_SECONDS = 300.0
# A mirror that refuses a repository (401/403) is not asked for it again for this long.
MIRROR_REFUSAL_SECONDS = 300.0
_MAX_AVOIDED = 10_000


@dataclass(frozen=True, slots=True)
class Opened:
    """The final upstream response of one client request, and how it was reached."""

    response: httpx.Response
    url: str
    upstream: Upstream
    redirects: int = 0
    # Whose account the final request spent (``user:<name>``, ``account:<name>``), if the gateway's.
    credential: str | None = None


def repository_in_path(path: str) -> str | None:
    match = _REPO_IN_PATH_RE.match(path)
    return match.group(1) if match else None


class UpstreamClient:
    """Requests to one route's upstreams, with its authorizer, redirect and failover policy."""

    def __init__(
        self,
        route: Route,
        transport: httpx.AsyncBaseTransport,
        authorizer: Authorizer,
        *,
        timeouts: Timeouts,
        max_redirects: int,
        breaker: Breaker,
    ) -> None:
        self.route = route
        self.transport = transport
        self.authorizer = authorizer
        self.timeouts = timeouts
        self.max_redirects = max_redirects
        self.breaker = breaker
        self._avoided: dict[tuple[str, str], float] = {}  # (upstream URL, digest) -> until (monotonic)
        self._clock = time.monotonic

    async def aclose(self) -> None:
        await self.transport.aclose()

    def avoid(self, upstream: Upstream, key: str, seconds: float = AVOID_SECONDS) -> None:
        """Do not ask ``upstream`` for ``key`` (a blob digest) for a while, when another upstream can be asked."""
        now = self._clock()
        if len(self._avoided) >= _MAX_AVOIDED:
            for stale in [k for k, until in self._avoided.items() if until <= now] or [next(iter(self._avoided))]:
                del self._avoided[stale]
        self._avoided[(upstream.url, key)] = now + seconds

    @property
    def sources(self) -> tuple[str, ...]:
        """Every URL content may come from: the mirrors (asked first for it), then the upstreams."""
        return tuple(u.url for u in (*self.route.mirrors, *self.route.upstreams))

    def _avoiding(self, upstream: Upstream, key: str) -> bool:
        until = self._avoided.get((upstream.url, key))
        return until is not None and until > self._clock()

    async def upstream_challenge(self) -> Challenge:
        """The Bearer challenge of the route's first upstream (asked with ``GET /v2/``, then remembered).

        Passthrough routes need it to relay a client's token request to the right realm.
        """
        upstream = self.route.upstream
        known = self.authorizer.remembered(upstream.origin)
        if known is None or known.scheme != "bearer":
            async with asyncio.timeout(self.timeouts.manifest):
                resp = await self._send("GET", upstream.url + "/v2/", {"accept": "application/json"})
                await resp.aclose()
            challenge = pick_challenge(parse_challenges(resp.headers.get_list("www-authenticate")))
            if challenge is None or challenge.scheme != "bearer" or challenge.realm is None:
                raise RegistryError(
                    502,
                    UNAVAILABLE,
                    f"upstream {self.route.name} does not use token auth, so logins cannot be passed through",
                )
            known = self.authorizer.remember(upstream.origin, challenge)
        assert known.realm is not None
        self.authorizer.check_realm(known.realm)
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
        login: Login = GATEWAY_LOGIN,
        avoid: str | None = None,
        content_addressed: bool = False,
        exclude: frozenset[str] = frozenset(),
        last_resort: bool = False,
    ) -> Opened:
        """Send a request to ``path`` on the first upstream that answers; the caller closes ``.response``.

        ``headers`` must have lowercase names. ``login`` is what the route's authorizer
        admitted of the client's request (``Authorizer.admit``). ``avoid`` (a blob digest)
        skips upstreams that served it wrong lately, unless no other is left.
        ``content_addressed`` (a blob, a manifest by digest): the route's mirrors are asked
        first, and any of their answers but a success passes on to the next one.
        ``exclude`` (upstream and mirror URLs) are not asked at all: the sources a broken blob
        body is passed over on (``blobs/resume.Breaks``). ``last_resort`` (the rest of a body the
        client is part-way through): when every upstream left rests in its breaker, they are asked
        anyway, since the transfer ends otherwise; a resting breaker says an upstream failed lately,
        not that it fails now (found by the soak: a mirror avoided, A passed over, B resting: cut).
        """
        candidates = [u for u in self.route.upstreams if u.url not in exclude]
        upstreams = [u for u in candidates if self.breaker.available(u.url)] or (candidates if last_resort else [])
        if avoid is not None and len(upstreams) > 1:
            upstreams = [u for u in upstreams if not self._avoiding(u, avoid)] or upstreams
        if content_addressed and self.route.mirrors:
            # Before the breaker's verdict on the upstreams: content a mirror has is served even
            # while every upstream rests (that is when mirrors matter most).
            opened = await self._from_mirrors(
                method, path, query, headers, repository, follow_redirects, avoid, exclude
            )
            if opened is not None:
                return opened
        if not upstreams and exclude and all(u.url in exclude for u in self.route.upstreams):
            raise RegistryError(
                502, UNAVAILABLE, f"every upstream of {self.route.name} failed to send this content whole"
            )
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
                    upstream, method, path, query, headers, repository, follow_redirects, login
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
            elif opened.response.status_code == 429 and not last:
                # Rate limited, with every account of the route tried (_send_authorized): the next
                # upstream (a mirror of Docker Hub, say) before the client hears of it. Not a failure.
                await opened.response.aclose()
                continue
            else:
                self.breaker.success(upstream.url)
            return opened
        assert failure is not None
        raise failure

    async def _from_mirrors(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        repository: str,
        follow_redirects: bool,
        avoid: str | None,
        exclude: frozenset[str] = frozenset(),
    ) -> Opened | None:
        """The first mirror that has the content, or None. Mirrors are asked anonymously (never
        with the route's credentials or a client's token) and their bytes are checked by digest."""
        refusal = f"refused:{repository}"
        for mirror in self.route.mirrors:
            if mirror.url in exclude or not self.breaker.available(mirror.url) or self._avoiding(mirror, refusal):
                continue
            if avoid is not None and self._avoiding(mirror, avoid):
                continue
            try:
                opened = await self._open_on(
                    mirror, method, path, query, headers, repository, follow_redirects, GATEWAY_LOGIN
                )
            except RegistryError as exc:
                if exc.retryable:
                    self.breaker.failure(mirror.url)
                continue  # a broken mirror never fails the request: the registry is there
            status = opened.response.status_code
            if status in (200, 206, 304) or (status in REDIRECT_STATUSES and not follow_redirects):
                self.breaker.success(mirror.url)
                return opened
            if status >= 500:
                self.breaker.failure(mirror.url)
            elif status in (401, 403):
                # The mirror does not serve this repository to the gateway (a private image): not
                # asked for it again for a while, so each of its layers does not cost a refusal
                # and a fresh anonymous token.
                self.avoid(mirror, refusal, MIRROR_REFUSAL_SECONDS)
            await opened.response.aclose()  # a 404 (not mirrored) or a refusal: ask the next
        return None

    async def _open_on(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        repository: str,
        follow_redirects: bool,
        login: Login,
    ) -> Opened:
        url = upstream.url + path + (f"?{query}" if query else "")
        for hop in range(self.max_redirects + 1):
            resp, sent = await self._send_authorized(method, url, headers, repository, login)
            location = resp.headers.get("location")
            if not (follow_redirects and resp.status_code in REDIRECT_STATUSES and location):
                credential = self.authorizer.identity_of(sent)
                return Opened(response=resp, url=url, upstream=upstream, redirects=hop, credential=credential)
            await resp.aclose()
            try:
                url = urljoin(url, location)
            except ValueError:
                url = "invalid:"  # refused just below, with the route's name in the message
            check_destination(self.route, url, "redirected")
        metrics.upstream_error(self.route.name, "redirects")
        raise RegistryError(
            502, UNAVAILABLE, f"upstream {self.route.name} redirected more than {self.max_redirects} times"
        )

    def _hop(self, url: str, repository: str) -> Hop:
        origin = origin_of(url)
        if origin in self.authorizer.trusted_origins:
            return Hop(origin, repository)
        # A redirect target with a token realm of its own scopes tokens by its own path.
        return Hop(origin, repository_in_path(httpx.URL(url).path) or repository)

    async def _send_authorized(
        self, method: str, url: str, headers: Mapping[str, str], repository: str, login: Login
    ) -> tuple[httpx.Response, str | None]:
        """One hop: what the authorizer says this origin wants up front, one answer to a 401, and on a
        429 the next account of the route's pool while one has budget. Returns the Authorization sent."""
        with self._failures(url):
            hop = self._hop(url, repository)
        sent = await self.authorizer.up_front(login, hop)
        resp = await self._send(method, url, headers, sent)
        if resp.status_code == 401:
            answer = await self.authorizer.answer(login, hop, resp.headers.get_list("www-authenticate"), sent)
            if answer is not None:
                await resp.aclose()
                sent = answer
                resp = await self._send(method, url, headers, sent)
        while resp.status_code == 429:
            self.authorizer.note_rate_limited(login, hop, sent, resp.headers.get("retry-after"))
            following = await self.authorizer.rate_limited(login, hop, sent, resp.headers.get("retry-after"))
            if following is None or following == sent:
                break
            await resp.aclose()
            sent = following
            resp = await self._send(method, url, headers, sent)
        return resp, sent

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], authorization: str | None = None
    ) -> httpx.Response:
        fields = dict(headers)
        if authorization is not None:
            fields["authorization"] = authorization

        def attributes() -> dict[str, tracing.AttributeValue]:
            return {"http.request.method": method, "url.full": tracing.safe_url(url), "registry.route": self.route.name}

        with tracing.span("upstream request", attributes) as current, self._failures(url):
            response = await send(self.transport, method, url, fields, self.timeouts)
            tracing.set_attributes(current, {"http.response.status_code": response.status_code})
            return response

    @contextlib.contextmanager
    def _failures(self, url: str) -> Iterator[None]:
        """Failures of an exchange with ``url``: mapped (``upstream_errors.py``) and counted for the route."""
        try:
            with upstream_errors(REQUEST, f"upstream {self.route.name}", f" ({_host_of(url)})"):
                yield
        except RegistryError as exc:
            if exc.reason is not None:
                metrics.upstream_error(self.route.name, exc.reason)
            raise


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""
