"""The upstream connection's arena: reads land in buffers of its own and go on as views, never copied."""

from __future__ import annotations

import asyncio

from gateway.net.connections import ARENA_CROWDED, ARENA_MAX, ARENA_MIN, CROWD, _Connection


def read(conn: _Connection, data: bytes) -> memoryview:
    """What the event loop does for one read of ``data``: fill the buffer offered, say how much."""
    buffer = conn.get_buffer(-1)
    assert len(buffer) >= len(data)
    buffer[: len(data)] = data
    conn.buffer_updated(len(data))
    return buffer


async def test_each_read_goes_on_as_a_view_of_the_arena_and_stays_valid() -> None:
    conn = _Connection(asyncio.get_running_loop())
    read(conn, b"a" * 1000)
    read(conn, b"b" * 2000)
    first, second = await conn.receive(1.0), await conn.receive(1.0)
    assert isinstance(first, memoryview)
    assert isinstance(second, memoryview)
    assert first.obj is second.obj  # one arena, no copy
    read(conn, b"c" * 3000)  # later reads do not touch what was handed on
    assert bytes(first) == b"a" * 1000
    assert bytes(second) == b"b" * 2000
    assert bytes(await conn.receive(1.0)) == b"c" * 3000


async def test_an_arena_serves_reads_until_less_than_a_quarter_is_left() -> None:
    conn = _Connection(asyncio.get_running_loop())
    assert len(read(conn, b"x" * 1000)) == ARENA_MIN
    assert len(conn.get_buffer(-1)) == ARENA_MIN - 1000  # the same arena, after the first read
    read(conn, b"x" * (ARENA_MIN * 3 // 4 - 1000 + 1))  # now less than a quarter is left
    assert len(conn.get_buffer(-1)) == ARENA_MIN  # a new arena, as small as the last


def full_reads(conn: _Connection, count: int) -> list[int]:
    """The sizes of the buffers offered to ``count`` reads that each take all they are offered."""
    sizes = []
    for _ in range(count):
        buffer = conn.get_buffer(-1)
        sizes.append(len(buffer))
        conn.buffer_updated(len(buffer))
    return sizes


async def test_a_read_that_takes_all_it_was_offered_doubles_the_next_arena_up_to_the_cap() -> None:
    conn = _Connection(asyncio.get_running_loop())
    sizes = full_reads(conn, 8)
    assert sizes == [ARENA_MIN, ARENA_MIN * 2, ARENA_MIN * 4, ARENA_MIN * 8, ARENA_MAX, ARENA_MAX, ARENA_MAX, ARENA_MAX]
    assert ARENA_MIN * 16 == ARENA_MAX


async def test_an_idle_connection_lets_a_large_arena_go() -> None:
    conn = _Connection(asyncio.get_running_loop())
    for _ in range(3):
        conn.buffer_updated(len(conn.get_buffer(-1)))
    held = conn.get_buffer(-1)
    assert len(held) == ARENA_MIN * 8
    conn.rest()  # given back to the pool: a manifest next needs no megabyte
    assert len(conn.get_buffer(-1)) == ARENA_MIN
    small = _Connection(asyncio.get_running_loop())
    read(small, b"y" * 10)
    small.rest()  # a small arena is kept: its rest serves the next answer
    assert len(small.get_buffer(-1)) == ARENA_MIN - 10


async def test_while_many_connections_read_at_full_speed_their_arenas_stay_smaller() -> None:
    loop = asyncio.get_running_loop()
    crowd = [_Connection(loop) for _ in range(CROWD - 1)]
    for conn in crowd:
        assert full_reads(conn, 6)[-1] == ARENA_MAX  # fewer than CROWD: each reads 1 MiB at a time
    late = _Connection(loop)
    assert max(full_reads(late, 8)) == ARENA_CROWDED  # with it, CROWD read that fast
    assert full_reads(crowd[0], 2) == [ARENA_CROWDED] * 2  # the others' next arenas are smaller too
    for conn in crowd:
        conn.rest()
    assert full_reads(late, 3) == [ARENA_CROWDED, ARENA_CROWDED * 2, ARENA_MAX]  # alone again: it grows
    late.connection_lost(None)
