"""``routes.toml`` in, a validated ``RouteTable`` out.

Loading validates everything once, at start-up, and reports the first problem as
one line naming the file, the route and the key (``ConfigError``): a pydantic model
per table for the keys and their types, then the checks that span keys (credentials
and the upstream they belong to, prefixes, host patterns). Secrets come from the
environment or from files (``*_env``, ``*_file``), never from the file itself.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.http.errors import ConfigError
from gateway.routing.policy import Origin
from gateway.routing.routes import (
    Account,
    ClientTokens,
    Credentials,
    GatewayTokens,
    RepositoryPolicy,
    Route,
    RouteTable,
    Upstream,
    UpstreamAuth,
)

_REGISTRY_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?\Z")
_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")
_HELPER_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")


class _RouteModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    upstream: str | list[str]
    mirrors: list[str] = []
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
    verify_blobs: bool = True
    auth: Literal["gateway", "passthrough"] = "gateway"
    allow_private_addresses: bool = False
    credentials: list[_AccountModel] = []
    allow: list[str] = []
    deny: list[str] = []


class _AccountModel(BaseModel):
    """One ``[[route.credentials]]`` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    repositories: list[str] = []
    username: str | None = None
    username_env: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    # docker-credential-helpers: the program docker-credential-<helper>, found on PATH at first use.
    helper: str | None = None


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


def _credentials(model: _RouteModel | _AccountModel, environ: Mapping[str, str]) -> Credentials | None:
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
    return Credentials(
        username=username, password=password, name=model.name if isinstance(model, _AccountModel) else None
    )


def _helper_credentials(entry: _AccountModel) -> Credentials:
    """An account whose secret a docker credential helper gives: checked here, asked at first use (never at
    load time, so that a file validates where the helper is not installed)."""
    helper = entry.helper or ""
    others = [k for k in ("username", "username_env", "password_env", "password_file") if getattr(entry, k) is not None]
    if others:
        raise ValueError(f"helper: set helper or {'/'.join(others)}, not both")
    if not _HELPER_RE.match(helper) or helper in (".", ".."):
        raise ValueError(
            f"helper: {helper[:64]!r} is not a plain program name (letters, digits, '.', '_', '-'): "
            "docker-credential-<helper> is found on PATH"
        )
    return Credentials(username="", password="", name=entry.name, helper=helper)


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


def _mirrors(model: _RouteModel, upstreams: tuple[Upstream, ...]) -> tuple[Upstream, ...]:
    try:
        mirrors = tuple(_parse_upstream(url) for url in model.mirrors)
    except ValueError as exc:
        raise ValueError(f"mirrors: {exc}") from None
    origins = [m.origin for m in mirrors]
    if len(set(origins)) != len(origins):
        raise ValueError("mirrors: the same mirror is listed twice")
    if set(origins) & {u.origin for u in upstreams}:
        raise ValueError("mirrors: an upstream of the route cannot be its mirror too")
    return mirrors


def _credentials_origin(
    model: _RouteModel, upstreams: tuple[Upstream, ...], credentials: Credentials | None
) -> Origin | None:
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


def _accounts(model: _RouteModel, environ: Mapping[str, str]) -> tuple[Account, ...]:
    accounts: list[Account] = []
    names: set[str] = set()
    for index, entry in enumerate(model.credentials, start=1):
        where = f"credentials #{index} ({entry.name})"
        if entry.name in names:
            raise ValueError(f"{where}: the name is used twice")
        names.add(entry.name)
        try:
            credentials = _helper_credentials(entry) if entry.helper is not None else _credentials(entry, environ)
            RepositoryPolicy.build(entry.repositories, ())  # the same pattern syntax as allow/deny
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if credentials is None:
            raise ValueError(f"{where}: credentials need both a username and a password")
        accounts.append(Account.build(credentials, entry.repositories))
    return tuple(accounts)


def _upstream_auth(model: _RouteModel, upstreams: tuple[Upstream, ...], environ: Mapping[str, str]) -> UpstreamAuth:
    credentials = _credentials(model, environ)
    accounts = _accounts(model, environ)
    if credentials is not None and accounts:
        raise ValueError("credentials: use [[route.credentials]] or the route's username/password keys, not both")
    credentials_origin = _credentials_origin(
        model, upstreams, credentials or (accounts[0].credentials if accounts else None)
    )
    if model.auth == "passthrough":
        if credentials is not None or accounts:
            raise ValueError("auth: a passthrough route forwards its clients' logins and takes no credentials")
        return ClientTokens()
    return GatewayTokens(credentials, credentials_origin, accounts)


def _build_route(model: _RouteModel, environ: Mapping[str, str]) -> Route:
    name = model.name.lower()
    if not _REGISTRY_NAME_RE.match(name):
        raise ValueError(f"name: {model.name!r} is not a registry host name such as 'ghcr.io'")
    upstreams = _upstreams(model)
    mirrors = _mirrors(model, upstreams)
    if mirrors and model.auth == "passthrough":
        # A mirror is asked anonymously: it would hand out what the client's own login guards.
        raise ValueError("mirrors: a passthrough route takes no mirrors (its clients' logins are checked upstream)")
    auth = _upstream_auth(model, upstreams, environ)
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
        mirrors=mirrors,
        hosts=hosts,
        prefixes=tuple(prefixes),
        default=model.default,
        library=model.library,
        auth=auth,
        blob_redirect=model.blob_redirect,
        verify_blobs=model.verify_blobs,
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
