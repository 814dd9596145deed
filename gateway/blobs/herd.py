"""Herd-proof pulls: one upstream fetch of a blob feeds every concurrent pull of it, in bounded memory.

A fleet pulls the same layers at the same moment. The first full GET of a blob (the
*leader*) opens the upstream as usual; while its body streams, every other full GET of the
same blob of the same route and repository (a *joiner*) reads the same bytes from a
**window** of the most recent bytes instead of opening its own upstream request. Each
reader goes at its own pace:

- the fetch reads upstream as fast as its fastest reader asks (at most ``READAHEAD`` ahead
  of it), but no further than the window lets the herd follow, unless its slowest reader holds
  most of the herd back; then that one is let go (``pace.py``);
- the window holds the bytes between the slowest reader and the fastest (plus a short tail,
  ``retain``), at most ``window`` bytes; a reader that falls so far behind that its next bytes
  would leave the window is **detached**: it goes on alone with its own upstream request
  (``Range: bytes=<offset>-``), so one slow client never holds back the others and never makes
  the gateway buffer without bound;
- a board-wide cap on all windows (``memory``) turns sharing off for new fetches once reached,
  and shrinks the windows of those that pass it.

Every byte is hashed once, by the fetch (``digest.py``, in ``produce.py``); the last chunk enters the window
only once the digest matched, so no reader sees a clean end of wrong bytes. The hash state
is kept at batch boundaries (marks), and the window never drops the bytes after the latest
mark below a reader: a detached reader takes that state and the bytes from the mark to its
offset, and checks its own rest against the same digest.

A fetch keeps its first bytes (``HEAD``) until a second client comes; once one came it keeps
its first window and, once it has read that, holds (``hold.py``) while clients keep coming: a
rollout that starts its nodes over seconds joins from byte 0. A full GET that arrives after
the window no longer holds the first byte starts a younger fetch that later arrivals join; the
older one waits while the younger catches up, then the younger hands its readers over and
closes (``merge.py``): a late client costs the bytes it missed, not a second fetch
(``docs/performance.md`` measures staggered starts). Shared fetches are per process;
``docs/deploy.md`` says how replicas behind nginx
or ingress-nginx meet in one process per blob.

This module is the mechanism only: no HTTP, no routes. The relay (``relay/blobs.py``) decides who
may join and supplies a detached reader's own continuation.

This module is the face the relay and the composition root see; the parts live beside it:
``fetch.py`` (the fetch and its readers), ``board.py``, ``window.py`` (the bytes and hash marks),
``produce.py`` (reading and hashing the body), ``pace.py``, ``hold.py`` (gathering, lingering),
``merge.py`` (generations of one blob), ``terms.py`` (the key, the constants, ``Resume``).
"""

from __future__ import annotations

from gateway.blobs.board import Board
from gateway.blobs.fetch import Reader, SharedFetch
from gateway.blobs.terms import (
    HEAD,
    LINGER,
    MERGE_STALL,
    PACE_PERIOD,
    PACE_SHARE,
    PATIENCE,
    READAHEAD,
    RETAIN,
    Continue,
    FetchBroken,
    Key,
    Resume,
    permit_key,
)

__all__ = [
    "HEAD",
    "LINGER",
    "MERGE_STALL",
    "PACE_PERIOD",
    "PACE_SHARE",
    "PATIENCE",
    "READAHEAD",
    "RETAIN",
    "Board",
    "Continue",
    "FetchBroken",
    "Key",
    "Reader",
    "Resume",
    "SharedFetch",
    "permit_key",
]
