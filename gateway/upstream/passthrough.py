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
3. ``POST /auth/token``, the OAuth2 form (distribution's docs/spec/auth/oauth.md, "Docker
   Registry v2 authentication using OAuth2"; RFC 6749 4.3 and 6), is relayed the same way:
   containerd sends it when it has credentials. Its ``scope`` (space-delimited, RFC 6749
   3.3) is rewritten as above, its ``service`` replaced by the upstream's, the parameters
   oauth.md names (``grant_type`` ``password`` with ``username`` and ``password``, or
   ``refresh_token`` with ``refresh_token``; ``client_id``, ``access_type``) are forwarded
   as sent, and the form is POSTed to the upstream's realm. The answer, ``refresh_token``
   included, is returned as is and never cached (RFC 6749 5.1: ``no-store``). An upstream
   that declines the POST itself (400, 404, 405) is answered with its status, so the
   client falls back to ``GET`` as it would against the upstream (containerd does).
4. The client's ``Authorization: Bearer`` is forwarded to the upstream's origin (only;
   never to a CDN) on every request; an upstream 401 becomes the gateway's challenge.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode

import httpx

from gateway.auth.grants import Grants
from gateway.auth.tokens import Params, token_request
from gateway.http.asgi import JSON_CONTENT_TYPE, Receive, Scope, Send, header_value, send_body, send_error
from gateway.http.errors import TOOMANYREQUESTS, UNAUTHORIZED, UNAVAILABLE, UNSUPPORTED, RegistryError
from gateway.observe.log import record_of
from gateway.routing.reference import TOKEN_PATH
from gateway.routing.routes import RequestFacts, Route, RouteTable, Target
from gateway.upstream.client import UpstreamClient

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"  # RFC 6749 4.3.2, 6
MAX_FORM_BODY = 64 << 10  # a token form is a few hundred bytes; a cloud password a few KiB
MAX_FORM_FIELDS = 64
# RFC 6749 4.3.2 (password) and 6 (refresh_token); oauth.md: "authorization_code" is reserved.
GRANT_TYPES = ("password", "refresh_token")
# oauth.md's parameters besides scope and service, forwarded as sent; any other is dropped.
# The secrets are forwarded whole (the body cap bounds them); the others are capped like the GET form's.
OAUTH_SECRETS = ("grant_type", "username", "password", "refresh_token")
OAUTH_OTHERS = ("client_id", "access_type")
# RFC 6749 5.2: the grant or the client was refused, i.e. the credentials were.
REFUSED_GRANTS = ("invalid_grant", "invalid_client", "unauthorized_client")
# RFC 6749 5.1: a token answer (a refresh_token too) is not to be stored by anyone on the way.
NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]


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
    """The gateway's token endpoint for passthrough routes: the GET form and the OAuth2 POST form."""

    def __init__(self, table: RouteTable, clients: Mapping[str, UpstreamClient], grants: Grants | None = None) -> None:
        self.table = table
        self.clients = clients
        # The gateway's own tokens on hosts several routes share (``grants.py``); None: not used.
        self.grants = grants
        # The form names its route (``service``), so it is read within the longest token deadline.
        self._form_deadline = max((c.timeouts.token for c in clients.values()), default=30.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = record_of(scope)
        record.kind = "token"
        try:
            await self._handle(scope, receive, send)
        except RegistryError as exc:
            record.error = exc.code
            await send_error(send, exc, head=scope["method"] == "HEAD")

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "POST":
            params = await self._read_form(scope, receive)
        elif method == "GET":
            params = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        else:
            raise RegistryError(
                405, UNSUPPORTED, "the token endpoint answers GET and POST", headers={"Allow": "GET, POST"}
            )
        host = header_value(scope, b"host")
        if self.grants is not None and self.table.is_shared_host(host):
            await self._shared_host(scope, send, method, params, host)
            return
        route = self._route_for(scope, params)
        record_of(scope).route = route.name
        scopes = [
            r for k, v in params if k == "scope" for one in v.split(" ") if (r := rewrite_scope(self.table, route, one))
        ]
        body = await self._ask_upstream(scope, method, route, params, scopes)
        await send_body(send, 200, [JSON_CONTENT_TYPE, *NO_STORE], body)

    async def _ask_upstream(
        self, scope: Scope, method: str, route: Route, params: list[tuple[str, str]], scopes: list[str]
    ) -> bytes:
        """The request relayed to ``route``'s upstream realm with the client's credentials; its 200 body."""
        client = self.clients[route.name]
        challenge = await client.upstream_challenge()
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        authorization = header_value(scope, b"authorization")
        if Grants.looks_like_grant(authorization):
            authorization = None  # the gateway's own token is no credential of any upstream: never sent on
        if authorization is not None:
            # RFC 6749 2.3.1: a POST may carry client credentials here too; relayed like the GET form's.
            if not authorization.isascii():
                raise RegistryError(401, UNAUTHORIZED, "malformed Authorization header")
            headers["authorization"] = authorization
        assert challenge.realm is not None
        if method == "POST":
            form = self._upstream_form(challenge.service, params, scopes)
            headers["content-type"] = FORM_CONTENT_TYPE
            resp, body = await token_request(
                client.transport,
                challenge.realm,
                [],
                headers,
                timeouts=client.timeouts,
                method="POST",
                content=urlencode(form).encode("ascii"),
            )
        else:
            forward = self._upstream_params(challenge.service, params, scopes)
            resp, body = await token_request(
                client.transport, challenge.realm, forward, headers, timeouts=client.timeouts
            )
        if resp.status_code == 200:
            return body
        raise self._refusal(route, resp, body, oauth=method == "POST")

    async def _shared_host(
        self, scope: Scope, send: Send, method: str, params: list[tuple[str, str]], host: str | None
    ) -> None:
        """A token request on a host several routes share: answered with a grant (``grants.py``).

        Each scope's route is worked out from its repository name as the relay would (prefix,
        ``ns`` named by ``service``, default route, ``library/``). The scopes of one passthrough
        route are relayed to its upstream with the client's credentials and the upstream's token
        goes inside the grant; scopes of other routes need no upstream token: the grant alone
        admits them. A request with no scope and credentials (``docker login``) is checked at the
        login route (``login_route``)."""
        assert self.grants is not None
        service = next((v for k, v in params if k == "service"), "")
        ns = service if self.table.by_name(service) is not None else None
        targets: list[Target] = []
        for key, value in params:
            if key != "scope":
                continue
            for one in value.split(" "):
                kind, _, rest = one.partition(":")
                name, sep, _actions = rest.rpartition(":")
                if kind != "repository" or not sep or not name:
                    continue  # registry:catalog:* and the like: a mirror grants none
                try:
                    targets.append(self.table.resolve(RequestFacts(host, name, ns)))
                except RegistryError:
                    continue  # no route, or the policy refuses it: the request itself will say so
        relayed = next((t.route for t in targets if t.route.auth.uses_client_logins), None)
        authorization = header_value(scope, b"authorization")
        # Credentials in the header (GET, or RFC 6749 2.3.1) or in the OAuth2 form (4.3.2, 6).
        credentials = (authorization is not None and not Grants.looks_like_grant(authorization)) or (
            method == "POST" and any(k in ("password", "refresh_token") for k, _ in params)
        )
        if relayed is None and not targets and credentials:
            relayed = self.table.login_route  # a login: check the credentials where they belong
        doc: dict[str, object] = {}
        if relayed is not None:
            record_of(scope).route = relayed.name
            scopes = [f"repository:{t.upstream_name}:pull" for t in targets if t.route is relayed]
            body = await self._ask_upstream(scope, method, relayed, params, list(dict.fromkeys(scopes)))
            doc = _json_object(body)
        routes = [relayed.name] if relayed is not None else []
        routes += [t.route.name for t in targets if not t.route.auth.uses_client_logins]
        upstream_token = doc.get("token") or doc.get("access_token")
        if relayed is not None and not isinstance(upstream_token, str):
            raise RegistryError(502, UNAVAILABLE, f"the token endpoint of {relayed.name} answered without a token")
        expires_in = doc.get("expires_in")
        grant, ttl = self.grants.mint(
            routes,
            upstream_token if isinstance(upstream_token, str) else None,
            expires_in if isinstance(expires_in, int) and not isinstance(expires_in, bool) else None,
        )
        answer: dict[str, object] = {"token": grant, "access_token": grant, "expires_in": ttl}
        if isinstance(doc.get("issued_at"), str):
            answer["issued_at"] = doc["issued_at"]
        if isinstance(doc.get("refresh_token"), str):
            answer["refresh_token"] = doc["refresh_token"]  # the upstream's: refreshed through us, at it
        await send_body(send, 200, [JSON_CONTENT_TYPE, *NO_STORE], json.dumps(answer).encode())

    @staticmethod
    def _refusal(route: Route, resp: httpx.Response, body: bytes, *, oauth: bool) -> RegistryError:
        """The registry error for an upstream token endpoint's answer other than 200."""
        status = resp.status_code
        if status == 429:
            retry = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
            return RegistryError(
                429, TOOMANYREQUESTS, f"the token endpoint of {route.name} is rate limiting", headers=retry
            )
        if status in (401, 403) or (oauth and status == 400 and _oauth_error(body) in REFUSED_GRANTS):
            return RegistryError(401, UNAUTHORIZED, f"{route.name} refused these credentials")
        if oauth and status in (400, 404, 405):
            # The upstream declines the OAuth2 form itself (GCR answers 404, ACR 400): its status
            # is kept, so that the client falls back to the GET form as it would without the gateway.
            return RegistryError(
                status,
                UNSUPPORTED,
                f"the token endpoint of {route.name} declined the OAuth2 token request ({status})",
                headers={"Allow": "GET"} if status == 405 else None,
            )
        return RegistryError(502, UNAVAILABLE, f"the token endpoint of {route.name} answered {status}")

    async def _read_form(self, scope: Scope, receive: Receive) -> list[tuple[str, str]]:
        """The OAuth2 form of a POST (RFC 6749 4.3.2, 6): capped, within the token deadline."""
        content_type = (header_value(scope, b"content-type") or "").partition(";")[0].strip().lower()
        if content_type != FORM_CONTENT_TYPE:
            raise RegistryError(415, UNSUPPORTED, f"the token endpoint takes a POST of {FORM_CONTENT_TYPE}")
        declared = header_value(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_FORM_BODY:
            raise RegistryError(413, UNSUPPORTED, f"the token request is larger than {MAX_FORM_BODY} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._form_deadline):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise RegistryError(400, UNSUPPORTED, "the client went away while sending its token request")
                    part: bytes = message.get("body", b"")
                    size += len(part)
                    if size > MAX_FORM_BODY:
                        raise RegistryError(413, UNSUPPORTED, f"the token request is larger than {MAX_FORM_BODY} bytes")
                    chunks.append(part)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise RegistryError(
                408, UNSUPPORTED, f"the token request did not arrive within {self._form_deadline:g} s"
            ) from None
        try:
            # A form is ASCII, its escapes UTF-8 (WHATWG URL "application/x-www-form-urlencoded").
            text = b"".join(chunks).decode("ascii")
            return parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_FIELDS)
        except ValueError:  # UnicodeDecodeError too; the message could quote a secret: never shown
            raise RegistryError(400, UNSUPPORTED, "the token request is not a valid form") from None

    def _route_for(self, scope: Scope, params: list[tuple[str, str]]) -> Route:
        # service is what the gateway's own challenge named: the route, whatever the Host.
        service = next((v for k, v in params if k == "service"), "")
        route = self.table.route_for_token(service, header_value(scope, b"host"))
        if route is None or not route.auth.uses_client_logins:
            raise RegistryError(404, UNSUPPORTED, f"no route passes logins through for service {service[:100]!r}")
        return route

    @staticmethod
    def _upstream_params(service: str | None, params: list[tuple[str, str]], scopes: list[str]) -> Params:
        forward: Params = []
        if service:
            forward.append(("service", service))
        forward.extend(("scope", one) for one in scopes)
        for key, value in params:
            if key in ("account", "offline_token", "client_id"):
                forward.append((key, value[:256]))
        return forward

    @staticmethod
    def _upstream_form(service: str | None, params: list[tuple[str, str]], scopes: list[str]) -> list[tuple[str, str]]:
        """The OAuth2 form for the upstream's realm (oauth.md "Getting a token"; RFC 6749 4.3.2, 6).

        ``scope``: every requested scope rewritten, one space-delimited value (RFC 6749 3.3);
        ``service``: the upstream's. Raises 400 when ``grant_type`` is missing or not one of
        oauth.md's, or a parameter is repeated (RFC 6749 3.2: "parameters MUST NOT be included
        more than once").
        """
        seen: set[str] = set()
        form: list[tuple[str, str]] = []
        for key, value in params:
            if key in OAUTH_SECRETS or key in OAUTH_OTHERS:
                if key in seen:
                    raise RegistryError(400, UNSUPPORTED, f"the token request repeats {key}")
                seen.add(key)
                form.append((key, value if key in OAUTH_SECRETS else value[:256]))
        grant_type = next((v for k, v in form if k == "grant_type"), None)
        if grant_type not in GRANT_TYPES:
            raise RegistryError(
                400, UNSUPPORTED, "the token request needs grant_type password or refresh_token (RFC 6749 4.3.2, 6)"
            )
        if service:
            form.append(("service", service))
        if scopes:
            form.append(("scope", " ".join(dict.fromkeys(scopes))))
        return form


def _json_object(body: bytes) -> dict[str, object]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _oauth_error(body: bytes) -> str | None:
    """The ``error`` code of an OAuth2 error answer (RFC 6749 5.2), if ``body`` is one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) else None
