"""``registry-gateway check``: a configuration tried against its upstreams, and an image reference explained.

This module owns the diagnostic command and nothing the server runs. Its point is to
answer "will this configuration work?" with the code that ships, so it re-implements
nothing it reports on:

- settings and routes come from ``Settings()``, ``load_routes`` and ``app.check_settings``,
  the server's own start-up path, so a broken file is the same one-line ``ConfigError``;
- the upstream clients come from ``app.build_clients``: the same transports, address guard
  (``netguard.py``) and authorizers as the server's. Each upstream of each route is asked
  what a pull asks first (``GET /v2/`` through ``egress.send``, failures mapped by
  ``upstream_errors``), its challenge is read with ``challenge.pick_challenge``, the realm is
  judged by ``Route.check_destination``, and a token is fetched with ``tokens.fetch_token``
  (the route's credentials, or anonymously). Checks of different upstreams run concurrently;
  each is bounded by the Settings timeouts of its steps;
- ``check IMAGE`` asks the router (``RouteTable.resolve`` with ``RequestFacts``) where a
  reference goes, so the answer is the server's decision, and explains which step decided
  (``check_image.py``).

The judging and formatting functions are pure (``tests/unit/test_check.py``); the probes
(``probe_upstream``, ``check_routes``) are the thin I/O on top.

Output: the table (or ``--json``) on stdout; one line per failure on stderr, worded like a
configuration error (``registry-gateway: error: ...``). Exit status: 0 all good, 1 a check
failed or the image is refused, 2 the command line, the settings or the routes are wrong.
Secrets are never printed: credentials appear as their identity (``user:<name>``), tokens
not at all.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from gateway.app import build_clients, check_settings
from gateway.auth.authorizer import GatewayTokenAuthorizer
from gateway.auth.challenge import Challenge, parse_challenges, pick_challenge
from gateway.auth.tokens import TokenKey, basic_authorization, fetch_token
from gateway.check_image import ImageRef, explain, explanation_json, explanation_text, parse_image
from gateway.http.errors import UNAUTHORIZED, ConfigError, RegistryError
from gateway.net.egress import send
from gateway.net.upstream_errors import REQUEST, upstream_errors
from gateway.routing.policy import TargetRefused
from gateway.routing.routes import ClientTokens, Credentials, Route, RouteTable, Upstream
from gateway.routing.routes_file import load_routes
from gateway.settings import Settings
from gateway.upstream.client import UpstreamClient

PROG = "registry-gateway"
OK, FAILED, USAGE = 0, 1, 2

# ---------------------------------------------------------------------------------------------
# Pure: what one upstream answered, and what it means.


@dataclass(slots=True)
class Probe:
    """One upstream of one route: each step's outcome and latency, and the failures found."""

    route: str
    upstream: str
    auth: Literal["gateway", "passthrough"]
    ping: str = "-"  # "200", "401", or the failure class: "connect", "timeout", "policy", ...
    ping_ms: float | None = None
    scheme: str | None = None  # the challenge: "bearer", "basic", or None (none sent)
    realm: str | None = None
    service: str | None = None
    realm_policy: str = "-"  # "allowed", "refused", or "-" (no realm to judge)
    token: str = "-"  # "anonymous: ok", "user:<name>: refused", "from clients", "not needed", ...
    token_ms: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do after ``GET /v2/``: which authorization to try, as whom, or why the route cannot work."""

    action: Literal["none", "bearer", "basic", "clients"]
    identity: str | None = None  # Credentials.identity; None: anonymous
    failure: str | None = None


_PING_FAILURES = {"connect": "unreachable", "timeout": "timeout", "policy": "refused", "protocol": "broken"}


def ping_failure_label(reason: str | None) -> str:
    """The GET /v2/ column for an exchange that failed (``RegistryError.reason``)."""
    return _PING_FAILURES.get(reason or "", "error")


def judge_ping(status: int) -> str | None:
    """The failure of a ``GET /v2/`` answer; None for the answers a registry gives (200, 401)."""
    if status in (200, 401):
        return None
    return f"GET /v2/ answered {status}: not a registry's API root (200 or 401 expected)"


def plan_auth(
    route_name: str, passthrough: bool, credentials: Credentials | None, status: int, challenge: Challenge | None
) -> Plan:
    """How a pull on this route would authorize, given the ``GET /v2/`` answer (``status``, its picked challenge)."""
    not_token_auth = f"upstream {route_name} does not use token auth, so logins cannot be passed through"
    identity = credentials.identity if credentials else None
    if status != 401:
        return Plan("none", failure=not_token_auth if passthrough else None)
    if challenge is None:
        return Plan("none", failure="GET /v2/ answered 401 without a Bearer (with a realm) or Basic challenge")
    if challenge.scheme == "bearer":
        return Plan("clients") if passthrough else Plan("bearer", identity)
    if passthrough:
        return Plan("none", failure=not_token_auth)
    if credentials is None:
        return Plan("none", failure="the upstream asks for Basic credentials and the route has none")
    return Plan("basic", identity)


def realm_verdict(route: Route, realm: str) -> str | None:
    """Why the route's address policy refuses the token realm (``Route.check_destination``); None: allowed."""
    try:
        route.check_destination(realm)
    except TargetRefused as exc:
        reason = f"the token realm {realm} is refused by the route's address policy: {exc}"
        if not route.allow_private_addresses:
            try:
                dataclasses.replace(route, allow_private_addresses=True).check_destination(realm)
            except TargetRefused:
                pass
            else:
                reason += " (allow_private_addresses = true allows it)"
        return reason
    return None


def format_ms(ms: float | None) -> str:
    if ms is None:
        return ""
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def _with_ms(text: str, ms: float | None) -> str:
    return f"{text} ({format_ms(ms)})" if ms is not None else text


def challenge_text(probe: Probe) -> str:
    if probe.scheme is None:
        return "none" if probe.ping in ("200", "401") else "-"
    parts = [probe.scheme.capitalize()]
    if probe.realm is not None:
        parts.append(f"realm={probe.realm}")
    if probe.service is not None:
        parts.append(f"service={probe.service}")
    return " ".join(parts)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


CHECK_HEADER = ("ROUTE", "AUTH", "UPSTREAM", "GET /v2/", "CHALLENGE", "REALM", "TOKEN", "RESULT")


def routes_table(probes: Sequence[Probe]) -> str:
    rows = [
        (
            p.route,
            p.auth,
            p.upstream,
            _with_ms(p.ping, p.ping_ms),
            challenge_text(p),
            p.realm_policy,
            _with_ms(p.token, p.token_ms),
            "ok" if p.ok else "FAIL",
        )
        for p in probes
    ]
    return render_table(CHECK_HEADER, rows)


def summary(probes: Sequence[Probe]) -> str:
    routes = len(dict.fromkeys(p.route for p in probes))
    failures = sum(len(p.failures) for p in probes)
    where = f"{routes} route{'s' * (routes != 1)}, {len(probes)} upstream{'s' * (len(probes) != 1)}"
    return f"{where}: all good" if not failures else f"{where}: {failures} problem{'s' * (failures != 1)}"


def failure_lines(probes: Sequence[Probe]) -> list[str]:
    """One line per failure, for stderr."""
    return [f"{PROG}: error: route {p.route} ({p.upstream}): {failure}" for p in probes for failure in p.failures]


def probes_json(probes: Sequence[Probe]) -> dict[str, Any]:
    checks = []
    for p in probes:
        check = {**dataclasses.asdict(p), "ok": p.ok}
        for key in ("ping_ms", "token_ms"):
            check[key] = None if check[key] is None else round(check[key], 1)
        checks.append(check)
    return {"ok": all(p.ok for p in probes), "checks": checks}


# ---------------------------------------------------------------------------------------------
# I/O: the probes, through the clients the server would build.


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


async def _get_root(client: UpstreamClient, upstream: Upstream, authorization: str | None) -> tuple[int, list[str]]:
    """``GET /v2/`` on one upstream, as the upstream client sends it; (status, WWW-Authenticate values)."""
    fields = {"accept": "application/json"}
    if authorization is not None:
        fields["authorization"] = authorization
    # upstream_errors outside the deadline: asyncio.timeout raises TimeoutError as it exits.
    with upstream_errors(REQUEST, f"upstream {client.route.name}", f" ({upstream.host})"):
        async with asyncio.timeout(client.timeouts.manifest):
            resp = await send(client.transport, "GET", upstream.url + "/v2/", fields, client.timeouts)
            await resp.aclose()
    return resp.status_code, resp.headers.get_list("www-authenticate")


def probe_budget(client: UpstreamClient) -> float:
    """The longest one upstream's check may take: its steps' own deadlines, end to end."""
    return 2 * client.timeouts.manifest + client.timeouts.token


async def probe_upstream(client: UpstreamClient, upstream: Upstream) -> Probe:
    """Check one upstream of the client's route: ``GET /v2/``, the challenge, the realm, a token."""
    passthrough = isinstance(client.route.auth, ClientTokens)
    probe = Probe(client.route.name, upstream.url, "passthrough" if passthrough else "gateway")
    budget = probe_budget(client)
    try:
        async with asyncio.timeout(budget):
            await _probe_steps(client, upstream, probe, passthrough)
    except TimeoutError:
        probe.failures.append(f"the check did not finish within {budget:g} s")
    return probe


async def _probe_steps(client: UpstreamClient, upstream: Upstream, probe: Probe, passthrough: bool) -> None:
    start = time.perf_counter()
    try:
        status, challenges = await _get_root(client, upstream, None)
    except RegistryError as exc:
        probe.ping, probe.ping_ms = ping_failure_label(exc.reason), _elapsed_ms(start)
        probe.failures.append(f"GET /v2/: {exc.message}")
        return
    probe.ping, probe.ping_ms = str(status), _elapsed_ms(start)
    failure = judge_ping(status)
    if failure is not None:
        probe.failures.append(failure)
        return
    challenge = pick_challenge(parse_challenges(challenges)) if status == 401 else None
    if challenge is not None:
        probe.scheme, probe.realm, probe.service = challenge.scheme, challenge.realm, challenge.service
    authorizer = client.authorizer
    credentials = (
        authorizer.credentials_for(upstream.origin) if isinstance(authorizer, GatewayTokenAuthorizer) else None
    )
    plan = plan_auth(client.route.name, passthrough, credentials, status, challenge)
    if plan.failure is not None:
        probe.failures.append(plan.failure)
        return
    if plan.action == "none":
        probe.token = "not needed"
        return
    if challenge is not None and challenge.realm is not None and challenge.scheme == "bearer":
        refused = realm_verdict(client.route, challenge.realm)
        probe.realm_policy = "allowed" if refused is None else "refused"
        if refused is not None:
            probe.failures.append(refused)
            return
    if plan.action == "clients":
        probe.token = "from clients"
        return
    who = plan.identity or "anonymous"
    start = time.perf_counter()
    try:
        if credentials is not None and isinstance(authorizer, GatewayTokenAuthorizer):
            # An account whose secret comes from a credential helper: asked here as a pull would ask it.
            credentials = await authorizer.helpers.resolve(credentials, upstream.origin)
        if plan.action == "basic":
            assert credentials is not None
            status, _ = await _get_root(client, upstream, basic_authorization(credentials))
            if status != 200:
                raise RegistryError(status, UNAUTHORIZED, f"GET /v2/ with the route's credentials answered {status}")
        else:
            assert challenge is not None
            assert challenge.realm is not None
            key = TokenKey(realm=challenge.realm, service=challenge.service, scopes=(), identity=plan.identity)
            await fetch_token(client.transport, key, credentials, timeouts=client.timeouts)  # the token is dropped
    except RegistryError as exc:
        probe.token, probe.token_ms = f"{who}: refused", _elapsed_ms(start)
        message = exc.message
        if credentials is None and exc.status == 401:
            message = f"the upstream token endpoint {challenge.realm if challenge else ''} refuses anonymous tokens"
        probe.failures.append(f"token ({who}): {message}")
        return
    probe.token, probe.token_ms = f"{who}: ok", _elapsed_ms(start)


async def check_routes(
    table: RouteTable, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> list[Probe]:
    """Every upstream of every route, checked concurrently through the clients the server builds.

    ``transport`` replaces every route's own, as in ``build_clients`` (the in-process tests).
    """
    clients = build_clients(table, settings, transport)
    try:
        return list(
            await asyncio.gather(
                *(
                    probe_upstream(clients[route.name], upstream)
                    for route in table.routes
                    for upstream in route.upstreams
                )
            )
        )
    finally:
        for client in clients.values():
            await client.aclose()


# ---------------------------------------------------------------------------------------------
# The command line.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} check",
        description="Check the configuration against its upstreams (GET /v2/, challenge, realm policy, token), "
        "or, given IMAGE, say which route and upstream repository a pull of it reaches, and why. "
        "Exit status: 0 all good, 1 a check failed or IMAGE is refused, 2 a configuration error.",
    )
    parser.add_argument("image", nargs="?", help="an image reference: ghcr.example.com/org/app:v1, nginx, ...")
    parser.add_argument("--routes", type=Path, help="the routing table (default: GATEWAY_ROUTES or ./routes.toml)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def load(routes: Path | None) -> tuple[Settings, RouteTable]:
    """Settings and routes as the server loads them; ConfigError for anything it would refuse."""
    try:
        settings = Settings() if routes is None else Settings(routes=routes)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = "GATEWAY_" + "_".join(str(p) for p in first["loc"]).upper()
        raise ConfigError(f"{key}: {first['msg']}") from None
    table = load_routes(settings.routes)
    check_settings(settings, table)
    return settings, table


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    image: ImageRef | None = None
    if args.image is not None:
        try:
            image = parse_image(args.image)
        except ValueError as exc:
            _error(f"not an image reference: {exc}")
            return USAGE
    try:
        settings, table = load(args.routes)
    except ConfigError as exc:
        _error(str(exc))
        return USAGE
    if image is not None:
        explanation = explain(table, image)
        print(json.dumps(explanation_json(explanation), indent=2) if args.json else explanation_text(explanation))
        if explanation.error is not None:
            _error(f"{explanation.error.code}: {explanation.error.message}")
            return FAILED
        return OK
    probes = asyncio.run(check_routes(table, settings))
    if args.json:
        print(json.dumps(probes_json(probes), indent=2))
    else:
        print(routes_table(probes))
        print(summary(probes))
    sys.stdout.flush()
    for line in failure_lines(probes):
        print(line, file=sys.stderr)
    return OK if all(p.ok for p in probes) else FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
