"""Registry errors: the exception types of the package, the error codes, and the JSON body.

Every error a client sees is an OCI distribution error body
(distribution-spec, "Error Codes")::

    {"errors": [{"code": "NAME_UNKNOWN", "message": "...", "detail": ...}]}

The exception types of the package, and where each one ends::

    RegistryError                answered to the client as registry JSON (asgi.send_error)
      .status .code .headers     HTTP status, spec code, extra response headers
      .retryable                 an unreachable or silent upstream: fail over, count it
      .reason                    the failure class of an upstream problem (a metric label)
      LoginRequired              401 on a passthrough route; the relay adds the gateway's challenge
    ConfigError                  routes_file.py, access.py, app.check_settings: one line on
                                 stderr at start-up (__main__)
    policy.TargetRefused         a realm or redirect target outside the route's address policy;
                                 becomes a RegistryError where it is checked (authorizer.py,
                                 upstream.py, through upstream_errors.check_destination)
    netguard.AddressRefused      a name that resolves to a refused address, at connect time;
                                 chained under httpx.ConnectError by both transports
    transport._ProtocolError     the lean transport's parser; becomes httpx.RemoteProtocolError
    transport._StaleConnection   a kept-alive connection the server had closed; retried once
    httpx.HTTPError, TimeoutError  from the transports and deadlines: become a RegistryError in
                                 upstream_errors.upstream_errors, and nowhere else; once a body
                                 is streaming there is no answer left to give, and
                                 asgi.stream_body ends it as StreamEnd.UPSTREAM_BROKE instead

Caught at the top: ``proxy.Relay`` and ``passthrough.TokenRelay`` answer every
RegistryError; the relay answers any other exception as a 500 registry error (logged with
its traceback) or, mid-stream, by aborting the connection.
"""

from __future__ import annotations

import json
from typing import Any

# Spec codes (distribution-spec "Error Codes") plus distribution's UNKNOWN and
# UNAVAILABLE, which clients also understand.
NAME_INVALID = "NAME_INVALID"
NAME_UNKNOWN = "NAME_UNKNOWN"
MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
MANIFEST_INVALID = "MANIFEST_INVALID"
BLOB_UNKNOWN = "BLOB_UNKNOWN"
DIGEST_INVALID = "DIGEST_INVALID"
TAG_INVALID = "TAG_INVALID"
UNAUTHORIZED = "UNAUTHORIZED"
DENIED = "DENIED"
UNSUPPORTED = "UNSUPPORTED"
TOOMANYREQUESTS = "TOOMANYREQUESTS"
UNAVAILABLE = "UNAVAILABLE"
UNKNOWN = "UNKNOWN"
RANGE_INVALID = "RANGE_INVALID"  # distribution errcode: 416 for an unsatisfiable Range
PAGINATION_NUMBER_INVALID = "PAGINATION_NUMBER_INVALID"  # distribution errcode: a bad ``n`` on tags/list


class ConfigError(Exception):
    """A configuration problem, reported as one line: ``<file>: <where>: <reason>``."""


class RegistryError(Exception):
    """An error to be answered to the client as registry JSON."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        *,
        retryable: bool = False,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}
        # The upstream could not be reached or did not answer in time: another upstream
        # of the route may do better (failover), and the circuit breaker counts it.
        self.retryable = retryable
        # The failure class of an upstream problem (timeout, connect, policy, protocol, ...):
        # the ``reason`` label of registry_gateway_upstream_errors_total. Set where the
        # failure is mapped (upstream_errors.py), counted by whoever knows the route.
        self.reason = reason

    def __repr__(self) -> str:
        return f"RegistryError(status={self.status!r}, code={self.code!r}, message={self.message!r})"

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


class LoginRequired(RegistryError):
    """401: the client must log in to the gateway with its own upstream credentials (passthrough routes).

    The relay adds the gateway's challenge (``passthrough.challenge_header``): its realm is
    built from the request's own scheme and host, which only the relay knows.
    """

    def __init__(self, service: str, repository: str | None) -> None:
        super().__init__(
            401, UNAUTHORIZED, f"authentication required: log in to this gateway with your {service} credentials"
        )
        self.service = service
        self.repository = repository


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    return json.dumps(
        {"errors": [{"code": code, "message": message, "detail": detail}]},
        separators=(",", ":"),
    ).encode()


def code_for_status(status: int, kind: str = "") -> str:
    """The spec code that best describes an upstream status without a registry body.

    ``kind`` is the endpoint kind ("manifest", "blob", ...) so that a bare 404 from
    a CDN becomes BLOB_UNKNOWN rather than a generic code.
    """
    if status == 401:
        return UNAUTHORIZED
    if status == 403:
        return DENIED
    if status == 404:
        return {"manifest": MANIFEST_UNKNOWN, "blob": BLOB_UNKNOWN}.get(kind, NAME_UNKNOWN)
    if status == 405:
        return UNSUPPORTED
    if status == 416:
        return RANGE_INVALID
    if status == 429:
        return TOOMANYREQUESTS
    if status in (502, 503, 504):
        return UNAVAILABLE
    return UNKNOWN


def is_registry_error_body(body: bytes) -> bool:
    """True when ``body`` already is a registry error document worth passing through as is."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(doc, dict):
        return False
    errors = doc.get("errors")
    return (
        isinstance(errors, list)
        and len(errors) > 0
        and all(isinstance(e, dict) and isinstance(e.get("code"), str) for e in errors)
    )


def unsupported_method(method: str) -> RegistryError:
    return RegistryError(
        405,
        UNSUPPORTED,
        f"{method} is not supported: this gateway is a read-only pull mirror",
        headers={"Allow": "GET, HEAD"},
    )
