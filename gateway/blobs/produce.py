"""The fetch's reading step: an upstream body read into a shared fetch, every chunk hashed on the way.

The last chunk is held back until the digest matched, so no reader of the window ever sees a clean
end of wrong bytes (``blobs/digest.py`` hashes off the event loop; ``settle`` and the marks let a
detached reader or a merge take the hash state at a batch boundary).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from gateway.blobs.digest import DigestMismatch, StreamHasher
from gateway.blobs.terms import FetchBroken
from gateway.http.util import Chunk


class Sink(Protocol):
    """What the reading step needs of the fetch it fills."""

    total: int

    @property
    def produced(self) -> int: ...
    async def accept(self, piece: Chunk) -> bool: ...
    def append(self, chunk: Chunk) -> None: ...
    async def between_chunks(self) -> None: ...


class Producer:
    """Reads one upstream body into a sink, checked against ``digest`` when there is a hasher."""

    def __init__(self, hasher: StreamHasher | None, digest: str) -> None:
        self._hasher = hasher
        self._digest = digest
        self.actual: str | None = None  # the digest the bytes hashed to, once all came

    async def run(self, body: AsyncIterator[Chunk], sink: Sink) -> None:
        """Read the upstream body into the window, checked, never far ahead of the fastest reader."""
        hasher = self._hasher
        held: Chunk | None = None
        try:
            async for chunk in body:
                if not chunk:
                    continue
                piece: Chunk | None = chunk
                if hasher is not None:
                    await hasher.feed(chunk)
                    piece, held = held, chunk  # the one before goes in: the last waits for the digest
                if piece is not None and not await sink.accept(piece):
                    return  # merged: its readers read on from the older fetch
                await sink.between_chunks()
            if hasher is not None:
                self.actual = await hasher.hexdigest()
                if self.actual != self._digest:
                    raise DigestMismatch(self._digest, self.actual)
        finally:
            if hasher is not None:
                await hasher.aclose()
        if sink.produced + (len(held) if held else 0) != sink.total:
            raise FetchBroken(f"the upstream body ended at {sink.produced} of {sink.total} bytes")
        if held is not None:
            sink.append(held)  # the last chunk, only now that the digest matched
