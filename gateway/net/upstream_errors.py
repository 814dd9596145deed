"""Upstream failures become registry errors here, and nowhere else.

Every exchange with an upstream (a registry request, a token request, reading a
manifest's body) runs inside ``upstream_errors``: httpx's exceptions, and the transports'
exceptions that httpx wraps, come out as one ``RegistryError`` with a status, a message
naming the upstream, ``retryable`` (failover and the circuit breaker count it) and a
``reason`` (the label of ``registry_gateway_upstream_errors_total``). This is httpx's
own ``map_httpcore_exceptions`` idea: one table from exception types to outcomes.

An address-policy refusal keeps its type the whole way: the transports raise
``netguard.AddressRefused`` and chain it (``raise httpx.ConnectError(...) from exc``), and
it is recognised here by ``isinstance`` on the chain, never by the wording of a message.
A realm or redirect target refused before anything is sent (``check_destination``) becomes
a RegistryError here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from gateway.http.errors import UNAVAILABLE, RegistryError
from gateway.net.netguard import AddressRefused
from gateway.observe import metrics
from gateway.routing.policy import TargetRefused
from gateway.routing.routes import Route

TIMEOUT = "timeout"
POLICY = "policy"
CONNECT = "connect"
PROTOCOL = "protocol"
INVALID_URL = "invalid_url"


@dataclass(frozen=True, slots=True)
class Wording:
    """How the messages of one kind of exchange read; {subject}, {detail}, {name} and {exc} are filled in."""

    timeout: str
    connect: str
    protocol: str
    invalid_url: str
    policy: str = "{subject}: {exc}"


# A request to an upstream registry (or a redirect target): "upstream ghcr.io is unreachable (ghcr.io)".
REQUEST = Wording(
    timeout="{subject} timed out{detail}",
    connect="{subject} is unreachable{detail}",
    protocol="{subject} broke the exchange{detail}: {name}",
    invalid_url="{subject} sent an invalid URL",
)
# A token endpoint, within one deadline for the whole answer.
TOKEN = Wording(
    timeout="{subject} did not answer within {detail} s",
    connect="{subject} is unreachable: {name}",
    protocol="{subject} is unreachable: {name}",
    invalid_url="the upstream named a token endpoint that is not a valid URL",
)
# Reading a body the gateway holds whole (a manifest).
BODY = Wording(
    timeout="{subject} was too slow sending {detail}",
    connect="{subject} broke while sending {detail}: {name}",
    protocol="{subject} broke while sending {detail}: {name}",
    invalid_url="{subject} sent an invalid URL",
)


def refused_by_policy(exc: BaseException) -> AddressRefused | None:
    """The address-policy refusal somewhere in ``exc``'s chain of causes, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AddressRefused):
            return seen
        seen = seen.__cause__
    return None


def classify(exc: BaseException) -> str | None:
    """The failure class of an exception raised by an upstream exchange; None: not an upstream failure."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return TIMEOUT
    if refused_by_policy(exc) is not None:
        return POLICY
    if isinstance(exc, httpx.ConnectError):
        return CONNECT
    if isinstance(exc, httpx.HTTPError):
        return PROTOCOL
    if isinstance(exc, httpx.InvalidURL | ValueError):
        # A host name httpx cannot encode (IDNA), from a Location or realm that passed the
        # policy's checks: the upstream's fault, never a 500.
        return INVALID_URL
    return None


def as_registry_error(exc: BaseException, wording: Wording, subject: str, detail: str = "") -> RegistryError | None:
    """The RegistryError for an upstream failure, or None when ``exc`` is not one."""
    reason = classify(exc)
    if reason is None:
        return None
    refused = refused_by_policy(exc)
    template = {
        TIMEOUT: wording.timeout,
        POLICY: wording.policy,
        CONNECT: wording.connect,
        PROTOCOL: wording.protocol,
        INVALID_URL: wording.invalid_url,
    }[reason]
    message = template.format(subject=subject, detail=detail, name=type(exc).__name__, exc=refused or exc)
    return RegistryError(
        504 if reason == TIMEOUT else 502,
        UNAVAILABLE,
        message,
        # Another upstream may do better when this one is silent, unreachable or broken; a
        # policy refusal or an invalid URL would be refused again.
        retryable=reason in (TIMEOUT, CONNECT, PROTOCOL),
        # An invalid URL is the upstream breaking the protocol: counted as one.
        reason=PROTOCOL if reason == INVALID_URL else reason,
    )


@contextlib.contextmanager
def upstream_errors(wording: Wording, subject: str, detail: str = "") -> Iterator[None]:
    """Run an upstream exchange; its failures leave as one RegistryError (``raise ... from`` the original)."""
    try:
        yield
    except (httpx.HTTPError, httpx.InvalidURL, TimeoutError, ValueError) as exc:
        mapped = as_registry_error(exc, wording, subject, detail)
        if mapped is None:  # pragma: no cover - classify() covers every type caught above
            raise
        raise mapped from exc


def check_destination(route: Route, url: str, what: str) -> None:
    """Refuse a token realm or redirect target outside the route's address policy (``policy.check_target``).

    ``what`` completes the message: "upstream ghcr.io <what> to a refused address: ...". The
    refusal is counted for the route (reason ``policy``) and is not retryable.
    """
    try:
        route.check_destination(url)
    except TargetRefused as exc:
        metrics.upstream_error(route.name, POLICY)
        message = f"upstream {route.name} {what} to a refused address: {exc}"
        raise RegistryError(502, UNAVAILABLE, message, reason=POLICY) from None
