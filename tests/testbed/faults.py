"""A fault front: an HTTP/1.1 proxy in front of one test bed server that misbehaves on command.

``FaultFront(target)`` listens on 127.0.0.1 (its own thread and asyncio loop) and relays each
request to ``target`` (a registry or the CDN, ``http://127.0.0.1:PORT``) byte for byte: the
request head as sent (``Authorization`` included, so token auth keeps working), the response
head as the target sent it (``WWW-Authenticate``, ``Location``), and the body, sized
(``Content-Length``), chunked or until close. Each client connection has its own connection to
the target, so keep-alive works both ways.

On command it breaks the requests whose target (path and query) contains a string; a digest
``sha256:<hex>`` also matches by its hex, which is how the CDN's storage paths name a blob::

    front.fault(digest, "reset", at=24_000)          # RST after 24,000 body bytes, once
    front.fault(digest, "stall", at=1000)            # 1,000 body bytes, then silence, held open
    front.fault(digest, "flip", at=5, times=None)    # byte 5 of the body inverted, every time
    front.fault(digest, "ignore_range")              # a Range request sent on without its Range: a 200
    front.fault(digest, "wrong_range")               # a Range sent on one byte later: a 206 for other bytes
    front.fault("/v2/", "status", status=429, headers={"Retry-After": "1"})  # answered by the front itself

``at`` counts the body bytes of that one response (of a ``206``, from its first byte). The body
faults apply to ``200`` and ``206`` answers only (a ``401`` or a ``307`` passes untouched and
uses no ``times``); ``ignore_range`` and ``wrong_range`` to requests with a ``Range`` header. ``times=None``: every
matching request. Before a reset, the front waits until the peer has acknowledged every byte
sent, so the peer holds exactly ``at`` bytes when the RST arrives.

A ``status`` fault answers the request itself, with that status, the extra headers and a registry
JSON error body, and the target never sees it (an overloaded or rate-limiting registry); it
applies to every request that matches, whatever its method or answer.

``requests`` lists every request seen (method, target, Range, status, fault, body bytes sent,
Authorization as sent, the wall-clock time it came);
``open_connections`` and ``held_connections`` (stalls) count client connections now open.
``rewrite_location=(old, new)`` replaces a ``Location`` prefix, so a registry's redirect to the
CDN can be pointed at another front; ``location_query`` (called once per rewritten ``Location``)
appends its ``name=value`` to that Location's query, so each redirect names a URL of its own
(a signed URL with its expiry, say).
``rate`` (bytes per second, settable at any time; None: as fast as the target sends) paces the
body of every answer, so that a transfer lasts long enough for others to overlap it.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal

from ._util import LOOPBACK, TestbedError

FaultKind = Literal["reset", "stall", "flip", "ignore_range", "wrong_range", "status"]
BODY_FAULTS: frozenset[str] = frozenset({"reset", "stall", "flip"})
RANGE_FAULTS: frozenset[str] = frozenset({"ignore_range", "wrong_range"})
STATUS_FAULTS: frozenset[str] = frozenset({"status"})
_READ = 64 << 10
_SENT_WAIT = 5.0  # seconds to wait for the peer to acknowledge what was sent before a reset


@dataclass
class Fault:
    """One misbehaviour: on requests whose target contains ``match``, ``times`` times (None: always)."""

    match: str
    kind: FaultKind
    at: int = 0
    times: int | None = 1
    fired: int = 0
    #: a ``status`` fault's answer: its status and extra headers
    status: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)

    def applies(self, target: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        needles = {self.match, self.match.partition(":")[2]} - {""}
        return any(needle in target for needle in needles)


@dataclass
class FrontRequest:
    """One request the front relayed; ``status`` and ``body_bytes`` fill in as the answer passes."""

    method: str
    target: str
    range: str | None
    fault: FaultKind | None = None
    status: int = 0
    body_bytes: int = 0
    authorization: str | None = None
    #: when the request came (``time.time()``), so a soak can tell which requests overlapped
    time: float = field(default_factory=time.time)


class _Reset(Exception):
    """The answer was cut by a fault; the client connection is gone."""


def _header(lines: list[bytes], name: bytes) -> str | None:
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def _without(lines: list[bytes], name: bytes) -> list[bytes]:
    return [lines[0], *(line for line in lines[1:] if line.partition(b":")[0].strip().lower() != name)]


def _shifted(value: str) -> str | None:
    """``bytes=N-M`` asked for one byte later: the target's 206 then names other bytes than were asked."""
    first, sep, last = value.removeprefix("bytes=").partition("-")
    return f"bytes={int(first) + 1}-{last}" if sep and first.isdigit() else None


def _head(lines: list[bytes]) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """A message head split into lines, or None when the peer closed before a new one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("the peer closed in the middle of a head") from None
        return None
    return head[:-4].split(b"\r\n")


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet (Linux SIOCOUTQ)."""
    out = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out)
    return out[0]


class _Answer:
    """The body of one answer on its way to the client, with the fault (if any) applied to it."""

    def __init__(
        self, front: FaultFront, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, entry: FrontRequest
    ) -> None:
        self.front = front
        self.reader = reader
        self.writer = writer
        self.entry = entry
        self.fault: Fault | None = None
        self.started = time.monotonic()

    async def payload(self, data: bytes) -> None:
        """Send body bytes (``data`` is payload, not framing); raises _Reset when a fault ends the answer."""
        fault, start = self.fault, self.entry.body_bytes
        if fault is not None and fault.kind == "flip" and start <= fault.at < start + len(data):
            index = fault.at - start
            data = data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]
        if fault is not None and fault.kind in ("reset", "stall") and start + len(data) >= fault.at:
            self.writer.write(data[: fault.at - start])
            self.entry.body_bytes = fault.at
            await self.writer.drain()
            await (self._reset() if fault.kind == "reset" else self._stall())
            raise _Reset
        self.writer.write(data)
        self.entry.body_bytes += len(data)
        await self.writer.drain()
        if (rate := self.front.rate) is not None:
            ahead = self.entry.body_bytes / rate - (time.monotonic() - self.started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def framing(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _reset(self) -> None:
        sock: socket.socket = self.writer.get_extra_info("socket")
        deadline = time.monotonic() + _SENT_WAIT
        while _unacknowledged(sock) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def _stall(self) -> None:
        self.front.held_connections += 1
        try:
            while await self.reader.read(_READ):
                pass  # nothing more is sent; wait until the client goes away
        finally:
            self.front.held_connections -= 1
        self.writer.transport.abort()


class FaultFront:
    """A byte-for-byte HTTP/1.1 front for ``target`` that injects faults on command (see the module)."""

    def __init__(
        self,
        target: str,
        *,
        rewrite_location: tuple[str, str] | None = None,
        location_query: Callable[[], str] | None = None,
        rate: float | None = None,
    ) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").rpartition(":")
        self.target_host, self.target_port = host, int(port)
        self.rewrite_location = rewrite_location
        self.location_query = location_query
        #: body bytes per second of each answer (None: unpaced)
        self.rate = rate
        self.port = 0
        #: client connections now open, and those of them a stall holds
        self.open_connections = 0
        self.held_connections = 0
        self._faults: list[Fault] = []
        self._requests: list[FrontRequest] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name=f"fault-front-{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # ------------------------------------------------------------------ commands and counts
    def fault(
        self,
        match: str,
        kind: FaultKind,
        *,
        at: int = 0,
        times: int | None = 1,
        status: int = 503,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Misbehave on requests whose target contains ``match`` (a digest also by its hex)."""
        fault = Fault(match, kind, at, times, status=status, headers=dict(headers or {}))
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Forget every fault and every request seen."""
        with self._lock:
            self._faults.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[FrontRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, match: str, *, statuses: tuple[int, ...] = (200, 206)) -> list[FrontRequest]:
        """The requests whose target contains ``match`` (a digest also by its hex) answered with ``statuses``."""
        probe = Fault(match, "flip", times=None)
        return [r for r in self.requests if probe.applies(r.target) and r.status in statuses]

    def _take(self, target: str, kinds: frozenset[str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and fault.applies(target):
                    fault.fired += 1
                    return fault
        return None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultFront:
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise TestbedError("the fault front did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(listen())
        self._loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the relay
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while (lines := await _read_head(reader)) is not None:
                if upstream is None or upstream[0].at_eof():
                    upstream = await asyncio.open_connection(self.target_host, self.target_port)
                keep = await self._exchange(lines, reader, writer, *upstream)
                if not keep:
                    break
        except (_Reset, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            if upstream is not None:
                upstream[1].transport.abort()
            writer.close()

    async def _exchange(
        self,
        lines: list[bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        """Relay one request and its answer; whether both connections may carry another."""
        method, target, _ = lines[0].decode("latin-1").split(" ", 2)
        entry = FrontRequest(method, target, _header(lines, b"range"), authorization=_header(lines, b"authorization"))
        with self._lock:
            self._requests.append(entry)
        if (canned := self._take(target, STATUS_FAULTS)) is not None:
            await self._answer_status(lines, reader, writer, entry, canned)
            return True
        if entry.range is not None and (taken := self._take(target, RANGE_FAULTS)) is not None:
            entry.fault = taken.kind
            lines = _without(lines, b"range")
            if taken.kind == "wrong_range" and (shifted := _shifted(entry.range)) is not None:
                lines.append(b"Range: " + shifted.encode("latin-1"))
        up_writer.write(_head(lines))
        length = _header(lines, b"content-length")
        if length is not None and int(length) > 0:
            up_writer.write(await reader.readexactly(int(length)))
        await up_writer.drain()

        head = await _read_head(up_reader)
        if head is None:
            raise ConnectionError("the target closed without answering")
        entry.status = int(head[0].split(b" ")[1])
        head = self._rewritten(head)
        answer = _Answer(self, reader, writer, entry)
        if entry.status in (200, 206) and (fault := self._take(target, BODY_FAULTS)) is not None:
            entry.fault, answer.fault = fault.kind, fault
        await answer.framing(_head(head))
        until_close = await self._body(method, head, entry.status, up_reader, answer)
        closing = [(_header(h, b"connection") or "").lower() == "close" for h in (lines, head)]
        return not until_close and not any(closing)

    @staticmethod
    async def _answer_status(
        lines: list[bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        entry: FrontRequest,
        fault: Fault,
    ) -> None:
        """Answer a ``status`` fault from the front itself; the request's body is read and dropped."""
        length = _header(lines, b"content-length")
        if length is not None and int(length) > 0:
            await reader.readexactly(int(length))
        try:
            phrase = HTTPStatus(fault.status).phrase
        except ValueError:
            phrase = "Fault"
        code = "TOOMANYREQUESTS" if fault.status == 429 else "UNAVAILABLE"
        error = {"code": code, "message": f"fault front: {fault.status} {phrase}", "detail": None}
        body = b"" if entry.method == "HEAD" else json.dumps({"errors": [error]}).encode()
        head = [
            f"HTTP/1.1 {fault.status} {phrase}".encode("latin-1"),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            *(f"{name}: {value}".encode("latin-1") for name, value in fault.headers.items()),
        ]
        entry.status, entry.fault = fault.status, fault.kind
        writer.write(_head(head) + body)
        await writer.drain()

    def _rewritten(self, head: list[bytes]) -> list[bytes]:
        location = _header(head, b"location")
        if self.rewrite_location is None or location is None or not location.startswith(self.rewrite_location[0]):
            return head
        old, new = self.rewrite_location
        location = new + location[len(old) :]
        if self.location_query is not None:
            location += ("&" if "?" in location else "?") + self.location_query()
        return [*_without(head, b"location"), b"Location: " + location.encode("latin-1")]

    async def _body(
        self, method: str, head: list[bytes], status: int, up: asyncio.StreamReader, answer: _Answer
    ) -> bool:
        """Relay the answer's body as it is framed; True when it ran until the target closed."""
        if method == "HEAD" or status < 200 or status in (204, 304):
            return False
        if "chunked" in (_header(head, b"transfer-encoding") or "").lower():
            await self._chunked(up, answer)
            return False
        length = _header(head, b"content-length")
        if length is None:
            while data := await up.read(_READ):
                await answer.payload(data)
            return True
        remaining = int(length)
        while remaining > 0:
            data = await up.read(min(_READ, remaining))
            if not data:
                raise ConnectionError("the target closed before the end of the body")
            remaining -= len(data)
            await answer.payload(data)
        return False

    @staticmethod
    async def _chunked(up: asyncio.StreamReader, answer: _Answer) -> None:
        while True:
            size_line = await up.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            await answer.framing(size_line)
            if size == 0:
                while (trailer := await up.readuntil(b"\r\n")) != b"\r\n":
                    await answer.framing(trailer)
                await answer.framing(b"\r\n")
                return
            remaining = size
            while remaining > 0:
                data = await up.read(min(_READ, remaining))
                if not data:
                    raise ConnectionError("the target closed in the middle of a chunk")
                remaining -= len(data)
                await answer.payload(data)
            await answer.framing(await up.readexactly(2))
