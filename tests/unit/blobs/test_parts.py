"""The shared fetch's parts on their own, without an event loop or an upstream: the window's bytes,
the pace rule, how long a hold and a linger last, what the window keeps for later clients."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.blobs import pace
from gateway.blobs.hold import Gathering, hold_left, keep_from, linger_left
from gateway.blobs.terms import LINGER, READAHEAD
from gateway.blobs.window import Window


def test_the_window_hands_out_its_chunks_and_drops_whole_ones_from_the_front() -> None:
    window = Window()
    chunks = [b"a" * 10, b"b" * 10, b"c" * 10]
    for chunk in chunks:
        window.append(chunk)
    assert (window.base, window.produced, window.held, window.chunks) == (0, 30, 30, 3)
    assert window.piece(10, 30) is chunks[1]  # the same object, no copy
    assert window.piece(15, 18) == b"bbb"
    assert window.pieces(5, 25) == [b"a" * 5, b"b" * 10, b"c" * 5]
    assert window.drop_to(25) == 20  # only whole chunks go
    assert (window.base, window.held) == (20, 10)
    window.clear()
    assert (window.base, window.held, window.has_bytes) == (30, 0, False)


@dataclass
class Place:
    position: int
    loose: bool = False


@pytest.mark.parametrize(
    ("produced", "positions", "reach", "expected"),
    [
        (READAHEAD, [0], 1 << 30, "front"),  # far enough ahead of its fastest reader
        (100, [100], 50, None),  # one reader: never waits for the herd
        (100, [100, 40], 50, "herd"),  # the slowest is at the edge of what the window lets it follow
        (100, [100, 60], 50, None),  # within reach
    ],
)
def test_when_the_fetch_waits_for_its_readers(
    produced: int, positions: list[int], reach: int, expected: str | None
) -> None:
    assert pace.ahead(produced, [Place(p) for p in positions], reach) == expected


def test_a_loose_reader_holds_nobody_back() -> None:
    assert pace.ahead(100, [Place(100), Place(40, loose=True)], 50) is None


def test_the_pace_lets_the_slowest_go_when_it_held_the_herd_back_most_of_a_period() -> None:
    readers = [Place(100), Place(90), Place(10)]
    keeper = pace.Pace(now=0.0)
    keeper.review(0.1, readers)  # not a whole period yet
    keeper.waited(0.2)
    keeper.review(0.3, readers)  # 0.2 of 0.3 s spent waiting for it
    assert [r.loose for r in readers] == [False, False, True]
    keeper.review(0.6, readers)  # a period with no waiting: nobody else goes
    assert [r.loose for r in readers] == [False, False, True]


@pytest.mark.parametrize(
    ("now", "waited", "over_memory", "reason"),
    [
        (1.0, 0.0, False, None),  # a client came at 0.5, the window took 1 s: hold on
        (1.6, 0.0, False, "quiet"),  # nobody came for as long as the window took to read
        (1.0, 15.0, False, "patience"),  # the readers waited all the board allows
        (1.0, 0.0, True, "memory"),  # past the cap
    ],
)
def test_how_long_a_hold_lasts(now: float, waited: float, over_memory: bool, reason: str | None) -> None:
    _, why = hold_left(now, 0.5, 1.0, 15.0, waited, over_memory=over_memory)
    assert why == reason


def test_a_linger_lasts_a_moment_after_the_latest_client_and_never_past_the_patience() -> None:
    assert linger_left(10.0, created=9.9, ended=10.0, last_join=10.0, patience=15.0) == LINGER
    assert linger_left(10.0, created=0.0, ended=10.0, last_join=10.0, patience=15.0) == 10.0  # as long as it took
    assert linger_left(10.0, created=0.0, ended=10.0, last_join=10.0, patience=3.0) == 3.0


def test_the_window_keeps_its_head_only_while_it_starts_at_byte_zero_under_the_cap() -> None:
    fresh = Gathering(0.0, lambda seconds: None)
    assert keep_from(fresh, 500, base=0, produced=100, head=1000, under_cap=True) == 0  # the head, for a second client
    assert keep_from(fresh, 500, base=0, produced=2000, head=1000, under_cap=True) == 500  # past the head
    gathering = Gathering(0.0, lambda seconds: None)
    gathering.joined(0.0, at_first_byte=True)
    assert keep_from(gathering, 500, base=0, produced=2000, head=1000, under_cap=True) == 0  # all of it, gathering
    assert keep_from(gathering, 500, base=0, produced=2000, head=1000, under_cap=False) == 500  # past the cap
    assert (gathering.active, gathering.over) == (False, True)  # and it never gathers again
    gathering.joined(1.0, at_first_byte=True)
    assert not gathering.active
