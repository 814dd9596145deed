"""Several accounts on a route: which account serves which repository, and the pool on a 429."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from gateway.http.errors import ConfigError
from gateway.routing.routes import Account, Credentials, GatewayTokens
from gateway.routing.routes_file import parse_routes
from tests.unit.fake_registry import MANIFEST, REALM, REGISTRY, FakeRegistry, registry_error, response

MIRROR = "https://mirror.test"
ENV = {"A_PW": "pw-a", "B_PW": "pw-b", "R_PW": "pw-r"}


def account(name: str, user: str, env: str, repositories: list[str] | None = None) -> dict[str, object]:
    doc: dict[str, object] = {"name": name, "username": user, "password_env": env}
    if repositories is not None:
        doc["repositories"] = repositories
    return doc


def route(**extra: object) -> dict[str, object]:
    return {
        "name": "docker.io",
        "upstream": REGISTRY,
        "default": True,
        "library": True,
        "credentials": [
            account("hub-a", "alice", "A_PW"),
            account("hub-b", "bob", "B_PW"),
            account("robot", "robot", "R_PW", ["acme/**"]),
        ],
        **extra,
    }


def test_the_most_specific_account_wins_and_ties_form_a_pool():
    auth = parse_routes({"route": [route()]}, "routes.toml", ENV).routes[0].auth
    assert isinstance(auth, GatewayTokens)
    assert [c.identity for c in auth.candidates("acme/app")] == ["account:robot"]
    assert [c.identity for c in auth.candidates("library/nginx")] == ["account:hub-a", "account:hub-b"]
    deeper = Account.build(Credentials("x", "y", "deep"), ["acme/team/**"])
    assert (deeper.specificity("acme/team/app") or 0) > (auth.accounts[2].specificity("acme/team/app") or 0)
    assert deeper.specificity("other/app") is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"username": "u", "password_env": "A_PW"}, "not both"),
        ({"auth": "passthrough"}, "takes no credentials"),
        ({"credentials": [account("a", "u", "A_PW"), account("a", "v", "B_PW")]}, "the name is used twice"),
        ({"credentials": [{"name": "a", "username": "u"}]}, "credentials need both"),
        ({"credentials": [account("a", "u", "A_PW", ["Bad*Pattern"])]}, "credentials #1 \\(a\\)"),
        ({"credentials": [{"name": "a b", "username": "u", "password_env": "A_PW"}]}, "credentials"),
    ],
)
def test_account_configuration_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_routes({"route": [route(**extra)]}, "routes.toml", ENV)


def user_of(request: httpx.Request) -> str | None:
    value = request.headers.get("authorization", "")
    if not value.startswith("Basic "):
        return None
    return base64.b64decode(value[6:]).decode().partition(":")[0]


class Hub:
    """Tokens name their account (token-<user>); manifests 429 for accounts that have spent their budget."""

    def __init__(self, budget: dict[str, int], *, headers: bool = True) -> None:
        self.fake = FakeRegistry()
        self.budget = budget
        self.headers = headers
        self.pulls: list[str] = []
        self.fake.override = self.handle

    def handle(self, request: httpx.Request) -> httpx.Response | None:
        if str(request.url).startswith(REALM):
            user = user_of(request) or "anonymous"
            self.fake.valid_tokens.add(f"token-{user}")
            return response(200, json.dumps({"token": f"token-{user}"}).encode())
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if request.url.host == "registry.test" and "/manifests/" in request.url.path and token.startswith("token-"):
            user = token[6:]
            if self.budget.get(user, 0) <= 0:
                return registry_error(429, "TOOMANYREQUESTS", "rate limited", {"retry-after": "3600"})
            self.budget[user] -= 1
            self.pulls.append(user)
            headers = {"content-type": "application/vnd.oci.image.manifest.v1+json"}
            if self.headers:
                headers["ratelimit-limit"] = "10;w=21600"
                headers["ratelimit-remaining"] = f"{self.budget[user]};w=21600"
            return response(200, MANIFEST, headers)
        return None


async def test_each_namespace_uses_its_own_account(gateway_client):
    hub = Hub({"alice": 100, "bob": 100, "robot": 100})
    async with gateway_client([route()], env=ENV, registry=hub.fake) as client:
        assert (await client.get("/v2/acme/app/manifests/v1")).status_code == 200
        assert (await client.get("/v2/nginx/manifests/latest")).status_code == 200
    assert hub.pulls[0] == "robot"
    assert hub.pulls[1] in ("alice", "bob")
    token_users = {user_of(r) for r in hub.fake.seen(REALM)}
    assert token_users == {"robot", hub.pulls[1]}


async def test_the_pool_spreads_the_budget_and_rotates_on_a_429(gateway_client):
    hub = Hub({"alice": 2, "bob": 3})
    async with gateway_client([route()], env=ENV, registry=hub.fake) as client:
        statuses = [(await client.get(f"/v2/img{i}/manifests/latest")).status_code for i in range(5)]
        assert statuses == [200] * 5  # the client never saw a 429 while an account had budget
        sixth = await client.get("/v2/img5/manifests/latest")
    assert sorted(hub.pulls) == ["alice", "alice", "bob", "bob", "bob"]
    assert sixth.status_code == 429  # every account spent, no other upstream
    assert int(sixth.headers["retry-after"]) == 3600


async def test_an_exhausted_pool_fails_over_to_the_next_upstream(gateway_client):
    hub = Hub({"alice": 1, "bob": 0})
    upstreams = {"upstream": [REGISTRY, MIRROR], "credentials_upstream": REGISTRY}
    async with gateway_client([route(**upstreams)], env=ENV, registry=hub.fake) as client:
        first = await client.get("/v2/img0/manifests/latest")
        second = await client.get("/v2/img1/manifests/latest")
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.content == MANIFEST
    mirror_manifests = [r for r in hub.fake.requests if r.url.host == "mirror.test" and "/manifests/" in r.url.path]
    assert mirror_manifests  # the second pull came from the mirror, anonymously
    assert all(user_of(r) is None for r in hub.fake.seen(REALM) if "mirror" in str(r.url))


async def test_a_429_is_retried_at_once_with_the_next_account_which_is_then_preferred(gateway_client):
    hub = Hub({"alice": 0, "bob": 5}, headers=False)  # no budget headers: the gateway learns from the 429
    async with gateway_client([route()], env=ENV, registry=hub.fake) as client:
        first = await client.get("/v2/img0/manifests/latest")
        second = await client.get("/v2/img1/manifests/latest")
    assert (first.status_code, second.status_code) == (200, 200)
    assert hub.pulls == ["bob", "bob"]
    manifest_tries = [r for r in hub.fake.requests if "/manifests/" in r.url.path and "authorization" in r.headers]
    # alice's 429, bob's 200, then bob straight away: alice rests for her Retry-After.
    assert [r.headers["authorization"] for r in manifest_tries] == [
        "Bearer token-alice",
        "Bearer token-bob",
        "Bearer token-bob",
    ]
