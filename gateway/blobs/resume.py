"""A blob body that breaks mid-way is asked for again from where it broke, with no visible seam.

An upstream body can end early: a reset, an EOF before ``Content-Length``, a stall past the
blob idle timeout, a CDN URL that expires while a slow client reads. A blob is immutable
(addressed by its digest), so the rest can be asked for with ``Range: bytes=<offset>-<end>``
(RFC 9110 14.2) through the whole path again (a fresh token, a fresh redirect, failover to
the next upstream), and continued on the client's stream. The answer must be a ``206`` for
exactly that range (RFC 9110 14.4, ``Content-Range``); a ``200`` (the whole blob again) or a
``206`` for other bytes is no continuation, and counts as a break of the source that sent it.
The digest check (``blobs/digest.py``) wraps the resumed body, so it spans all of it.

Where the rest is asked for is ``Breaks``' decision: a source (an upstream or a mirror) whose
body broke is asked once more (``same_source``), then passed over for this body, and the next
source of the route is asked; only when every source has failed does the client's transfer end
(or when ``max_resumes`` resumes were asked for in all: a bound whatever happens).

This module is the loop, the range arithmetic and that policy; the relay supplies ``reopen``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field

import httpx

from gateway.http.util import Chunk

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


class NotTheRest(Exception):
    """An answer to a resume that is not exactly the rest asked for: a break of the source that sent it."""


@dataclass(slots=True)
class Breaks:
    """Which sources of one body broke and how often, and which of them are passed over for it.

    Pure bookkeeping: the relay tells it each break (``broke``) and asks which sources to leave
    out of the next request (``excluded``)."""

    same_source: int  # how many times a source whose body broke is asked again before the next
    counts: dict[str, int] = field(default_factory=dict)
    passed_over: list[str] = field(default_factory=list)

    def broke(self, source: str) -> bool:
        """Count a break of ``source``; True when that makes it passed over (just now)."""
        count = self.counts[source] = self.counts.get(source, 0) + 1
        if count > self.same_source and source not in self.passed_over:
            self.passed_over.append(source)
            return True
        return False

    def excluded(self, sources: Collection[str]) -> frozenset[str]:
        """The sources the next request must not ask: those passed over, unless that is all of them
        (then each is asked again, until ``max_resumes``: every source failed once, none for good)."""
        if all(source in self.passed_over for source in sources):
            return frozenset()
        return frozenset(self.passed_over)


Reopen = Callable[[int], Awaitable[AsyncIterator[Chunk]]]


async def resumable(
    body: AsyncIterator[Chunk],
    segment: Segment,
    reopen: Reopen,
    *,
    max_resumes: int,
    on_break: Callable[[int, BaseException, bool], None] | None = None,
) -> AsyncIterator[Chunk]:
    """``body``, continued through ``reopen(sent)`` each time it breaks, at most ``max_resumes`` times.

    ``reopen`` returns the rest of the segment from ``sent`` bytes on; raises ``NotTheRest``
    for an answer that is not (a break too: asked again, within ``max_resumes``), or anything
    else when no source can be asked (the client's transfer then ends with the first failure).
    ``on_break(sent, error, resumed)`` is told of each break, and whether it is resumed.
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
            failure = exc
        broke: BaseException = failure
        while True:
            give_up = resumes >= max_resumes or sent >= expected
            if on_break is not None:
                on_break(sent, broke, not give_up)
            if give_up:
                raise failure
            resumes += 1
            try:
                body = await reopen(sent)
                break
            except NotTheRest as refused:
                broke = refused
            except Exception as cause:
                raise failure from cause
