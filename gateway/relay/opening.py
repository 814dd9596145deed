"""Sending one exchange upstream: the allow-listed headers, the whole-answer deadline, the time to
the headers, the upstream that answered, and the budget its answer reports (``budget_watch.py``).

The upstream client does auth, redirects and failover; what the answer means is the caller's
job (manifests, blobs, listings), which gets the open answer back and owns closing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping

from gateway.http.errors import UNAVAILABLE, RegistryError
from gateway.observe import metrics
from gateway.relay.budget_watch import BudgetWatch
from gateway.relay.exchange import Exchange
from gateway.routing.reference import Kind
from gateway.routing.request_rules import upstream_headers
from gateway.upstream.client import Opened, UpstreamClient


class Opener:
    """Opens an exchange's upstream request; a timeout is a 504 like any other failure to answer."""

    def __init__(self, clients: Mapping[str, UpstreamClient], budget: BudgetWatch) -> None:
        self._clients = clients
        self._budget = budget

    async def open(self, ex: Exchange, query: str) -> Opened:
        """The upstream's answer to ``ex`` (headers read, body not), or a ``RegistryError``."""
        route = ex.target.route
        client = self._clients[route.name]
        started = time.perf_counter()
        # One deadline for the whole answer of manifests, tags, referrers and errors; for
        # blobs it bounds the time to the headers (tokens, redirects and failover included).
        ex.deadline = asyncio.get_running_loop().time() + client.timeouts.manifest
        try:
            async with asyncio.timeout_at(ex.deadline):
                opened = await client.open(
                    ex.scope["method"],
                    ex.upstream_path,
                    query=query,
                    headers=upstream_headers(ex.scope),
                    repository=ex.target.upstream_name,
                    follow_redirects=not (ex.api.kind is Kind.BLOB and route.blob_redirect == "pass"),
                    login=ex.login,
                    avoid=ex.api.reference if ex.content_addressed else None,
                    content_addressed=ex.content_addressed,
                )
        except TimeoutError:
            metrics.upstream_error(route.name, "timeout")
            raise RegistryError(
                504, UNAVAILABLE, f"upstream {route.name} did not answer within {client.timeouts.manifest:g} s"
            ) from None
        ex.upstream = opened.upstream
        ex.record.upstream = opened.upstream.url
        ex.record.upstream_seconds = round(time.perf_counter() - started, 6)
        if opened.redirects:
            ex.record.redirect = "followed"
        try:
            self._budget.see(ex, opened)
        except BaseException:
            await opened.response.aclose()
            raise
        return opened


@contextlib.asynccontextmanager
async def owned(ex: Exchange, opened: Opened) -> AsyncIterator[Opened]:
    """``opened`` while it is answered; closed after, unless a shared fetch took it over (``ex.handed_over``)."""
    try:
        yield opened
    finally:
        if not ex.handed_over:
            await opened.response.aclose()
