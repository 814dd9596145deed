"""Herd pacing: how far a shared fetch may read ahead of its readers, and when a slow one is let go.

Pure rules over the readers' positions (``ahead``, ``herd_waits``) and one small clock of state
(``Pace``: the share of the current period the fetch spent waiting for its slowest reader).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Protocol

from gateway.blobs.terms import PACE_PERIOD, PACE_SHARE, READAHEAD


class Paced(Protocol):
    """What pacing reads of a reader: the next byte it needs, and whether the herd still waits for it."""

    position: int
    loose: bool


def reach(window: int) -> int:
    """How far behind the last byte read a reader may be before the fetch must stop reading or
    let it fall out of the window: the window (as it is now), less some room to read ahead."""
    return window - min(READAHEAD, window // 2)


def front(produced: int, readers: Collection[Paced]) -> int:
    """The fastest reader's next byte (``produced`` with none)."""
    return max((r.position for r in readers), default=produced)


def ahead(produced: int, readers: Collection[Paced], reach: int, *, catching_up: bool = False) -> str | None:
    """Why the fetch should wait for its readers before it reads on, if it should.

    ``"front"``: it is ``READAHEAD`` ahead of the fastest. ``"herd"``: the fastest wait for the
    herd, the fetch reads no further than its slowest reader can follow in the window (``reach``
    behind the last byte read), unless that reader was let go (``Pace.review``). Readers only a
    little slower than the rest (clients short of CPU, whom the scheduler serves unevenly) stay
    together on one upstream body instead of each going on alone; while the herd waits for them
    they get the cores.

    ``catching_up``: the fetch is catching up with an older one, which waits for it (``merge.py``).
    A herd paces it as any herd does, so that the merge keeps it whole (found in #21: a catch-up
    that raced ahead of its herd left it behind the older's window, and the merge sent every
    reader off alone). A lone reader does not hold it back: a slow late client would hold the
    older fetch's clients back with it; it falls out of the window and goes on alone."""
    if catching_up and len(readers) < 2:
        return None
    if produced - front(produced, readers) >= READAHEAD:
        return "front"
    if len(readers) < 2:
        return None
    edge = produced - reach
    if any(r.position <= edge and not r.loose for r in readers):
        return "herd"
    return None


def herd_waits(produced: int, readers: Collection[Paced]) -> bool:
    """Whether most readers have all the fetch has (they wait for bytes the slowest holds back), not
    merely some slow one being at the window's edge: a herd short of CPU, its readers spread
    over the window, would be no faster without its slowest reader."""
    caught_up = sum(1 for r in readers if produced - r.position < READAHEAD)
    return 2 * caught_up > len(readers)


class Pace:
    """Flow control between one fetch and its readers: the fetch waits for room, readers make it.

    Its state: the event a waiting fetch sleeps on, and the current pacing period (when it began,
    and the seconds the fetch spent in it waiting for its slowest reader)."""

    def __init__(self, now: float) -> None:
        self._since = now
        self._waited = 0.0
        self._room = asyncio.Event()

    def nudge(self, lag: int, window: int) -> None:
        """A reader took bytes ``lag`` behind the last byte read: wake the fetch if it waits and this
        reader may be what it waits for (near the front, or far enough behind to pace the herd)."""
        if not self._room.is_set() and (lag < READAHEAD or lag >= window // 2):
            self._room.set()

    def wake(self) -> None:
        """Something the fetch may wait for changed (a reader it waited for is gone): look again."""
        self._room.set()

    async def wait_for_readers(
        self, produced: int, readers: Collection[Paced], reach: Callable[[], int], *, catching_up: bool
    ) -> None:
        """Before the fetch reads on: wait while it is ahead of its readers (``ahead``), then review
        the period."""
        loop = asyncio.get_running_loop()
        while readers and (why := ahead(produced, readers, reach(), catching_up=catching_up)):
            self._room.clear()
            began = loop.time()
            held_back = why == "herd" and herd_waits(produced, readers)
            await self._room.wait()
            if held_back:
                self.waited(loop.time() - began)
        self.review(loop.time(), readers)

    def waited(self, seconds: float) -> None:
        """The fetch waited this long for its slowest reader while most of the herd had everything."""
        self._waited += seconds

    def review(self, now: float, readers: Collection[Paced]) -> None:
        """Once a period: if the fetch spent more than ``PACE_SHARE`` of it waiting for its slowest
        reader, the herd goes at less than half the speed it could without it: that reader is let go
        (one per period, at most the slowest eighth, at least one), and is detached once it is a
        window behind. A slow client holds back no one for long. A herd that the link holds back
        more than its slowest reader does (the fetch waits for upstream bytes, not for readers)
        loses no one: a detached reader's own request would only take a share of the same link."""
        elapsed = now - self._since
        if elapsed < PACE_PERIOD:
            return
        share = self._waited / elapsed
        self._since, self._waited = now, 0.0
        if share > PACE_SHARE and len(readers) > 1:
            held_back = [r for r in readers if not r.loose]
            if len(readers) - len(held_back) < max(1, len(readers) // 8):
                min(held_back, key=lambda r: r.position).loose = True
