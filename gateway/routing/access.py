"""Who may use the gateway, and how fast: client authentication and a per-IP rate limit.

Both are off unless configured, and both apply only to the registry API (``/v2/``),
the token relay and the budget status (``/status/budget``); health and metrics stay open
for probes and scrapers.

Authentication accepts either
- HTTP Basic checked against an htpasswd file of bcrypt entries (``htpasswd -B``),
  which is what ``docker login``, ``podman login`` and containerd's credentials send
  after a ``Basic`` challenge; or
- a static bearer token from a file (one per line), for scripts and CI.

bcrypt is slow on purpose (tens of milliseconds); a successful check is remembered
for a few minutes by a hash of the header, and checks run in a thread so one login
never stalls the event loop.

The rate limit is a token bucket per client address (the real client behind a
trusted proxy, see ``forwarded.py``): ``rate`` requests per second on average, up to
``burst`` at once. An IPv6 client is counted per /64, as Docker Hub counts pulls: a
site gets a /64 or more (RFC 6177) and picks addresses in it at will (RFC 8981), so a
per-address bucket would be one per temporary address. It is per worker process; with
N workers the effective limit is up to N times higher, which the docs say.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import bcrypt

from gateway.http.asgi import ASGIApp, Receive, Scope, Send, header_value, send_error
from gateway.http.errors import TOOMANYREQUESTS, UNAUTHORIZED, ConfigError, RegistryError
from gateway.observe.log import record_of
from gateway.routing.reference import BUDGET_STATUS_PATH, is_registry_path

REALM = "registry-gateway"
_CACHE_SECONDS = 300.0
_CACHE_ENTRIES = 10_000


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class ClientAuth:
    """Credentials the gateway accepts from its own clients."""

    def __init__(self, htpasswd: Path | None, tokens_file: Path | None) -> None:
        self.users: dict[str, bytes] = {}
        self.tokens: list[bytes] = []
        if htpasswd is not None:
            for number, line in enumerate(_read_lines(htpasswd, "htpasswd file"), start=1):
                user, sep, hashed = line.partition(":")
                if not sep or not user or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                    raise ConfigError(f"{htpasswd}: line {number}: not a 'user:bcrypt-hash' entry (use htpasswd -B)")
                self.users[user] = hashed.encode()
        if tokens_file is not None:
            self.tokens = [t.encode() for t in _read_lines(tokens_file, "tokens file")]
            if any(len(t) < 16 for t in self.tokens):
                raise ConfigError(f"{tokens_file}: every token needs at least 16 characters")
        if not self.users and not self.tokens:
            raise ConfigError("client authentication is configured but lists no user and no token")
        self._verified: OrderedDict[bytes, float] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> str | None:
        """The client's identity, or None when the header does not prove one."""
        if not authorization:
            return None
        scheme, _, credential = authorization.partition(" ")
        scheme = scheme.lower()
        credential = credential.strip()
        if scheme == "bearer" and self.tokens:
            given = credential.encode()
            if any(hmac.compare_digest(given, token) for token in self.tokens):
                return "token:" + hashlib.sha256(given).hexdigest()[:12]
            return None
        if scheme != "basic" or not self.users:
            return None
        try:
            user, sep, password = base64.b64decode(credential, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # ValueError: non-ASCII input; UnicodeDecodeError is one too
            return None
        hashed = self.users.get(user)
        if not sep or hashed is None:
            return None
        key = hashlib.sha256(authorization.encode()).digest()
        now = time.monotonic()
        expires = self._verified.get(key)
        if expires is not None and expires > now:
            return user
        if not await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed):
            return None
        self._verified[key] = now + _CACHE_SECONDS
        if len(self._verified) > _CACHE_ENTRIES:
            self._verified.popitem(last=False)
        return user


@functools.lru_cache(maxsize=4096)
def rate_key(client: str) -> str:
    """The rate-limit bucket of a client address: an IPv4 address itself, an IPv6 one's /64.

    An IPv4-mapped address (``::ffff:a.b.c.d``) is its IPv4 address. Anything that is not
    an address (a ``unix:`` peer, an odd X-Forwarded-For entry) is its own key. Cached: the
    same clients come back, and the request path stays a dictionary look-up.
    """
    if ":" not in client:
        return client  # IPv4 (or not an address): no parse
    try:
        address = ipaddress.IPv6Address(client)  # a "%scope" suffix is accepted and ignored by int()
    except ValueError:
        return client
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


class RateLimiter:
    """A token bucket per key; ``take`` says how long to wait (0: go ahead)."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)  # the least recently seen client
        return wait


class AccessControl:
    """ASGI middleware: rate limit first (cheap), then authentication."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter | None, auth: ClientAuth | None) -> None:
        self.app = app
        self.limiter = limiter
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (is_registry_path(path) or path == BUDGET_STATUS_PATH):
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if self.limiter is not None:
            client = scope.get("client")
            wait = self.limiter.take(rate_key(client[0]) if client else "-")
            if wait > 0:
                record_of(scope).error = TOOMANYREQUESTS
                limited = RegistryError(
                    429,
                    TOOMANYREQUESTS,
                    "too many requests from this address; slow down",
                    headers={"Retry-After": str(math.ceil(wait))},
                )
                await send_error(send, limited, head=head)
                return
        if self.auth is not None:
            user = await self.auth.authenticate(header_value(scope, b"authorization"))
            if user is None:
                record_of(scope).error = UNAUTHORIZED
                refused = RegistryError(
                    401,
                    UNAUTHORIZED,
                    "authentication required: log in to this gateway",
                    headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
                )
                await send_error(send, refused, head=head)
                return
            record_of(scope).user = user
        await self.app(scope, receive, send)
