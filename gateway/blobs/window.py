"""The bytes a shared fetch keeps, and the hash states that let a reader go on alone from inside them.

``Window`` is the store: chunks in arrival order from ``base`` to ``produced``, handed to readers
as the same objects (no copy in the common case), dropped from the front. ``HashMarks`` keeps
the fetch's hash state at batch boundaries (``StreamHasher(marks=True)``) for the bytes still in
the window: the hash of any prefix the window can reach, and a detached reader's ``Resume``.
"""

from __future__ import annotations

import bisect
import hashlib

from gateway.blobs.digest import StreamHasher
from gateway.blobs.terms import COMPACT_AFTER, Resume
from gateway.http.util import Chunk


class Window:
    """Chunks from ``base`` (the first byte kept) to ``produced`` (one past the last byte read)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._chunks: list[Chunk] = []
        self._first = 0  # index in the lists of the window's first chunk
        self.base = 0
        self.produced = 0
        self.chunks = 0  # chunks in (or through) the window

    @property
    def has_bytes(self) -> bool:
        return bool(self._chunks)

    @property
    def held(self) -> int:
        """The bytes it holds now (what the board counts against its cap)."""
        return self.produced - self.base if self._chunks else 0

    def append(self, chunk: Chunk) -> None:
        self._starts.append(self.produced)
        self._chunks.append(chunk)
        self.chunks += 1
        self.produced += len(chunk)

    def piece(self, position: int, end: int) -> Chunk:
        """The bytes from ``position`` (inside the window) to the end of its chunk, or to ``end``."""
        index = bisect.bisect_right(self._starts, position, self._first) - 1
        start = self._starts[index]
        chunk = self._chunks[index]
        stop = start + len(chunk)
        if position == start and stop <= end:
            return chunk  # the common case: the same object for every reader, no copy
        return chunk[position - start : min(stop, end) - start]

    def pieces(self, start: int, end: int) -> list[Chunk]:
        """The window's bytes from ``start`` to ``end`` (both inside it), as the chunks hold them."""
        pieces = []
        while start < end:
            piece = self.piece(start, end)
            pieces.append(piece)
            start += len(piece)
        return pieces

    def drop_to(self, target: int) -> int:
        """Drop the whole chunks below ``target``; returns the bytes dropped."""
        dropped = 0
        while self._first < len(self._chunks) and self._starts[self._first] + len(self._chunks[self._first]) <= target:
            dropped += len(self._chunks[self._first])
            self._chunks[self._first] = b""  # freed now, not at the next compaction
            self._first += 1
        if dropped:
            self.base = self._starts[self._first] if self._first < len(self._starts) else self.produced
        if self._first >= COMPACT_AFTER:
            del self._starts[: self._first]
            del self._chunks[: self._first]
            self._first = 0
        return dropped

    def clear(self) -> None:
        """Drop everything: the window is empty at ``produced``."""
        self._starts.clear()
        self._chunks.clear()
        self._first = 0
        self.base = self.produced


class HashMarks:
    """The fetch's hasher, and its marks over the window's bytes."""

    def __init__(self, hasher: StreamHasher, window: Window) -> None:
        self.hasher = hasher
        self._window = window

    def below(self, offset: int) -> tuple[int, hashlib._Hash] | None:
        """The latest hash mark at or below ``offset`` whose bytes after it the window still has."""
        self.hasher.collect()
        marks = self.hasher.marks
        assert marks is not None
        below = bisect.bisect_right(marks, offset, key=lambda m: m[0]) - 1
        return marks[below] if below >= 0 and marks[below][0] >= self._window.base else None

    def floor(self, limit: int) -> int | None:
        """Where the window may be cut at or below ``limit``: only down to a mark, since a reader
        detached later needs the hash state at a mark at or below its offset, and the bytes from
        there on; None: nowhere above its base."""
        mark = self.below(limit)
        if mark is None or mark[0] <= self._window.base:
            return None
        return mark[0]

    def digest_at(self, position: int) -> str | None:
        """The hash of the blob's first ``position`` bytes, from a mark and the window after it."""
        mark = self.below(position)
        if mark is None:
            return None
        offset, state = mark
        state = state.copy()
        for piece in self._window.pieces(offset, position):
            state.update(piece)
        return state.hexdigest()

    def resume(self, resume: Resume) -> None:
        """Give a reader going on alone at ``resume.position`` the hash state and bytes it continues."""
        mark = self.below(resume.position)
        assert mark is not None  # the window never drops the bytes after the mark below a reader
        offset, state = mark
        resume.hasher = StreamHasher(self.hasher.algorithm, state=state.copy(), fed=offset)
        resume.prefix = self._window.pieces(offset, resume.position)

    def trim(self) -> None:
        """Forget the marks the window no longer reaches, but the last one at or below its base."""
        marks = self.hasher.marks
        if marks is not None:
            keep = bisect.bisect_right(marks, self._window.base, key=lambda m: m[0]) - 1
            if keep > 0:
                del marks[:keep]
