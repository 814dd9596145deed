"""Connection-time address checks: the I/O half of ``policy.py``.

A host name that passed the URL checks may still resolve to 127.0.0.1 or to the cloud
metadata address (DNS rebinding). This httpcore network backend resolves the name
itself, refuses non-public addresses, and connects to the checked address, so the
address that was checked is the address that is used. TLS still verifies the
certificate against the host name: httpcore passes the origin's name as SNI.

Not covered: connections through an egress proxy (``HTTPS_PROXY``), where the proxy
resolves names; URL-level checks of IP literals still apply there.
"""

from __future__ import annotations

import asyncio
import socket
import typing
from collections.abc import Collection, Iterable

import httpcore

from gateway.policy import is_public_address

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
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
