"""Upstream tokens: fetching them from a token endpoint, and caching them.

References:
- distribution token spec (docs/spec/auth/token.md): ``GET <realm>?service=..&scope=..``
  (``scope`` may repeat), answer ``{"token"|"access_token", "expires_in", "issued_at"}``;
  ``expires_in`` defaults to 60 seconds.
- Docker Hub accepts Basic credentials (username + password or access token) at its
  token endpoint; the registry itself only ever sees the Bearer token.

The cache is keyed by everything that changes what a token grants: realm, service,
the scope set and the credential identity. Concurrent requests for one key share one
fetch (a task, so that the first requester's disconnect does not cancel it for the
others). The clocks are injectable so expiry is testable without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from gateway.http.errors import TOOMANYREQUESTS, UNAUTHORIZED, UNAVAILABLE, RegistryError
from gateway.http.util import read_capped
from gateway.net.egress import send
from gateway.net.upstream_errors import TOKEN, upstream_errors
from gateway.observe import metrics, tracing
from gateway.routing.routes import Credentials
from gateway.settings import Timeouts

DEFAULT_EXPIRES_IN = 60.0  # token spec: "defaults to 60 seconds"
MAX_TOKEN_BODY = 1 << 20  # real token answers are a few KiB; a bigger one is broken or hostile


@dataclass(frozen=True, slots=True)
class TokenKey:
    realm: str
    service: str | None
    scopes: tuple[str, ...]
    identity: str | None  # Credentials.identity, or None for anonymous tokens


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    lifetime: float  # seconds the token stays valid from the moment it was received


def token_lifetime(expires_in: object, issued_at: object, wall_now: float) -> float:
    """Seconds a token answer stays valid, from ``expires_in`` and ``issued_at``.

    ``issued_at`` only ever shortens the lifetime (a token that sat in a queue), and is
    ignored when it would make the token already expired: that is clock skew between
    us and the token server, and trusting it would refetch on every request.
    """
    lifetime = DEFAULT_EXPIRES_IN
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        lifetime = float(expires_in)
    if isinstance(issued_at, str):
        try:
            issued = datetime.fromisoformat(issued_at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return lifetime
        remaining = issued + lifetime - wall_now
        if 0 < remaining < lifetime:
            return remaining
    return lifetime


def parse_token_answer(body: bytes, wall_now: float) -> Token:
    """Read a token endpoint's JSON answer; RegistryError 502 when it is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError(502, UNAVAILABLE, "the upstream token endpoint answered with invalid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryError(
            502, UNAVAILABLE, "the upstream token endpoint answered with a JSON value that is not an object"
        )
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise RegistryError(502, UNAVAILABLE, "the upstream token endpoint answered without a token")
    return Token(value=value, lifetime=token_lifetime(doc.get("expires_in"), doc.get("issued_at"), wall_now))


class TokenCache:
    """Tokens by key until they expire, with one fetch in flight per key.

    ``refresh_margin`` retires a token a little before its end, so that a request
    never leaves with a token that expires on the way.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
        refresh_margin: float = 5.0,
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._refresh_margin = refresh_margin
        self._tokens: OrderedDict[TokenKey, tuple[str, float]] = OrderedDict()
        self._inflight: dict[TokenKey, asyncio.Task[Token]] = {}
        self.hits = 0
        self.fetches = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, key: TokenKey) -> str | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if self._clock() >= expires_at:
            del self._tokens[key]
            return None
        return value

    def invalidate(self, key: TokenKey, value: str) -> None:
        """Forget ``value`` for ``key`` (the upstream refused it), unless a newer token replaced it."""
        entry = self._tokens.get(key)
        if entry is not None and entry[0] == value:
            del self._tokens[key]

    async def obtain(self, key: TokenKey, fetch: Callable[[], Awaitable[Token]]) -> str:
        """A valid token for ``key``: cached, or fetched once however many callers wait."""
        cached = self.get(key)
        if cached is not None:
            self.hits += 1
            metrics.TOKEN_CACHE_HITS.inc()
            return cached
        task = self._inflight.get(key)
        if task is None:
            self.fetches += 1
            task = asyncio.ensure_future(self._fetch(key, fetch))
            self._inflight[key] = task
        # shield: a caller that goes away must not cancel the fetch others wait for.
        token = await asyncio.shield(task)
        return token.value

    async def _fetch(self, key: TokenKey, fetch: Callable[[], Awaitable[Token]]) -> Token:
        try:
            token = await fetch()
        except BaseException:
            metrics.TOKEN_FETCHES.labels("error").inc()
            raise
        finally:
            self._inflight.pop(key, None)
        metrics.TOKEN_FETCHES.labels("ok").inc()
        margin = min(self._refresh_margin, token.lifetime / 10)
        self._store(key, token.value, self._clock() + token.lifetime - margin)
        return token

    def _store(self, key: TokenKey, value: str, expires_at: float) -> None:
        self._tokens[key] = (value, expires_at)
        self._tokens.move_to_end(key)
        if len(self._tokens) > self._max_entries:
            now = self._clock()
            for stale in [k for k, (_, exp) in self._tokens.items() if exp <= now]:
                del self._tokens[stale]
            while len(self._tokens) > self._max_entries:
                self._tokens.popitem(last=False)


class CredentialsRefused(RegistryError):
    """The token endpoint refused the gateway's configured credentials (401/403): a 502 UNAUTHORIZED.

    Its own type so that credentials that can be renewed (a credential helper's) are asked
    again; every other caller sees the RegistryError it always saw.
    """


def basic_authorization(credentials: Credentials) -> str:
    if credentials.helper is not None:
        # Never an empty Basic login: a helper's account is resolved first (credential_helper.py).
        raise RegistryError(
            502, UNAVAILABLE, f"the credentials of {credentials.identity} come from a credential helper not yet asked"
        )
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


Params = list[tuple[str, str | int | float | bool | None]]


async def token_request(
    transport: httpx.AsyncBaseTransport,
    realm: str,
    params: Params,
    headers: dict[str, str],
    *,
    timeouts: Timeouts,
    method: str = "GET",
    content: bytes | None = None,
) -> tuple[httpx.Response, bytes]:
    """GET a token realm (or POST ``content`` to it: the OAuth2 form, ``passthrough.py``); its answer and
    whole body, all within ``timeouts.token`` seconds.

    The deadline covers the body too: a realm that trickles its answer byte by byte (each
    read inside the per-read timeout) still cannot hold a request forever. The body is
    capped at MAX_TOKEN_BODY. Every failure becomes a RegistryError naming the realm;
    the caller judges the status.
    """
    # upstream_errors outside the deadline: asyncio.timeout raises TimeoutError as it exits.
    with upstream_errors(TOKEN, f"the upstream token endpoint {realm}", f"{timeouts.token:g}"):
        async with asyncio.timeout(timeouts.token):
            url = httpx.URL(realm).copy_merge_params(params)
            resp = await send(transport, method, url, headers, timeouts, content=content)
            try:
                body = await read_capped(resp, MAX_TOKEN_BODY)
            finally:
                await resp.aclose()
    if body is None:
        raise RegistryError(502, UNAVAILABLE, f"the upstream token endpoint {realm} sent an oversized answer")
    return resp, body


async def fetch_token(
    transport: httpx.AsyncBaseTransport,
    key: TokenKey,
    credentials: Credentials | None,
    *,
    timeouts: Timeouts,
    wall_clock: Callable[[], float] = time.time,
) -> Token:
    """One token for ``key``: asked with the route's credentials, or anonymously."""
    params: Params = []
    if key.service:
        params.append(("service", key.service))
    params.extend(("scope", scope) for scope in key.scopes)
    # identity: the answer is read and capped here, never inflated by a decoder first.
    headers = {"accept": "application/json", "accept-encoding": "identity"}
    if credentials is not None:
        headers["authorization"] = basic_authorization(credentials)
        params.append(("account", credentials.username))
    realm = key.realm

    def attributes() -> dict[str, tracing.AttributeValue]:
        return {
            "url.full": tracing.safe_url(realm),
            "registry.token.service": key.service or "",
            "registry.token.scopes": " ".join(key.scopes),
            "registry.token.with_credentials": credentials is not None,
        }

    with tracing.span("upstream token", attributes) as current:
        resp, body = await token_request(transport, realm, params, headers, timeouts=timeouts)
        tracing.set_attributes(current, {"http.response.status_code": resp.status_code})
    if resp.status_code == 200:
        return parse_token_answer(body, wall_clock())
    if resp.status_code in (401, 403):
        if credentials is not None:
            # The client can do nothing about the gateway's own credentials: a gateway fault.
            raise CredentialsRefused(
                502,
                UNAUTHORIZED,
                f"the upstream token endpoint {realm} refused the gateway's configured credentials "
                f"({resp.status_code})",
            )
        raise RegistryError(401, UNAUTHORIZED, "authentication required by the upstream registry")
    if resp.status_code == 429:
        headers_out = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
        raise RegistryError(
            429, TOOMANYREQUESTS, f"the upstream token endpoint {realm} is rate limiting", headers=headers_out
        )
    raise RegistryError(502, UNAVAILABLE, f"the upstream token endpoint {realm} answered {resp.status_code}")
