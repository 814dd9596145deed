"""The Docker Hub pull budget, end to end: seen, spent sparingly, and never the reason a pull fails.

The gateway (a real process) reaches the test bed's hub registry through ``HubFront``
(``tests/testbed/hubfront.py``), which keeps Docker Hub's accounting: it counts manifest GETs per
credential (anonymous: per client address), sends ``ratelimit-limit`` / ``ratelimit-remaining``
/ ``docker-ratelimit-source`` on manifest answers and answers ``429 TOOMANYREQUESTS`` past its
limit. Each test starts its own front and gateway, so every count it reads is its own.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.clients import Containerd
from tests.support import Gateway, run_gateway
from tests.testbed.bed import Testbed
from tests.testbed.hubfront import HubFront

pytestmark = pytest.mark.e2e

ANONYMOUS_KEY = "127.0.0.1"  # the front counts anonymous pulls per client address: the gateway's
PLATFORM = "linux/amd64"
# What containerd's resolver sends (core/remotes/docker/resolver.go).
CONTAINERD_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
)

MakeFront = Callable[..., HubFront]
StartGateway = Callable[..., Gateway]


@pytest.fixture
def fronts(testbed: Testbed) -> Iterator[MakeFront]:
    with ExitStack() as stack:

        def make(**options: Any) -> HubFront:
            return stack.enter_context(HubFront(testbed.hub.registry_url, **options))

        yield make


@pytest.fixture
def start_gateway(testbed: Testbed, tmp_path: Path) -> Iterator[StartGateway]:
    with ExitStack() as stack:

        def start(front: HubFront, env: dict[str, str] | None = None) -> Gateway:
            # tests/e2e/conftest.gateway_routes' docker.io route, its upstream the front; and the
            # same upstream again with an account, for the per-credential count.
            routes = f"""
[[route]]
name = "docker.io"
upstream = "{front.url}"
allow_private_addresses = true
hosts = ["docker.*"]
default = true
library = true

[[route]]
name = "account-hub.test"
upstream = "{front.url}"
allow_private_addresses = true
hosts = ["account.*"]
library = true
username_env = "E2E_HUB_USER"
password_env = "E2E_HUB_PASS"
"""
            account = {
                "E2E_HUB_USER": testbed.other_credentials.username,
                "E2E_HUB_PASS": testbed.other_credentials.password,
            }
            return stack.enter_context(run_gateway(routes, tmp_path / "gateway", env={**account, **(env or {})}))

        yield start


# ---------------------------------------------------------------------- reading what happened
def log_events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    return [entry for line in gw.log_lines() if (entry := json.loads(line)).get("event") == event]


def metric(gw: Gateway, name: str, **labels: str) -> float | None:
    """The value of ``name``'s sample with exactly these labels; None when there is none."""
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        match = re.match(r"([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match[1] != name:
            continue
        if dict(re.findall(r'(\w+)="([^"]*)"', match[2] or "")) == labels:
            return float(match[3])
    return None


def budget_of(gw: Gateway, route: str, credential: str) -> dict[str, Any]:
    status = httpx.get(f"{gw.url}/status/budget")
    assert status.status_code == 200
    [doc] = [b for b in status.json()["budgets"] if (b["route"], b["credential"]) == (route, credential)]
    return dict(doc)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Whether ``predicate`` came true (the gateway logs a request just after its answer)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---------------------------------------------------------------------- see the budget
def test_the_gauges_and_the_status_track_the_hub_fronts_count(
    testbed: Testbed, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    front = fronts(limit=6, window=21600, retry_after=1800)
    # No manifest cache: every client GET is an upstream GET, each one a pull.
    gw = start_gateway(front, {"GATEWAY_MANIFEST_CACHE_BYTES": "0", "GATEWAY_BUDGET_WARN_AT": "0.5,0.2"})
    alpine = testbed.images["alpine"]
    url = f"{gw.url}/v2/library/alpine/manifests/{alpine.tag}"
    anonymous = {"route": "docker.io", "credential": "anonymous"}
    statuses = []
    for pull in range(1, 10):
        answer = httpx.get(url, headers={"accept": CONTAINERD_ACCEPT})
        statuses.append(answer.status_code)
        assert front.pulls(ANONYMOUS_KEY) == min(pull, 6)
        # The gateway's view is the front's own count, after every pull.
        assert metric(gw, "registry_gateway_upstream_budget_remaining", **anonymous) == front.remaining(ANONYMOUS_KEY)
        assert metric(gw, "registry_gateway_upstream_budget_limit", **anonymous) == 6
        assert metric(gw, "registry_gateway_upstream_budget_window_seconds", **anonymous) == 21600
        doc = budget_of(gw, "docker.io", "anonymous")
        assert (doc["remaining"], doc["limit"], doc["window_seconds"]) == (front.remaining(ANONYMOUS_KEY), 6, 21600)
        assert doc["source"] == ANONYMOUS_KEY
        if answer.status_code == 429:
            assert answer.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert answer.headers["retry-after"] == "1800"
    assert statuses == [200] * 6 + [429] * 3
    refused = len(front.manifest_requests("GET", status=429))
    assert refused == 3
    assert metric(gw, "registry_gateway_upstream_rate_limited_total", **anonymous) == refused
    assert budget_of(gw, "docker.io", "anonymous")["rate_limited"] == refused

    # A HEAD is no pull: the count stays, the answer still says it.
    assert httpx.head(url, headers={"accept": CONTAINERD_ACCEPT}).status_code == 200
    assert front.pulls(ANONYMOUS_KEY) == 6

    # The account's pulls are its own count, under its identity (never its password).
    for _ in range(2):
        answer = httpx.get(url, headers={"accept": CONTAINERD_ACCEPT, "host": "account.gw.test"})
        assert answer.status_code == 200
    user = testbed.other_credentials.username
    assert front.pulls(user) == 2
    account = {"route": "account-hub.test", "credential": f"user:{user}"}
    assert metric(gw, "registry_gateway_upstream_budget_remaining", **account) == front.remaining(user) == 4
    doc = budget_of(gw, "account-hub.test", f"user:{user}")
    assert (doc["remaining"], doc["source"]) == (4, user)
    assert metric(gw, "registry_gateway_upstream_budget_remaining", **anonymous) == 0  # untouched

    # Warnings: once per threshold crossed (6 -> 3 is 0.5, -> 1 is 0.2), not once per request.
    assert wait_for(lambda: len(log_events(gw, "budget_low")) >= 2)
    lows = [(e["route"], e["credential"], e["remaining"], e["threshold"]) for e in log_events(gw, "budget_low")]
    assert lows == [("docker.io", "anonymous", 3, 0.5), ("docker.io", "anonymous", 1, 0.2)]
    status_text = httpx.get(f"{gw.url}/status/budget").text
    metrics_text = httpx.get(f"{gw.url}/metrics").text
    for where in (status_text, metrics_text, gw.log.read_text()):
        assert testbed.other_credentials.password not in where


# ---------------------------------------------------------------------- spend less
async def _rollout_client(base: str, repo: str, tag: str, style: str) -> str:
    """One client's pull of the tag's manifests; the platform manifest's digest it ended with."""
    headers = {"accept": CONTAINERD_ACCEPT}
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        if style == "containerd":
            # HEAD the tag (resolve), GET the index by digest, GET the platform manifest by digest.
            head = await client.head(f"/v2/{repo}/manifests/{tag}?ns=docker.io", headers=headers)
            assert head.status_code == 200
            index_digest = head.headers["docker-content-digest"]
            index = await client.get(f"/v2/{repo}/manifests/{index_digest}?ns=docker.io", headers=headers)
        else:  # containers/image (skopeo, podman, CRI-O): GET the tag, then the platform manifest by digest
            index = await client.get(f"/v2/{repo}/manifests/{tag}", headers=headers)
        assert index.status_code == 200
        [platform] = [
            m["digest"] for m in index.json()["manifests"] if m["platform"]["architecture"] == PLATFORM.split("/")[1]
        ]
        manifest = await client.get(f"/v2/{repo}/manifests/{platform}?ns=docker.io", headers=headers)
        assert manifest.status_code == 200
        return str(platform)


def rollout(gw: Gateway, repo: str, tag: str, clients: int, style: str = "containerd") -> set[str]:
    async def run() -> list[str]:
        return await asyncio.gather(*(_rollout_client(gw.url, repo, tag, style) for _ in range(clients)))

    return set(asyncio.run(run()))


@pytest.mark.parametrize("style", ["containerd", "containers-image"])
def test_a_rollout_to_100_clients_costs_two_counted_gets_per_tag(
    testbed: Testbed, fronts: MakeFront, start_gateway: StartGateway, style: str
) -> None:
    """100 clients at once: one HEAD (containerd) and two counted GETs reach the hub, whatever the number."""
    front = fronts(limit=1000)
    gw = start_gateway(front)  # the default manifest cache: tags 30 s, digests an hour
    alpine = testbed.images["alpine"]
    assert rollout(gw, alpine.repo, alpine.tag, 100, style) == {alpine.platforms[PLATFORM]}
    counted = [r for r in front.requests if r.counted]
    assert len(counted) == 2  # the figure: 2 counted GETs per tag per tag TTL, for 100 clients
    assert front.pulls(ANONYMOUS_KEY) == 2
    assert {r.reference for r in counted} == (
        {alpine.digest, alpine.platforms[PLATFORM]}
        if style == "containerd"
        else {alpine.tag, alpine.platforms[PLATFORM]}
    )
    assert len(front.manifest_requests("HEAD")) == (1 if style == "containerd" else 0)
    # The gateway's budget says the same.
    anonymous = {"route": "docker.io", "credential": "anonymous"}
    assert metric(gw, "registry_gateway_upstream_budget_remaining", **anonymous) == 998
    if style == "containerd":
        # A second wave of 100 costs no pull at all: its GETs are by digest (kept an hour).
        rollout(gw, alpine.repo, alpine.tag, 100, style)
        assert front.pulls(ANONYMOUS_KEY) == 2


def test_later_tag_lifetimes_cost_a_head_and_no_pull(
    testbed: Testbed, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """Tags kept 1 s: each wave after the tag expired asks the hub again, by HEAD; the digests stay cached."""
    front = fronts(limit=1000)
    gw = start_gateway(front, {"GATEWAY_MANIFEST_CACHE_TAG_TTL": "1"})
    alpine = testbed.images["alpine"]
    for _ in range(3):
        rollout(gw, alpine.repo, alpine.tag, 30)
        time.sleep(1.2)  # past the tag's lifetime
    assert len(front.manifest_requests("HEAD")) >= 3  # every wave asked again: the tag expired
    assert front.pulls(ANONYMOUS_KEY) == 2  # and spent nothing after the first


# ---------------------------------------------------------------------- stale rather than fail
@pytest.mark.parametrize("failure", ["429", "stopped"])
def test_ctr_pulls_an_image_pulled_before_from_stale_tag_answers(
    testbed: Testbed, fronts: MakeFront, start_gateway: StartGateway, containerd: Containerd, failure: str
) -> None:
    front = fronts(limit=1000)
    gw = start_gateway(front, {"GATEWAY_MANIFEST_CACHE_TAG_TTL": "1"})
    alpine = testbed.images["alpine"]
    ref = f"docker.io/{alpine.repo}:{alpine.tag}"
    hosts = containerd.hosts_dir({"docker.io": gw.url})
    containerd.remove_all()
    try:
        containerd.pull(ref, hosts)
        assert containerd.image_digest(ref) == alpine.digest
        time.sleep(1.2)  # the tag's answer is past its lifetime: the next pull asks the hub
        if failure == "429":
            front.refuse_all = True
        else:
            front.stop()
        containerd.pull(ref, hosts)
        assert containerd.image_digest(ref) == alpine.digest
    finally:
        containerd.remove_all()

    reason = "rate_limited" if failure == "429" else "unreachable"
    assert wait_for(lambda: bool(log_events(gw, "manifest_stale")))
    [event, *_] = log_events(gw, "manifest_stale")
    assert event["level"] == "warning"
    assert (event["route"], event["repository"], event["reference"], event["reason"]) == (
        "docker.io",
        alpine.repo,
        alpine.tag,
        reason,
    )
    if failure == "429":
        assert event["upstream_status"] == 429
        assert front.manifest_requests("HEAD", status=429)  # the hub really refused
    tag_answers = [
        a
        for a in log_events(gw, "access")
        if a["path"].endswith(f"/manifests/{alpine.tag}") and a.get("cache") == "stale"
    ]
    assert tag_answers
    assert {a["status"] for a in tag_answers} == {200}
    assert (metric(gw, "registry_gateway_manifest_stale_total", route="docker.io", reason=reason) or 0) >= 1


def test_a_stale_answer_says_so(testbed: Testbed, fronts: MakeFront, start_gateway: StartGateway) -> None:
    front = fronts(limit=1000)
    gw = start_gateway(front, {"GATEWAY_MANIFEST_CACHE_TAG_TTL": "1"})
    alpine = testbed.images["alpine"]
    url = f"{gw.url}/v2/library/alpine/manifests/{alpine.tag}"
    fresh = httpx.get(url, headers={"accept": CONTAINERD_ACCEPT})
    assert fresh.status_code == 200
    assert "warning" not in fresh.headers
    time.sleep(1.2)
    front.refuse_all = True
    stale = httpx.get(url, headers={"accept": CONTAINERD_ACCEPT})
    assert stale.status_code == 200
    assert stale.headers["warning"] == '110 - "Response is Stale"'
    assert stale.content == fresh.content == alpine.manifest
    # Held for a tag lifetime: the herd behind it does not knock at the refusing hub again.
    refusals = len(front.manifest_requests("GET", status=429))
    for _ in range(5):
        assert httpx.get(url, headers={"accept": CONTAINERD_ACCEPT}).headers["warning"].startswith("110")
    assert len(front.manifest_requests("GET", status=429)) <= refusals + 1
