"""Tag lists and referrers: streamed under the whole-answer deadline, a tag list's ``name`` and its
``Link`` pages put back into the client's namespace when the route renames the repository."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.http.asgi import Headers
from gateway.http.errors import RegistryError
from gateway.http.util import Chunk, response_headers
from gateway.net.upstream_errors import BODY, upstream_errors
from gateway.observe import metrics
from gateway.relay import answers
from gateway.relay.exchange import Exchange
from gateway.relay.opening import Opener, owned
from gateway.relay.streaming import send_stream
from gateway.routing.reference import Kind
from gateway.routing.request_rules import renamed_tag_list_start


class ListRelay:
    """Serves ``/tags/list`` and ``/referrers/``: nothing kept, nothing shared."""

    def __init__(self, opener: Opener) -> None:
        self._opener = opener

    async def serve(self, ex: Exchange, query: str) -> None:
        opened = await self._opener.open(ex, query)
        async with owned(ex, opened):
            if await answers.login_refused(ex, opened) or await answers.passed_on(ex, opened):
                return
            resp = opened.response
            headers = response_headers(resp.headers)
            body: AsyncIterator[Chunk] = resp.aiter_raw()
            if ex.api.kind is Kind.TAGS:
                headers.extend(answers.links(resp, ex.target))
                if resp.status_code == 200 and not ex.head and "content-encoding" not in resp.headers:
                    body = await _renamed_tag_list(ex, headers, body)
            await send_stream(ex, resp.status_code, headers, body)


async def _renamed_tag_list(ex: Exchange, headers: Headers, body: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """The tag list's body with ``name`` as the client asked for it; ``headers``' Content-Length follows."""
    upstream_name, client_name = ex.target.upstream_name, ex.target.client_path_name
    if upstream_name == client_name:
        return body
    start = b""
    renamed: bytes | None = None
    try:
        with upstream_errors(BODY, f"upstream {ex.route_name}", "a tag list"):
            async with asyncio.timeout_at(ex.deadline):
                async for chunk in body:
                    start += chunk
                    renamed = renamed_tag_list_start(start, upstream_name, client_name, complete=False)
                    if renamed is not None:
                        break
    except RegistryError as exc:
        if exc.reason == "timeout":
            metrics.upstream_error(ex.route_name, "timeout")
        raise
    if renamed is None:
        renamed = renamed_tag_list_start(start, upstream_name, client_name, complete=True)
        assert renamed is not None
    for index, (name, value) in enumerate(headers):
        if name == b"content-length" and value.isdigit():
            headers[index] = (name, str(int(value) + len(renamed) - len(start)).encode())

    async def joined() -> AsyncIterator[Chunk]:
        yield renamed
        async for chunk in body:
            yield chunk

    return joined()
