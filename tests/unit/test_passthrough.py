"""Logins passed through: the gateway's challenge, the token relay, the client's token upstream."""

from __future__ import annotations

import base64

import pytest

from gateway.errors import ConfigError
from gateway.routes_file import parse_routes
from tests.registry_json import registry_errors
from tests.unit.fake_registry import BLOB_DIGEST, CDN, MANIFEST, REALM, REGISTRY, SERVICE, FakeRegistry, registry_error

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
        assert (await client.post("/auth/token")).status_code == 405
    assert not fake.requests


def test_passthrough_with_credentials_is_a_config_error():
    with pytest.raises(ConfigError, match="passthrough route forwards its clients' logins"):
        parse_routes({"route": [{**PASS, "username": "u", "password_env": "P"}]}, "routes.toml", {"P": "x"})
