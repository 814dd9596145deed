"""Herd-proof pulls: one upstream fetch of a blob feeds every concurrent pull of it, in bounded memory.

A fleet pulls the same layers at the same moment. The first full GET of a blob (the
*leader*) opens the upstream as usual; while its body streams, every other full GET of the
same blob of the same route and repository (a *joiner*) reads the same bytes from a
**window** of the most recent bytes instead of opening its own upstream request. Each
reader goes at its own pace:

- the fetch reads upstream as fast as its fastest reader asks (at most ``READAHEAD`` ahead
  of it), but no further than the window lets the herd follow, unless its slowest reader holds
  most of the herd back; then that one is let go (``_ahead``, ``_review_pace``);
- the window holds the bytes between the slowest reader and the fastest (plus a short tail,
  ``retain``), at most ``window`` bytes; a reader that falls so far behind that its next bytes
  would leave the window is **detached**: it goes on alone with its own upstream request
  (``Range: bytes=<offset>-``), so one slow client never holds back the others and never makes
  the gateway buffer without bound;
- a board-wide cap on all windows (``memory``) turns sharing off for new fetches once reached,
  and shrinks the windows of those that pass it.

Every byte is hashed once, by the fetch (``blob_check.py``); the last chunk enters the window
only once the digest matched, so no reader sees a clean end of wrong bytes. The hash state
is kept at batch boundaries (marks), and the window never drops the bytes after the latest
mark below a reader: a detached reader takes that state and the bytes from the mark to its
offset, and checks its own rest against the same digest.

A fetch keeps its first bytes (``HEAD``) until a second client comes; once one came it keeps
its first window and, once it has read that, holds (``_hold``) while clients keep coming: a
rollout that starts its nodes over seconds joins from byte 0. A full GET that arrives after
the window no longer holds the first byte starts a younger fetch that later arrivals join; the
older one waits while the younger catches up, then the younger hands its readers over and
closes (``_merge``): a late client costs the bytes it missed, not a second fetch
(``docs/performance.md`` measures staggered starts). Shared fetches are per process;
``docs/deploy.md`` says how replicas behind nginx
or ingress-nginx meet in one process per blob.

This module is the mechanism only: no HTTP, no routes. The relay (``proxy.py``) decides who
may join and supplies a detached reader's own continuation.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.blobs.digest import DigestMismatch, StreamHasher

logger = logging.getLogger("gateway.herd")

# (route, upstream repository, digest). The repository is part of the key: a registry serves
# a blob only under a repository that holds it (distribution-spec "Pulling blobs"), and a
# private repository's blob must not reach a client that asked under another name.
Key = tuple[str, str, str]

# How far the fetch reads ahead of its fastest reader: enough to hide an upstream read's
# latency, small beside the window.
READAHEAD = 4 << 20
# Compact the window's lists once this many chunks have left them.
_COMPACT_AFTER = 512
# Bytes that every reader has had are kept this long behind the slowest one (the board's
# default): a range that starts a moment back is served from them, and a younger fetch that
# catches up merges into them (``_merge``). The first bytes are kept apart from this (``HEAD``).
RETAIN = 8 << 20
# What a fetch keeps of a blob's first bytes before a second client came (at most a window):
# at 100 MB/s the first third of a second, so that the next client of a rollout that starts
# one node at a time still finds byte 0 and the fetch starts gathering (``_hold``).
HEAD = 32 << 20
# How long in all a fetch's readers wait for latecomers (the board's default;
# GATEWAY_SHARED_PATIENCE_SECONDS): while it holds its head for clients that keep coming
# (``_hold``) and while younger fetches catch up with it (``_merge``); after that it goes on
# regardless. And how long a catch-up may make no progress before the wait ends.
PATIENCE = 15.0
MERGE_STALL = 2.0
# A complete blob still whole in memory when its last reader left (one under ``HEAD``, or under
# a window once a second client came) stays joinable until, since its end and its latest client,
# this long has passed, or as long as its fetch took if that was longer, and at most the patience
# after its end (``_linger``): the next node of a rollout reads it from memory. Nobody waits for
# it; it is the first memory given back when a new fetch needs room (``Board.has_room``).
LINGER = 1.0
# Herd pacing (``_ahead``): when the fetch spent more than this share of a period waiting for its
# slowest reader, that reader is let go (it falls out of the window and goes on alone), if it is in
# the slowest eighth of the herd.
PACE_PERIOD = 0.25
PACE_SHARE = 0.5


class FetchBroken(Exception):
    """The shared upstream body ended before its last byte (after any resumes)."""


@dataclass(slots=True)
class Resume:
    """Where a detached reader goes on alone, and the hash state its own bytes continue."""

    position: int
    reason: str  # "slow" (fell a window behind) or "upstream_broke" (the shared body broke)
    # A hash over the blob's first ``position`` bytes, or None when the fetch does not check.
    hasher: StreamHasher | None = None
    # The bytes between the hash's mark and ``position`` (already sent), to be fed to ``hasher``.
    prefix: list[bytes] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class Reader:
    """One client's place in a shared fetch: the next byte it needs, and where it stops."""

    position: int
    end: int  # exclusive
    fetch: SharedFetch
    resume: Resume | None = None
    loose: bool = False  # the herd no longer waits for it (``SharedFetch._review_pace``)


Continue = Callable[[Resume], AsyncIterator[bytes]]


class SharedFetch:
    """One upstream body of one blob, read once, fed to every attached reader from a window."""

    def __init__(self, board: Board, key: Key) -> None:
        self.board = board
        self.key = key
        self.window = board.window
        # Set once the leader knows whether its answer is shared (``start``) or not (``abandon``).
        self.ready = asyncio.Event()
        self.shared = False
        self.total = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.readers: set[Reader] = set()
        self.produced = 0  # bytes in (or through) the window
        self.base = 0  # offset of the window's first byte
        self.done = False
        self.error: BaseException | None = None
        self.actual: str | None = None  # the digest the bytes hashed to, once all came
        self.resumes = 0  # how many times the shared body was asked for again (set by the relay)
        # Whether a break detaches the readers (each goes on with its own login) instead of
        # failing them: a passthrough route's fetch is opened with the leader's token only.
        self.detach_on_break = False
        self._digest = ""
        self._hasher: StreamHasher | None = None
        self._starts: list[int] = []
        self._chunks: list[bytes] = []
        self._first = 0  # index in the lists of the window's first chunk
        self._more = asyncio.Event()
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_end: Callable[[SharedFetch], None] | None = None
        self._freed = False
        # Generations of one blob (``Board.lead``): a younger fetch, started for clients that came
        # after this one's window had moved past the first byte, catches up with an older one while
        # the older waits, then hands its readers over and closes (``_merge``).
        self.older: SharedFetch | None = None
        self.younger: SharedFetch | None = None
        self.merged = False
        self.created = asyncio.get_running_loop().time()
        self.progressed = self.created  # when it last read a chunk
        self._waited = 0.0  # seconds its readers waited for latecomers in all (the board's patience)
        self._younger_changed = asyncio.Event()
        # Gathering (``_hold``): once a second client came for the whole blob while the first byte
        # was still here, the fetch keeps every byte from the first (up to a window) for more.
        self.gathering = False
        self._gathered = False  # it gathered once and let go: never again
        self.last_join = self.created  # when the latest client came for the whole blob
        self._paced_since = self.created  # the current period of herd pacing (``_review_pace``)
        self._paced = 0.0  # seconds of it spent waiting for the slowest reader
        self.ended = 0.0  # when the upstream body ended
        self.lingering = False  # complete, no reader left, kept for the next client (``_linger``)
        self._linger_timer: asyncio.TimerHandle | None = None
        self.chunks = 0  # chunks in (or through) the window
        self.served = 0  # readers it fed, joiners and readers handed over included
        self.detached = 0

    # -- the leader's side -------------------------------------------------------------

    def start(
        self,
        headers: list[tuple[bytes, bytes]],
        total: int,
        body: AsyncIterator[bytes],
        *,
        digest: str,
        algorithm: str | None,
        detach_on_break: bool,
        on_end: Callable[[SharedFetch], None] | None = None,
        close: Callable[[], object] | None = None,
    ) -> Reader:
        """Share ``body`` (a whole blob of ``total`` bytes); returns the leader's reader.

        ``algorithm`` None: the bytes are not checked (``verify_blobs = false``, or an
        algorithm the gateway cannot hash). ``close`` releases the upstream response.
        ``on_end`` is called once, when the upstream body has ended (for the relay's counts).
        """
        self.headers = headers
        self.total = total
        self._digest = digest
        self._hasher = StreamHasher(algorithm, marks=True) if algorithm is not None else None
        self.detach_on_break = detach_on_break
        self._on_end = on_end
        self.shared = True
        reader = self._attach(0, total)
        self._task = asyncio.get_running_loop().create_task(self._produce(body, close))
        self.ready.set()
        return reader

    def abandon(self) -> None:
        """The leader's answer is not shared (an error, a redirect passed on, no length, no room)."""
        if not self.ready.is_set():
            self.ready.set()
            self.board._forget(self)
            self._unlink()

    # -- the joiners' side -------------------------------------------------------------

    def holds(self, position: int) -> bool:
        """Whether a reader starting at ``position`` can be fed from this fetch now."""
        if not self.shared or self.merged or self.error is not None or self._task is None:
            return False
        if self._task.done() and not self.done:
            return False  # cancelled: its last reader left
        return self.base <= position < self.total and (bool(self.readers) or self.lingering)

    def join(self, start: int, end: int) -> Reader:
        if start == 0:
            self.last_join = asyncio.get_running_loop().time()
            if self.base == 0 and not self._gathered:
                self.gathering = True
        return self._attach(start, end)

    async def read(self, reader: Reader, own: Continue) -> AsyncGenerator[bytes, None]:
        """``reader``'s bytes: from the window while it keeps up, then from ``own(resume)``.

        Ends cleanly only at ``reader.end``; raises (``DigestMismatch``, ``FetchBroken``)
        when the shared body failed and the reader cannot go on alone. A reader whose fetch
        merged into an older one (``_merge``) reads on from that one: ``reader.fetch``.
        """
        try:
            while True:
                fetch = reader.fetch
                if reader.resume is not None:
                    break
                position = reader.position
                if position >= reader.end:
                    return
                if position < fetch.produced and position >= fetch.base:
                    piece = fetch._piece(position, reader.end)
                    reader.position += len(piece)
                    if not fetch._room.is_set():
                        # The fetch waits for its readers: wake it when this one may be what it
                        # waits for (near the front, or far enough behind to pace the herd).
                        lag = fetch.produced - reader.position
                        if lag < READAHEAD or lag >= fetch._window_now // 2:
                            fetch._room.set()
                    yield piece
                    continue
                if fetch.error is not None:
                    if fetch.detach_on_break and not isinstance(fetch.error, DigestMismatch):
                        fetch._detach(reader, "upstream_broke")
                        break
                    if isinstance(fetch.error, DigestMismatch):
                        raise DigestMismatch(fetch.error.expected, fetch.error.actual)
                    raise FetchBroken(f"the shared upstream body broke: {type(fetch.error).__name__}")
                if fetch.done:
                    return  # produced == total: nothing more will come
                more = fetch._more
                await more.wait()
        finally:
            reader.fetch._leave(reader)
        assert reader.resume is not None
        async for chunk in own(reader.resume):
            yield chunk

    # -- internals ----------------------------------------------------------------------

    def _attach(self, start: int, end: int) -> Reader:
        if self.lingering:
            self.lingering = False
            self.board._lingering.pop(self, None)
        reader = Reader(start, end, self)
        self.served += 1
        self.readers.add(reader)
        return reader

    def _leave(self, reader: Reader) -> None:
        self.readers.discard(reader)
        if self.readers:
            return
        if self._task is not None and not self._task.done() and not self.done:
            self._task.cancel()  # nobody left to read: the upstream response is closed
        self._idle()

    def _idle(self) -> None:
        """No reader left: free the window, or keep a complete blob a moment for the next client."""
        if self.lingering:
            return
        if self.done and self.base == 0 and self._chunks and not self._freed and self.board.patience > 0:
            self.lingering = True
            self.board._lingering[self] = None
            self._linger()
        else:
            self._free()

    def _drop_head(self) -> None:
        """Keep no head for a second client any more (the board needs the memory): the bytes every
        reader has had go now, but for the tail."""
        if not self.gathering and not self._gathered and self.base == 0 and self._chunks:
            self._stop_gathering()
            self._evict()

    def _linger(self) -> None:
        """While lingering: freed once no client came for ``LINGER`` (or as long as the fetch took),
        or the patience after the body ended; checked again when that time comes."""
        if not self.lingering:
            return
        now = asyncio.get_running_loop().time()
        quiet = max(LINGER, self.ended - self.created)
        left = min(max(self.last_join, self.ended) + quiet, self.ended + self.board.patience) - now
        if left <= 0:
            self._free()
            return
        self._linger_timer = asyncio.get_running_loop().call_later(left, self._linger)

    def _free(self) -> None:
        """Drop the window (its memory goes back to the board) and stop being joinable."""
        if self._freed:
            return
        self._freed = True
        self.lingering = False
        self.board._lingering.pop(self, None)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self.board._forget(self)
        self.board._release(self)
        self._starts.clear()
        self._chunks.clear()
        self._first = 0
        self.base = self.produced

    def _piece(self, position: int, end: int) -> bytes:
        index = bisect.bisect_right(self._starts, position, self._first) - 1
        start = self._starts[index]
        chunk = self._chunks[index]
        stop = start + len(chunk)
        if position == start and stop <= end:
            return chunk  # the common case: the same object for every reader, no copy
        return chunk[position - start : min(stop, end) - start]

    def _front(self) -> int:
        return max((r.position for r in self.readers), default=self.produced)

    def _ahead(self) -> str | None:
        """Why the fetch should wait for its readers before it reads on, if it should.

        ``"front"``: it is ``READAHEAD`` ahead of the fastest. ``"herd"``: the fastest wait for the
        herd, the fetch reads no further than its slowest reader can follow in the window, unless
        that reader was let go (``_review_pace``). Readers only a little slower than the rest
        (clients short of CPU, whom the scheduler serves unevenly) stay together on one upstream
        body instead of each going on alone; while the herd waits for them they get the cores."""
        if self.produced - self._front() >= READAHEAD:
            return "front"
        if len(self.readers) < 2:
            return None
        edge = self.produced - self._reach
        if any(r.position <= edge and not r.loose for r in self.readers):
            return "herd"
        return None

    def _herd_waits(self) -> bool:
        """Whether most readers have all the fetch has (they wait for bytes the slowest holds back), not
        merely some slow one being at the window's edge: a herd short of CPU, its readers spread
        over the window, would be no faster without its slowest reader."""
        caught_up = sum(1 for r in self.readers if self.produced - r.position < READAHEAD)
        return 2 * caught_up > len(self.readers)

    def _review_pace(self, now: float) -> None:
        """Once a period: if the fetch spent more than ``PACE_SHARE`` of it waiting for its slowest
        reader, the herd goes at less than half the speed it could without it: that reader is let go
        (one per period, at most the slowest eighth, at least one), and is detached once it is a
        window behind. A slow client holds back no one for long. A herd that the link holds back
        more than its slowest reader does (the fetch waits for upstream bytes, not for readers)
        loses no one: a detached reader's own request would only take a share of the same link."""
        elapsed = now - self._paced_since
        if elapsed < PACE_PERIOD:
            return
        share = self._paced / elapsed
        self._paced_since, self._paced = now, 0.0
        if share > PACE_SHARE and len(self.readers) > 1:
            held_back = [r for r in self.readers if not r.loose]
            if len(self.readers) - len(held_back) < max(1, len(self.readers) // 8):
                min(held_back, key=lambda r: r.position).loose = True

    async def _produce(self, body: AsyncIterator[bytes], close: Callable[[], object] | None) -> None:
        try:
            await self._pump(body)
            self.done = not self.merged
        except asyncio.CancelledError:
            self.error = FetchBroken("no reader left")
            raise
        except Exception as exc:
            # Told to every reader (``read``); the relay logs it per request.
            self.error = exc
        finally:
            await self._finish(close)

    async def _pump(self, body: AsyncIterator[bytes]) -> None:
        """Read the upstream body into the window, checked, never far ahead of the fastest reader."""
        hasher = self._hasher
        held: bytes | None = None
        try:
            async for chunk in body:
                if not chunk:
                    continue
                piece: bytes | None = chunk
                if hasher is not None:
                    await hasher.feed(chunk)
                    piece, held = held, chunk  # the one before goes in: the last waits for the digest
                if piece is not None:
                    if self.older is not None and self.produced + len(piece) > self.older.produced:
                        await self._merge_at_the_older_front()
                    if self.merged:
                        return  # its readers read on from the older fetch
                    self._append(piece)
                await self._between_chunks()
            if hasher is not None:
                self.actual = await hasher.hexdigest()
                if self.actual != self._digest:
                    raise DigestMismatch(self._digest, self.actual)
        finally:
            if hasher is not None:
                await hasher.aclose()
        if self.produced + (len(held) if held else 0) != self.total:
            raise FetchBroken(f"the upstream body ended at {self.produced} of {self.total} bytes")
        if held is not None:
            self._append(held)  # the last chunk, only now that the digest matched

    async def _between_chunks(self) -> None:
        """Before the next upstream read: wait for the readers, hold for latecomers, or wait while a
        younger fetch catches up. A fetch catching up with an older one reads on whatever its readers
        do: the older one's readers wait for it (a slow reader of its own falls out of its window and
        goes on alone, and the catch-up, or with no reader left the wait, ends); nor does it hold."""
        loop = asyncio.get_running_loop()
        while self.older is None and self.readers and (why := self._ahead()) is not None:
            self._room.clear()
            began = loop.time()
            held_back = why == "herd" and self._herd_waits()
            await self._room.wait()
            if held_back:
                self._paced += loop.time() - began
        self._review_pace(loop.time())
        if self.gathering and self.produced >= self._reach:
            await self._hold()
        await self._wait_for_younger()

    async def _finish(self, close: Callable[[], object] | None) -> None:
        self.ended = asyncio.get_running_loop().time()
        self._wake()
        self._unlink()
        if not self.done:
            self.board._forget(self)  # a complete window stays joinable while its readers drain
        if close is not None:
            with contextlib.suppress(Exception):
                result = close()
                if asyncio.iscoroutine(result):
                    await result
        if self._on_end is not None:
            self._on_end(self)
        fields: dict[str, object] = {"event": "shared_fetch_ended", "digest": self.key[2], "bytes": self.produced}
        fields.update(chunks=self.chunks, readers=self.served, detached=self.detached, waited=round(self._waited, 3))
        fields["outcome"] = "merged" if self.merged else "complete" if self.done else type(self.error).__name__
        logger.info("a shared upstream body ended", extra={"fields": fields})
        if not self.readers:
            self._idle()

    def _append(self, chunk: bytes) -> None:
        self.progressed = asyncio.get_running_loop().time()
        self._starts.append(self.produced)
        self._chunks.append(chunk)
        self.chunks += 1
        self.produced += len(chunk)
        self.board._held(len(chunk))
        self._evict()
        if self.older is not None:
            self._merge()
        self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    def _stop_gathering(self) -> None:
        """The head leaves as usual from now on, and no later client makes the fetch gather again."""
        self.gathering, self._gathered = False, True

    @property
    def _reach(self) -> int:
        """How far behind the last byte read a reader may be before the fetch must stop reading or
        let it fall out of the window: the window, less some room to read ahead."""
        window = self._window_now
        return window - min(READAHEAD, window // 2)

    @property
    def _window_now(self) -> int:
        """The window, or under memory pressure (all windows past the board's cap) a short one:
        readers that lag more go on alone, and the memory goes back."""
        if self.board.held <= self.board.memory:
            return self.window
        return min(self.window, self.board.retain + READAHEAD)

    def _evict(self) -> None:
        # Bytes every reader has had leave at once, but for a short tail (``RETAIN``) for clients
        # that come a moment later, and the head (``HEAD``; all of the window while gathering)
        # for the next client of a rollout; bytes a reader still needs leave only once it is a
        # window behind, and it goes on alone. Past the board's cap, nothing is kept for later.
        consumed = min((r.position for r in self.readers), default=self.produced) - self.board.retain
        if self.base == 0 and self.board.held <= self.board.memory:
            if self.gathering or (not self._gathered and self.produced <= self.board.head):
                consumed = 0  # (``Board._make_room`` drops a head nobody joined when room is needed)
        elif self.gathering:
            self._stop_gathering()
        limit = max(self.produced - self._window_now, consumed)
        if limit <= self.base:
            return
        target = limit
        hasher = self._hasher
        if hasher is not None:
            # Only down to a mark: a reader detached later needs the hash state at a mark
            # at or below its offset, and the bytes from there on.
            mark = self._mark_below(limit)
            if mark is None or mark[0] <= self.base:
                return
            target = mark[0]
        for reader in [r for r in self.readers if r.position < target]:
            self._detach(reader, "slow")
        dropped = 0
        while self._first < len(self._chunks) and self._starts[self._first] + len(self._chunks[self._first]) <= target:
            dropped += len(self._chunks[self._first])
            self._chunks[self._first] = b""  # freed now, not at the next compaction
            self._first += 1
        if dropped:
            self.base = self._starts[self._first] if self._first < len(self._starts) else self.produced
            self.board._held(-dropped)
        if hasher is not None and hasher.marks is not None:
            keep = bisect.bisect_right(hasher.marks, self.base, key=lambda m: m[0]) - 1
            if keep > 0:
                del hasher.marks[:keep]
        if self._first >= _COMPACT_AFTER:
            del self._starts[: self._first]
            del self._chunks[: self._first]
            self._first = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and self.error is None and not self.merged

    async def _hold(self) -> None:
        """Gathering, with a window's worth read: read no further while clients keep coming, so that
        they join from the first byte instead of each costing a catch-up (the doors of a lift, held
        while people keep arriving). A rollout that starts its nodes over seconds then costs one
        fetch, not one per node (``docs/performance.md``); the early clients wait meanwhile.

        It holds until no client came for as long as the window took to read (waiting longer for
        one more would cost more than reading its bytes again), at most until its readers waited
        the board's patience in all, and not past its memory cap. Then the head leaves as usual
        and later clients catch up (``_merge``)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        fill = began - self.created
        reason = "quiet"
        while self.readers and self.older is None:
            now = loop.time()
            left = min(self.last_join + fill - now, self.board.patience - self._waited)
            if self.board.held > self.board.memory:
                reason = "memory"
                break
            if left <= 0:
                reason = "patience" if self._waited >= self.board.patience else "quiet"
                break
            await asyncio.sleep(left)
            self._count_wait(loop.time() - now)
        self._stop_gathering()
        held = loop.time() - began
        if held > 0.01:
            fields: dict[str, object] = {"event": "shared_fetch_held", "digest": self.key[2], "offset": self.produced}
            fields.update(seconds=round(held, 3), readers=len(self.readers), reason=reason)
            logger.info("a shared fetch held its first bytes for clients that kept coming", extra={"fields": fields})

    async def _wait_for_younger(self) -> None:
        """Read no further while a younger fetch of the blob catches up with this one: the upstream
        link is all its, and its clients then read on from this fetch instead of costing a whole
        second fetch. Bounded twice: the catch-up must keep moving (the youngest of the chain read
        something in the last ``MERGE_STALL`` seconds), and this fetch's readers wait at most
        the board's patience in all (holds included), however many late clients come."""
        loop = asyncio.get_running_loop()
        while (younger := self.younger) is not None:
            if younger.merged or younger.error is not None or younger.done:
                self.younger = None
                return
            youngest = younger
            while youngest.younger is not None:
                youngest = youngest.younger
            now = loop.time()
            reason = None
            if self._waited >= self.board.patience:
                reason = "patience"
            elif now - youngest.progressed > MERGE_STALL:
                reason = "stalled"
            if reason is not None:
                self.younger = None
                fields = {"event": "shared_fetch_wait_ended", "digest": self.key[2], "offset": self.produced}
                fields["reason"] = reason
                logger.info(
                    "a younger fetch of a blob did not catch up in time; the older one reads on",
                    extra={"fields": fields},
                )
                return
            self._younger_changed.clear()
            try:
                async with asyncio.timeout(min(MERGE_STALL, self.board.patience - self._waited)):
                    await self._younger_changed.wait()
            except TimeoutError:
                pass
            finally:
                self._count_wait(loop.time() - now)

    def _count_wait(self, seconds: float) -> None:
        self._waited += seconds
        self.board._waiting(self, seconds)

    def _unlink(self) -> None:
        """No longer catching up with an older fetch: it goes on."""
        older, self.older = self.older, None
        if older is not None and older.younger is self:
            older.younger = None
            older._younger_changed.set()

    async def _merge_at_the_older_front(self) -> None:
        """Caught up with all the older fetch has: merge now (both hashes settled), never read past it
        (what a reader got beyond the older fetch's bytes would be covered by neither digest check)."""
        for fetch in (self, self.older):
            if fetch is not None and fetch._hasher is not None:
                await fetch._hasher.settle()
        if self.older is None:
            return
        self._merge()
        if not self.merged:
            self._unlink()  # they could not be compared, or differ: each goes on alone

    def _merge(self) -> None:
        """Once this fetch has caught up into an older one's window, its readers move there."""
        older = self.older
        assert older is not None
        if not older.running or older.total != self.total:
            self._unlink()
            return
        position = self.produced
        held = older.produced - older.base
        if position < older.base + min(older.window // 4, held // 2) or position > older.produced:
            return  # not (yet) well inside what the older one holds
        same = self._same_prefix(older, position)
        if same is None:
            return  # no hash state to compare at this offset yet: at the next chunk
        if not same:
            logger.warning(
                "two upstream fetches of one blob disagree on its first bytes; not merged",
                extra={"fields": {"event": "shared_fetch_disagree", "digest": self.key[2], "offset": position}},
            )
            self._unlink()
            return
        moved = 0
        for reader in list(self.readers):
            if reader.position >= older.base:
                self.readers.discard(reader)
                reader.fetch = older
                older.readers.add(reader)
                older.served += 1
                moved += 1
            else:
                self._detach(reader, "slow")
        self.merged = True
        self._unlink()
        self.board._replace(self, older)
        fields = {"event": "shared_fetch_merged", "digest": self.key[2], "offset": position, "readers": moved}
        logger.info("a younger fetch of a blob caught up and handed its readers over", extra={"fields": fields})
        self.board._merged(self)

    def _same_prefix(self, other: SharedFetch, position: int) -> bool | None:
        """Whether both fetches' first ``position`` bytes hash alike (what a merged reader already
        has from this one must be what the other's digest check covers); None: cannot tell yet.
        Unchecked routes (``verify_blobs = false``): True."""
        if self._hasher is None or other._hasher is None:
            return True
        mine, theirs = self._digest_at(position), other._digest_at(position)
        if mine is None or theirs is None:
            return None
        return mine == theirs

    def _mark_below(self, offset: int) -> tuple[int, hashlib._Hash] | None:
        """The latest hash mark at or below ``offset`` whose bytes after it the window still has."""
        hasher = self._hasher
        assert hasher is not None
        hasher.collect()
        marks = hasher.marks
        assert marks is not None
        below = bisect.bisect_right(marks, offset, key=lambda m: m[0]) - 1
        return marks[below] if below >= 0 and marks[below][0] >= self.base else None

    def _pieces(self, start: int, end: int) -> list[bytes]:
        """The window's bytes from ``start`` to ``end`` (both inside it), as the chunks hold them."""
        pieces = []
        while start < end:
            piece = self._piece(start, end)
            pieces.append(piece)
            start += len(piece)
        return pieces

    def _digest_at(self, position: int) -> str | None:
        """The hash of the blob's first ``position`` bytes, from a mark and the window after it."""
        mark = self._mark_below(position)
        if mark is None:
            return None
        offset, state = mark
        state = state.copy()
        for piece in self._pieces(offset, position):
            state.update(piece)
        return state.hexdigest()

    def _detach(self, reader: Reader, reason: str) -> None:
        """``reader`` goes on alone from its offset, with the hash state and bytes it needs."""
        position = reader.position
        resume = Resume(position, reason)
        hasher = self._hasher
        if hasher is not None:
            mark = self._mark_below(position)
            assert mark is not None  # the window never drops the bytes after the mark below a reader
            offset, state = mark
            resume.hasher = StreamHasher(hasher.algorithm, state=state.copy(), fed=offset)
            resume.prefix = self._pieces(offset, position)
        reader.resume = resume
        self.readers.discard(reader)
        self.detached += 1
        self._wake()


class Board:
    """The shared fetches of one process, by key, and the memory their windows may use."""

    def __init__(
        self,
        window: int,
        memory: int,
        on_held: Callable[[int], None] | None = None,
        on_merge: Callable[[Key], None] | None = None,
        on_wait: Callable[[Key, float], None] | None = None,
        retain: int = RETAIN,
        head: int = HEAD,
        patience: float = PATIENCE,
    ) -> None:
        self.window = window
        self.memory = memory
        self.retain = min(retain, window)
        self.head = min(head, window)
        self.patience = patience
        self._on_held = on_held
        self._on_merge = on_merge
        self._on_wait = on_wait  # seconds a fetch's readers waited for latecomers
        self.merges = 0
        self._fetches: dict[Key, SharedFetch] = {}
        self._lingering: dict[SharedFetch, None] = {}  # complete blobs kept a moment, oldest first
        self.held = 0  # bytes in all windows now (the gauge)

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.memory > 0

    def current(self, key: Key) -> SharedFetch | None:
        """The newest fetch of ``key``: being opened (``ready`` not set) or streaming."""
        return self._fetches.get(key)

    def lead(self, key: Key) -> SharedFetch:
        """A new fetch of ``key`` that the caller opens; later requests find it (and wait for it).

        When an older fetch of the key is still streaming (its window no longer holds the first
        byte), the new one catches up with it and merges (``SharedFetch._merge``)."""
        fetch = SharedFetch(self, key)
        current = self._fetches.get(key)
        if current is not None and current.running and current.younger is None:
            fetch.older = current
            current.younger = fetch
        self._fetches[key] = fetch
        return fetch

    def _replace(self, merged: SharedFetch, older: SharedFetch) -> None:
        if self._fetches.get(merged.key) is merged:
            self._fetches[merged.key] = older

    def _merged(self, fetch: SharedFetch) -> None:
        self.merges += 1
        if self._on_merge is not None:
            self._on_merge(fetch.key)

    def _waiting(self, fetch: SharedFetch, seconds: float) -> None:
        if self._on_wait is not None:
            self._on_wait(fetch.key, seconds)

    def has_room(self, size: int) -> bool:
        """Whether a new fetch of a ``size``-byte blob may be shared: the windows' bytes now, plus
        what it holds at first, stay under the cap (else it is relayed alone). What is kept only for
        latecomers (lingering blobs, heads nobody joined) is given back first to make room. Windows
        that grow past the cap shrink (``SharedFetch._window_now``)."""
        need = min(size, self.retain + READAHEAD)
        if self.held + need > self.memory:
            self._make_room(need)
        return self.held + need <= self.memory

    def _make_room(self, need: int) -> None:
        """Give back what is kept only in case more clients come: complete blobs kept for latecomers
        (the oldest first), then the heads of fetches no second client has joined. A herd's window
        stays: its readers need it."""
        while self._lingering and self.held + need > self.memory:
            next(iter(self._lingering))._free()
        for fetch in list(self._fetches.values()):
            if self.held + need <= self.memory:
                return
            fetch._drop_head()

    def _forget(self, fetch: SharedFetch) -> None:
        if self._fetches.get(fetch.key) is fetch:
            del self._fetches[fetch.key]

    def _release(self, fetch: SharedFetch) -> None:
        held = fetch.produced - fetch.base if fetch._chunks else 0
        if held:
            self._held(-held)

    def _held(self, delta: int) -> None:
        self.held += delta
        if self._on_held is not None:
            self._on_held(delta)


def permit_key(authorization: str, route: str, repository: str) -> tuple[str, str, str]:
    """What a passthrough client's proven access is remembered by (never the token itself)."""
    return (hashlib.sha256(authorization.encode()).hexdigest(), route, repository)
