import asyncio

import httpcore
import pytest

from gateway.net.netguard import AddressGuard, AddressRefused, GuardedBackend
from gateway.routing.policy import TargetRefused, check_target, is_public_address

TRUSTED = {("https", "registry-1.docker.io", 443), ("http", "10.0.0.5", 5000)}


@pytest.mark.parametrize(
    ("url", "upstream_scheme", "allow_private", "refused"),
    [
        ("https://auth.docker.io/token", "https", False, None),
        ("https://production.cloudflare.docker.com/blob?sig=1", "https", False, None),
        ("https://8.8.8.8/x", "https", False, None),
        # Downgrades and other schemes.
        ("http://auth.docker.io/token", "https", False, "http:// is not allowed"),
        ("ftp://auth.docker.io/token", "https", False, "ftp:// is not allowed"),
        ("file:///etc/passwd", "https", False, "no host"),
        ("http://auth.internal/token", "http", False, None),  # an http upstream may use an http realm
        # Private, loopback, link-local (cloud metadata), shared, reserved addresses.
        ("https://127.0.0.1/token", "https", False, "not a public address"),
        ("https://10.1.2.3/x", "https", False, "not a public address"),
        ("https://192.168.1.1/x", "https", False, "not a public address"),
        ("https://169.254.169.254/latest/meta-data", "https", False, "not a public address"),
        ("https://100.100.100.200/x", "https", False, "not a public address"),
        ("https://[::1]/x", "https", False, "not a public address"),
        ("https://[fd00:ec2::254]/x", "https", False, "not a public address"),
        ("https://[::ffff:127.0.0.1]/x", "https", False, "not a public address"),
        ("https://0.0.0.0/x", "https", False, "not a public address"),
        ("https://localhost/x", "https", False, "local name"),
        ("https://metadata.google.internal/x", "https", False, "local name"),
        ("https://a.localhost/x", "https", False, "local name"),
        # The route's opt-in.
        ("https://169.254.169.254/x", "https", True, None),
        ("http://127.0.0.1:8080/token", "http", True, None),
        # The route's own upstreams are always fine, whatever their address.
        ("http://10.0.0.5:5000/v2/x/blobs/y", "http", False, None),
        ("http://10.0.0.5:5001/v2/x/blobs/y", "http", False, "not a public address"),  # another port is another origin
        ("https://host:99999/x", "https", False, "invalid port"),
    ],
)
def test_check_target(url, upstream_scheme, allow_private, refused):
    if refused is None:
        check_target(url, upstream_scheme=upstream_scheme, trusted_origins=TRUSTED, allow_private=allow_private)
    else:
        with pytest.raises(TargetRefused, match=refused):
            check_target(url, upstream_scheme=upstream_scheme, trusted_origins=TRUSTED, allow_private=allow_private)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("1.1.1.1", True),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("224.0.0.1", False),
        ("2606:4700::1111", True),
        ("fe80::1", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


async def test_guard_refuses_names_that_resolve_to_private_addresses():
    guard = GuardedBackend(AddressGuard([], allow_private=False))
    with pytest.raises(AddressRefused, match="localhost resolves to a non-public address"):
        await guard.connect_tcp("localhost", 80, timeout=2)


async def test_guard_allows_trusted_hosts_and_opt_in():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for guard in (
            GuardedBackend(AddressGuard([("127.0.0.1", port)], False)),
            GuardedBackend(AddressGuard([], True)),
        ):
            stream = await guard.connect_tcp("127.0.0.1", port, timeout=2)
            await stream.aclose()
        with pytest.raises(httpcore.ConnectError):
            await GuardedBackend(AddressGuard([("127.0.0.1", port + 1)], False)).connect_tcp(
                "127.0.0.1", port, timeout=2
            )
    finally:
        server.close()
        await server.wait_closed()
