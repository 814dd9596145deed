"""IPv6 at the edge and on the way out: mapped addresses, /64 rate-limit keys, the RFC 8305 race, the listener.

The race is tested here with stand-in connect functions (who started, in which order, what
was closed); tests/unit/net/test_transport.py races real sockets on ::1 and 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

import gateway.__main__ as gateway_main
from gateway.http.forwarded import ForwardedHeadersMiddleware, TrustedProxies, unmapped
from gateway.net.netguard import interleaved, race
from gateway.routing.access import rate_key
from gateway.settings import Settings
from tests.unit.conftest import in_process_app, in_process_client
from tests.unit.fake_registry import REGISTRY, FakeRegistry

# --- addresses at the edge ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:a:b:c:d", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::9", "2001:db8:1:2::/64"),  # the same /64, however it is written
        ("2001:db8:1:3::9", "2001:db8:1:3::/64"),  # the next /64: another bucket
        ("::ffff:203.0.113.7", "203.0.113.7"),  # a dual-stack socket's IPv4 client (RFC 4291 2.5.5.2)
        ("::ffff:cb00:7107", "203.0.113.7"),  # the same, in hex
        ("fe80::1%eth0", "fe80::/64"),  # a zone is no part of the key
        ("::1", "::/64"),
        ("unix:/run/gw.sock", "unix:/run/gw.sock"),  # not an address: its own key
        ("unknown", "unknown"),
    ],
)
def test_rate_key(client, key):
    assert rate_key(client) == key


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::FFFF:10.0.0.1", "10.0.0.1"),
        ("::1", "::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:not-an-address", "::ffff:not-an-address"),
    ],
)
def test_unmapped(host, expected):
    assert unmapped(host) == expected


def test_trusted_proxies_match_mapped_peers():
    trusted = TrustedProxies("127.0.0.1,10.0.0.0/8,2001:db8::/32")
    assert "::ffff:127.0.0.1" in trusted
    assert "::ffff:10.9.8.7" in trusted
    assert "::ffff:11.0.0.1" not in trusted
    assert "2001:db8:ffff::1" in trusted


async def forwarded(trusted: str, peer: str, xff: bytes | None = None) -> str:
    seen: dict = {}

    async def app(scope, receive, send):
        seen.update(scope)

    headers = [(b"host", b"gw:5000")] + ([(b"x-forwarded-for", xff)] if xff is not None else [])
    scope = {"type": "http", "scheme": "http", "client": (peer, 1234), "headers": headers}
    await ForwardedHeadersMiddleware(app, trusted)(scope, None, None)  # type: ignore[arg-type]
    return str(seen["client"][0])


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        # A dual-stack socket's IPv4 peer is its IPv4 address, forwarding headers or not...
        ("::ffff:198.51.100.9", None, "198.51.100.9"),
        ("::1", None, "::1"),
        # ...and a mapped trusted proxy is still trusted (GATEWAY_FORWARDED_ALLOW_IPS lists 127.0.0.1).
        ("::ffff:127.0.0.1", b"2001:db8::7", "2001:db8::7"),
        ("::1", b"2001:db8::7", "2001:db8::7"),
        ("::ffff:127.0.0.1", b"::ffff:203.0.113.7", "203.0.113.7"),
        # Hops right to left: trusted proxies (mapped, IPv6, with brackets or ports) are skipped.
        ("::1", b"2001:db8::7, ::ffff:10.0.0.2, fd00::3", "2001:db8::7"),
        ("::1", b"[2001:db8::7]:51234, [fd00::3]:443", "2001:db8::7"),
        ("::1", b"203.0.113.7:51234, 10.0.0.2:443", "203.0.113.7"),
        ("::1", b"evil, 2001:db8::7", "2001:db8::7"),
        ("::1", b"2001:db8::7, evil", "evil"),  # an untrusted garbage hop stays the client, as before
        # An untrusted peer's header is ignored, its own address (unmapped) kept.
        ("::ffff:198.51.100.9", b"2001:db8::7", "198.51.100.9"),
    ],
)
async def test_forwarded_for_with_ipv6_and_mapped_addresses(peer, xff, client):
    assert await forwarded("127.0.0.1,::1,10.0.0.0/8,fd00::/8", peer, xff) == client


async def test_the_rate_limit_counts_an_ipv6_client_per_64_and_a_mapped_one_as_ipv4():
    app = in_process_app(
        FakeRegistry(),
        [{"name": "docker.io", "upstream": REGISTRY, "default": True}],
        Settings(rate_limit=0.001, rate_burst=1),
    )

    async def status(client: str) -> int:
        async with in_process_client(app, (client, 1)) as c:
            return (await c.get("/v2/")).status_code

    assert await status("2001:db8:1:2::1") == 200
    assert await status("2001:db8:1:2:ffff::9") == 429  # another address of the same /64
    assert await status("2001:db8:1:3::1") == 200  # the next /64
    assert await status("203.0.113.7") == 200
    assert await status("::ffff:203.0.113.7") == 429  # the same IPv4 client, through a dual-stack socket


# --- the RFC 8305 race --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "order"),
    [
        (
            ["2001:db8::1", "2001:db8::2", "192.0.2.1", "192.0.2.2"],
            ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"],
        ),
        (["192.0.2.1", "2001:db8::1", "2001:db8::2"], ["192.0.2.1", "2001:db8::1", "2001:db8::2"]),
        (["192.0.2.1", "192.0.2.2"], ["192.0.2.1", "192.0.2.2"]),
        (["::1"], ["::1"]),
    ],
)
def test_interleaved(addresses, order):
    assert interleaved(addresses) == order


V6, V6B, V4 = "2001:db8::1", "2001:db8::2", "192.0.2.1"  # never contacted: stand-ins


class Attempts:
    """Stand-in connects: each address stalls, fails or answers as told; records what happened."""

    def __init__(self, outcomes: dict[str, str]) -> None:
        self.outcomes = outcomes
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.discarded: list[str] = []
        self.release = asyncio.Event()

    async def connect(self, address: str) -> str:
        self.started.append(address)
        outcome = self.outcomes[address]
        try:
            if outcome == "fails":
                raise ConnectionRefusedError(f"{address} refused")
            if outcome == "stalls":
                await asyncio.Event().wait()
            if outcome == "after-release":
                await self.release.wait()
            return address
        except asyncio.CancelledError:
            self.cancelled.append(address)
            raise

    async def discard(self, connection: str) -> None:
        self.discarded.append(connection)


async def test_a_stalled_address_is_overtaken_and_cancelled():
    a = Attempts({V6: "stalls", V4: "answers"})
    assert await race([V6, V4], a.connect, a.discard, delay=0.01) == V4
    assert a.started == [V6, V4]
    assert a.cancelled == [V6]  # closed before race() returned
    assert a.discarded == []


async def test_a_failure_starts_the_next_attempt_at_once():
    a = Attempts({V6: "fails", V4: "fails", V6B: "answers"})
    # A delay of an hour: the only way to finish is to move on as each attempt fails.
    winner = await asyncio.wait_for(race([V6, V6B, V4], a.connect, a.discard, delay=3600), 30)
    assert winner == V6B
    assert a.started == [V6, V4, V6B]  # the families interleaved


async def test_every_attempt_failing_raises_the_last_failure():
    a = Attempts({V6: "fails", V4: "fails"})
    with pytest.raises(ConnectionRefusedError, match=f"{V4} refused"):
        await race([V6, V4], a.connect, a.discard, delay=3600)
    assert a.started == [V6, V4]


async def test_two_that_connect_together_leave_one_and_discard_the_other():
    a = Attempts({V6: "after-release", V4: "after-release"})
    task = asyncio.ensure_future(race([V6, V4], a.connect, a.discard, delay=0.01))
    while len(a.started) < 2:
        await asyncio.sleep(0.01)
    a.release.set()  # both complete in the same loop iteration
    winner = await task
    assert sorted([winner, *a.discarded]) == sorted([V6, V4])
    assert len(a.discarded) == 1


async def test_the_callers_timeout_cancels_every_attempt():
    a = Attempts({V6: "stalls", V4: "stalls"})
    task = asyncio.ensure_future(race([V6, V4], a.connect, a.discard, delay=0.01))
    while len(a.started) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(a.cancelled) == sorted([V6, V4])  # both cleaned up before the cancellation ended the race


async def test_one_address_is_one_attempt():
    a = Attempts({V4: "fails"})
    with pytest.raises(ConnectionRefusedError):
        await race([V4], a.connect, a.discard)
    assert a.started == [V4]


# --- the listening sockets (gateway/__main__.py) --------------------------------------------------


class NoIPv6Socket:
    """socket.socket on a kernel without IPv6; IPv4 sockets that record instead of binding."""

    def __init__(self, family: int, kind: int = 0, proto: int = 0) -> None:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        self.family = family
        self.address: tuple = ()

    def setsockopt(self, *args: object) -> None:
        pass

    def bind(self, address: tuple) -> None:
        self.address = address

    def listen(self, backlog: int) -> None:
        pass

    def set_inheritable(self, value: bool) -> None:
        pass

    def getsockname(self) -> tuple:
        return self.address

    def close(self) -> None:
        pass


def test_the_default_host_falls_back_to_ipv4_where_ipv6_is_off(monkeypatch):
    monkeypatch.setattr(socket, "socket", NoIPv6Socket)
    (only,) = gateway_main._listen(["::"], 5000, fallback=True)
    assert (only.family, only.getsockname()) == (socket.AF_INET, ("0.0.0.0", 5000))
    # Asked for explicitly, "::" is an error there, not a silent change of family.
    with pytest.raises(SystemExit, match=r"cannot listen on \[::\]:5000: Address family not supported"):
        gateway_main._listen(["::"], 5000, fallback=False)
