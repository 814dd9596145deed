"""Trusted reverse proxies: ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``X-Forwarded-For``.

Behind nginx or an ingress the gateway sees the proxy's address, and maybe not the
host name the client used, so host routing, the scheme of URLs it writes and the
client IP in logs all depend on these headers. They are believed only from peers
listed in ``GATEWAY_FORWARDED_ALLOW_IPS`` (default: loopback); from anyone else
they are ignored, so a client cannot pick a route or fake its address by sending
them itself.

For ``X-Forwarded-For`` the client is the right-most address that is not itself a
trusted proxy: every proxy appends the address it received the request from, so
entries to the left of the first untrusted hop are whatever the client claimed.
``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are taken from their right-most value,
the one set by the nearest proxy.

IPv4 clients of a dual-stack listener (``--host ::``) arrive as IPv4-mapped IPv6
addresses, ``::ffff:a.b.c.d`` (RFC 4291 2.5.5.2, RFC 3493 3.7). This middleware, the
outermost, rewrites the peer to ``a.b.c.d`` before anything reads it, so the trusted
proxies, the rate limit and the access log see one address per client whichever socket
it came in on; mapped and bracketed (``[2001:db8::1]:443``) ``X-Forwarded-For`` entries
are read the same way.

References: uvicorn's ``middleware/proxy_headers.py`` (which handles Proto and For
but not Host), MDN "X-Forwarded-For" (security and privacy concerns).
"""

from __future__ import annotations

import functools
import ipaddress

from gateway.http.asgi import ASGIApp, Receive, Scope, Send

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHED = 4096  # peers whose answers are remembered


class TrustedProxies:
    """A set of trusted peers: addresses, networks, or everyone (``*``)."""

    def __init__(self, spec: str) -> None:
        self.everyone = False
        self.networks: list[IPNetwork] = []
        self.literals: set[str] = set()  # e.g. "unix:" peers or host names, compared as text
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            if item == "*":
                self.everyone = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.literals.add(item)

        # Answers by peer, so that the request path is a dictionary look-up, not an address
        # parse; emptied when full, since X-Forwarded-For entries are anyone's strings.
        self._answers: dict[str, bool] = {}

    def __contains__(self, host: str | None) -> bool:
        if self.everyone:
            return True
        if host is None:
            return False
        known = self._answers.get(host)
        if known is None:
            if len(self._answers) >= _CACHED:
                self._answers.clear()
            known = self._answers[host] = self._match(host)
        return known

    def _match(self, host: str) -> bool:
        if host in self.literals:
            return True
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
        except ValueError:
            return False
        # Listed as 10.0.0.0/8, seen as ::ffff:10.1.2.3: the same peer.
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


@functools.lru_cache(maxsize=_CACHED)
def unmapped(host: str) -> str:
    """``a.b.c.d`` for an IPv4-mapped ``::ffff:a.b.c.d`` (RFC 4291 2.5.5.2); any other host as it is.

    Cached: with a dual-stack listener every IPv4 client comes through here, on every request.
    """
    if host[:7].lower() != "::ffff:":  # one slice on the common path: no parse
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)


def _hop_address(hop: str) -> str:
    """The address in one X-Forwarded-For entry: brackets and a port some proxies add are dropped."""
    if hop.startswith("["):  # "[2001:db8::1]:443" (the RFC 7239 node form, which some proxies copy)
        hop = hop[1 : hop.find("]")] if "]" in hop else hop
    elif hop.count(":") == 1:  # "203.0.113.7:51234"; a bare IPv6 address has at least two colons
        hop = hop.partition(":")[0]
    return unmapped(hop)


def _last_value(raw: bytes) -> str:
    return raw.decode("latin-1").rsplit(",", 1)[-1].strip()


class ForwardedHeadersMiddleware:
    """Apply X-Forwarded-* from trusted peers to the ASGI scope; drop them otherwise."""

    def __init__(self, app: ASGIApp, trusted: str) -> None:
        self.app = app
        self.trusted = TrustedProxies(trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            if client is not None:
                host = client[0]
                if host.startswith("::ffff:"):  # a dual-stack socket's IPv4 peer, as the kernel writes it
                    host = unmapped(host)
                    scope["client"] = (host, client[1])
                if host in self.trusted:
                    self._apply(scope)
        await self.app(scope, receive, send)

    def _apply(self, scope: Scope) -> None:
        forwarded_for = proto = host = None
        headers: list[tuple[bytes, bytes]] = []
        for key, value in scope["headers"]:
            if key == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b"," + value
            elif key == b"x-forwarded-proto":
                proto = value
            elif key == b"x-forwarded-host":
                host = value
            headers.append((key, value))
        if proto is not None:
            scheme = _last_value(proto).lower()
            if scheme in ("http", "https"):
                scope["scheme"] = scheme
        if host is not None:
            value = _last_value(host)
            if value and all(33 <= ord(c) < 127 for c in value):
                headers = [(k, v) for k, v in headers if k != b"host"]
                headers.append((b"host", value.encode("latin-1")))
                scope["headers"] = headers
        if forwarded_for is not None:
            hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
            client_host = None
            for hop in reversed(hops):
                client_host = _hop_address(hop)
                if client_host not in self.trusted:
                    break
            if client_host is not None:
                scope["client"] = (client_host, 0)
