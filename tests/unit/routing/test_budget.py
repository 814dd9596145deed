"""The pull budget: Docker Hub's rate-limit headers parsed, kept per route and credential, shown and warned about.

The parser and the store on their own, then the relay in process (``httpx.MockTransport``): the
gauges, the 429 counter, the warnings (once per crossing), the status endpoint and who may read
it, and that no secret appears anywhere.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from pydantic import ValidationError

from gateway.routing.budget import ANONYMOUS, CLIENT, BudgetStore, Quota, parse_quota, parse_thresholds
from gateway.settings import Settings
from tests.unit.conftest import Clock, in_process_app, in_process_client
from tests.unit.fake_registry import MANIFEST, REGISTRY, FakeRegistry, registry_error, response

OCI = "application/vnd.oci.image.manifest.v1+json"


# ---------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "quota"),
    [
        ("100;w=21600", Quota(100, 21600)),
        (" 76 ; w=21600 ", Quota(76, 21600)),
        ("100", Quota(100, None)),
        ("0;w=60", Quota(0, 60)),
        ('10;W="60"', Quota(10, 60)),
        ("100;w=21600, 1000;w=86400", Quota(100, 21600)),  # a list: its first item
        ("5;q=1;w=30", Quota(5, 30)),
        ("5;w=soon", Quota(5, None)),
        ("", None),
        (None, None),
        ("-1;w=60", None),
        ("lots", None),
        ("1" * 20, None),
    ],
)
def test_parse_quota(text: str | None, quota: Quota | None) -> None:
    assert parse_quota(text) == quota


def test_thresholds_are_fractions_of_the_limit() -> None:
    assert parse_thresholds("0.05, 0.5,0.2") == (0.5, 0.2, 0.05)
    assert parse_thresholds("") == ()
    assert Settings().budget_thresholds() == (0.5, 0.2, 0.05)
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ValidationError):
            Settings(budget_warn_at=bad)


# ---------------------------------------------------------------------- the store
def observe(store: BudgetStore, remaining: int, limit: int = 100, credential: str = ANONYMOUS) -> float | None:
    seen = store.observe("r", credential, limit=f"{limit};w=60", remaining=f"{remaining};w=60", source="192.0.2.1")
    assert seen is not None
    _, crossing = seen
    return crossing.threshold if crossing is not None else None


def test_a_warning_once_per_crossing_and_again_after_a_refill() -> None:
    store = BudgetStore((0.5, 0.2, 0.05))
    assert [observe(store, r) for r in (90, 60, 51, 50, 49, 30, 20, 19, 6, 5, 4, 0, 0)] == [
        None,
        None,
        None,
        0.5,
        None,
        None,
        0.2,
        None,
        None,
        0.05,
        None,
        None,
        None,
    ]
    assert observe(store, 100) is None  # a new window: re-armed
    assert observe(store, 45) == 0.5
    assert observe(store, 1) == 0.05  # several at once: one warning, naming the lowest
    assert observe(store, 30) is None  # rose above 0.2 and 0.05 (re-armed), still under 0.5
    assert observe(store, 10) == 0.2


def test_the_first_answer_below_a_threshold_warns() -> None:
    store = BudgetStore((0.5, 0.2))
    assert observe(store, 10) == 0.2


def test_passthrough_budgets_are_kept_but_never_warned_about() -> None:
    store = BudgetStore((0.5,))
    assert observe(store, 1, credential=CLIENT) is None
    budget = store.get("r", CLIENT)
    assert budget is not None
    assert budget.remaining == 1


def test_the_store_keeps_the_latest_values_and_is_bounded() -> None:
    clock = Clock(1_700_000_000.0)
    store = BudgetStore(clock=clock, max_entries=3)
    assert store.observe("r", ANONYMOUS, limit=None, remaining=None) is None  # no budget: nothing kept
    assert len(store) == 0
    store.observe("r", "user:bob", limit="100;w=21600", remaining="99;w=21600", source=" 192.0.2.1 ", upstream="u")
    clock.now += 5
    store.observe("r", "user:bob", limit=None, remaining="98;w=21600")
    store.rate_limited("r", "user:bob", "60")
    [doc] = store.snapshot()
    assert doc == {
        "route": "r",
        "credential": "user:bob",
        "limit": 100,
        "remaining": 98,
        "window_seconds": 21600,
        "source": "192.0.2.1",
        "upstream": "u",
        "updated": "2023-11-14T22:13:25+00:00",
        "age_seconds": 0.0,
        "rate_limited": 1,
        "retry_after": 60,
    }
    for name in ("a", "b", "c"):
        store.observe(name, ANONYMOUS, limit="1", remaining="1")
    assert len(store) == 3
    assert store.get("r", "user:bob") is None  # the least recently seen went


# ---------------------------------------------------------------------- the relay
class Hub:
    """The fake registry answering manifests like Docker Hub: the budget headers, 429 past the limit."""

    def __init__(self, limit: int = 10) -> None:
        self.limit = limit
        self.pulls = 0
        self.headers = True
        self.fake = FakeRegistry()
        self.fake.override = self._manifest

    def _manifest(self, request: httpx.Request) -> httpx.Response | None:
        if "/manifests/" not in request.url.path or "authorization" not in request.headers:
            return None
        budget = {
            "ratelimit-limit": f"{self.limit};w=21600",
            "docker-ratelimit-source": "192.0.2.1",
        }
        if request.method == "GET" and self.pulls >= self.limit:
            budget["ratelimit-remaining"] = "0;w=21600"
            return registry_error(429, "TOOMANYREQUESTS", "pull rate limit", {"retry-after": "3600", **budget})
        if request.method == "GET":
            self.pulls += 1
        budget["ratelimit-remaining"] = f"{self.limit - self.pulls};w=21600"
        headers = {"content-type": OCI, "content-length": str(len(MANIFEST))}
        return response(200, b"" if request.method == "HEAD" else MANIFEST, headers | (budget if self.headers else {}))


def routes(name: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": name, "upstream": REGISTRY, "default": True, "library": True, **extra}]


def sample(metrics_text: str, metric: str, **labels: str) -> float | None:
    for line in metrics_text.splitlines():
        match = re.match(r"([a-zA-Z_:]+)\{(.*)\} (\S+)$", line)
        if match is None or match[1] != metric:
            continue
        if dict(re.findall(r'(\w+)="([^"]*)"', match[2])) == labels:
            return float(match[3])
    return None


async def test_the_gauges_and_the_status_track_the_upstreams_count(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub(limit=10)
    app = in_process_app(hub.fake, routes("budget-anon.test"), Settings(manifest_cache_bytes=0, budget_warn_at="0.5"))
    caplog.set_level(logging.WARNING, logger="gateway.proxy")
    async with in_process_client(app) as client:
        for pull in range(1, 8):
            assert (await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})).status_code == 200
            text = (await client.get("/metrics")).text
            labels = {"route": "budget-anon.test", "credential": ANONYMOUS}
            assert sample(text, "registry_gateway_upstream_budget_remaining", **labels) == 10 - pull
            assert sample(text, "registry_gateway_upstream_budget_limit", **labels) == 10
            assert sample(text, "registry_gateway_upstream_budget_window_seconds", **labels) == 21600
        # A HEAD is not a pull, but its answer says the same.
        assert (await client.head("/v2/alpine/manifests/3.20", headers={"accept": OCI})).status_code == 200
        status = await client.get("/status/budget")
        assert status.status_code == 200
        assert status.headers["cache-control"] == "no-store"
        [doc] = status.json()["budgets"]
        assert (doc["route"], doc["credential"], doc["limit"], doc["remaining"], doc["window_seconds"]) == (
            "budget-anon.test",
            ANONYMOUS,
            10,
            3,
            21600,
        )
        assert doc["source"] == "192.0.2.1"
        assert doc["upstream"] == REGISTRY
        assert status.json()["warn_at"] == [0.5]
    warnings = [f for r in caplog.records if (f := getattr(r, "fields", {})).get("event") == "budget_low"]
    assert [(w["remaining"], w["limit"], w["threshold"], w["credential"]) for w in warnings] == [
        (5, 10, 0.5, ANONYMOUS)
    ]


async def test_every_429_is_counted_and_passed_on_as_registry_json() -> None:
    hub = Hub(limit=2)
    app = in_process_app(hub.fake, routes("budget-429.test"))
    async with in_process_client(app) as client:
        statuses = [
            (await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})).status_code for _ in range(5)
        ]
        refused = await client.get("/v2/alpine/manifests/3.20", headers={"accept": OCI})
        text = (await client.get("/metrics")).text
        [doc] = (await client.get("/status/budget")).json()["budgets"]
    assert statuses == [200, 200, 429, 429, 429]
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert refused.headers["retry-after"] == "3600"
    assert refused.headers["ratelimit-remaining"] == "0;w=21600"  # clients and operators see them too
    labels = {"route": "budget-429.test", "credential": ANONYMOUS}
    assert sample(text, "registry_gateway_upstream_rate_limited_total", **labels) == 4
    assert sample(text, "registry_gateway_upstream_budget_remaining", **labels) == 0
    assert (doc["rate_limited"], doc["retry_after"], doc["remaining"]) == (4, 3600, 0)


async def test_a_429_without_headers_is_counted_too() -> None:
    fake = FakeRegistry()
    fake.override = lambda r: registry_error(429, "TOOMANYREQUESTS") if "authorization" in r.headers else None
    async with in_process_client(in_process_app(fake, routes("budget-bare.test"))) as client:
        assert (await client.get("/v2/alpine/manifests/3.20")).status_code == 429
        text = (await client.get("/metrics")).text
        [doc] = (await client.get("/status/budget")).json()["budgets"]
    assert sample(text, "registry_gateway_upstream_rate_limited_total", route="budget-bare.test", credential=ANONYMOUS)
    assert (doc["rate_limited"], doc["limit"], doc["remaining"]) == (1, None, None)


async def test_answers_without_the_headers_leave_no_trace() -> None:
    hub = Hub()
    hub.headers = False
    async with in_process_client(in_process_app(hub.fake, routes("budget-none.test"))) as client:
        assert (await client.get("/v2/alpine/manifests/3.20")).status_code == 200
        assert (await client.get("/status/budget")).json()["budgets"] == []


async def test_the_credential_is_the_routes_identity_never_its_secret() -> None:
    hub = Hub()
    route = routes("budget-user.test", username="bob", password_env="HUB_TOKEN")
    app = in_process_app(hub.fake, route, Settings(manifest_cache_bytes=0), env={"HUB_TOKEN": "s3cret-hub-token"})
    async with in_process_client(app) as client:
        await client.get("/v2/alpine/manifests/3.20")
        status = (await client.get("/status/budget")).text
        text = (await client.get("/metrics")).text
    assert '"credential":"user:bob"' in status
    assert sample(text, "registry_gateway_upstream_budget_remaining", route="budget-user.test", credential="user:bob")
    for shown in (status, text):
        assert "s3cret" not in shown


async def test_passthrough_routes_count_as_client() -> None:
    hub = Hub()
    bearer = "Bearer " + json.loads(hub.fake(httpx.Request("GET", "https://auth.test/token")).read())["token"]
    # By host name: the upstream's own token is passed through as is (on a shared host it would
    # have to be one of the gateway's grants, grants.py).
    route = [{"name": "budget-pass.test", "upstream": REGISTRY, "hosts": ["pass.*"], "auth": "passthrough"}]
    async with in_process_client(in_process_app(hub.fake, route)) as client:
        headers = {"authorization": bearer, "host": "pass.gateway.test"}
        assert (await client.get("/v2/org/app/manifests/v1", headers=headers)).status_code == 200
        [doc] = (await client.get("/status/budget")).json()["budgets"]
    assert (doc["credential"], doc["remaining"]) == (CLIENT, 9)


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text("ops:" + bcrypt.hashpw(b"ops-pass", bcrypt.gensalt(rounds=4)).decode() + "\n")
    return path


async def test_the_status_is_behind_the_clients_login_when_that_is_on(htpasswd: Path) -> None:
    hub = Hub()
    app = in_process_app(hub.fake, routes("budget-auth.test"), Settings(manifest_cache_bytes=0, htpasswd=htpasswd))
    login = {"authorization": "Basic " + base64.b64encode(b"ops:ops-pass").decode()}
    async with in_process_client(app) as client:
        refused = await client.get("/status/budget")
        assert refused.status_code == 401
        assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert "basic" in refused.headers["www-authenticate"].lower()
        assert (await client.get("/v2/alpine/manifests/3.20", headers=login)).status_code == 200
        allowed = await client.get("/status/budget", headers=login)
        assert allowed.status_code == 200
        assert allowed.json()["budgets"][0]["remaining"] == 9
        # Health and metrics stay open for probes and scrapers.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        # Other methods: registry JSON, like every error.
        wrong = await client.post("/status/budget", headers=login)
        assert wrong.status_code == 405
        assert wrong.json()["errors"][0]["code"] == "UNSUPPORTED"
