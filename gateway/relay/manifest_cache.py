"""A small in-memory cache of manifest answers, and one upstream request per manifest at a time.

Why: Docker Hub counts every manifest GET as a pull, and a cluster that rolls out one
image to 500 nodes asks for the same manifest 500 times within seconds; every one of
those also costs the upstream a token check. The research behind this project found
manifest caching in nearly every mirror (distribution, Harbor, rpardini's proxy,
crproxy, drayage), with tag lifetimes from one minute to hours.

What is cached, and for how long:
- answers by **digest** are immutable (the digest is the content): kept up to
  ``digest_ttl`` (one hour by default), bounded by memory;
- answers by **tag** can change when someone pushes: kept ``tag_ttl`` seconds (30 by
  default, 0 turns it off), so a new push is seen within that time;
- only 200 answers to GET (the body, and the headers a client may see) and to HEAD
  (headers only, which serve later HEADs); never errors, never ``Cache-Control:
  no-store``; never on routes that pass logins through (``auth = "passthrough"``),
  where what a client may read depends on who it is;
- the key holds the route, the upstream repository, the reference and the client's
  ``Accept`` header (normalised), because the answer depends on it.

Blobs are never cached: they are streamed, whatever their size.

Stale rather than fail: an entry past its lifetime is not dropped but kept as a stale
candidate for ``stale_if_error`` more seconds (a day by default; 0: dropped at once), as long
as memory allows (the same byte bound, least recently used first). When the upstream answers
429 or 5xx, or cannot be reached, the relay serves it (``stale``) with
``Warning: 110 - "Response is Stale"`` and ``hold``s it: for one more lifetime of its kind
the stale answer is served without asking the upstream again, so an outage costs the upstream
one request per manifest per tag lifetime, as a healthy upstream does. A digest is immutable:
its stale answer is as right as a fresh one. A HEAD that confirms a kept answer's digest
renews that answer, body included.

Concurrent misses for one key wait for the first one's answer (``Flight``), so a
thundering herd costs one upstream request.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

Headers = list[tuple[bytes, bytes]]
CacheKey = tuple[str, str, str, str]


def normalise_accept(accept: str | None) -> str:
    """The set of media types a client accepts, order and spacing ignored."""
    if not accept:
        return ""
    return ",".join(sorted({part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()}))


@dataclass(slots=True)
class Entry:
    headers: Headers  # lowercase names, Content-Length included
    body: bytes | None  # None: known from a HEAD, can answer HEADs only
    expires_at: float
    stale_until: float = 0.0  # a stale candidate until then (after expires_at)
    held_until: float = 0.0  # served stale without asking the upstream until then
    held_reason: str = ""  # why it is held: rate_limited, status_5xx, unreachable
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.body or b"") + sum(len(k) + len(v) for k, v in self.headers) + 200


class ManifestCache:
    def __init__(
        self,
        *,
        max_bytes: int = 64 << 20,
        tag_ttl: float = 30.0,
        digest_ttl: float = 3600.0,
        stale_if_error: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.tag_ttl = tag_ttl
        self.digest_ttl = digest_ttl
        self.stale_if_error = stale_if_error
        self._clock = clock
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self._bytes = 0
        self._flights: dict[CacheKey, asyncio.Future[None]] = {}

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def ttl_for(self, reference: str) -> float:
        return self.digest_ttl if ":" in reference else self.tag_ttl

    def get(self, key: CacheKey, *, head: bool) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            if now >= entry.stale_until:
                self._drop(key)
            return None  # kept as a stale candidate
        if entry.body is None and not head:
            return None
        self._entries.move_to_end(key)
        return entry

    def stale(self, key: CacheKey, *, head: bool) -> Entry | None:
        """The last good answer, fresh or not, while it may still be served when the upstream fails."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= max(entry.expires_at, entry.stale_until):
            self._drop(key)
            return None
        if entry.body is None and not head:
            return None
        self._entries.move_to_end(key)
        return entry

    def hold(self, key: CacheKey, reason: str) -> None:
        """The upstream just failed for ``key``: its stale answer stands for one more lifetime."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.held_until = self._clock() + self.ttl_for(key[2])
            entry.held_reason = reason

    def held(self, key: CacheKey, *, head: bool) -> Entry | None:
        """A stale answer that stands in for the failing upstream (``hold``), or None."""
        entry = self._entries.get(key)
        if entry is None or self._clock() >= entry.held_until:
            return None
        return self.stale(key, head=head)

    def put(self, key: CacheKey, headers: Headers, body: bytes | None) -> None:
        ttl = self.ttl_for(key[2])
        if ttl <= 0:
            return
        now = self._clock()
        old = self._entries.get(key)
        if body is None and old is not None and old.body is not None:
            if now < old.expires_at:
                return  # a HEAD does not replace a full answer that is still fresh
            if _digest_of(headers) is not None and _digest_of(headers) == _digest_of(old.headers):
                # The upstream confirms the kept answer: it is fresh again, body included.
                old.expires_at, old.stale_until, old.held_until = now + ttl, now + ttl + self.stale_if_error, 0.0
                self._entries.move_to_end(key)
                return
        entry = Entry(headers=headers, body=body, expires_at=now + ttl, stale_until=now + ttl + self.stale_if_error)
        if entry.size > self.max_bytes // 8:
            return  # one huge manifest must not flush everything else
        if old is not None:
            self._drop(key)
        self._entries[key] = entry
        self._bytes += entry.size
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    def flight(self, key: CacheKey) -> Flight:
        return Flight(self, key)


def _digest_of(headers: Headers) -> bytes | None:
    for name, value in headers:
        if name == b"docker-content-digest":
            return value
    return None


class Flight:
    """``async with cache.flight(key) as leader:`` — only the leader asks the upstream.

    Followers wait until the leader is done (whatever its outcome), then look in the
    cache again; if the leader's answer was not cacheable they ask upstream themselves.
    """

    def __init__(self, cache: ManifestCache, key: CacheKey) -> None:
        self.cache = cache
        self.key = key
        self.leader = False

    async def __aenter__(self) -> bool:
        flights = self.cache._flights
        waiting = flights.get(self.key)
        if waiting is not None:
            await asyncio.shield(waiting)
            return False
        flights[self.key] = asyncio.get_running_loop().create_future()
        self.leader = True
        return True

    async def __aexit__(self, *exc: object) -> None:
        if self.leader:
            done = self.cache._flights.pop(self.key)
            done.set_result(None)
