"""An upstream that never accepts the connection: a clear 504 within the connect timeout."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import run_gateway


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops further SYNs, so connecting hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel completes connections beyond the accept queue")
    except TimeoutError:
        pass
    finally:
        probe.close()
    yield port
    for s in fillers:
        s.close()
    listener.close()


def test_unreachable_upstream_is_a_504_within_the_connect_timeout(blackhole, tmp_path):
    routes = f'[[route]]\nname = "slow.test"\nupstream = "http://127.0.0.1:{blackhole}"\ndefault = true\n'
    with run_gateway(routes, tmp_path, env={"GATEWAY_CONNECT_TIMEOUT": "1", "GATEWAY_MANIFEST_TIMEOUT": "30"}) as gw:
        started = time.monotonic()
        resp = httpx.get(f"{gw.url}/v2/org/app/manifests/v1", timeout=30)
        elapsed = time.monotonic() - started
    assert resp.status_code == 504
    error = resp.json()["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "slow.test" in error["message"]
    assert elapsed < 1 + 1.5, f"took {elapsed:.1f} s with a 1 s connect timeout"
