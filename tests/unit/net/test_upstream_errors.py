"""The one exception boundary: every upstream failure becomes one RegistryError, by type."""

from __future__ import annotations

import httpx
import pytest

from gateway.http.errors import RegistryError
from gateway.net.netguard import AddressRefused
from gateway.net.upstream_errors import BODY, REQUEST, TOKEN, classify, upstream_errors

REQUEST_URL = httpx.Request("GET", "https://registry.test/v2/")


def refused() -> httpx.ConnectError:
    try:
        try:
            raise AddressRefused("refused by the gateway's address policy: x resolves to a non-public address")
        except AddressRefused as exc:
            raise httpx.ConnectError("cannot connect", request=REQUEST_URL) from exc
    except httpx.ConnectError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "reason", "status", "retryable"),
    [
        (httpx.ConnectTimeout("slow", request=REQUEST_URL), "timeout", 504, True),
        (httpx.ReadTimeout("slow", request=REQUEST_URL), "timeout", 504, True),
        (TimeoutError(), "timeout", 504, True),
        (httpx.ConnectError("refused", request=REQUEST_URL), "connect", 502, True),
        (httpx.RemoteProtocolError("garbage", request=REQUEST_URL), "protocol", 502, True),
        (httpx.ReadError("reset", request=REQUEST_URL), "protocol", 502, True),
        (httpx.InvalidURL("bad idna"), "protocol", 502, False),
        # Matched by type on the chain, whatever the outer message says.
        (refused(), "policy", 502, False),
    ],
)
def test_each_failure_class(exc, reason, status, retryable):
    with pytest.raises(RegistryError) as info, upstream_errors(REQUEST, "upstream docker.io", " (registry.test)"):
        raise exc
    error = info.value
    assert (error.reason, error.status, error.code, error.retryable) == (reason, status, "UNAVAILABLE", retryable)
    assert error.__cause__ is exc


def test_a_policy_refusal_is_known_by_type_not_by_message():
    disguised = httpx.ConnectError("something else entirely", request=REQUEST_URL)
    disguised.__cause__ = AddressRefused("no magic words here")
    assert classify(disguised) == "policy"
    assert classify(httpx.ConnectError("refused by the gateway's address policy", request=REQUEST_URL)) == "connect"


@pytest.mark.parametrize(
    ("wording", "exc", "message"),
    [
        (REQUEST, httpx.ConnectError("x", request=REQUEST_URL), "upstream docker.io is unreachable (registry.test)"),
        (REQUEST, httpx.ReadTimeout("x", request=REQUEST_URL), "upstream docker.io timed out (registry.test)"),
        (TOKEN, TimeoutError(), "the upstream token endpoint https://auth.test did not answer within 30 s"),
        (
            TOKEN,
            httpx.ReadError("x", request=REQUEST_URL),
            "the upstream token endpoint https://auth.test is unreachable: ReadError",
        ),
        (
            BODY,
            httpx.ReadError("x", request=REQUEST_URL),
            "upstream docker.io broke while sending a manifest: ReadError",
        ),
    ],
)
def test_messages_name_the_upstream(wording, exc, message):
    subject, detail = {
        REQUEST: ("upstream docker.io", " (registry.test)"),
        TOKEN: ("the upstream token endpoint https://auth.test", "30"),
        BODY: ("upstream docker.io", "a manifest"),
    }[wording]
    with pytest.raises(RegistryError) as info, upstream_errors(wording, subject, detail):
        raise exc
    assert info.value.message == message


def test_other_exceptions_pass_untouched():
    with pytest.raises(KeyError), upstream_errors(REQUEST, "upstream docker.io"):
        raise KeyError("a bug, not an upstream failure")
