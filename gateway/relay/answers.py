"""How the relay answers when the answer is not the content: upstream errors, redirects passed on,
Link headers rewritten, and the registry-JSON error answer to a refused or failed request.

Every function here answers (or builds part of an answer) and returns; none calls back into
the job that asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urljoin

import httpx

from gateway.http.asgi import API_VERSION_HEADER, JSON_CONTENT_TYPE, Headers, Scope, Send, send_body, send_error
from gateway.http.errors import (
    UNAVAILABLE,
    UNKNOWN,
    LoginRequired,
    RegistryError,
    code_for_status,
    error_body,
    is_registry_error_body,
)
from gateway.http.util import (
    ERROR_RESPONSE_HEADERS,
    REDIRECT_STATUSES,
    read_capped,
    response_headers,
    rewrite_next_link,
    split_links,
)
from gateway.net.upstream_errors import BODY, upstream_errors
from gateway.observe import metrics
from gateway.observe.log import RequestRecord
from gateway.relay.exchange import Exchange
from gateway.routing.routes import Target
from gateway.upstream import passthrough
from gateway.upstream.client import Opened

# Error bodies are a few hundred bytes; anything past this is replaced by our own message.
MAX_ERROR_BODY = 64 << 10


async def send_refusal(scope: Scope, send: Send, record: RequestRecord, exc: RegistryError) -> None:
    """A request the gateway refuses (or an upstream failure raised as one): registry JSON, with
    the gateway's own challenge when the client must log in."""
    record.error = exc.code
    if isinstance(exc, LoginRequired):
        name, value = passthrough.challenge_header(scope, exc.service, exc.repository)
        exc.headers[name.decode()] = value.decode()
    await send_error(send, exc, head=scope["method"] == "HEAD")


async def send_internal_error(scope: Scope, send: Send, record: RequestRecord) -> None:
    """A bug, not bad input, before the answer started: registry JSON instead of uvicorn's text/plain 500."""
    record.error = UNKNOWN
    internal = RegistryError(500, UNKNOWN, "internal error in the gateway", {"request_id": record.request_id})
    await send_error(send, internal, head=scope["method"] == "HEAD")


async def login_refused(ex: Exchange, opened: Opened) -> bool:
    """The upstream refused the client's own token (a 401 on a passthrough login): answered with
    the upstream's error and the gateway's challenge, so that it logs in again, at our realm."""
    if not (ex.login.from_client and opened.response.status_code == 401):
        return False
    challenge = passthrough.challenge_header(ex.scope, ex.route_name, ex.target.client_path_name)
    await relay_error(ex, opened.response, extra=[challenge])
    return True


async def passed_on(ex: Exchange, opened: Opened) -> bool:
    """A redirect (``blob_redirect = "pass"``) or an error from the upstream: answered here; True when it was."""
    status = opened.response.status_code
    if status in REDIRECT_STATUSES:
        await pass_redirect(ex, opened)
        return True
    if status >= 400:
        await relay_error(ex, opened.response)
        return True
    return False


def links(resp: httpx.Response, target: Target) -> Headers:
    """The upstream's ``Link: <...>; rel="next"`` headers, pointing into the client's namespace."""
    out: Headers = []
    for link in split_links(resp.headers.get_list("link")):
        rewritten = rewrite_next_link(link, target.client_path_name)
        if rewritten is not None:
            out.append((b"link", rewritten.encode()))
    return out


async def pass_redirect(ex: Exchange, opened: Opened) -> None:
    """blob_redirect = "pass": the client fetches the blob from where the upstream points."""
    location = opened.response.headers.get("location")
    if not location:
        raise RegistryError(
            502, UNAVAILABLE, f"upstream {ex.route_name} answered {opened.response.status_code} without Location"
        )
    ex.record.redirect = "passed"
    try:
        # Made absolute: a relative Location is relative to the upstream, not to us.
        absolute = urljoin(opened.url, location)
        # A host name a client could not even decode (bad IDNA) is refused here.
        _ = httpx.URL(absolute).host
    except (ValueError, httpx.InvalidURL):
        absolute = ""
    if not absolute.startswith(("https://", "http://")) or not absolute.isascii():
        raise RegistryError(502, UNAVAILABLE, f"upstream {ex.route_name} redirected to an invalid URL")
    headers: Headers = [(b"location", absolute.encode()), API_VERSION_HEADER]
    await send_body(ex.send, opened.response.status_code, headers, b"")


async def relay_error(ex: Exchange, resp: httpx.Response, *, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Upstream errors keep their status; a registry JSON body passes as is, anything else is wrapped."""
    status = resp.status_code
    if status >= 500:
        metrics.upstream_error(ex.route_name, "status_5xx")
    body: bytes | None = None
    if not ex.head:
        try:
            with upstream_errors(BODY, f"upstream {ex.route_name}", "an error"):
                async with asyncio.timeout_at(ex.deadline):
                    body = await read_capped(resp, MAX_ERROR_BODY)
        except RegistryError:
            body = None  # replaced by the gateway's own message below
    headers = response_headers(resp.headers, ERROR_RESPONSE_HEADERS)
    if status == 416 and "content-range" in resp.headers:
        headers.append((b"content-range", resp.headers["content-range"].encode()))
    headers.extend([API_VERSION_HEADER, JSON_CONTENT_TYPE, *extra])
    if body is None or not is_registry_error_body(body):
        code = code_for_status(status, ex.api.kind.value)
        body = error_body(code, f"upstream {ex.route_name} answered {status} {resp.reason_phrase}".strip())
        ex.record.error = code
    else:
        ex.record.error = "upstream"
    await send_body(ex.send, status, headers, body, head=ex.head)
