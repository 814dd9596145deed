"""The shared fetch mechanism (``gateway/blobs/herd.py``) on its own: windows, detaches, checks, lifetimes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from gateway.blobs import herd, hold, pace
from gateway.blobs.digest import HASH_BATCH, DigestMismatch
from gateway.http.util import Chunk

CHUNK = 64 << 10


@pytest.fixture(autouse=True)
def quick_pacing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The herd lets a slow reader go after a period of waiting for it: a second is long beside
    # these blobs, read from memory in milliseconds.
    monkeypatch.setattr(pace, "PACE_PERIOD", 0.01)  # where the pace rule reads it


def blob(size: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(size))


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Upstream:
    """An upstream body: counts what was read, can pause at an offset, break, or flip a byte."""

    def __init__(
        self, data: bytes, *, break_at: int | None = None, flip_at: int | None = None, delay: float = 0.0
    ) -> None:
        self.data = bytearray(data)
        self.delay = delay  # seconds per chunk: a link of CHUNK / delay bytes per second
        if flip_at is not None:
            self.data[flip_at] ^= 0xFF
        self.break_at = break_at
        self.read = 0
        self.closed = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def body(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            await self.gate.wait()
            if self.break_at is not None and start >= self.break_at:
                raise ConnectionResetError("reset by the test")
            piece = bytes(self.data[start : start + CHUNK])
            self.read += len(piece)
            yield piece
            await asyncio.sleep(self.delay)

    def close(self) -> None:
        self.closed = True


async def drain(chunks: AsyncIterator[Chunk], *, pause: float = 0.0) -> bytes:
    out = bytearray()
    async for chunk in chunks:
        out += chunk
        if pause:
            await asyncio.sleep(pause)
    return bytes(out)


def no_own(resume: herd.Resume) -> AsyncIterator[bytes]:
    raise AssertionError(f"unexpected detach at {resume.position} ({resume.reason})")


def start(
    board: herd.Board, up: Upstream, data: bytes, *, verify: bool = True, detach_on_break: bool = False
) -> tuple[herd.SharedFetch, herd.Reader]:
    fetch = board.lead(("r", "repo", digest_of(data)))
    assert board.has_room(len(data))
    reader = fetch.start(
        [],
        len(data),
        up.body(),
        digest=digest_of(data),
        algorithm="sha256" if verify else None,
        detach_on_break=detach_on_break,
        close=up.close,
    )
    return fetch, reader


async def test_every_reader_gets_the_bytes_of_one_upstream_read() -> None:
    data = blob(3 << 20)
    board = herd.Board(window=8 << 20, memory=64 << 20, patience=0)  # (no lingering: see below)
    up = Upstream(data)
    fetch, first = start(board, up, data)
    readers = [first] + [fetch.join(0, len(data)) for _ in range(7)]
    results = await asyncio.gather(*(drain(fetch.read(r, no_own)) for r in readers))
    assert all(r == data for r in results)
    assert up.read == len(data)
    assert up.closed
    assert fetch.actual == digest_of(data)
    assert board.held == 0
    assert board.current(fetch.key) is None


async def test_a_reader_a_window_behind_is_detached_and_checks_its_own_rest() -> None:
    data = blob(6 << 20)
    window = 1 << 20
    board = herd.Board(window=window, memory=64 << 20)
    up = Upstream(data)
    fetch, fast = start(board, up, data)
    slow = fetch.join(0, len(data))
    seen: list[herd.Resume] = []

    async def own(resume: herd.Resume) -> AsyncIterator[bytes]:
        # What the relay does: its own request for the rest, checked from the handed-over state.
        seen.append(resume)
        assert resume.hasher is not None
        for piece in resume.prefix:
            await resume.hasher.feed(piece)
        await resume.hasher.feed(data[resume.position :])
        assert await resume.hasher.hexdigest() == digest_of(data)
        yield data[resume.position :]

    fast_bytes, slow_bytes = await asyncio.gather(
        drain(fetch.read(fast, no_own)), drain(fetch.read(slow, own), pause=0.002)
    )
    assert fast_bytes == data
    assert slow_bytes == data
    assert len(seen) == 1
    assert seen[0].reason == "slow"
    assert 0 < seen[0].position < len(data) - window
    assert up.read == len(data)  # the slow reader's rest came from its own request, not the fetch


async def test_the_window_stays_bounded_whatever_the_readers_do() -> None:
    data = blob(8 << 20)
    window = 1 << 20
    board = herd.Board(window=window, memory=64 << 20)
    peak = 0

    def held(delta: int) -> None:
        nonlocal peak
        peak = max(peak, board.held)

    board._on_held = held
    up = Upstream(data)
    fetch, fast = start(board, up, data)
    stuck = fetch.join(0, len(data))

    async def own(resume: herd.Resume) -> AsyncIterator[bytes]:
        yield data[resume.position :]

    async def never_reads() -> bytes:
        chunks = fetch.read(stuck, own)
        first = await anext(chunks)
        await asyncio.sleep(0.2)  # a client that stopped reading
        return bytes(first) + await drain(chunks)

    fast_bytes, stuck_bytes = await asyncio.gather(drain(fetch.read(fast, no_own)), never_reads())
    assert fast_bytes == data
    assert stuck_bytes == data
    # A window, plus the bytes since the hash's last mark (a batch in the pool and two filling,
    # ``digest.hash_lags``) and one chunk: never the blob.
    assert peak <= window + 3 * HASH_BATCH + CHUNK


async def test_wrong_bytes_reach_no_reader_whole() -> None:
    data = blob(2 << 20)
    board = herd.Board(window=8 << 20, memory=64 << 20)
    up = Upstream(data, flip_at=len(data) - 10)
    fetch, first = start(board, up, data)
    second = fetch.join(0, len(data))
    got: list[int] = []

    async def read(reader: herd.Reader) -> None:
        count = 0
        chunks = fetch.read(reader, no_own)
        while True:
            try:
                chunk = await anext(chunks)
            except DigestMismatch:
                break
            count += len(chunk)
        got.append(count)

    await asyncio.gather(read(first), read(second))
    assert all(count < len(data) for count in got)  # the last chunk was held back from both
    assert isinstance(fetch.error, DigestMismatch)
    assert board.current(fetch.key) is None  # not joinable any more


async def test_a_break_fails_every_reader_of_a_gateway_fetch() -> None:
    data = blob(2 << 20)
    board = herd.Board(window=8 << 20, memory=64 << 20)
    up = Upstream(data, break_at=1 << 20)
    fetch, first = start(board, up, data)
    second = fetch.join(0, len(data))
    for reader in (first, second):
        with pytest.raises(herd.FetchBroken):
            await drain(fetch.read(reader, no_own))


async def test_a_break_of_a_passthrough_fetch_sends_every_reader_on_alone() -> None:
    data = blob(2 << 20)
    board = herd.Board(window=8 << 20, memory=64 << 20)
    up = Upstream(data, break_at=1 << 20)
    fetch, first = start(board, up, data, detach_on_break=True)
    second = fetch.join(0, len(data))
    reasons: list[str] = []

    async def own(resume: herd.Resume) -> AsyncIterator[bytes]:
        reasons.append(resume.reason)
        yield data[resume.position :]

    results = await asyncio.gather(drain(fetch.read(first, own)), drain(fetch.read(second, own)))
    assert list(results) == [data, data]
    assert reasons == ["upstream_broke", "upstream_broke"]


async def test_the_last_reader_leaving_closes_the_upstream() -> None:
    data = blob(4 << 20)
    board = herd.Board(window=8 << 20, memory=64 << 20)
    up = Upstream(data)
    fetch, first = start(board, up, data)
    second = fetch.join(0, len(data))
    one = fetch.read(first, no_own)
    two = fetch.read(second, no_own)
    await anext(one)
    await anext(two)
    up.gate.clear()  # the upstream stalls mid-body
    await one.aclose()  # the leader goes away: the fetch goes on for the other
    assert not up.closed
    assert fetch.holds(0)
    await two.aclose()
    await asyncio.sleep(0.01)
    assert up.closed
    assert board.current(fetch.key) is None
    assert board.held == 0


async def test_a_joiner_starts_where_the_window_still_holds() -> None:
    data = blob(4 << 20)
    board = herd.Board(window=1 << 20, memory=64 << 20)
    up = Upstream(data)
    fetch, first = start(board, up, data, verify=False)
    chunks = fetch.read(first, no_own)
    got = bytearray()
    while len(got) < (3 << 20):
        got += await anext(chunks)
    assert not fetch.holds(0)  # the head left the window: a new client starts a new fetch
    assert fetch.holds(len(got) - 1000)
    tail = fetch.join(len(got) - 1000, len(got) + 5000)  # a range inside the window
    part = await drain(fetch.read(tail, no_own))
    assert part == data[len(got) - 1000 : len(got) + 5000]
    got += await drain(chunks)
    assert bytes(got) == data


async def test_a_joiner_at_the_window_edge_is_not_let_go_before_it_reads() -> None:
    # The client joins while the window still holds byte 0, a window behind the last byte read;
    # the next chunk comes before its task first runs (in CI both woke in one turn of the loop).
    data = blob(4 << 20)
    window = 1 << 20
    board = herd.Board(window=window, memory=64 << 20)
    up = Upstream(data)
    fetch, first = start(board, up, data, verify=False)  # (a checked window drops at hash marks only)
    chunks = fetch.read(first, no_own)
    got = bytearray()
    while len(got) < window:
        got += await anext(chunks)
    up.gate.clear()  # the next upstream chunk waits
    assert (fetch.produced, fetch.base) == (window, 0)
    assert fetch.holds(0)
    joiner = fetch.join(0, len(data))
    up.gate.set()
    while fetch.produced == window:  # the chunk that passes byte 0 out of the window
        await asyncio.sleep(0.001)
    late, rest = await asyncio.gather(drain(fetch.read(joiner, no_own)), drain(chunks))
    assert late == data
    assert bytes(got + rest) == data
    assert up.read == len(data)  # one upstream body for both
    assert fetch.detached == 0


async def test_the_memory_cap_turns_sharing_off_for_new_fetches() -> None:
    board = herd.Board(window=8 << 20, memory=32 << 20)
    assert board.has_room(100 << 20)
    board.count_held(30 << 20)  # the windows hold this much now
    assert not board.has_room(100 << 20)  # would pass the cap: relayed alone
    assert board.has_room(1 << 20)  # a small blob still fits


async def test_a_late_fetch_catches_up_with_an_older_one_and_hands_its_readers_over() -> None:
    data = blob(16 << 20)
    window = 1 << 20
    board = herd.Board(window=window, memory=64 << 20)
    merges: list[herd.Key] = []
    board._on_merge = merges.append
    first_up = Upstream(data)
    older, early = start(board, first_up, data)
    chunks = older.read(early, no_own)
    got = bytearray()
    # Past the window and the bytes the hash may not have reached (the window drops only to a mark).
    while len(got) < window + 3 * HASH_BATCH:
        got += await anext(chunks)
    assert not older.holds(0)  # a client coming now needs bytes the window no longer has
    late_up = Upstream(data)
    younger = board.lead(older.key)
    assert younger.lineage.older is older
    assert board.has_room(len(data))
    late = younger.start(
        [],
        len(data),
        late_up.body(),
        digest=digest_of(data),
        algorithm="sha256",
        detach_on_break=False,
        close=late_up.close,
    )
    early_rest, late_bytes = await asyncio.gather(drain(chunks), drain(younger.read(late, no_own)))
    assert bytes(got) + early_rest == data
    assert late_bytes == data
    assert merges == [older.key]
    assert late.fetch is older  # it read its last bytes from the older fetch
    # The late client's own upstream body stopped about where the older one had got to.
    assert late_up.read < len(got) + (2 << 20)
    assert late_up.closed
    assert first_up.read == len(data)
    assert board.held == 0


async def test_fetches_whose_first_bytes_differ_do_not_merge() -> None:
    data = blob(8 << 20)
    board = herd.Board(window=1 << 20, memory=64 << 20)
    older, early = start(board, Upstream(data), data)
    chunks = older.read(early, no_own)
    got = bytearray()
    while len(got) < (3 << 20):
        got += await anext(chunks)
    wrong = Upstream(data, flip_at=1000)  # a mirror with one wrong byte in the head
    younger = board.lead(older.key)
    assert board.has_room(len(data))
    late = younger.start([], len(data), wrong.body(), digest=digest_of(data), algorithm="sha256", detach_on_break=False)

    async def late_read() -> None:
        reader = younger.read(late, no_own)
        while True:
            try:
                await anext(reader)
            except DigestMismatch:
                return

    early_rest, _ = await asyncio.gather(drain(chunks), late_read())
    assert bytes(got) + early_rest == data  # the older fetch's readers are not harmed
    assert board.merges == 0
    assert late.fetch is younger


async def test_bytes_every_reader_has_had_leave_the_window() -> None:
    # One client pulling a big layer alone holds its head (the first bytes, for a second client)
    # and then a short tail: never a whole window.
    data = blob(24 << 20)
    board = herd.Board(window=64 << 20, memory=256 << 20, head=4 << 20)
    peak = 0

    def held(delta: int) -> None:
        nonlocal peak
        peak = max(peak, board.held)

    board._on_held = held
    fetch, only = start(board, Upstream(data), data)
    assert await drain(fetch.read(only, no_own)) == data
    assert peak <= herd.RETAIN + herd.READAHEAD + (2 << 20)


async def test_the_fastest_reader_waits_for_the_herd_not_for_the_slowest() -> None:
    # Most readers slower than the upstream (clients short of CPU): they stay on one body; only
    # the slowest eighth (at least one) may fall out of the window.
    data = blob(12 << 20)
    board = herd.Board(window=2 << 20, memory=64 << 20)
    up = Upstream(data)
    fetch, fast = start(board, up, data)
    herd_readers = [fetch.join(0, len(data)) for _ in range(6)]
    crawler = fetch.join(0, len(data))

    async def own(resume: herd.Resume) -> AsyncIterator[bytes]:
        assert resume.position < len(data)
        yield data[resume.position :]

    results = await asyncio.gather(
        drain(fetch.read(fast, no_own)),
        *(drain(fetch.read(r, no_own), pause=0.001) for r in herd_readers),
        drain(fetch.read(crawler, own), pause=0.02),
    )
    assert all(r == data for r in results)
    assert crawler.fetch is fetch
    assert up.read == len(data)  # one upstream body for the herd; the crawler went on alone


async def test_windows_past_the_memory_cap_shrink() -> None:
    data = blob(24 << 20)
    board = herd.Board(window=16 << 20, memory=6 << 20, retain=1 << 20)
    peak = 0

    def held(delta: int) -> None:
        nonlocal peak
        peak = max(peak, board.held)

    board._on_held = held
    up = Upstream(data)
    fetch, fast = start(board, up, data)
    slow = fetch.join(0, len(data))
    gone: list[int] = []

    async def own(resume: herd.Resume) -> AsyncIterator[bytes]:
        gone.append(resume.position)
        yield data[resume.position :]

    results = await asyncio.gather(drain(fetch.read(fast, no_own)), drain(fetch.read(slow, own), pause=0.003))
    assert list(results) == [data, data]
    assert gone  # the slow one went on alone long before it was 16 MiB behind
    assert peak <= (6 << 20) + (2 << 20)  # the cap, a mark interval and a chunk: never the 16 MiB window


async def test_a_catch_up_stops_at_the_older_front_and_merges_there() -> None:
    # The older fetch holds little (its reader keeps up; a 1 MiB tail): the younger one must not
    # read past what the older has, or it could never hand its reader over.
    data = blob(16 << 20)
    board = herd.Board(window=64 << 20, memory=256 << 20, retain=1 << 20)
    older, early = start(board, Upstream(data), data)
    chunks = older.read(early, no_own)
    got = bytearray()
    while len(got) < (6 << 20):
        got += await anext(chunks)
    late_up = Upstream(data)
    younger = board.lead(older.key)
    assert board.has_room(len(data))
    late = younger.start(
        [], len(data), late_up.body(), digest=digest_of(data), algorithm="sha256", detach_on_break=False
    )
    early_rest, late_bytes = await asyncio.gather(drain(chunks), drain(younger.read(late, no_own)))
    assert bytes(got) + early_rest == data
    assert late_bytes == data
    assert board.merges == 1
    assert late.fetch is older
    assert late_up.read < 12 << 20


async def test_clients_that_keep_coming_join_from_the_first_byte() -> None:
    # A rollout that starts one node at a time: the fetch holds its first window while clients
    # keep coming, so that each joins from byte 0; one upstream body for all.
    data = blob(6 << 20)
    window = 2 << 20
    board = herd.Board(window=window, memory=64 << 20, head=1 << 20)
    # 64 KiB per 5 ms: the hold point (1 MiB) after some 80 ms, twice the clients' 40 ms apart
    up = Upstream(data, delay=0.005)
    fetch, first = start(board, up, data)
    reads = [asyncio.ensure_future(drain(fetch.read(first, no_own)))]
    for _ in range(8):
        await asyncio.sleep(0.04)  # less than the window took: the fetch keeps holding
        assert fetch.holds(0)
        reads.append(asyncio.ensure_future(drain(fetch.read(fetch.join(0, len(data)), no_own))))
    results = await asyncio.gather(*reads)
    assert all(r == data for r in results)
    assert up.read == len(data)
    assert 0.2 < fetch.waited < herd.PATIENCE
    assert not fetch.gathering_state.active
    assert board.held == 0


async def test_the_hold_ends_when_clients_stop_coming_or_after_its_patience() -> None:
    data = blob(6 << 20)
    board = herd.Board(window=2 << 20, memory=64 << 20, head=1 << 20, patience=0.3)
    up = Upstream(data, delay=0.005)  # as above: the fill outlasts the 40 ms between clients
    fetch, first = start(board, up, data)
    reads = [asyncio.ensure_future(drain(fetch.read(first, no_own)))]
    while fetch.holds(0):  # clients come every 40 ms, for ever
        reads.append(asyncio.ensure_future(drain(fetch.read(fetch.join(0, len(data)), no_own))))
        await asyncio.sleep(0.04)
    assert 0.3 <= fetch.waited < 0.4  # it went on after its patience: later clients catch up
    results = await asyncio.gather(*reads)
    assert all(r == data for r in results)
    assert up.read == len(data)


async def test_a_lone_pull_never_holds() -> None:
    data = blob(6 << 20)
    board = herd.Board(window=2 << 20, memory=64 << 20, head=1 << 20)
    fetch, only = start(board, Upstream(data, delay=0.001), data)
    assert await drain(fetch.read(only, no_own)) == data
    assert fetch.waited == 0.0


async def test_a_herd_the_link_holds_back_loses_no_one() -> None:
    # Readers of uneven speed, all of them faster than the upstream: the fetch waits for bytes,
    # not for its slowest reader, and nobody is let go (its own request would share the link).
    data = blob(8 << 20)
    board = herd.Board(window=1 << 20, memory=64 << 20, head=0)
    up = Upstream(data, delay=0.003)
    fetch, fast = start(board, up, data)
    others = [fetch.join(0, len(data)) for _ in range(7)]
    results = await asyncio.gather(
        drain(fetch.read(fast, no_own)), *(drain(fetch.read(r, no_own), pause=0.0005 * n) for n, r in enumerate(others))
    )
    assert all(r == data for r in results)
    assert up.read == len(data)


async def test_no_patience_means_no_hold() -> None:
    data = blob(6 << 20)
    board = herd.Board(window=2 << 20, memory=64 << 20, head=1 << 20, patience=0.0)
    up = Upstream(data, delay=0.002)
    fetch, first = start(board, up, data)
    reads = [asyncio.ensure_future(drain(fetch.read(first, no_own)))]
    await asyncio.sleep(0.01)
    reads.append(asyncio.ensure_future(drain(fetch.read(fetch.join(0, len(data)), no_own))))
    assert all(r == data for r in await asyncio.gather(*reads))
    assert fetch.waited == 0.0


async def test_readers_leaving_during_a_hold_close_the_upstream() -> None:
    data = blob(6 << 20)
    board = herd.Board(window=2 << 20, memory=64 << 20, head=1 << 20)
    up = Upstream(data, delay=0.02)  # 64 KiB every 20 ms: the hold point (1 MiB) after about 0.3 s
    fetch, first = start(board, up, data)
    pulls = [asyncio.ensure_future(drain(fetch.read(first, no_own)))]
    await asyncio.sleep(0.2)
    pulls.append(asyncio.ensure_future(drain(fetch.read(fetch.join(0, len(data)), no_own))))
    while up.read < (1 << 20):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    held_at = up.read
    await asyncio.sleep(0.05)
    assert fetch.gathering_state.active
    assert up.read == held_at  # holding: nothing more is read
    for pull in pulls:
        pull.cancel()  # both clients go away mid-hold
    await asyncio.gather(*pulls, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert up.closed
    assert up.read == held_at < len(data)
    assert board.held == 0
    assert board.current(fetch.key) is None


async def test_a_complete_blob_lingers_for_the_next_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small layer read in a moment: the next node of a rollout, a moment later, reads it from
    # memory; the memory goes back once no client came for a while.
    monkeypatch.setattr(hold, "LINGER", 0.1)  # where the linger rule reads it
    data = blob(3 << 20)
    board = herd.Board(window=8 << 20, memory=64 << 20)
    up = Upstream(data)
    fetch, first = start(board, up, data)
    assert await drain(fetch.read(first, no_own)) == data
    await asyncio.sleep(0.02)
    assert fetch.lingering
    assert board.held == len(data)
    assert board.current(fetch.key) is fetch
    assert fetch.holds(0)
    assert await drain(fetch.read(fetch.join(0, len(data)), no_own)) == data
    assert up.read == len(data)  # one upstream read for both
    await asyncio.sleep(0.05)
    assert fetch.lingering  # the second client restarted the clock
    await asyncio.sleep(0.15)
    assert not fetch.lingering
    assert board.held == 0
    assert board.current(fetch.key) is None


async def test_lingering_blobs_give_way_to_new_fetches() -> None:
    data = blob(3 << 20)
    board = herd.Board(window=8 << 20, memory=6 << 20, retain=1 << 20)
    fetch, only = start(board, Upstream(data), data)
    assert await drain(fetch.read(only, no_own)) == data
    await asyncio.sleep(0.01)
    assert board.held == len(data)
    assert board.has_room(6 << 20)  # room is made: the lingering blob goes first
    assert board.held == 0
    assert not fetch.holds(0)


async def test_heads_nobody_joined_give_way_to_new_fetches() -> None:
    # Many lone pulls of different blobs must not fill the cap with heads kept in case a second
    # client comes: a new fetch that needs room gets it, and is shared.
    data = blob(6 << 20)
    board = herd.Board(window=8 << 20, memory=8 << 20, retain=1 << 20, head=4 << 20)
    up = Upstream(data)
    up.gate.clear()
    fetch, only = start(board, up, data)
    chunks = fetch.read(only, no_own)
    up.gate.set()
    got = bytearray()
    while len(got) < (3 << 20):
        got += await anext(chunks)
    up.gate.clear()  # the upstream pauses: the head (3 MiB and what was read ahead) stays
    await asyncio.sleep(0.01)
    assert fetch.holds(0)
    before = board.held
    assert before >= 3 << 20
    board.memory = before + (4 << 20)  # the cap is nearly full
    assert board.has_room(5 << 20)  # 1 MiB tail + 4 MiB read-ahead: room is made from the head
    assert not fetch.holds(0)
    assert board.held <= before - (1 << 20)
    up.gate.set()
    got += await drain(chunks)
    assert bytes(got) == data
