"""Who may use the gateway: htpasswd and token logins, the per-IP rate limit; alone and in the app."""

from __future__ import annotations

import base64

import bcrypt
import pytest

from gateway.http.errors import ConfigError
from gateway.routing.access import ClientAuth, RateLimiter
from gateway.settings import Settings
from tests.registry_json import registry_errors
from tests.unit.conftest import Clock
from tests.unit.fake_registry import REGISTRY


def test_rate_limiter_bucket(clock):
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0  # per key
    clock.now += 0.5
    assert limiter.take("a") == 0
    clock.now += 100
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]  # refills only up to the burst
    assert limiter.take("a") > 0


def test_rate_limiter_forgets_old_keys():
    limiter = RateLimiter(rate=1, burst=1, clock=Clock(), max_keys=10)
    for i in range(50):
        limiter.take(f"10.0.0.{i}")
    assert len(limiter._buckets) == 10


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def auth(tmp_path) -> ClientAuth:
    hashed = (
        bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")
    )  # as htpasswd -B writes
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"# users\nalice:{hashed}\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("ci-token-0123456789abcdef\n\n# comment\n")
    return ClientAuth(htpasswd, tokens)


@pytest.mark.parametrize(
    ("header", "who"),
    [
        (basic("alice", "s3cret"), "alice"),
        (basic("alice", "wrong"), None),
        (basic("bob", "s3cret"), None),
        ("Basic !!!notbase64", None),
        ("Basic " + base64.b64encode(b"no-colon").decode(), None),
        ("Bearer ci-token-0123456789abcdef", "token:"),
        ("Bearer ci-token-0123456789abcdeX", None),
        ("Negotiate abc", None),
        ("", None),
        (None, None),
    ],
)
async def test_client_auth(auth, header, who):
    result = await auth.authenticate(header)
    if who is None:
        assert result is None
    else:
        assert result is not None
        assert result.startswith(who)
        assert await auth.authenticate(header) == result  # cached path


@pytest.mark.parametrize(
    ("htpasswd", "tokens", "message"),
    [
        ("alice:plaintext\n", None, "not a 'user:bcrypt-hash' entry"),
        ("alice:{SHA}abc\n", None, "use htpasswd -B"),
        (None, "short\n", "at least 16 characters"),
        ("", "", "lists no user and no token"),
    ],
)
def test_client_auth_config_errors(tmp_path, htpasswd, tokens, message):
    h = t = None
    if htpasswd is not None:
        h = tmp_path / "htpasswd"
        h.write_text(htpasswd)
    if tokens is not None:
        t = tmp_path / "tokens"
        t.write_text(tokens)
    with pytest.raises(ConfigError, match=message):
        ClientAuth(h, t)


# --- client authentication and rate limit -----------------------------------------------------


async def test_gateway_login_required(gateway_client, fake, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode() + "\n")
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True}
    async with gateway_client([route], Settings(htpasswd=htpasswd)) as client:
        resp = await client.get("/v2/")
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"].startswith('Basic realm="registry-gateway"')
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 401
        assert not fake.requests
        assert (await client.get("/v2/", auth=("alice", "pw"))).status_code == 200
        assert (await client.get("/v2/alpine/manifests/latest", auth=("alice", "pw"))).status_code == 200
        assert (await client.get("/v2/", auth=("alice", "nope"))).status_code == 401
        assert (await client.get("/healthz")).status_code == 200  # probes stay open


async def test_rate_limit_per_client(gateway_client, fake):
    route = {"name": "docker.io", "upstream": REGISTRY, "default": True}
    settings = Settings(rate_limit=0.5, rate_burst=3)
    async with gateway_client([route], settings) as client:
        statuses = [(await client.get("/v2/")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = await client.get("/v2/")
        assert registry_errors(limited)[0]["code"] == "TOOMANYREQUESTS"
        assert int(limited.headers["retry-after"]) >= 1
        assert (await client.get("/metrics")).status_code == 200
    async with gateway_client([route], settings, client=("10.0.0.9", 1)) as other:
        # Another address has its own bucket (a new app here, but the point stands per key).
        assert (await other.get("/v2/")).status_code == 200
