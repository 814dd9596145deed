"""The router: what a route is, and which route (and upstream repository) a request goes to.

Pure: the types a validated ``routes.toml`` becomes (``routes_file.py`` builds them), and
the table that resolves a request's facts (Host, repository path, ``ns``) with
dictionary look-ups, no regular expressions on the hot path. Every question "which
route is this?" is asked here: ``resolve`` for ``/v2/<name>/...``, ``route_for_ping``
for ``/v2/``, ``route_for_token`` for the token endpoint.

Resolution order (first match wins):

1. the ``Host`` header matches a route's host pattern: the whole path is the name;
2. the first path component is a route's name or prefix: it is stripped;
3. containerd's ``ns`` query parameter names a route (containerd docs/hosts.md:
   mirrors receive ``?ns=<registry host>``);
4. the default route (Docker's ``registry-mirrors`` only ever sends Docker Hub names).

A first component that looks like a registry host (it has a "." or ":", or is
``localhost``) but names no route is refused with NAME_UNKNOWN: the gateway never
turns an unknown host in a path or an ``ns`` into a request to that host.
Docker Hub namespaces cannot contain dots, so this never hides a Hub repository.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from gateway.http.errors import DENIED, NAME_INVALID, NAME_UNKNOWN, RegistryError
from gateway.routing.policy import Origin, check_target
from gateway.routing.reference import NAME_MAX_LENGTH, check_name


@dataclass(frozen=True, slots=True)
class Credentials:
    """Upstream credentials of a route. The password never appears in a repr or log.

    With ``helper`` (``[[route.credentials]]`` ``helper = "pass"``) the username and password are
    empty: they come from ``docker-credential-<helper> get`` at first use (``credential_helper.py``).
    """

    username: str
    password: str = field(repr=False)
    # The account's configured name ([[route.credentials]] name), for logs and metrics.
    name: str | None = None
    # A docker credential helper's name: the secret is asked of it, lazily, and cached.
    helper: str | None = None

    @property
    def identity(self) -> str:
        """What distinguishes these credentials in cache keys, logs and metrics, without the secret."""
        return f"account:{self.name}" if self.name else f"user:{self.username}"


@dataclass(frozen=True, slots=True)
class Account:
    """One of a route's ``[[route.credentials]]``: credentials for the repositories its patterns match.

    No patterns: every repository. Accounts whose matching patterns are equally specific
    form a pool (the gateway spreads the pull budget over them, ``authorizer.py``).
    """

    credentials: Credentials
    patterns: tuple[str, ...] = ()
    _matchers: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def build(cls, credentials: Credentials, patterns: Sequence[str]) -> Account:
        matchers = tuple(m for m in (_compile_patterns([p]) for p in patterns) if m is not None)
        return cls(credentials, tuple(patterns), matchers)

    def specificity(self, repository: str) -> int | None:
        """How closely the account's patterns fit ``repository`` (the literal length of the best one that
        matches; 0 for an account without patterns); None when none matches."""
        if not self.patterns:
            return 0
        fits = [
            len(p.replace("*", "")) for p, m in zip(self.patterns, self._matchers, strict=True) if m.match(repository)
        ]
        return max(fits) + 1 if fits else None


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream registry's base URL, split once."""

    url: str  # scheme://host[:port], no trailing slash
    scheme: str
    host: str
    port: int

    @property
    def origin(self) -> Origin:
        return (self.scheme, self.host, self.port)


@dataclass(frozen=True, slots=True)
class GatewayTokens:
    """``auth = "gateway"``: the gateway gets its own tokens, anonymously or with the route's credentials.

    Answers are the same for every client, so they may be shared (the manifest cache).
    """

    credentials: Credentials | None = None
    # The one upstream (origin) the credentials belong to; they never go anywhere else.
    credentials_origin: Origin | None = None
    # [[route.credentials]]: several accounts, chosen per repository (``credentials`` is then None).
    accounts: tuple[Account, ...] = ()
    uses_client_logins: ClassVar[bool] = False

    def candidates(self, repository: str) -> list[Credentials]:
        """The credentials that may be used for ``repository``: the most specific accounts (a pool), or the one."""
        if not self.accounts:
            return [self.credentials] if self.credentials is not None else []
        fits = [(a.specificity(repository), a) for a in self.accounts]
        best = max((s for s, _ in fits if s is not None), default=None)
        return [a.credentials for s, a in fits if s is not None and s == best]


@dataclass(frozen=True, slots=True)
class ClientTokens:
    """``auth = "passthrough"``: each client logs in with its own upstream credentials (``passthrough.py``).

    The client's token goes to the route's upstreams and nowhere else; answers depend
    on who asks, so none is ever shared.
    """

    uses_client_logins: ClassVar[bool] = True


# How a route's requests are authorized upstream: one type per mode (``authorizer.py``
# implements each). A new mode is a new type here and its authorizer there.
UpstreamAuth = GatewayTokens | ClientTokens


@dataclass(frozen=True, slots=True)
class RepositoryPolicy:
    """Per-route allow and deny lists of repository patterns.

    ``*`` matches within one path component, ``**`` across components: ``library/*``
    is every official image, ``myorg/**`` everything under myorg. A denied name is
    refused; when an allow list exists, a name must match it. Deny wins.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    _allow_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _deny_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, allow: Sequence[str], deny: Sequence[str]) -> RepositoryPolicy:
        return cls(tuple(allow), tuple(deny), _compile_patterns(allow), _compile_patterns(deny))

    def permits(self, name: str) -> bool:
        if self._deny_re is not None and self._deny_re.match(name):
            return False
        return self._allow_re is None or self._allow_re.match(name) is not None


_PATTERN_RE = re.compile(r"[a-z0-9._*/-]+\Z")


def _compile_patterns(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    parts = []
    for pattern in patterns:
        if not _PATTERN_RE.match(pattern) or "***" in pattern:
            raise ValueError(f"{pattern!r} is not a repository pattern (lowercase names, '*' and '**')")
        regex = ""
        for i, piece in enumerate(pattern.split("**")):
            if i:
                regex += ".*"
            regex += "[^/]*".join(re.escape(p) for p in piece.split("*"))
        parts.append(f"(?:{regex})")
    return re.compile("(?:" + "|".join(parts) + r")\Z")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstreams: tuple[Upstream, ...]
    # Asked first for content addressed by digest (blobs, manifests by digest), which the gateway
    # verifies; never for tags, tag lists or referrers, and never given credentials.
    mirrors: tuple[Upstream, ...] = ()
    hosts: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    default: bool = False
    library: bool = False
    auth: UpstreamAuth = GatewayTokens()
    blob_redirect: Literal["follow", "pass"] = "follow"
    # Hash every full blob body as it streams and abort the client on a mismatch (blobs/digest.py).
    verify_blobs: bool = True
    allow_private_addresses: bool = False
    policy: RepositoryPolicy = field(default_factory=RepositoryPolicy)

    @property
    def upstream(self) -> Upstream:
        """The first (preferred) upstream."""
        return self.upstreams[0]

    @property
    def origins(self) -> frozenset[Origin]:
        """The route's own upstreams: the origins the operator named, trusted for where they are."""
        return frozenset(u.origin for u in self.upstreams)

    def check_destination(self, url: str) -> None:
        """Raise TargetRefused unless a token realm or redirect target ``url`` may be contacted (``policy.py``)."""
        check_target(
            url,
            upstream_scheme=self.upstream.scheme,
            trusted_origins=self.origins,
            allow_private=self.allow_private_addresses,
        )


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What of a request decides its route: the Host header, the repository path, ``ns``."""

    host: str | None
    name: str
    ns: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: the route, and the repository on both sides."""

    route: Route
    upstream_name: str  # the repository at the upstream: "library/alpine"
    client_name: str  # the repository as the client wrote it, prefix removed: "alpine"
    prefix: str = ""  # the path prefix the client used, with its slash: "docker.io/"

    @property
    def client_path_name(self) -> str:
        """The repository part of the client's own path, for rewriting links back."""
        return self.prefix + self.client_name


def _looks_like_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def host_without_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal: "[::1]:5000"
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


class RouteTable:
    """The validated routes, indexed for constant-time resolution."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self.default: Route | None = None
        self._exact: dict[str, Route] = {}
        self._first_label: dict[str, Route] = {}  # "ghcr.*"
        self._suffixes: list[tuple[str, Route]] = []  # "*.example.com", longest first
        self._prefixes: dict[str, Route] = {}
        owners: dict[str, str] = {}
        for route in self.routes:
            if route.default:
                if self.default is not None:
                    raise ValueError(f"routes {self.default.name!r} and {route.name!r} are both default = true")
                self.default = route
            for prefix in route.prefixes:
                if prefix in self._prefixes:
                    raise ValueError(
                        f"route {route.name!r}: prefix {prefix!r} is already claimed by "
                        f"route {self._prefixes[prefix].name!r}"
                    )
                self._prefixes[prefix] = route
            for pattern in route.hosts:
                if pattern in owners:
                    raise ValueError(
                        f"route {route.name!r}: host pattern {pattern!r} is already claimed by "
                        f"route {owners[pattern]!r}"
                    )
                owners[pattern] = route.name
                if pattern.endswith(".*"):
                    self._first_label[pattern[:-2]] = route
                elif pattern.startswith("*."):
                    self._suffixes.append((pattern[1:], route))
                else:
                    self._exact[pattern] = route
        self._suffixes.sort(key=lambda item: len(item[0]), reverse=True)

    @functools.cached_property
    def shared_host_passthrough(self) -> bool:
        """Whether a host no host pattern claims speaks for a passthrough route (by prefix, ``ns`` or
        as the default route): its ``/v2/`` then asks for a login and its tokens are grants (``grants.py``)."""
        return any(
            r.auth.uses_client_logins and (r.default or any(self._prefixes.get(p) is r for p in r.prefixes))
            for r in self.routes
        )

    def is_shared_host(self, host: str | None) -> bool:
        """Whether ``host`` is such a host: one no host pattern claims, while a passthrough route is
        reachable on it (``shared_host_passthrough``)."""
        return self.shared_host_passthrough and self.route_for_host(host) is None

    @property
    def login_route(self) -> Route | None:
        """Where a shared host's ``docker login`` (a token request with no scope) is checked: the
        default route if it passes logins through, else the one passthrough route reachable by
        prefix; None when that is ambiguous (the login is then checked at the first pull)."""
        if self.default is not None and self.default.auth.uses_client_logins:
            return self.default
        reachable = {r.name: r for r in self._prefixes.values() if r.auth.uses_client_logins}
        return next(iter(reachable.values())) if len(reachable) == 1 else None

    @property
    def ping_service(self) -> str:
        """The ``service`` of a shared host's challenge: the default route's name (Docker's
        registry-mirrors ask for its repositories without a prefix), else the gateway's."""
        return self.default.name if self.default is not None else "registry-gateway"

    def by_name(self, name: str) -> Route | None:
        return self._prefixes.get(name.lower())

    def route_for_host(self, host: str | None) -> Route | None:
        if not host:
            return None
        host = host_without_port(host)
        route = self._exact.get(host)
        if route is not None:
            return route
        if self._first_label and "." in host:
            # "ghcr.*" matches ghcr.example.com; "ghcr.mirror.*" matches ghcr.mirror.example.com.
            labels = host.split(".")
            for n in range(len(labels) - 1, 0, -1):
                route = self._first_label.get(".".join(labels[:n]))
                if route is not None:
                    return route
        for suffix, route in self._suffixes:
            if host.endswith(suffix):
                return route
        return None

    def route_for_ping(self, host: str | None) -> Route | None:
        """The route ``GET /v2/`` on this host speaks for: its host route, else the default route."""
        return self.route_for_host(host) or self.default

    def route_for_token(self, service: str, host: str | None) -> Route | None:
        """The route a token request is for: the ``service`` the gateway's challenge named, else the host's."""
        return (self.by_name(service) if service else None) or self.route_for_host(host)

    def _split_prefix(self, name: str) -> tuple[Route | None, str, str]:
        """(route, prefix with its slash, rest) when the first component of ``name`` is a route's name or prefix."""
        first, sep, rest = name.partition("/")
        route = self._prefixes.get(first) if sep and rest else None
        if route is None:
            return None, "", name
        return route, first + "/", rest

    def resolve(self, facts: RequestFacts) -> Target:
        """Map a request's facts (Host header, repository path, ``ns``) to a Target.

        Raises RegistryError (NAME_UNKNOWN, NAME_INVALID, DENIED) for anything unroutable.
        """
        name = facts.name
        ns = facts.ns
        route = self.route_for_host(facts.host)
        prefix = ""
        if route is None:
            route, prefix, name = self._split_prefix(name)
            if route is None:
                first, sep, rest = name.partition("/")
                if sep and rest and _looks_like_registry(first):
                    raise self._unknown(
                        f"no route for registry {first[:100]!r}: this gateway only serves its configured registries"
                    )
        if route is None and ns:
            route = self._prefixes.get(ns.lower())
            if route is None:
                raise self._unknown(f"no route for registry {ns[:100]!r} (from the ns parameter)")
        if route is None:
            route = self.default
            if route is None:
                raise self._unknown("no route matches this host or path, and no route is the default")
        return self._target_in(route, name, prefix)

    def _unknown(self, message: str) -> RegistryError:
        return RegistryError(404, NAME_UNKNOWN, message, detail={"registries": [r.name for r in self.routes]})

    def target_on(self, route: Route, name: str) -> Target:
        """The Target for ``name`` on a known route, the route's own prefix (if the name has one) removed.

        The token endpoint's scopes name repositories the way clients wrote them.
        """
        owner, prefix, rest = self._split_prefix(name)
        if owner is route:
            return self._target_in(route, rest, prefix)
        return self._target_in(route, name)

    @staticmethod
    def _target_in(route: Route, name: str, prefix: str = "") -> Target:
        """The Target for ``name`` (prefix already removed) on a known route."""
        check_name(name)
        upstream_name = name
        if route.library and "/" not in name:
            # Docker Hub's official images live under library/: "nginx" is "library/nginx".
            upstream_name = "library/" + name
        if len(upstream_name) > NAME_MAX_LENGTH:
            raise RegistryError(400, NAME_INVALID, f"repository name is longer than {NAME_MAX_LENGTH} characters")
        if not route.policy.permits(upstream_name):
            raise RegistryError(
                403,
                DENIED,
                f"the gateway's policy refuses {upstream_name!r} on {route.name}",
                detail={"route": route.name, "repository": upstream_name},
            )
        return Target(route=route, upstream_name=upstream_name, client_name=name, prefix=prefix)
