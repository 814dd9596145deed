"""The routing table: ``routes.toml`` in, (Host, path, ns) -> upstream repository out.

Loading validates everything once, at start-up, and reports the first problem as
one line naming the file, the route and the key (``ConfigError``). Resolution is
pure and cheap: dictionary look-ups, no regular expressions on the hot path.

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

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import DENIED, NAME_INVALID, NAME_UNKNOWN, RegistryError
from gateway.reference import NAME_MAX_LENGTH, check_name


class ConfigError(Exception):
    """A configuration problem, reported as one line: ``<file>: <where>: <reason>``."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Upstream credentials of a route. The password never appears in a repr or log."""

    username: str
    password: str = field(repr=False)

    @property
    def identity(self) -> str:
        """What distinguishes these credentials in cache keys, without the secret."""
        return f"user:{self.username}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream registry's base URL, split once."""

    url: str  # scheme://host[:port], no trailing slash
    scheme: str
    host: str
    port: int

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


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
    hosts: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    default: bool = False
    library: bool = False
    credentials: Credentials | None = None
    # The one upstream (origin) the credentials belong to; they never go anywhere else.
    credentials_origin: tuple[str, str, int] | None = None
    blob_redirect: Literal["follow", "pass"] = "follow"
    auth: Literal["gateway", "passthrough"] = "gateway"
    allow_private_addresses: bool = False
    policy: RepositoryPolicy = field(default_factory=RepositoryPolicy)

    @property
    def upstream(self) -> Upstream:
        """The first (preferred) upstream."""
        return self.upstreams[0]


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


# --- routes.toml schema ---------------------------------------------------------------

_REGISTRY_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?\Z")
_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")


class _RouteModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    upstream: str | list[str]
    hosts: list[str] = []
    prefixes: list[str] = []
    default: bool = False
    library: bool = False
    username: str | None = None
    username_env: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    credentials_upstream: str | None = None
    blob_redirect: Literal["follow", "pass"] = "follow"
    auth: Literal["gateway", "passthrough"] = "gateway"
    allow_private_addresses: bool = False
    allow: list[str] = []
    deny: list[str] = []


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    route: list[dict[str, Any]] = Field(min_length=1)


def _describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return key, "unknown key"
    if first["type"] == "missing":
        return key, "required key is missing"
    return key, first["msg"]


def _parse_upstream(url: str) -> Upstream:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the URL: use username_env / password_env or password_file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r} must be a bare origin (scheme://host[:port]) without a path or query")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ValueError(f"{url!r} has an invalid port") from exc
    host = parts.hostname.lower()
    netloc = f"[{host}]" if ":" in host else host
    default_port = 443 if parts.scheme == "https" else 80
    base = f"{parts.scheme}://{netloc}" + ("" if port == default_port else f":{port}")
    return Upstream(url=base, scheme=parts.scheme, host=host, port=port)


def _check_host_pattern(pattern: str) -> str:
    pattern = pattern.strip().lower().rstrip(".")
    labels = pattern.split(".")
    if len(labels) >= 2 and labels[-1] == "*" and "*" not in labels[:-1]:
        # "ghcr.*" and "ghcr.mirror.*": the first labels are fixed, the domain is any.
        ok = all(_HOST_LABEL_RE.match(label) for label in labels[:-1])
    elif len(labels) >= 2 and labels[0] == "*" and "*" not in labels[1:]:
        ok = all(_HOST_LABEL_RE.match(label) for label in labels[1:])
    else:
        ok = all(_HOST_LABEL_RE.match(label) for label in labels)
    if not ok:
        raise ValueError(f"{pattern!r} is not a host name, 'label.*' or '*.domain' pattern")
    return pattern


def _read_secret_file(path: str) -> str:
    try:
        # Kubernetes secret files and `echo secret > file` both end in a newline that is
        # not part of the secret.
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc


def _credentials(model: _RouteModel, environ: Mapping[str, str]) -> Credentials | None:
    if model.username is not None and model.username_env is not None:
        raise ValueError("username: set username or username_env, not both")
    if model.password_env is not None and model.password_file is not None:
        raise ValueError("password_env: set password_env or password_file, not both")
    username = model.username
    if model.username_env is not None:
        username = environ.get(model.username_env)
        if not username:
            raise ValueError(f"username_env: environment variable {model.username_env} is not set")
    password: str | None = None
    if model.password_env is not None:
        password = environ.get(model.password_env)
        if not password:
            raise ValueError(f"password_env: environment variable {model.password_env} is not set")
    elif model.password_file is not None:
        try:
            password = _read_secret_file(model.password_file)
        except ValueError as exc:
            raise ValueError(f"password_file: {exc}") from None
    if username is None and password is None:
        return None
    if username is None or password is None:
        raise ValueError("credentials need both a username and a password")
    return Credentials(username=username, password=password)


def _upstreams(model: _RouteModel) -> tuple[Upstream, ...]:
    urls = [model.upstream] if isinstance(model.upstream, str) else model.upstream
    if not urls:
        raise ValueError("upstream: the list is empty")
    try:
        upstreams = tuple(_parse_upstream(url) for url in urls)
    except ValueError as exc:
        raise ValueError(f"upstream: {exc}") from None
    if len({u.origin for u in upstreams}) != len(upstreams):
        raise ValueError("upstream: the same upstream is listed twice")
    return upstreams


def _credentials_origin(
    model: _RouteModel, upstreams: tuple[Upstream, ...], credentials: Credentials | None
) -> tuple[str, str, int] | None:
    if model.credentials_upstream is not None:
        try:
            wanted = _parse_upstream(model.credentials_upstream).origin
        except ValueError as exc:
            raise ValueError(f"credentials_upstream: {exc}") from None
        if wanted not in {u.origin for u in upstreams}:
            raise ValueError("credentials_upstream: not one of this route's upstreams")
        return wanted
    if credentials is None:
        return None
    if len(upstreams) > 1:
        # Sending one registry's credentials to a mirror of it would leak them: say which.
        raise ValueError("credentials_upstream: required when a route with credentials lists several upstreams")
    return upstreams[0].origin


def _build_route(model: _RouteModel, environ: Mapping[str, str]) -> Route:
    name = model.name.lower()
    if not _REGISTRY_NAME_RE.match(name):
        raise ValueError(f"name: {model.name!r} is not a registry host name such as 'ghcr.io'")
    upstreams = _upstreams(model)
    credentials = _credentials(model, environ)
    credentials_origin = _credentials_origin(model, upstreams, credentials)
    if model.auth == "passthrough" and credentials is not None:
        raise ValueError("auth: a passthrough route forwards its clients' logins and takes no credentials")
    try:
        policy = RepositoryPolicy.build(model.allow, model.deny)
    except ValueError as exc:
        raise ValueError(f"allow/deny: {exc}") from None
    prefixes: list[str] = [name]
    for prefix in model.prefixes:
        prefix = prefix.strip().strip("/").lower()
        if not _REGISTRY_NAME_RE.match(prefix):
            raise ValueError(f"prefixes: {prefix!r} is not a registry host name")
        if prefix not in prefixes:
            prefixes.append(prefix)
    try:
        hosts = tuple(_check_host_pattern(p) for p in model.hosts)
    except ValueError as exc:
        raise ValueError(f"hosts: {exc}") from None
    return Route(
        name=name,
        upstreams=upstreams,
        hosts=hosts,
        prefixes=tuple(prefixes),
        default=model.default,
        library=model.library,
        credentials=credentials,
        credentials_origin=credentials_origin,
        blob_redirect=model.blob_redirect,
        auth=model.auth,
        allow_private_addresses=model.allow_private_addresses,
        policy=policy,
    )


def parse_routes(doc: Mapping[str, Any], source: str, environ: Mapping[str, str]) -> RouteTable:
    """Validate a parsed routes.toml document. Raises ConfigError naming ``source``."""
    try:
        top = _FileModel.model_validate(doc)
    except ValidationError as exc:
        key, reason = _describe_validation_error(exc)
        raise ConfigError(f"{source}: {key}: {reason}") from None

    routes: list[Route] = []
    for index, raw in enumerate(top.route, start=1):
        label = f"route #{index}" + (f" ({raw['name']})" if isinstance(raw.get("name"), str) else "")
        try:
            model = _RouteModel.model_validate(raw)
        except ValidationError as exc:
            key, reason = _describe_validation_error(exc)
            raise ConfigError(f"{source}: {label}: {key}: {reason}") from None
        try:
            routes.append(_build_route(model, environ))
        except ValueError as exc:
            raise ConfigError(f"{source}: {label}: {exc}") from None
    try:
        return RouteTable(routes)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_routes(path: Path, environ: Mapping[str, str] | None = None) -> RouteTable:
    """Read, parse and validate a routes.toml file."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_routes(doc, str(path), os.environ if environ is None else environ)


# --- resolution -----------------------------------------------------------------------


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

    def by_name(self, name: str) -> Route | None:
        return self._prefixes.get(name.lower())

    @staticmethod
    def strip_prefix(route: Route, name: str) -> tuple[str, str]:
        """(prefix with its slash, rest) when ``name`` starts with one of the route's names."""
        first, sep, rest = name.partition("/")
        if sep and rest and first in route.prefixes:
            return first + "/", rest
        return "", name

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

    def resolve(self, host: str | None, name: str, ns: str | None) -> Target:
        """Map a request's Host header, repository path and ``ns`` to a Target.

        Raises RegistryError (NAME_UNKNOWN, NAME_INVALID) for anything unroutable.
        """
        route = self.route_for_host(host)
        prefix = ""
        if route is None:
            first, sep, rest = name.partition("/")
            if sep and rest:
                route = self._prefixes.get(first)
                if route is not None:
                    prefix, name = first + "/", rest
                elif _looks_like_registry(first):
                    raise RegistryError(
                        404,
                        NAME_UNKNOWN,
                        f"no route for registry {first[:100]!r}: this gateway only serves its configured registries",
                        detail={"registries": [r.name for r in self.routes]},
                    )
        if route is None and ns:
            route = self._prefixes.get(ns.lower())
            if route is None:
                raise RegistryError(
                    404,
                    NAME_UNKNOWN,
                    f"no route for registry {ns[:100]!r} (from the ns parameter)",
                    detail={"registries": [r.name for r in self.routes]},
                )
        if route is None:
            route = self.default
            if route is None:
                raise RegistryError(
                    404,
                    NAME_UNKNOWN,
                    "no route matches this host or path, and no route is the default",
                    detail={"registries": [r.name for r in self.routes]},
                )
        return self.target_in(route, name, prefix)

    @staticmethod
    def target_in(route: Route, name: str, prefix: str = "") -> Target:
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
