"""One upstream body of a blob fed to every concurrent pull of it (``SharedFetch``), and the board of them.

The fetch runs the body through its steps (read a chunk, hash it, append it to the window, evict,
then wait for readers, hold for latecomers, or wait for a younger fetch) and its readers see only
its window, whether it broke, and whether it is done. The parts it is made of each keep their
own state: the bytes (``window.Window``, ``window.HashMarks``), the pace (``pace.Pace``), the
hold for latecomers (``hold.Gathering``) and the generations of the blob (``merge.Lineage``).
``board.Board`` holds the fetches of one process by key, and the memory their windows may use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.blobs import pace, tail
from gateway.blobs.digest import HELD_WHOLE, DigestMismatch, StreamHasher
from gateway.blobs.hold import Gathering, Linger, hold, keep_from, linger_left
from gateway.blobs.merge import Lineage
from gateway.blobs.produce import Producer
from gateway.blobs.terms import Continue, FetchBroken, Key, Resume
from gateway.blobs.window import HashMarks, Window
from gateway.http.util import Chunk

logger = logging.getLogger("gateway.herd")


@dataclass(eq=False, slots=True)
class Reader:
    """One client's place in a shared fetch: the next byte it needs, and where it stops."""

    position: int
    end: int  # exclusive
    fetch: SharedFetch
    resume: Resume | None = None
    loose: bool = False  # the herd no longer waits for it (``pace.Pace.review``)
    # A place held in an older fetch for readers still reading the tail of a younger one that merged
    # into it (``tail.keep``): it reads nothing, it only keeps the bytes from there.
    pin: bool = False
    # Whether its client has asked for its first bytes: until then it is not detached (``spare_the_new``).
    started: bool = False

    async def stream(self, own: Continue) -> AsyncGenerator[Chunk, None]:
        """This reader's bytes: from the window while it keeps up, then from ``own(resume)``.

        Ends cleanly only at ``self.end``; raises (``DigestMismatch``, ``FetchBroken``)
        when the shared body failed and the reader cannot go on alone (a mismatch found before
        the reader had a byte sends it on alone: ``Resume.reason`` ``"mismatch"``). A reader whose fetch
        merged into an older one (``merge.py``) reads on from that one: ``self.fetch``.
        """
        self.started, sent = True, False
        try:
            while True:
                fetch = self.fetch
                if self.resume is not None:
                    break
                position = self.position
                if position >= self.end:
                    return
                if position < fetch.produced and position >= fetch.base and not held_whole(fetch):
                    piece = fetch.bytes.piece(position, self.end)
                    self.position += len(piece)
                    fetch.pace.nudge(fetch.produced - self.position, fetch.board.window_now)
                    sent = True
                    yield piece
                    continue
                if fetch.merged:
                    tail.hop(fetch, self)  # the end of a merged fetch's tail: on in the older fetch
                    continue
                if (error := fetch.error) is not None:
                    if isinstance(error, DigestMismatch):
                        if sent:
                            raise DigestMismatch(error.expected, error.actual)
                        # Wrong bytes, of which this client has had none (a small blob is held
                        # whole until checked): it asks the next source itself, instead of a cut.
                        fetch.detach(self, "mismatch")
                        break
                    if fetch.detach_on_break:
                        fetch.detach(self, "upstream_broke")
                        break
                    raise FetchBroken(f"the shared upstream body broke: {type(error).__name__}")
                if fetch.done:
                    return  # produced == total: nothing more will come
                await fetch._more.wait()
        finally:
            self.fetch._leave(self)
        assert self.resume is not None
        async for chunk in own(self.resume):
            yield chunk


class BoardSide(Protocol):
    """What a fetch asks of its board (``board.Board``): the sizes, the cap, and the bookkeeping."""

    window: int
    memory: int
    retain: int
    head: int
    patience: float
    held: int
    lingering: dict[SharedFetch, None]  # complete blobs kept a moment, oldest first

    @property
    def window_now(self) -> int: ...
    def forget(self, fetch: SharedFetch) -> None: ...
    def release(self, fetch: SharedFetch) -> None: ...
    def count_held(self, delta: int) -> None: ...
    def waited(self, fetch: SharedFetch, seconds: float) -> None: ...
    def replace(self, merged: SharedFetch, older: SharedFetch) -> None: ...
    def merged(self, fetch: SharedFetch) -> None: ...


class SharedFetch:
    """One upstream body of one blob, read once, fed to every attached reader from a window."""

    def __init__(self, board: BoardSide, key: Key) -> None:
        self.board, self.key, self.window = board, key, board.window
        # Set once the leader knows whether its answer is shared (``start``) or not (``abandon``).
        self.ready = asyncio.Event()
        self.shared = self.done = self.merged = False
        self.total = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.readers: set[Reader] = set()
        self.error: BaseException | None = None
        self.actual: str | None = None  # the digest the bytes hashed to, once all came
        self.resumes = 0  # how many times the shared body was asked for again (set by the relay)
        # Whether a break detaches the readers (each goes on with its own login) instead of
        # failing them: a passthrough route's fetch is opened with the leader's token only.
        self.detach_on_break = False
        self.bytes, self._digest = Window(), ""
        self.marks: HashMarks | None = None  # the hasher and its marks; None: not checked
        self._more = asyncio.Event()  # set (and replaced) at every new byte, break or end
        self._task: asyncio.Task[None] | None = None
        self._on_end: Callable[[SharedFetch], None] | None = None
        self._freed = False  # the window was dropped: never joinable again
        self.lineage: Lineage[SharedFetch] = Lineage()
        self.created = self.progressed = asyncio.get_running_loop().time()  # progressed: the last chunk read
        self.gathering_state = Gathering(self.created, lambda seconds: board.waited(self, seconds))
        self.pace = pace.Pace(self.created)
        self.ended = 0.0  # when the upstream body ended
        self.linger = Linger(self._linger_left, self.free)  # complete, no reader left, kept a moment
        self.served = self.detached = 0  # readers it fed (handed over included), readers let go
        # Merged, with readers still reading its tail: the place held for them in the older fetch.
        self.pinned: Reader | None = None

    @property
    def produced(self) -> int:  # bytes in (or through) the window
        return self.bytes.produced

    @property
    def base(self) -> int:  # offset of the window's first byte
        return self.bytes.base

    @property
    def lingering(self) -> bool:  # complete, no reader left, kept for the next client (``hold.Linger``)
        return self.linger.active

    @property
    def waited(self) -> float:  # seconds its readers waited for latecomers in all
        return self.gathering_state.waited

    # -- the leader's side -------------------------------------------------------------

    def start(
        self,
        headers: list[tuple[bytes, bytes]],
        total: int,
        body: AsyncIterator[Chunk],
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
        self.headers, self.total, self._digest = headers, total, digest
        if algorithm is not None:
            self.marks = HashMarks(StreamHasher(algorithm, marks=True), self.bytes)
        self.detach_on_break, self._on_end, self.shared = detach_on_break, on_end, True
        reader = self._attach(0, total)
        self._task = asyncio.get_running_loop().create_task(self._produce(body, close))
        self.ready.set()
        return reader

    def abandon(self) -> None:
        """The leader's answer is not shared (an error, a redirect passed on, no length, no room)."""
        if not self.ready.is_set():
            self.ready.set()
            self.board.forget(self)
            self.lineage.unlink(self)

    # -- the joiners' side -------------------------------------------------------------

    def holds(self, position: int) -> bool:
        """Whether a reader starting at ``position`` can be fed from this fetch now."""
        if not self.shared or self.merged or self.error is not None or self._task is None:
            return False
        if self._task.done() and not self.done:
            return False  # cancelled: its last reader left
        return self.base <= position < self.total and (bool(self.readers) or self.linger.active)

    def join(self, start: int, end: int) -> Reader:
        if start == 0:
            self.gathering_state.joined(asyncio.get_running_loop().time(), at_first_byte=self.base == 0)
        return self._attach(start, end)

    def read(self, reader: Reader, own: Continue) -> AsyncGenerator[Chunk, None]:
        """``reader``'s bytes (``Reader.stream``): from the window while it keeps up, then from ``own(resume)``."""
        return reader.stream(own)

    # -- readers come and go ------------------------------------------------------------

    def _attach(self, start: int, end: int, *, pin: bool = False) -> Reader:
        if self.linger.active:
            self.linger.end()
            self.board.lingering.pop(self, None)
        reader = Reader(start, end, self, pin=pin)
        self.served += 0 if pin else 1
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
        if self.linger.active:
            return
        if self.done and self.base == 0 and self.bytes.has_bytes and not self._freed and self.board.patience > 0:
            self.board.lingering[self] = None
            self.linger.begin()
        else:
            self.free()

    def drop_head(self) -> None:
        """Keep no head for a second client any more (the board needs the memory): the bytes every
        reader has had go now, but for the tail."""
        state = self.gathering_state
        if not state.active and not state.over and self.base == 0 and self.bytes.has_bytes:
            state.stop()
            self._evict()

    def _linger_left(self, now: float) -> float:
        state, board = self.gathering_state, self.board
        return linger_left(
            now, created=self.created, ended=self.ended, last_join=state.last_join, patience=board.patience
        )

    def free(self) -> None:
        """Drop the window (its memory goes back to the board) and stop being joinable."""
        if self._freed:
            return
        self._freed = True
        tail.unpin(self)
        self.linger.end()
        self.board.lingering.pop(self, None)
        self.board.forget(self)
        self.board.release(self)
        self.bytes.clear()

    def handed_over(self, older: SharedFetch) -> None:
        """Merged into ``older`` (``merge.Lineage.merge``): later clients of the key find that one."""
        self.board.replace(self, older)
        self.board.merged(self)

    def detach(self, reader: Reader, reason: str) -> None:
        """``reader`` goes on alone from its offset, with the hash state and bytes it needs."""
        if reader.pin:  # no client behind it: the tail's readers see it and go on alone
            return tail.let_go(self, reader, reason)
        resume = Resume(reader.position, reason)
        if self.marks is not None:
            self.marks.resume(resume)
        reader.resume = resume
        self.readers.discard(reader)
        self.detached += 1
        self._wake()

    # -- the fetch's steps -------------------------------------------------------------

    async def _produce(self, body: AsyncIterator[Chunk], close: Callable[[], object] | None) -> None:
        try:
            producer = Producer(self.marks.hasher if self.marks is not None else None, self._digest)
            try:
                await producer.run(body, self)
            finally:
                self.actual = producer.actual
            self.done = not self.merged
        except asyncio.CancelledError:
            self.error = FetchBroken("no reader left")
            raise
        except Exception as exc:
            # Told to every reader (``read``); the relay logs it per request.
            self.error = exc
        finally:
            await self._finish(close)

    async def accept(self, piece: Chunk) -> bool:
        """Take the next piece of the body into the window; False: merged, its readers read on elsewhere.

        A fetch catching up with an older one never reads past what the older has: it merges there
        (``merge.Lineage.merge_at_the_older_front``), or goes on alone."""
        older = self.lineage.older
        if older is not None and self.produced + len(piece) > older.produced:
            await self.lineage.merge_at_the_older_front(self)
        if self.merged:
            return False
        self.append(piece)
        return True

    async def between_chunks(self) -> None:
        """Before the next upstream read: wait for the readers (``pace.py``), hold for latecomers
        (``hold.py``), or wait while a younger fetch catches up (``merge.py``). A fetch catching up
        with an older one never holds, and a lone reader of it does not pace it (``pace.ahead``)."""
        board = self.board
        await self.pace.wait_for_readers(
            self.produced,
            self.readers,
            lambda: pace.reach(board.window_now),
            catching_up=self.lineage.older is not None,
        )
        if self.gathering_state.active and self.produced >= pace.reach(self.board.window_now):
            held, reason = await hold(
                self.gathering_state,
                created=self.created,
                holding=lambda: bool(self.readers) and self.lineage.older is None,
                over_memory=lambda: self.board.held > self.board.memory,
                patience=self.board.patience,
                count=self.gathering_state.count,
            )
            if held > 0.01:
                _log_held(self, held, reason)
        await self.lineage.wait_for_younger(
            digest=self.key[2],
            offset=self.produced,
            patience=self.board.patience,
            waited=lambda: self.gathering_state.waited,
            count=self.gathering_state.count,
        )

    async def _finish(self, close: Callable[[], object] | None) -> None:
        self.ended = asyncio.get_running_loop().time()
        self._wake()
        self.lineage.unlink(self)
        if not self.done:
            self.board.forget(self)  # a complete window stays joinable while its readers drain
        if close is not None:
            with contextlib.suppress(Exception):
                result = close()
                if asyncio.iscoroutine(result):
                    await result
        if self._on_end is not None:
            self._on_end(self)
        _log_ended(self)
        if not self.readers:
            self._idle()

    def append(self, chunk: Chunk) -> None:
        self.progressed = asyncio.get_running_loop().time()
        self.bytes.append(chunk)
        self.board.count_held(len(chunk))
        self._evict()
        if self.lineage.older is not None:
            self.lineage.merge(self)
        self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    def _evict(self) -> None:
        # Bytes every reader has had leave at once, but for a short tail (``RETAIN``) for clients
        # that come a moment later, and the head (``HEAD``; all of the window while gathering)
        # for the next client of a rollout; bytes a reader still needs leave only once it is a
        # window behind, and it goes on alone. Past the board's cap, nothing is kept for later.
        slowest = min((r.position for r in self.readers), default=self.produced)
        board = self.board
        consumed = keep_from(
            self.gathering_state,
            slowest - board.retain,
            base=self.base,
            produced=self.produced,
            head=board.head,
            under_cap=board.held <= board.memory,
        )
        limit = spare_the_new(self.readers, max(self.produced - board.window_now, consumed), board.window_now)
        if limit <= self.base:
            return
        target = self.marks.floor(limit) if self.marks is not None else limit
        if target is None:
            return
        for reader in [r for r in self.readers if r.position < target]:
            self.detach(reader, "slow")
        dropped = self.bytes.drop_to(target)
        if dropped:
            self.board.count_held(-dropped)
        if self.marks is not None:
            self.marks.trim()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and self.error is None and not self.merged


def held_whole(fetch: SharedFetch) -> bool:
    """Whether the fetch's bytes wait for its digest: a checked blob of at most ``HELD_WHOLE``
    bytes reaches no reader before it matched (``blobs/digest.py``)."""
    return fetch.marks is not None and fetch.total <= HELD_WHOLE and not fetch.done


def spare_the_new(readers: set[Reader], limit: int, window: int) -> int:
    """Where the window may drop to (``limit``), kept down to a reader whose client has not asked for a
    byte yet. A client joins where the window still holds its first byte (``holds``), and the chunk
    the fetch was reading when it came may push that byte out before the client's task first runs
    (both wake in one turn of the loop; found in CI, a rollout's joiner let go at byte 0): it would
    go upstream on its own for what was here. Kept for at most one more window: a client that never
    starts does not hold the memory for ever."""
    new = [r.position for r in readers if not r.started and not r.pin]
    return limit if not new else max(min(limit, min(new)), limit - window)


def _log_held(fetch: SharedFetch, seconds: float, reason: str) -> None:
    fields: dict[str, object] = {"event": "shared_fetch_held", "digest": fetch.key[2], "offset": fetch.produced}
    fields.update(seconds=round(seconds, 3), readers=len(fetch.readers), reason=reason)
    logger.info("a shared fetch held its first bytes for clients that kept coming", extra={"fields": fields})


def _log_ended(fetch: SharedFetch) -> None:
    """One line per upstream body: what it read, whom it fed, how it ended."""
    fields: dict[str, object] = {"event": "shared_fetch_ended", "digest": fetch.key[2], "bytes": fetch.produced}
    fields.update(chunks=fetch.bytes.chunks, readers=fetch.served, detached=fetch.detached)
    fields["waited"] = round(fetch.waited, 3)
    fields["outcome"] = "merged" if fetch.merged else "complete" if fetch.done else type(fetch.error).__name__
    logger.info("a shared upstream body ended", extra={"fields": fields})
