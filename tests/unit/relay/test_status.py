"""``GET /status`` in process: the JSON and the HTML carry the same routes, errors and budgets, and no secret."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from gateway import sizing
from gateway.relay.status import render
from gateway.settings import Settings
from tests.unit.conftest import in_process_app, in_process_client
from tests.unit.fake_registry import REGISTRY, FakeRegistry, registry_error

ROUTES: list[dict[str, Any]] = [
    {"name": "docker.io", "upstream": REGISTRY, "hosts": ["docker.*"], "default": True, "library": True},
    {"name": "private.io", "upstream": REGISTRY, "hosts": ["private.*"], "username": "bob", "password_env": "PW"},
]


def client_of(fake: FakeRegistry, **settings: Any) -> httpx.AsyncClient:
    app = in_process_app(fake, ROUTES, Settings(manifest_cache_bytes=0, **settings), env={"PW": "hunter2"})
    return in_process_client(app, client=("198.51.100.9", 4321))


def missing(request: httpx.Request) -> httpx.Response | None:
    if "/manifests/" in request.url.path and "/missing/" in request.url.path:
        return registry_error(404, "MANIFEST_UNKNOWN")
    return None


async def test_json_lists_routes_upstreams_and_recent_errors(fake: FakeRegistry) -> None:
    fake.override = missing
    async with client_of(fake) as client:
        assert (await client.get("/v2/alpine/manifests/latest")).status_code == 200
        assert (await client.get("/v2/missing/x/manifests/1")).status_code == 404
        answer = await client.get("/status", headers={"accept": "application/json"})
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    data = answer.json()
    assert [r["name"] for r in data["routes"]] == ["docker.io", "private.io"]
    upstream = data["routes"][0]["upstreams"][0]
    assert upstream["url"] == REGISTRY
    assert upstream["breaker"] == "closed"
    assert upstream["requests"] == 2
    assert upstream["p99_seconds"] is not None
    assert upstream["last_error"]["status"] == 404
    assert [(e["status"], e["repository"]) for e in data["recent_errors"]] == [(404, "missing/x")]
    assert data["windows"]["budget_bytes"] == sizing.budget(None, 1, sizing.container_limit()).per_worker
    assert data["shared_fetches"] == []
    text = answer.text
    assert "198.51.100.9" not in text
    assert "hunter2" not in text
    assert "token-" not in text


async def test_html_shows_what_the_json_says(fake: FakeRegistry) -> None:
    fake.override = missing
    async with client_of(fake) as client:
        await client.get("/v2/missing/x/manifests/1")
        page = await client.get("/status?refresh=2")
        data = (await client.get("/status?format=json")).json()
    assert page.headers["content-type"].startswith("text/html")
    assert '<meta http-equiv="refresh" content="2">' in page.text
    rows = re.findall(r'<tr class="upstream[^"]*" data-route="([^"]+)" data-upstream="([^"]+)"', page.text)
    assert rows == [(r["name"], u["url"]) for r in data["routes"] for u in r["upstreams"]]
    assert len(re.findall(r'<tr class="error"', page.text)) == len(data["recent_errors"]) == 1
    assert "198.51.100.9" not in page.text
    assert "hunter2" not in page.text


async def test_client_addresses_only_when_the_operator_allows(fake: FakeRegistry) -> None:
    fake.override = missing
    async with client_of(fake, status_show_clients=True) as client:
        await client.get("/v2/missing/x/manifests/1")
        data = (await client.get("/status", headers={"accept": "application/json"})).json()
        page = (await client.get("/status")).text
    assert data["recent_errors"][0]["client"] == "198.51.100.9"
    assert "198.51.100.9" in page


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_other_methods_get_registry_errors(fake: FakeRegistry, method: str) -> None:
    async with client_of(fake) as client:
        answer = await client.request(method, "/status")
    assert answer.status_code == 405
    assert answer.json()["errors"][0]["code"] == "UNSUPPORTED"


def test_the_page_escapes_what_it_shows() -> None:
    hostile = "<script>alert(1)</script>"
    data: dict[str, Any] = {
        "gateway": {"version": "1", "pid": 1, "generated": "now", "uptime_seconds": 1.0},
        "routes": [{"name": hostile, "hosts": [], "upstreams": []}],
        "budgets": [],
        "shared_fetches": [],
        "windows": {"held_bytes": 0, "budget_bytes": 1},
        "recent_errors": [
            {
                "time": "t",
                "route": "r",
                "upstream": "u",
                "kind": "manifest",
                "method": "GET",
                "status": 404,
                "error": hostile,
                "repository": hostile,
            }
        ],
    }
    page = render(data, 5)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
