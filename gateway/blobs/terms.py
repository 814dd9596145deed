"""The shared fetch's vocabulary: its key, its tuning constants, and what a reader that goes on alone gets.

Imported by every part of the shared fetch (``fetch.py``, ``window.py``, ``pace.py``, ``hold.py``,
``merge.py``) and re-exported by ``herd.py``, the face the relay sees.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.blobs.digest import StreamHasher
from gateway.http.util import Chunk

# (route, upstream repository, digest). The repository is part of the key: a registry serves
# a blob only under a repository that holds it (distribution-spec "Pulling blobs"), and a
# private repository's blob must not reach a client that asked under another name.
Key = tuple[str, str, str]

# How far the fetch reads ahead of its fastest reader: enough to hide an upstream read's
# latency, small beside the window.
READAHEAD = 4 << 20
# Compact the window's lists once this many chunks have left them.
COMPACT_AFTER = 512
# Bytes that every reader has had are kept this long behind the slowest one (the board's
# default): a range that starts a moment back is served from them, and a younger fetch that
# catches up merges into them (``merge.py``). The first bytes are kept apart from this (``HEAD``).
RETAIN = 8 << 20
# What a fetch keeps of a blob's first bytes before a second client came (at most a window):
# at 100 MB/s the first third of a second, so that the next client of a rollout that starts
# one node at a time still finds byte 0 and the fetch starts gathering (``hold.py``).
HEAD = 32 << 20
# How long in all a fetch's readers wait for latecomers (the board's default;
# GATEWAY_SHARED_PATIENCE_SECONDS): while it holds its head for clients that keep coming
# (``hold.py``) and while younger fetches catch up with it (``merge.py``); after that it goes on
# regardless. And how long a catch-up may make no progress before the wait ends.
PATIENCE = 15.0
MERGE_STALL = 2.0
# A complete blob still whole in memory when its last reader left (one under ``HEAD``, or under
# a window once a second client came) stays joinable until, since its end and its latest client,
# this long has passed, or as long as its fetch took if that was longer, and at most the patience
# after its end (``hold.linger_left``): the next node of a rollout reads it from memory. Nobody
# waits for it; it is the first memory given back when a new fetch needs room (``Board.has_room``).
LINGER = 1.0
# Herd pacing (``pace.py``): when the fetch spent more than this share of a period waiting for its
# slowest reader, that reader is let go (it falls out of the window and goes on alone), if it is in
# the slowest eighth of the herd.
PACE_PERIOD = 0.25
PACE_SHARE = 0.5


class FetchBroken(Exception):
    """The shared upstream body ended before its last byte (after any resumes)."""


@dataclass(slots=True)
class Resume:
    """Where a detached reader goes on alone, and the hash state its own bytes continue."""

    position: int
    reason: str  # "slow" (fell a window behind) or "upstream_broke" (the shared body broke)
    # A hash over the blob's first ``position`` bytes, or None when the fetch does not check.
    hasher: StreamHasher | None = None
    # The bytes between the hash's mark and ``position`` (already sent), to be fed to ``hasher``.
    prefix: list[Chunk] = field(default_factory=list)


Continue = Callable[[Resume], AsyncIterator[Chunk]]


def permit_key(authorization: str, route: str, repository: str) -> tuple[str, str, str]:
    """What a passthrough client's proven access is remembered by (never the token itself)."""
    return (hashlib.sha256(authorization.encode()).hexdigest(), route, repository)
