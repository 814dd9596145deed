"""Every byte checked, broken transfers resumed: proven with real registries, real clients and a fault front.

The gateway (a real process) reaches the test bed's registries through ``FaultFront``
(``tests/testbed/faults.py``), which relays byte for byte and breaks chosen blob answers: an RST
after N body bytes, a stall, a flipped byte, a Range request answered with a 200. For blobs the
registry serves itself the front stands before ghcr; for blobs behind a redirect, one front
stands before hub (its ``Location`` pointed at a second front) and the second before the CDN.
Each test starts its own gateway, so every count it reads (metrics, log lines, front requests)
is its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.clients import Containerd, Skopeo, verify_dir_copy
from tests.support import Gateway, run_gateway, wait_for
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront
from tests.testbed.images import Image

PLATFORM = "linux/amd64"
# What curl says of a transfer cut before its Content-Length: 18 (partial file), 56 (reset).
INCOMPLETE = (18, 56)

pytestmark = pytest.mark.e2e

MakeFront = Callable[..., FaultFront]
StartGateway = Callable[..., Gateway]


@pytest.fixture
def fronts() -> Iterator[MakeFront]:
    with ExitStack() as stack:

        def make(target: str, rewrite_location: tuple[str, str] | None = None) -> FaultFront:
            return stack.enter_context(FaultFront(target, rewrite_location=rewrite_location))

        yield make


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    with ExitStack() as stack:

        def start(
            route: str, upstreams: list[str], env: dict[str, str] | None = None, mirrors: Sequence[str] = ()
        ) -> Gateway:
            listed, mirrored = (", ".join(f'"{u}"' for u in urls) for urls in (upstreams, mirrors))
            routes = (
                f'[[route]]\nname = "{route}"\nupstream = [{listed}]\nmirrors = [{mirrored}]\n'
                "allow_private_addresses = true\ndefault = true\nlibrary = true\n"
            )
            return stack.enter_context(run_gateway(routes, tmp_path / "gateway", env=env))

        yield start


@dataclass(frozen=True)
class Way:
    """How the gateway reaches a blob: straight from a registry, or by the registry's redirect to the CDN."""

    route: str
    image: str
    front: FaultFront  # the front that breaks blob bodies
    upstream: str  # the route's upstream (a front)
    redirects: FaultFront | None = None  # the front before hub, when blobs are redirected


def direct_path(testbed: Testbed, fronts: MakeFront) -> Way:
    front = fronts(testbed.ghcr.registry_url)
    return Way("ghcr.io", "app", front, front.url)


def cdn_path(testbed: Testbed, fronts: MakeFront) -> Way:
    cdn = fronts(testbed.cdn_url)
    hub = fronts(testbed.hub.registry_url, rewrite_location=(testbed.cdn_url, cdn.url))
    return Way("docker.io", "alpine", cdn, hub.url, redirects=hub)


# ---------------------------------------------------------------------- reading what happened
def log_events(gw: Gateway, event: str) -> list[dict]:
    return [entry for line in gw.log_lines() if (entry := json.loads(line)).get("event") == event]


def blob_gets(gw: Gateway, digest: str) -> list[dict]:
    return [a for a in log_events(gw, "access") if a["method"] == "GET" and a["path"].endswith(f"/blobs/{digest}")]


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        match = re.match(r"([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match[3])
    return total


def blob_bytes(testbed: Testbed, upstream: str, image: Image, digest: str) -> bytes:
    """The blob as the registry holds it, fetched around the gateway and the fronts."""
    token = testbed.admin_token(upstream, f"repository:{image.repo}:pull")
    url = f"{testbed.upstream(upstream).registry_url}/v2/{image.repo}/blobs/{digest}"
    body = httpx.get(url, headers={"authorization": f"Bearer {token}"}, follow_redirects=True).content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    return body


def curl(url: str, out: Path) -> tuple[int, bytes]:
    """curl's exit code and the bytes it wrote."""
    proc = subprocess.run(["curl", "-sS", "--max-time", "60", "-o", str(out), url], capture_output=True, text=True)
    return proc.returncode, out.read_bytes() if out.exists() else b""


def ranges(front: FaultFront, digest: str) -> list[tuple[str | None, int, str | None, int]]:
    """(Range, status, fault, body bytes sent) of each blob answer the front relayed for ``digest``."""
    return [(r.range, r.status, r.fault, r.body_bytes) for r in front.requests_for(digest)]


# ---------------------------------------------------------------------- resets, with real clients
@pytest.mark.parametrize("client", ["skopeo", "containerd"])
@pytest.mark.parametrize("path", ["registry", "cdn"])
def test_reset_mid_blob_is_resumed_for_real_clients(
    request: pytest.FixtureRequest,
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    client: str,
    path: str,
) -> None:
    """Each layer's connection is reset half-way once; the pull completes with no client retry."""
    way = direct_path(testbed, fronts) if path == "registry" else cdn_path(testbed, fronts)
    image = testbed.images[way.image]
    layers = image.layers[PLATFORM]
    for layer in layers:
        way.front.fault(layer, "reset", at=image.blobs[layer] // 2)
    gw = start_gateway(way.route, [way.upstream])

    if client == "skopeo":
        skopeo: Skopeo = request.getfixturevalue("skopeo")
        verify_dir_copy(skopeo.copy_all(f"127.0.0.1:{gw.port}/{image.repo}:{image.tag}", tmp_path / "copy"), image)
    else:
        containerd: Containerd = request.getfixturevalue("containerd")
        containerd.remove_all()
        ref = f"{way.route}/{image.repo}:{image.tag}"
        try:
            containerd.pull(ref, containerd.hosts_dir({way.route: gw.url}))
            assert containerd.image_digest(ref) == image.digest
            assert set(layers) <= set(containerd.ctr("content", "ls", "-q").stdout.split())
        finally:
            containerd.remove_all()

    assert wait_for(lambda: all(blob_gets(gw, layer) for layer in layers))
    resumed = {e["digest"]: e["offset"] for e in log_events(gw, "blob_resume")}
    assert resumed == {layer: image.blobs[layer] // 2 for layer in layers}
    for layer in layers:
        size, half = image.blobs[layer], image.blobs[layer] // 2
        # One GET by the client (no retry), resumed once and verified whole.
        [line] = blob_gets(gw, layer)
        assert (line["status"], line["bytes"], line["resumes"], line["verified"]) == (200, size, 1, "ok")
        # Upstream: the reset answer with exactly half the bytes, then the rest as a 206.
        assert ranges(way.front, layer) == [
            (None, 200, "reset", half),
            (f"bytes={half}-{size - 1}", 206, None, size - half),
        ]
        if way.redirects is not None:  # the resume took a fresh redirect
            assert len(way.redirects.requests_for(layer, statuses=(307,))) == 2
    assert metric(gw, "registry_gateway_blob_resumes_total", route=way.route) == len(layers)
    assert metric(gw, "registry_gateway_blob_checks_total", route=way.route, result="ok") >= len(layers)


# ---------------------------------------------------------------------- one blob, by curl
@pytest.fixture
def layer(testbed: Testbed) -> tuple[Image, str, int]:
    image = testbed.images["app"]
    digest = image.layers[PLATFORM][0]
    return image, digest, image.blobs[digest]


def test_stall_mid_blob_is_resumed(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
) -> None:
    image, digest, size = layer
    half = size // 2
    way = direct_path(testbed, fronts)
    way.front.fault(digest, "stall", at=half)
    gw = start_gateway(way.route, [way.upstream], env={"GATEWAY_BLOB_IDLE_TIMEOUT": "2"})

    code, body = curl(f"{gw.url}/v2/{image.repo}/blobs/{digest}", tmp_path / "blob")
    assert code == 0
    assert len(body) == size
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["status"], line["bytes"], line["resumes"], line["verified"]) == (200, size, 1, "ok")
    [resume] = log_events(gw, "blob_resume")
    assert (resume["offset"], resume["error"]) == (half, "ReadTimeout")
    assert ranges(way.front, digest) == [
        (None, 200, "stall", half),
        (f"bytes={half}-{size - 1}", 206, None, size - half),
    ]
    assert metric(gw, "registry_gateway_blob_resumes_total", route=way.route) == 1
    # The stalled connection was let go once the blob was served.
    assert wait_for(lambda: way.front.held_connections == 0)


@pytest.mark.parametrize("refusal", [None, "ignore_range", "wrong_range"])
def test_a_body_that_keeps_breaking_moves_on_to_the_next_upstream(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
    refusal: str | None,
) -> None:
    """Upstream A breaks the body, then its resume breaks too (a reset again, a 200 with the whole
    blob, or a 206 for other bytes): A is passed over and the rest comes from B, intact."""
    image, digest, size = layer
    quarter = size // 4
    real = blob_bytes(testbed, "ghcr", image, digest)
    way = direct_path(testbed, fronts)
    other = fronts(testbed.ghcr.registry_url)
    if refusal is None:
        way.front.fault(digest, "reset", at=quarter, times=None)
    else:
        way.front.fault(digest, "reset", at=quarter)
        way.front.fault(digest, refusal, times=None)  # type: ignore[arg-type]
    gw = start_gateway(way.route, [way.front.url, other.url])
    url = f"{gw.url}/v2/{image.repo}/blobs/{digest}"

    code, body = curl(url, tmp_path / "blob")
    assert code == 0
    assert body == real
    first, second = ranges(way.front, digest)
    assert first == (None, 200, "reset", quarter)
    assert second[0] == f"bytes={quarter}-{size - 1}"
    if refusal is None:
        assert second == (f"bytes={quarter}-{size - 1}", 206, "reset", quarter)
    else:
        assert (second[1], second[2]) == (200 if refusal == "ignore_range" else 206, refusal)
    offset = 2 * quarter if refusal is None else quarter
    assert ranges(other, digest) == [(f"bytes={offset}-{size - 1}", 206, None, size - offset)]
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["status"], line["bytes"], line["resumes"], line["verified"]) == (200, size, 2, "ok")
    [passed] = log_events(gw, "upstream_passed_over")
    assert (passed["upstream"], passed["digest"], passed["breaks"]) == (way.front.url, digest, 2)
    labels = {"route": way.route, "upstream": way.front.url}
    assert metric(gw, "registry_gateway_upstream_passed_over_total", **labels) == 1

    # A is passed over for that blob a while: the next pull (once nothing is kept in memory) starts on B.
    assert wait_for(lambda: metric(gw, "registry_gateway_shared_window_bytes") == 0, timeout=30)
    seen = len(way.front.requests)
    code, body = curl(url, tmp_path / "again")
    assert (code, body) == (0, real)
    assert len(way.front.requests) == seen
    assert ranges(other, digest)[-1] == (None, 200, None, size)


def test_a_resume_asks_an_upstream_whose_breaker_rests_rather_than_cut_the_client(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
) -> None:
    """A breaks every body; B failed twice lately, so its breaker rests. Before, the resume found no
    upstream to ask and cut the client (the soak found it); now B is asked as a last resort."""
    image, digest, size = layer
    quarter = size // 4
    real = blob_bytes(testbed, "ghcr", image, digest)
    way = direct_path(testbed, fronts)
    other = fronts(testbed.ghcr.registry_url)
    gw = start_gateway(way.route, [way.front.url, other.url], env={"GATEWAY_BREAKER_FAILURES": "2"})
    for probe, both_fail in (("probe-1", True), ("probe-2", False), ("probe-3", True)):
        if both_fail:  # A fails (once, then succeeds in between: its count starts again), B fails each time
            way.front.fault(probe, "status", status=503)
            other.fault(probe, "status", status=503)
        answer = httpx.get(f"{gw.url}/v2/{image.repo}/manifests/{probe}", timeout=30)
        assert answer.status_code == (503 if both_fail else 404)
    status = httpx.get(f"{gw.url}/status", headers={"accept": "application/json"}, timeout=30).json()
    breakers = {u["url"]: u["breaker"] for r in status["routes"] for u in r["upstreams"]}
    assert (breakers[other.url], breakers[way.front.url]) == ("open", "closed")
    way.front.fault(digest, "reset", at=quarter, times=None)

    code, body = curl(f"{gw.url}/v2/{image.repo}/blobs/{digest}", tmp_path / "blob")
    assert code == 0
    assert body == real
    assert [r[:3] for r in ranges(way.front, digest)] == [
        (None, 200, "reset"),
        (f"bytes={quarter}-{size - 1}", 206, "reset"),
    ]
    assert ranges(other, digest) == [(f"bytes={2 * quarter}-{size - 1}", 206, None, size - 2 * quarter)]
    assert wait_for(lambda: bool(blob_gets(gw, digest)))  # the access line comes after the last byte
    [line] = blob_gets(gw, digest)
    assert (line["status"], line["bytes"], line["resumes"], line["verified"]) == (200, size, 2, "ok")


def test_every_upstream_breaking_aborts_the_client_only_then(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
) -> None:
    """A and B both break every body: each is asked twice, then the client's transfer is cut, with
    nothing left connected."""
    image, digest, size = layer
    real = blob_bytes(testbed, "ghcr", image, digest)
    way = direct_path(testbed, fronts)
    other = fronts(testbed.ghcr.registry_url)
    for front in (way.front, other):
        front.fault(digest, "reset", at=1000, times=None)
    gw = start_gateway(way.route, [way.front.url, other.url], env={"GATEWAY_BLOB_RESUMES": "3"})

    code, body = curl(f"{gw.url}/v2/{image.repo}/blobs/{digest}", tmp_path / "blob")
    assert code in INCOMPLETE
    assert body == real[: len(body)]
    assert ranges(way.front, digest) == [
        (None, 200, "reset", 1000),
        (f"bytes=1000-{size - 1}", 206, "reset", 1000),
    ]
    assert ranges(other, digest) == [
        (f"bytes=2000-{size - 1}", 206, "reset", 1000),
        (f"bytes=3000-{size - 1}", 206, "reset", 1000),
    ]
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["resumes"], line["verified"], line["error"]) == (3, "incomplete", "upstream_broke")
    assert [e["upstream"] for e in log_events(gw, "upstream_passed_over")] == [way.front.url, other.url]
    assert wait_for(lambda: way.front.open_connections == 0 and other.open_connections == 0), "left open"


def test_flipped_byte_of_a_small_blob_is_asked_of_the_next_upstream(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
) -> None:
    """The layer (under ``HELD_WHOLE``) is held whole until checked: none of A's wrong bytes reached
    the client, so B is asked for all of it; A stays avoided for that blob. (A client that already
    had bytes is cut: the unit tests of ``tests/unit/blobs/test_digest.py``.)"""
    image, digest, size = layer
    real = blob_bytes(testbed, "ghcr", image, digest)
    way = direct_path(testbed, fronts)
    way.front.fault(digest, "flip", at=size // 2, times=None)
    gw = start_gateway(way.route, [way.upstream, testbed.ghcr.registry_url])
    url = f"{gw.url}/v2/{image.repo}/blobs/{digest}"

    code, body = curl(url, tmp_path / "first")
    assert (code, body) == (0, real)
    assert ranges(way.front, digest) == [(None, 200, "flip", size)]
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["upstream"], line["verified"], line["share"]) == (testbed.ghcr.registry_url, "ok", "detached")
    [mismatch] = log_events(gw, "digest_mismatch")
    assert (mismatch["digest"], mismatch["upstream"]) == (digest, way.front.url)
    assert mismatch["actual"] != digest
    labels = {"route": way.route, "upstream": way.front.url}
    assert metric(gw, "registry_gateway_digest_mismatch_total", **labels) == 1

    seen = len(way.front.requests)
    code, body = curl(url, tmp_path / "second")
    assert (code, body) == (0, real)
    assert len(way.front.requests) == seen  # the front was not asked again, for anything
    assert wait_for(lambda: len(blob_gets(gw, digest)) == 2)
    second = blob_gets(gw, digest)[1]
    assert (second["upstream"], second["verified"], second["bytes"]) == (testbed.ghcr.registry_url, "ok", size)
    assert metric(gw, "registry_gateway_digest_mismatch_total", **labels) == 1


def test_a_small_blob_a_mirror_got_wrong_comes_whole_from_the_upstream(
    testbed: Testbed, fronts: MakeFront, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A blob small enough to be held whole until checked: none of the mirror's wrong bytes reached
    the client, so it is asked of the upstream instead of cut (the soak found these cut)."""
    image = testbed.images["app"]
    digest, size = min(image.blobs.items(), key=lambda item: item[1])
    real = blob_bytes(testbed, "ghcr", image, digest)
    mirror, upstream = fronts(testbed.ghcr.registry_url), fronts(testbed.ghcr.registry_url)
    mirror.fault(digest, "flip", at=size // 2, times=None)
    gw = start_gateway("ghcr.io", [upstream.url], mirrors=[mirror.url])
    url = f"{gw.url}/v2/{image.repo}/blobs/{digest}"

    code, body = curl(url, tmp_path / "blob")
    assert (code, body) == (0, real)
    assert ranges(mirror, digest) == [(None, 200, "flip", size)]
    assert ranges(upstream, digest) == [(f"bytes=0-{size - 1}", 206, None, size)]
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["status"], line["bytes"], line["verified"], line["share"]) == (200, size, "ok", "detached")
    assert line["upstream"] == upstream.url
    [mismatch] = log_events(gw, "digest_mismatch")
    assert (mismatch["digest"], mismatch["upstream"]) == (digest, mirror.url)
    assert metric(gw, "registry_gateway_digest_mismatch_total", upstream=mirror.url) == 1

    # The mirror is avoided for that blob now: the next pull goes to the upstream, whole.
    code, body = curl(url, tmp_path / "again")
    assert (code, body) == (0, real)
    assert len(ranges(mirror, digest)) == 1
    assert ranges(upstream, digest)[-1] == (None, 200, None, size)


def test_every_resume_failing_aborts_the_client_and_leaves_no_connection(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
) -> None:
    image, digest, size = layer
    real = blob_bytes(testbed, "ghcr", image, digest)
    way = direct_path(testbed, fronts)
    way.front.fault(digest, "reset", at=1000, times=None)
    gw = start_gateway(way.route, [way.upstream], env={"GATEWAY_BLOB_RESUMES": "2"})

    code, body = curl(f"{gw.url}/v2/{image.repo}/blobs/{digest}", tmp_path / "blob")
    assert code in INCOMPLETE
    assert len(body) <= 3000
    assert body == real[: len(body)]
    # The first answer and two resumes, each cut after 1,000 bytes; no third resume.
    assert ranges(way.front, digest) == [
        (None, 200, "reset", 1000),
        (f"bytes=1000-{size - 1}", 206, "reset", 1000),
        (f"bytes=2000-{size - 1}", 206, "reset", 1000),
    ]
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["status"], line["resumes"], line["verified"], line["error"]) == (
        200,
        2,
        "incomplete",
        "upstream_broke",
    )
    assert [e["offset"] for e in log_events(gw, "blob_resume")] == [1000, 2000]
    assert metric(gw, "registry_gateway_blob_resumes_total", route=way.route) == 2
    # Nothing of the gateway's is still connected to the front once the client is gone.
    assert wait_for(lambda: way.front.open_connections == 0), f"{way.front.open_connections} left open"


def test_client_range_is_resumed_from_its_own_offset(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
) -> None:
    """A client's own ``Range: bytes=1000-`` that breaks is continued from 1000 plus what came."""
    image, digest, size = layer
    real = blob_bytes(testbed, "ghcr", image, digest)
    way = direct_path(testbed, fronts)
    way.front.fault(digest, "reset", at=5000)
    gw = start_gateway(way.route, [way.upstream])
    out = tmp_path / "part"
    proc = subprocess.run(
        ["curl", "-sS", "-r", "1000-", "-o", str(out), f"{gw.url}/v2/{image.repo}/blobs/{digest}"], capture_output=True
    )
    assert proc.returncode == 0
    assert out.read_bytes() == real[1000:]
    assert ranges(way.front, digest) == [
        ("bytes=1000-", 206, "reset", 5000),
        (f"bytes=6000-{size - 1}", 206, None, size - 6000),
    ]
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["status"], line["resumes"], line["bytes"]) == (206, 1, size - 1000)


def test_flipped_byte_in_the_resumed_part_is_caught(
    testbed: Testbed,
    fronts: MakeFront,
    start_gateway: StartGateway,
    tmp_path: Path,
    layer: tuple[Image, str, int],
) -> None:
    """The digest check spans the first answer and the resume's 206 as one body. The layer is under
    ``HELD_WHOLE``: none of it went out, so the whole blob is asked for again, and comes intact."""
    image, digest, size = layer
    half = size // 2
    real = blob_bytes(testbed, "ghcr", image, digest)
    way = direct_path(testbed, fronts)
    way.front.fault(digest, "reset", at=half)
    way.front.fault(digest, "flip", at=10)  # the reset takes the first answer; this, the resume's
    gw = start_gateway(way.route, [way.upstream])
    code, body = curl(f"{gw.url}/v2/{image.repo}/blobs/{digest}", tmp_path / "blob")
    assert (code, body) == (0, real)
    assert ranges(way.front, digest) == [
        (None, 200, "reset", half),
        (f"bytes={half}-{size - 1}", 206, "flip", size - half),
        (f"bytes=0-{size - 1}", 206, None, size),
    ]
    [mismatch] = log_events(gw, "digest_mismatch")
    assert (mismatch["digest"], mismatch["upstream"]) == (digest, way.front.url)
    assert wait_for(lambda: bool(blob_gets(gw, digest)))
    [line] = blob_gets(gw, digest)
    assert (line["share"], line["verified"], line["bytes"]) == ("detached", "ok", size)  # its own request
    labels = {"route": way.route, "upstream": way.front.url}
    assert metric(gw, "registry_gateway_digest_mismatch_total", **labels) == 1
