"""Blob GETs and HEADs: streamed as they arrive, resumed where they break, checked against their
digest; concurrent GETs of one blob led and joined as one shared fetch (``gateway.blobs.herd``),
a client's range served from its window when it holds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections.abc import AsyncIterator, Mapping

import httpx

from gateway.blobs import herd
from gateway.blobs.digest import DigestMismatch, Verdict, verified
from gateway.blobs.resume import Segment, single_range
from gateway.http.asgi import Headers
from gateway.http.util import Chunk, response_headers
from gateway.observe import metrics
from gateway.relay import answers, integrity
from gateway.relay.exchange import Exchange
from gateway.relay.join_permits import JoinPermits
from gateway.relay.opening import Opener, owned
from gateway.relay.streaming import send_stream
from gateway.routing.reference import Kind, is_digest
from gateway.upstream.client import UpstreamClient

logger = logging.getLogger("gateway.proxy")

# Conditions that make a blob answer the client's own: never served from a shared fetch.
_OWN_CONDITIONS = (b"if-none-match", b"if-match", b"if-modified-since", b"if-unmodified-since", b"if-range")


class BlobRelay:
    """Serves blob requests, alone or as the leader or a reader of a shared fetch."""

    def __init__(
        self,
        clients: Mapping[str, UpstreamClient],
        opener: Opener,
        *,
        blob_resumes: int,
        resume_same_upstream: int = 1,
        board: herd.Board | None,
        permits: JoinPermits,
    ) -> None:
        self._clients = clients
        self._opener = opener
        # How many times one blob body that breaks is asked for again from where it broke.
        self._resumes = blob_resumes
        # How many times more the source whose body broke is asked, before the next (``resume.Breaks``).
        self._same = resume_same_upstream
        # Shared blob fetches (``herd.py``); None or disabled: every GET relayed alone.
        self._board = board if board is not None and board.enabled else None
        self._permits = permits
        # Each shared fetch's own exchange (the leader's request, with a record of its own).
        self._producers: weakref.WeakKeyDictionary[herd.SharedFetch, Exchange] = weakref.WeakKeyDictionary()

    async def serve(self, ex: Exchange, query: str) -> None:
        if self._board is not None and _shareable(ex):
            await self._shared(ex, self._board, query)
        else:
            await self._from_upstream(ex, query)

    async def _from_upstream(self, ex: Exchange, query: str) -> None:
        """The blob's own upstream answer; a whole one handed to ``ex.lead`` when it leads a shared fetch."""
        opened = await self._opener.open(ex, query)
        async with owned(ex, opened):
            if await answers.login_refused(ex, opened) or await answers.passed_on(ex, opened):
                return
            resp = opened.response
            headers = response_headers(resp.headers)
            if ex.lead is not None:
                reader = self._lead(ex, ex.lead, resp, headers)
                if reader is not None:
                    await self._send_shared(ex, ex.lead, reader, headers, 200)
                    return
                ex.lead.abandon()
            body: AsyncIterator[Chunk] = resp.aiter_raw()
            verdict: Verdict | None = None
            client = self._clients[ex.route_name]
            if not ex.head:
                body = integrity.resumable_body(ex, client, resp, body, self._resumes, self._same)
                if resp.status_code == 200:
                    body, verdict = integrity.checked_or_asked_again(ex, client, resp, body, self._resumes, self._same)
            await send_stream(ex, resp.status_code, headers, body, verdict=verdict, client=client)

    async def _shared_range(self, ex: Exchange, board: herd.Board, query: str, value: str) -> None:
        """A client's range inside a shared fetch's window is served from it; anything else goes upstream."""
        fetch = board.current((ex.route_name, ex.target.upstream_name, ex.api.reference))
        wanted = single_range(value, fetch.total) if fetch is not None and fetch.ready.is_set() else None
        # Asked twice: the passthrough check may wait, and the window move on meanwhile.
        if (
            fetch is None
            or wanted is None
            or not fetch.holds(wanted[0])
            or not await self._permits.may_join(ex)
            or not fetch.holds(wanted[0])
        ):
            await self._from_upstream(ex, query)
            return
        first, last = wanted
        reader = fetch.join(first, last + 1)
        ex.record.share = "joined"
        headers = [(k, v) for k, v in fetch.headers if k != b"content-length"]
        headers.append((b"content-range", f"bytes {first}-{last}/{fetch.total}".encode()))
        headers.append((b"content-length", str(last - first + 1).encode()))
        await self._send_shared(ex, fetch, reader, headers, 206)

    async def _shared(self, ex: Exchange, board: herd.Board, query: str) -> None:
        """Join the blob's shared fetch when it still holds the first byte, else open one for others."""
        ranges = [v for k, v in ex.scope["headers"] if k == b"range"]
        if ranges:
            await self._shared_range(ex, board, query, ranges[0].decode("latin-1") if len(ranges) == 1 else "")
            return
        key: herd.Key = (ex.route_name, ex.target.upstream_name, ex.api.reference)
        client = self._clients[ex.route_name]
        fetch = board.current(key)
        if fetch is not None and not fetch.ready.is_set():
            try:
                async with asyncio.timeout(client.timeouts.manifest):
                    await fetch.ready.wait()  # its leader is opening it: its answer decides
            except TimeoutError:
                pass
            fetch = board.current(key)
        if fetch is not None and fetch.holds(0):
            if not await self._permits.may_join(ex):
                await self._from_upstream(ex, query)  # its own answer: the upstream's refusal
                return
            if fetch.holds(0):
                reader = fetch.join(0, fetch.total)
                ex.record.share = "joined"
                await self._send_shared(ex, fetch, reader, list(fetch.headers), 200)
                return
        ex.lead = board.lead(key)
        try:
            await self._from_upstream(ex, query)
        finally:
            ex.lead.abandon()  # unless its answer was shared: then nothing to do

    def _lead(
        self, ex: Exchange, fetch: herd.SharedFetch, resp: httpx.Response, headers: Headers
    ) -> herd.Reader | None:
        """Hand a whole blob answer to the shared fetch ``fetch``; its first reader, or None (relayed alone)."""
        assert self._board is not None
        length = resp.headers.get("content-length", "")
        if resp.status_code != 200 or not length.isdigit() or int(length) == 0 or "content-encoding" in resp.headers:
            return None
        total = int(length)
        if not self._board.has_room(total):
            ex.record.share = "bypassed"
            return None
        client = self._clients[ex.route_name]
        # The fetch's own exchange: its resumes and upstream are its own, not the first client's.
        producer = dataclasses.replace(ex, record=dataclasses.replace(ex.record), lead=None)
        body: AsyncIterator[Chunk] = resp.aiter_raw()
        passthrough_login = ex.login.from_client
        if not passthrough_login:
            # The gateway's credentials: the fetch asks for the rest itself when its body breaks.
            # A passthrough fetch holds the leader's token only: its readers go on alone instead.
            body = integrity.resumable_body(producer, client, resp, body, self._resumes, self._same)
        algorithm = integrity.algorithm_for(ex)
        self._producers[fetch] = producer
        route = ex.route_name
        metrics.SHARED_FETCHES.labels(route).inc()

        def ended(done: herd.SharedFetch) -> None:
            metrics.SHARED_FETCHES.labels(route).dec()
            metrics.blob_bytes(route, "upstream", done.produced)
            done.resumes = producer.record.resumes or 0
            if isinstance(done.error, DigestMismatch):
                integrity.mismatched(
                    producer,
                    client,
                    done.error.actual,
                    "a shared blob's bytes did not match its digest: readers that had some cut, the others ask again",
                )

        reader = fetch.start(
            headers,
            total,
            body,
            digest=ex.api.reference,
            algorithm=algorithm,
            detach_on_break=passthrough_login,
            on_end=ended,
            close=resp.aclose,
        )
        ex.handed_over = True
        ex.record.share = "led"
        return reader

    async def _send_shared(
        self, ex: Exchange, fetch: herd.SharedFetch, reader: herd.Reader, headers: Headers, status: int
    ) -> None:
        """One reader of a shared fetch: the window's bytes, then its own request if it is detached."""
        client = self._clients[ex.route_name]
        producer = self._producers.get(fetch)
        if producer is not None:
            ex.upstream = producer.upstream
            ex.record.upstream = producer.record.upstream
        whole = reader.position == 0 and reader.end == fetch.total
        algorithm = integrity.algorithm_for(ex) if whole else None
        verdict = Verdict() if algorithm is not None else None

        async def own(resume: herd.Resume) -> AsyncIterator[Chunk]:
            ex.record.share = "detached"
            fields = {
                "event": "shared_fetch_detached",
                "request_id": ex.record.request_id,
                "route": ex.route_name,
                "digest": ex.api.reference,
                "offset": resume.position,
                "reason": resume.reason,
            }
            logger.info("a reader left a shared fetch; going on alone", extra={"fields": fields})
            if resume.reason == "mismatch":
                _moved_on_from_a_mismatch(ex, client, producer)
            segment = Segment(resume.position, reader.end - 1, fetch.total)
            body = integrity.rest_of(ex, client, segment, self._resumes, self._same)
            if algorithm is not None and resume.hasher is not None:
                for piece in resume.prefix:
                    await resume.hasher.feed(piece)
                resume.prefix.clear()
                body = verified(body, ex.api.reference, algorithm, verdict, hasher=resume.hasher)
            got = 0
            try:
                async for chunk in body:
                    got += len(chunk)
                    yield chunk
            finally:
                metrics.blob_bytes(ex.route_name, "upstream", got)

        first = fetch
        await send_stream(ex, status, headers, fetch.read(reader, own))
        fetch = reader.fetch  # the fetch it ended on: another, if its own merged into an older one
        if fetch is not first and ex.record.share in ("led", "joined"):
            ex.record.share = "merged"
        if ex.record.share != "detached":
            ex.record.resumes = fetch.resumes or ex.record.resumes
            if verdict is not None and fetch.actual is not None and ex.record.bytes == fetch.total:
                verdict.actual = fetch.actual
            if isinstance(fetch.error, DigestMismatch):
                ex.record.verified = "mismatch"
                ex.record.error = "digest_mismatch"
                return
        if verdict is not None:
            integrity.judge(ex, client, verdict)


def _moved_on_from_a_mismatch(ex: Exchange, client: UpstreamClient, producer: Exchange | None) -> None:
    """A reader of a shared fetch whose bytes did not match, sent none of them, asks on its own: the
    source that sent them is left out for this blob (the fetch's end may not have said so yet), and
    the mismatch counts for this client's transfer as a cut one would."""
    source = producer.upstream if producer is not None else None
    if source is not None:
        client.avoid(source, ex.api.reference)
    metrics.DIGEST_MISMATCHES.labels(ex.route_name, source.url if source is not None else "-").inc()


def _shareable(ex: Exchange) -> bool:
    """A blob GET by digest, whole or one range, with no condition that makes its answer its own."""
    if ex.head or ex.api.kind is not Kind.BLOB or not is_digest(ex.api.reference):
        return False
    return not any(k in _OWN_CONDITIONS for k, _ in ex.scope["headers"])
