"""A thousand clients that walk away mid-blob leave nothing behind in the gateway.

A real gateway process in front of ``RawUpstream`` (an 8 MiB blob that it writes as fast as it
can, counting its open connections). 1,000 clients on raw asyncio sockets, 50 at a time, ask for
the blob and go away: some right after sending the request, some after the response headers,
some after a few hundred KiB of body; half close politely, half reset. Afterwards the upstream's
open connections, the gateway's open file descriptors and its established TCP connections are
back where they started.

Idle keep-alive connections in the upstream pool are not a leak: a relay that read a small blob
to its end before it noticed its client had gone gives the connection back to the pool, where it
waits for the next request. So the gateway runs with a one-second keep-alive expiry, and one
complete pull after the aborts lets the pool drop what expired; whatever is still open after that
is held outside the pool, which is what this test is after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.rawupstream import BODY_DIGEST, D_FULL, RawUpstream
from tests.support import Gateway, run_gateway

CLIENTS = 1000
AT_ONCE = 50
SLACK = 2  # pooled keep-alive connections the gateway may keep
SETTLE_SECONDS = 20.0
KEEPALIVE_EXPIRY = 1.0
MODES = ("after-request", "after-headers", "after-body")
BODY_BYTES = 256 << 10  # how much of the blob an "after-body" client reads before leaving


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as u:
        yield u


# Each pull relayed alone, and shared fetches (herd.py): concurrent aborted pulls of one blob
# then read one upstream body, which must close when its last reader goes.
@pytest.fixture(scope="module", params=["alone", "shared"])
def gateway(
    upstream: RawUpstream, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Gateway]:
    routes = (
        f'[[route]]\nname = "raw.test"\nupstream = "http://127.0.0.1:{upstream.port}"\n'
        "default = true\nallow_private_addresses = true\n"
    )
    env = {"GATEWAY_KEEPALIVE_EXPIRY": str(KEEPALIVE_EXPIRY)}
    if request.param == "alone":
        env["GATEWAY_SHARED_WINDOW_BYTES"] = "0"
    with run_gateway(routes, tmp_path_factory.mktemp("aborts"), env=env) as gw:
        yield gw


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def established_connections(pid: int) -> int:
    """TCP connections of process ``pid`` in state ESTABLISHED (from /proc/net/tcp and tcp6)."""
    inodes = _socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(frozen=True)
class Snapshot:
    upstream_connections: int
    gateway_fds: int
    gateway_established: int

    @classmethod
    def take(cls, upstream: RawUpstream, pid: int) -> Snapshot:
        return cls(upstream.open_connections, open_fds(pid), established_connections(pid))

    def within(self, baseline: Snapshot, slack: int) -> bool:
        return (
            self.upstream_connections <= baseline.upstream_connections + slack
            and self.gateway_fds <= baseline.gateway_fds + slack
            and self.gateway_established <= baseline.gateway_established + slack
        )


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def full_pull(url: str) -> str:
    digest = hashlib.sha256()
    with httpx.stream("GET", f"{url}/v2/org/blob/blobs/{D_FULL}", timeout=30) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            digest.update(chunk)
    return digest.hexdigest()


async def abort_one(port: int, index: int) -> int:
    """One client that leaves mid-blob; returns the body bytes it read."""
    mode = MODES[index % len(MODES)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = 0
    try:
        async with asyncio.timeout(30):
            writer.write(f"GET /v2/org/blob/blobs/{D_FULL} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            await writer.drain()
            if mode != "after-request":
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head[:100]
            if mode == "after-body":
                while got < BODY_BYTES:
                    chunk = await reader.read(65536)
                    assert chunk, "the gateway ended the body early"
                    got += len(chunk)
    finally:
        if index % 2:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST
        else:
            writer.close()  # FIN (unread data still makes the kernel send RST)
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return got


async def abort_all(port: int) -> int:
    total = 0
    for start in range(0, CLIENTS, AT_ONCE):
        results = await asyncio.gather(*(abort_one(port, i) for i in range(start, min(start + AT_ONCE, CLIENTS))))
        total += sum(results)
    return total


def test_a_thousand_aborted_pulls_leave_nothing_behind(
    gateway: Gateway, upstream: RawUpstream, request: pytest.FixtureRequest
) -> None:
    pid = gateway.proc.pid
    # Warm up: one complete pull, so that the pool holds what it holds in steady state.
    assert full_pull(gateway.url) == BODY_DIGEST
    assert wait_for(lambda: upstream.open_connections <= 1, 5)
    baseline = Snapshot.take(upstream, pid)
    closed_early = upstream.closed_early

    started = time.monotonic()
    body_bytes = asyncio.run(abort_all(gateway.port))
    aborting = time.monotonic() - started

    peak = Snapshot.take(upstream, pid)
    time.sleep(KEEPALIVE_EXPIRY + 0.5)
    pooled = Snapshot.take(upstream, pid)
    # A complete pull makes the pool drop its expired idle connections (and keeps this one).
    assert full_pull(gateway.url) == BODY_DIGEST
    settled = wait_for(lambda: Snapshot.take(upstream, pid).within(baseline, SLACK), SETTLE_SECONDS)
    after = Snapshot.take(upstream, pid)
    print(
        f"\n{CLIENTS} aborted pulls in {aborting:.1f}s ({body_bytes >> 20} MiB of body read); upstream "
        f"connections closed early: {upstream.closed_early - closed_early}\n"
        f"  baseline:                  {baseline}\n"
        f"  right after the aborts:    {peak}\n"
        f"  {KEEPALIVE_EXPIRY + 0.5:.1f} s later:               {pooled}\n"
        f"  after one more pull:       {after}"
    )
    assert settled, f"baseline {baseline}, after {SETTLE_SECONDS}s: {after}"
    # The upstream really was cut off mid-blob, many times (not served whole and pooled); a
    # shared fetch is cut off when its last reader goes, so far fewer times.
    shared = request.node.callspec.params["gateway"] == "shared"
    assert upstream.closed_early - closed_early >= (1 if shared else CLIENTS // 2)
    assert ('"share":"joined"' in gateway.log.read_text(errors="replace")) == shared
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
    assert "Traceback" not in gateway.log.read_text(errors="replace")
