"""A link front: a byte-for-byte HTTP/1.1 relay to one test bed server, with the bandwidth of one link.

``LinkFront(target, rate=100e6)`` listens on 127.0.0.1 (its own thread and asyncio loop, like
:class:`~tests.testbed.faults.FaultFront`) and relays each request to ``target`` (the CDN, say:
``http://127.0.0.1:PORT``) as it came, and the answer as the target sent it. Body bytes pass a
token bucket shared by **all** connections: together they never get more than ``rate`` bytes per
second (after a burst of at most ``burst`` bytes), so the cap is the link, not each connection,
and 32 clients of the front share 100 MB/s as 32 clients behind one 800 Mbit/s uplink would.
Heads and chunk framing are not counted against the cap (they are a few hundred bytes).

Per path (the request target without its query) it counts requests, GETs, HEADs and body bytes
sent, so a benchmark can say how many bytes crossed the link::

    with LinkFront(tb.cdn_url) as link:
        ...
        link.body_bytes_for(digest)     # body bytes of every answer whose path names the digest
        link.gets_for(digest)
        link.reset()                    # counts back to zero

``active_answers`` is the number of answers whose body is still on its way (``wait_idle()``
waits for it to reach zero, so counts read after it are final); ``open_connections`` and
``peak_connections`` count client connections.

The relay reads 256 KiB at a time, so it costs little CPU beside the servers it measures;
``cpu_seconds()`` says how much (its thread's user + system time).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._util import LOOPBACK, TestbedError
from .faults import _head, _header, _read_head

_READ = 256 << 10
#: the upstream reader's buffer: large enough that a read returns a whole _READ
_UPSTREAM_LIMIT = 1 << 20


@dataclass
class PathCounts:
    """What the front relayed for one path."""

    requests: int = 0
    gets: int = 0
    heads: int = 0
    body_bytes: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


class TokenBucket:
    """The shared link: ``take(n)`` returns once ``n`` more bytes fit in ``rate`` bytes/s.

    A virtual clock (GCRA): the link is busy until ``_free_at``; a take books the next ``n / rate``
    seconds and waits until they have passed. Takers are served in the order they ask, which keeps
    connections fair. Idle time builds credit of at most ``burst`` bytes. Only the front's loop uses it.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._free_at = 0.0

    async def take(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(self._free_at, now - self.burst / self.rate)
        self._free_at = start + n / self.rate
        delay = self._free_at - now
        if delay > 0:
            await asyncio.sleep(delay)


class LinkFront:
    """A byte-for-byte HTTP/1.1 front for ``target`` capped at ``rate`` bytes/s in all (see the module)."""

    def __init__(self, target: str, *, rate: float = 100e6, burst: int | None = None) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").rpartition(":")
        self.target_host, self.target_port = host, int(port)
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(_READ, int(rate / 100))
        self.port = 0
        self.open_connections = 0
        self.peak_connections = 0
        self.active_answers = 0
        self._bucket = TokenBucket(rate, self.burst)
        self._paths: dict[str, PathCounts] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name=f"link-front-{port}", daemon=True)
        self._tid = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # ------------------------------------------------------------------ counts
    def paths(self) -> dict[str, PathCounts]:
        """A copy of the counts per path."""
        with self._lock:
            return {
                path: PathCounts(c.requests, c.gets, c.heads, c.body_bytes, dict(c.statuses))
                for path, c in self._paths.items()
            }

    def _matching(self, match: str) -> list[PathCounts]:
        needles = {match, match.partition(":")[2]} - {""}
        return [c for path, c in self.paths().items() if any(needle in path for needle in needles)]

    def body_bytes_for(self, match: str) -> int:
        """Body bytes sent for the paths containing ``match`` (a digest ``sha256:<hex>`` also by its hex)."""
        return sum(c.body_bytes for c in self._matching(match))

    def gets_for(self, match: str) -> int:
        return sum(c.gets for c in self._matching(match))

    @property
    def body_bytes(self) -> int:
        with self._lock:
            return sum(c.body_bytes for c in self._paths.values())

    def reset(self) -> None:
        """Every count back to zero (the connections stay open)."""
        with self._lock:
            self._paths.clear()
        self.peak_connections = self.open_connections

    def cpu_seconds(self) -> float | None:
        """CPU seconds (user + system) the front's thread has used so far (Linux; None elsewhere)."""
        try:
            text = Path(f"/proc/self/task/{self._tid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rfind(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no answer is on its way; whether that happened within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.active_answers and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.active_answers

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LinkFront:
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise TestbedError("the link front did not start")
        return self

    def _run(self) -> None:
        self._tid = threading.get_native_id()
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            self._server = await asyncio.start_server(self._serve, LOOPBACK, 0, backlog=1024)
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

    def __enter__(self) -> LinkFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the relay
    def _counts(self, target: str) -> PathCounts:
        path = target.partition("?")[0]
        with self._lock:
            counts = self._paths.get(path)
            if counts is None:
                counts = self._paths[path] = PathCounts()
            return counts

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while (lines := await _read_head(reader)) is not None:
                if upstream is None or upstream[0].at_eof():
                    if upstream is not None:
                        upstream[1].transport.abort()
                    upstream = await asyncio.open_connection(self.target_host, self.target_port, limit=_UPSTREAM_LIMIT)
                if not await self._exchange(lines, reader, writer, *upstream):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
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
        counts = self._counts(target)
        with self._lock:
            counts.requests += 1
            counts.gets += method == "GET"
            counts.heads += method == "HEAD"
        up_writer.write(_head(lines))
        length = _header(lines, b"content-length")
        if length is not None and int(length) > 0:
            up_writer.write(await reader.readexactly(int(length)))
        await up_writer.drain()

        head = await _read_head(up_reader)
        if head is None:
            raise ConnectionError("the target closed without answering")
        status = int(head[0].split(b" ")[1])
        with self._lock:
            counts.statuses[status] = counts.statuses.get(status, 0) + 1
        writer.write(_head(head))
        self.active_answers += 1
        try:
            until_close = await self._body(method, head, status, up_reader, writer, counts)
        finally:
            self.active_answers -= 1
        closing = [(_header(h, b"connection") or "").lower() == "close" for h in (lines, head)]
        return not until_close and not any(closing)

    async def _payload(self, writer: asyncio.StreamWriter, data: bytes, counts: PathCounts) -> None:
        await self._bucket.take(len(data))
        writer.write(data)
        with self._lock:
            counts.body_bytes += len(data)
        await writer.drain()

    async def _body(
        self,
        method: str,
        head: list[bytes],
        status: int,
        up: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counts: PathCounts,
    ) -> bool:
        """Relay the answer's body as it is framed; True when it ran until the target closed."""
        if method == "HEAD" or status < 200 or status in (204, 304):
            await writer.drain()
            return False
        if "chunked" in (_header(head, b"transfer-encoding") or "").lower():
            await self._chunked(up, writer, counts)
            return False
        length = _header(head, b"content-length")
        if length is None:
            while data := await up.read(_READ):
                await self._payload(writer, data, counts)
            return True
        remaining = int(length)
        while remaining > 0:
            data = await up.read(min(_READ, remaining))
            if not data:
                raise ConnectionError("the target closed before the end of the body")
            remaining -= len(data)
            await self._payload(writer, data, counts)
        await writer.drain()
        return False

    async def _chunked(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: PathCounts) -> None:
        while True:
            size_line = await up.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            writer.write(size_line)
            if size == 0:
                while (trailer := await up.readuntil(b"\r\n")) != b"\r\n":
                    writer.write(trailer)
                writer.write(b"\r\n")
                await writer.drain()
                return
            remaining = size
            while remaining > 0:
                data = await up.read(min(_READ, remaining))
                if not data:
                    raise ConnectionError("the target closed in the middle of a chunk")
                remaining -= len(data)
                await self._payload(writer, data, counts)
            writer.write(await up.readexactly(2))
