"""A CDN URL that expires while a slow client reads (issue 10): the gateway resumes through a fresh redirect.

The test bed's CDN (nginx, ``tests/testbed/cdn.py``) serves the hub registry's storage at URLs
that never expire, and distribution's redirect middleware names the same URL at every redirect.
So the expiry is emulated: the front before hub stamps each redirect's ``Location`` with its own
``x-expires`` (``FaultFront(location_query=...)``), and an edge before nginx (below) honours it
as a signed URL's expiry: a request after it is refused with 403, and an answer still streaming
when it passes is cut with an RST. Only a fresh redirect, with a new URL, can continue the body.
A rate-limited curl makes the transfer outlast the first URL; the assertions are on counts and bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import itertools
import socket
import socketserver
import struct
import subprocess
import termios
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_integrity import PLATFORM, blob_gets, log_events, metric
from tests.support import Gateway, run_gateway, wait_for
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront
from tests.testbed.images import Image

pytestmark = pytest.mark.e2e

TTL = 2.0  # seconds a CDN URL is good for
TRANSFER = 1.5 * TTL  # how long the client takes for the whole blob: the first URL expires at two thirds
_SENT_WAIT = 5.0


@dataclass
class EdgeRequest:
    target: str
    range: str | None
    status: int = 0
    body_bytes: int = 0
    cut: bool = False  # the URL expired while the body streamed

    @property
    def url_id(self) -> str:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query).get("x-id", [""])[0]


class ExpiringEdge:
    """A CDN edge before nginx whose URLs expire at their ``x-expires`` (Unix seconds)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").rpartition(":")
        self.target = (host, int(port))
        self.requests: list[EdgeRequest] = []
        self._lock = threading.Lock()
        edge = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                edge._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="expiring-edge", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ExpiringEdge:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        while line := reader.readline():
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers: list[tuple[str, str]] = []
            while (field := reader.readline().decode("latin-1").rstrip("\r\n")) != "":
                name, _, value = field.partition(":")
                headers.append((name.strip(), value.strip()))
            entry = EdgeRequest(target, next((v for k, v in headers if k.lower() == "range"), None))
            with self._lock:
                self.requests.append(entry)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
            expires = float(query.get("x-expires", ["0"])[0])
            if time.time() >= expires:
                entry.status = 403
                body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n")
                conn.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                continue
            if not self._relay(conn, method, target, headers, expires, entry):
                return

    def _relay(
        self,
        conn: socket.socket,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        expires: float,
        entry: EdgeRequest,
    ) -> bool:
        """Relay one answer from nginx; False when the URL expired and the connection was reset."""
        origin = http.client.HTTPConnection(*self.target, timeout=30)
        try:
            origin.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                origin.putheader(name, value)
            origin.endheaders()
            answer = origin.getresponse()
            entry.status = answer.status
            head = [f"HTTP/1.1 {answer.status} {answer.reason}", *(f"{k}: {v}" for k, v in answer.getheaders())]
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            while data := answer.read(64 << 10):
                if time.time() >= expires:
                    entry.cut = True
                    self._reset(conn)
                    return False
                conn.sendall(data)
                entry.body_bytes += len(data)
            return True
        finally:
            origin.close()

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        """An RST once the peer holds every byte sent, so the break is at exactly ``body_bytes``."""
        deadline = time.monotonic() + _SENT_WAIT
        while time.monotonic() < deadline:
            pending = struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, struct.pack("i", 0)))[0]
            if pending == 0:
                break
            time.sleep(0.001)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


@pytest.fixture
def expiring_cdn(testbed: Testbed, tmp_path: Path) -> Iterator[tuple[Gateway, FaultFront, ExpiringEdge]]:
    """A gateway for hub whose blob redirects name expiring URLs at the edge: (gateway, front before hub, edge)."""
    ids = itertools.count(1)
    with ExitStack() as stack:
        edge = stack.enter_context(ExpiringEdge(testbed.cdn_url))
        hub = stack.enter_context(
            FaultFront(
                testbed.hub.registry_url,
                rewrite_location=(testbed.cdn_url, edge.url),
                location_query=lambda: f"x-expires={time.time() + TTL:.3f}&x-id={next(ids)}",
            )
        )
        routes = (
            f'[[route]]\nname = "docker.io"\nupstream = "{hub.url}"\n'
            "allow_private_addresses = true\ndefault = true\nlibrary = true\n"
        )
        yield stack.enter_context(run_gateway(routes, tmp_path / "gateway")), hub, edge


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def test_cdn_url_expiring_mid_body_is_resumed_through_a_fresh_redirect(
    testbed: Testbed, expiring_cdn: tuple[Gateway, FaultFront, ExpiringEdge], tmp_path: Path
) -> None:
    gw, hub, edge = expiring_cdn
    image: Image = testbed.images["bigimage"]
    [layer] = image.layers[PLATFORM]
    size = image.blobs[layer]
    if size < 128 << 20:
        pytest.skip(f"the big blob is {size >> 20} MiB: too small to outlast the socket buffers (TESTBED_BIG_BLOB_MIB)")
    out = tmp_path / "blob"

    rate = int(size / TRANSFER)
    url = f"{gw.url}/v2/{image.repo}/blobs/{layer}"
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "--limit-rate", str(rate), "-o", str(out), url], capture_output=True
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == size
    assert sha256_of(out) == layer

    # The edge: the first URL expired while its body streamed and was cut; a second URL, of a
    # second redirect, answered the rest as a 206 while it was good. Nothing was refused.
    first, second = edge.requests
    offset = first.body_bytes
    assert (first.range, first.status, first.cut) == (None, 200, True)
    assert 0 < offset < size
    assert (second.range, second.status, second.cut, second.body_bytes) == (
        f"bytes={offset}-{size - 1}",
        206,
        False,
        size - offset,
    )
    assert first.url_id != second.url_id
    # The front before hub: two redirects for the blob, the second for the rest.
    redirects = hub.requests_for(layer, statuses=(307,))
    assert [r.range for r in redirects] == [None, f"bytes={offset}-{size - 1}"]
    # The gateway: one client GET, resumed once from where the first URL broke, verified whole.
    assert wait_for(lambda: bool(blob_gets(gw, layer)))
    [line] = blob_gets(gw, layer)
    assert (line["status"], line["bytes"], line["resumes"], line["verified"]) == (200, size, 1, "ok")
    assert [e["offset"] for e in log_events(gw, "blob_resume")] == [offset]
    assert metric(gw, "registry_gateway_blob_resumes_total", route="docker.io") == 1
    # The first URL is dead for good: only a fresh redirect could have continued the body.
    expired = httpx.get(edge.url + first.target, headers={"range": f"bytes={offset}-"})
    assert expired.status_code == 403
