"""The Docker Hub pull budget, end to end: seen, spent sparingly, and never the reason a pull fails.

The gateway (a real process) reaches the test bed's hub registry through ``HubFront``
(``tests/testbed/hubfront.py``), which keeps Docker Hub's accounting: it counts manifest GETs per
credential (anonymous: per client address), sends ``ratelimit-limit`` / ``ratelimit-remaining``
/ ``docker-ratelimit-source`` on manifest answers and answers ``429 TOOMANYREQUESTS`` past its
limit. Each test starts its own front and gateway, so every count it reads is its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.clients import Containerd, Dockerd, start_dockerd
from tests.support import Gateway, run_gateway, wait_for
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


# ---------------------------------------------------------------------- pool accounts
POOL = {"hub-a": "E2E_HUB_A", "hub-b": "E2E_HUB_B"}  # account name -> the prefix of its variables


def pool_routes(first: HubFront, second: HubFront) -> str:
    """The docker.io route with two pooled accounts for ``first``; ``second`` is asked after it, anonymously."""
    accounts = "".join(
        f"""
[[route.credentials]]
name = "{name}"
username_env = "{prefix}_USER"
password_env = "{prefix}_PASS"
"""
        for name, prefix in POOL.items()
    )
    return f"""
[[route]]
name = "docker.io"
upstream = ["{first.url}", "{second.url}"]
credentials_upstream = "{first.url}"
allow_private_addresses = true
hosts = ["docker.*"]
default = true
library = true
{accounts}"""


@pytest.fixture
def pool_gateway(testbed: Testbed, tmp_path: Path) -> Iterator[Callable[[HubFront, HubFront], Gateway]]:
    # Both accounts may pull every hub repository at the bed's token server (tokens.py: only private/
    # is anyone's own); the front counts each under its token's subject, the user name.
    users = {"hub-a": testbed.credentials, "hub-b": testbed.other_credentials}
    env = {f"{POOL[name]}_USER": c.username for name, c in users.items()}
    env |= {f"{POOL[name]}_PASS": c.password for name, c in users.items()}
    # No manifest cache: every client GET is an upstream GET, each one a pull.
    env["GATEWAY_MANIFEST_CACHE_BYTES"] = "0"
    with ExitStack() as stack:

        def start(first: HubFront, second: HubFront) -> Gateway:
            return stack.enter_context(run_gateway(pool_routes(first, second), tmp_path / "gateway-pool", env=env))

        yield start


def hub_references(testbed: Testbed, count: int) -> list[tuple[str, str, str]]:
    """``count`` different (repository, tag, top-level digest) of the bed's hub, every image first."""
    hub = [image for image in testbed.images.values() if image.upstream == "hub"]
    firsts = [(image.repo, image.tag, image.digest) for image in hub]
    rest = [(image.repo, tag, image.digest) for image in hub for tag in image.tags[1:]]
    references = (firsts + rest)[:count]
    assert len(set(references)) == count
    return references


def test_two_pooled_accounts_spend_five_each_then_the_next_upstream_serves(
    testbed: Testbed, fronts: MakeFront, pool_gateway: Callable[[HubFront, HubFront], Gateway]
) -> None:
    """Limit 5 per account: pulls 1-10 alternate between the accounts, 11 and 12 come from the second
    upstream (anonymously, its own budget of 2), and only the 13th, with no source left, is a 429."""
    hub = fronts(limit=5, retry_after=3600)
    mirror = fronts(limit=2, retry_after=1200)
    gw = pool_gateway(hub, mirror)
    user = {"hub-a": testbed.credentials.username, "hub-b": testbed.other_credentials.username}
    references = hub_references(testbed, 13)
    statuses: list[int] = []
    last: httpx.Response | None = None
    for pull, (repo, tag, digest) in enumerate(references, start=1):
        answer = last = httpx.get(f"{gw.url}/v2/{repo}/manifests/{tag}", headers={"accept": CONTAINERD_ACCEPT})
        statuses.append(answer.status_code)
        if answer.status_code == 200:
            assert "sha256:" + hashlib.sha256(answer.content).hexdigest() == digest
        if pull <= 10:
            # The pool spends the account with the most budget left: the two take turns.
            assert hub.pulls(user["hub-a"]) == (pull + 1) // 2
            assert hub.pulls(user["hub-b"]) == pull // 2
            for name in ("hub-a", "hub-b") if pull > 1 else ("hub-a",):
                credential = {"route": "docker.io", "credential": f"account:{name}"}
                assert metric(gw, "registry_gateway_upstream_budget_remaining", **credential) == hub.remaining(
                    user[name]
                )
        else:
            assert (hub.pulls(user["hub-a"]), hub.pulls(user["hub-b"])) == (5, 5)  # nothing more spent there
        if pull == 11:
            # The hub refused each account once (a 429 is no pull), then the second upstream was asked.
            refusals = hub.manifest_requests("GET", status=429)
            assert sorted(r.key for r in refusals) == sorted(user.values())
            assert {(r.name, r.reference) for r in refusals} == {(repo, tag)}
            assert [(r.name, r.reference, r.key) for r in mirror.requests if r.counted] == [(repo, tag, ANONYMOUS_KEY)]
            assert wait_for(lambda: bool(access_lines(gw, references[10][1])))
            [access] = access_lines(gw, tag)
            assert (access["status"], access["upstream"]) == (200, mirror.url)
    # The client never saw a 429 while any source had budget: 5 + 5 at the hub, 2 at the second upstream.
    assert statuses == [200] * 12 + [429]
    assert (hub.pulls(user["hub-a"]), hub.pulls(user["hub-b"]), mirror.pulls(ANONYMOUS_KEY)) == (5, 5, 2)
    assert len(hub.manifest_requests("GET", status=200)) == 10
    # Both accounts refused at the 11th; while both rest, at most one more refusal per pull (12, 13).
    assert 2 < len(hub.manifest_requests("GET", status=429)) <= 4
    assert last is not None
    assert last.status_code == 429
    assert last.headers["retry-after"] == "1200"  # the second upstream's: the one that ends the wait
    assert last.json()["errors"][0]["code"] == "TOOMANYREQUESTS"

    # Each account by its name, the hub front's own count; never a secret.
    for name in ("hub-a", "hub-b"):
        credential = {"route": "docker.io", "credential": f"account:{name}"}
        assert metric(gw, "registry_gateway_upstream_budget_remaining", **credential) == 0 == hub.remaining(user[name])
        assert metric(gw, "registry_gateway_upstream_budget_limit", **credential) == 5
        doc = budget_of(gw, "docker.io", f"account:{name}")
        assert (doc["remaining"], doc["limit"], doc["window_seconds"]) == (0, 5, 21600)
        assert (doc["source"], doc["upstream"]) == (user[name], hub.url)
    # The second upstream's budget is the anonymous one: the accounts go to credentials_upstream only.
    anonymous = budget_of(gw, "docker.io", "anonymous")
    assert (anonymous["remaining"], anonymous["limit"], anonymous["upstream"]) == (0, 2, mirror.url)
    assert anonymous["source"] == ANONYMOUS_KEY
    assert anonymous["rate_limited"] == 1  # the 13th pull's: the one 429 the client saw
    assert metric(gw, "registry_gateway_upstream_budget_remaining", route="docker.io", credential="anonymous") == 0
    # The accounts' secrets appear nowhere.
    status_text = httpx.get(f"{gw.url}/status/budget").text
    metrics_text = httpx.get(f"{gw.url}/metrics").text
    for where in (status_text, metrics_text, gw.log.read_text()):
        assert testbed.credentials.password not in where
        assert testbed.other_credentials.password not in where


def access_lines(gw: Gateway, tag: str) -> list[dict[str, Any]]:
    return [a for a in log_events(gw, "access") if a["path"].endswith(f"/manifests/{tag}")]


def test_a_429_the_pool_absorbs_is_counted_for_its_account(
    testbed: Testbed, fronts: MakeFront, pool_gateway: Callable[[HubFront, HubFront], Gateway]
) -> None:
    hub = fronts(limit=1, retry_after=3600)
    mirror = fronts(limit=100)
    gw = pool_gateway(hub, mirror)
    references = hub_references(testbed, 3)
    statuses = [
        httpx.get(f"{gw.url}/v2/{repo}/manifests/{tag}", headers={"accept": CONTAINERD_ACCEPT}).status_code
        for repo, tag, _ in references
    ]
    assert statuses == [200, 200, 200]  # hub-a, hub-b, then both refused and the mirror served
    assert len(hub.manifest_requests("GET", status=429)) == 2
    for name in ("hub-a", "hub-b"):
        # "count every 429 from upstreams" (issue 12); operations.md: "rate_limited counts the 429s
        # this credential got", and the RegistryGatewayUpstreamRateLimited alert reads the counter.
        assert budget_of(gw, "docker.io", f"account:{name}")["rate_limited"] == 1
        credential = {"route": "docker.io", "credential": f"account:{name}"}
        assert metric(gw, "registry_gateway_upstream_rate_limited_total", **credential) == 1


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


@pytest.fixture
def dockerd_for(tmp_path_factory: pytest.TempPathFactory, hosts_file: Path) -> Iterator[Callable[[Gateway], Dockerd]]:
    """A dockerd of the test's own whose ``registry-mirrors`` is this test's gateway (the session's
    ``dockerd`` fixture mirrors the session gateway, not one in front of a hub front)."""
    missing = [tool for tool in ("dockerd", "docker", "unshare") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/test installs them)")
    with ExitStack() as stack:

        def start(gw: Gateway) -> Dockerd:
            config = {"registry-mirrors": [f"http://gw.test:{gw.port}"], "insecure-registries": ["127.0.0.0/8"]}
            # A short root: containerd's sockets live under it (a unix socket path has 108 bytes).
            return stack.enter_context(start_dockerd(tmp_path_factory.mktemp("dockerd"), hosts_file, config))

        yield start


@pytest.mark.parametrize("failure", ["429", "stopped"])
def test_docker_pulls_an_image_pulled_before_from_stale_tag_answers(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    dockerd_for: Callable[[Gateway], Dockerd],
    failure: str,
) -> None:
    """``docker pull`` (dockerd, through ``registry-mirrors``) after ``docker rmi``: the tag's answer is stale.

    With the hub refusing manifests (429) the image is removed whole, so the re-pull fetches every
    blob again (blobs are no pull and still flow); with the hub stopped nothing upstream answers and
    the gateway keeps no blobs, so the image keeps its layers under a second name and only its tag is
    removed: what a node that ran it before has.
    """
    front = fronts(limit=1000)
    gw = start_gateway(front, {"GATEWAY_MANIFEST_CACHE_TAG_TTL": "1"})
    docker = dockerd_for(gw)
    alpine = testbed.images["alpine"]
    ref = f"alpine:{alpine.tag}"
    kept = f"kept.gw.test/alpine:{alpine.tag}"
    docker.docker("pull", ref)
    assert f"alpine@{alpine.digest}" in docker.repo_digests(ref)
    # dockerd HEADs the tag, then GETs the index and the platform manifest by digest: two pulls.
    assert front.pulls(ANONYMOUS_KEY) == 2
    assert [r.reference for r in front.manifest_requests("HEAD")] == [alpine.tag]
    if failure == "stopped":
        docker.docker("tag", ref, kept)
    docker.docker("rmi", ref)
    with pytest.raises(AssertionError):
        docker.docker("image", "inspect", ref)  # gone: the next pull must ask
    time.sleep(1.2)  # the tag's answer is past its lifetime: the next pull asks the hub
    if failure == "429":
        front.refuse_all = True
    else:
        front.stop()
    before = len(log_events(gw, "access"))

    docker.docker("pull", ref)
    assert f"alpine@{alpine.digest}" in docker.repo_digests(ref)

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
    repull = log_events(gw, "access")[before:]
    manifests = [
        (a["method"], a["path"].rsplit("/", 1)[1], a["status"], a.get("cache"))
        for a in repull
        if a.get("kind") == "manifest"
    ]
    # The tag from the stale answer (HEAD, 200). A removed image's manifests come again by digest,
    # from the gateway's cache (kept an hour); a kept one's from dockerd's own content store.
    digests = [("GET", alpine.digest, 200, "hit"), ("GET", alpine.platforms[PLATFORM], 200, "hit")]
    assert manifests == [("HEAD", alpine.tag, 200, "stale"), *(digests if failure == "429" else [])]
    assert (metric(gw, "registry_gateway_manifest_stale_total", route="docker.io", reason=reason) or 0) >= 1
    blobs = [a for a in repull if a.get("kind") == "blob"]
    if failure == "429":
        assert event["upstream_status"] == 429
        # The hub was asked once for the tag and refused it; the re-pull spent no pull.
        assert [(r.method, r.reference) for r in front.requests if r.status == 429] == [("HEAD", alpine.tag)]
        assert front.pulls(ANONYMOUS_KEY) == 2
        # The whole image came again: its config and layers, through the gateway (blobs are no pull).
        manifest = json.loads(alpine.manifests[alpine.platforms[PLATFORM]][1])
        wanted = {manifest["config"]["digest"], *alpine.layers[PLATFORM]}
        assert {a["path"].rsplit("/", 1)[1] for a in blobs if a["status"] == 200} == wanted
    else:
        assert not blobs  # the layers were there: only manifests were asked
