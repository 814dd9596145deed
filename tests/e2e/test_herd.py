"""Herd-proof pulls (issue 9), end to end: concurrent pulls of one blob cost one upstream fetch.

A full GET of a blob by digest that arrives while the same blob of the same route and repository
is being fetched reads that fetch's bytes from a bounded window (``gateway/blobs/herd.py``). Each test
starts its own gateway (a real process) before fault fronts (``tests/testbed/faults.py``) that
count every upstream request, and pulls with real clients: curl (its body hashed as it arrives,
in a thread per client), containerd and Docker. Every client's bytes are checked against the
pushed digest; the counts come from the fronts, the gateway's access log (``share``) and its
metrics.

- 16 curls of a 512 MiB layer behind hub's redirect: ONE GET at the CDN, 1 led and 15 joined,
  upstream bytes = the blob, client bytes = 16 blobs, the gateway's peak RSS far below 16 copies.
- A rate-limited curl among fast ones, with an 8 MiB window: it is detached onto its own
  ``Range`` request and still gets (and the gateway checks) every byte; the fast ones finish first.
  A client that comes after the window left the first byte opens a younger fetch that catches up
  and merges: it costs the bytes it missed, not a second whole fetch. Clients that come one
  after another, 0.4 s apart, while the fetch holds its first window for them: ONE upstream GET.
  A small layer stays in memory a moment after its last client: the next node reads it there.
  A lone pull's head gives way when a new herd needs the memory under the cap (not bypassed).
- The leader's client goes away mid-blob: the others finish; the last reader going away closes
  the upstream connection, and the window's memory goes back.
- The shared upstream body reset mid-blob: resumed once (one Range request) for all four readers.
- Passthrough: only a client whose own token the upstream accepted (a HEAD) may join; no login
  and a token without access get 401 and no byte. A shared body that breaks is not resumed with
  the leader's token for everyone: each reader asks for its own rest with its own token.
- containerd and Docker pulling one image at once read one fetch of its big layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from gateway.blobs.terms import READAHEAD, RETAIN
from gateway.settings import Settings
from tests.e2e.clients import Containerd, Dockerd
from tests.e2e.test_integrity import blob_gets, log_events, metric
from tests.registry_json import registry_errors
from tests.support import Gateway, run_gateway, wait_for
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront, FrontRequest

pytestmark = pytest.mark.e2e

PLATFORM = "linux/amd64"
MIB = 1 << 20
# The blob the ghcr tests pull. It must outgrow what a slow curl takes at once: ``--limit-rate``
# is an average since the transfer began, and curl reads whatever is waiting (up to 100 reads of
# its 100 KiB buffer, about 10 MiB) before it first pauses; with a few MiB in socket buffers
# and an 8 MiB window, 32 MiB leaves a slow reader well over a window behind the fast ones.
HERD_BLOB = 32 * MIB
WINDOW = Settings.model_fields["shared_window_bytes"].default  # GATEWAY_SHARED_WINDOW_BYTES: 128 MiB
PUBLIC, PRIVATE = "org/herd", "private/herd"  # on ghcr; private/ is the private user's only

StartGateway = Callable[..., Gateway]
MakeFront = Callable[..., FaultFront]


# ---------------------------------------------------------------------- set-up
@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@pytest.fixture(scope="module")
def herd_blob(testbed: Testbed) -> Blob:
    return push_blob(testbed, HERD_BLOB)


@pytest.fixture(scope="module")
def long_blob(testbed: Testbed) -> Blob:
    # For the slow client: the herd waits a moment for its slowest reader before it lets it go
    # (gateway/blobs/pace.py and terms.py, PACE_PERIOD), and a slow curl swallows some 15 MiB into its buffers and
    # the sockets' first: the blob must be long enough beyond both for it to fall a window behind.
    return push_blob(testbed, 2 * HERD_BLOB)


@pytest.fixture(scope="module")
def layer_512(testbed: Testbed) -> Blob:
    """A 512 MiB layer on hub (``library/herd``), whose blobs hub redirects to the CDN."""
    return push_blob(testbed, 512 * MIB, "hub", ("library/herd",))


def push_blob(testbed: Testbed, size: int, upstream: str = "ghcr", repos: tuple[str, ...] = (PUBLIC, PRIVATE)) -> Blob:
    """A random blob pushed (no manifest needed): by default to ghcr's ``org/herd`` and ``private/herd``."""
    return push_bytes(testbed, os.urandom(size), upstream, repos)


def push_bytes(testbed: Testbed, data: bytes, upstream: str, repos: tuple[str, ...]) -> Blob:
    """``data`` pushed as a blob to each of ``repos`` on ``upstream``."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    base = testbed.upstream(upstream).registry_url
    for repo in repos:
        token = testbed.admin_token(upstream, f"repository:{repo}:pull,push")
        with httpx.Client(headers={"authorization": f"Bearer {token}"}, timeout=60, trust_env=False) as http:
            started = http.post(f"{base}/v2/{repo}/blobs/uploads/")
            assert started.status_code == 202, started.text
            location = urljoin(base + "/", started.headers["location"])
            location += ("&" if "?" in location else "?") + f"digest={digest}"
            done = http.put(location, content=data, headers={"content-type": "application/octet-stream"})
            assert done.status_code == 201, done.text
    return Blob(digest, len(data))


@pytest.fixture
def fronts() -> Iterator[MakeFront]:
    with ExitStack() as stack:

        def make(target: str, **options: Any) -> FaultFront:
            return stack.enter_context(FaultFront(target, **options))

        yield make


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    with ExitStack() as stack:
        count = itertools.count()

        def start(
            name: str, upstream: str, env: dict[str, str] | None = None, extra: str = "default = true\n"
        ) -> Gateway:
            routes = (
                f'[[route]]\nname = "{name}"\nupstream = "{upstream}"\n'
                f"allow_private_addresses = true\nlibrary = true\n{extra}"
            )
            return stack.enter_context(run_gateway(routes, tmp_path / f"gateway-{next(count)}", env=env))

        yield start


def hub_via_fronts(testbed: Testbed, fronts: MakeFront, rate: float | None = None) -> tuple[FaultFront, FaultFront]:
    """(front before hub, front before the CDN): hub's blob redirects point at the second."""
    cdn = fronts(testbed.cdn_url, rate=rate)
    hub = fronts(testbed.hub.registry_url, rewrite_location=(testbed.cdn_url, cdn.url))
    return hub, cdn


# ---------------------------------------------------------------------- a curl client
_finished = itertools.count()


class Pull:
    """One curl in a thread: its body hashed as it arrives, its bytes counted so far."""

    def __init__(
        self, url: str, name: str, *, rate: str | None = None, authorization: str | None = None, host: str | None = None
    ) -> None:
        self.name = name  # its X-Request-ID: the request_id of its access line
        argv = ["curl", "-sS", "--fail", "--max-time", "120", "-H", f"X-Request-ID: {name}"]
        if host is not None:
            argv += ["-H", f"Host: {host}"]
        if rate is not None:
            argv += ["--limit-rate", rate]
        if authorization is not None:
            argv += ["-H", f"Authorization: {authorization}"]
        self.proc = subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.received = 0
        self.finished = -1  # the order in which the pulls of this module ended
        self.stderr = ""
        self._sha = hashlib.sha256()
        self._thread = threading.Thread(target=self._read, name="pull", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert isinstance(self.proc.stdout, io.BufferedReader)  # read1: what has come, not 64 KiB
        assert self.proc.stderr is not None
        while chunk := self.proc.stdout.read1(1 << 16):
            self._sha.update(chunk)
            self.received += len(chunk)
        self.stderr = self.proc.stderr.read().decode(errors="replace")
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        self.finished = next(_finished)

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def wait(self, timeout: float = 120) -> Pull:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "curl did not finish"
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.wait()

    def got(self, blob: Blob) -> None:
        """The whole blob, byte for byte."""
        assert (self.proc.returncode, self.stderr, self.received, self.digest) == (0, "", blob.size, blob.digest)

    def wait_for_bytes(self, count: int, timeout: float = 30) -> None:
        assert wait_for(lambda: self.received >= count or self.proc.poll() is not None, timeout)
        assert self.received >= count, f"{self.received} bytes, then curl ended: {self.proc.returncode}"


# ---------------------------------------------------------------------- reading what happened
def shares(gw: Gateway, digest: str) -> list[str]:
    return sorted(line["share"] for line in blob_gets(gw, digest))


def line_of(gw: Gateway, pull: Pull) -> dict[str, Any]:
    """The access line of ``pull``'s request."""
    [line] = [a for a in log_events(gw, "access") if a["request_id"] == pull.name]
    return line


def gets(front: FaultFront, digest: str) -> list[tuple[str | None, int, str | None, int]]:
    """(Range, status, fault, body bytes sent) of each GET of ``digest`` with a body the front relayed."""
    return [(r.range, r.status, r.fault, r.body_bytes) for r in front.requests_for(digest) if r.method == "GET"]


def windows_empty(gw: Gateway) -> bool:
    """No shared fetch in flight, and no byte left in any window."""
    return (
        metric(gw, "registry_gateway_shared_fetches_in_flight") == 0
        and metric(gw, "registry_gateway_shared_window_bytes") == 0
    )


def memory(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


# ---------------------------------------------------------------------- 1. the herd
CLIENTS = 16


def test_sixteen_pulls_of_the_big_layer_cost_one_cdn_fetch(
    testbed: Testbed, layer_512: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    blob, digest = layer_512, layer_512.digest
    hub, cdn = hub_via_fronts(testbed, fronts)
    # The default window (128 MiB, a quarter of the blob). On plain HTTP the gateway feeds its readers
    # in turn, and no curl fell a window behind in runs on 2 busy cores; one that did would be
    # detached (a second, Range, GET at the CDN) and this test's exact counts would say so.
    gw = start_gateway("docker.io", hub.url)
    before = memory(gw.proc.pid, "VmRSS")

    pulls = [Pull(f"{gw.url}/v2/herd/blobs/{digest}", f"herd-{i}") for i in range(CLIENTS)]
    for p in pulls:
        p.wait()
        p.got(blob)

    # The upstream saw ONE fetch of the blob: one redirect at hub, one body from the CDN.
    assert len(hub.requests_for(digest, statuses=(307,))) == 1
    assert gets(cdn, digest) == [(None, 200, None, blob.size)]
    # The gateway: one request led the fetch, the 15 others read it; each checked whole.
    assert wait_for(lambda: len(blob_gets(gw, digest)) == CLIENTS)
    assert shares(gw, digest) == ["joined"] * (CLIENTS - 1) + ["led"]
    assert {(a["status"], a["bytes"], a["verified"]) for a in blob_gets(gw, digest)} == {(200, blob.size, "ok")}
    assert metric(gw, "registry_gateway_shared_fetch_requests_total", role="led") == 1
    assert metric(gw, "registry_gateway_shared_fetch_requests_total", role="joined") == CLIENTS - 1
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="upstream") == blob.size
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="client") == CLIENTS * blob.size
    assert wait_for(lambda: windows_empty(gw))
    # Memory: one window, never a copy per client (4 GiB here), nor even the whole blob once.
    peak = memory(gw.proc.pid, "VmHWM")
    print(f"{CLIENTS} pulls of {blob.size >> 20} MiB: peak RSS {peak >> 20} MiB, {before >> 20} MiB before")
    assert peak < 200 * MIB + WINDOW
    assert peak - before < WINDOW + 64 * MIB  # a window, far less than the 512 MiB blob: never held whole


# ---------------------------------------------------------------------- 2. slow and late readers
SMALL_WINDOW = 8 * MIB


def test_a_slow_client_is_detached_and_still_gets_every_byte(
    testbed: Testbed, long_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    herd_blob = long_blob
    # The upstream paced at 32 MiB/s: the fetch's first byte stays in the 8 MiB window for a
    # quarter of a second, time enough for the fast ones to start (and join) after the slow one,
    # however much the slow curl swallows at first.
    front = fronts(testbed.ghcr.registry_url, rate=32 * MIB)
    gw = start_gateway("ghcr.io", front.url, {"GATEWAY_SHARED_WINDOW_BYTES": str(SMALL_WINDOW)})
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{herd_blob.digest}"

    # 8 MiB/s: 8 s for the blob; the others take 2 s.
    slow = Pull(url, "slow", rate="8M")
    slow.wait_for_bytes(64 << 10)  # it leads: the fetch is open
    fast = [Pull(url, f"fast-{i}") for i in range(4)]
    for p in [*fast, slow]:
        p.wait()
        p.got(herd_blob)
    assert max(p.finished for p in fast) < slow.finished

    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 5)
    # The fast ones read the slow one's fetch to its end ...
    assert [line_of(gw, p)["share"] for p in fast] == ["joined"] * 4
    # ... which fell a window behind them and went on alone, every byte checked.
    line = line_of(gw, slow)
    assert (line["status"], line["bytes"], line["share"], line["verified"]) == (200, herd_blob.size, "detached", "ok")
    [event] = log_events(gw, "shared_fetch_detached")
    assert (event["request_id"], event["reason"], event["digest"]) == ("slow", "slow", herd_blob.digest)
    offset = event["offset"]
    assert 0 < offset < herd_blob.size - SMALL_WINDOW
    # Upstream: the shared body, then the slow one's own rest from where it was.
    assert gets(front, herd_blob.digest) == [
        (None, 200, None, herd_blob.size),
        (f"bytes={offset}-{herd_blob.size - 1}", 206, None, herd_blob.size - offset),
    ]
    upstream = metric(gw, "registry_gateway_blob_body_bytes_total", side="upstream")
    assert upstream == 2 * herd_blob.size - offset
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="client") == 5 * herd_blob.size
    assert metric(gw, "registry_gateway_shared_fetch_requests_total", role="detached") == 1
    assert wait_for(lambda: windows_empty(gw))


def test_a_late_client_costs_the_bytes_it_missed_not_a_second_fetch(
    testbed: Testbed, herd_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """A client that comes once the window has left the first byte opens a younger fetch, which
    catches up with the older one (it waits) and hands its reader over (``herd.py``)."""
    front = fronts(testbed.ghcr.registry_url, rate=32 * MIB)
    gw = start_gateway("ghcr.io", front.url, {"GATEWAY_SHARED_WINDOW_BYTES": str(SMALL_WINDOW)})
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{herd_blob.digest}"

    early = Pull(url, "early")
    early.wait_for_bytes(2 * SMALL_WINDOW)
    late = Pull(url, "late")
    for p in (early, late):
        p.wait()
        p.got(herd_blob)

    [merged] = log_events(gw, "shared_fetch_merged")
    assert (merged["digest"], merged["readers"]) == (herd_blob.digest, 1)
    assert metric(gw, "registry_gateway_shared_fetch_merges_total") == 1
    offset = merged["offset"]
    assert 0 < offset < herd_blob.size
    [first, second] = gets(front, herd_blob.digest)
    assert first == (None, 200, None, herd_blob.size)
    assert second[:3] == (None, 200, None)
    assert second[3] < herd_blob.size  # closed once merged
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="upstream") == herd_blob.size + offset
    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 2)
    for p, share in ((early, "led"), (late, "merged")):
        line = line_of(gw, p)
        assert (line["status"], line["bytes"], line["share"], line["verified"]) == (200, herd_blob.size, share, "ok")
    assert wait_for(lambda: windows_empty(gw))


def test_a_slow_late_client_does_not_hold_the_early_ones_back(
    testbed: Testbed, herd_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """The older fetch waits while a younger one catches up; the younger reads on at the link's
    pace whatever its own reader does, so a slow late reader falls out of its window and goes on
    alone, the catch-up ends, and the early client reads on (found by this file: the younger
    fetch waited for its slow reader, and the early one for it, for the whole patience)."""
    front = fronts(testbed.ghcr.registry_url, rate=32 * MIB)
    gw = start_gateway("ghcr.io", front.url, {"GATEWAY_SHARED_WINDOW_BYTES": str(SMALL_WINDOW)})
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{herd_blob.digest}"

    early = Pull(url, "early")
    # Far enough in that the late fetch must read well past what curl and the sockets buffer
    # for its slow reader (about 10 MiB) to catch up.
    early.wait_for_bytes(3 * SMALL_WINDOW)
    late = Pull(url, "late", rate="10K")
    early.wait()
    early.got(herd_blob)
    assert late.proc.poll() is None  # still crawling when the early one had it all
    # The early fetch never waited out its patience for the late one: the late fetch caught up
    # (merged) or lost its only reader (detached), and either ended the wait at once.
    assert not log_events(gw, "shared_fetch_wait_ended")
    assert log_events(gw, "shared_fetch_merged") or [
        e for e in log_events(gw, "shared_fetch_detached") if e["request_id"] == "late"
    ]
    late.kill()
    assert wait_for(lambda: windows_empty(gw))


def test_a_merge_keeps_the_herd_that_keeps_up(
    testbed: Testbed, long_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """An older fetch streams to a slow client; 8 pulls of the blob come, and the first of them is
    killed 0.6 s in. The younger fetch they share catches up and merges: every follower that keeps
    up reads on (from the younger's window, then the older's), none is sent off on its own request
    (found in #21: 6 followers detached as "slow" at the merge, 8 upstream GETs for 8 clients)."""
    front = fronts(testbed.ghcr.registry_url)
    # A window of 16 MiB: room for the jitter of 9 curls on 2 cores, so that herd pacing (which
    # lets go a reader that holds the others back for most of a period) keeps every follower.
    gw = start_gateway("ghcr.io", front.url, {"GATEWAY_SHARED_WINDOW_BYTES": str(2 * SMALL_WINDOW)})
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{long_blob.digest}"

    slow = Pull(url, "slow", rate="3M")
    slow.wait_for_bytes(30 * MIB)  # its fetch's window left the first byte long ago
    followers = [Pull(url, f"follower-{i}", rate="12M") for i in range(8)]
    time.sleep(0.6)
    followers[0].kill()
    for p in followers[1:]:
        p.wait()
        p.got(long_blob)
    slow.wait()
    slow.got(long_blob)

    assert wait_for(lambda: len(blob_gets(gw, long_blob.digest)) == 9)
    events = [e for e in gw.log_lines() if '"shared_fetch_' in e]
    detached = [e["request_id"] for e in log_events(gw, "shared_fetch_detached")]
    assert not [name for name in detached if name.startswith("follower")], events
    for p in followers[1:]:
        line = line_of(gw, p)
        assert (line["status"], line["bytes"], line["verified"]) == (200, long_blob.size, "ok")
        assert line["share"] in ("joined", "merged", "led")
    # Upstream: the older fetch, the younger one (closed once merged), and at most the slow
    # client's own rest once the herd let it go.
    whole = [g for g in gets(front, long_blob.digest) if g[0] is None]
    assert len(whole) == 2, gets(front, long_blob.digest)
    assert len(gets(front, long_blob.digest)) <= 3
    assert log_events(gw, "shared_fetch_merged")
    assert wait_for(lambda: windows_empty(gw))


def test_clients_that_come_one_after_another_cost_one_fetch(
    testbed: Testbed, long_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """A rollout that starts its nodes one at a time: the fetch holds its first window while they
    keep coming (``herd.SharedFetch._hold``), so each joins from byte 0 instead of catching up."""
    front = fronts(testbed.ghcr.registry_url, rate=16 * MIB)  # 4 s for the blob
    window = 16 * MIB  # read in 1 s: clients 0.4 s apart keep it held
    gw = start_gateway("ghcr.io", front.url, {"GATEWAY_SHARED_WINDOW_BYTES": str(window)})
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{long_blob.digest}"

    pulls = []
    for n in range(6):
        pulls.append(Pull(url, f"node-{n}"))
        time.sleep(0.4)
    for p in pulls:
        p.wait()
        p.got(long_blob)

    assert gets(front, long_blob.digest) == [(None, 200, None, long_blob.size)]  # one upstream GET
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="upstream") == long_blob.size
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="client") == 6 * long_blob.size
    assert wait_for(lambda: len(blob_gets(gw, long_blob.digest)) == 6)
    assert [line_of(gw, p)["share"] for p in pulls] == ["led"] + ["joined"] * 5
    [held] = log_events(gw, "shared_fetch_held")
    assert (held["digest"], held["readers"], held["reason"]) == (long_blob.digest, 6, "quiet")
    assert window // 2 < held["offset"] <= window  # it stopped reading at the window's edge
    assert held["seconds"] > 1.0  # ... until the last node had come, and a little more
    waited = metric(gw, "registry_gateway_shared_fetch_wait_seconds_total", route="ghcr.io")
    assert held["seconds"] - 0.1 < waited < held["seconds"] + 0.1
    [ended] = log_events(gw, "shared_fetch_ended")
    assert (ended["bytes"], ended["readers"], ended["detached"], ended["outcome"]) == (long_blob.size, 6, 0, "complete")
    assert not log_events(gw, "shared_fetch_merged")
    assert wait_for(lambda: windows_empty(gw))


def test_a_small_layer_stays_a_moment_for_the_next_node(
    testbed: Testbed, herd_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """A blob still whole in memory when its last client is done stays joinable for a moment
    (``herd.LINGER``, or as long as its fetch took): the next node reads it from memory. Once no
    client came for that long, the memory goes back and the next pull fetches again."""
    front = fronts(testbed.ghcr.registry_url, rate=16 * MIB)  # 2 s for the 32 MiB blob: it stays 2 s
    gw = start_gateway("ghcr.io", front.url)
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{herd_blob.digest}"

    first = Pull(url, "node-0").wait()
    second = Pull(url, "node-1").wait()  # after the first had it all
    for p in (first, second):
        p.got(herd_blob)
    assert gets(front, herd_blob.digest) == [(None, 200, None, herd_blob.size)]
    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 2)
    assert [line_of(gw, p)["share"] for p in (first, second)] == ["led", "joined"]
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="upstream") == herd_blob.size

    assert wait_for(lambda: windows_empty(gw))  # nobody came for 2 s: the memory went back
    third = Pull(url, "node-2").wait()
    third.got(herd_blob)
    assert len(gets(front, herd_blob.digest)) == 2


def test_a_head_kept_for_latecomers_gives_way_to_a_herd(
    testbed: Testbed, herd_blob: Blob, long_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """A lone pull keeps its blob's first bytes in case a second client comes; when a new fetch
    needs that memory under the cap, the head goes and the new fetch is shared, not bypassed."""
    front = fronts(testbed.ghcr.registry_url)
    gw = start_gateway("ghcr.io", front.url, {"GATEWAY_SHARED_MEMORY_BYTES": str(30 * MIB)})
    lone = Pull(f"{gw.url}/v2/{PUBLIC}/blobs/{long_blob.digest}", "lone", rate="4M")
    # The head holds more than the cap leaves a new fetch (its tail and read-ahead), so the herd's
    # fetch fits only once the head goes. How far past that the head gets at first depends on how
    # much the lone curl's socket buffers take before its 4 MB/s limit bites (about 17 MiB here).
    room_for_one = RETAIN + READAHEAD
    assert wait_for(lambda: metric(gw, "registry_gateway_shared_window_bytes") > 30 * MIB - room_for_one, timeout=30)

    url = f"{gw.url}/v2/{PUBLIC}/blobs/{herd_blob.digest}"
    herd = [Pull(url, f"herd-{n}") for n in range(4)]
    for p in herd:
        p.wait()
        p.got(herd_blob)
    assert gets(front, herd_blob.digest) == [(None, 200, None, herd_blob.size)]
    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 4)
    assert shares(gw, herd_blob.digest) == ["joined"] * 3 + ["led"]
    assert lone.proc.poll() is None  # still reading: its head went, not its window
    lone.kill()
    assert wait_for(lambda: windows_empty(gw))


def test_with_no_patience_clients_one_after_another_cost_more_fetches(
    testbed: Testbed, long_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """The control: ``GATEWAY_SHARED_PATIENCE_SECONDS=0`` (nobody waits for latecomers), the same
    arrivals. The fetch reads on past its first window, so later nodes open younger fetches."""
    front = fronts(testbed.ghcr.registry_url, rate=16 * MIB)
    env = {"GATEWAY_SHARED_WINDOW_BYTES": str(16 * MIB), "GATEWAY_SHARED_PATIENCE_SECONDS": "0"}
    gw = start_gateway("ghcr.io", front.url, env)
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{long_blob.digest}"

    pulls = []
    for n in range(6):
        pulls.append(Pull(url, f"node-{n}"))
        time.sleep(0.4)
    for p in pulls:
        p.wait()
        p.got(long_blob)

    assert not log_events(gw, "shared_fetch_held")
    assert metric(gw, "registry_gateway_shared_fetch_wait_seconds_total") == 0
    assert len(gets(front, long_blob.digest)) > 1
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="upstream") > long_blob.size
    assert wait_for(lambda: windows_empty(gw))


# ---------------------------------------------------------------------- 3. clients going away
def test_the_leader_leaving_ends_no_one_else_and_the_last_leaving_closes_the_upstream(
    testbed: Testbed, herd_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    # The upstream paced at 16 MiB/s: the blob takes 2 s, so it is still streaming when the
    # leader's curl is killed (and when the last two are).
    front = fronts(testbed.ghcr.registry_url, rate=16 * MIB)
    gw = start_gateway("ghcr.io", front.url)
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{herd_blob.digest}"

    leader = Pull(url, "leader")
    leader.wait_for_bytes(1 * MIB)
    joiners = [Pull(url, f"joiner-{i}") for i in range(2)]
    for p in joiners:
        p.wait_for_bytes(1 * MIB)
    leader.kill()
    for p in joiners:
        p.wait()
        p.got(herd_blob)
    assert leader.received < herd_blob.size
    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 3)
    led = line_of(gw, leader)
    assert (led["share"], led["error"]) == ("led", "client_disconnected")
    assert led["bytes"] < herd_blob.size
    assert [line_of(gw, p)["share"] for p in joiners] == ["joined"] * 2
    assert gets(front, herd_blob.digest) == [(None, 200, None, herd_blob.size)]  # read on, not asked again
    assert wait_for(lambda: windows_empty(gw))

    # A new fetch whose two readers both go away mid-blob: the fetch ends and its upstream
    # connection is closed (the complete one above was kept alive, and is the one reused).
    assert front.open_connections == 1
    front.clear()
    last = [Pull(url, f"last-{i}") for i in range(2)]
    for p in last:
        p.wait_for_bytes(512 << 10)
    for p in last:
        p.kill()
    assert wait_for(lambda: front.open_connections == 0), f"{front.open_connections} upstream connections open"
    [(range_, status, _, sent)] = gets(front, herd_blob.digest)
    assert (range_, status) == (None, 200)
    assert sent < herd_blob.size
    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 5)
    assert sorted((line_of(gw, p)["share"], line_of(gw, p)["error"]) for p in last) == [
        ("joined", "client_disconnected"),
        ("led", "client_disconnected"),
    ]
    assert wait_for(lambda: windows_empty(gw))


# ---------------------------------------------------------------------- 4. the shared body breaks
def test_a_reset_of_the_shared_body_is_resumed_once_for_every_reader(
    testbed: Testbed, herd_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    # The upstream paced at 32 MiB/s (1 s for the blob), so all four are reading when the reset comes.
    front = fronts(testbed.ghcr.registry_url, rate=32 * MIB)
    half = herd_blob.size // 2
    front.fault(herd_blob.digest, "reset", at=half)
    gw = start_gateway("ghcr.io", front.url)
    url = f"{gw.url}/v2/{PUBLIC}/blobs/{herd_blob.digest}"

    pulls = [Pull(url, f"reader-{i}") for i in range(4)]
    for p in pulls:
        p.wait()
        p.got(herd_blob)

    assert gets(front, herd_blob.digest) == [
        (None, 200, "reset", half),
        (f"bytes={half}-{herd_blob.size - 1}", 206, None, herd_blob.size - half),
    ]
    assert [e["offset"] for e in log_events(gw, "blob_resume")] == [half]
    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 4)
    assert shares(gw, herd_blob.digest) == ["joined"] * 3 + ["led"]
    lines = blob_gets(gw, herd_blob.digest)
    assert {(a["status"], a["bytes"], a["verified"], a.get("error")) for a in lines} == {
        (200, herd_blob.size, "ok", None)
    }
    assert [a["resumes"] for a in lines] == [1] * 4
    assert metric(gw, "registry_gateway_blob_body_bytes_total", side="upstream") == herd_blob.size
    assert not log_events(gw, "shared_fetch_detached")


# ---------------------------------------------------------------------- 5. passthrough logins
def login(gw: Gateway, host: str, route: str, user: str, password: str) -> str:
    """A client's own token, bought through the gateway's token endpoint as Docker buys it."""
    answer = httpx.get(
        f"{gw.url}/auth/token",
        params={"service": route, "scope": f"repository:{PRIVATE}:pull"},
        auth=(user, password),
        headers={"host": host},
    )
    assert answer.status_code == 200, answer.text
    return "Bearer " + answer.json()["token"]


def front_asked(front: FaultFront, blob: Blob, method: str, authorization: str) -> list[FrontRequest]:
    """The requests for ``blob`` the front saw with ``authorization``."""
    return [
        r for r in front.requests if r.method == method and blob.digest in r.target and r.authorization == authorization
    ]


def test_passthrough_joins_only_after_the_upstream_accepted_the_clients_own_token(
    testbed: Testbed, herd_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    # A host-routed passthrough route, as in tests/e2e/conftest.py: the client's own upstream
    # token goes to the upstream as it is (tests/e2e/test_logins.py).
    route = "login-ghcr.test"
    front = fronts(testbed.ghcr.registry_url)
    # curl takes its first ~10 MiB at once, whatever its rate: the whole blob is kept behind the
    # leader, so that the joiner joins (not catches up, which needs no HEAD: its own GET is asked).
    env = {"GATEWAY_SHARED_RETAIN_BYTES": str(herd_blob.size)}
    gw = start_gateway(route, front.url, env, extra='auth = "passthrough"\nhosts = ["login.*"]\n')
    host = f"login.gw.test:{gw.port}"
    url = f"{gw.url}/v2/{PRIVATE}/blobs/{herd_blob.digest}"
    mine = login(gw, host, route, *testbed.credentials.as_tuple())
    theirs = login(gw, host, route, *testbed.credentials.as_tuple())  # the same user, another token
    other = login(gw, host, route, *testbed.other_credentials.as_tuple())  # valid, but not for private/
    assert len({mine, theirs, other}) == 3

    leader = Pull(url, "leader", rate="8M", authorization=mine, host=host)  # 4 s for the blob
    leader.wait_for_bytes(1 * MIB)
    # (a) no login, (b) a token without access to the repository, or one the upstream never
    # issued: 401 with the gateway's challenge, registry JSON, not a byte of the blob.
    refused = (other, "Bearer not-a-token")
    for authorization in (None, *refused):
        headers = {"host": host, **({"authorization": authorization} if authorization else {})}
        answer = httpx.get(url, headers=headers)
        assert answer.status_code == 401, authorization
        assert answer.headers["www-authenticate"].startswith(f'Bearer realm="http://{host}/auth/token"')
        assert registry_errors(answer, require_detail=False)[0]["code"] == "UNAUTHORIZED"
        assert len(answer.content) < 1024
    # (c) another valid client: the upstream accepts its own token (a HEAD), and it joins; and
    # joins again on the same token without a second HEAD (its access is remembered for 60 s).
    joiner = Pull(url, "joiner", authorization=theirs, host=host).wait()
    again = Pull(url, "joiner-again", authorization=theirs, host=host).wait()
    for p in (joiner, again):
        p.got(herd_blob)
    assert leader.proc.poll() is None, "the leader had finished: nothing left to join"
    leader.wait().got(herd_blob)

    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 6)
    lines = blob_gets(gw, herd_blob.digest)
    assert [(a["status"], a.get("share"), a["bytes"]) for a in lines[:3]] == [(401, None, 0)] * 3  # in order
    for pull, share in ((leader, "led"), (joiner, "joined"), (again, "joined")):
        line = line_of(gw, pull)
        assert (line["status"], line["share"], line["bytes"], line["verified"]) == (200, share, herd_blob.size, "ok")
    # The upstream: one GET of the bytes (the leader's, with its token); the joiner's one HEAD
    # with its own token, accepted; each refused token's HEAD and GET refused; nothing without a login.
    assert [(r.status, r.body_bytes) for r in front_asked(front, herd_blob, "GET", mine)] == [(200, herd_blob.size)]
    assert [r.status for r in front_asked(front, herd_blob, "HEAD", theirs)] == [200]
    assert not front_asked(front, herd_blob, "GET", theirs)
    for authorization in refused:
        assert [(r.method, r.status) for r in front.requests if r.authorization == authorization] == [
            ("HEAD", 401),
            ("GET", 401),
        ]
    assert len([r for r in front.requests if herd_blob.digest in r.target]) == 6  # and no other for the blob


def test_a_broken_passthrough_fetch_sends_each_reader_on_with_its_own_token(
    testbed: Testbed, herd_blob: Blob, fronts: MakeFront, start_gateway: StartGateway
) -> None:
    """The shared body was opened with the leader's token only: when it breaks, nobody resumes
    it for the others; every reader asks for its own rest, with its own token."""
    route = "login-ghcr.test"
    front = fronts(testbed.ghcr.registry_url, rate=32 * MIB)  # 1 s for the blob: both are reading
    half = herd_blob.size // 2
    front.fault(herd_blob.digest, "reset", at=half)
    gw = start_gateway(route, front.url, extra='auth = "passthrough"\nhosts = ["login.*"]\n')
    host = f"login.gw.test:{gw.port}"
    url = f"{gw.url}/v2/{PRIVATE}/blobs/{herd_blob.digest}"
    tokens = {name: login(gw, host, route, *testbed.credentials.as_tuple()) for name in ("leader", "joiner")}

    leader = Pull(url, "leader", authorization=tokens["leader"], host=host)
    leader.wait_for_bytes(1 * MIB)
    joiner = Pull(url, "joiner", authorization=tokens["joiner"], host=host)
    for p in (leader, joiner):
        p.wait()
        p.got(herd_blob)

    assert wait_for(lambda: len(blob_gets(gw, herd_blob.digest)) == 2)
    events = {e["request_id"]: e for e in log_events(gw, "shared_fetch_detached")}
    assert set(events) == {"leader", "joiner"}
    for p in (leader, joiner):
        line = line_of(gw, p)
        assert (line["status"], line["bytes"], line["share"], line["verified"]) == (
            200,
            herd_blob.size,
            "detached",
            "ok",
        )
        offset = events[p.name]["offset"]
        assert (events[p.name]["reason"], 0 < offset <= half) == ("upstream_broke", True)
        # Upstream, with its token: the shared body (the leader's only), then its own rest.
        shared = [(None, 200, "reset", half)] if p is leader else []
        rest = (f"bytes={offset}-{herd_blob.size - 1}", 206, None, herd_blob.size - offset)
        own = [(r.range, r.status, r.fault, r.body_bytes) for r in front_asked(front, herd_blob, "GET", tokens[p.name])]
        assert own == [*shared, rest]
    assert [r.status for r in front_asked(front, herd_blob, "HEAD", tokens["joiner"])] == [200]
    assert not log_events(gw, "blob_resume")  # the shared body itself was not asked for again
    assert wait_for(lambda: windows_empty(gw))


# ---------------------------------------------------------------------- 6. real clients at once
def test_containerd_and_docker_pulling_at_once_share_the_big_layer(
    testbed: Testbed,
    containerd: Containerd,
    dockerd: Dockerd,
    fronts: MakeFront,
    start_gateway: StartGateway,
) -> None:
    image = testbed.images["bigimage"]
    [layer] = image.layers[PLATFORM]
    size = image.blobs[layer]
    # The CDN sends the layer at 128 MiB/s, so that both pulls meet it while it streams (each
    # client takes its own time for the manifests and the config first); a window as big as the
    # layer lets the later one join wherever the first one is.
    hub, cdn = hub_via_fronts(testbed, fronts, rate=128 * MIB)
    gw = start_gateway("docker.io", hub.url, {"GATEWAY_SHARED_WINDOW_BYTES": str(size)})
    ref = f"127.0.0.1:{gw.port}/{image.repo}:1.0"
    containerd.remove_all()
    hosts = containerd.hosts_dir({"docker.io": gw.url})
    errors: list[BaseException] = []

    def run(pull: Callable[[], object]) -> None:
        try:
            pull()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    try:
        threads = [
            threading.Thread(target=run, args=(lambda: containerd.pull(f"docker.io/{image.repo}:1.0", hosts),)),
            threading.Thread(target=run, args=(lambda: dockerd.docker("pull", ref),)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        # Both verified every layer's digest as they wrote it; the images are the pushed ones.
        assert containerd.image_digest(f"docker.io/{image.repo}:1.0") == image.digest
        assert layer in containerd.ctr("content", "ls", "-q").stdout.split()
        assert f"127.0.0.1:{gw.port}/{image.repo}@{image.digest}" in dockerd.repo_digests(ref)
    finally:
        containerd.remove_all()
        with contextlib.suppress(AssertionError):  # not pulled
            dockerd.docker("image", "rm", ref)

    assert wait_for(lambda: len(blob_gets(gw, layer)) == 2)
    assert shares(gw, layer) == ["joined", "led"]
    assert {(a["status"], a["bytes"], a["verified"]) for a in blob_gets(gw, layer)} == {(200, size, "ok")}
    assert gets(cdn, layer) == [(None, 200, None, size)]
