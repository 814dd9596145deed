"""The manifest cache: what it keeps, for how long, and that a herd costs one upstream request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gateway.http.util import entity_tag_matches
from gateway.relay import manifest_cache
from gateway.relay.manifest_cache import ManifestCache, normalise_accept
from gateway.settings import Settings
from tests.unit.conftest import Clock, in_process_app, in_process_client
from tests.unit.fake_registry import MANIFEST, MANIFEST_DIGEST, REGISTRY, FakeRegistry, registry_error, response

OCI = "application/vnd.oci.image.manifest.v1+json"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def test_normalise_accept():
    assert normalise_accept(f"{OCI}, {LIST}") == normalise_accept(f" {LIST};q=0.9 ,{OCI.upper()}")
    assert normalise_accept(None) == normalise_accept("") == ""


def test_tags_expire_quickly_and_digests_slowly():
    clock = Clock()
    cache = ManifestCache(tag_ttl=30, digest_ttl=3600, clock=clock)
    tag, digest = ("r", "repo", "latest", ""), ("r", "repo", MANIFEST_DIGEST, "")
    cache.put(tag, [], b"t")
    cache.put(digest, [], b"d")
    clock.now = 29
    assert cache.get(tag, head=False) is not None
    clock.now = 30
    assert cache.get(tag, head=False) is None
    assert cache.get(digest, head=False) is not None
    clock.now = 3600
    assert cache.get(digest, head=False) is None
    assert len(cache) == 2  # expired, kept as stale candidates for stale_if_error (a day by default)
    assert cache.size_bytes > 0


def test_tag_ttl_zero_never_caches_tags():
    cache = ManifestCache(tag_ttl=0)
    cache.put(("r", "repo", "latest", ""), [], b"x")
    assert len(cache) == 0


def test_head_entries_answer_heads_only_and_never_replace_a_full_answer():
    cache = ManifestCache()
    key = ("r", "repo", "v1", "")
    cache.put(key, [(b"content-length", b"5")], None)
    assert cache.get(key, head=True) is not None
    assert cache.get(key, head=False) is None
    cache.put(key, [], b"hello")
    cache.put(key, [(b"content-length", b"5")], None)
    entry = cache.get(key, head=False)
    assert entry is not None
    assert entry.body == b"hello"


def test_memory_is_bounded_least_recently_used_first():
    cache = ManifestCache(max_bytes=10_000)
    for i in range(20):
        cache.put(("r", "repo", f"t{i}", ""), [], b"x" * 1000)
        cache.get(("r", "repo", "t0", ""), head=False)  # t0 stays in use
    assert cache.size_bytes <= 10_000
    assert cache.get(("r", "repo", "t0", ""), head=False) is not None
    assert cache.get(("r", "repo", "t1", ""), head=False) is None
    cache.put(("r", "repo", "huge", ""), [], b"x" * 5000)  # over an eighth of the budget: not kept
    assert cache.get(("r", "repo", "huge", ""), head=False) is None


ROUTES: list[dict[str, Any]] = [
    {"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True},
    {"name": "ghcr.io", "upstream": REGISTRY, "hosts": ["ghcr.*"], "auth": "passthrough"},
]


def client_for(fake: FakeRegistry, **settings: float) -> httpx.AsyncClient:
    return in_process_client(in_process_app(fake, ROUTES, Settings.model_validate(settings)))


def manifest_requests(fake: FakeRegistry) -> list[httpx.Request]:
    return [r for r in fake.seen(REGISTRY) if "/manifests/" in r.url.path and "authorization" in r.headers]


async def test_repeated_gets_and_heads_are_answered_from_memory():
    fake = FakeRegistry()
    async with client_for(fake) as client:
        first = await client.get("/v2/alpine/manifests/latest", headers={"accept": OCI})
        for _ in range(5):
            again = await client.get("/v2/library/alpine/manifests/latest", headers={"accept": OCI})
            assert again.content == first.content == MANIFEST
            assert again.headers["docker-content-digest"] == MANIFEST_DIGEST
            assert again.headers["content-type"] == OCI
            assert again.headers["content-length"] == str(len(MANIFEST))
        head = await client.head("/v2/alpine/manifests/latest", headers={"accept": OCI})
        assert head.headers["content-length"] == str(len(MANIFEST))
        # Another Accept is another answer: asked upstream.
        await client.get("/v2/alpine/manifests/latest", headers={"accept": LIST})
        metrics = (await client.get("/metrics")).text
    assert len(manifest_requests(fake)) == 2
    assert 'registry_gateway_manifest_cache_total{result="hit",route="docker.io"}' in metrics


async def test_head_answers_are_kept_for_heads():
    fake = FakeRegistry()
    async with client_for(fake) as client:
        for _ in range(3):
            head = await client.head("/v2/alpine/manifests/latest", headers={"accept": OCI})
            assert head.status_code == 200
            assert head.headers["content-length"] == str(len(MANIFEST))
            assert head.headers["docker-content-digest"] == MANIFEST_DIGEST
        get = await client.get("/v2/alpine/manifests/latest", headers={"accept": OCI})
        assert get.content == MANIFEST
    assert [r.method for r in manifest_requests(fake)] == ["HEAD", "GET"]


async def test_a_herd_costs_one_upstream_request():
    fake = FakeRegistry()
    async with client_for(fake) as client:
        results = await asyncio.gather(
            *(client.get("/v2/alpine/manifests/v9", headers={"accept": OCI}) for _ in range(50))
        )
    assert {r.status_code for r in results} == {200}
    assert {r.content for r in results} == {MANIFEST}
    assert len(manifest_requests(fake)) == 1


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: registry_error(404, "MANIFEST_UNKNOWN"),
        lambda r: registry_error(503, "UNAVAILABLE"),
        lambda r: response(200, MANIFEST, {"content-type": OCI, "cache-control": "no-store"}),
    ],
    ids=["404", "503", "no-store"],
)
async def test_errors_and_no_store_are_not_kept(answer):
    fake = FakeRegistry()
    fake.override = lambda r: answer(r) if "/manifests/" in r.url.path and "authorization" in r.headers else None
    async with client_for(fake) as client:
        for _ in range(3):
            await client.get("/v2/alpine/manifests/latest", headers={"accept": OCI})
    assert len(manifest_requests(fake)) == 3


async def test_tag_ttl_and_switch_off():
    fake = FakeRegistry()
    async with client_for(fake, manifest_cache_tag_ttl=0) as client:
        for _ in range(3):
            await client.get("/v2/alpine/manifests/latest", headers={"accept": OCI})
        for _ in range(3):
            await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", headers={"accept": OCI})
    assert len(manifest_requests(fake)) == 3 + 1  # tags always asked, the digest once
    fake = FakeRegistry()
    async with client_for(fake, manifest_cache_bytes=0) as client:
        for _ in range(3):
            await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", headers={"accept": OCI})
    assert len(manifest_requests(fake)) == 3


async def test_passthrough_routes_are_never_cached():
    fake = FakeRegistry()
    token = json.loads(fake(httpx.Request("GET", "https://auth.test/token")).read())["token"]
    fake.requests.clear()
    async with client_for(fake) as client:
        for _ in range(3):
            resp = await client.get(
                "/v2/org/app/manifests/v1", headers={"host": "ghcr.example.com", "authorization": f"Bearer {token}"}
            )
            assert resp.status_code == 200
        # Without a login: the challenge, never a cached manifest.
        assert (await client.get("/v2/org/app/manifests/v1", headers={"host": "ghcr.example.com"})).status_code == 401
    assert len(manifest_requests(fake)) == 3


def test_module_documents_the_defaults():
    doc = manifest_cache.__doc__ or ""
    assert "30 by" in doc
    assert "one hour" in doc


async def test_every_accept_header_is_part_of_the_key():
    """Docker sends one Accept per type; a narrower client must not share its answer (a converted list)."""

    def by_accept(request):
        if "/manifests/" in request.url.path and "authorization" in request.headers:
            kind = LIST if LIST in request.headers.get("accept", "") else OCI
            return response(200, kind.encode(), {"content-type": kind})
        return None

    fake = FakeRegistry()
    fake.override = by_accept
    async with client_for(fake) as client:
        narrow = await client.get("/v2/busybox/manifests/1.36", headers={"accept": OCI})
        docker = await client.get("/v2/busybox/manifests/1.36", headers=[("accept", OCI), ("accept", LIST)])
        docker_again = await client.get("/v2/busybox/manifests/1.36", headers=[("accept", OCI), ("accept", LIST)])
    assert narrow.content == OCI.encode()
    assert docker.content == docker_again.content == LIST.encode()
    assert len(manifest_requests(fake)) == 2


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [
        (f'"{MANIFEST_DIGEST}"', 304),
        (f'W/"{MANIFEST_DIGEST}"', 304),  # weak comparison (RFC 9110 13.1.2)
        (f'"sha256:{"0" * 64}", "{MANIFEST_DIGEST}"', 304),  # any entity-tag of the list
        ("*", 304),
        (f'"sha256:{"0" * 64}"', 200),
    ],
)
async def test_a_cache_hit_answers_if_none_match_as_the_upstream_would(if_none_match, status):
    fake = FakeRegistry()
    async with client_for(fake) as client:
        await client.get("/v2/alpine/manifests/latest", headers={"accept": OCI})  # fills the cache
        for method in ("GET", "HEAD"):
            resp = await client.request(
                method, "/v2/alpine/manifests/latest", headers={"accept": OCI, "if-none-match": if_none_match}
            )
            assert resp.status_code == status
            if status == 304:
                assert resp.content == b""
                assert resp.headers["etag"] == f'"{MANIFEST_DIGEST}"'
                assert "content-length" not in resp.headers
                assert "content-type" not in resp.headers
    assert len(manifest_requests(fake)) == 1  # every answer but the first came from memory


@pytest.mark.parametrize(
    ("values", "etag", "matches"),
    [
        (['"a"'], '"a"', True),
        (['W/"a"'], '"a"', True),
        (['"a"'], 'W/"a"', True),
        (['"b", "a"'], '"a"', True),
        (['"b"', '"a"'], '"a"', True),  # several field lines
        (["*"], None, True),
        (['"a"'], None, False),
        (['"b"'], '"a"', False),
        (["a"], '"a"', True),  # unquoted, as distribution accepts a bare digest
        (['"ab"'], '"a"', False),
        ([], '"a"', False),
    ],
)
def test_entity_tag_matching(values, etag, matches):
    assert entity_tag_matches(values, etag) is matches
