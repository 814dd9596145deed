"""What the relay does for content named by its digest: resume broken blob bodies, check every byte.

The mechanisms live in ``resume.py`` (the loop and the range arithmetic) and ``blobs/digest.py``
(hashing while streaming); this module applies them to one exchange: which bodies qualify,
how a resume is asked for (the whole path again: token, redirect, failover, mirrors), what a
mismatch does (recorded, logged with both digests and the upstream, the upstream avoided for
that digest so the client's retry goes elsewhere).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from gateway.blobs.digest import HELD_WHOLE, DigestMismatch, Verdict, algorithm_of, verified
from gateway.blobs.resume import Breaks, NotTheRest, Segment, continues, resumable, segment_of
from gateway.http.errors import UNAVAILABLE, RegistryError
from gateway.http.util import Chunk
from gateway.observe import metrics
from gateway.relay.exchange import Exchange
from gateway.routing.reference import is_digest
from gateway.routing.request_rules import upstream_headers
from gateway.upstream.client import PASS_OVER_SECONDS, UpstreamClient

logger = logging.getLogger("gateway.integrity")


def _reopener(
    ex: Exchange, client: UpstreamClient, segment: Segment, later: list[httpx.Response], breaks: Breaks
) -> Callable[[int], Awaitable[AsyncIterator[Chunk]]]:
    """How the rest of ``segment`` after ``sent`` bytes is asked for: the whole path again, of the
    sources the body has not been passed over on (``resume.Breaks``)."""

    async def reopen(sent: int) -> AsyncIterator[Chunk]:
        while later:
            await later.pop().aclose()
        headers = upstream_headers(ex.scope)
        headers["range"] = segment.rest_from(sent)
        async with asyncio.timeout(client.timeouts.manifest):
            opened = await client.open(
                "GET",
                ex.upstream_path,
                headers=headers,
                repository=ex.target.upstream_name,
                login=ex.login,
                avoid=ex.api.reference,
                content_addressed=True,
                exclude=breaks.excluded(client.sources),
                last_resort=True,
            )
        later.append(opened.response)
        ex.record.upstream = opened.upstream.url
        ex.upstream = opened.upstream
        if not continues(segment, sent, opened.response.status_code, opened.response.headers):
            # RFC 9110 14.4: a 200 starts from byte 0, a 206 for other bytes is not the rest.
            raise NotTheRest(
                f"the resume answered {opened.response.status_code} "
                f"{opened.response.headers.get('content-range', '')}, not the rest of the blob"
            )
        return opened.response.aiter_raw()

    return reopen


def _broke(ex: Exchange, client: UpstreamClient, breaks: Breaks) -> None:
    """A body from ``ex.upstream`` broke (or a resume of it was not the rest): counted; once it broke
    more than the route allows, that source is passed over for this body, and for the blob a while."""
    upstream = ex.upstream
    if upstream is None or not breaks.broke(upstream.url):
        return
    if len(client.sources) > 1:
        client.avoid(upstream, ex.api.reference, PASS_OVER_SECONDS)
    metrics.UPSTREAM_PASSED_OVER.labels(ex.route_name, upstream.url).inc()
    fields = {
        "event": "upstream_passed_over",
        "request_id": ex.record.request_id,
        "route": ex.route_name,
        "upstream": upstream.url,
        "digest": ex.api.reference,
        "breaks": breaks.counts[upstream.url],
    }
    logger.warning("a blob's bodies from an upstream kept breaking; asking the next one", extra={"fields": fields})


def _resumed(
    ex: Exchange,
    body: AsyncIterator[Chunk],
    segment: Segment,
    reopen: Callable[[int], Awaitable[AsyncIterator[Chunk]]],
    later: list[httpx.Response],
    max_resumes: int,
    client: UpstreamClient,
    breaks: Breaks,
) -> AsyncIterator[Chunk]:
    def on_break(sent: int, error: BaseException, resumed: bool) -> None:
        _broke(ex, client, breaks)
        if not resumed:
            return
        ex.record.resumes = (ex.record.resumes or 0) + 1
        fields = {
            "event": "blob_resume",
            "request_id": ex.record.request_id,
            "route": ex.route_name,
            "upstream": ex.record.upstream,
            "digest": ex.api.reference,
            "offset": segment.first + sent,
            "error": type(error).__name__,
        }
        logger.info("a blob body broke; asking for the rest", extra={"fields": fields})

    async def resumed() -> AsyncIterator[Chunk]:
        try:
            async for chunk in resumable(body, segment, reopen, max_resumes=max_resumes, on_break=on_break):
                yield chunk
        finally:
            while later:
                await later.pop().aclose()

    return resumed()


def resumable_body(
    ex: Exchange,
    client: UpstreamClient,
    resp: httpx.Response,
    body: AsyncIterator[Chunk],
    max_resumes: int,
    same_source: int = 1,
) -> AsyncIterator[Chunk]:
    """A blob body that is asked for again from where it broke (``resume.py``), when it can be:
    ``same_source`` more times of the source that broke, then of the next source of the route."""
    segment = segment_of(resp.status_code, resp.headers)
    if segment is None or max_resumes <= 0:
        return body
    later: list[httpx.Response] = []  # the answers to resumes, closed when done
    breaks = Breaks(same_source)
    reopen = _reopener(ex, client, segment, later, breaks)
    return _resumed(ex, body, segment, reopen, later, max_resumes, client, breaks)


async def rest_of(
    ex: Exchange, client: UpstreamClient, segment: Segment, max_resumes: int, same_source: int = 1
) -> AsyncIterator[Chunk]:
    """``segment`` of a blob on its own upstream request (a reader that left a shared fetch), resumed too.

    The request is the client's own: its login, a fresh token and redirect, failover and
    mirrors, a 206 for exactly that range (else, as for a resume, the next source), or nothing
    (the transfer aborted).
    """
    later: list[httpx.Response] = []
    breaks = Breaks(same_source)
    reopen = _reopener(ex, client, segment, later, breaks)
    try:
        for attempt in range(max_resumes + 1):
            try:
                body = await reopen(0)
                break
            except NotTheRest:
                if attempt == max_resumes:
                    raise
                _broke(ex, client, breaks)
    except BaseException:
        while later:
            await later.pop().aclose()
        raise
    async for chunk in _resumed(ex, body, segment, reopen, later, max_resumes, client, breaks):
        yield chunk


def algorithm_for(ex: Exchange) -> str | None:
    """The hash a whole blob body of this request is checked with, or None (and the record says why)."""
    if not ex.target.route.verify_blobs:
        ex.record.verified = "off"
        return None
    algorithm = algorithm_of(ex.api.reference)
    if algorithm is None:
        ex.record.verified = "unknown_algorithm"
    return algorithm


def checked_or_asked_again(
    ex: Exchange, client: UpstreamClient, resp: httpx.Response, body: AsyncIterator[Chunk], max_resumes: int, same: int
) -> tuple[AsyncIterator[Chunk], Verdict | None]:
    """A whole blob body, checked against its digest as it streams (``blobs/digest.py``), when it can
    be. When its bytes do not match before the client had any of them (a blob held whole until
    checked), the next source is asked for all of it instead of cutting the client, and that body is
    checked in turn (a blob of at most ``HELD_WHOLE`` bytes is held whole until checked, so none of
    its wrong bytes ever go out)."""
    algorithm = algorithm_for(ex)
    if algorithm is None:
        return body, None
    verdict = Verdict()
    segment = segment_of(resp.status_code, resp.headers)
    whole = segment is not None and segment.total is not None and segment.total <= HELD_WHOLE
    checked = verified(body, ex.api.reference, algorithm, verdict, whole=whole)
    if segment is None:
        return checked, verdict

    async def moved_on(segment: Segment, algorithm: str) -> AsyncIterator[Chunk]:
        sent = False
        try:
            async for chunk in checked:
                sent = True
                yield chunk
            return
        except DigestMismatch as exc:
            if sent:
                raise
            mismatched(
                ex, client, exc.actual, "a blob's bytes did not match its digest before any was sent; asking again"
            )
            metrics.DIGEST_MISMATCHES.labels(ex.route_name, ex.record.upstream or "-").inc()
        again = rest_of(ex, client, segment, max_resumes, same)
        async for chunk in verified(again, ex.api.reference, algorithm, verdict):
            yield chunk

    return moved_on(segment, algorithm), verdict


def judge(ex: Exchange, client: UpstreamClient, verdict: Verdict) -> None:
    """What the check of a whole blob body found, recorded (a mismatch also logged and its upstream avoided)."""
    if verdict.actual is None:
        ex.record.verified = "incomplete"  # the transfer ended before the last byte, for whatever reason
        return
    if verdict.actual == ex.api.reference:
        ex.record.verified = "ok"
        return
    ex.record.error = "digest_mismatch"
    mismatched(ex, client, verdict.actual, "a blob's bytes did not match its digest; the client's transfer was aborted")


def mismatched(ex: Exchange, client: UpstreamClient, actual: str, message: str) -> None:
    """Bytes that are not what their digest names: recorded, logged, and that upstream avoided for them."""
    ex.record.verified = "mismatch"
    if ex.upstream is not None:
        client.avoid(ex.upstream, ex.api.reference)
    fields = {
        "event": "digest_mismatch",
        "request_id": ex.record.request_id,
        "route": ex.route_name,
        "upstream": ex.record.upstream,
        "digest": ex.api.reference,
        "actual": actual,
    }
    logger.warning(message, extra={"fields": fields})


def check_manifest(ex: Exchange, client: UpstreamClient, body: bytes, resp: httpx.Response) -> None:
    """A manifest asked for by digest must be those bytes (image-spec "Digests"): else a 502, and
    the upstream (often a mirror) is avoided for it, so the client's retry goes elsewhere."""
    algorithm = algorithm_of(ex.api.reference) if is_digest(ex.api.reference) else None
    if algorithm is None or "content-encoding" in resp.headers:
        return
    actual = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
    if actual == ex.api.reference:
        return
    mismatched(ex, client, actual, "a manifest's bytes did not match its digest; not served")
    raise RegistryError(
        502, UNAVAILABLE, f"upstream {ex.route_name} sent a manifest whose bytes do not match {ex.api.reference}"
    )
