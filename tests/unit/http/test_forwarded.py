import pytest

from gateway.http.forwarded import ForwardedHeadersMiddleware, TrustedProxies


async def run(trusted: str, client: str, headers: list[tuple[bytes, bytes]]) -> dict:
    seen: dict = {}

    async def app(scope, receive, send):
        seen.update(scope)

    async def receive():
        raise AssertionError("not called")

    async def send(message):
        raise AssertionError("not called")

    scope = {"type": "http", "scheme": "http", "client": (client, 1234), "headers": [(b"host", b"gw:5000"), *headers]}
    await ForwardedHeadersMiddleware(app, trusted)(scope, receive, send)
    return seen


def host(scope: dict) -> str:
    return next(v.decode() for k, v in scope["headers"] if k == b"host")


XFP = (b"x-forwarded-proto", b"https")
XFH = (b"x-forwarded-host", b"ghcr.example.com")
XFF = (b"x-forwarded-for", b"203.0.113.7")


@pytest.mark.parametrize(
    ("trusted", "client", "expect_applied"),
    [
        ("127.0.0.1,::1", "127.0.0.1", True),
        ("127.0.0.1,::1", "::1", True),
        ("127.0.0.1", "10.1.2.3", False),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8,fd00::/8", "fd00::1", True),
        ("*", "198.51.100.9", True),
        ("", "127.0.0.1", False),
        ("not-an-ip", "127.0.0.1", False),
    ],
)
async def test_only_trusted_peers_are_believed(trusted, client, expect_applied):
    scope = await run(trusted, client, [XFP, XFH, XFF])
    if expect_applied:
        assert (scope["scheme"], host(scope), scope["client"][0]) == ("https", "ghcr.example.com", "203.0.113.7")
    else:
        assert (scope["scheme"], host(scope), scope["client"][0]) == ("http", "gw:5000", client)


@pytest.mark.parametrize(
    ("xff", "trusted", "client"),
    [
        # The right-most address that is not a trusted proxy is the client; what is left of it is claimed.
        (b"1.1.1.1, 203.0.113.7", "127.0.0.1", "203.0.113.7"),
        (b"1.1.1.1, 203.0.113.7, 10.0.0.2", "127.0.0.1,10.0.0.0/8", "203.0.113.7"),
        (b"10.0.0.3, 10.0.0.2", "127.0.0.1,10.0.0.0/8", "10.0.0.3"),
        (b"  ", "127.0.0.1", "127.0.0.1"),
    ],
)
async def test_forwarded_for_chains(xff, trusted, client):
    scope = await run(trusted, "127.0.0.1", [(b"x-forwarded-for", xff)])
    assert scope["client"][0] == client


async def test_repeated_headers_take_the_nearest_proxys_value():
    scope = await run(
        "127.0.0.1",
        "127.0.0.1",
        [(b"x-forwarded-proto", b"http, https"), (b"x-forwarded-host", b"evil.example, quay.example.com")],
    )
    assert scope["scheme"] == "https"
    assert host(scope) == "quay.example.com"


@pytest.mark.parametrize("value", [b"gopher", b""])
async def test_bad_proto_is_ignored(value):
    scope = await run("127.0.0.1", "127.0.0.1", [(b"x-forwarded-proto", value)])
    assert scope["scheme"] == "http"


async def test_host_with_control_characters_is_ignored():
    scope = await run("127.0.0.1", "127.0.0.1", [(b"x-forwarded-host", b"a\x00b")])
    assert host(scope) == "gw:5000"


def test_trusted_proxies_membership():
    t = TrustedProxies("127.0.0.1, 10.0.0.0/8, unix:")
    assert "10.200.0.1" in t
    assert "unix:" in t
    assert "11.0.0.1" not in t
    assert None not in t
    assert "garbage" not in t
