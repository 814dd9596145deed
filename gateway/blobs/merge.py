"""Generations of one blob's shared fetch: a younger fetch catching up with an older one, which waits.

A full GET that comes after an older fetch's window has moved past the first byte starts a younger
fetch (``Board.lead``); the older reads no further while the younger catches up, then the younger
hands its readers over and closes (``Lineage.merge``): a late client costs the bytes it missed,
not a second fetch. ``Lineage`` is one fetch's links in that chain and the older's wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from gateway.blobs import tail
from gateway.blobs.terms import MERGE_STALL
from gateway.blobs.window import HashMarks

logger = logging.getLogger("gateway.herd")


class Generation(Protocol):
    """What a lineage reads of the fetches it links, and what a merge moves between them."""

    key: tuple[str, str, str]
    window: int
    total: int
    merged: bool
    done: bool
    progressed: float  # when it last read a chunk
    error: BaseException | None
    readers: set[Any]
    served: int

    @property
    def lineage(self) -> Lineage[Any]: ...
    @property
    def produced(self) -> int: ...
    @property
    def base(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def marks(self) -> HashMarks | None: ...
    def detach(self, reader: Any, reason: str) -> None: ...
    def handed_over(self, older: Any) -> None: ...


G = TypeVar("G", bound=Generation)


class Lineage(Generic[G]):
    """One fetch's older fetch (which it catches up with) and younger one (which catches up with it)."""

    def __init__(self) -> None:
        self.older: G | None = None
        self.younger: G | None = None
        self._changed = asyncio.Event()

    def link(self, me: G, older: G) -> None:
        """``me`` (this lineage's fetch) catches up with ``older``."""
        self.older = older
        older.lineage.younger = me

    def unlink(self, me: G) -> None:
        """No longer catching up with an older fetch: it goes on."""
        older, self.older = self.older, None
        if older is not None and older.lineage.younger is me:
            older.lineage.younger = None
            older.lineage._changed.set()

    async def wait_for_younger(
        self, *, digest: str, offset: int, patience: float, waited: Callable[[], float], count: Callable[[float], None]
    ) -> None:
        """Read no further while a younger fetch of the blob catches up with this one: the upstream
        link is all its, and its clients then read on from this fetch instead of costing a whole
        second fetch. Bounded twice: the catch-up must keep moving (the youngest of the chain read
        something in the last ``MERGE_STALL`` seconds), and this fetch's readers wait at most
        the board's patience in all (holds included, ``waited``), however many late clients come."""
        loop = asyncio.get_running_loop()
        while (younger := self.younger) is not None:
            if younger.merged or younger.error is not None or younger.done:
                self.younger = None
                return
            youngest: Generation = younger
            while youngest.lineage.younger is not None:
                youngest = youngest.lineage.younger
            now = loop.time()
            reason = None
            if waited() >= patience:
                reason = "patience"
            elif now - youngest.progressed > MERGE_STALL:
                reason = "stalled"
            if reason is not None:
                self.younger = None
                fields = {"event": "shared_fetch_wait_ended", "digest": digest, "offset": offset}
                fields["reason"] = reason
                logger.info(
                    "a younger fetch of a blob did not catch up in time; the older one reads on",
                    extra={"fields": fields},
                )
                return
            self._changed.clear()
            try:
                async with asyncio.timeout(min(MERGE_STALL, patience - waited())):
                    await self._changed.wait()
            except TimeoutError:
                pass
            finally:
                count(loop.time() - now)

    async def merge_at_the_older_front(self, me: G) -> None:
        """Caught up with all the older fetch has: merge now (both hashes settled), never read past it
        (what a reader got beyond the older fetch's bytes would be covered by neither digest check)."""
        for fetch in (me, self.older):
            if fetch is not None and fetch.marks is not None:
                await fetch.marks.hasher.settle()
        if self.older is None:
            return
        self.merge(me)
        if not me.merged:
            self.unlink(me)  # they could not be compared, or differ: each goes on alone

    def merge(self, me: G) -> None:
        """Once ``me`` has caught up into an older fetch's window, its readers move there."""
        older = self.older
        assert older is not None
        if not older.running or older.total != me.total:
            self.unlink(me)
            return
        position = me.produced
        held = older.produced - older.base
        if position < older.base + min(older.window // 4, held // 2) or position > older.produced:
            return  # not (yet) well inside what the older one holds
        same = _same_prefix(me, older, position)
        if same is None:
            return  # no hash state to compare at this offset yet: at the next chunk
        if not same:
            logger.warning(
                "two upstream fetches of one blob disagree on its first bytes; not merged",
                extra={"fields": {"event": "shared_fetch_disagree", "digest": me.key[2], "offset": position}},
            )
            self.unlink(me)
            return
        moved, short = 0, 0
        for reader in list(me.readers):
            if reader.position >= older.base:
                me.readers.discard(reader)
                reader.fetch = older
                older.readers.add(reader)
                older.served += 1
                moved += 1
            elif reader.loose:
                me.detach(reader, "slow")  # the herd had let it go already
            else:
                short += 1  # keeps up, but has not reached the older's bytes: reads this window first
        me.merged = True
        self.unlink(me)
        if short:
            tail.keep(me, older, position)
        fields = {"event": "shared_fetch_merged", "digest": me.key[2], "offset": position, "readers": moved + short}
        fields["tail"] = short
        logger.info("a younger fetch of a blob caught up and handed its readers over", extra={"fields": fields})
        me.handed_over(older)


def _same_prefix(mine: Generation, other: Generation, position: int) -> bool | None:
    """Whether both fetches' first ``position`` bytes hash alike (what a merged reader already
    has from one must be what the other's digest check covers); None: cannot tell yet.
    Unchecked routes (``verify_blobs = false``): True."""
    if mine.marks is None or other.marks is None:
        return True
    a, b = mine.marks.digest_at(position), other.marks.digest_at(position)
    if a is None or b is None:
        return None
    return a == b
