"""The dispatcher's own refusals, before anything goes upstream: allow/deny lists, oversized headers."""

from __future__ import annotations

import pytest

from tests.registry_json import registry_errors
from tests.unit.fake_registry import REGISTRY

# --- allow / deny ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/alpine/manifests/latest", 200),
        ("/v2/library/alpine/manifests/latest", 200),
        ("/v2/myorg/team/app/manifests/v1", 200),
        ("/v2/library/badimage/manifests/latest", 403),
        ("/v2/someone/else/manifests/latest", 403),
    ],
)
async def test_allow_and_deny_lists(gateway_client, fake, path, status):
    route = {
        "name": "docker.io",
        "upstream": REGISTRY,
        "default": True,
        "library": True,
        "allow": ["library/*", "myorg/**"],
        "deny": ["library/bad*"],
    }
    async with gateway_client([route]) as client:
        resp = await client.get(path)
    assert resp.status_code == status
    if status == 403:
        assert registry_errors(resp)[0]["code"] == "DENIED"
        assert "the gateway's policy refuses" in registry_errors(resp)[0]["message"]
        assert not fake.requests


# --- request size -----------------------------------------------------------------------------


async def test_oversized_headers_are_refused(gateway_client, fake):
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with gateway_client([route]) as client:
        resp = await client.get("/v2/alpine/manifests/latest", headers={"accept": "a" * 9000})
        assert resp.status_code == 431
        assert registry_errors(resp)[0]["code"] == "UNSUPPORTED"
        many = {f"x-h{i}": "v" * 1000 for i in range(40)}
        assert (await client.get("/v2/alpine/manifests/latest", headers=many)).status_code == 431
    assert not fake.requests
