"""Who receives which Authorization: the authorizers as a table, over a token endpoint that records."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.auth.authorizer import GATEWAY_LOGIN, Authorizer, Hop, Login, authorizer_for
from gateway.auth.tokens import TokenCache
from gateway.http.errors import LoginRequired, RegistryError
from gateway.routing.routes import Route
from gateway.routing.routes_file import parse_routes
from gateway.settings import Settings

REGISTRY = ("https", "registry.test", 443)
MIRROR = ("https", "mirror.test", 443)
CDN = ("https", "cdn.test", 443)
BEARER = 'Bearer realm="https://auth.test/token",service="svc"'
BASIC = 'Basic realm="registry"'
BOB = "Basic Ym9iOnB3"  # bob:pw


def route(**extra: object) -> Route:
    doc = {"name": "docker.io", "upstream": ["https://mirror.test", "https://registry.test"], **extra}
    return parse_routes({"route": [doc]}, "routes.toml", {"PW": "pw"}).routes[0]


WITH_CREDENTIALS: dict[str, object] = {
    "username": "bob",
    "password_env": "PW",
    "credentials_upstream": "https://registry.test",
}
PASSTHROUGH: dict[str, object] = {"auth": "passthrough"}


class TokenEndpoint:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        token = f"token-{len(self.requests)}"
        return httpx.Response(200, stream=httpx.ByteStream(json.dumps({"token": token}).encode()))


def authorizer(mode: dict[str, object], endpoint: TokenEndpoint) -> Authorizer:
    return authorizer_for(route(**mode), TokenCache(), httpx.MockTransport(endpoint), Settings().timeouts())


@pytest.mark.parametrize(
    ("mode", "login", "origin", "challenge", "sent_upstream", "sent_to_realm"),
    [
        # The gateway's credentials answer their own upstream's challenge, and nobody else's.
        (WITH_CREDENTIALS, GATEWAY_LOGIN, REGISTRY, BEARER, "Bearer token-1", BOB),
        (WITH_CREDENTIALS, GATEWAY_LOGIN, MIRROR, BEARER, "Bearer token-1", None),
        (WITH_CREDENTIALS, GATEWAY_LOGIN, CDN, BEARER, "Bearer token-1", None),
        (WITH_CREDENTIALS, GATEWAY_LOGIN, REGISTRY, BASIC, BOB, "-"),
        (WITH_CREDENTIALS, GATEWAY_LOGIN, CDN, BASIC, None, "-"),
        ({}, GATEWAY_LOGIN, REGISTRY, BEARER, "Bearer token-1", None),
        ({}, GATEWAY_LOGIN, REGISTRY, BASIC, None, "-"),
        # A client's own token: never answered for by the gateway at its upstreams...
        (PASSTHROUGH, Login("Bearer client"), REGISTRY, BEARER, None, "-"),
        (PASSTHROUGH, Login("Bearer client"), MIRROR, BEARER, None, "-"),
        # ... and a redirect target that challenges gets an anonymous token, not the client's.
        (PASSTHROUGH, Login("Bearer client"), CDN, BEARER, "Bearer token-1", None),
    ],
)
async def test_who_receives_what(mode, login, origin, challenge, sent_upstream, sent_to_realm):
    endpoint = TokenEndpoint()
    auth = authorizer(mode, endpoint)
    hop = Hop(origin, "library/alpine")
    assert await auth.answer(login, hop, [challenge], None) == sent_upstream
    if sent_to_realm == "-":
        assert not endpoint.requests
    else:
        (request,) = endpoint.requests
        assert request.headers.get("authorization") == sent_to_realm
        assert request.url.params["scope"] == "repository:library/alpine:pull"


@pytest.mark.parametrize(
    ("origin", "expected"),
    [(REGISTRY, "Bearer client"), (MIRROR, "Bearer client"), (CDN, None)],
)
async def test_a_clients_token_goes_up_front_to_the_routes_upstreams_only(origin, expected):
    auth = authorizer(PASSTHROUGH, TokenEndpoint())
    assert await auth.up_front(Login("Bearer client"), Hop(origin, "org/app")) == expected


@pytest.mark.parametrize("authorization", [None, "Bearer caf\u00e9"])
def test_passthrough_admits_only_a_client_with_a_login(authorization):
    auth = authorizer(PASSTHROUGH, TokenEndpoint())
    with pytest.raises(LoginRequired) as info:
        auth.admit(authorization, "org/app")
    assert (info.value.status, info.value.service, info.value.repository) == (401, "docker.io", "org/app")
    assert not auth.shares_answers


def test_gateway_tokens_never_take_the_clients_authorization():
    auth = authorizer(WITH_CREDENTIALS, TokenEndpoint())
    assert auth.admit("Bearer client", "org/app") == GATEWAY_LOGIN
    assert auth.shares_answers


async def test_a_remembered_challenge_is_answered_up_front_and_a_refused_token_is_replaced():
    endpoint = TokenEndpoint()
    auth = authorizer({}, endpoint)
    hop = Hop(REGISTRY, "library/alpine")
    assert await auth.up_front(GATEWAY_LOGIN, hop) is None  # nothing known yet
    first = await auth.answer(GATEWAY_LOGIN, hop, [BEARER], None)
    assert await auth.up_front(GATEWAY_LOGIN, hop) == first  # cached, no new fetch
    assert len(endpoint.requests) == 1
    fresh = await auth.answer(GATEWAY_LOGIN, hop, [BEARER], first)  # the upstream refused it
    assert fresh == "Bearer token-2"
    # Retrying only once per hop is the upstream client's rule; the authorizer refreshes each time asked.
    assert len(endpoint.requests) == 2


async def test_a_realm_outside_the_policy_is_never_asked():
    endpoint = TokenEndpoint()
    auth = authorizer({}, endpoint)
    with pytest.raises(RegistryError) as info:
        await auth.answer(GATEWAY_LOGIN, Hop(REGISTRY, "a"), ['Bearer realm="https://10.0.0.1/token"'], None)
    assert info.value.status == 502
    assert info.value.reason == "policy"
    assert "sent its token realm to a refused address" in info.value.message
    assert not endpoint.requests
