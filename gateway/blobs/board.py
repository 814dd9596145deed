"""The shared fetches of one process, by key, and the memory their windows may use.

The relay asks the board for the fetch of a blob already under way (``current``) or starts one
(``lead``); the board links a new fetch to an older one still streaming (``merge.py``), counts
the bytes all windows hold against its cap, and gives back what is kept only for latecomers when
a new fetch needs room.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.blobs.fetch import SharedFetch
from gateway.blobs.terms import HEAD, PATIENCE, READAHEAD, RETAIN, Key


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
        self.lingering: dict[SharedFetch, None] = {}  # complete blobs kept a moment, oldest first
        self.held = 0  # bytes in all windows now (the gauge)

    @property
    def window_now(self) -> int:
        """The window, or under memory pressure (all windows past the cap) a short one: readers that
        lag more go on alone, and the memory goes back."""
        if self.held <= self.memory:
            return self.window
        return min(self.window, self.retain + READAHEAD)

    @property
    def enabled(self) -> bool:
        return self.window > 0 and self.memory > 0

    def current(self, key: Key) -> SharedFetch | None:
        """The newest fetch of ``key``: being opened (``ready`` not set) or streaming."""
        return self._fetches.get(key)

    def fetches(self) -> list[SharedFetch]:
        """The newest fetch of every key under way (the status page lists them)."""
        return list(self._fetches.values())

    def lead(self, key: Key) -> SharedFetch:
        """A new fetch of ``key`` that the caller opens; later requests find it (and wait for it).

        When an older fetch of the key is still streaming (its window no longer holds the first
        byte), the new one catches up with it and merges (``merge.Lineage``)."""
        fetch = SharedFetch(self, key)
        current = self._fetches.get(key)
        if current is not None and current.running and current.lineage.younger is None:
            fetch.lineage.link(fetch, current)
        self._fetches[key] = fetch
        return fetch

    def replace(self, merged: SharedFetch, older: SharedFetch) -> None:
        if self._fetches.get(merged.key) is merged:
            self._fetches[merged.key] = older

    def merged(self, fetch: SharedFetch) -> None:
        self.merges += 1
        if self._on_merge is not None:
            self._on_merge(fetch.key)

    def waited(self, fetch: SharedFetch, seconds: float) -> None:
        if self._on_wait is not None:
            self._on_wait(fetch.key, seconds)

    def has_room(self, size: int) -> bool:
        """Whether a new fetch of a ``size``-byte blob may be shared: the windows' bytes now, plus
        what it holds at first, stay under the cap (else it is relayed alone). What is kept only for
        latecomers (lingering blobs, heads nobody joined) is given back first to make room. Windows
        that grow past the cap shrink (``window_now``)."""
        need = min(size, self.retain + READAHEAD)
        if self.held + need > self.memory:
            self._make_room(need)
        return self.held + need <= self.memory

    def _make_room(self, need: int) -> None:
        """Give back what is kept only in case more clients come: complete blobs kept for latecomers
        (the oldest first), then the heads of fetches no second client has joined. A herd's window
        stays: its readers need it."""
        while self.lingering and self.held + need > self.memory:
            next(iter(self.lingering)).free()
        for fetch in list(self._fetches.values()):
            if self.held + need <= self.memory:
                return
            fetch.drop_head()

    def forget(self, fetch: SharedFetch) -> None:
        if self._fetches.get(fetch.key) is fetch:
            del self._fetches[fetch.key]

    def release(self, fetch: SharedFetch) -> None:
        held = fetch.bytes.held
        if held:
            self.count_held(-held)

    def count_held(self, delta: int) -> None:
        self.held += delta
        if self._on_held is not None:
            self._on_held(delta)
