"""Mirrors for bytes, the registry for names: what is asked of a mirror, and what never is."""

from __future__ import annotations

import httpx
import pytest

from gateway.http.errors import ConfigError
from gateway.routing.routes_file import parse_routes
from tests.registry_json import registry_errors
from tests.unit.conftest import asgi_get
from tests.unit.fake_registry import (
    BLOB,
    BLOB_DIGEST,
    MANIFEST,
    MANIFEST_DIGEST,
    REALM,
    REGISTRY,
    FakeRegistry,
    registry_error,
    response,
)

MIRROR = "https://mirror.test"
OTHER = "https://mirror2.test"


def route(**extra: object) -> list[dict[str, object]]:
    return [{"name": "docker.io", "upstream": REGISTRY, "mirrors": [MIRROR], "default": True, "library": True, **extra}]


def at(fake: FakeRegistry, host: str) -> list[httpx.Request]:
    return [r for r in fake.requests if r.url.host == host and r.url.path != "/v2/"]


async def test_content_by_digest_comes_from_the_mirror_and_names_from_the_registry(fake, gateway_client):
    async with gateway_client(route()) as client:
        blob = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
        by_digest = await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}")
        by_tag = await client.get("/v2/alpine/manifests/latest")
        tags = await client.get("/v2/alpine/tags/list")
    assert (blob.content, by_digest.content, by_tag.content) == (BLOB, MANIFEST, MANIFEST)
    assert tags.status_code == 200
    mirror_paths = {r.url.path.rsplit("/", 2)[-2] for r in at(fake, "mirror.test") if "authorization" in r.headers}
    assert mirror_paths == {"blobs", "manifests"}
    assert all(MANIFEST_DIGEST in r.url.path or "/blobs/" in r.url.path for r in at(fake, "mirror.test"))
    registry = [r.url.path for r in at(fake, "registry.test") if "authorization" in r.headers]
    assert registry == ["/v2/library/alpine/manifests/latest", "/v2/library/alpine/tags/list"]


async def test_a_mirror_without_the_content_passes_to_the_next_and_then_the_registry(fake, gateway_client):
    fake.override = lambda r: response(404, b"") if r.url.host in ("mirror.test", "mirror2.test") else None
    async with gateway_client(route(mirrors=[MIRROR, OTHER])) as client:
        resp = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert resp.content == BLOB
    hosts = [r.url.host for r in fake.requests if "/blobs/" in r.url.path]
    # The registry: a 401, then the 307 to its CDN.
    assert hosts == ["mirror.test", "mirror2.test", "registry.test", "registry.test", "cdn.test"]


async def test_a_dead_mirror_never_fails_the_request(fake, gateway_client):
    def down(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "mirror.test":
            raise httpx.ConnectError("refused", request=request)
        return None

    fake.override = down
    async with gateway_client(route()) as client:
        assert (await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")).content == BLOB


async def test_a_mirror_serves_content_while_every_upstream_rests_in_the_breaker(fake, gateway_client):
    def registry_down(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "registry.test":
            raise httpx.ConnectError("refused", request=request)
        return None

    fake.override = registry_down
    async with gateway_client(route()) as client:
        for _ in range(3):  # the breaker's failures: the registry now rests
            assert (await client.get("/v2/alpine/manifests/latest")).status_code in (502, 503)
        resting = await client.get("/v2/alpine/manifests/latest")
        assert resting.status_code == 503
        assert registry_errors(resting)[0]["code"] == "UNAVAILABLE"
        before = len([r for r in fake.requests if r.url.host == "registry.test"])
        blob = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert blob.status_code == 200
    assert blob.content == BLOB
    assert len([r for r in fake.requests if r.url.host == "registry.test"]) == before  # not asked while resting


async def test_credentials_never_reach_a_mirror(fake, gateway_client):
    creds = {"username": "bob", "password_env": "PW"}
    async with gateway_client(route(**creds), env={"PW": "hunter2"}) as client:
        assert (await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")).content == BLOB
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 200
    tokens = fake.seen(REALM)
    # The mirror's challenge (same realm here) is answered anonymously; the registry's with bob's.
    assert {bool(r.headers.get("authorization")) for r in tokens} == {False, True}
    assert all(
        "authorization" not in r.headers or r.headers["authorization"].startswith("Bearer ")
        for r in at(fake, "mirror.test")
    )


async def test_a_manifest_by_digest_with_wrong_bytes_is_not_served_and_the_mirror_is_avoided(fake, gateway_client):
    def forged(request: httpx.Request) -> httpx.Response | None:
        if (
            request.url.host == "mirror.test"
            and "/manifests/" in request.url.path
            and "authorization" in request.headers
        ):
            return response(200, MANIFEST + b" ", {"content-type": "application/vnd.oci.image.manifest.v1+json"})
        return None

    fake.override = forged
    async with gateway_client(route()) as client:
        first = await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}")
        assert first.status_code == 502
        assert "do not match" in registry_errors(first)[0]["message"]
        again = await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}")
        assert again.content == MANIFEST  # from the registry this time
    assert len([r for r in at(fake, "mirror.test") if "authorization" in r.headers]) == 1


async def test_a_blob_mirror_that_flips_a_byte_is_avoided_for_the_retry(fake):
    from tests.unit.conftest import in_process_app

    def flipping(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "mirror.test" and "/blobs/" in request.url.path and "authorization" in request.headers:
            wrong = BLOB[:10] + bytes([BLOB[10] ^ 1]) + BLOB[11:]
            return response(200, wrong, {"content-length": str(len(wrong))})
        return None

    fake.override = flipping
    app = in_process_app(fake, route())
    # Held whole until checked, the blob reached the client in no part: the registry is asked for it.
    _, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (body, complete) == (BLOB, True)
    _, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (body, complete) == (BLOB, True)
    mirror_blobs = [r for r in at(fake, "mirror.test") if "/blobs/" in r.url.path and "authorization" in r.headers]
    assert len(mirror_blobs) == 1  # avoided for the retry


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"auth": "passthrough"}, "a passthrough route takes no mirrors"),
        ({"mirrors": [REGISTRY]}, "an upstream of the route cannot be its mirror too"),
        ({"mirrors": [MIRROR, MIRROR]}, "the same mirror is listed twice"),
        ({"mirrors": ["ftp://mirror.test"]}, "mirrors:"),
    ],
)
def test_mirror_configuration_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_routes({"route": route(**extra)}, "routes.toml", {})


async def test_a_mirror_that_refuses_a_repository_is_not_asked_again_for_its_other_layers(fake, gateway_client):
    def private_at_the_mirror(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "mirror.test" and request.url.path != "/v2/":
            return registry_error(401, "UNAUTHORIZED", "private")
        return None

    fake.override = private_at_the_mirror
    async with gateway_client(route()) as client:
        for _ in range(3):
            assert (await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")).content == BLOB
        assert (await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}")).content == MANIFEST
        other = await client.get(f"/v2/other/app/blobs/{BLOB_DIGEST}")
        assert other.status_code == 200
    asked = [r.url.path for r in fake.requests if r.url.host == "mirror.test"]
    # One refusal for library/alpine (then the registry for everything of it), one for other/app.
    assert len([p for p in asked if "/library/alpine/" in p]) == 1
    assert len([p for p in asked if "/other/app/" in p]) == 1
