"""A bare relay of one blob GET, as cheap as Python on uvloop can make it: the floor under issue #22.

``python -m bench.floor_relay --port P --upstream http://registry [--verify]`` answers ``GET /v2/...``
the way the run's nginx does: the request goes to the registry with the client's Authorization, a
redirect is followed by the relay itself (to the CDN, without the Authorization), and the body is
streamed back with its Content-Length. With ``--verify`` every byte is hashed on the way, off the
event loop in 1 MiB batches queued to one thread (the relay never waits for the hash before the
end), and the last read is held back until the digest in the path matched.

It does nothing else: no routing, no token, no window, no sharing, no resume, no logs, no metrics,
one request per connection, a body's bytes written to the client as the event loop read them. So a
lone pull through it measures what the machine's loopback, uvloop's reads and writes and (verified)
sha256 cost together, beside nginx in the same run: whatever the gateway spends above it is its own.
A test bed's tool, not a product: it trusts its upstream, and bad input just closes the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import uvloop

BATCH = 1 << 20
ARENA = 1 << 20
# One thread, so the batches are hashed in the order they were handed over: a batch goes to the
# pool as soon as it is full and the relay never waits for the hash before the end (sha256 is
# faster than the relay here; a product would bound what is queued, this floor does not).
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest")


def _head_end(buffer: bytearray) -> int:
    return buffer.find(b"\r\n\r\n")


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    first, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return first, fields


class _Hash:
    """sha256 of a stream in the pool, batch after batch, never waited for until the end."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.pending: list[memoryview] = []
        self.pending_bytes = 0
        self.last: asyncio.Future[None] | None = None

    def feed(self, chunk: memoryview) -> None:
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if self.pending_bytes >= BATCH:
            self.submit()

    def submit(self) -> None:
        batch, self.pending, self.pending_bytes = self.pending, [], 0
        update = self.hasher.update

        def run() -> None:
            for chunk in batch:
                update(chunk)

        self.last = asyncio.get_running_loop().run_in_executor(_pool, run)

    async def hexdigest(self) -> str:
        if self.pending:
            self.submit()
        if self.last is not None:
            await self.last
        return f"sha256:{self.hasher.hexdigest()}"


class _Upstream(asyncio.BufferedProtocol):
    """One upstream response: a redirect is followed, a 200's body goes to ``client``.

    Reads land in 1 MiB buffers of its own and go on as views of them, as the gateway's do."""

    def __init__(self, relay: _Client, digest: str | None) -> None:
        self.relay = relay
        self.head = bytearray()
        self.transport: asyncio.Transport | None = None
        self.left = -1  # body bytes still to come; -1 while the head is read
        self.hash = _Hash() if digest else None
        self.digest = digest
        self.held: memoryview | None = None
        self.arena = memoryview(b"")
        self.offset = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.arena) - self.offset < ARENA // 4:
            self.arena, self.offset = memoryview(bytearray(ARENA)), 0
        return self.arena[self.offset :]

    def buffer_updated(self, nbytes: int) -> None:
        start, self.offset = self.offset, self.offset + nbytes
        self.data_received(self.arena[start : self.offset])

    def data_received(self, data: memoryview) -> None:
        if self.left < 0:
            self.head += data
            end = _head_end(self.head)
            if end < 0:
                return
            status, fields = _headers(bytes(self.head[:end]))
            rest = bytes(self.head[end + 4 :])
            code = int(status.split()[1])
            if code in (301, 302, 303, 307, 308):
                assert self.transport is not None
                self.transport.close()
                asyncio.ensure_future(self.relay.fetch(fields["location"], None, self.digest))
                return
            self.left = int(fields.get("content-length", "0"))
            self.relay.start(code, fields)
            if code != 200:
                self.hash = None
            data = memoryview(rest)
            if not data:
                return
        self.left -= len(data)
        if self.hash is None:
            self.relay.write(data)
        else:
            self.hash.feed(data)
            if self.held is not None:
                self.relay.write(self.held)
            self.held = data  # the last read goes out once the digest matched
        if self.left <= 0:
            asyncio.ensure_future(self._finish())

    async def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.hash is not None:
            if await self.hash.hexdigest() != self.digest:
                self.relay.abort()
                return
            if self.held is not None:
                self.relay.write(self.held)
        self.relay.end()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.left > 0:
            self.relay.abort()


class _Client(asyncio.Protocol):
    """One client connection, one GET."""

    def __init__(self, upstream: str, verify: bool) -> None:
        self.upstream = upstream
        self.verify = verify
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.source: asyncio.Transport | None = None
        self.asked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.asked:
            return
        self.buffer += data
        end = _head_end(self.buffer)
        if end < 0:
            return
        self.asked = True
        first, fields = _headers(bytes(self.buffer[:end]))
        path = first.split()[1]
        last = path.rsplit("/", 1)[-1]
        digest = last if "/blobs/" in path and last.startswith("sha256:") and self.verify else None
        asyncio.ensure_future(self.fetch(self.upstream + path, fields.get("authorization"), digest))

    async def fetch(self, url: str, authorization: str | None, digest: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Upstream(self, digest), parts.hostname, parts.port or 80
            )
        except OSError:
            self.abort()
            return
        self.source = transport  # type: ignore[assignment]
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        auth = f"Authorization: {authorization}\r\n" if authorization else ""
        transport.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n{auth}Connection: close\r\n\r\n".encode())  # type: ignore[attr-defined]

    def start(self, code: int, fields: dict[str, str]) -> None:
        head = [f"HTTP/1.1 {code} X", "Connection: close", f"Content-Length: {fields.get('content-length', '0')}"]
        kept = ("content-type", "docker-content-digest", "www-authenticate")
        head += [f"{k}: {fields[k]}" for k in kept if k in fields]
        self.write(("\r\n".join(head) + "\r\n\r\n").encode())

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def end(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # back-pressure: a slow client pauses the upstream
    def pause_writing(self) -> None:
        if self.source is not None:
            self.source.pause_reading()

    def resume_writing(self) -> None:
        if self.source is not None:
            self.source.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.source is not None:
            self.source.close()


async def serve(host: str, port: int, upstream: str, verify: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream, verify), host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream.rstrip("/"), args.verify))


if __name__ == "__main__":
    main()
