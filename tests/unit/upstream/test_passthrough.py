"""Logins passed through: the gateway's challenge, the token relay, the client's token upstream."""

from __future__ import annotations

import asyncio
import base64
import json
from urllib.parse import parse_qsl

import httpx
import pytest

from gateway.http.asgi import Scope
from gateway.http.errors import ConfigError, RegistryError
from gateway.routing.routes import RouteTable
from gateway.routing.routes_file import parse_routes
from gateway.upstream.passthrough import MAX_FORM_BODY, TokenRelay
from tests.registry_json import registry_errors
from tests.unit.fake_registry import (
    BLOB_DIGEST,
    CDN,
    MANIFEST,
    REALM,
    REGISTRY,
    SERVICE,
    FakeRegistry,
    registry_error,
    response,
)

# --- passthrough logins -----------------------------------------------------------------------

PASS = {"name": "ghcr.io", "upstream": REGISTRY, "hosts": ["ghcr.*"], "auth": "passthrough"}


def user_registry() -> FakeRegistry:
    """Tokens only for bob:pw; anonymous tokens are refused, like a private repository."""
    fake = FakeRegistry()

    def tokens(request):
        good = "Basic " + base64.b64encode(b"bob:pw").decode()
        if str(request.url).startswith(REALM) and request.headers.get("authorization") != good:
            return registry_error(401, "UNAUTHORIZED", "bad credentials")
        return None

    fake.override = tokens
    return fake


async def test_passthrough_ping_challenges_with_the_gateways_realm(gateway_client):
    fake = user_registry()
    async with gateway_client([PASS], registry=fake) as client:
        resp = await client.get("/v2/", headers={"host": "ghcr.example.com", "x-forwarded-proto": "https"})
        assert resp.status_code == 401
        assert (
            resp.headers["www-authenticate"] == 'Bearer realm="https://ghcr.example.com/auth/token",service="ghcr.io"'
        )
        resp = await client.get("/v2/org/app/manifests/v1", headers={"host": "ghcr.example.com"})
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"].endswith(',scope="repository:org/app:pull"')
    assert not fake.requests  # no upstream request without the client's token


async def test_passthrough_login_and_pull(gateway_client):
    fake = user_registry()
    headers = {"host": "ghcr.example.com"}
    async with gateway_client([PASS], registry=fake) as client:
        login = await client.get(
            "/auth/token",
            params={"service": "ghcr.io", "scope": "repository:org/app:pull,push"},
            headers=headers,
            auth=("bob", "pw"),
        )
        assert login.status_code == 200
        token = login.json()["token"]
        relayed = fake.seen(REALM)[-1]
        assert relayed.url.params["service"] == SERVICE  # the upstream's service, learnt from its challenge
        assert relayed.url.params.get_list("scope") == ["repository:org/app:pull"]  # pull only
        auth = {"authorization": f"Bearer {token}", **headers}
        assert (await client.get("/v2/", headers=auth)).status_code == 200
        resp = await client.get("/v2/org/app/manifests/v1", headers=auth)
        assert resp.status_code == 200
        assert resp.content == MANIFEST
        assert fake.seen(REGISTRY)[-1].headers["authorization"] == f"Bearer {token}"
        resp = await client.get(f"/v2/org/app/blobs/{BLOB_DIGEST}", headers=auth)
        assert resp.status_code == 200
        assert all("authorization" not in r.headers for r in fake.seen(CDN))
        # Wrong credentials: 401, and nothing cached from bob's login is handed out.
        wrong = await client.get("/auth/token", params={"service": "ghcr.io"}, headers=headers, auth=("eve", "guess"))
        assert wrong.status_code == 401
        assert registry_errors(wrong)[0]["code"] == "UNAUTHORIZED"
        anonymous = await client.get("/v2/org/app/manifests/v1", headers=headers)
        assert anonymous.status_code == 401
        stale = await client.get("/v2/org/app/manifests/v1", headers={"authorization": "Bearer not-a-token", **headers})
        assert stale.status_code == 401
        assert "realm=" in stale.headers["www-authenticate"]


async def test_passthrough_scopes_in_path_prefix_mode_are_rewritten(gateway_client):
    fake = user_registry()
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True, "auth": "passthrough"}
    async with gateway_client([route], registry=fake) as client:
        resp = await client.get("/v2/docker.io/nginx/manifests/1", headers={"host": "gw.example.com"})
        assert resp.headers["www-authenticate"].endswith(',scope="repository:docker.io/nginx:pull"')
        login = await client.get(
            "/auth/token",
            params=[
                ("service", "docker.io"),
                ("scope", "repository:docker.io/nginx:pull"),
                ("scope", "repository:redis:pull registry:catalog:*"),
            ],
            auth=("bob", "pw"),
        )
        assert login.status_code == 200
    assert fake.seen(REALM)[-1].url.params.get_list("scope") == [
        "repository:library/nginx:pull",
        "repository:library/redis:pull",
    ]


async def test_token_endpoint_refuses_routes_that_do_not_pass_logins_through(gateway_client, fake):
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with gateway_client([route]) as client:
        resp = await client.get("/auth/token", params={"service": "docker.io"})
        assert resp.status_code == 404
        # A POST names no passthrough route either (its form's service is this route's).
        form = {"grant_type": "password", "service": "docker.io", "username": "u", "password": "p"}
        assert (await client.post("/auth/token", data=form)).status_code == 404
        refused = await client.put("/auth/token")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, POST"
    assert not fake.requests


def test_passthrough_with_credentials_is_a_config_error():
    with pytest.raises(ConfigError, match="passthrough route forwards its clients' logins"):
        parse_routes({"route": [{**PASS, "username": "u", "password_env": "P"}]}, "routes.toml", {"P": "x"})


# --- the OAuth2 form (POST /auth/token) -------------------------------------------------------


def oauth_registry() -> FakeRegistry:
    """An OAuth2 token endpoint (distribution's oauth.md): bob:pw gets a token, and with
    ``access_type=offline`` a refresh token that later buys tokens alone; the GET form as FakeRegistry's."""
    fake = FakeRegistry()
    refresh_tokens = {"refresh-bob": "bob"}

    def tokens(request: httpx.Request) -> httpx.Response | None:
        if not str(request.url).startswith(REALM) or request.method != "POST":
            return None
        form = dict(parse_qsl(request.content.decode("ascii")))
        if form.get("grant_type") == "password":
            if (form.get("username"), form.get("password")) != ("bob", "pw"):
                return registry_error(401, "UNAUTHORIZED", "incorrect username or password")
        elif form.get("grant_type") == "refresh_token":
            if form.get("refresh_token") not in refresh_tokens:
                return response(400, json.dumps({"error": "invalid_grant"}).encode())
        else:
            return response(400, json.dumps({"error": "unsupported_grant_type"}).encode())
        fake.tokens_issued += 1
        token = f"oauth-{fake.tokens_issued}"
        fake.valid_tokens.add(token)
        answer: dict[str, object] = {"access_token": token, "expires_in": 300, "scope": form.get("scope", "")}
        if form.get("access_type") == "offline":
            answer["refresh_token"] = "refresh-bob"
        return response(200, json.dumps(answer).encode(), {"content-type": "application/json"})

    fake.override = tokens
    return fake


def posted_form(request: httpx.Request) -> list[tuple[str, str]]:
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["content-length"] == str(len(request.content))
    return parse_qsl(request.content.decode("ascii"), keep_blank_values=True)


async def test_oauth_password_grant_is_relayed_with_its_form_rewritten(gateway_client):
    fake = oauth_registry()
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True, "auth": "passthrough"}
    form = {
        "grant_type": "password",
        "username": "bob",
        "password": "pw",
        "client_id": "containerd-client",
        "access_type": "offline",
        "service": "docker.io",
        # RFC 6749 3.3: space-delimited; push dropped, catalog dropped, the prefix stripped, library/ added.
        "scope": "repository:docker.io/nginx:pull,push registry:catalog:* repository:redis:pull",
        "unknown": "dropped",
    }
    async with gateway_client([route], registry=fake) as client:
        login = await client.post("/auth/token", data=form, headers={"host": "gw.example.com"})
        assert login.status_code == 200
        answer = login.json()
        assert answer["refresh_token"] == "refresh-bob"  # returned as is
        assert login.headers["cache-control"] == "no-store"  # RFC 6749 5.1
        assert login.headers["pragma"] == "no-cache"
        token = answer["access_token"]
        resp = await client.get("/v2/nginx/manifests/1", headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 200
        assert resp.content == MANIFEST
    relayed = fake.seen(REALM)
    assert len(relayed) == 1
    assert str(relayed[0].url) == REALM  # nothing in the query: the form carries it all
    assert posted_form(relayed[0]) == [
        ("grant_type", "password"),
        ("username", "bob"),
        ("password", "pw"),
        ("client_id", "containerd-client"),
        ("access_type", "offline"),
        ("service", SERVICE),  # the upstream's, learnt from its challenge
        ("scope", "repository:library/nginx:pull repository:library/redis:pull"),
    ]
    assert "authorization" not in relayed[0].headers


async def test_oauth_refresh_token_flow_and_nothing_is_cached(gateway_client):
    fake = oauth_registry()
    headers = {"host": "ghcr.example.com"}
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-bob",
        "client_id": "containerd-client",
        "service": "ghcr.io",
        "scope": "repository:org/app:pull",
    }
    async with gateway_client([PASS], registry=fake) as client:
        first = await client.post("/auth/token", data=refresh, headers=headers)
        second = await client.post("/auth/token", data=refresh, headers=headers)
        assert first.status_code == second.status_code == 200
        assert first.json()["access_token"] != second.json()["access_token"]  # each asked upstream: never cached
        wrong = await client.post("/auth/token", data={**refresh, "refresh_token": "stolen"}, headers=headers)
        assert wrong.status_code == 401  # RFC 6749 5.2 invalid_grant: refused credentials
        assert registry_errors(wrong)[0]["code"] == "UNAUTHORIZED"
        assert "stolen" not in wrong.text
    forms = [dict(posted_form(r)) for r in fake.seen(REALM)]
    assert [f["refresh_token"] for f in forms] == ["refresh-bob", "refresh-bob", "stolen"]
    assert all(f["grant_type"] == "refresh_token" and "password" not in f for f in forms)
    assert {f["scope"] for f in forms} == {"repository:org/app:pull"}


def answering_tokens(answer: httpx.Response) -> FakeRegistry:
    fake = FakeRegistry()
    fake.override = lambda request: answer if str(request.url).startswith(REALM) else None
    return fake


GOOD_FORM = {"grant_type": "password", "username": "bob", "password": "pw", "service": "ghcr.io"}


@pytest.mark.parametrize(
    ("answer", "status", "code", "headers"),
    [
        (registry_error(401, "UNAUTHORIZED", "incorrect username or password"), 401, "UNAUTHORIZED", {}),
        (registry_error(403, "DENIED"), 401, "UNAUTHORIZED", {}),
        (response(400, b'{"error":"invalid_client"}'), 401, "UNAUTHORIZED", {}),
        # The upstream declines the POST itself: its status kept, so the client falls back to GET.
        (response(400, b'{"error":"unsupported_grant_type"}'), 400, "UNSUPPORTED", {}),
        (response(404, b"404 page not found"), 404, "UNSUPPORTED", {}),
        (response(405, b""), 405, "UNSUPPORTED", {"allow": "GET"}),
        (response(429, b"slow down", {"retry-after": "17"}), 429, "TOOMANYREQUESTS", {"retry-after": "17"}),
        (response(500, b"oops"), 502, "UNAVAILABLE", {}),
        (response(200, b"x" * (2 << 20)), 502, "UNAVAILABLE", {}),  # over the token answer cap
    ],
)
async def test_oauth_upstream_answers_become_registry_errors(gateway_client, answer, status, code, headers):
    async with gateway_client([PASS], registry=answering_tokens(answer)) as client:
        resp = await client.post("/auth/token", data=GOOD_FORM, headers={"host": "ghcr.example.com"})
    assert resp.status_code == status
    assert registry_errors(resp)[0]["code"] == code
    for name, value in headers.items():
        assert resp.headers[name] == value
    assert "pw" not in resp.text.replace("pwd", "")


async def test_oauth_upstream_that_is_unreachable_or_silent(gateway_client):
    def broken(request: httpx.Request) -> httpx.Response | None:
        if str(request.url).startswith(REALM):
            raise httpx.ConnectError("refused", request=request)
        return None

    fake = FakeRegistry()
    fake.override = broken
    async with gateway_client([PASS], registry=fake) as client:
        resp = await client.post("/auth/token", data=GOOD_FORM, headers={"host": "ghcr.example.com"})
    assert resp.status_code == 502
    assert registry_errors(resp)[0]["message"].startswith(f"the upstream token endpoint {REALM} is unreachable")


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"grant_type=password&service=ghcr.io", "application/json", 415),
        (b"x" * (MAX_FORM_BODY + 1), "application/x-www-form-urlencoded", 413),
        (b"service=ghcr.io&username=bob&password=pw", "application/x-www-form-urlencoded", 400),  # no grant_type
        (b"grant_type=authorization_code&service=ghcr.io", "application/x-www-form-urlencoded", 400),
        (b"grant_type=password&grant_type=refresh_token&service=ghcr.io", "application/x-www-form-urlencoded", 400),
        (b"grant_type=password&service=ghcr.io&password=%FF", "application/x-www-form-urlencoded", 400),
        ("grant_type=password&service=ghcr.io&password=\u00e9".encode(), "application/x-www-form-urlencoded", 400),
    ],
)
async def test_oauth_forms_the_gateway_refuses(gateway_client, content, content_type, status):
    fake = oauth_registry()
    async with gateway_client([PASS], registry=fake) as client:
        resp = await client.post(
            "/auth/token",
            content=content,
            headers={"host": "ghcr.example.com", "content-type": content_type + "; charset=utf-8"},
        )
    assert resp.status_code == status
    assert registry_errors(resp)[0]["code"] == "UNSUPPORTED"
    assert not fake.seen(REALM)


async def test_oauth_form_that_trickles_meets_the_token_deadline():
    table = RouteTable([])
    relay = TokenRelay(table, {})
    relay._form_deadline = 0.05
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded")],
    }
    messages = [{"type": "http.request", "body": b"grant_type=", "more_body": True}]

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await asyncio.sleep(10)
        raise AssertionError("the deadline did not end the read")

    with pytest.raises(RegistryError) as caught:
        await relay._read_form(scope, receive)
    assert caught.value.status == 408
