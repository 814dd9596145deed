"""Logins passed through (``auth = "passthrough"``): the client's own upstream credentials.

A user runs ``docker login ghcr.example.com`` with their ghcr.io credentials and pulls
their private images through the gateway. The gateway never holds those credentials
or the tokens they buy; it only translates names:

1. Requests without a token (``/v2/`` included: Docker only logs in when the ping
   challenges, moby/moby#50896) get the gateway's own challenge::

       Bearer realm="https://ghcr.example.com/auth/token",service="ghcr.io",scope="repository:org/app:pull"

   The realm is absolute and built from the request's scheme and host, which are
   right behind a trusted proxy (``forwarded.py``).
2. ``GET /auth/token`` is relayed to the upstream's own realm (learnt from its
   challenge) with the client's Basic credentials, the upstream's ``service``, and each
   scope rewritten into the upstream's namespace (prefix stripped, ``library/`` added,
   actions reduced to ``pull``: the gateway is read-only). The answer is returned as
   is and never cached, so a token bought with one client's credentials is never
   served to another.
3. The client's ``Authorization: Bearer`` is forwarded to the upstream's origin (only;
   never to a CDN) on every request; an upstream 401 becomes the gateway's challenge.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from gateway.asgi import JSON_CONTENT_TYPE, Receive, Scope, Send, header_value, send_body, send_error
from gateway.errors import TOOMANYREQUESTS, UNAUTHORIZED, UNAVAILABLE, UNSUPPORTED, RegistryError
from gateway.log import record_of
from gateway.reference import TOKEN_PATH
from gateway.routes import Route, RouteTable
from gateway.tokens import Params, token_request
from gateway.upstream import UpstreamClient


def realm_for(scope: Scope) -> str:
    host = header_value(scope, b"host") or "localhost"
    return f"{scope.get('scheme', 'http')}://{host}{TOKEN_PATH}"


def challenge_header(scope: Scope, service: str, repository: str | None) -> tuple[bytes, bytes]:
    """The gateway's own challenge: its token endpoint on the host the client used, the route as service."""
    value = f'Bearer realm="{realm_for(scope)}",service="{service}"'
    if repository:
        value += f',scope="repository:{repository}:pull"'
    return (b"www-authenticate", value.encode())


def rewrite_scope(table: RouteTable, route: Route, scope: str) -> str | None:
    """``repository:<client name>:<actions>`` in the client's namespace -> the upstream's, pull only.

    Other resource types (``registry:catalog:*``) are dropped: a mirror grants none.
    """
    kind, sep, rest = scope.partition(":")
    name, sep2, _actions = rest.rpartition(":")
    if kind != "repository" or not sep or not sep2 or not name:
        return None
    return f"repository:{table.target_on(route, name).upstream_name}:pull"


class TokenRelay:
    """The gateway's token endpoint for passthrough routes."""

    def __init__(self, table: RouteTable, clients: Mapping[str, UpstreamClient]) -> None:
        self.table = table
        self.clients = clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = record_of(scope)
        record.kind = "token"
        try:
            await self._handle(scope, send)
        except RegistryError as exc:
            record.error = exc.code
            await send_error(send, exc, head=scope["method"] == "HEAD")

    async def _handle(self, scope: Scope, send: Send) -> None:
        if scope["method"] != "GET":
            raise RegistryError(405, UNSUPPORTED, "the token endpoint answers GET", headers={"Allow": "GET"})
        params = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        route = self._route_for(scope, params)
        record_of(scope).route = route.name
        client = self.clients[route.name]
        challenge = await client.upstream_challenge()
        forward = self._upstream_params(route, challenge.service, params)
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        authorization = header_value(scope, b"authorization")
        if authorization is not None:
            if not authorization.isascii():
                raise RegistryError(401, UNAUTHORIZED, "malformed Authorization header")
            headers["authorization"] = authorization
        assert challenge.realm is not None
        resp, body = await token_request(client.transport, challenge.realm, forward, headers, timeouts=client.timeouts)
        if resp.status_code == 200:
            await send_body(send, 200, [JSON_CONTENT_TYPE, (b"cache-control", b"no-store")], body)
            return
        if resp.status_code == 429:
            retry = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
            raise RegistryError(
                429, TOOMANYREQUESTS, f"the token endpoint of {route.name} is rate limiting", headers=retry
            )
        if resp.status_code in (401, 403):
            raise RegistryError(401, UNAUTHORIZED, f"{route.name} refused these credentials")
        raise RegistryError(502, UNAVAILABLE, f"the token endpoint of {route.name} answered {resp.status_code}")

    def _route_for(self, scope: Scope, params: list[tuple[str, str]]) -> Route:
        # service is what the gateway's own challenge named: the route, whatever the Host.
        service = next((v for k, v in params if k == "service"), "")
        route = self.table.route_for_token(service, header_value(scope, b"host"))
        if route is None or not route.auth.uses_client_logins:
            raise RegistryError(404, UNSUPPORTED, f"no route passes logins through for service {service[:100]!r}")
        return route

    def _upstream_params(self, route: Route, service: str | None, params: list[tuple[str, str]]) -> Params:
        forward: Params = []
        if service:
            forward.append(("service", service))
        for key, value in params:
            if key == "scope":
                for one in value.split(" "):
                    rewritten = rewrite_scope(self.table, route, one)
                    if rewritten is not None:
                        forward.append(("scope", rewritten))
            elif key in ("account", "offline_token", "client_id"):
                forward.append((key, value[:256]))
        return forward
