"""UpstreamClient through the whole app: failover, the circuit breaker, credentials per origin, address policy."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.settings import Settings
from tests.registry_json import registry_errors
from tests.unit.fake_registry import MANIFEST, REALM, REGISTRY, registry_error, response

MIRROR = "https://mirror.test"


# --- failover and the circuit breaker ------------------------------------------------------


async def test_failover_to_the_next_upstream_on_connection_errors(gateway_client, fake):
    def mirror_down(request):
        if request.url.host == "mirror.test":
            raise httpx.ConnectError("refused", request=request)
        return None

    fake.override = mirror_down
    route = {"name": "docker.io", "upstream": [MIRROR, REGISTRY], "default": True, "library": True}
    async with gateway_client([route]) as client:
        for _ in range(5):
            resp = await client.get("/v2/alpine/manifests/latest")
            assert resp.status_code == 200
            assert resp.content == MANIFEST
    mirror_attempts = [r for r in fake.requests if r.url.host == "mirror.test"]
    # After 3 failures in a row the mirror rests: later requests go straight to the next one.
    assert len(mirror_attempts) == 3


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_failover_on_gateway_errors_but_not_on_404(gateway_client, fake, status):
    fake.override = lambda r: registry_error(status, "UNAVAILABLE") if r.url.host == "mirror.test" else None
    route = {"name": "docker.io", "upstream": [MIRROR, REGISTRY], "default": True, "library": True}
    async with gateway_client([route]) as client:
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 200
    fake.override = lambda r: registry_error(404, "MANIFEST_UNKNOWN") if r.url.host == "mirror.test" else None
    async with gateway_client([route]) as client:
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 404


async def test_last_upstreams_5xx_is_relayed_and_all_resting_is_503(gateway_client, fake):
    fake.override = lambda r: registry_error(503, "UNAVAILABLE", "maintenance") if r.url.host != "auth.test" else None
    route = {"name": "docker.io", "upstream": [MIRROR, REGISTRY], "default": True, "library": True}
    async with gateway_client([route], Settings(breaker_failures=2, breaker_cooldown=60)) as client:
        first = await client.get("/v2/alpine/manifests/latest")
        assert first.status_code == 503
        assert registry_errors(first)[0]["message"] == "maintenance"  # the upstream's own answer
        await client.get("/v2/alpine/manifests/latest")
        fake.requests.clear()
        resting = await client.get("/v2/alpine/manifests/latest")
    assert resting.status_code == 503
    assert "every upstream of docker.io is failing" in registry_errors(resting)[0]["message"]
    assert int(resting.headers["retry-after"]) >= 1
    assert not fake.requests  # failing fast: nothing was sent


async def test_credentials_go_only_to_their_upstream(gateway_client, fake):
    def mirror(request):
        if request.url.host == "mirror.test":
            if (
                request.url.path == "/v2/"
                or "/manifests/" in request.url.path
                and "authorization" not in request.headers
            ):
                return response(401, b"", {"www-authenticate": f'Bearer realm="{MIRROR}/token",service="mirror"'})
            if request.url.path == "/token":
                return response(200, json.dumps({"token": "mirror-token"}).encode())
            return registry_error(503, "UNAVAILABLE")
        return None

    fake.override = mirror
    route = {
        "name": "docker.io",
        "upstream": [MIRROR, REGISTRY],
        "default": True,
        "library": True,
        "username": "bob",
        "password_env": "PW",
        "credentials_upstream": REGISTRY,
    }
    async with gateway_client([route], env={"PW": "hunter2"}) as client:
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 200
    mirror_token = [r for r in fake.requests if r.url.host == "mirror.test" and r.url.path == "/token"]
    assert mirror_token
    assert all("authorization" not in r.headers for r in mirror_token)
    assert fake.seen(REALM)[0].headers["authorization"].startswith("Basic ")


# --- address policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "realm",
    [
        "http://169.254.169.254/token",
        "https://127.0.0.1/token",
        "https://10.0.0.1/token",
        "ftp://auth.test/token",
        "https://localhost/token",
    ],
)
async def test_a_realm_outside_the_policy_is_never_contacted(gateway_client, fake, realm):
    fake.override = lambda r: (
        response(401, b"", {"www-authenticate": f'Bearer realm="{realm}",service="x"'})
        if r.url.host == "registry.test"
        else None
    )
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with gateway_client([route]) as client:
        resp = await client.get("/v2/org/app/manifests/v1")
    assert resp.status_code == 502
    assert "refused address" in registry_errors(resp)[0]["message"]
    assert {r.url.host for r in fake.requests} == {"registry.test"}


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://192.168.0.1/blob",
        "file:///etc/passwd",
        "http://cdn.test/blob",
    ],
)
async def test_a_redirect_outside_the_policy_is_never_followed(gateway_client, fake, location):
    fake.override = lambda r: (
        response(307, b"", {"location": location})
        if "/blobs/" in r.url.path and r.url.host == "registry.test" and "authorization" in r.headers
        else None
    )
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with gateway_client([route]) as client:
        resp = await client.get("/v2/org/app/blobs/sha256:" + "a" * 64)
    assert resp.status_code == 502
    assert "refused address" in registry_errors(resp)[0]["message"]
    assert {r.url.host for r in fake.requests} <= {"registry.test", "auth.test"}
