"""Logins on a host several routes share: the gateway's grants (``gateway/auth/grants.py``), end to end in process."""

from __future__ import annotations

import base64
import json

from gateway.auth.grants import Grants
from tests.registry_json import registry_errors
from tests.unit.conftest import Clock
from tests.unit.fake_registry import REALM, REGISTRY, FakeRegistry, registry_error

SECRET = b"0123456789abcdef0123456789abcdef"
# docker.io: the gateway's credentials, the default route; ghcr.io: passthrough, by prefix only.
HUB = {"name": "docker.io", "upstream": REGISTRY, "hosts": ["docker.*"], "default": True, "library": True}
PASS = {"name": "ghcr.io", "upstream": REGISTRY, "auth": "passthrough"}
SHARED = {"host": "gateway.example"}
GOOD = "Basic " + base64.b64encode(b"bob:pw").decode()


def user_registry() -> FakeRegistry:
    """org/private needs bob:pw; anything else is public; wrong credentials are refused everywhere."""
    fake = FakeRegistry()

    def tokens(request):
        if not str(request.url).startswith(REALM):
            return None
        sent = request.headers.get("authorization")
        private = any("org/private" in s for s in request.url.params.get_list("scope"))
        if (sent is not None and sent != GOOD) or (private and sent is None):
            return registry_error(401, "UNAUTHORIZED", "bad credentials")
        return None

    fake.override = tokens
    return fake


def test_a_grant_says_what_it_was_minted_with_until_it_expires() -> None:
    clock = Clock(1_800_000_000.0)
    grants = Grants(SECRET, clock)
    token, ttl = grants.mint(["ghcr.io"], "upstream-token", 120)
    assert ttl == 120
    grant = grants.read(f"Bearer {token}")
    assert grant is not None
    assert (grant.routes, grant.upstream_token) == (("ghcr.io",), "upstream-token")
    clock.now += 121
    assert grants.read(f"Bearer {token}") is None


def test_a_grant_from_another_secret_or_altered_is_refused() -> None:
    grants = Grants(SECRET)
    token, _ = grants.mint(["docker.io"], None, None)
    assert Grants(b"another secret of 32 bytes......").read(f"Bearer {token}") is None
    payload, mac = token[4:].split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["r"] = ["ghcr.io"]
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    assert grants.read(f"Bearer rg1.{forged}.{mac}") is None
    assert grants.read("Bearer not-a-grant") is None
    assert grants.read("Basic Ym9iOnB3") is None


async def test_the_shared_hosts_ping_asks_for_a_login(gateway_client) -> None:
    fake = user_registry()
    async with gateway_client([HUB, PASS], registry=fake) as client:
        resp = await client.get("/v2/", headers={**SHARED, "x-forwarded-proto": "https"})
        assert resp.status_code == 401
        assert registry_errors(resp)[0]["code"] == "UNAUTHORIZED"
        assert (
            resp.headers["www-authenticate"] == 'Bearer realm="https://gateway.example/auth/token",service="docker.io"'
        )
        # A host route's host is not a shared host: its ping is as before.
        hosted = await client.get("/v2/", headers={"host": "docker.gateway.example"})
        assert hosted.status_code == 200
    assert not fake.requests


async def test_a_prefix_login_reaches_only_its_route(gateway_client) -> None:
    fake = user_registry()
    async with gateway_client([HUB, PASS], registry=fake) as client:
        token = await client.get(
            "/auth/token",
            params={"service": "docker.io", "scope": "repository:ghcr.io/org/private:pull,push"},
            headers=SHARED,
            auth=("bob", "pw"),
        )
        assert token.status_code == 200
        assert token.headers["cache-control"] == "no-store"
        grant = token.json()["token"]
        assert grant.startswith("rg1.")
        relayed = fake.seen(REALM)[-1]
        assert relayed.url.params.get_list("scope") == ["repository:org/private:pull"]
        assert relayed.headers["authorization"] == "Basic " + base64.b64encode(b"bob:pw").decode()
        upstream_token = f"token-{fake.tokens_issued}"  # the fake's last

        bearer = {"authorization": f"Bearer {grant}", **SHARED}
        assert (await client.get("/v2/", headers=bearer)).status_code == 200
        fake.requests.clear()
        manifest = await client.get("/v2/ghcr.io/org/private/manifests/v1", headers=bearer)
        assert manifest.status_code == 200
        sent = [r.headers.get("authorization", "") for r in fake.requests if "/manifests/" in str(r.url)]
        # The upstream's own token goes upstream, never the grant.
        assert sent
        assert sent[-1] == f"Bearer {upstream_token}"

        # The same grant is not good for the other route: a fresh challenge, not the bytes.
        fake.requests.clear()
        other = await client.get("/v2/library/alpine/manifests/v1", headers=bearer)
        assert other.status_code == 401
        assert registry_errors(other)[0]["code"] == "UNAUTHORIZED"
        assert 'scope="repository:library/alpine:pull"' in other.headers["www-authenticate"]
        assert not fake.requests


async def test_anonymous_clients_of_other_routes_get_a_grant_without_an_upstream_request(gateway_client) -> None:
    fake = user_registry()
    async with gateway_client([HUB, PASS], registry=fake) as client:
        token = await client.get(
            "/auth/token", params={"service": "docker.io", "scope": "repository:library/alpine:pull"}, headers=SHARED
        )
        assert token.status_code == 200
        assert not fake.seen(REALM)  # no token request upstream: the grant alone admits it
        bearer = {"authorization": f"Bearer {token.json()['token']}", **SHARED}
        manifest = await client.get("/v2/library/alpine/manifests/v1", headers=bearer)
        assert manifest.status_code == 200
        assert all("rg1." not in r.headers.get("authorization", "") for r in fake.requests)
        # No login at all still works for the gateway's own routes (Docker's registry-mirrors, containerd).
        plain = await client.get("/v2/library/alpine/manifests/v1", headers=SHARED)
        assert plain.status_code == 200


async def test_on_a_shared_host_a_passthrough_route_takes_only_grants(gateway_client) -> None:
    fake = user_registry()
    async with gateway_client([HUB, PASS], registry=fake) as client:
        for authorization in (None, "Bearer raw-upstream-token", "Bearer rg1.forged.mac", "Basic Ym9iOnB3"):
            headers = {**SHARED, **({"authorization": authorization} if authorization else {})}
            resp = await client.get("/v2/ghcr.io/org/private/manifests/v1", headers=headers)
            assert resp.status_code == 401, authorization
            assert registry_errors(resp)[0]["code"] == "UNAUTHORIZED"
            assert 'service="ghcr.io"' in resp.headers["www-authenticate"]
        assert not fake.requests  # nothing of theirs went upstream


async def test_wrong_credentials_are_refused_on_a_shared_host(gateway_client) -> None:
    fake = user_registry()
    async with gateway_client([HUB, PASS], registry=fake) as client:
        token = await client.get(
            "/auth/token",
            params={"service": "docker.io", "scope": "repository:ghcr.io/org/private:pull"},
            headers=SHARED,
            auth=("bob", "wrong"),
        )
        assert token.status_code == 401
        assert registry_errors(token)[0]["code"] == "UNAUTHORIZED"
        # docker login (no scope) is checked at the one passthrough route reachable here.
        login = await client.get("/auth/token", params={"service": "docker.io"}, headers=SHARED, auth=("bob", "wrong"))
        assert login.status_code == 401
        good = await client.get("/auth/token", params={"service": "docker.io"}, headers=SHARED, auth=("bob", "pw"))
        assert good.status_code == 200


async def test_ns_names_the_route_of_a_bare_repository(gateway_client) -> None:
    # containerd's ns=ghcr.io: the repository has no prefix; the challenge named the route as service.
    fake = user_registry()
    async with gateway_client([HUB, PASS], registry=fake) as client:
        challenge = await client.get("/v2/org/private/manifests/v1", params={"ns": "ghcr.io"}, headers=SHARED)
        assert challenge.status_code == 401
        assert 'service="ghcr.io"' in challenge.headers["www-authenticate"]
        token = await client.get(
            "/auth/token",
            params={"service": "ghcr.io", "scope": "repository:org/private:pull"},
            headers=SHARED,
            auth=("bob", "pw"),
        )
        assert token.status_code == 200
        assert fake.seen(REALM)[-1].url.params.get_list("scope") == ["repository:org/private:pull"]
        bearer = {"authorization": f"Bearer {token.json()['token']}", **SHARED}
        manifest = await client.get("/v2/org/private/manifests/v1", params={"ns": "ghcr.io"}, headers=bearer)
        assert manifest.status_code == 200
