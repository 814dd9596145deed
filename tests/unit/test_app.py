"""The whole app in process: client -> ASGITransport -> gateway -> MockTransport -> fake registry."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from typing import Any

import httpx
import pytest

from gateway.routing.request_rules import renamed_tag_list_start
from gateway.settings import Settings
from tests.registry_json import registry_errors
from tests.unit.conftest import in_process_app, in_process_client
from tests.unit.fake_registry import (
    BLOB,
    BLOB_DIGEST,
    CDN,
    MANIFEST,
    MANIFEST_DIGEST,
    REALM,
    REGISTRY,
    registry_error,
    response,
)

ROUTES: list[dict[str, Any]] = [
    {"name": "docker.io", "upstream": REGISTRY, "hosts": ["docker.*"], "default": True, "library": True},
    {"name": "private.io", "upstream": REGISTRY, "hosts": ["private.*"], "username": "bob", "password_env": "PW"},
    {"name": "pass.io", "upstream": REGISTRY, "hosts": ["pass.*"], "blob_redirect": "pass"},
]


@pytest.fixture
def app(fake):
    # The manifest cache would answer repeated requests itself; its own tests are in test_manifest_cache.py.
    return in_process_app(fake, ROUTES, env={"PW": "hunter2"})


@pytest.fixture
async def client(app):
    async with in_process_client(app) as c:
        yield c


async def raw_asgi_get(app, raw_path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """GET ``raw_path`` as a raw ASGI scope (nothing normalises it); status, header pairs in order, body."""
    path = raw_path.split("?")[0]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": urllib.parse.unquote(path),
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gw.test")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 5000),
    }
    messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    start = messages[0]
    return start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in messages[1:])


async def test_ping(client):
    resp = await client.get("/v2/")
    assert resp.status_code == 200
    assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
    assert resp.json() == {}
    assert (await client.head("/v2/")).status_code == 200
    assert (await client.get("/v2")).status_code == 200


async def test_manifest_get_does_token_dance_once_then_attaches_up_front(client, fake):
    for _ in range(3):
        resp = await client.get(
            "/v2/alpine/manifests/latest", headers={"accept": "application/vnd.oci.image.manifest.v1+json"}
        )
        assert resp.status_code == 200
        assert resp.content == MANIFEST
        assert resp.headers["docker-content-digest"] == MANIFEST_DIGEST
        assert resp.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
        assert resp.headers["content-length"] == str(len(MANIFEST))
        assert resp.headers["etag"] == f'"{MANIFEST_DIGEST}"'
        # Upstream-only headers never reach the client.
        assert "set-cookie" not in resp.headers
        assert "x-internal" not in resp.headers
    assert fake.tokens_issued == 1
    token_request = fake.seen(REALM)[0]
    assert token_request.url.params["scope"] == "repository:library/alpine:pull"
    assert token_request.url.params["service"] == "registry.test"
    registry_requests = fake.seen(REGISTRY)
    # One 401, then three authorised requests: the challenge is remembered per origin.
    assert [r.headers.get("authorization") is not None for r in registry_requests] == [False, True, True, True]
    assert all(r.url.path == "/v2/library/alpine/manifests/latest" for r in registry_requests)


async def test_hundred_concurrent_requests_for_one_scope_fetch_one_token(client, fake):
    results = await asyncio.gather(*(client.get("/v2/library/redis/manifests/7") for _ in range(100)))
    assert {r.status_code for r in results} == {200}
    assert fake.tokens_issued == 1


async def test_head_stays_head_with_length_and_digest(client, fake):
    resp = await client.head("/v2/alpine/manifests/latest")
    assert resp.status_code == 200
    assert resp.headers["content-length"] == str(len(MANIFEST))
    assert resp.headers["docker-content-digest"] == MANIFEST_DIGEST
    assert resp.content == b""
    assert {r.method for r in fake.seen(REGISTRY)} == {"HEAD"}


async def test_accept_headers_are_forwarded_verbatim_and_joined(client, fake):
    await client.get(
        "/v2/alpine/manifests/latest",
        headers=[
            ("accept", "application/vnd.oci.image.index.v1+json"),
            ("accept", "application/vnd.docker.distribution.manifest.v2+json"),
        ],
    )
    sent = fake.seen(REGISTRY)[-1]
    assert (
        sent.headers["accept"]
        == "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    )


async def test_no_accept_from_the_client_means_none_upstream(client, fake):
    await client.get("/v2/alpine/manifests/latest", headers={"accept": ""})
    fake.requests.clear()
    await client.send(httpx.Request("GET", "http://gw.test/v2/alpine/manifests/latest"))
    assert "accept" not in fake.seen(REGISTRY)[-1].headers


async def test_client_authorization_and_cookies_are_not_forwarded(client, fake):
    await client.get(
        "/v2/alpine/manifests/latest",
        headers={"authorization": "Bearer client-secret", "cookie": "a=b", "x-forwarded-for": "1.2.3.4"},
    )
    for r in fake.requests:
        assert r.headers.get("authorization") != "Bearer client-secret"
        assert "cookie" not in r.headers
        assert "x-forwarded-for" not in r.headers


async def test_blob_follows_redirect_without_authorization_and_keeps_range(client, fake):
    resp = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert resp.status_code == 200
    assert resp.content == BLOB
    assert "x-amz-request-id" not in resp.headers
    cdn = fake.seen(CDN)
    assert cdn
    assert all("authorization" not in r.headers for r in cdn)

    resp = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", headers={"range": "bytes=10-19", "if-range": '"x"'})
    assert resp.status_code == 206
    assert resp.content == BLOB[10:20]
    assert resp.headers["content-range"] == f"bytes 10-19/{len(BLOB)}"
    assert fake.seen(CDN)[-1].headers["range"] == "bytes=10-19"
    assert fake.seen(CDN)[-1].headers["if-range"] == '"x"'
    assert fake.seen(REGISTRY)[-1].headers["range"] == "bytes=10-19"


async def test_unsatisfiable_range_is_416_json(client):
    resp = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", headers={"range": f"bytes={len(BLOB) + 5}-"})
    assert resp.status_code == 416
    assert resp.headers["content-range"] == f"bytes */{len(BLOB)}"
    assert registry_errors(resp)[0]["code"] == "RANGE_INVALID"


async def test_blob_head_follows_the_redirect_too(client, fake):
    resp = await client.head(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert resp.status_code == 200
    assert resp.headers["content-length"] == str(len(BLOB))
    assert fake.seen(CDN)[-1].method == "HEAD"


async def test_blob_redirect_pass_hands_the_307_to_the_client(client, fake):
    resp = await client.get(f"/v2/org/app/blobs/{BLOB_DIGEST}", headers={"host": "pass.example.com"})
    assert resp.status_code == 307
    assert resp.headers["location"] == f"{CDN}/blobs/{BLOB_DIGEST}?X-Amz-Signature=abc"
    assert not fake.seen(CDN)
    # Manifests are still answered by the gateway.
    assert (await client.get("/v2/org/app/manifests/v1", headers={"host": "pass.example.com"})).status_code == 200


async def test_redirect_loop_is_a_502_naming_the_upstream(client, fake):
    fake.override = lambda r: response(307, b"", {"location": "/v2/loop/blobs/x"}) if "blobs" in r.url.path else None
    resp = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert resp.status_code == 502
    assert "redirected more than 5 times" in registry_errors(resp)[0]["message"]
    assert "docker.io" in registry_errors(resp)[0]["message"]


async def test_configured_credentials_go_only_to_the_upstreams_own_realm(client, fake):
    resp = await client.get("/v2/team/app/manifests/v1", headers={"host": "private.example.com"})
    assert resp.status_code == 200
    token_request = fake.seen(REALM)[0]
    assert token_request.headers["authorization"].startswith("Basic ")
    assert token_request.url.params["account"] == "bob"
    resp = await client.get(f"/v2/team/app/blobs/{BLOB_DIGEST}", headers={"host": "private.example.com"})
    assert resp.status_code == 200
    assert all("authorization" not in r.headers for r in fake.seen(CDN))


async def test_tokens_for_credentials_and_anonymous_are_separate(client, fake):
    await client.get("/v2/team/app/manifests/v1", headers={"host": "private.example.com"})
    await client.get("/v2/team/app/manifests/v1", headers={"host": "docker.example.com"})
    assert fake.tokens_issued == 2
    assert ["authorization" in r.headers for r in fake.seen(REALM)] == [True, False]


async def test_refused_token_is_refreshed_once(client, fake):
    await client.get("/v2/alpine/manifests/latest")
    fake.valid_tokens.clear()  # the upstream now refuses the cached token (expired early)
    resp = await client.get("/v2/alpine/manifests/latest")
    assert resp.status_code == 200
    assert fake.tokens_issued == 2


async def test_upstream_401_after_a_fresh_token_passes_through_without_the_upstream_challenge(client, fake):
    def deny(request):
        if request.url.path.startswith("/v2/private/"):
            return registry_error(
                401, "UNAUTHORIZED", "access to the requested resource is not authorized", fake.challenge("private/x")
            )
        return None

    fake.override = deny
    resp = await client.get("/v2/private/x/manifests/v1")
    assert resp.status_code == 401
    assert registry_errors(resp)[0] == {
        "code": "UNAUTHORIZED",
        "message": "access to the requested resource is not authorized",
        "detail": None,
    }
    assert "www-authenticate" not in resp.headers  # it names the upstream's realm
    assert fake.tokens_issued == 1  # one retry, not a loop


async def test_registry_errors_pass_through_verbatim(client):
    resp = await client.get("/v2/alpine/manifests/missing")
    assert resp.status_code == 404
    assert registry_errors(resp) == [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": None}]


async def test_rate_limit_passes_through_with_retry_after_and_ratelimit_headers(client, fake):
    fake.override = lambda r: (
        registry_error(
            429,
            "TOOMANYREQUESTS",
            "You have reached your pull rate limit.",
            {"retry-after": "3600", "ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"},
        )
        if r.url.host == "registry.test"
        else None
    )
    resp = await client.get("/v2/alpine/manifests/latest")
    assert resp.status_code == 429
    assert registry_errors(resp)[0]["code"] == "TOOMANYREQUESTS"
    assert resp.headers["retry-after"] == "3600"
    assert resp.headers["ratelimit-limit"] == "100;w=21600"
    assert resp.headers["ratelimit-remaining"] == "0;w=21600"


@pytest.mark.parametrize(
    ("status", "body", "kind_path", "code"),
    [
        (502, b"<html>Bad Gateway</html>", "manifests/latest", "UNAVAILABLE"),
        (500, b"", "manifests/latest", "UNKNOWN"),
        (404, b"404 page not found\n", f"referrers/{BLOB_DIGEST}", "NAME_UNKNOWN"),
        (404, b"Not Found", f"blobs/{BLOB_DIGEST}", "BLOB_UNKNOWN"),
        (403, b'{"errors": "not a list"}', "manifests/latest", "DENIED"),
    ],
)
async def test_non_registry_error_bodies_are_wrapped_as_json(client, fake, status, body, kind_path, code):
    fake.override = lambda r: (
        response(status, body, {"content-type": "text/html"}) if r.url.host == "registry.test" else None
    )
    resp = await client.get(f"/v2/alpine/{kind_path}")
    assert resp.status_code == status
    (error,) = registry_errors(resp)
    assert error["code"] == code
    assert "docker.io" in error["message"]


async def test_upstream_unreachable_and_slow(client, fake):
    def fail(exc):
        def handler(request):
            raise exc("boom", request=request)

        return handler

    fake.override = fail(httpx.ConnectError)
    resp = await client.get("/v2/alpine/manifests/latest")
    assert resp.status_code == 502
    assert "docker.io" in registry_errors(resp)[0]["message"]
    assert "unreachable" in registry_errors(resp)[0]["message"]
    fake.override = fail(httpx.ConnectTimeout)
    resp = await client.get("/v2/alpine/manifests/latest")
    assert resp.status_code == 504
    assert "timed out" in registry_errors(resp)[0]["message"]


async def test_missing_digest_is_computed_over_the_exact_bytes(client, fake):
    body = b'{"schemaVersion":2,"x":1}'
    fake.override = lambda r: (
        response(200, body, {"content-type": "application/json"}) if r.url.host == "registry.test" else None
    )
    resp = await client.get("/v2/alpine/manifests/latest")
    import hashlib

    assert resp.headers["docker-content-digest"] == "sha256:" + hashlib.sha256(body).hexdigest()


async def test_oversized_manifest_is_refused(client, fake):
    big = b"x" * (4 * 1024 * 1024 + 1)
    fake.override = lambda r: (
        response(200, big, {"content-type": "application/json"}) if r.url.host == "registry.test" else None
    )
    resp = await client.get("/v2/alpine/manifests/latest")
    assert resp.status_code == 502
    assert "larger than" in registry_errors(resp)[0]["message"]


async def test_tags_list_forwards_n_and_last_and_rewrites_link(client, fake):
    resp = await client.get("/v2/docker.io/alpine/tags/list?n=2&foo=bar")
    assert resp.status_code == 200
    # The name the client used, not the upstream's (#14).
    assert resp.json() == {"name": "docker.io/alpine", "tags": ["v0", "v1"]}
    assert resp.headers["link"] == '</v2/docker.io/alpine/tags/list?last=v1&n=2>; rel="next"'
    sent = fake.seen(REGISTRY)[-1]
    assert sent.url.path == "/v2/library/alpine/tags/list"
    assert dict(sent.url.params) == {"n": "2"}  # foo is ignored, never forwarded

    seen: list[str] = []
    url = "/v2/docker.io/alpine/tags/list?n=2"
    while url:
        resp = await client.get(url)
        seen += resp.json()["tags"]
        link = resp.headers.get("link")
        url = link[1 : link.index(">")] if link else ""
    assert seen == fake.tags


async def test_link_keeps_library_when_the_client_used_it(client):
    resp = await client.get("/v2/library/alpine/tags/list?n=1", headers={"host": "docker.example.com"})
    assert resp.headers["link"].startswith("</v2/library/alpine/tags/list?")


@pytest.mark.parametrize("query", ["n=abc", "n=-1", "n=99999999", "n=1e3"])
async def test_absurd_page_sizes_are_refused(client, query):
    resp = await client.get(f"/v2/alpine/tags/list?{query}")
    assert resp.status_code == 400
    assert registry_errors(resp)[0]["code"] == "PAGINATION_NUMBER_INVALID"


async def test_ns_selects_the_route_and_unknown_ns_is_refused(client, fake):
    resp = await client.get("/v2/library/alpine/manifests/latest?ns=docker.io&other=1")
    assert resp.status_code == 200
    assert "ns" not in fake.seen(REGISTRY)[-1].url.params
    resp = await client.get("/v2/library/alpine/manifests/latest?ns=evil.example")
    assert resp.status_code == 404
    assert registry_errors(resp)[0]["code"] == "NAME_UNKNOWN"
    assert not any(r.url.host == "evil.example" for r in fake.requests)


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize(
    "path", ["/v2/alpine/manifests/latest", f"/v2/alpine/blobs/{BLOB_DIGEST}", "/v2/alpine/blobs/uploads/", "/v2/"]
)
async def test_writes_are_405_unsupported(client, fake, method, path):
    resp = await client.request(method, path)
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET, HEAD"
    assert registry_errors(resp)[0]["code"] == "UNSUPPORTED"
    assert not fake.requests


async def test_catalog_and_unknown_paths(client, fake):
    resp = await client.get("/v2/_catalog")
    assert resp.status_code == 404
    assert registry_errors(resp)[0]["code"] == "UNSUPPORTED"
    resp = await client.get("/v2/alpine/whatever")
    assert resp.status_code == 404
    assert registry_errors(resp)[0]["code"] == "UNSUPPORTED"
    resp = await client.get("/elsewhere")
    assert resp.status_code == 404
    assert registry_errors(resp)[0]["code"] == "UNSUPPORTED"
    assert not fake.requests


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/a%2Fb/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/Alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/../b/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/" + "a" * 256 + "/manifests/latest", 400, "NAME_INVALID"),
        # A tag the grammar refuses names no manifest: 404, as distribution answers (#14).
        ("/v2/alpine/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/blobs/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("/v2/unknown.example/x/manifests/latest", 404, "NAME_UNKNOWN"),
    ],
)
async def test_bad_input_is_a_clear_error(app, fake, path, status, code):
    # Sent as a raw ASGI scope: httpx would normalise "/../" away before sending.
    resp_status, headers, body = await raw_asgi_get(app, path)
    assert resp_status == status
    assert dict(headers)[b"content-type"] == b"application/json"
    assert json.loads(body)["errors"][0]["code"] == code
    assert not fake.seen(REGISTRY)


async def test_cookies_from_upstream_are_not_replayed(client, fake):
    await client.get("/v2/alpine/manifests/latest")
    await client.get("/v2/alpine/manifests/latest")
    assert all("cookie" not in r.headers for r in fake.requests)


async def test_request_id_is_echoed_or_generated(client):
    resp = await client.get("/v2/", headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    resp = await client.get("/v2/", headers={"x-request-id": "bad id\twith spaces"})
    assert len(resp.headers["x-request-id"]) == 32


async def test_basic_auth_upstream(client, fake):
    def basic(request):
        if request.url.host != "registry.test":
            return None
        if request.headers.get("authorization") == "Basic Ym9iOmh1bnRlcjI=":
            return response(200, MANIFEST, {"content-type": "application/json"})
        return response(401, b"", {"www-authenticate": 'Basic realm="registry"'})

    fake.override = basic
    resp = await client.get("/v2/team/app/manifests/v1", headers={"host": "private.example.com"})
    assert resp.status_code == 200
    resp = await client.get("/v2/team/app/manifests/v1", headers={"host": "docker.example.com"})
    assert resp.status_code == 401  # anonymous route: no credentials to offer


async def test_json_body_of_every_error_is_valid(client):
    for path in ["/v2/_catalog", "/v2/a%2Fb/manifests/x", "/v2/evil.io/a/manifests/x"]:
        resp = await client.get(path)
        json.loads(resp.content)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_metrics_count_requests_bytes_tokens_and_redirects(client, fake):
    before = (await client.get("/metrics")).text
    await client.get("/v2/alpine/manifests/latest")
    await client.get("/v2/alpine/manifests/latest")
    await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    await client.get("/v2/evil.example/x/manifests/1")
    after = (await client.get("/metrics")).text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("registry_gateway_requests_total", route="docker.io", kind="manifest", method="GET", status="200") == 2
    assert delta("registry_gateway_requests_total", route="docker.io", kind="blob", method="GET", status="200") == 1
    assert delta("registry_gateway_requests_total", route="-", kind="manifest", method="GET", status="404") == 1
    assert delta("registry_gateway_response_bytes_total", route="docker.io", kind="blob") == len(BLOB)
    assert delta("registry_gateway_token_fetches_total", result="ok") == 1
    assert delta("registry_gateway_token_cache_hits_total") >= 2
    assert delta("registry_gateway_redirects_total", route="docker.io", mode="followed") == 1
    assert delta("registry_gateway_upstream_response_seconds_count", route="docker.io", kind="blob") == 1
    assert sample(after, "registry_gateway_streams_in_flight", route="docker.io") == 0


async def test_metrics_count_the_asyncio_tasks_at_the_scrape(client, fake):
    blockers = [asyncio.ensure_future(asyncio.sleep(60)) for _ in range(5)]
    try:
        during = sample((await client.get("/metrics")).text, "registry_gateway_asyncio_tasks")
    finally:
        for task in blockers:
            task.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)
    after = sample((await client.get("/metrics")).text, "registry_gateway_asyncio_tasks")
    assert after >= 1  # the test's own task, at least
    assert during - after == 5


async def test_metrics_count_upstream_errors_by_reason(client, fake):
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    before = (await client.get("/metrics")).text
    fake.override = refuse
    await client.get("/v2/alpine/manifests/latest")
    after = (await client.get("/metrics")).text
    name = "registry_gateway_upstream_errors_total"
    assert (
        sample(after, name, route="docker.io", reason="connect")
        - sample(before, name, route="docker.io", reason="connect")
        == 1
    )


async def test_forwarded_host_from_a_trusted_proxy_selects_the_route(app, fake):
    headers = {"host": "gw.test", "x-forwarded-host": "private.example.com", "x-forwarded-proto": "https"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 1)), base_url="http://gw.test"
    ) as c:
        assert (await c.get("/v2/team/app/manifests/v1", headers=headers)).status_code == 200
    assert fake.seen(REALM)[-1].headers["authorization"].startswith("Basic ")  # the private route's credentials
    fake.requests.clear()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("10.9.9.9", 1)), base_url="http://gw.test"
    ) as c:
        assert (await c.get("/v2/team/app/manifests/v1", headers=headers)).status_code == 200
    # From an untrusted peer the header is ignored: the default route, anonymous.
    assert all("authorization" not in r.headers for r in fake.seen(REALM))
    assert fake.seen(REGISTRY)[-1].url.path == "/v2/team/app/manifests/v1"


async def test_health_and_readiness(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready"
    assert ready["routes"] == ["docker.io", "private.io", "pass.io"]


async def test_no_header_is_sent_twice(fake):
    """Upstreams spell names their way (Content-Length); the answer must not repeat one (wrk, llhttp refuse that)."""
    spelled = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Content-Length": str(len(MANIFEST))}
    fake.override = lambda r: response(200, MANIFEST, spelled) if r.url.host == "registry.test" else None
    app = in_process_app(fake, ROUTES, Settings(), env={"PW": "hunter2"})
    status, headers, body = await raw_asgi_get(app, "/v2/alpine/manifests/latest")
    assert status == 200
    assert body == MANIFEST
    names = [k for k, _ in headers]
    assert len(names) == len(set(names)), names
    assert all(k == k.lower() for k in names)


@pytest.mark.parametrize(
    ("start", "complete", "expected"),
    [
        (b'{"name":"library/alpine","tags":["a"]}', True, b'{"name":"alpine","tags":["a"]}'),
        (b'{"name": "library/alpine", "tags": []}', True, b'{"name": "alpine", "tags": []}'),  # Python's json
        (b'{"name":"library/alp', False, None),  # the name is not whole yet: read on
        (b'{"na', False, None),
        (b'{"na', True, b'{"na'),  # the body ended: as it came
        (b'{"name":"someone/else","tags":[]}', True, b'{"name":"someone/else","tags":[]}'),  # not ours
        (b'{"name":"library/alpine2"', False, b'{"name":"library/alpine2"'),  # another name, same start
        (b'{"tags":[],"name":"library/alpine"}', False, b'{"tags":[],"name":"library/alpine"}'),  # name not first
        (b"not json", False, b"not json"),
    ],
)
def test_the_start_of_a_tag_list_is_renamed_into_the_clients_namespace(start, complete, expected):
    assert renamed_tag_list_start(start, "library/alpine", "alpine", complete=complete) == expected


async def test_tags_list_name_is_the_clients_in_every_addressing_mode(client):
    for path, name in [
        ("/v2/alpine/tags/list", "alpine"),
        ("/v2/library/alpine/tags/list", "library/alpine"),
        ("/v2/docker.io/alpine/tags/list", "docker.io/alpine"),
    ]:
        resp = await client.get(path)
        assert resp.json()["name"] == name
        assert resp.json()["tags"] == ["v0", "v1", "v2", "v3", "v4"]
