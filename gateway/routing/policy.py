"""Where the gateway may connect: pure checks on URLs and addresses.

The gateway contacts only what ``routes.toml`` names, plus what those upstreams point
it at: token realms (from their challenges) and redirect targets (CDNs). An upstream
is trusted for its content, not for where it sends the gateway, so those targets are
checked before any request goes out:

- the scheme is https, or http only when the route's own upstream is plain http
  (an https upstream must not downgrade the gateway to plaintext);
- the address is public: loopback, private, link-local (cloud metadata lives at
  169.254.169.254 and fd00:ec2::254), shared (100.64/10), multicast and reserved
  addresses are refused, unless the route sets ``allow_private_addresses = true``.

IP literals are refused here; host names are checked again when they are resolved,
at connection time (``netguard.py``), so DNS cannot smuggle a private address in.
The route's own upstream origins are always allowed: the operator named them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from urllib.parse import urlsplit

Origin = tuple[str, str, int]

# Names that only ever mean "this machine" or "the cloud's metadata service".
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "metadata", "metadata.google.internal"})


class TargetRefused(ValueError):
    """A realm or redirect target the route's policy does not allow."""


def is_public_address(address: str) -> bool:
    """True for a globally routable IP address (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of an absolute URL: what "same origin" compares everywhere.

    The host is lowercased and loses a trailing dot ("example.com." is the same name);
    the port is the scheme's default when absent. Raises ValueError for a URL that has
    no valid port.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return (scheme, (parts.hostname or "").lower().rstrip("."), port)


def check_target(
    url: str,
    *,
    upstream_scheme: str,
    trusted_origins: Collection[Origin],
    allow_private: bool,
) -> None:
    """Raise TargetRefused unless ``url`` may be contacted on behalf of this route."""
    try:
        urlsplit(url)
    except ValueError:
        raise TargetRefused("not a valid URL") from None
    try:
        scheme, host, port = origin = origin_of(url)
    except ValueError:
        raise TargetRefused("invalid port") from None
    if not host:
        raise TargetRefused("no host")
    if origin in trusted_origins:
        return
    if scheme != "https" and not (scheme == "http" and upstream_scheme == "http"):
        raise TargetRefused(f"{scheme}:// is not allowed (https only)")
    if allow_private:
        return
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        raise TargetRefused(f"{host} is a local name")
    try:
        public = is_public_address(host)
    except ValueError:
        return  # a host name: its addresses are checked when it is resolved
    if not public:
        raise TargetRefused(f"{host} is not a public address")
