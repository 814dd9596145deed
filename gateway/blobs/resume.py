"""A blob body that breaks mid-way is asked for again from where it broke, with no visible seam.

An upstream body can end early: a reset, an EOF before ``Content-Length``, a stall past the
blob idle timeout, a CDN URL that expires while a slow client reads. A blob is immutable
(addressed by its digest), so the rest can be asked for with ``Range: bytes=<offset>-<end>``
(RFC 9110 14.2) through the whole path again (a fresh token, a fresh redirect, failover to
the next upstream), and continued on the client's stream. The answer must be a ``206`` for
exactly that range (RFC 9110 14.4, ``Content-Range``); anything else ends the client's
transfer as before. The digest check (``blobs/digest.py``) wraps the resumed body, so it spans
all of it.

This module is the loop and the range arithmetic; the relay supplies ``reopen``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx

# RFC 9110 14.4: Content-Range: bytes first-last/complete-length (or "*").
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d{1,18})-(\d{1,18})/(\d{1,18}|\*)\Z")

# What ends a body early and may be resumed: the connection failed, ended too soon or went
# silent. (A client that goes away cancels the relay instead; nothing is resumed for it.)
RESUMABLE = (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout)


@dataclass(frozen=True, slots=True)
class Segment:
    """The bytes a body carries: ``first`` to ``last`` inclusive, of a blob of ``total`` bytes."""

    first: int
    last: int
    total: int | None

    def rest_from(self, sent: int) -> str:
        """The Range header value for what is left after ``sent`` bytes of this segment."""
        return f"bytes={self.first + sent}-{self.last}"


def parse_content_range(value: str) -> Segment | None:
    match = _CONTENT_RANGE_RE.match(value.strip())
    if match is None:
        return None
    first, last, total = int(match[1]), int(match[2]), match[3]
    complete = None if total == "*" else int(total)
    if last < first or (complete is not None and last >= complete):
        return None
    return Segment(first, last, complete)


_RANGE_RE = re.compile(r"bytes=(\d{1,18})-(\d{0,18})\Z")


def single_range(value: str, total: int) -> tuple[int, int] | None:
    """``Range: bytes=first-[last]`` (RFC 9110 14.1.2) as ``(first, last)`` inside a blob of
    ``total`` bytes; None for anything else (suffix ranges, several ranges, unsatisfiable)."""
    match = _RANGE_RE.match(value.strip())
    if match is None:
        return None
    first = int(match[1])
    last = int(match[2]) if match[2] else total - 1
    if first >= total or last < first:
        return None
    return first, min(last, total - 1)


def segment_of(status: int, headers: httpx.Headers) -> Segment | None:
    """What a blob answer carries, when it can be resumed: a 200 with a length, or a 206 with its range."""
    if status == 200:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > 0:
            return Segment(0, int(length) - 1, int(length))
        return None
    if status == 206:
        value = headers.get("content-range")
        return parse_content_range(value) if value is not None else None
    return None


def continues(segment: Segment, sent: int, status: int, headers: httpx.Headers) -> bool:
    """Whether an answer to ``segment.rest_from(sent)`` is exactly the rest of the segment."""
    if status != 206:
        return False  # a 200 would start again from byte 0: not a continuation
    value = headers.get("content-range")
    got = parse_content_range(value) if value is not None else None
    return (
        got is not None
        and got.first == segment.first + sent
        and got.last == segment.last
        and (segment.total is None or got.total in (None, segment.total))
    )


Reopen = Callable[[int], Awaitable[AsyncIterator[bytes]]]


async def resumable(
    body: AsyncIterator[bytes],
    segment: Segment,
    reopen: Reopen,
    *,
    max_resumes: int,
    on_resume: Callable[[int, BaseException], None] | None = None,
) -> AsyncIterator[bytes]:
    """``body``, continued through ``reopen(sent)`` each time it breaks, at most ``max_resumes`` times.

    ``reopen`` returns the rest of the segment from ``sent`` bytes on, or raises (the client's
    transfer then ends with the original failure). ``on_resume(sent, error)`` is told of each.
    """
    sent = 0
    expected = segment.last - segment.first + 1
    resumes = 0
    while True:
        try:
            async for chunk in body:
                sent += len(chunk)
                yield chunk
            return
        except RESUMABLE as exc:
            if resumes >= max_resumes or sent >= expected:
                raise
            resumes += 1
            if on_resume is not None:
                on_resume(sent, exc)
            try:
                body = await reopen(sent)
            except Exception as failure:
                raise exc from failure
