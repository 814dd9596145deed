"""A real Prometheus (Debian's ``prometheus``) scrapes a real gateway during real pulls, and runs our queries.

The gateway runs as a process over the test bed (docker.io through a ``HubFront``, so the Docker
Hub budget is reported; ghcr.io with the bed's credentials). skopeo copies images through it, and
some pulls fail (tags that do not exist). Prometheus, on 127.0.0.1 with a temporary config,
scrapes it every second and evaluates deploy/observability/alerts.yaml every second. Then:

- every query of every panel of deploy/observability/dashboard.json, with Grafana's variables
  substituted (``$instance``, ``$route`` as "All" and as one route, ``$__rate_interval``),
  comes back ``success``, and the panels that must have data after those pulls have it;
- the dashboard's variable queries find the gateway's instance and routes;
- every rule's health is ``ok`` once evaluated, and no alert is pending or firing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.clients import Skopeo
from tests.support import Gateway, run_gateway, wait_for
from tests.testbed._util import ManagedProcess, free_port, tail
from tests.testbed.bed import Testbed
from tests.testbed.hubfront import HubFront

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
JOB = "registry-gateway"
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes with a 1 s scrape is shorter; 1m is safe
# Panels that show data after a few successful and failing pulls of a healthy gateway.
MUST_HAVE_DATA = {
    "Gateways up",
    "Requests per second",
    "Streams in flight",
    "Requests by route and status",
    "Errors by route and status",
    "Bytes out by route",
    "Latency p50 / p99 (manifests, blobs)",
    "Upstream latency p50 / p99 by route",
    "Token fetches vs cache hits",
    "Docker Hub budget: remaining vs limit",
    "Shared fetches in flight",
    "Readers per fetch",
    "Blob GETs by role (detaches, bypasses)",
    "Upstream bytes saved",
    "Digest checks by result",
    "Streams in flight by route",
    "Window memory vs budget",
    "Process RSS",
    "Process CPU",
    "asyncio tasks",
}


@dataclass
class Prometheus:
    url: str
    process: ManagedProcess

    def api(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10, trust_env=False)
        body = answer.json()
        assert answer.status_code == 200, body
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def require_prometheus() -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (scripts/install installs it)")


@pytest.fixture(scope="module")
def hub_front(testbed: Testbed) -> Iterator[HubFront]:
    # A budget so large that the test's pulls never get near it: the gateway stays healthy.
    with HubFront(testbed.hub.registry_url, limit=100_000) as front:
        yield front


@pytest.fixture(scope="module")
def observed_gateway(
    testbed: Testbed, hub_front: HubFront, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    routes = f"""
[[route]]
name = "docker.io"
upstream = "{hub_front.url}"
allow_private_addresses = true
hosts = ["docker.*"]
default = true
library = true

[[route]]
name = "ghcr.io"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
hosts = ["ghcr.*"]
username_env = "E2E_GHCR_USER"
password_env = "E2E_GHCR_PASS"
"""
    env = {"E2E_GHCR_USER": testbed.credentials.username, "E2E_GHCR_PASS": testbed.credentials.password}
    with run_gateway(routes, tmp_path_factory.mktemp("observed-gateway"), env=env) as gw:
        yield gw


@pytest.fixture(scope="module")
def prometheus(observed_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    require_prometheus()
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(OBSERVABILITY / "alerts.yaml")],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{observed_gateway.port}"]}]}],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    process = ManagedProcess(
        "prometheus",
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        log_path=workdir / "prometheus.log",
        cwd=workdir,
    )
    server = Prometheus(f"http://127.0.0.1:{port}", process)
    try:

        def ready() -> bool:
            process.check_alive()
            try:
                return httpx.get(f"{server.url}/-/ready", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, timeout=60), tail(process.log_path)
        yield server
    finally:
        process.stop()


def gateway_requests(gw: Gateway) -> float:
    """The gateway's own count of registry requests (those of a route; scrapes have none)."""
    total = 0.0
    for line in httpx.get(f"{gw.url}/metrics", timeout=10, trust_env=False).text.splitlines():
        if line.startswith("registry_gateway_requests_total{") and 'route="-"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def pulled(
    prometheus: Prometheus, observed_gateway: Gateway, skopeo: Skopeo, tmp_path_factory: pytest.TempPathFactory
) -> Prometheus:
    """Real pulls through the gateway, some failing, all of them scraped."""
    port = observed_gateway.port
    work = tmp_path_factory.mktemp("pulls")
    # Two copies of the same image at once share blob fetches; the others run alone.
    sources = [f"docker.gw.test:{port}/library/alpine:3.20", f"docker.gw.test:{port}/library/alpine:3.20"]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: skopeo.copy_all(sources[i], work / f"alpine-{i}"), range(2)))
    skopeo.copy_all(f"ghcr.gw.test:{port}/org/app:v1", work / "app")
    skopeo.copy_all(f"docker.gw.test:{port}/someorg/tool:1.0", work / "tool")
    for missing in (f"docker.gw.test:{port}/library/alpine:no-such-tag", f"ghcr.gw.test:{port}/org/nothing:v1"):
        with pytest.raises(AssertionError, match="failed"):
            skopeo("inspect", "--tls-verify=false", f"docker://{missing}")
    instance = f'instance="127.0.0.1:{port}"'
    expr = f'sum(registry_gateway_requests_total{{{instance}, route!="-"}})'
    # Prometheus has scraped everything the pulls did (the gateway counts a request just after its
    # answer, so its own figure is read again each time).
    assert wait_for(lambda: prometheus.value(expr) == gateway_requests(observed_gateway), timeout=60), (
        prometheus.value(expr),
        gateway_requests(observed_gateway),
    )
    # ... and at least a few scrapes since, so that rates over the last minute see the pulls' counters move.
    scrapes = f'count_over_time(up{{job="{JOB}", {instance}}}[1m])'
    first = prometheus.value(scrapes) or 0
    assert wait_for(lambda: (prometheus.value(scrapes) or 0) >= first + 3, timeout=60)
    return prometheus


def dashboard_targets() -> list[tuple[str, str]]:
    board = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row" for t in p["targets"]]


def substitute(expr: str, instance: str, route: str) -> str:
    """Grafana's variables as it sends them to Prometheus: "All" is the variables' allValue ``.*``."""
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("${datasource}", "")
        .replace("$instance", instance)
        .replace("$route", route)
    )


def test_every_dashboard_query_succeeds_and_the_panels_that_must_have_data_do(
    pulled: Prometheus, observed_gateway: Gateway
) -> None:
    instance = f"127.0.0.1:{observed_gateway.port}".replace(".", "\\\\.")  # a regex in PromQL's string
    with_data: set[str] = set()
    for title, expr in dashboard_targets():
        for route in (".*", "docker\\\\.io"):
            result = pulled.query(substitute(expr, instance, route))  # asserts status success
            if result and route == ".*":
                with_data.add(title)
    titles = {title for title, _ in dashboard_targets()}
    assert titles >= MUST_HAVE_DATA
    assert sorted(MUST_HAVE_DATA - with_data) == []


def test_the_dashboard_variables_find_the_gateway_and_its_routes(pulled: Prometheus, observed_gateway: Gateway) -> None:
    instances = pulled.api("label/instance/values", **{"match[]": "registry_gateway_requests_total"})
    assert f"127.0.0.1:{observed_gateway.port}" in instances
    routes = pulled.api("label/route/values", **{"match[]": 'registry_gateway_requests_total{instance=~".*"}'})
    assert {"docker.io", "ghcr.io"} <= set(routes)


def test_every_rule_is_healthy_and_none_fires_on_a_healthy_gateway(pulled: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = pulled.api("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    expected = sum(1 for line in (OBSERVABILITY / "alerts.yaml").read_text().splitlines() if "- alert:" in line)
    # Evaluated at least once since the pulls were scraped (evaluation_interval 1 s).
    assert wait_for(
        lambda: len(rules := evaluated()) == expected and all(r["health"] != "unknown" for r in rules), timeout=30
    )
    rules = evaluated()
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    assert [r["name"] for r in rules if r["state"] != "inactive"] == []
    assert pulled.api("alerts")["alerts"] == []
