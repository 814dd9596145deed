"""Property tests of the lean transport's own HTTP/1.1 response parser (gateway/net/transport.py).

``_parse_head`` and the body framing of ``_Body`` are the only hand-written HTTP parser on
the gateway's hot path: every upstream byte of every blob passes through them, and a framing
mistake there desynchronises a pooled keep-alive connection or relays a wrong body. So they
are checked here against the message-framing rules of RFC 9112, with hypothesis:

- a response head (section 4 status line, section 5 field lines) round-trips: status, reason,
  field names (case kept) and values (OWS stripped), and keep-alive (section 9.3);
- Content-Length (sections 6.2 and 6.3 item 5): a valid value, or repeated identical ones,
  gives the length; anything else (conflicting, signed, non-digit, lists) is the parser's
  ``_ProtocolError``, never a stray ValueError or IndexError; with Transfer-Encoding, the
  final coding decides (section 6.3 items 3 and 4: chunked overrides Content-Length);
- arbitrary bytes as a head, or as what a connection delivers before the head ends, give a
  head or the protocol error (``httpx.RemoteProtocolError`` once through ``_read_head``);
- chunked bodies (section 7.1: hex sizes in any case, chunk extensions, trailers) split at any
  points decode to exactly their data; bad sizes, a missing CRLF or a truncation are
  ``httpx.RemoteProtocolError``; bytes after the last chunk stay on the connection;
- Content-Length bodies (section 6.2) yield exactly that many bytes, as the very pieces that
  arrived (no copies), and leave the surplus on the connection; close-delimited bodies
  (section 6.3 item 8) yield everything up to the end of the connection.

The body is driven through ``LeanTransport._read_head`` and ``_Body`` as
``LeanTransport.handle_async_request`` wires them, over a fake connection that delivers
scripted pieces; each example runs in its own ``asyncio.run``. The tests at the end are the
defects these properties found (now fixed), kept as regression tests.
"""

from __future__ import annotations

import asyncio
import collections
import re
import typing
from collections.abc import Iterable

import httpx
import pytest
from hypothesis import given, settings, strategies as st

from gateway.http.util import Chunk
from gateway.net.connections import _Connection
from gateway.net.transport import (
    LeanTransport,
    _Body,
    _Head,
    _parse_head,
    _ProtocolError,
    _StaleConnection,
)

SETTINGS = settings(max_examples=200, deadline=None, database=None)

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
OBS_TEXT = "".join(chr(c) for c in range(0x80, 0x100))
FRAMING_FIELDS = {"content-length", "transfer-encoding", "connection"}
REQUEST = httpx.Request("GET", "http://upstream.test/v2/library/alpine/blobs/sha256:0")

# --- strategies ------------------------------------------------------------------------------

tokens = st.text(TCHAR, min_size=1, max_size=16)
field_names = tokens.filter(lambda name: name.lower() not in FRAMING_FIELDS)
# field-value = *field-content: visible characters with inner SP/HTAB, never at either end.
field_values = st.text(VCHAR + OBS_TEXT + " \t", max_size=40).map(lambda value: value.strip(" \t"))
ows = st.sampled_from(["", " ", "\t", "  ", " \t "])
reasons = st.text(VCHAR + OBS_TEXT + " \t", max_size=30)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0"])


def any_case(text: str) -> st.SearchStrategy[str]:
    flips = st.lists(st.booleans(), min_size=len(text), max_size=len(text))
    return flips.map(lambda ups: "".join(c.upper() if up else c.lower() for c, up in zip(text, ups, strict=True)))


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def pieces_of(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` split at arbitrary points into non-empty pieces, as a socket might deliver it."""
    return st.lists(st.integers(0, len(data)), max_size=12).map(lambda cuts: cut(data, cuts))


quoted_strings = st.text(VCHAR.replace('"', "").replace("\\", "") + " \t", max_size=12).map(lambda s: f'"{s}"')
chunk_exts = st.lists(
    st.tuples(ows, tokens, st.none() | tokens | quoted_strings).map(
        lambda ext: f"{ext[0]};{ext[1]}" + ("" if ext[2] is None else f"={ext[2]}")
    ),
    max_size=2,
).map("".join)


class Chunked(typing.NamedTuple):
    """A chunked body, kept in parts so that tests can damage one of them."""

    chunks: list[bytes]
    size_lines: list[bytes]  # one per chunk, then the last chunk's: size and extensions, no CRLF
    trailers: list[bytes]

    def wire(self, *, bad_size: tuple[int, bytes] | None = None, bad_crlf: tuple[int, bytes] | None = None) -> bytes:
        out = []
        for i, line in enumerate(self.size_lines):
            if bad_size is not None and bad_size[0] == i:
                line = bad_size[1]
            out.append(line + b"\r\n")
            if i < len(self.chunks):
                out.append(self.chunks[i])
                out.append(bad_crlf[1] if bad_crlf is not None and bad_crlf[0] == i else b"\r\n")
        out.extend(trailer + b"\r\n" for trailer in self.trailers)
        out.append(b"\r\n")
        return b"".join(out)


@st.composite
def chunked_bodies(draw: st.DrawFn, max_chunks: int = 6) -> Chunked:
    chunks = draw(st.lists(st.binary(min_size=1, max_size=64), max_size=max_chunks))
    size_lines = []
    for chunk in [*chunks, b""]:
        size = "0" * draw(st.integers(0, 2)) + format(len(chunk), "x")
        size_lines.append((draw(any_case(size)) + draw(chunk_exts)).encode())
    trailers = [
        f"{name}:{sp}{value}".encode("latin-1")
        for name, sp, value in draw(st.lists(st.tuples(field_names, ows, field_values), max_size=3))
    ]
    return Chunked(chunks, size_lines, trailers)


# --- a scripted connection -------------------------------------------------------------------


class FakeConnection:
    """What ``_Body`` and ``_read_head`` use of ``_Connection``, delivering scripted pieces.

    After the pieces the peer either closes (``receive`` gives b"", with ``error`` set for a
    reset) or stays silent, which ends the wait as ``conn.receive`` does on its read timeout.
    """

    def __init__(self, pieces: Iterable[bytes], *, eof: bool, error: Exception | None = None) -> None:
        self.pending = collections.deque(piece for piece in pieces if piece)
        self.eof = eof
        self.error = error

    async def receive(self, timeout: float | None) -> bytes:
        if self.pending:
            return self.pending.popleft()
        if self.eof:
            return b""
        raise TimeoutError

    def unread(self, data: bytes) -> None:
        if data:
            self.pending.appendleft(data)

    def reusable(self) -> bool:
        return not self.eof and not self.pending

    def leftover(self) -> bytes:
        return b"".join(self.pending)


class Exchange:
    """One response read as ``LeanTransport.handle_async_request`` reads it."""

    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.parts: list[Chunk] = []
        self.released: list[bool] = []

    def _finish(self, conn: _Connection, reuse: bool) -> None:
        assert conn is typing.cast(_Connection, self.conn)
        self.released.append(reuse)

    def body(self, head: _Head, first: bytes = b"") -> _Body:
        return _Body(
            typing.cast(_Connection, self.conn),
            head,
            first,
            request=REQUEST,
            read_timeout=1.0,
            finish=self._finish,
            no_body=head.content_length == 0,  # as handle_async_request decides for a GET
        )

    async def _read(self, head: _Head | None, first: bytes) -> None:
        if head is None:
            head, first = await LeanTransport._read_head(typing.cast(_Connection, self.conn), 1.0)
        async for part in self.body(head, first):
            self.parts.append(part)

    def run(self, head: _Head | None = None, first: bytes = b"") -> bytes:
        """Read the head from the connection unless given, then the whole body."""
        asyncio.run(self._read(head, first))
        return b"".join(self.parts)

    def reused(self) -> bool:
        """Whether the pool would keep the connection (``_Pool.give_back`` checks again)."""
        assert len(self.released) == 1, self.released
        return self.released[0] and self.conn.reusable()


def read_head(pieces: Iterable[bytes]) -> tuple[_Head, bytes]:
    conn = typing.cast(_Connection, FakeConnection(pieces, eof=True))
    return asyncio.run(LeanTransport._read_head(conn, 1.0))


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


# --- the head --------------------------------------------------------------------------------


@SETTINGS
@given(
    version=versions,
    status=st.integers(100, 599),
    reason=reasons,
    bare=st.booleans(),
    fields=st.lists(st.tuples(field_names, ows, field_values, ows), max_size=12),
    data=st.data(),
)
def test_a_valid_head_round_trips(
    version: str, status: int, reason: str, bare: bool, fields: list[tuple[str, str, str, str]], data: st.DataObject
) -> None:
    status_line = f"{version} {status:03d}" + ("" if bare and not reason else f" {reason}")
    raw = "\r\n".join([status_line] + [f"{name}:{a}{value}{b}" for name, a, value, b in fields]).encode("latin-1")
    expected = _Head(
        status=status,
        reason=reason,
        headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, _, value, _ in fields],
        keep_alive=version == "HTTP/1.1",
        content_length=None,
        chunked=False,
    )
    assert _parse_head(raw) == expected
    if not 100 <= status < 200:  # _read_head skips an interim answer (101 aside: not sent for a GET)
        # The same head as _read_head finds it, arriving in pieces.
        assert read_head(data.draw(pieces_of(raw + b"\r\n\r\n"))) == (expected, b"")


@SETTINGS
@given(
    version=versions,
    options=st.lists(
        st.sampled_from(["keep-alive", "Keep-Alive", "upgrade", "TE", "x-option", "close", "Close", "CLOSE"]),
        min_size=1,
        max_size=4,
    ),
    sp=ows,
)
def test_keep_alive_follows_the_version_and_the_close_option(version: str, options: list[str], sp: str) -> None:
    raw = f"{version} 200 OK\r\nConnection:{sp}{', '.join(options)}".encode()
    head = _parse_head(raw)
    assert head.keep_alive == (version == "HTTP/1.1" and "close" not in {o.lower() for o in options})
    assert head.headers == [(b"Connection", ", ".join(options).encode())]


@SETTINGS
@given(raw=st.binary(max_size=300) | st.binary(max_size=200).map(lambda b: b"HTTP/1.1 200 OK\r\n" + b))
def test_arbitrary_bytes_give_a_head_or_the_protocol_error(raw: bytes) -> None:
    check_head_invariants(raw)


HEAD_FRAGMENTS = [
    b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/2 ", b"200", b"404", b"20", b" OK", b"\r\n", b"\r", b"\n", b":", b" ", b"\t",
    b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"chunked", b"close", b"gzip", b",",
    b"0", b"5", b"17", b"-1", b"+", b"0x", b"\x00", b"\xff", b"\xd9\xa5",
]  # fmt: skip


@SETTINGS
@given(raw=st.lists(st.sampled_from(HEAD_FRAGMENTS), max_size=40).map(b"".join))
def test_near_miss_heads_give_a_head_or_the_protocol_error(raw: bytes) -> None:
    check_head_invariants(raw)


def check_head_invariants(raw: bytes) -> None:
    try:
        head = _parse_head(raw)
    except _ProtocolError:
        return
    assert 0 <= head.status <= 999
    assert raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))
    assert not head.keep_alive or raw.startswith(b"HTTP/1.1 ")
    assert head.content_length is None or head.content_length >= 0
    assert not (head.chunked and head.content_length is not None)


@SETTINGS
@given(wire=st.binary(max_size=300), end=st.booleans(), data=st.data())
def test_read_head_gives_a_head_or_remote_protocol_error(wire: bytes, end: bool, data: st.DataObject) -> None:
    """Whatever arrives before the connection closes: a head, or an httpx error."""
    if end:
        wire += b"\r\n\r\n"
    try:
        head, rest = read_head(data.draw(pieces_of(wire)))
    except _StaleConnection:
        assert not wire  # only a connection that closed without a byte may be retried
    except httpx.RemoteProtocolError:
        pass
    else:
        assert b"\r\n\r\n" in wire
        assert not 100 <= head.status < 200 or head.status == 101  # interim answers are skipped
        assert wire.endswith(rest)


# --- Content-Length and Transfer-Encoding ----------------------------------------------------

DIGITS = "0123456789"
valid_lengths = st.integers(0, 10**20).map(str) | st.text(DIGITS, min_size=1, max_size=4200)
junk_lengths = st.text(DIGITS + "+- ,.xeE\t", max_size=12) | st.sampled_from(
    ["\u0665", "\uff15", "5\x000", "1e3", "0x10", "5, 5", "-0", "+0"]
)


@st.composite
def content_length_values(draw: st.DrawFn) -> list[str]:
    """1 to 3 Content-Length values: mostly one length repeated, sometimes conflicting or junk."""
    base = draw(valid_lengths)
    same_number = st.integers(0, 3).map(lambda zeros: "0" * zeros + base)
    return draw(st.lists(same_number | valid_lengths | junk_lengths, min_size=1, max_size=3))


def content_length_oracle(values: list[str]) -> int | None:
    """The length RFC 9112 6.3 gives, or None where the framing is invalid (a 502 for a proxy)."""
    numbers = {int(value) if re.fullmatch("[0-9]+", value) else -1 for value in values}
    if len(numbers) != 1 or -1 in numbers:
        return None
    number = numbers.pop()
    # The gateway's own bound: no body is 10**18 bytes, and int() has a digit limit.
    return number if number < 10**18 else None


@SETTINGS
@given(
    values=content_length_values(),
    sp=st.tuples(ows, ows),
    other=st.lists(st.tuples(field_names, field_values), max_size=2),
)
def test_content_length_is_the_length_or_the_protocol_error(
    values: list[str], sp: tuple[str, str], other: list[tuple[str, str]]
) -> None:
    lines = [f"{name}: {value}" for name, value in other] + [
        f"Content-Length:{sp[0]}{value}{sp[1]}" for value in values
    ]
    raw = "\r\n".join(["HTTP/1.1 200 OK", *lines]).encode("latin-1" if all(v.isascii() for v in values) else "utf-8")
    expected = content_length_oracle([value.strip(" \t") for value in values])
    if expected is None:
        with pytest.raises(_ProtocolError):
            _parse_head(raw)
    else:
        head = _parse_head(raw)
        assert (head.content_length, head.chunked) == (expected, False)
        assert [value for name, value in head.headers if name == b"Content-Length"] == [
            v.strip(" \t").encode() for v in values
        ]


codings = st.lists(
    st.sampled_from(["chunked", "gzip", "deflate", "compress", "identity", "x-custom"]).flatmap(any_case),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(codings=codings, separator=st.sampled_from([",", ", ", " , ", ",\t"]))
def test_transfer_encoding_is_chunked_when_chunked_is_the_final_coding(codings: list[str], separator: str) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + separator.join(codings).encode()
    if codings[-1].lower() == "chunked":
        head = _parse_head(raw)
        assert (head.chunked, head.content_length) == (True, None)
    else:
        # RFC 9112 6.3 item 4 reads such a response until the close; refusing it is safe.
        with pytest.raises(_ProtocolError):
            _parse_head(raw)


@SETTINGS
@given(
    body=chunked_bodies(), length=st.integers(0, 10**6), te_first=st.booleans(), te=any_case("chunked"), data=st.data()
)
def test_chunked_overrides_content_length(
    body: Chunked, length: int, te_first: bool, te: str, data: st.DataObject
) -> None:
    """RFC 9112 6.3 item 3: with both fields, Transfer-Encoding frames the message."""
    fields = [f"Transfer-Encoding: {te}", f"Content-Length: {length}"]
    if not te_first:
        fields.reverse()
    wire = "\r\n".join(["HTTP/1.1 200 OK", *fields, "", ""]).encode() + body.wire()
    exchange = Exchange(FakeConnection(data.draw(pieces_of(wire)), eof=False))
    assert exchange.run() == b"".join(body.chunks)
    assert exchange.reused()


# --- chunked bodies --------------------------------------------------------------------------


@SETTINGS
@given(body=chunked_bodies(), tail=st.binary(max_size=32), eof=st.booleans(), data=st.data())
def test_a_chunked_body_decodes_to_its_chunks(body: Chunked, tail: bytes, eof: bool, data: st.DataObject) -> None:
    exchange = Exchange(FakeConnection(data.draw(pieces_of(CHUNKED_HEAD + body.wire() + tail)), eof=eof))
    assert exchange.run() == b"".join(body.chunks)
    assert all(exchange.parts)
    # Whatever follows the last chunk (the next response) stays on the connection.
    assert exchange.conn.leftover() == tail
    assert exchange.reused() == (not tail and not eof)


not_hex = st.text("ghijklmnopqrstuvwyzGHIJKLMNOPQRSTUVWYZ.:/@=\x00\x7f", min_size=1, max_size=2)
bad_sizes = st.sampled_from(["", " ", "\t"]) | st.tuples(
    st.text("0123456789abcdefABCDEF", max_size=3), not_hex, st.text("0123456789abcdef", max_size=3)
).map("".join)


@SETTINGS
@given(body=chunked_bodies(), bad=bad_sizes, ext=chunk_exts, data=st.data())
def test_a_bad_chunk_size_is_a_protocol_error(body: Chunked, bad: str, ext: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(body.chunks)))
    wire = CHUNKED_HEAD + body.wire(bad_size=(index, (bad + ext).encode("latin-1")))
    exchange = Exchange(FakeConnection(data.draw(pieces_of(wire)), eof=False))
    with pytest.raises(httpx.RemoteProtocolError):
        exchange.run()
    assert b"".join(exchange.parts) == b"".join(body.chunks[:index])
    assert exchange.released == [False]


@SETTINGS
@given(
    body=chunked_bodies().filter(lambda body: bool(body.chunks)),
    bad=st.sampled_from([b"", b"\n", b"\r", b"\n\r", b"xy"]),
    data=st.data(),
)
def test_a_missing_crlf_after_chunk_data_is_a_protocol_error(body: Chunked, bad: bytes, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(body.chunks) - 1))
    wire = CHUNKED_HEAD + body.wire(bad_crlf=(index, bad))
    exchange = Exchange(FakeConnection(data.draw(pieces_of(wire)), eof=False))
    with pytest.raises(httpx.RemoteProtocolError):
        exchange.run()
    assert b"".join(exchange.parts) == b"".join(body.chunks[: index + 1])
    assert exchange.released == [False]


@SETTINGS
@given(body=chunked_bodies(), reset=st.booleans(), data=st.data())
def test_a_truncated_chunked_body_is_an_error(body: Chunked, reset: bool, data: st.DataObject) -> None:
    wire = body.wire()
    truncated = CHUNKED_HEAD + wire[: data.draw(st.integers(0, len(wire) - 1))]
    exchange = Exchange(
        FakeConnection(data.draw(pieces_of(truncated)), eof=True, error=ConnectionResetError() if reset else None)
    )
    with pytest.raises(httpx.ReadError if reset else httpx.RemoteProtocolError):
        exchange.run()
    assert b"".join(body.chunks).startswith(b"".join(exchange.parts))
    assert exchange.released == [False]


# --- Content-Length bodies -------------------------------------------------------------------


def sized_head(length: int) -> _Head:
    return _parse_head(f"HTTP/1.1 200 OK\r\nContent-Length: {length}".encode())


@SETTINGS
@given(
    body=st.binary(max_size=3000),
    tail=st.binary(max_size=64),
    eof=st.booleans(),
    in_first=st.booleans(),
    data=st.data(),
)
def test_a_sized_body_is_exactly_content_length_bytes(
    body: bytes, tail: bytes, eof: bool, in_first: bool, data: st.DataObject
) -> None:
    pieces = data.draw(pieces_of(body + tail))
    first = pieces.pop(0) if in_first and pieces else b""  # what came with the head
    exchange = Exchange(FakeConnection(pieces, eof=eof))
    assert exchange.run(sized_head(len(body)), first) == body
    # The hot path hands on the very pieces that arrived, only the last one cut short.
    expected, remaining = [], len(body)
    for piece in [first, *pieces] if first else pieces:
        if remaining > 0:
            expected.append(piece[:remaining])
            remaining -= len(expected[-1])
    assert exchange.parts == expected
    assert exchange.conn.leftover() == tail  # a surplus is left unread, and the connection not reused
    assert exchange.reused() == (not tail and not eof)


@SETTINGS
@given(
    body=st.binary(max_size=2000),
    missing=st.integers(1, 10**9),
    ending=st.sampled_from(["eof", "reset", "silence"]),
    data=st.data(),
)
def test_a_short_sized_body_is_an_error(body: bytes, missing: int, ending: str, data: st.DataObject) -> None:
    conn = FakeConnection(
        data.draw(pieces_of(body)), eof=ending != "silence", error=ConnectionResetError() if ending == "reset" else None
    )
    exchange = Exchange(conn)
    expected = {"eof": httpx.RemoteProtocolError, "reset": httpx.ReadError, "silence": httpx.ReadTimeout}[ending]
    with pytest.raises(expected):
        exchange.run(sized_head(len(body) + missing))
    assert b"".join(exchange.parts) == body
    assert exchange.released == [False]


# --- close-delimited bodies ------------------------------------------------------------------


@SETTINGS
@given(
    version=versions,
    body=st.binary(max_size=3000),
    in_first=st.booleans(),
    other=st.lists(st.tuples(field_names, field_values), max_size=3),
    data=st.data(),
)
def test_a_body_without_length_runs_to_the_end_of_the_connection(
    version: str, body: bytes, in_first: bool, other: list[tuple[str, str]], data: st.DataObject
) -> None:
    head = _parse_head("\r\n".join([f"{version} 200 OK"] + [f"{n}: {v}" for n, v in other]).encode("latin-1"))
    assert (head.content_length, head.chunked) == (None, False)
    pieces = data.draw(pieces_of(body))
    first = pieces.pop(0) if in_first and pieces else b""
    exchange = Exchange(FakeConnection(pieces, eof=True))
    assert exchange.run(head, first) == body
    assert exchange.parts == ([first] if first else []) + pieces
    assert exchange.released == [False]  # the end of the body is the end of the connection


@SETTINGS
@given(body=st.binary(max_size=500), data=st.data())
def test_a_body_without_length_from_a_silent_upstream_times_out(body: bytes, data: st.DataObject) -> None:
    exchange = Exchange(FakeConnection(data.draw(pieces_of(body)), eof=False))
    with pytest.raises(httpx.ReadTimeout):
        exchange.run(_parse_head(b"HTTP/1.1 200 OK"))
    assert b"".join(exchange.parts) == body
    assert exchange.released == [False]


# --- defects these properties found, fixed: each stays as a regression test ---------------------


def test_a_content_length_of_more_than_4300_digits_is_a_protocol_error() -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        read_head([b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 4301 + b"\r\n\r\n"])


@pytest.mark.parametrize(
    "body",
    [
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
        b"-1\r\n\r\n0\r\n\r\n",  # a negative size, taken as an empty chunk
        b"-0\r\n\r\n",  # a last chunk
    ],
)
def test_a_chunk_size_must_be_hex_digits_only(body: bytes) -> None:
    """RFC 9112 7.1: chunk-size = 1*HEXDIG."""
    with pytest.raises(httpx.RemoteProtocolError):
        Exchange(FakeConnection([CHUNKED_HEAD + body], eof=False)).run()


def test_close_in_any_connection_field_line_ends_keep_alive() -> None:
    """RFC 9110 7.6.1 and RFC 9112 9.6: field lines combine; a close option closes."""
    assert not _parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive").keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\rb",
        b"HTTP/1.1 200 OK\r\nX-A: a\nb",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b",
        b"HTTP/1.1 200 OK\nContent-Length: 5",  # a bare LF: the field line becomes part of the reason
    ],
)
def test_cr_lf_and_nul_are_refused_or_replaced(raw: bytes) -> None:
    """RFC 9110 5.5 and RFC 9112 2.2: a recipient MUST reject them or replace them with SP."""
    try:
        head = _parse_head(raw)
    except _ProtocolError:
        return
    assert not re.search("[\r\n\x00]", head.reason)
    assert not any(re.search(b"[\r\n\x00]", value) for _, value in head.headers)


def test_a_body_without_length_cut_by_a_connection_error_is_an_error() -> None:
    """RFC 9112 8 and 9.8: an interrupted close-delimited body is incomplete, not complete."""
    exchange = Exchange(FakeConnection([b"partial"], eof=True, error=ConnectionResetError()))
    with pytest.raises(httpx.TransportError):
        exchange.run(_parse_head(b"HTTP/1.1 200 OK"))


def test_content_length_beside_chunked_is_not_passed_on() -> None:
    """RFC 9112 6.3: with Transfer-Encoding, an intermediary must remove Content-Length."""
    head = _parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked")
    assert head.chunked
    assert head.content_length is None
    assert [name.lower() for name, _ in head.headers] == [b"transfer-encoding"]
