"""Every byte of a blob checked against its digest while it streams, off the event loop.

A blob is addressed by its digest (distribution-spec "Pulling blobs"; image-spec
"Digests"), so the gateway can tell a wrong byte from an upstream or mirror before the
client has the whole blob: each full body (a 200 to a GET by digest) is hashed as it
passes and **the last chunk is held back until the digest matches**. On a mismatch the
client's connection is aborted (``DigestMismatch`` ends the stream as a broken upstream
does), so a client never sees a clean end of wrong bytes, and its retry can go elsewhere.

Hashing must not stall the event loop: hashlib releases the GIL for buffers over 2 KiB,
so batches of about ``HASH_BATCH`` bytes are hashed by a small thread pool, one batch in
flight per stream (a hash is sequential), pipelined with the relay; each chunk of a batch is
hashed where it lies, small ones joined first. When the hashing falls two batches behind (one
while many streams hash), the relay waits for it: memory stays bounded per stream.

Algorithms: sha256 and sha512 (the registered ones); a digest of another algorithm is
relayed unverified, and said so (``algorithm_of`` returns None).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from gateway.http.util import Chunk

# A batch of 2 MiB, and while one is hashed the next two fill (``hash_lags``) before the relay
# waits for the hash: with the connection's 1 MiB reads, 1 MiB batches and a lag of one made the
# relay wait for nearly every read. Measured alone, each was faster for a lone verified pull (the
# lag 747 -> 832 MB/s, 2 MiB batches 803 -> 931 MB/s; docs/performance.md): the relay waits less
# often. (The context switches stay: they come with each chunk's ``update``, whose thread takes
# the GIL back from the event loop, not with the batches.) So a lone stream holds up to three
# batches not yet hashed. While CROWD or more streams hash at once, their batches are
# CROWDED_BATCH and the lag one batch: 16 checked streams then peak under 100 MiB, for about
# 0.1 CPU s/GiB more hand-overs. Chunks of IN_PLACE or more are hashed where they lie.
HASH_BATCH = 2 << 20
CROWDED_BATCH = 512 << 10
CROWD = 4
IN_PLACE = 64 << 10
# A shared fetch's hash marks (where a detached reader or a merge can take the hash state) come
# about this often whatever the batch: the window is dropped only to a mark (``HashMarks``).
MARK_EVERY = 1 << 20
# A checked blob of at most this many bytes (configs, small layers) reaches no client before its
# digest matched: none of a wrong copy's bytes go out, so the next source can be asked for it
# instead of cutting the client (``relay/integrity.py``). Otherwise whether the first bytes went
# out would depend on how the socket's reads split the body. At most this much held per stream.
HELD_WHOLE = 1 << 20
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


# The hashers of this process with bytes fed and no digest yet: how many streams hash at once
# (weak: a hasher dropped without ``aclose``, a detached reader's that never ran, counts no longer).
_hashing: weakref.WeakSet[StreamHasher] = weakref.WeakSet()


def batch_bytes(streams: int) -> int:
    """The batch handed to the pool while ``streams`` streams hash at once."""
    return HASH_BATCH if streams < CROWD else CROWDED_BATCH


def hash_lags(pending: int, streams: int) -> bool:
    """Whether a stream with ``pending`` bytes not yet handed to the pool, and a batch still in it,
    must wait for the hash: at two batches below a crowd of ``streams``, at one in a crowd."""
    return pending >= batch_bytes(streams) * (2 if streams < CROWD else 1)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    # Two threads: the machines this runs on have a few cores, and one of them relays.
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="digest")


def _update(hasher: hashlib._Hash, chunks: list[Chunk], start: int | None) -> list[tuple[int, hashlib._Hash]]:
    # A large chunk is hashed where it lies (no copy): joining a batch of 256 KiB reads cost a
    # memcpy of every byte for nothing (docs/performance.md). Small chunks (a TLS record, a slow
    # link) are joined first: each update releases and takes back the GIL, and every hand-over
    # costs the relay's thread a wait.
    # With ``start`` (the offset the batch begins at), the states after about every MARK_EVERY
    # bytes and at the batch's end, for a reader of a shared fetch that goes on alone from there
    # (``blobs/herd.py``); copied in this thread, before the next batch can change the hasher.
    marks: list[tuple[int, hashlib._Hash]] = []
    small: list[Chunk] = []
    offset = last = start or 0
    for chunk in chunks:
        if len(chunk) >= IN_PLACE:
            if small:
                hasher.update(small[0] if len(small) == 1 else b"".join(small))
                small = []
            hasher.update(chunk)
        else:
            small.append(chunk)
        offset += len(chunk)
        if start is not None and not small and offset - last >= MARK_EVERY:
            marks.append((offset, hasher.copy()))
            last = offset
    if small:
        hasher.update(small[0] if len(small) == 1 else b"".join(small))
    if start is not None and last != offset:
        marks.append((offset, hasher.copy()))
    return marks


class StreamHasher:
    """A running hash fed chunk by chunk; the hashing happens in the pool, one batch at a time.

    ``state`` and ``fed`` continue a hash already over ``fed`` bytes. With ``marks`` the state
    about every ``MARK_EVERY`` bytes and after each batch is kept as ``(offset, state)`` (collected
    as batches finish): a shared fetch hands one to a reader that leaves it, so that reader's own
    bytes are checked too.
    """

    def __init__(
        self, algorithm: str, *, state: hashlib._Hash | None = None, fed: int = 0, marks: bool = False
    ) -> None:
        self._hasher = state if state is not None else hashlib.new(algorithm)
        self._algorithm = algorithm
        self._pending: list[Chunk] = []
        self._pending_bytes = 0
        self._job: asyncio.Future[list[tuple[int, hashlib._Hash]]] | None = None
        self._fed = fed  # bytes handed to the pool so far
        self.marks: list[tuple[int, hashlib._Hash]] | None = [(fed, self._hasher.copy())] if marks else None

    @property
    def algorithm(self) -> str:
        return self._algorithm

    async def feed(self, chunk: Chunk) -> None:
        if not self._pending:
            _hashing.add(self)
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        streams = len(_hashing)
        if self._pending_bytes < batch_bytes(streams):
            return
        if self._job is not None and not self._job.done():
            if not hash_lags(self._pending_bytes, streams):
                return  # the pool is busy with the last batch: the next fills on meanwhile
            await self._job  # the hash fell behind by all a stream may hold: the relay waits
        self._submit()

    def collect(self) -> None:
        """Take in the result of a finished batch (a failure in the pool surfaces here)."""
        job = self._job
        if job is None or not job.done():
            return
        self._job = None
        marks = job.result()
        if self.marks is not None:
            self.marks.extend(marks)

    def _submit(self) -> None:
        self.collect()
        loop = asyncio.get_running_loop()
        start = self._fed if self.marks is not None else None
        self._fed += self._pending_bytes
        self._job = loop.run_in_executor(_pool(), _update, self._hasher, self._pending, start)
        self._pending = []
        self._pending_bytes = 0

    async def settle(self) -> None:
        """Let the batch in flight finish and take in its mark (the bytes not yet batched wait)."""
        if self._job is not None:
            await asyncio.shield(self._job)
        self.collect()

    async def hexdigest(self) -> str:
        """The digest of everything fed, ``algorithm:hex``."""
        if self._job is not None:
            await self._job
        if self._pending:
            self._submit()
            assert self._job is not None
            await self._job
        self.collect()
        _hashing.discard(self)
        return f"{self._algorithm}:{self._hasher.hexdigest()}"

    async def aclose(self) -> None:
        """Let a batch in flight finish (its thread holds the hasher), so nothing is left running."""
        _hashing.discard(self)
        if self._job is not None and not self._job.done():
            await asyncio.shield(self._job)


class Verdict:
    """What the check of one body found: the digest the bytes hashed to, once they all came."""

    __slots__ = ("actual",)

    def __init__(self) -> None:
        self.actual: str | None = None


async def verified(
    chunks: AsyncIterator[Chunk],
    digest: str,
    algorithm: str,
    verdict: Verdict | None = None,
    hasher: StreamHasher | None = None,
    *,
    whole: bool = False,
) -> AsyncIterator[Chunk]:
    """``chunks`` as they come, but the last one (all of them, ``whole``: a blob of at most
    ``HELD_WHOLE`` bytes) only once they all hash to ``digest``.

    Raises DigestMismatch instead of yielding the held chunks when they do not; ``verdict``
    records the digest they hashed to. ``hasher`` continues a hash of the bytes before these.
    """
    hasher = hasher if hasher is not None else StreamHasher(algorithm)
    held: list[Chunk] = []
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            await hasher.feed(chunk)
            if held and not whole:
                yield held.pop()
            held.append(chunk)
        actual = await hasher.hexdigest()
    finally:
        await hasher.aclose()
    if verdict is not None:
        verdict.actual = actual
    if actual != digest:
        raise DigestMismatch(digest, actual)
    for chunk in held:
        yield chunk
