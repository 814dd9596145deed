"""The gateway's own bearer tokens, for hosts that several routes share (prefix, ``ns``, default route).

Docker, containerd and containers/image learn from the ``/v2/`` ping whether to log in, and
they log in once per host. On a host no host pattern claims, one host speaks for every route
reachable by prefix and for the default route, and some of them may pass logins through
(``auth = "passthrough"``) while others use the gateway's own credentials. There the gateway's
token endpoint answers every token request with a token of its own, a *grant*:

- it names the routes it is good for (those of the scopes it was asked for), and the relay
  accepts it only on them: a grant for one route is refused on another (a fresh challenge);
- for a passthrough route it carries the token that route's upstream issued for the client's
  own credentials, and the relay forwards that inner token only to that route's upstream;
- it expires with the upstream's token (or after ``DEFAULT_TTL`` when there is none).

A grant is ``rg1.<payload>.<mac>``: base64url JSON ``{"r": [routes], "u": upstream token or
null, "e": expiry (unix seconds)}`` and an HMAC-SHA256 over it with the gateway's secret
(``GATEWAY_TOKEN_SECRET``, the same for every worker and replica; RFC 2104). It is signed, not
encrypted: the inner token is the client's own, and the client holds it anyway. Nothing
about a grant is stored; any worker or replica that has the secret can check one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PREFIX = "rg1."
DEFAULT_TTL = 300  # seconds: a grant without an upstream token (distribution's default token lifetime)
MAX_TTL = 3600  # an upstream's expires_in is believed up to this
_MAX_GRANT = 16 << 10  # a header this long is no grant of ours


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid grant says: the routes it is good for, and the upstream token it carries."""

    routes: tuple[str, ...]
    upstream_token: str | None
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Grants:
    """Mints and checks grants with one secret; ``clock`` is injectable for tests."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret = secret
        self._clock = clock

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest())

    def mint(self, routes: Sequence[str], upstream_token: str | None, expires_in: int | None) -> tuple[str, int]:
        """A grant for ``routes`` and its lifetime in seconds."""
        ttl = DEFAULT_TTL if expires_in is None else max(1, min(expires_in, MAX_TTL))
        body = {"r": list(dict.fromkeys(routes)), "u": upstream_token, "e": int(self._clock()) + ttl}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{self._mac(payload)}", ttl

    def read(self, authorization: str | None) -> Grant | None:
        """The grant in an ``Authorization: Bearer`` value, if it is a valid one of ours (else None)."""
        if authorization is None or len(authorization) > _MAX_GRANT:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.startswith(PREFIX):
            return None
        payload, dot, mac = token[len(PREFIX) :].partition(".")
        if not dot or not hmac.compare_digest(mac.encode("ascii", "replace"), self._mac(payload).encode()):
            return None
        try:
            body = json.loads(_unb64(payload))
            routes = tuple(str(r) for r in body["r"])
            upstream = body["u"]
            expires = int(body["e"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if expires <= self._clock() or (upstream is not None and not isinstance(upstream, str)):
            return None
        return Grant(routes, upstream, expires)

    @staticmethod
    def looks_like_grant(authorization: str | None) -> bool:
        """Whether the client sent something in the shape of a grant (valid or not)."""
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and token.startswith(PREFIX)
