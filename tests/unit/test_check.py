"""``registry-gateway check``: the pure parts (references, the router's explanation, the judging, the table),
and the probes in process, through ``build_clients`` with an ``httpx.MockTransport`` at the upstream seam."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest

from gateway.auth.challenge import Challenge
from gateway.check import (
    CHECK_HEADER,
    Probe,
    check_routes,
    failure_lines,
    judge_ping,
    plan_auth,
    probes_json,
    realm_verdict,
    render_table,
    routes_table,
    summary,
)
from gateway.check_image import explain, explanation_json, explanation_text, parse_image
from gateway.routing.routes import Credentials, RouteTable
from gateway.routing.routes_file import parse_routes
from gateway.settings import Settings

DIGEST = "sha256:" + "a" * 64

ROUTES: list[dict[str, Any]] = [
    {
        "name": "docker.io",
        "upstream": "https://registry-1.docker.io",
        "hosts": ["docker.*"],
        "default": True,
        "library": True,
    },
    {"name": "ghcr.io", "upstream": "https://ghcr.io", "hosts": ["ghcr.*", "*.ghcr.test"], "deny": ["private/**"]},
    {"name": "quay.io", "upstream": ["https://quay.io", "https://quay-mirror.example.com"], "prefixes": ["q.io"]},
]


def table(routes: Sequence[Mapping[str, Any]] | None = None) -> RouteTable:
    return parse_routes({"route": routes or ROUTES}, "routes.toml", {"PW": "secret-pw"})


# --- references, split as Docker splits them ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "name", "reference", "docker_library"),
    [
        ("nginx", None, "library/nginx", "latest", True),
        ("nginx:1.27", None, "library/nginx", "1.27", True),
        ("org/app", None, "org/app", "latest", False),
        ("ghcr.example.com/org/app:v1", "ghcr.example.com", "org/app", "v1", False),
        ("example.com/quay.io/x/y", "example.com", "quay.io/x/y", "latest", False),
        (f"localhost:5000/library/alpine@{DIGEST}", "localhost:5000", "library/alpine", DIGEST, False),
        ("localhost/x", "localhost", "x", "latest", False),
        ("registry:5000/x:1", "registry:5000", "x", "1", False),
        (f"x:1@{DIGEST}", None, "library/x", DIGEST, True),  # Docker pulls by the digest
    ],
)
def test_parse_image(text, registry, name, reference, docker_library):
    image = parse_image(text)
    assert (image.registry, image.name, image.reference, image.docker_library) == (
        registry,
        name,
        reference,
        docker_library,
    )


@pytest.mark.parametrize("text", ["", "a@b", "x:-bad", "example.com/", "x@sha256:short"])
def test_parse_image_refuses(text):
    with pytest.raises(ValueError, match=r"digest|tag|names no repository"):
        parse_image(text)


# --- the router's decision, explained ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "route", "repository", "reasons"),
    [
        ("ghcr.example.com/org/app:v1", "ghcr.io", "org/app", ["host pattern: Host ghcr.example.com matches 'ghcr.*'"]),
        ("eu.ghcr.test/org/app", "ghcr.io", "org/app", ["matches '*.ghcr.test'"]),
        ("example.com/quay.io/x/y", "quay.io", "x/y", ["matches no host pattern", "path prefix: 'quay.io/'"]),
        ("example.com/q.io/x/y", "quay.io", "x/y", ["path prefix: 'q.io/'"]),
        ("nginx", "docker.io", "library/nginx", ["library/ added by Docker", "default route: docker.io", "ns: not"]),
        ("example.com/nginx", "docker.io", "library/nginx", ["default route", "library/ added: route docker.io"]),
        (f"localhost:5000/library/alpine@{DIGEST}", "docker.io", "library/alpine", ["Host localhost:5000 matches no"]),
    ],
)
def test_explain_names_the_step(text, route, repository, reasons):
    e = explain(table(), parse_image(text))
    assert e.error is None
    assert e.target is not None
    assert (e.target.route.name, e.target.upstream_name) == (route, repository)
    for reason in reasons:
        assert any(reason in why for why in e.why), (reason, e.why)
    out = explanation_text(e)
    assert f"route       {route}\n" in out
    assert out.endswith("result      ok")


def test_explain_shows_failover_and_policy():
    e = explain(table(), parse_image("example.com/quay.io/x/y:2"))
    out = explanation_text(e)
    assert "upstream    https://quay.io/v2/x/y/manifests/2 (failover: https://quay-mirror.example.com)" in out
    assert "policy: no allow or deny lists on the route" in out
    permitted = explain(table(), parse_image("ghcr.example.com/org/app"))
    assert "policy: permitted (deny private/**)" in permitted.why


@pytest.mark.parametrize(
    ("text", "code", "reason"),
    [
        ("example.com/evil.example/x/y", "NAME_UNKNOWN", "'evil.example' looks like a registry host"),
        ("ghcr.example.com/private/secret", "DENIED", "policy: refused by route ghcr.io (deny private/**)"),
        ("example.com/Upper/case", "NAME_INVALID", "Host example.com matches no host pattern"),
    ],
)
def test_explain_refusals(text, code, reason):
    e = explain(table(), parse_image(text))
    assert e.target is None
    assert e.error is not None
    assert e.error.code == code
    assert any(reason in why for why in e.why), e.why
    doc = explanation_json(e)
    assert doc["ok"] is False
    assert doc["error"]["code"] == code
    assert explanation_text(e).endswith(f"refused ({code})")


def test_explain_without_a_default_route():
    e = explain(table(ROUTES[1:]), parse_image("org/app"))
    assert e.error is not None
    assert e.error.code == "NAME_UNKNOWN"
    assert "no route has default = true" in e.why


def test_explanation_json():
    doc = explanation_json(explain(table(), parse_image("example.com/quay.io/x/y")))
    assert doc == {
        "ok": True,
        "image": "example.com/quay.io/x/y",
        "request": {"host": "example.com", "path": "/v2/quay.io/x/y/manifests/latest"},
        "route": "quay.io",
        "repository": "x/y",
        "upstreams": ["https://quay.io", "https://quay-mirror.example.com"],
        "why": doc["why"],
        "error": None,
    }


# --- judging one upstream's answers ------------------------------------------------------

CREDS = Credentials("me", "secret-pw")
BEARER = Challenge("bearer", {"realm": "https://auth.example.com/token", "service": "x"})
BASIC = Challenge("basic", {"realm": "x"})


@pytest.mark.parametrize(
    ("passthrough", "credentials", "status", "challenge", "action", "failure"),
    [
        (False, None, 200, None, "none", None),
        (False, CREDS, 401, BEARER, "bearer", None),
        (False, None, 401, BEARER, "bearer", None),
        (False, CREDS, 401, BASIC, "basic", None),
        (False, None, 401, BASIC, "none", "asks for Basic credentials and the route has none"),
        (False, None, 401, None, "none", "without a Bearer"),
        (True, None, 401, BEARER, "clients", None),
        (True, None, 401, BASIC, "none", "does not use token auth"),
        (True, None, 200, None, "none", "does not use token auth"),
    ],
)
def test_plan_auth(passthrough, credentials, status, challenge, action, failure):
    plan = plan_auth("r.io", passthrough, credentials, status, challenge)
    assert plan.action == action
    assert plan.identity == (credentials.identity if credentials and action in ("bearer", "basic") else None)
    if failure is None:
        assert plan.failure is None
    else:
        assert plan.failure is not None
        assert failure in plan.failure


@pytest.mark.parametrize(("status", "ok"), [(200, True), (401, True), (404, False), (301, False), (500, False)])
def test_judge_ping(status, ok):
    assert (judge_ping(status) is None) is ok


def test_realm_verdict():
    private = table([{"name": "a.io", "upstream": "http://127.0.0.1:5000"}]).routes[0]
    reason = realm_verdict(private, "http://127.0.0.1:5001/token")
    assert reason is not None
    assert "127.0.0.1 is not a public address (allow_private_addresses = true allows it)" in reason
    assert realm_verdict(private, "http://127.0.0.1:5000/token") is None  # the route's own upstream
    public = table([{"name": "a.io", "upstream": "https://a.io"}]).routes[0]
    assert realm_verdict(public, "https://auth.a.io/token") is None
    downgrade = realm_verdict(public, "http://auth.a.io/token")
    assert downgrade is not None
    assert "https only" in downgrade
    assert "allows it" not in downgrade  # allow_private_addresses would not help


# --- the table ---------------------------------------------------------------------------


def probes() -> list[Probe]:
    good = Probe("a.io", "https://a.io", "gateway", "401", 12.3, "bearer", "https://a.io/token", "a", "allowed")
    good.token, good.token_ms = "user:me: ok", 4.56
    bad = Probe("b.io", "http://127.0.0.1:1", "gateway", "unreachable", 0.4)
    bad.failures.append("GET /v2/: upstream b.io is unreachable (127.0.0.1)")
    return [good, bad]


def test_routes_table():
    lines = routes_table(probes()).splitlines()
    assert lines[0].split() == ["ROUTE", "AUTH", "UPSTREAM", "GET", "/v2/", "CHALLENGE", "REALM", "TOKEN", "RESULT"]
    assert lines[1].split("  ")[0] == "a.io"
    assert "401 (12 ms)" in lines[1]
    assert "Bearer realm=https://a.io/token service=a" in lines[1]
    assert "user:me: ok (4.6 ms)" in lines[1]
    assert lines[1].endswith("ok")
    assert "unreachable (0.4 ms)" in lines[2]
    assert lines[2].endswith("FAIL")
    # Columns line up: every cell starts where its header does.
    start = lines[0].index("TOKEN")
    assert lines[1][start:].startswith("user:me")
    assert summary(probes()) == "2 routes, 2 upstreams: 1 problem"
    assert summary(probes()[:1]) == "1 route, 1 upstream: all good"
    assert failure_lines(probes()) == [
        "registry-gateway: error: route b.io (http://127.0.0.1:1): GET /v2/: upstream b.io is unreachable (127.0.0.1)"
    ]
    assert len(CHECK_HEADER) == 8


def test_render_table_has_no_trailing_blanks():
    out = render_table(("A", "B"), [("long value", ""), ("x", "y")])
    assert out.splitlines() == ["A           B", "long value", "x           y"]


def test_probes_json_rounds_latencies():
    doc = probes_json(probes())
    assert doc["ok"] is False
    assert doc["checks"][0]["ping_ms"] == 12.3
    assert doc["checks"][0]["token_ms"] == 4.6
    assert doc["checks"][1]["ok"] is False


# --- the probes, in process ----------------------------------------------------------------


def answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> httpx.Response:
    # stream=: a content= body is pre-read by httpx and cannot be streamed by the gateway's readers.
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def run(
    routes: Sequence[Mapping[str, Any]], handler: httpx.MockTransport, settings: Settings | None = None
) -> list[Probe]:
    return asyncio.run(check_routes(table(routes), settings or Settings(), handler))


def basic_registry(password: str) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") == httpx.BasicAuth("me", password)._auth_header:
            return answer(200)
        return answer(401, {"www-authenticate": 'Basic realm="reg"'})

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(("password", "ok"), [("secret-pw", True), ("other", False)])
def test_basic_credentials_are_tried_on_v2(password, ok):
    route = {"name": "b.io", "upstream": "https://b.io", "username": "me", "password_env": "PW"}
    (probe,) = run([route], basic_registry(password))
    assert (probe.scheme, probe.ok) == ("basic", ok)
    assert probe.token == ("user:me: ok" if ok else "user:me: refused")
    if not ok:
        assert probe.failures == ["token (user:me): GET /v2/ with the route's credentials answered 401"]
    assert "secret-pw" not in routes_table([probe]) + "".join(failure_lines([probe]))


def test_bearer_token_with_credentials_and_anonymously():
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.example.com":
            if (
                "authorization" in request.headers
                and request.headers["authorization"] != httpx.BasicAuth("me", "secret-pw")._auth_header
            ):
                return answer(401)
            return answer(200, {"content-type": "application/json"}, b'{"token": "tok-value"}')
        realm = 'Bearer realm="https://auth.example.com/token",service="reg"'
        return answer(401, {"www-authenticate": realm})

    routes = [
        {"name": "a.io", "upstream": "https://a.io", "username": "me", "password_env": "PW"},
        {"name": "anon.io", "upstream": "https://anon.io"},
        {"name": "login.io", "upstream": "https://login.io", "auth": "passthrough"},
    ]
    with_credentials, anonymous, passthrough = run(routes, httpx.MockTransport(handle))
    assert with_credentials.token == "user:me: ok"
    assert with_credentials.realm_policy == "allowed"
    assert anonymous.token == "anonymous: ok"
    assert passthrough.token == "from clients"
    assert all(p.ok for p in (with_credentials, anonymous, passthrough))
    token_requests = [r for r in seen if r.url.host == "auth.example.com"]
    assert len(token_requests) == 2  # none for the passthrough route: its tokens come from clients
    assert all(r.url.params.get("service") == "reg" for r in token_requests)
    assert "tok-value" not in routes_table([with_credentials, anonymous]) + str(probes_json([with_credentials]))


def test_anonymous_token_refused():
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            return answer(401)
        return answer(401, {"www-authenticate": 'Bearer realm="https://auth.example.com/token"'})

    (probe,) = run([{"name": "a.io", "upstream": "https://a.io"}], httpx.MockTransport(handle))
    assert probe.token == "anonymous: refused"
    assert probe.failures == [
        "token (anonymous): the upstream token endpoint https://auth.example.com/token refuses anonymous tokens"
    ]


@pytest.mark.parametrize(
    ("status", "token", "failure"),
    [(200, "not needed", None), (404, "-", "GET /v2/ answered 404: not a registry's API root (200 or 401 expected)")],
)
def test_v2_answers(status, token, failure):
    (probe,) = run([{"name": "a.io", "upstream": "https://a.io"}], httpx.MockTransport(lambda r: answer(status)))
    assert (probe.ping, probe.token) == (str(status), token)
    assert probe.failures == ([] if failure is None else [failure])


def test_a_silent_upstream_is_bounded_by_the_settings_timeouts():
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return answer(200)  # pragma: no cover

    start = time.monotonic()
    routes: list[dict[str, Any]] = [
        {"name": "a.io", "upstream": ["https://a.io", "https://b.io"]},
        {"name": "c.io", "upstream": "https://c.io"},
    ]
    found = run(routes, httpx.MockTransport(hang), Settings(manifest_timeout=0.2))
    assert time.monotonic() - start < 2  # concurrent: one deadline, not three
    assert [p.ping for p in found] == ["timeout"] * 3
    assert found[0].failures == ["GET /v2/: upstream a.io timed out (a.io)"]
