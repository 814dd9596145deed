"""``registry-gateway check IMAGE``: an image reference split as Docker splits it, and the router's decision
for a pull of it explained step by step.

The decision is the server's own (``RouteTable.resolve`` with ``RequestFacts``); this module only
says which step decided: the host pattern, the path prefix, the default route, ``library/``, the
policy. Everything here is pure (``tests/unit/test_check.py``); ``check.py`` prints it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gateway.http.errors import DENIED, NAME_UNKNOWN, RegistryError
from gateway.routing.reference import TAG_RE, is_digest
from gateway.routing.routes import RequestFacts, Route, RouteTable, Target


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image reference split as Docker splits it (distribution/reference ``splitDockerDomain``)."""

    text: str
    registry: str | None  # the first component when it is a registry host: for the gateway, its Host
    name: str  # the repository as the client sends it
    reference: str  # the tag, or the digest when there is one
    docker_library: bool = False  # Docker itself added "library/" (a bare official-image name)


def parse_image(text: str) -> ImageRef:
    """Split a reference; ValueError when it is not one.

    The first component is a registry host if it contains "." or ":" or is "localhost";
    otherwise the image is Docker Hub's and goes to the mirror (the default route) with
    Docker's own normalization: a name without "/" is an official image, ``library/<name>``.
    The repository grammar itself is the router's to judge (NAME_INVALID).
    """
    rest, at, digest = text.partition("@")
    if at and not is_digest(digest):
        raise ValueError(f"{text!r}: {digest!r} is not a valid digest")
    first, slash, after = rest.partition("/")
    registry: str | None = None
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first, after
    name, colon, tag = rest.partition(":")
    if colon and TAG_RE.match(tag) is None:
        raise ValueError(f"{text!r}: {tag!r} is not a valid tag")
    if not name:
        raise ValueError(f"{text!r} names no repository")
    docker_library = registry is None and "/" not in name
    if docker_library:
        name = "library/" + name
    return ImageRef(text, registry, name, digest if at else (tag if colon else "latest"), docker_library)


@dataclass(frozen=True, slots=True)
class Explanation:
    """The router's decision for one image, and the reasons, step by step."""

    image: ImageRef
    facts: RequestFacts
    target: Target | None
    error: RegistryError | None
    why: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"/v2/{self.image.name}/manifests/{self.image.reference}"


def _matching_host_pattern(route: Route, host: str) -> str | None:
    """Which of the route's host patterns matches ``host``, asked of the router one pattern at a time."""
    for pattern in route.hosts:
        alone = dataclasses.replace(route, hosts=(pattern,), prefixes=(), default=False)
        if RouteTable([alone]).route_for_host(host) is not None:
            return pattern
    return None


def _policy_text(route: Route, *, permitted: bool = True) -> str:
    if not route.policy.allow and not route.policy.deny:
        return "policy: no allow or deny lists on the route"
    lists = []
    if route.policy.allow:
        lists.append("allow " + ", ".join(route.policy.allow))
    if route.policy.deny:
        lists.append("deny " + ", ".join(route.policy.deny))
    verdict = "permitted" if permitted else f"refused by route {route.name}"
    return f"policy: {verdict} (" + "; ".join(lists) + ")"


_NS_NOTE = "ns: not applicable from the command line (containerd sends ?ns= with its requests)"


def _refusal_reasons(table: RouteTable, facts: RequestFacts, exc: RegistryError) -> list[str]:
    """The steps that led ``resolve`` to refuse (its message says why; these say where)."""
    why: list[str] = []
    if facts.host is not None and table.route_for_host(facts.host) is None:
        why.append(f"Host {facts.host} matches no host pattern")
    first, slash, _ = facts.name.partition("/")
    if exc.code == NAME_UNKNOWN and slash and table.by_name(first) is None:
        if "." in first or ":" in first or first == "localhost":
            why.append(f"path: {first!r} looks like a registry host but is no route's name or prefix")
        else:
            why.extend(["no path prefix matched", _NS_NOTE, "no route has default = true"])
    detail = exc.detail if isinstance(exc.detail, dict) else {}
    if exc.code == DENIED and isinstance(detail.get("route"), str):
        route = table.by_name(detail["route"])
        if route is not None:
            why.append(_policy_text(route, permitted=False))
    return why


def explain(table: RouteTable, image: ImageRef) -> Explanation:
    """What ``RouteTable.resolve`` decides for a pull of ``image`` through the gateway, and why."""
    facts = RequestFacts(host=image.registry, name=image.name)
    why: list[str] = []
    if image.docker_library:
        why.append("library/ added by Docker: a name without a registry or '/' is an official Docker Hub image")
    try:
        target = table.resolve(facts)
    except RegistryError as exc:
        why.extend(_refusal_reasons(table, facts, exc))
        return Explanation(image, facts, None, exc, tuple(why))
    route = target.route
    pattern = _matching_host_pattern(route, facts.host) if facts.host is not None else None
    if pattern is not None and table.route_for_host(facts.host) is route:
        why.append(f"host pattern: Host {facts.host} matches {pattern!r}; the whole path is the repository")
    else:
        if facts.host is None:
            why.append("no registry in the reference: Docker sends it to its registry-mirrors (Host: the mirror's)")
        else:
            why.append(f"Host {facts.host} matches no host pattern")
        if target.prefix:
            why.append(f"path prefix: {target.prefix!r} is the route's name or one of its prefixes; it is removed")
        else:
            why.append("no path prefix matched")
            why.append(_NS_NOTE)
            why.append(f"default route: {route.name} has default = true")
    if target.upstream_name != target.client_name:
        why.append(f"library/ added: route {route.name} has library = true")
    why.append(_policy_text(route))
    return Explanation(image, facts, target, None, tuple(why))


def explanation_rows(e: Explanation) -> list[tuple[str, str]]:
    rows = [("image", e.image.text), ("request", f"GET {e.path} (Host: {e.facts.host or 'the mirror'})")]
    if e.target is not None:
        route = e.target.route
        reference = e.image.reference
        rows.append(("route", route.name))
        rows.append(("repository", e.target.upstream_name))
        first, *others = route.upstreams
        upstream = f"{first.url}/v2/{e.target.upstream_name}/manifests/{reference}"
        if others:
            upstream += " (failover: " + ", ".join(u.url for u in others) + ")"
        rows.append(("upstream", upstream))
    elif e.error is not None and isinstance(e.error.detail, dict) and "route" in e.error.detail:
        rows.append(("route", str(e.error.detail["route"])))  # DENIED: the route, its policy refuses the name
        rows.append(("repository", str(e.error.detail.get("repository", ""))))
    rows.extend(("why" if i == 0 else "", reason) for i, reason in enumerate(e.why))
    rows.append(("result", "ok" if e.error is None else f"refused ({e.error.code})"))
    return rows


def explanation_text(e: Explanation) -> str:
    rows = explanation_rows(e)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def explanation_json(e: Explanation) -> dict[str, Any]:
    target = e.target
    return {
        "ok": e.error is None,
        "image": e.image.text,
        "request": {"host": e.facts.host, "path": e.path},
        "route": target.route.name if target else None,
        "repository": target.upstream_name if target else None,
        "upstreams": [u.url for u in target.route.upstreams] if target else [],
        "why": list(e.why),
        "error": {"code": e.error.code, "message": e.error.message} if e.error else None,
    }
