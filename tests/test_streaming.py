"""Streaming over real sockets: a real uvicorn gateway in front of a raw upstream server.

The upstream is a few lines of asyncio so that each misbehaviour is exact: a body
that stalls forever, a connection that drops mid-body. (httpx's ASGITransport
buffers whole responses, so none of this can be observed in process.)
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import free_port, run_gateway

SIZE = 8 << 20  # 8 MiB
CHUNK = bytes(range(256)) * 256  # 64 KiB
BODY_DIGEST = hashlib.sha256(CHUNK * (SIZE // len(CHUNK))).hexdigest()
D_FULL = "sha256:" + "1" * 64
D_BREAK = "sha256:" + "2" * 64
D_STALL = "sha256:" + "3" * 64


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


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as u:
        yield u


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    routes = f'[[route]]\nname = "raw.test"\nupstream = "http://127.0.0.1:{upstream.port}"\ndefault = true\n'
    with run_gateway(routes, tmp_path_factory.mktemp("gw")) as gw:
        yield gw


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_full_blob_streams_intact(gateway):
    digest = hashlib.sha256()
    with httpx.stream("GET", f"{gateway.url}/v2/org/blob/blobs/{D_FULL}", timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-length"] == str(SIZE)
        for chunk in resp.iter_raw():
            digest.update(chunk)
    assert digest.hexdigest() == BODY_DIGEST


def test_upstream_breaking_mid_body_aborts_the_client(gateway):
    received: list[int] = []

    def pull() -> None:
        with httpx.stream("GET", f"{gateway.url}/v2/org/blob/blobs/{D_BREAK}", timeout=30) as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_raw():
                received.append(len(chunk))

    with pytest.raises(httpx.RemoteProtocolError):
        pull()
    assert 0 < sum(received) < SIZE
    assert wait_until(lambda: any('"event":"upstream_broke"' in line for line in gateway.log_lines()))


def test_client_disconnect_closes_a_stalled_upstream_at_once(gateway, upstream):
    before = upstream.open_connections
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(f"GET /v2/org/blob/blobs/{D_STALL} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        got = 0
        while got < SIZE // 16:
            got += len(s.recv(65536))
        assert wait_until(lambda: upstream.open_connections > before)
    # The upstream is stalled and would never end the response by itself: only the
    # gateway noticing the disconnect can close it.
    assert wait_until(lambda: upstream.open_connections == before, timeout=5)
    assert wait_until(lambda: any('"error":"client_disconnected"' in line for line in gateway.log_lines()))


def test_many_aborted_clients_leave_no_upstream_connections(gateway, upstream):
    before = upstream.open_connections
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", gateway.port)) as s:
            s.sendall(f"GET /v2/org/blob/blobs/{D_FULL} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            s.recv(65536)
    assert wait_until(lambda: upstream.open_connections <= before + 1, timeout=10)
