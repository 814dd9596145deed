"""A raw HTTP/1.1 upstream for real-socket tests: each misbehaviour is exact.

It serves one 8 MiB blob four ways, chosen by digest: whole (D_FULL), dropping the
connection a quarter of the way (D_BREAK), stalling after an eighth until the peer
goes away (D_STALL), or slowly, over about two seconds (D_SLOW). It counts its open
connections so tests can see what the gateway leaves behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading

from tests.support import free_port

SIZE = 8 << 20  # 8 MiB
CHUNK = bytes(range(256)) * 256  # 64 KiB
BODY_DIGEST = hashlib.sha256(CHUNK * (SIZE // len(CHUNK))).hexdigest()
D_FULL = "sha256:" + BODY_DIGEST  # the real digest: whole pulls of it are verified like any blob
D_BREAK = "sha256:" + "2" * 64
D_STALL = "sha256:" + "3" * 64
D_SLOW = "sha256:" + "4" * 64


class RawUpstream:
    """An HTTP/1.1 upstream that serves one blob three ways and counts its open connections."""

    def __init__(self) -> None:
        self.port = free_port()
        self.open_connections = 0
        self.closed_early = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                if path == "/v2/":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                digest = path.rsplit("/", 1)[1]
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n" % SIZE
                )
                sent = 0
                while sent < SIZE:
                    if digest == D_BREAK and sent >= SIZE // 4:
                        writer.transport.abort()  # the upstream dies mid-body
                        return
                    if digest == D_STALL and sent >= SIZE // 8:
                        # Never another byte; only notice when the peer closes.
                        while not reader.at_eof():
                            await asyncio.sleep(0.02)
                        raise ConnectionResetError
                    writer.write(CHUNK)
                    sent += len(CHUNK)
                    await writer.drain()
                    if digest == D_SLOW:
                        await asyncio.sleep(2 / (SIZE // len(CHUNK)))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_early += 1
        finally:
            self.open_connections -= 1
            writer.close()

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
