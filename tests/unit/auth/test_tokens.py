import asyncio
import json

import httpx
import pytest

from gateway.auth.tokens import Token, TokenCache, TokenKey, fetch_token, parse_token_answer, token_lifetime
from gateway.http.errors import RegistryError
from gateway.routing.routes import Credentials
from gateway.settings import Settings
from tests.unit.conftest import Clock

KEY = TokenKey("https://auth.example/token", "svc", ("repository:library/alpine:pull",), None)
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("expires_in", "issued_at", "expected"),
    [
        (None, None, 60.0),  # token spec default
        (300, None, 300.0),
        (0, None, 60.0),
        (-5, None, 60.0),
        ("300", None, 60.0),
        (True, None, 60.0),
        (300, "2023-11-14T22:13:00Z", 300.0),  # issued exactly now
        (300, "2023-11-14T22:12:00Z", 240.0),  # issued a minute ago
        (300, "2023-11-14T22:03:00Z", 300.0),  # already "expired": clock skew, ignored
        (300, "2023-11-14T23:13:00+00:00", 300.0),  # from the future: never lengthens
        (300, "not a date", 300.0),
    ],
)
def test_token_lifetime(expires_in, issued_at, expected):
    assert token_lifetime(expires_in, issued_at, 1_700_000_000.0 - 20) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        (b'{"token":"t"}', True),
        (b'{"access_token":"t","expires_in":300}', True),
        (b'{"token":""}', False),
        (b'{"token":5}', False),
        (b"[]", False),
        (b"not json", False),
        (b"\xff\xfe", False),
    ],
)
def test_parse_token_answer(body, ok):
    if ok:
        assert parse_token_answer(body, NOW).value == "t"
    else:
        with pytest.raises(RegistryError) as info:
            parse_token_answer(body, NOW)
        assert info.value.status == 502


async def test_cache_keeps_until_expiry_minus_margin():
    clock = Clock(1000.0)
    cache = TokenCache(clock=clock, refresh_margin=5)
    fetches = 0

    async def fetch() -> Token:
        nonlocal fetches
        fetches += 1
        return Token(f"t{fetches}", 60)

    assert await cache.obtain(KEY, fetch) == "t1"
    clock.now += 54
    assert await cache.obtain(KEY, fetch) == "t1"
    clock.now += 1.5  # inside the 5 s refresh margin
    assert await cache.obtain(KEY, fetch) == "t2"
    assert (cache.fetches, cache.hits) == (2, 1)


async def test_cache_keys_are_separate():
    cache = TokenCache(clock=Clock(1000.0))
    other_scope = TokenKey(KEY.realm, KEY.service, ("repository:library/busybox:pull",), None)
    with_user = TokenKey(KEY.realm, KEY.service, KEY.scopes, "user:bob")
    values = iter(["a", "b", "c"])

    async def fetch() -> Token:
        return Token(next(values), 300)

    assert [await cache.obtain(k, fetch) for k in (KEY, other_scope, with_user, KEY)] == ["a", "b", "c", "a"]


async def test_one_fetch_in_flight_for_100_waiters():
    cache = TokenCache(clock=Clock(1000.0))
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def fetch() -> Token:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return Token("shared", 300)

    tasks = [asyncio.ensure_future(cache.obtain(KEY, fetch)) for _ in range(100)]
    await started.wait()
    release.set()
    assert set(await asyncio.gather(*tasks)) == {"shared"}
    assert calls == 1


async def test_first_waiter_leaving_does_not_cancel_the_fetch():
    cache = TokenCache(clock=Clock(1000.0))
    release = asyncio.Event()

    async def fetch() -> Token:
        await release.wait()
        return Token("t", 300)

    first = asyncio.ensure_future(cache.obtain(KEY, fetch))
    second = asyncio.ensure_future(cache.obtain(KEY, fetch))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == "t"
    assert first.cancelled()


async def test_failed_fetch_is_not_cached_and_reaches_every_waiter():
    cache = TokenCache(clock=Clock(1000.0))
    attempts = 0

    async def fetch() -> Token:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        raise RegistryError(502, "UNAVAILABLE", "down")

    results = await asyncio.gather(*(cache.obtain(KEY, fetch) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RegistryError) for r in results)
    assert attempts == 1
    with pytest.raises(RegistryError):
        await cache.obtain(KEY, fetch)
    assert attempts == 2


async def test_invalidate_only_drops_the_refused_token():
    cache = TokenCache(clock=Clock(1000.0))

    async def fetch() -> Token:
        return Token("new", 300)

    await cache.obtain(KEY, fetch)
    cache.invalidate(KEY, "old")
    assert cache.get(KEY) == "new"
    cache.invalidate(KEY, "new")
    assert cache.get(KEY) is None


async def test_cache_is_bounded():
    clock = Clock(1000.0)
    cache = TokenCache(clock=clock, max_entries=10)
    for i in range(25):
        key = TokenKey("r", "s", (f"repository:r{i}:pull",), None)

        async def fetch() -> Token:
            return Token("t", 300)

        await cache.obtain(key, fetch)
    assert len(cache) == 10


TIMEOUTS = Settings(token_timeout=5).timeouts()


def _token_server(status=200, body=b'{"token":"abc","expires_in":120}', headers=None, seen=None):
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))

    return httpx.MockTransport(handler)


async def test_fetch_token_sends_service_scopes_and_basic_credentials():
    seen: list[httpx.Request] = []
    key = TokenKey("https://auth.example/token", "svc", ("repository:a:pull", "repository:b:pull"), "user:bob")
    token = await fetch_token(_token_server(seen=seen), key, Credentials("bob", "pw"), timeouts=TIMEOUTS)
    assert token.value == "abc"
    assert token.lifetime == 120
    request = seen[0]
    assert request.url.params.get_list("scope") == ["repository:a:pull", "repository:b:pull"]
    assert request.url.params["service"] == "svc"
    assert request.headers["authorization"] == "Basic Ym9iOnB3"


@pytest.mark.parametrize(
    ("status", "body", "credentials", "expected_status", "code"),
    [
        (401, b"{}", None, 401, "UNAUTHORIZED"),
        (401, b"{}", Credentials("bob", "wrong"), 502, "UNAUTHORIZED"),
        (429, b"{}", None, 429, "TOOMANYREQUESTS"),
        (500, b"oops", None, 502, "UNAVAILABLE"),
        (200, b"<html>", None, 502, "UNAVAILABLE"),
        (200, b'{"nothing":1}', None, 502, "UNAVAILABLE"),
        (200, b"x" * (2 << 20), None, 502, "UNAVAILABLE"),  # oversized answer
    ],
)
async def test_fetch_token_failures(status, body, credentials, expected_status, code):
    with pytest.raises(RegistryError) as info:
        await fetch_token(
            _token_server(status, body, headers={"retry-after": "30"}), KEY, credentials, timeouts=TIMEOUTS
        )
    assert (info.value.status, info.value.code) == (expected_status, code)
    if status == 429:
        assert info.value.headers == {"retry-after": "30"}
    assert "wrong" not in info.value.message


async def test_fetch_token_unreachable_and_timeout():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    for handler, status in ((refuse, 502), (slow, 504)):
        with pytest.raises(RegistryError) as info:
            await fetch_token(httpx.MockTransport(handler), KEY, None, timeouts=TIMEOUTS)
        assert info.value.status == status
        assert KEY.realm in info.value.message


def test_token_repr_hides_value():
    assert "sekrit" not in repr(Token("sekrit", 60))
    assert json.dumps({"ok": 1})
