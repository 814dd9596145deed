"""One blob, one replica: the shipped nginx site sends every pull of a blob to one gateway, which fetches it once.

A gateway shares one upstream fetch among the concurrent pulls of a blob that reach *its*
process (``gateway/blobs/herd.py``). Across replicas that works only if the load balancer sends one
blob to one replica: ``deploy/nginx/registry-gateway.conf`` does it with ``hash $uri
consistent`` (docs/deploy.md, "Several replicas: one blob, one replica").

- Two real gateway processes behind a real nginx running the shipped site, changed only as
  ``tests/nginx_front.py`` changes it (ports, certificate, log paths, and one ``server`` line
  per gateway, the way the site's comment adds replicas). The gateways reach the test bed's
  hub through a fault front (no faults: it counts), and hub's redirects to the CDN through a
  second one. 16 curl clients pull the big blob at once over TLS: every client gets the
  digest's bytes, and the upstream sees ONE fetch of the blob (one 307 at hub, one body from
  the CDN). The control: all 16 requests are in one gateway's log (one led the fetch, 15
  joined it), while other paths hash onto the other gateway.
- Three echo servers in the gateways' place show what the docs say of the hash: a path stays on
  its server (its query does not count), keep-alive still works with it, and a server that is
  removed from the block, or killed while still in it, moves only its own paths, to the same
  servers either way, with no error for the client.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import require
from tests.nginx_front import Nginx, Pki, make_pki, run_nginx
from tests.support import Gateway, run_gateway, stop, wait_for
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront, FrontRequest
from tests.testbed.images import ALL_MANIFEST_TYPES

pytestmark = pytest.mark.e2e

CLIENTS = 16
PLATFORM = "linux/amd64"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["gw.test", "*.gw.test"], ["127.0.0.1"])


def tls_client(pki: Pki) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert)), timeout=60)


# ---------------------------------------------------------------------- two gateways, one nginx
@dataclass
class Fleet:
    gateways: list[Gateway]
    nginx: Nginx
    hub: FaultFront  # before hub's registry: the blob's GET, answered 307
    cdn: FaultFront  # before the CDN: the blob's bytes

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.nginx.https_port}{path}"


@pytest.fixture
def fleet(testbed: Testbed, pki: Pki, tmp_path: Path) -> Iterator[Fleet]:
    require("nginx", "curl")
    with ExitStack() as stack:
        cdn = stack.enter_context(FaultFront(testbed.cdn_url))
        hub = stack.enter_context(FaultFront(testbed.hub.registry_url, rewrite_location=(testbed.cdn_url, cdn.url)))
        routes = (
            f'[[route]]\nname = "docker.io"\nupstream = "{hub.url}"\n'
            "allow_private_addresses = true\ndefault = true\nlibrary = true\n"
        )
        # A window as big as the blob: on a test machine 16 TLS clients share two cores with
        # nginx, both gateways and the fronts, and one of them can fall the default window (128
        # MiB) behind the others; it would go on alone, with an upstream request of its own
        # (herd.py, tested there). Here every client stays in: only placement decides.
        big = max(testbed.images["bigimage"].blobs.values())
        env = {"GATEWAY_SHARED_WINDOW_BYTES": str(big), "GATEWAY_SHARED_MEMORY_BYTES": str(2 * big + (4 << 20))}
        gateways = [
            stack.enter_context(run_gateway(routes, tmp_path / name, env=env)) for name in ("gateway-a", "gateway-b")
        ]
        nginx = stack.enter_context(run_nginx(tmp_path / "nginx", upstream_port=[gw.port for gw in gateways], pki=pki))
        yield Fleet(gateways, nginx, hub, cdn)


def access_lines(gw: Gateway) -> list[dict[str, Any]]:
    """The gateway's access lines for the registry API (not run_gateway's /healthz)."""
    lines = [json.loads(line) for line in gw.log_lines()]
    return [e for e in lines if e.get("event") == "access" and e["path"].startswith("/v2/")]


def blob_gets(gw: Gateway, digest: str) -> list[dict[str, Any]]:
    return [a for a in access_lines(gw) if a["method"] == "GET" and a["path"].endswith(f"/blobs/{digest}")]


def upstream_gets(front: FaultFront, digest: str, statuses: tuple[int, ...]) -> list[FrontRequest]:
    return [r for r in front.requests_for(digest, statuses=statuses) if r.method == "GET"]


@dataclass
class Pull:
    returncode: int
    stderr: str
    size: int
    digest: str
    seconds: float


def pull(url: str, pki: Pki, start: threading.Barrier) -> Pull:
    """One client: curl over TLS (verified against the test CA), its body hashed as it arrives."""
    start.wait()
    began = time.monotonic()
    sha, size = hashlib.sha256(), 0
    argv = ["curl", "-sS", "--fail", "--max-time", "120", "--cacert", str(pki.ca_cert), url]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        while chunk := proc.stdout.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
        stderr = proc.stderr.read().decode(errors="replace")
    return Pull(proc.returncode, stderr, size, "sha256:" + sha.hexdigest(), time.monotonic() - began)


def test_sixteen_pulls_through_two_replicas_cost_one_upstream_fetch(fleet: Fleet, pki: Pki, testbed: Testbed):
    image = testbed.images["bigimage"]
    [digest] = image.layers[PLATFORM]
    size = image.blobs[digest]
    path = f"/v2/{image.repo}/blobs/{digest}"
    url = fleet.url(path)

    start = threading.Barrier(CLIENTS)
    results: list[Pull | None] = [None] * CLIENTS

    def client(i: int) -> None:
        results[i] = pull(url, pki, start)

    threads = [threading.Thread(target=client, args=(i,), name=f"pull-{i}") for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    pulls = [r for r in results if r is not None]
    assert len(pulls) == CLIENTS

    print(f"{CLIENTS} pulls of {size >> 20} MiB: the slowest took {max(p.seconds for p in pulls):.1f} s")
    # Every client got the blob, byte for byte.
    for p in pulls:
        assert (p.returncode, p.stderr, p.size, p.digest) == (0, "", size, digest)

    # The control: the hash sent all 16 to one gateway (each logs a request once it has ended).
    assert wait_for(lambda: sum(len(blob_gets(gw, digest)) for gw in fleet.gateways) == CLIENTS)
    served = [blob_gets(gw, digest) for gw in fleet.gateways]
    assert sorted(len(lines) for lines in served) == [0, CLIENTS]
    [lines] = [lines for lines in served if lines]
    assert {(line["status"], line["bytes"]) for line in lines} == {(200, size)}
    # ... where the first opened the blob's fetch and the 15 others read it (herd.py).
    assert sorted(line["share"] for line in lines) == ["joined"] * (CLIENTS - 1) + ["led"]
    # nginx logged them too, and nothing else went wrong on the way.
    logged = [json.loads(line) for line in fleet.nginx.access_lines()]
    assert [(e["uri"], e["status"], e["bytes"]) for e in logged] == [(path, 200, size)] * CLIENTS

    # The upstream saw ONE fetch of the blob: one GET at hub (its 307) and one at the CDN.
    assert len(upstream_gets(fleet.hub, digest, (307,))) == 1
    cdn = upstream_gets(fleet.cdn, digest, (200, 206))
    assert [(r.status, r.range, r.body_bytes) for r in cdn] == [(200, None, size)]

    # Both replicas take part: other paths hash onto the gateway that had none of the blob (24
    # tags' manifests, each its own path: all 24 on one gateway would be a 1 in 8 million chance).
    tags = sorted(testbed.images["manytags"].tags)[:24]
    with tls_client(pki) as http:
        for tag in tags:
            answer = http.get(
                fleet.url(f"/v2/library/manytags/manifests/{tag}"), headers={"Accept": ", ".join(ALL_MANIFEST_TYPES)}
            )
            assert answer.status_code == 200

    def manifest_lines(gw: Gateway) -> list[dict[str, Any]]:
        return [line for line in access_lines(gw) if "/manifests/" in line["path"]]

    assert wait_for(lambda: sum(len(manifest_lines(gw)) for gw in fleet.gateways) == len(tags))
    assert all(manifest_lines(gw) for gw in fleet.gateways), "every manifest path hashed onto one gateway"
    # ... and each tag to one of them only.
    paths = [line["path"] for gw in fleet.gateways for line in manifest_lines(gw)]
    assert sorted(paths) == sorted(f"/v2/library/manytags/manifests/{tag}" for tag in tags)


# ---------------------------------------------------------------------- what the hash does
ECHO = r"""
import http.server, json, sys

class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes

    def do_GET(self):
        body = json.dumps({"server": sys.argv[1], "peer_port": self.client_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@dataclass
class Echo:
    name: str
    port: int
    proc: subprocess.Popen[bytes]


@pytest.fixture
def echoes() -> Iterator[list[Echo]]:
    started: list[Echo] = []
    try:
        for name in ("a", "b", "c"):
            proc = subprocess.Popen([sys.executable, "-c", ECHO, name], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            started.append(Echo(name, int(proc.stdout.readline()), proc))
        yield started
    finally:
        for echo in started:
            stop(echo.proc)
            if echo.proc.stdout is not None:
                echo.proc.stdout.close()


def blob_path(i: int) -> str:
    return f"/v2/library/app{i % 4}/blobs/sha256:{hashlib.sha256(str(i).encode()).hexdigest()}"


def owners(http: httpx.Client, nginx: Nginx, paths: list[str], query: str = "") -> dict[str, str]:
    """Which echo server answered each path through ``nginx``."""
    found = {}
    for path in paths:
        answer = http.get(f"https://127.0.0.1:{nginx.https_port}{path}{query}")
        assert answer.status_code == 200
        found[path] = answer.json()["server"]
    return found


def test_the_hash_keeps_paths_on_their_server_and_moves_only_a_lost_servers_paths(
    echoes: list[Echo], pki: Pki, tmp_path: Path
):
    require("nginx")
    paths = [blob_path(i) for i in range(48)]
    a, b, c = echoes
    with (
        run_nginx(tmp_path / "nginx-abc", upstream_port=[e.port for e in echoes], pki=pki) as abc,
        run_nginx(tmp_path / "nginx-ac", upstream_port=[a.port, c.port], pki=pki) as ac,
        tls_client(pki) as http,
    ):
        before = owners(http, abc, paths)
        # Every server has a share, and asking again (or with containerd's ?ns=) changes nothing.
        assert set(before.values()) == {"a", "b", "c"}
        assert owners(http, abc, paths) == before
        assert owners(http, abc, paths, "?ns=docker.io") == before

        # keepalive works with the hash: one path asked twice travels on one upstream connection.
        url = f"https://127.0.0.1:{abc.https_port}{paths[0]}"
        first, second = (http.get(url).json() for _ in range(2))
        assert first["peer_port"] == second["peer_port"]

        # b's line removed from the upstream block (the same site with a and c only): a and c
        # keep every path they had, b's paths move to them, and only those move.
        removed = owners(http, ac, paths)
        assert {p: s for p, s in removed.items() if before[p] != "b"} == {p: s for p, s in before.items() if s != "b"}
        assert set(removed.values()) <= {"a", "c"}

        # b goes away while still listed (killed: its connections die with it). Its paths go
        # where they go without b: the next server on the ring; the client sees no error.
        b.proc.kill()
        b.proc.wait()
        assert owners(http, abc, paths) == removed
        assert "connect() failed (111: Connection refused)" in abc.error_log.read_text(errors="replace")
