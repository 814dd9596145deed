"""Every byte of a blob checked against its digest while it streams, off the event loop.

A blob is addressed by its digest (distribution-spec "Pulling blobs"; image-spec
"Digests"), so the gateway can tell a wrong byte from an upstream or mirror before the
client has the whole blob: each full body (a 200 to a GET by digest) is hashed as it
passes and **the last chunk is held back until the digest matches**. On a mismatch the
client's connection is aborted (``DigestMismatch`` ends the stream as a broken upstream
does), so a client never sees a clean end of wrong bytes, and its retry can go elsewhere.

Hashing must not stall the event loop: hashlib releases the GIL for buffers over 2 KiB,
so batches of about ``HASH_BATCH`` bytes are hashed by a small thread pool, one batch in
flight per stream (a hash is sequential), pipelined with the relay. When the hashing falls
``MAX_HASH_LAG`` behind, the relay waits for it: memory stays bounded per stream.

Algorithms: sha256 and sha512 (the registered ones); a digest of another algorithm is
relayed unverified, and said so (``algorithm_of`` returns None).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

HASH_BATCH = 512 << 10
MAX_HASH_LAG = 1 << 20
_ALGORITHMS = {"sha256": "sha256", "sha512": "sha512"}


class DigestMismatch(Exception):
    """The bytes of a blob do not hash to the digest it was asked by."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"the blob's bytes hash to {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


def algorithm_of(digest: str) -> str | None:
    """The hashlib name for a digest's algorithm, or None when the gateway cannot verify it."""
    algorithm, sep, _ = digest.partition(":")
    return _ALGORITHMS.get(algorithm) if sep else None


@functools.cache
def _pool() -> ThreadPoolExecutor:
    # Two threads: the machines this runs on have a few cores, and one of them relays.
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="digest")


def _update(hasher: hashlib._Hash, chunks: list[bytes]) -> None:
    # One update of the joined batch, not one per chunk: each update releases and takes back
    # the GIL, and every hand-over costs the relay's thread a wait (measured: a third more CPU).
    hasher.update(chunks[0] if len(chunks) == 1 else b"".join(chunks))


class StreamHasher:
    """A running hash fed chunk by chunk; the hashing happens in the pool, one batch at a time."""

    def __init__(self, algorithm: str) -> None:
        self._hasher = hashlib.new(algorithm)
        self._algorithm = algorithm
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._job: asyncio.Future[None] | None = None

    async def feed(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes < HASH_BATCH:
            return
        if self._job is not None and not self._job.done():
            if self._pending_bytes < MAX_HASH_LAG:
                return  # the pool is busy with the last batch: this one grows meanwhile
            await self._job
        self._submit()

    def _submit(self) -> None:
        if self._job is not None:
            self._job.result()  # a failure in the pool surfaces here
        loop = asyncio.get_running_loop()
        self._job = loop.run_in_executor(_pool(), _update, self._hasher, self._pending)
        self._pending = []
        self._pending_bytes = 0

    async def hexdigest(self) -> str:
        """The digest of everything fed, ``algorithm:hex``."""
        if self._job is not None:
            await self._job
        if self._pending:
            self._submit()
            assert self._job is not None
            await self._job
        return f"{self._algorithm}:{self._hasher.hexdigest()}"

    async def aclose(self) -> None:
        """Let a batch in flight finish (its thread holds the hasher), so nothing is left running."""
        if self._job is not None and not self._job.done():
            await asyncio.shield(self._job)


class Verdict:
    """What the check of one body found: the digest the bytes hashed to, once they all came."""

    __slots__ = ("actual",)

    def __init__(self) -> None:
        self.actual: str | None = None


async def verified(
    chunks: AsyncIterator[bytes], digest: str, algorithm: str, verdict: Verdict | None = None
) -> AsyncIterator[bytes]:
    """``chunks`` as they come, but the last one only once they all hash to ``digest``.

    Raises DigestMismatch instead of yielding the last chunk when they do not; ``verdict``
    records the digest they hashed to.
    """
    hasher = StreamHasher(algorithm)
    held: bytes | None = None
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            await hasher.feed(chunk)
            if held is not None:
                yield held
            held = chunk
        actual = await hasher.hexdigest()
    finally:
        await hasher.aclose()
    if verdict is not None:
        verdict.actual = actual
    if actual != digest:
        raise DigestMismatch(digest, actual)
    if held is not None:
        yield held
