"""The gateway as an operator runs it: graceful shutdown, several workers, its access log."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.rawupstream import BODY_DIGEST, D_SLOW, SIZE, RawUpstream
from tests.support import run_gateway
from tests.unit.test_app import sample


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as u:
        yield u


def routes(upstream: RawUpstream) -> str:
    # D_SLOW is a made-up digest for the same bytes as D_FULL: these tests are about processes,
    # not content, so the digest check is off (tests/unit/blobs/test_digest.py has its own).
    return (
        f'[[route]]\nname = "raw.test"\nupstream = "http://127.0.0.1:{upstream.port}"\ndefault = true\n'
        "verify_blobs = false\n"
    )


def test_sigterm_lets_a_pull_in_flight_finish(upstream, tmp_path):
    with run_gateway(routes(upstream), tmp_path, env={"GATEWAY_SHUTDOWN_TIMEOUT": "30"}) as gw:
        result: dict[str, object] = {}
        started = threading.Event()

        def pull() -> None:
            digest = hashlib.sha256()
            with httpx.stream("GET", f"{gw.url}/v2/org/blob/blobs/{D_SLOW}", timeout=30) as resp:
                for chunk in resp.iter_raw():
                    started.set()
                    digest.update(chunk)
            result["digest"] = digest.hexdigest()

        thread = threading.Thread(target=pull)
        thread.start()
        assert started.wait(10)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # No new connections once shutdown began...
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gw.url}/healthz", timeout=2)
        # ...but the pull in flight completes, byte for byte, before the process exits.
        thread.join(30)
        assert result.get("digest") == BODY_DIGEST
        # uvicorn re-raises the signal it handled once it is done, so the exit status says SIGTERM.
        assert gw.proc.wait(30) in (0, -signal.SIGTERM)


def test_metrics_add_up_across_workers(upstream, tmp_path):
    with run_gateway(routes(upstream), tmp_path, args=["--workers", "2"]) as gw:
        with httpx.Client(base_url=gw.url) as client:
            for _ in range(40):
                # A new connection each time, so both workers answer some.
                assert httpx.get(f"{gw.url}/v2/").status_code == 200
            scrapes = [client.get("/metrics").text for _ in range(6)]
        for text in scrapes:
            # Whichever worker answered the scrape, it reports both workers' requests.
            assert sample(text, "registry_gateway_requests_total", kind="ping", status="200") == 40
        pids = {json.loads(line).get("pid") for line in gw.log_lines() if '"event":"access"' in line}
        assert len(pids) == 2, "both workers should have served requests"


def test_access_log_line(upstream, tmp_path):
    with run_gateway(routes(upstream), tmp_path) as gw:
        resp = httpx.get(
            f"{gw.url}/v2/org/blob/blobs/{D_SLOW}?ns=raw.test", headers={"x-request-id": "req-42"}, timeout=30
        )
        assert resp.headers["x-request-id"] == "req-42"
        deadline = time.monotonic() + 5
        while True:
            lines = [json.loads(line) for line in gw.log_lines() if '"request_id":"req-42"' in line]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    (line,) = lines
    assert line["event"] == "access"
    assert line["method"] == "GET"
    assert line["path"] == f"/v2/org/blob/blobs/{D_SLOW}"
    assert line["query"] == "ns=raw.test"
    assert line["route"] == "raw.test"
    assert line["upstream"] == f"http://127.0.0.1:{upstream.port}"
    assert line["repository"] == "org/blob"
    assert line["kind"] == "blob"
    assert line["status"] == 200
    assert line["bytes"] == SIZE
    assert line["client"] == "127.0.0.1"
    assert line["duration_ms"] > 0
    assert "time" in line
