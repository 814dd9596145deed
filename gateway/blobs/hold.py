"""What a shared fetch keeps for clients that have not come yet: the gathering hold and the linger.

``Gathering`` is the state of holding the head: once a second client came for the whole blob while
the first byte was still here, the fetch keeps every byte from the first (up to a window) and,
once it has read that, stands still while clients keep coming (the doors of a lift, held while
people keep arriving). ``hold_left`` and ``linger_left`` are the pure rules of how long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.blobs.terms import LINGER


class Gathering:
    """Whether the fetch gathers now, whether it ever did, when the latest whole-blob client came,
    and how long its readers waited for latecomers in all (bounded by the board's patience)."""

    def __init__(self, now: float, on_wait: Callable[[float], None]) -> None:
        self.active = False
        self.over = False  # it gathered once and let go: never again
        self.last_join = now
        self.waited = 0.0
        self._on_wait = on_wait  # the board counts the seconds (a metric)

    def count(self, seconds: float) -> None:
        """The fetch's readers waited this long for latecomers (a hold, or a younger fetch's catch-up)."""
        self.waited += seconds
        self._on_wait(seconds)

    def joined(self, now: float, *, at_first_byte: bool) -> None:
        """A client came for the whole blob; ``at_first_byte``: the window still holds byte 0."""
        self.last_join = now
        if at_first_byte and not self.over:
            self.active = True

    def stop(self) -> None:
        """The head leaves as usual from now on, and no later client makes the fetch gather again."""
        self.active, self.over = False, True


def hold_left(
    now: float, last_join: float, fill: float, patience: float, waited: float, *, over_memory: bool
) -> tuple[float, str | None]:
    """(seconds to go on holding, why the hold ends now or None).

    A hold lasts until no client came for as long as the window took to read (``fill``: waiting
    longer for one more would cost more than reading its bytes again), at most until the readers
    waited the board's patience in all, and not past the memory cap."""
    left = min(last_join + fill - now, patience - waited)
    if over_memory:
        return left, "memory"
    if left <= 0:
        return left, "patience" if waited >= patience else "quiet"
    return left, None


def linger_left(now: float, *, created: float, ended: float, last_join: float, patience: float) -> float:
    """Seconds a complete blob with no reader left stays joinable: until ``LINGER`` (or as long as its
    fetch took) passed since its end and its latest client, and at most the patience after its end."""
    quiet = max(LINGER, ended - created)
    return min(max(last_join, ended) + quiet, ended + patience) - now


async def hold(
    state: Gathering,
    *,
    created: float,
    holding: Callable[[], bool],
    over_memory: Callable[[], bool],
    patience: float,
    count: Callable[[float], None],
) -> tuple[float, str]:
    """Stand still while clients keep coming, so that they join from the first byte instead of each
    costing a catch-up. A rollout that starts its nodes over seconds then costs one fetch, not one
    per node (``docs/performance.md``); the early clients wait meanwhile. ``holding``: the fetch
    still has readers and is not catching up with an older one; ``count`` is told every wait.
    Then the head leaves as usual and later clients catch up (``merge.py``).
    Returns (seconds held, why it ended)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    fill = began - created  # how long the window took to read
    reason: str | None = "quiet"
    while holding():
        now = loop.time()
        left, reason = hold_left(now, state.last_join, fill, patience, state.waited, over_memory=over_memory())
        if reason is not None:
            break
        await asyncio.sleep(left)
        count(loop.time() - now)
    state.stop()
    return loop.time() - began, reason or "quiet"


def keep_from(state: Gathering, consumed: int, *, base: int, produced: int, head: int, under_cap: bool) -> int:
    """The first byte the window must keep for later clients, given ``consumed`` (the slowest
    reader's offset less the tail): the head (``HEAD``; all of it while gathering) for the next
    client of a rollout, while the window still starts at byte 0 and all windows are under the
    board's cap. Past the cap, or once the head is gone, nothing is kept for later: a gathering
    fetch stops gathering (``Board._make_room`` drops a head nobody joined when room is needed)."""
    if base == 0 and under_cap:
        if state.active or (not state.over and produced <= head):
            return 0
    elif state.active:
        state.stop()
    return consumed


class Linger:
    """A complete blob with no reader left, kept joinable a moment (``linger_left``), then let go."""

    def __init__(self, left: Callable[[float], float], expire: Callable[[], None]) -> None:
        self.active = False
        self._left = left  # seconds still to keep it, at a given time
        self._expire = expire
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        self.active = True
        self._check()

    def end(self) -> None:
        """A client came, or the window was freed: no longer lingering."""
        self.active = False
        if self._timer is not None:
            self._timer.cancel()

    def _check(self) -> None:
        # Checked again when the time comes: a client that came meanwhile moved the end on.
        if not self.active:
            return
        loop = asyncio.get_running_loop()
        left = self._left(loop.time())
        if left <= 0:
            self._expire()
            return
        self._timer = loop.call_later(left, self._check)
