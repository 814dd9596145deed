"""Streaming over real sockets: a real uvicorn gateway in front of a raw upstream server.

The upstream is a few lines of asyncio so that each misbehaviour is exact: a body
that stalls forever, a connection that drops mid-body. (httpx's ASGITransport
buffers whole responses, so none of this can be observed in process.)
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.rawupstream import BODY_DIGEST, D_BREAK, D_FULL, D_STALL, SIZE, RawUpstream
from tests.support import run_gateway


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
