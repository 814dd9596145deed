"""Stale rather than fail: a manifest whose upstream answers 429 or 5xx, or is unreachable, comes from the cache.

The cache on its own clock first (what it keeps, how long, within its byte bound), then the
relay in process (``httpx.MockTransport``): the Warning header, the log line, the counter, one
upstream request per hold, and what is never served stale.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway import app as app_module
from gateway.relay.manifest_cache import ManifestCache
from gateway.settings import Settings
from tests.unit.conftest import Clock, in_process_app, in_process_client
from tests.unit.fake_registry import MANIFEST, MANIFEST_DIGEST, REGISTRY, FakeRegistry, registry_error

OCI = "application/vnd.oci.image.manifest.v1+json"
WARNING = '110 - "Response is Stale"'
TAG, DIGEST = ("r", "repo", "latest", ""), ("r", "repo", MANIFEST_DIGEST, "")


def digest_headers(digest: str = MANIFEST_DIGEST) -> list[tuple[bytes, bytes]]:
    return [(b"docker-content-digest", digest.encode()), (b"content-type", OCI.encode())]


# ---------------------------------------------------------------------- the cache
def test_an_expired_answer_is_kept_as_a_stale_candidate_until_stale_if_error_ends() -> None:
    clock = Clock()
    cache = ManifestCache(tag_ttl=30, digest_ttl=3600, stale_if_error=100, clock=clock)
    cache.put(TAG, digest_headers(), b"t")
    cache.put(DIGEST, digest_headers(), b"d")
    clock.now = 31
    assert cache.get(TAG, head=False) is None  # not fresh: asked upstream
    stale = cache.stale(TAG, head=False)
    assert stale is not None
    assert stale.body == b"t"
    assert cache.stale(DIGEST, head=False) is not None  # fresh is servable too
    clock.now = 130
    assert cache.stale(TAG, head=False) is None  # 30 + 100 passed: gone
    assert len(cache) == 1
    clock.now = 3699
    assert cache.get(DIGEST, head=False) is None
    assert cache.stale(DIGEST, head=False) is not None  # an immutable digest, past its TTL
    clock.now = 3700
    assert cache.stale(DIGEST, head=False) is None
    assert len(cache) == 0
    assert cache.size_bytes == 0


def test_stale_if_error_zero_drops_at_expiry() -> None:
    clock = Clock()
    cache = ManifestCache(tag_ttl=30, stale_if_error=0, clock=clock)
    cache.put(TAG, digest_headers(), b"t")
    clock.now = 30
    assert cache.get(TAG, head=False) is None
    assert cache.stale(TAG, head=False) is None
    assert len(cache) == 0


def test_a_hold_lasts_one_lifetime_and_only_within_the_stale_window() -> None:
    clock = Clock()
    cache = ManifestCache(tag_ttl=30, stale_if_error=50, clock=clock)
    cache.put(TAG, digest_headers(), b"t")
    clock.now = 31
    assert cache.held(TAG, head=False) is None  # nothing failed yet
    cache.hold(TAG, "rate_limited")
    entry = cache.held(TAG, head=False)
    assert entry is not None
    assert entry.held_reason == "rate_limited"
    clock.now = 60.9
    assert cache.held(TAG, head=False) is not None
    clock.now = 61
    assert cache.held(TAG, head=False) is None  # the hold is over: ask the upstream again
    cache.hold(TAG, "status_5xx")
    clock.now = 80
    assert cache.held(TAG, head=False) is None  # held, but stale_if_error (30 + 50) ran out
    cache.hold(("r", "repo", "other", ""), "unreachable")  # nothing kept: nothing held


def test_head_entries_are_stale_candidates_for_heads_only() -> None:
    clock = Clock()
    cache = ManifestCache(tag_ttl=30, clock=clock)
    cache.put(TAG, digest_headers(), None)
    clock.now = 40
    assert cache.stale(TAG, head=True) is not None
    assert cache.stale(TAG, head=False) is None


def test_a_head_that_confirms_the_digest_renews_the_full_answer() -> None:
    clock = Clock()
    cache = ManifestCache(tag_ttl=30, clock=clock)
    cache.put(TAG, digest_headers(), b"body")
    clock.now = 40
    cache.put(TAG, digest_headers(), None)  # the tag still points at the same digest
    renewed = cache.get(TAG, head=False)
    assert renewed is not None
    assert renewed.body == b"body"
    clock.now = 80
    cache.put(TAG, digest_headers("sha256:" + "1" * 64), None)  # the tag moved: the old body goes
    assert cache.get(TAG, head=False) is None
    moved = cache.get(TAG, head=True)
    assert moved is not None
    assert moved.body is None


def test_stale_candidates_stay_within_the_byte_bound() -> None:
    clock = Clock()
    cache = ManifestCache(max_bytes=10_000, tag_ttl=30, stale_if_error=86400, clock=clock)
    for i in range(20):
        cache.put(("r", "repo", f"t{i}", ""), [], b"x" * 1000)
    clock.now = 1000  # every entry expired, none past stale_if_error
    assert cache.size_bytes <= 10_000
    assert cache.stale(("r", "repo", "t0", ""), head=False) is None  # least recently used: evicted
    assert cache.stale(("r", "repo", "t19", ""), head=False) is not None


# ---------------------------------------------------------------------- the relay
ROUTES: list[dict[str, Any]] = [
    {"name": "stale.test", "upstream": REGISTRY, "default": True, "library": True},
    {"name": "pass-stale.test", "upstream": REGISTRY, "hosts": ["login.*"], "auth": "passthrough"},
]
Answer = Callable[[httpx.Request], httpx.Response]


class Upstream:
    """The fake registry, whose manifest answers a test can turn bad."""

    def __init__(self) -> None:
        self.fake = FakeRegistry()
        self.bad: Answer | None = None
        self.fake.override = self._override

    def _override(self, request: httpx.Request) -> httpx.Response | None:
        if self.bad is not None and "/manifests/" in request.url.path and "authorization" in request.headers:
            return self.bad(request)
        return None

    def manifest_requests(self) -> int:
        return len(
            [r for r in self.fake.seen(REGISTRY) if "/manifests/" in r.url.path and "authorization" in r.headers]
        )


def refuse(request: httpx.Request) -> httpx.Response:
    return registry_error(429, "TOOMANYREQUESTS", "slow down", {"retry-after": "60"})


def unavailable(request: httpx.Request) -> httpx.Response:
    return registry_error(503, "UNAVAILABLE", "down")


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.fixture
def stale_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The app's manifest cache runs on this clock."""
    clock = Clock(1000.0)

    def cache(**kwargs: Any) -> ManifestCache:
        return ManifestCache(clock=clock, **kwargs)

    monkeypatch.setattr(app_module, "ManifestCache", cache)
    return clock


def client_of(upstream: Upstream, **settings: Any) -> httpx.AsyncClient:
    values = {"manifest_cache_tag_ttl": 30, "manifest_cache_digest_ttl": 3600, "breaker_failures": 100, **settings}
    return in_process_client(in_process_app(upstream.fake, ROUTES, Settings.model_validate(values)))


def stale_count(metrics_text: str, route: str, reason: str) -> float:
    pattern = (
        rf'registry_gateway_manifest_stale_total\{{(?=[^}}]*route="{re.escape(route)}")(?=[^}}]*reason="{reason}")'
    )
    match = re.search(pattern + r"[^}]*\} (\S+)", metrics_text)
    return float(match[1]) if match else 0.0


def stale_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [f for r in caplog.records if (f := getattr(r, "fields", {})).get("event") == "manifest_stale"]


@pytest.mark.parametrize(
    ("bad", "reason", "status"),
    [(refuse, "rate_limited", 429), (unavailable, "status_5xx", 503), (unreachable, "unreachable", 502)],
    ids=["429", "503", "unreachable"],
)
async def test_a_failing_upstream_gets_the_last_good_tag_answer_marked_stale(
    stale_clock: Clock, caplog: pytest.LogCaptureFixture, bad: Answer, reason: str, status: int
) -> None:
    upstream = Upstream()
    caplog.set_level(logging.WARNING, logger="gateway.proxy")
    async with client_of(upstream) as client:
        fresh = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        assert fresh.status_code == 200
        assert "warning" not in fresh.headers
        before = stale_count((await client.get("/metrics")).text, "stale.test", reason)
        stale_clock.now += 31  # the tag's 30 s are over
        upstream.bad = bad
        stale = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        assert stale.status_code == 200
        assert stale.content == MANIFEST
        assert stale.headers["warning"] == WARNING
        assert stale.headers["docker-content-digest"] == MANIFEST_DIGEST
        assert upstream.manifest_requests() == 2  # the fresh one, and the one that failed
        # Held for one more tag lifetime: the herd after it is not sent upstream.
        for _ in range(5):
            again = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
            assert (again.status_code, again.headers["warning"]) == (200, WARNING)
        assert upstream.manifest_requests() == 2
        metrics = (await client.get("/metrics")).text
        assert stale_count(metrics, "stale.test", reason) == before + 6
        assert 'registry_gateway_manifest_cache_total{result="stale",route="stale.test"}' in metrics
        # The hold is over: the upstream is asked again, once, and still fails.
        stale_clock.now += 30
        assert (await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})).headers["warning"] == WARNING
        assert upstream.manifest_requests() == 3
        # The upstream is back: fresh answers, no warning.
        upstream.bad = None
        stale_clock.now += 30
        back = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        assert back.status_code == 200
        assert "warning" not in back.headers
    [first, second] = stale_events(caplog)  # one line per upstream failure, not per answer
    assert first == second | {"request_id": first["request_id"]}
    assert (first["route"], first["repository"], first["reference"], first["reason"]) == (
        "stale.test",
        "library/alpine",
        "3.20",
        reason,
    )
    assert first["upstream_status"] == status


async def test_heads_and_if_none_match_are_served_stale_too(stale_clock: Clock) -> None:
    upstream = Upstream()
    async with client_of(upstream) as client:
        assert (await client.head("/v2/alpine/manifests/3.20", headers={"accept": OCI})).status_code == 200
        stale_clock.now += 31
        upstream.bad = refuse
        head = await client.head("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        assert (head.status_code, head.headers["warning"]) == (200, WARNING)
        assert head.headers["content-length"] == str(len(MANIFEST))
        # Known from a HEAD only: a GET has nothing to fall back on, and gets the upstream's 429.
        get = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        assert get.status_code == 429
        assert get.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert get.headers["retry-after"] == "60"
        upstream.bad = None
        await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        stale_clock.now += 31
        upstream.bad = unavailable
        cond = await client.get(
            "/v2/alpine/manifests/3.20", headers={"accept": OCI, "if-none-match": f'"{MANIFEST_DIGEST}"'}
        )
        assert (cond.status_code, cond.headers["warning"]) == (304, WARNING)


async def test_a_digest_is_always_servable_from_the_cache(stale_clock: Clock) -> None:
    upstream = Upstream()
    async with client_of(upstream) as client:
        await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", headers={"accept": OCI})
        upstream.bad = unavailable
        within = await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", headers={"accept": OCI})
        assert within.status_code == 200
        assert "warning" not in within.headers
        stale_clock.now += 3601
        past = await client.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", headers={"accept": OCI})
        assert (past.status_code, past.content, past.headers["warning"]) == (200, MANIFEST, WARNING)
    assert upstream.manifest_requests() == 2


async def test_past_stale_if_error_the_error_stands(stale_clock: Clock) -> None:
    upstream = Upstream()
    async with client_of(upstream, manifest_stale_if_error=60) as client:
        await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        upstream.bad = unavailable
        stale_clock.now += 30 + 59
        assert (await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})).status_code == 200
        stale_clock.now += 31  # the hold's 30 s, and 30 + 60 past the answer: gone
        late = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        assert late.status_code == 503
        assert late.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert "warning" not in late.headers


async def test_off_when_zero(stale_clock: Clock) -> None:
    upstream = Upstream()
    async with client_of(upstream, manifest_stale_if_error=0) as client:
        await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        stale_clock.now += 31
        upstream.bad = refuse
        assert (await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})).status_code == 429


@pytest.mark.parametrize("status", [404, 401, 403])
async def test_only_429_5xx_and_unreachable_fall_back(stale_clock: Clock, status: int) -> None:
    """A 404 says the tag is gone, a 401 or 403 that access is refused: the upstream's word stands."""
    upstream = Upstream()
    async with client_of(upstream) as client:
        await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        stale_clock.now += 31
        upstream.bad = lambda request: registry_error(status, "DENIED" if status == 403 else "MANIFEST_UNKNOWN")
        answer = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        assert answer.status_code == status
        assert "warning" not in answer.headers


async def test_passthrough_routes_are_never_served_stale(stale_clock: Clock) -> None:
    upstream = Upstream()
    token = "Bearer " + json.loads(upstream.fake(httpx.Request("GET", "https://auth.test/token")).read())["token"]
    async with client_of(upstream) as client:
        headers = {"host": "login.gw.test", "authorization": token, "accept": OCI}
        assert (await client.get("/v2/org/app/manifests/v1", headers=headers)).status_code == 200
        upstream.bad = refuse
        assert (await client.get("/v2/org/app/manifests/v1", headers=headers)).status_code == 429
