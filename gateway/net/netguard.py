"""Connection-time address checks: the I/O half of ``policy.py``.

A host name that passed the URL checks may still resolve to 127.0.0.1 or to the cloud
metadata address (DNS rebinding). This httpcore network backend resolves the name
itself, refuses non-public addresses, and connects to the checked address, so the
address that was checked is the address that is used. TLS still verifies the
certificate against the host name: httpcore passes the origin's name as SNI.

When a name has several addresses, they are raced as RFC 8305 ("Happy Eyeballs v2")
says: families interleaved, the next attempt started when the previous one fails or
after 250 ms, the first to connect used and the others closed. A host whose IPv6
address (or one of its IPv4 addresses) stalls costs 250 ms, not a connect timeout.
Only the TCP handshake is raced; TLS runs on the winner.

Not covered: connections through an egress proxy (``HTTPS_PROXY``), where the proxy
resolves names; URL-level checks of IP literals still apply there.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import typing
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

import httpcore

from gateway.routing.policy import is_public_address

REFUSED = "refused by the gateway's address policy"


class AddressRefused(httpcore.ConnectError):
    pass


class AddressGuard:
    """Which hosts may be reached by name, and the check for every other one."""

    def __init__(self, trusted_hosts: Collection[tuple[str, int]], allow_private: bool) -> None:
        self._trusted = {(h.lower(), p) for h, p in trusted_hosts}
        self._allow_private = allow_private

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to: resolved here, and all public unless the host is trusted.

        Raises OSError when the name does not resolve, AddressRefused when any address is not
        public (one private address among public ones is enough for a rebinding attack).
        """
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError(f"{host} has no address")
        if self._allow_private or (host.lower(), port) in self._trusted:
            return addresses
        if not all(is_public_address(a) for a in addresses):
            raise AddressRefused(f"{REFUSED}: {host} resolves to a non-public address")
        return addresses


# RFC 8305 section 5: the "Connection Attempt Delay"; 250 ms is the recommended value.
CONNECTION_ATTEMPT_DELAY = 0.25

T = typing.TypeVar("T")


def interleaved(addresses: Sequence[str]) -> list[str]:
    """RFC 8305 section 4: alternate the families, starting with the first address's (the
    resolver's order, RFC 6724, which prefers IPv6 where it works), each family in its order."""
    first_is_v6 = ":" in addresses[0]
    first = [a for a in addresses if (":" in a) == first_is_v6]
    other = [a for a in addresses if (":" in a) != first_is_v6]
    return [a for pair in itertools.zip_longest(first, other) for a in pair if a is not None]


async def race(
    addresses: Sequence[str],
    connect: Callable[[str], Awaitable[T]],
    discard: Callable[[T], Awaitable[None]],
    delay: float = CONNECTION_ATTEMPT_DELAY,
) -> T:
    """The first of ``connect(address)`` to succeed, the addresses tried in RFC 8305 order.

    Each attempt starts when the one before it fails, or ``delay`` seconds after it started
    (RFC 8305 section 5). When one succeeds the others are cancelled, and any that
    connected anyway is handed to ``discard``, before this returns: nothing is left
    behind, also when the caller's timeout cancels the race. When every attempt fails,
    the last failure is raised. ``connect`` must clean up after itself when cancelled.
    """
    if len(addresses) == 1:  # the common case: no tasks, no timers
        return await connect(addresses[0])
    waiting = interleaved(addresses)
    pending: set[asyncio.Task[T]] = set()
    failure: BaseException | None = None
    try:
        while True:
            if waiting:
                pending.add(asyncio.ensure_future(connect(waiting.pop(0))))
            elif not pending:
                assert failure is not None
                raise failure
            done, pending = await asyncio.wait(
                pending, timeout=delay if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            winner: asyncio.Task[T] | None = None
            for task in done:
                if task.exception() is not None:
                    failure = task.exception()
                elif winner is None:
                    winner = task
                else:  # two connected in the same loop iteration
                    await discard(task.result())
            if winner is not None:
                return winner.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            for task in pending:
                if not task.cancelled() and task.exception() is None:
                    await discard(task.result())  # connected just before its cancel arrived


async def tcp_socket(address: str, port: int) -> socket.socket:
    """A TCP connection to an address literal, as a connected non-blocking socket; closed if cancelled."""
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only for sockets whose
    # proto says TCP, as create_connection's own sockets (from getaddrinfo) do.
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def close_socket(sock: socket.socket) -> None:
    sock.close()


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's default backend, connecting only to addresses the guard returned."""

    def __init__(self, guard: AddressGuard) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._guard = guard

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await asyncio.wait_for(self._guard.addresses(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc

        async def connect(address: str) -> httpcore.AsyncNetworkStream:
            return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)

        async def discard(stream: httpcore.AsyncNetworkStream) -> None:
            await stream.aclose()

        # Raced like the lean transport's (RFC 8305); the timeout bounds each attempt, as before.
        return await race(addresses, connect, discard)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
