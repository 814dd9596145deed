"""Sending one answer's body as it arrives: headers now, then the bytes, bounded by the right
deadline, counted, and ended the way the record and the metrics say (complete, client gone,
upstream broke)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx

from gateway.blobs import herd
from gateway.blobs.digest import DigestMismatch, Verdict
from gateway.http.asgi import API_VERSION_HEADER, Headers, StreamEnd, stream_body
from gateway.http.util import Chunk
from gateway.observe import metrics, tracing
from gateway.relay import integrity
from gateway.relay.exchange import Exchange
from gateway.routing.reference import Kind
from gateway.upstream.client import UpstreamClient

logger = logging.getLogger("gateway.proxy")

# What ends a body mid-stream as a broken upstream (the client's connection is aborted).
_STREAM_ERRORS = (httpx.HTTPError, DigestMismatch, herd.FetchBroken)


async def send_stream(
    ex: Exchange,
    status: int,
    headers: Headers,
    body: AsyncIterator[Chunk],
    *,
    verdict: Verdict | None = None,
    client: UpstreamClient | None = None,
) -> None:
    """The answer with ``body`` streamed; ``verdict`` (with the ``client`` whose upstream a
    mismatch avoids) is judged once the body ended, before the end is recorded."""
    headers.append(API_VERSION_HEADER)
    await ex.send({"type": "http.response.start", "status": status, "headers": headers})
    if ex.head or status in (204, 304):
        await ex.send({"type": "http.response.body", "body": b""})
        return
    in_flight = metrics.STREAMS_IN_FLIGHT.labels(ex.route_name)
    in_flight.inc()
    # Blobs may take as long as they keep flowing; tag lists and referrers are
    # answers like manifests, held to the deadline as a whole.
    limit = None if ex.api.kind is Kind.BLOB else ex.deadline
    with tracing.span("body", client=False) as current:
        try:
            async with asyncio.timeout_at(limit):
                end, sent = await stream_body(ex.send, ex.receive, body, upstream_errors=_STREAM_ERRORS)
        except TimeoutError:
            end, sent = StreamEnd.UPSTREAM_BROKE, 0
            metrics.upstream_error(ex.route_name, "timeout")
        finally:
            in_flight.dec()
        tracing.set_attributes(
            current,
            {
                "registry.body.bytes": sent,
                "registry.body.end": end.value,
                "registry.body.resumes": ex.record.resumes,
            },
        )
    ex.record.bytes = sent
    if ex.api.kind is Kind.BLOB:
        metrics.blob_bytes(ex.route_name, "client", sent)
        if ex.record.share is None or ex.record.share == "bypassed":
            metrics.blob_bytes(ex.route_name, "upstream", sent)
    if verdict is not None:
        assert client is not None
        integrity.judge(ex, client, verdict)
    if end is not StreamEnd.COMPLETE and ex.record.verified != "mismatch":
        ex.record.error = end.value
        if end is StreamEnd.UPSTREAM_BROKE:
            metrics.upstream_error(ex.route_name, "broken_stream")
            fields = {"event": "upstream_broke", "request_id": ex.record.request_id, "route": ex.route_name}
            logger.warning("upstream broke mid-body; aborting the client connection", extra={"fields": fields})
