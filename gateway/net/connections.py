"""Upstream connections for the lean transport: one socket's receive side, and the keep-alive pool.

``_Connection`` is the ``asyncio.BufferedProtocol`` of one upstream connection: the event loop
reads straight into an arena of its own, and each read is queued as a ``memoryview`` of it, with
back-pressure (reading pauses while more than ``HIGH_WATER`` bytes wait for the client, so a slow
client never makes the gateway buffer a blob). ``_Pool`` keeps idle keep-alive connections per
origin and caps open ones. Both know nothing of HTTP: ``transport.py`` parses what they deliver.
"""

from __future__ import annotations

import asyncio
import collections
import time
import typing
import weakref

from gateway.http.util import Chunk
from gateway.routing.policy import Origin

# Reading pauses when this much received body waits for the client; resumes below LOW_WATER.
# 512 KiB: two crowded reads (ARENA_CROWDED), and less than one lone 1 MiB read, after which
# reading pauses until the relay took it (the socket's receive buffer holds more meanwhile); 16
# checked streams peaked 10 MiB lower than with 1 MiB, at the same CPU (docs/performance.md).
HIGH_WATER = 512 << 10
LOW_WATER = 128 << 10

# The arena: with a plain Protocol, uvloop reads into its own 256 KiB buffer and copies every read
# into a new ``bytes``; read into a buffer of ours (``get_buffer``/``buffer_updated``), a read is
# handed on as a slice of it, not copied, and a lone blob's body comes 1 MiB a read instead of
# 256 KiB: a quarter of the chunks, so of the event loop's Python per chunk (docs/performance.md,
# "The arena"). An arena serves reads until less than a quarter of it is left, so a slice, which
# keeps its arena alive, holds at most that much unused. Arenas start small (a manifest's
# connection never needs more) and double when a read fills all that was offered (the socket had
# more), up to ARENA_MAX, or ARENA_CROWDED while CROWD or more connections read that fast: each
# holds about two reads, and 16 checked streams of 1 MiB reads peaked at 127 MiB, not 88.
ARENA_MIN = 64 << 10
ARENA_MAX = 1 << 20
ARENA_CROWDED = 256 << 10
CROWD = 4

# The connections of this process whose arenas grew past ARENA_MIN (weak: a connection dropped
# without ``rest`` or ``connection_lost`` counts no longer).
_fast: weakref.WeakSet[_Connection] = weakref.WeakSet()


def arena_cap(fast: int) -> int:
    """The largest arena while ``fast`` connections read at full speed."""
    return ARENA_MAX if fast < CROWD else ARENA_CROWDED


class _Connection(asyncio.BufferedProtocol):
    """One upstream connection: parses a response head, then queues body bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: Exception | None = None
        self._buffer: collections.deque[Chunk] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        self._arena = memoryview(b"")
        self._offset = 0
        self._arena_size = ARENA_MIN

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = typing.cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._arena) - self._offset < self._arena_size >> 2:
            self._arena_size = min(self._arena_size, arena_cap(len(_fast)))
            # bytearray zeroes its memory: about 0.05 s/GiB, against the 0.1-0.2 of copying each read
            self._arena = memoryview(bytearray(self._arena_size))
            self._offset = 0
        return self._arena[self._offset :]

    def buffer_updated(self, nbytes: int) -> None:
        start = self._offset
        self._offset = end = start + nbytes
        if end == len(self._arena) and self._arena_size < arena_cap(len(_fast)):
            self._arena_size <<= 1  # the read took all it was offered: the next arena is larger
            _fast.add(self)
        self._received(self._arena[start:end])

    def rest(self) -> None:
        """Idle in the pool: a large arena is let go (its slices stay valid), the next starts small."""
        _fast.discard(self)
        if self._arena_size > ARENA_MIN:
            self._arena = memoryview(b"")
            self._offset = 0
            self._arena_size = ARENA_MIN

    def _received(self, data: Chunk) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        _fast.discard(self)
        if exc is not None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- reading, for the response parser ---

    async def receive(self, timeout: float | None) -> Chunk:
        """The next bytes that arrived; b"" once the peer closed and nothing is left."""
        if not self._buffer:
            if self.closed:
                return b""
            self._waiter = self.loop.create_future()
            try:
                if timeout is None:
                    await self._waiter
                else:
                    async with asyncio.timeout(timeout):
                        await self._waiter
            finally:
                self._waiter = None
            if not self._buffer:
                return b""
        data = self._buffer.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def unread(self, data: Chunk) -> None:
        if data:
            self._buffer.appendleft(data)
            self._buffered += len(data)

    def reusable(self) -> bool:
        return not self.closed and not self._buffer and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Idle keep-alive connections per origin, and a cap on open connections."""

    def __init__(self, max_connections: int, max_keepalive: int, keepalive_expiry: float) -> None:
        self.slots = asyncio.Semaphore(max_connections)
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self.idle: dict[Origin, list[_Connection]] = {}
        self.idle_count = 0

    def take_idle(self, origin: Origin) -> _Connection | None:
        conns = self.idle.get(origin)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            self.idle_count -= 1
            if conn.reusable() and now - conn.idle_since < self.keepalive_expiry:
                return conn
            conn.close()
        return None

    def give_back(self, origin: Origin, conn: _Connection) -> None:
        if self.idle_count >= self.max_keepalive or not conn.reusable():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.rest()
        self.idle.setdefault(origin, []).append(conn)
        self.idle_count += 1

    def close_all(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
        self.idle_count = 0
