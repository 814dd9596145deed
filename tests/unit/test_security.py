"""Failover, breaker, passthrough logins, policy refusals, access control: in process."""

from __future__ import annotations

import base64
import json

import bcrypt
import httpx
import pytest

from gateway.app import create_app
from gateway.routes import parse_routes
from gateway.settings import Settings
from gateway.upstream import Breaker
from tests.unit.fake_registry import CDN, MANIFEST, REALM, REGISTRY, SERVICE, FakeRegistry, registry_error, response

MIRROR = "https://mirror.test"


def make_client(fake, routes, settings: Settings | None = None, env=None, client=("127.0.0.1", 1234)):
    table = parse_routes({"route": routes}, "routes.toml", env or {})
    app = create_app(settings or Settings(manifest_cache_bytes=0), table=table, transport=httpx.MockTransport(fake))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://gw.test")


def errors(resp):
    return resp.json()["errors"]


@pytest.fixture
def fake():
    return FakeRegistry()


# --- failover and the circuit breaker ------------------------------------------------------


async def test_failover_to_the_next_upstream_on_connection_errors(fake):
    def mirror_down(request):
        if request.url.host == "mirror.test":
            raise httpx.ConnectError("refused", request=request)
        return None

    fake.override = mirror_down
    route = {"name": "docker.io", "upstream": [MIRROR, REGISTRY], "default": True, "library": True}
    async with make_client(fake, [route]) as client:
        for _ in range(5):
            resp = await client.get("/v2/alpine/manifests/latest")
            assert resp.status_code == 200
            assert resp.content == MANIFEST
    mirror_attempts = [r for r in fake.requests if r.url.host == "mirror.test"]
    # After 3 failures in a row the mirror rests: later requests go straight to the next one.
    assert len(mirror_attempts) == 3


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_failover_on_gateway_errors_but_not_on_404(fake, status):
    fake.override = lambda r: registry_error(status, "UNAVAILABLE") if r.url.host == "mirror.test" else None
    route = {"name": "docker.io", "upstream": [MIRROR, REGISTRY], "default": True, "library": True}
    async with make_client(fake, [route]) as client:
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 200
    fake.override = lambda r: registry_error(404, "MANIFEST_UNKNOWN") if r.url.host == "mirror.test" else None
    async with make_client(fake, [route]) as client:
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 404


async def test_last_upstreams_5xx_is_relayed_and_all_resting_is_503(fake):
    fake.override = lambda r: registry_error(503, "UNAVAILABLE", "maintenance") if r.url.host != "auth.test" else None
    route = {"name": "docker.io", "upstream": [MIRROR, REGISTRY], "default": True, "library": True}
    async with make_client(fake, [route], Settings(breaker_failures=2, breaker_cooldown=60)) as client:
        first = await client.get("/v2/alpine/manifests/latest")
        assert first.status_code == 503
        assert errors(first)[0]["message"] == "maintenance"  # the upstream's own answer
        await client.get("/v2/alpine/manifests/latest")
        fake.requests.clear()
        resting = await client.get("/v2/alpine/manifests/latest")
    assert resting.status_code == 503
    assert "every upstream of docker.io is failing" in errors(resting)[0]["message"]
    assert int(resting.headers["retry-after"]) >= 1
    assert not fake.requests  # failing fast: nothing was sent


def test_breaker_half_opens_after_the_cooldown():
    now = [0.0]
    breaker = Breaker(threshold=2, cooldown=10, clock=lambda: now[0])
    breaker.failure("a")
    assert breaker.available("a")
    breaker.failure("a")
    assert not breaker.available("a")
    assert breaker.retry_after(["a"]) == 10
    now[0] = 10
    assert breaker.available("a")  # half-open: one try
    breaker.failure("a")
    assert not breaker.available("a")  # failed again: rests again
    now[0] = 20
    breaker.success("a")
    breaker.failure("a")
    assert breaker.available("a")  # a success reset the count


async def test_credentials_go_only_to_their_upstream(fake):
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
    async with make_client(fake, [route], env={"PW": "hunter2"}) as client:
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
async def test_a_realm_outside_the_policy_is_never_contacted(fake, realm):
    fake.override = lambda r: (
        response(401, b"", {"www-authenticate": f'Bearer realm="{realm}",service="x"'})
        if r.url.host == "registry.test"
        else None
    )
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with make_client(fake, [route]) as client:
        resp = await client.get("/v2/org/app/manifests/v1")
    assert resp.status_code == 502
    assert "refused address" in errors(resp)[0]["message"]
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
async def test_a_redirect_outside_the_policy_is_never_followed(fake, location):
    fake.override = lambda r: (
        response(307, b"", {"location": location})
        if "/blobs/" in r.url.path and r.url.host == "registry.test" and "authorization" in r.headers
        else None
    )
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with make_client(fake, [route]) as client:
        resp = await client.get("/v2/org/app/blobs/sha256:" + "a" * 64)
    assert resp.status_code == 502
    assert "refused address" in errors(resp)[0]["message"]
    assert {r.url.host for r in fake.requests} <= {"registry.test", "auth.test"}


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
async def test_allow_and_deny_lists(fake, path, status):
    route = {
        "name": "docker.io",
        "upstream": REGISTRY,
        "default": True,
        "library": True,
        "allow": ["library/*", "myorg/**"],
        "deny": ["library/bad*"],
    }
    async with make_client(fake, [route]) as client:
        resp = await client.get(path)
    assert resp.status_code == status
    if status == 403:
        assert errors(resp)[0]["code"] == "DENIED"
        assert "the gateway's policy refuses" in errors(resp)[0]["message"]
        assert not fake.requests


# --- request size -----------------------------------------------------------------------------


async def test_oversized_headers_are_refused(fake):
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with make_client(fake, [route]) as client:
        resp = await client.get("/v2/alpine/manifests/latest", headers={"accept": "a" * 9000})
        assert resp.status_code == 431
        assert errors(resp)[0]["code"] == "UNSUPPORTED"
        many = {f"x-h{i}": "v" * 1000 for i in range(40)}
        assert (await client.get("/v2/alpine/manifests/latest", headers=many)).status_code == 431
    assert not fake.requests


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


async def test_passthrough_ping_challenges_with_the_gateways_realm():
    fake = user_registry()
    async with make_client(fake, [PASS]) as client:
        resp = await client.get("/v2/", headers={"host": "ghcr.example.com", "x-forwarded-proto": "https"})
        assert resp.status_code == 401
        assert (
            resp.headers["www-authenticate"] == 'Bearer realm="https://ghcr.example.com/auth/token",service="ghcr.io"'
        )
        resp = await client.get("/v2/org/app/manifests/v1", headers={"host": "ghcr.example.com"})
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"].endswith(',scope="repository:org/app:pull"')
    assert not fake.requests  # no upstream request without the client's token


async def test_passthrough_login_and_pull():
    fake = user_registry()
    headers = {"host": "ghcr.example.com"}
    async with make_client(fake, [PASS]) as client:
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
        resp = await client.get("/v2/org/app/blobs/sha256:" + "a" * 64, headers=auth)
        assert resp.status_code == 200
        assert all("authorization" not in r.headers for r in fake.seen(CDN))
        # Wrong credentials: 401, and nothing cached from bob's login is handed out.
        wrong = await client.get("/auth/token", params={"service": "ghcr.io"}, headers=headers, auth=("eve", "guess"))
        assert wrong.status_code == 401
        assert errors(wrong)[0]["code"] == "UNAUTHORIZED"
        anonymous = await client.get("/v2/org/app/manifests/v1", headers=headers)
        assert anonymous.status_code == 401
        stale = await client.get("/v2/org/app/manifests/v1", headers={"authorization": "Bearer not-a-token", **headers})
        assert stale.status_code == 401
        assert "realm=" in stale.headers["www-authenticate"]


async def test_passthrough_scopes_in_path_prefix_mode_are_rewritten():
    fake = user_registry()
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True, "auth": "passthrough"}
    async with make_client(fake, [route]) as client:
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


async def test_token_endpoint_refuses_routes_that_do_not_pass_logins_through(fake):
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    async with make_client(fake, [route]) as client:
        resp = await client.get("/auth/token", params={"service": "docker.io"})
        assert resp.status_code == 404
        assert (await client.post("/auth/token")).status_code == 405
    assert not fake.requests


def test_passthrough_with_credentials_is_a_config_error():
    from gateway.routes import ConfigError

    with pytest.raises(ConfigError, match="passthrough route forwards its clients' logins"):
        parse_routes({"route": [{**PASS, "username": "u", "password_env": "P"}]}, "routes.toml", {"P": "x"})


# --- client authentication and rate limit -----------------------------------------------------


async def test_gateway_login_required(fake, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode() + "\n")
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True}
    async with make_client(fake, [route], Settings(htpasswd=htpasswd)) as client:
        resp = await client.get("/v2/")
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"].startswith('Basic realm="registry-gateway"')
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 401
        assert not fake.requests
        assert (await client.get("/v2/", auth=("alice", "pw"))).status_code == 200
        assert (await client.get("/v2/alpine/manifests/latest", auth=("alice", "pw"))).status_code == 200
        assert (await client.get("/v2/", auth=("alice", "nope"))).status_code == 401
        assert (await client.get("/healthz")).status_code == 200  # probes stay open


async def test_rate_limit_per_client(fake):
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    settings = Settings(rate_limit=0.5, rate_burst=3)
    async with make_client(fake, [route], settings) as client:
        statuses = [(await client.get("/v2/")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = await client.get("/v2/")
        assert errors(limited)[0]["code"] == "TOOMANYREQUESTS"
        assert int(limited.headers["retry-after"]) >= 1
        assert (await client.get("/metrics")).status_code == 200
    async with make_client(fake, [route], settings, client=("10.0.0.9", 1)) as other:
        # Another address has its own bucket (a new app here, but the point stands per key).
        assert (await other.get("/v2/")).status_code == 200
