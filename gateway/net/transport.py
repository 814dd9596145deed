"""A lean HTTP/1.1 transport for httpx, built for relaying large bodies.

Why: with httpx's default transport (httpcore + h11) every 64 KiB of a blob passes
through h11's buffers, several Python-level copies and an anyio stream; measured here,
that costs about 1.6 CPU-seconds per GiB and caps one stream near a third of what
nginx relays (docs/performance.md). This transport keeps httpx's API, so auth,
redirects and policy code are unchanged, and does the minimum per byte:

- an ``asyncio.Protocol`` receives what the event loop read from the socket, and for
  a ``Content-Length`` body hands those very ``bytes`` objects to the relay, which
  writes them to the client: no copy in Python between the two sockets;
- back-pressure: reading pauses while more than ``HIGH_WATER`` bytes wait for the
  client, so a slow client never makes the gateway buffer a blob (``connections.py``: the
  connection's receive side and the keep-alive pool);
- chunked bodies and bodies delimited by the end of the connection are decoded too;
  they are rare for blobs and take a slower, still bounded, path.

It speaks only what the gateway sends: GET and HEAD without a body, and POST with a body
it holds whole (the OAuth2 token form, ``passthrough.py``) and its Content-Length (RFC 9112
6.2), HTTP/1.1, with a keep-alive pool per origin. TLS uses the same certificate verification
as httpx (``SSL_CERT_FILE`` honoured). Egress proxies from the environment keep using httpx's
own transport (httpx mounts them before this one is consulted).

Connections are made to an address the route's ``AddressGuard`` returned
(``netguard.py``): names are resolved there, every address must pass, and TLS still
verifies the certificate against the host name.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import typing
from collections.abc import AsyncIterator, Callable

import httpx

from gateway.http.util import Chunk
from gateway.net.connections import _Connection, _Pool
from gateway.net.netguard import AddressGuard, AddressRefused, close_socket, race, tcp_socket
from gateway.settings import PoolLimits

MAX_HEAD = 64 << 10  # status line + headers
MAX_CHUNK_LINE = 4096


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for every route: each loads the whole CA bundle (about 1 MiB)."""
    return httpx.create_ssl_context(trust_env=True)


class _ProtocolError(Exception):
    pass


class _Head(typing.NamedTuple):
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    content_length: int | None
    chunked: bool


# RFC 9112 7.1: chunk-size = 1*HEXDIG (int(x, 16) would also take "+5", "0x5", "1_0", "-1").
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
# No real body is near 10**18 bytes; the cap also keeps int() away from its digit limit.
_MAX_LENGTH_DIGITS = 18
# RFC 9110 5.5, RFC 9112 2.2: CR, LF and NUL in a field value or the reason phrase must be
# refused (a bare LF would otherwise turn a field line into part of the reason).
_FORBIDDEN_IN_HEAD_RE = re.compile(rb"[\r\n\x00]")


def _parse_head(raw: bytes) -> _Head:
    if _FORBIDDEN_IN_HEAD_RE.search(raw.replace(b"\r\n", b"")):
        raise _ProtocolError("CR, LF or NUL inside the response head")
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise _ProtocolError("malformed status line")
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    chunked = False
    connection = b""
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise _ProtocolError("malformed header line")
        value = value.strip()
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit() or len(value.lstrip(b"0")) > _MAX_LENGTH_DIGITS:
                raise _ProtocolError("invalid Content-Length")
            if content_length is not None and content_length != int(value):
                raise _ProtocolError("invalid Content-Length")
            content_length = int(value)
        elif lower == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            if not chunked:
                raise _ProtocolError("unsupported Transfer-Encoding")
        elif lower == b"connection":
            connection += b"," + value.lower()  # field lines combine (RFC 9110 5.3)
        headers.append((name, value))
    if chunked and content_length is not None:
        # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and an intermediary must
        # remove it: the client gets the decoded body, not the upstream's framing.
        content_length = None
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    keep_alive = parts[0] == b"HTTP/1.1" and b"close" not in connection
    return _Head(status, reason, headers, keep_alive, content_length, chunked)


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; gives the connection back (or closes it) when done."""

    def __init__(
        self,
        conn: _Connection,
        head: _Head,
        first: bytes,
        *,
        request: httpx.Request,
        read_timeout: float | None,
        finish: Callable[[_Connection, bool], None],
        no_body: bool,
    ) -> None:
        self.conn = conn
        self.head = head
        self.first = first
        self.request = request
        self.read_timeout = read_timeout
        self._finish = finish
        self._done = no_body
        self._finished = False
        if no_body:
            conn.unread(first)
            self._release(clean=not first)

    def _release(self, clean: bool) -> None:
        if not self._finished:
            self._finished = True
            self._finish(self.conn, clean and self.head.keep_alive)

    # The pieces are Chunk, views of the connection's arena, though httpx's stream says bytes: the
    # relay takes them as Chunk from ``aiter_raw`` (``Chunk`` in ``http/util.py``).
    async def __aiter__(self) -> AsyncIterator[Chunk]:  # type: ignore[override]
        if self._done:
            return
        part: Chunk
        try:
            if self.head.chunked:
                async for part in self._chunked():
                    yield part
            elif self.head.content_length is not None:
                async for part in self._sized(self.head.content_length):
                    yield part
            else:
                async for part in self._until_close():
                    yield part
        except TimeoutError:
            self._release(clean=False)
            raise httpx.ReadTimeout("upstream went silent", request=self.request) from None
        except _ProtocolError as exc:
            self._release(clean=False)
            raise httpx.RemoteProtocolError(str(exc), request=self.request) from None
        self._done = True

    async def _next(self) -> Chunk:
        data: Chunk
        if self.first:
            data, self.first = self.first, b""
            return data
        data = await self.conn.receive(self.read_timeout)
        if not data:
            self._release(clean=False)
            if self.conn.error is not None:
                raise httpx.ReadError(f"upstream connection failed: {self.conn.error}", request=self.request)
            raise _ProtocolError("upstream closed the connection before the end of the body")
        return data

    async def _sized(self, remaining: int) -> AsyncIterator[Chunk]:
        # The hot path: every piece the event loop read is passed on as it is.
        while remaining > 0:
            data = await self._next()
            if len(data) > remaining:
                self.conn.unread(data[remaining:])  # the peer sent more than it announced
                data = data[:remaining]
            remaining -= len(data)
            yield data
        self._release(clean=self.conn.reusable())

    async def _until_close(self) -> AsyncIterator[Chunk]:
        data: Chunk
        if self.first:
            data, self.first = self.first, b""
            yield data
        while True:
            data = await self.conn.receive(self.read_timeout)
            if not data:
                break
            yield data
        self._release(clean=False)
        if self.conn.error is not None:
            # A close-delimited body cut by a reset is incomplete, not complete (RFC 9112 8).
            raise httpx.ReadError(f"upstream connection failed: {self.conn.error}", request=self.request)

    async def _chunked(self) -> AsyncIterator[bytes]:
        buffer = b""
        while True:
            while b"\r\n" not in buffer:
                if len(buffer) > MAX_CHUNK_LINE:
                    raise _ProtocolError("chunk size line too long")
                buffer += await self._next()  # bytes + a view is bytes: the parse below needs bytes
            line, _, buffer = buffer.partition(b"\r\n")
            size_text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE_RE.match(size_text):
                raise _ProtocolError("invalid chunk size")
            size = int(size_text, 16)
            if size == 0:
                # Trailers, then an empty line.
                while True:
                    while b"\r\n" not in buffer:
                        if len(buffer) > MAX_HEAD:
                            raise _ProtocolError("trailers too long")
                        buffer += await self._next()
                    trailer, _, buffer = buffer.partition(b"\r\n")
                    if not trailer:
                        break
                self.conn.unread(buffer)
                self._release(clean=not buffer and self.conn.reusable())
                return
            while size > 0:
                if not buffer:
                    buffer = bytes(await self._next())
                part, buffer = buffer[:size], buffer[size:]
                size -= len(part)
                yield part
            while len(buffer) < 2:
                buffer += await self._next()
            if buffer[:2] != b"\r\n":
                raise _ProtocolError("missing CRLF after a chunk")
            buffer = buffer[2:]

    async def aclose(self) -> None:
        # A body not read to the end leaves the connection mid-message: it cannot be reused.
        self._release(clean=self._done and self.conn.reusable())


class LeanTransport(httpx.AsyncBaseTransport):
    """httpx transport: HTTP/1.1 GET/HEAD (and POST with a body held whole), a keep-alive pool, an address guard."""

    def __init__(
        self,
        *,
        limits: PoolLimits,
        guard: AddressGuard | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._pool = _Pool(limits.max_connections, limits.max_keepalive_connections, limits.keepalive_expiry)
        self._guard = guard or AddressGuard((), allow_private=True)
        self._ssl = ssl_context or shared_ssl_context()

    async def aclose(self) -> None:
        self._pool.close_all()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        method = request.method
        content = b""
        if method == "POST":
            # Only a body held whole (httpx's ByteStream, ``content=bytes``); never a stream.
            if not isinstance(request.stream, httpx.ByteStream):
                raise httpx.UnsupportedProtocol(
                    "a streamed request body is not sent by this transport", request=request
                )
            content = request.read()
        elif method not in ("GET", "HEAD"):
            raise httpx.UnsupportedProtocol(f"{method} is not sent by this transport", request=request)
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.scheme
        host = url.host
        port = url.port or (443 if scheme == "https" else 80)
        origin = (scheme, host, port)
        head_bytes = self._request_head(request, content if method == "POST" else None)
        pool = self._pool
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await pool.slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection", request=request) from None
        conn: _Connection | None = None
        try:
            for attempt in range(2):
                # RFC 9112 9.3.1: a POST is not retried on a new connection if a kept-alive one turns out
                # closed (it may have been applied), so it never takes one: it opens its own.
                reused = pool.take_idle(origin) if method != "POST" else None
                conn = reused or await self._connect(request, scheme, host, port, timeouts.get("connect"))
                assert conn.transport is not None
                if content:
                    conn.transport.writelines((head_bytes, content))  # the body right after the head
                else:
                    conn.transport.write(head_bytes)
                try:
                    head, rest = await self._read_head(conn, timeouts.get("read"))
                except _StaleConnection:
                    conn.close()
                    if reused is None or attempt:
                        raise httpx.RemoteProtocolError(
                            "upstream closed the connection without answering", request=request
                        ) from None
                    continue  # a kept-alive connection the server had closed: once more, on a new one
                break
        except BaseException:
            if conn is not None:
                conn.close()
            pool.slots.release()
            raise

        def finish(done: _Connection, reuse: bool) -> None:
            if reuse:
                pool.give_back(origin, done)
            else:
                done.close()
            pool.slots.release()

        assert conn is not None
        no_body = request.method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200
        if head.content_length == 0:
            no_body = True
        body = _Body(
            conn,
            head,
            rest,
            request=request,
            read_timeout=timeouts.get("read"),
            finish=finish,
            no_body=no_body,
        )
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason.encode("latin-1")},
        )

    @staticmethod
    def _request_head(request: httpx.Request, body: bytes | None = None) -> bytes:
        """The request line and headers; with ``body`` (a POST), its Content-Length, always (RFC 9110 8.6)."""
        target = request.url.raw_path
        lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
        for name, value in request.headers.raw:
            if name.lower() in (b"content-length", b"transfer-encoding"):
                continue
            lines.append(name + b": " + value)
        if body is not None:
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _connect(
        self, request: httpx.Request, scheme: str, host: str, port: int, timeout: float | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                try:
                    addresses = await self._guard.addresses(host, port)
                except AddressRefused as exc:
                    # Chained, so that upstream_errors.py knows it by its type.
                    raise httpx.ConnectError(str(exc), request=request) from exc
                except OSError as exc:
                    raise httpx.ConnectError(f"cannot resolve {host}: {exc}", request=request) from None
                try:
                    # RFC 8305: the checked addresses raced, so one that stalls costs 250 ms, not
                    # this timeout; only TCP is raced, TLS runs on the winner alone.
                    sock = await race(addresses, lambda address: tcp_socket(address, port), close_socket)
                except OSError as exc:
                    raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}", request=request) from None
                # The transport owns the socket from here, and closes it if TLS fails.
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop),
                    sock=sock,
                    ssl=self._ssl if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None,
                )
                return protocol
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from None
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS with {host} failed: {exc.reason}", request=request) from None

    @staticmethod
    async def _read_head(conn: _Connection, timeout: float | None) -> tuple[_Head, bytes]:
        data = b""
        first = True
        try:
            while True:
                end = data.find(b"\r\n\r\n")
                if end > MAX_HEAD or (end < 0 and len(data) > MAX_HEAD):
                    raise httpx.RemoteProtocolError("upstream response headers too large")
                if end >= 0:
                    head = _parse_head(data[:end])
                    data = data[end + 4 :]
                    if 100 <= head.status < 200 and head.status != 101:
                        continue  # an interim answer (100 Continue): the real one follows
                    return head, data
                chunk = await conn.receive(timeout)
                if not chunk:
                    if first:
                        raise _StaleConnection
                    raise httpx.RemoteProtocolError("upstream closed the connection in the middle of the headers")
                first = False
                data += chunk
        except TimeoutError:
            raise httpx.ReadTimeout("upstream sent no response headers in time") from None
        except _ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None


class _StaleConnection(Exception):
    """The connection closed before a single byte of the answer: safe to retry a GET/HEAD."""
