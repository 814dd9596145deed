"""The registry API through the gateway against real distribution registries, request by request."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from tests.e2e.conftest import gateway_routes
from tests.registry_json import registry_errors as strict_registry_errors
from tests.support import Gateway, run_gateway
from tests.testbed.bed import Testbed

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ALL_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


@pytest.fixture
def fresh_gateway(testbed: Testbed, tmp_path: Path):
    """A gateway with an empty token cache."""
    env = {"E2E_GHCR_USER": testbed.credentials.username, "E2E_GHCR_PASS": testbed.credentials.password}
    with run_gateway(gateway_routes(testbed), tmp_path, env=env) as gw:
        yield gw


def registry_errors(resp: httpx.Response) -> list[dict]:
    # Upstream error bodies are relayed verbatim, and distribution's have no "detail".
    return strict_registry_errors(resp, require_detail=False)


def test_ping(gateway: Gateway):
    # By a host route's name: 200.
    resp = httpx.get(f"{gateway.url}/v2/", headers={"host": f"docker.gw.test:{gateway.port}"})
    assert resp.status_code == 200
    assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
    # On the shared host (no host pattern claims 127.0.0.1) a route reachable by prefix passes logins
    # through (login-ghcr.test): the ping asks for a login (docs/security.md, "Logins on a shared host").
    shared = httpx.get(f"{gateway.url}/v2/")
    assert shared.status_code == 401
    assert shared.headers["www-authenticate"].startswith(f'Bearer realm="http://127.0.0.1:{gateway.port}/auth/token"')
    assert shared.headers["docker-distribution-api-version"] == "registry/2.0"


def test_hundred_concurrent_requests_cause_one_token_request(fresh_gateway: Gateway, testbed: Testbed, token_stats):
    image = testbed.images["alpine"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=fresh_gateway.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.head("/v2/alpine/manifests/3.20", headers={"accept": ALL_TYPES}) for _ in range(100))
            )

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {200}
    assert {r.headers["docker-content-digest"] for r in responses} == {image.digest}
    hub = [r for r in token_stats.requests if r.service == testbed.hub.service]
    assert len(hub) == 1
    assert hub[0].scopes == ("repository:library/alpine:pull",)
    # A later request reuses the token: still one.
    assert httpx.get(f"{fresh_gateway.url}/v2/alpine/manifests/3.20", headers={"accept": ALL_TYPES}).status_code == 200
    assert token_stats.count(service=testbed.hub.service) == 1


def test_configured_credentials_reach_only_the_token_server(fresh_gateway: Gateway, testbed: Testbed, token_stats):
    resp = httpx.get(f"{fresh_gateway.url}/v2/ghcr.io/private/secret-app/manifests/v1", headers={"accept": ALL_TYPES})
    assert resp.status_code == 200
    assert [r.basic_user for r in token_stats.requests] == [testbed.credentials.username]
    log = fresh_gateway.log.read_text()
    assert testbed.credentials.password not in log


def test_manifest_head_and_get(gateway: Gateway, testbed: Testbed):
    image = testbed.images["busybox"]
    head = httpx.head(f"{gateway.url}/v2/busybox/manifests/1.36", headers={"accept": ALL_TYPES})
    assert head.status_code == 200
    assert head.headers["content-type"] == DOCKER_LIST
    assert head.headers["docker-content-digest"] == image.digest
    assert head.headers["content-length"] == str(len(image.manifest))
    get = httpx.get(f"{gateway.url}/v2/busybox/manifests/1.36", headers={"accept": ALL_TYPES})
    assert get.content == image.manifest
    assert get.headers["etag"] == f'"{image.digest}"'


def test_accept_is_forwarded_verbatim(gateway: Gateway, testbed: Testbed):
    """distribution 2.8 answers by Accept: the gateway must not paper over it."""
    # An OCI index is unknown to a client that accepts only Docker types.
    resp = httpx.get(f"{gateway.url}/v2/alpine/manifests/3.20", headers={"accept": DOCKER_MANIFEST})
    assert resp.status_code == 404
    assert registry_errors(resp)[0]["code"] == "MANIFEST_UNKNOWN"
    # A Docker list becomes its amd64 child for a client that cannot take lists.
    busybox = testbed.images["busybox"]
    resp = httpx.get(f"{gateway.url}/v2/busybox/manifests/1.36", headers={"accept": DOCKER_MANIFEST})
    assert resp.status_code == 200
    assert resp.headers["docker-content-digest"] == busybox.platform_digest("linux/amd64")


def test_blob_get_head_and_ranges_through_the_cdn_redirect(gateway: Gateway, testbed: Testbed):
    image = testbed.images["tool"]
    digest, size = next(iter(image.blobs.items()))
    url = f"{gateway.url}/v2/someorg/tool/blobs/{digest}"
    testbed.cdn.reset()
    # The range first: once a whole GET has read the blob, a range of it is served from memory
    # for a moment (a shared fetch lingers), and would not reach the CDN.
    part = httpx.get(url, headers={"range": "bytes=5-14"})
    full = httpx.get(url)
    assert full.status_code == 200
    assert "sha256:" + hashlib.sha256(full.content).hexdigest() == digest
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(size)
    assert part.status_code == 206
    assert part.content == full.content[5:15]
    assert part.headers["content-range"] == f"bytes 5-14/{size}"
    beyond = httpx.get(url, headers={"range": f"bytes={size + 10}-"})
    assert beyond.status_code == 416
    assert registry_errors(beyond)[0]["code"] == "RANGE_INVALID"
    cdn = testbed.cdn.wait_for_requests(4)
    assert {r.method for r in cdn} == {"GET", "HEAD"}
    assert not any(r.authorization for r in cdn)  # the CDN answers 400 to a request with Authorization
    assert any(r.range == "bytes=5-14" for r in cdn)


def test_blob_redirect_pass(gateway: Gateway, testbed: Testbed):
    digest = next(iter(testbed.images["tool"].blobs))
    resp = httpx.get(f"{gateway.url}/v2/someorg/tool/blobs/{digest}", headers={"host": f"pass.gw.test:{gateway.port}"})
    assert resp.status_code == 307
    location = resp.headers["location"]
    assert location.startswith(testbed.cdn_url)
    followed = httpx.get(location)
    assert "sha256:" + hashlib.sha256(followed.content).hexdigest() == digest


def test_tag_pages_follow_rewritten_links(gateway: Gateway, testbed: Testbed):
    expected = sorted(testbed.images["manytags"].tags)
    for start in ("/v2/docker.io/manytags/tags/list?n=64", "/v2/manytags/tags/list?n=64"):
        client_name = start.split("/tags/")[0].removeprefix("/v2/")
        seen: list[str] = []
        url: str | None = start
        while url:
            resp = httpx.get(gateway.url + url)
            assert resp.status_code == 200
            seen += resp.json()["tags"]
            link = resp.headers.get("link")
            if link:
                url = link[1 : link.index(">")]
                assert url.startswith(f"/v2/{client_name}/tags/list?")  # the client's namespace, library/ left out
            else:
                url = None
        assert seen == expected


def test_upstream_errors_pass_through(gateway: Gateway, testbed: Testbed):
    unknown_blob = "sha256:" + "0" * 64
    resp = httpx.get(f"{gateway.url}/v2/alpine/blobs/{unknown_blob}")
    assert resp.status_code == 404
    assert registry_errors(resp)[0]["code"] == "BLOB_UNKNOWN"
    resp = httpx.get(f"{gateway.url}/v2/ghcr.io/org/nothing-here/manifests/v1")
    assert resp.status_code == 404
    assert registry_errors(resp)[0]["code"] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")
    resp = httpx.get(f"{gateway.url}/v2/alpine/referrers/{testbed.images['alpine'].digest}")
    assert resp.status_code == 404  # distribution 2.8 has no referrers API: a JSON 404, the client falls back
    assert registry_errors(resp)


def test_private_image_without_credentials_is_unauthorized(gateway: Gateway):
    resp = httpx.get(
        f"{gateway.url}/v2/private/secret-app/manifests/v1", headers={"host": f"anon.gw.test:{gateway.port}"}
    )
    assert resp.status_code == 401
    assert registry_errors(resp)[0]["code"] == "UNAUTHORIZED"
    assert "www-authenticate" not in resp.headers


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_writes_are_refused(gateway: Gateway, method):
    resp = httpx.request(method, f"{gateway.url}/v2/alpine/blobs/uploads/")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET, HEAD"


def test_memory_stays_flat_while_streaming_a_large_blob(gateway: Gateway, testbed: Testbed):
    """Peak RSS stays below the blob size with four concurrent pulls of the big layer: they share
    one upstream body, which holds at most a window (its first, while clients may still come)."""
    image = testbed.images["bigimage"]
    digest, size = max(image.blobs.items(), key=lambda item: item[1])
    before = int(
        next(
            line
            for line in Path(f"/proc/{gateway.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS")
        ).split()[1]
    )

    async def pull() -> str:
        h = hashlib.sha256()
        async with (
            httpx.AsyncClient(timeout=120) as client,
            client.stream("GET", f"{gateway.url}/v2/bigimage/blobs/{digest}") as resp,
        ):
            async for chunk in resp.aiter_raw():
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    async def pulls() -> list[str]:
        return await asyncio.gather(*(pull() for _ in range(4)))

    assert asyncio.run(pulls()) == [digest] * 4
    status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    assert size >= 256 << 20
    window = Settings.model_fields["shared_window_bytes"].default
    assert window <= size / 2
    assert peak_kib * 1024 < size, f"peak RSS {peak_kib} KiB while streaming 4 x {size} bytes"
    assert (peak_kib - before) * 1024 < window + (64 << 20), f"peak RSS {peak_kib} KiB, {before} KiB before"
    lines = [json.loads(line) for line in gateway.log_lines() if '"event":"access"' in line]
    assert sum(1 for r in lines if r.get("path", "").endswith(digest) and r.get("bytes") == size) >= 4


def test_expired_token_is_refreshed_between_requests(fresh_gateway: Gateway, testbed: Testbed, token_stats):
    """A pull outlives its token: the gateway fetches a new one, and the client never notices."""
    image = testbed.images["tool"]
    old_ttl = testbed.tokens.ttl
    testbed.tokens.ttl = 2
    try:
        manifest = httpx.get(f"{fresh_gateway.url}/v2/someorg/tool/manifests/1.0", headers={"accept": ALL_TYPES})
        assert manifest.status_code == 200
        import time

        time.sleep(2.5)
        for digest in image.blobs:
            blob = httpx.get(f"{fresh_gateway.url}/v2/someorg/tool/blobs/{digest}")
            assert blob.status_code == 200
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
    finally:
        testbed.tokens.ttl = old_ttl
    scopes = [r.scopes for r in token_stats.requests if r.service == testbed.hub.service]
    assert scopes == [("repository:someorg/tool:pull",)] * 2


# --- answering exactly as the registry does (#14): the gateway beside the registry itself ---------


def from_registry(testbed: Testbed, method: str, repo: str, tail: str, headers: dict[str, str] | None = None):
    """The hub registry's own answer (distribution 2.8), with a pull token for ``repo``."""
    token = testbed.token("hub", f"repository:{repo}:pull")
    return httpx.request(
        method,
        f"{testbed.hub.registry_url}/v2/{repo}/{tail}",
        headers={"authorization": f"Bearer {token}", **(headers or {})},
    )


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_malformed_tag_is_404_like_the_registry(gateway: Gateway, testbed: Testbed, token_stats, method):
    tail = "manifests/.INVALID_MANIFEST_NAME"
    registry = from_registry(testbed, method, "library/alpine", tail)
    before = len(token_stats.requests)
    ours = httpx.request(method, f"{gateway.url}/v2/alpine/{tail}")
    assert (ours.status_code, registry.status_code) == (404, 404)
    if method == "GET":
        # distribution's router matches no route and answers "404 page not found" as text; the
        # gateway says the same in registry JSON.
        assert registry.text.startswith("404 page not found")
        assert registry_errors(ours)[0]["code"] == "MANIFEST_UNKNOWN"
    assert len(token_stats.requests) == before  # refused without a token or an upstream request


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_if_none_match_on_a_cache_hit_is_answered_like_the_registry(gateway: Gateway, testbed: Testbed, method):
    image = testbed.images["busybox"]
    url = f"{gateway.url}/v2/busybox/manifests/1.36"
    httpx.get(url, headers={"accept": ALL_TYPES})  # the manifest cache now holds it
    cases = [(f'"{image.digest}"', 304), (image.digest, 304), ('"sha256:' + "0" * 64 + '"', 200)]
    for tag, status in cases:
        conditional = {"accept": ALL_TYPES, "if-none-match": tag}
        registry = from_registry(testbed, method, "library/busybox", "manifests/1.36", conditional)
        ours = httpx.request(method, url, headers=conditional)
        assert (ours.status_code, registry.status_code) == (status, status), tag
        assert ours.content == registry.content
        if status == 304:
            assert ours.content == b""
            if "etag" in registry.headers:
                assert ours.headers["etag"] == registry.headers["etag"]
    # "*" matches any current representation (RFC 9110 13.1.2); distribution 2.8 ignores it. The
    # gateway follows the RFC on a cache hit (docs/api.md lists this difference).
    star = {"accept": ALL_TYPES, "if-none-match": "*"}
    assert from_registry(testbed, method, "library/busybox", "manifests/1.36", star).status_code == 200
    assert httpx.request(method, url, headers=star).status_code == 304


def test_a_tag_list_names_the_repository_the_client_asked_for(gateway: Gateway, testbed: Testbed):
    registry = from_registry(testbed, "GET", "library/manytags", "tags/list")
    assert registry.json()["name"] == "library/manytags"  # the registry answers with the name it was asked
    for client_name in ("docker.io/manytags", "manytags", "library/manytags"):
        ours = httpx.get(f"{gateway.url}/v2/{client_name}/tags/list?n=1000")
        assert ours.status_code == 200
        assert ours.json()["name"] == client_name
        assert ours.headers["content-length"] == str(len(ours.content))
        assert sorted(ours.json()["tags"]) == sorted(registry.json()["tags"])
