"""The shipped nginx site (deploy/nginx/registry-gateway.conf) in front of the real gateway, with TLS.

nginx runs the shipped file with only ports, certificate paths, log path and domain changed
(tests/nginx_front.py), with a test CA and a certificate for ``gw.test``, ``*.gw.test`` and
127.0.0.1. Clients verify that certificate: nothing here turns TLS verification off.

- skopeo pulls by host name, by path prefix and by the default route, byte for byte;
- containerd pulls with a hosts.toml mirror (``ca = ...``), routed by ``ns=``;
- a Range request, and a 256 MiB blob, come through intact;
- a small echo upstream shows what nginx sends the gateway (Host, X-Forwarded-*,
  X-Request-Id, HTTP/1.1 keep-alive) and that responses stream without buffering.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.clients import CLOSED, Containerd, Skopeo, verify_dir_copy
from tests.e2e.conftest import require
from tests.nginx_front import Nginx, Pki, make_pki, run_nginx
from tests.support import Gateway
from tests.testbed.bed import Testbed
from tests.testbed.images import ALL_MANIFEST_TYPES

HEX32 = re.compile(r"[0-9a-f]{32}\Z")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["gw.test", "*.gw.test"], ["127.0.0.1"])


@pytest.fixture(scope="module")
def front(gateway: Gateway, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    require("nginx")
    with run_nginx(tmp_path_factory.mktemp("nginx-front"), upstream_port=gateway.port, pki=pki) as nginx:
        yield nginx


def tls_client(pki: Pki, **kwargs: Any) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert)), timeout=60, **kwargs)


def access_lines(gateway: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gateway.log_lines() if '"event":"access"' in line]


def new_access_lines(gateway: Gateway, before: int, expect_at_least: int = 1) -> list[dict[str, Any]]:
    """Access lines after the first ``before``; the gateway writes each when its response has ended."""
    deadline = time.monotonic() + 5
    while True:
        lines = access_lines(gateway)[before:]
        if len(lines) >= expect_at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def nginx_request_ids(front: Nginx) -> set[str]:
    return {json.loads(line)["request_id"] for line in front.access_lines()}


# --- skopeo: every addressing mode through TLS, every digest checked -------------------------

SKOPEO_CASES = [
    ("app", "host", "ghcr.gw.test:{p}/org/app:v1", "ghcr.io"),
    ("etcd", "prefix", "gw.test:{p}/quay.io/coreos/etcd:v3.5", "quay.io"),
    ("alpine", "default", "gw.test:{p}/alpine:3.20", "docker.io"),
]


@pytest.mark.parametrize(("key", "mode", "ref", "route"), SKOPEO_CASES, ids=[c[1] for c in SKOPEO_CASES])
def test_skopeo_pulls_through_tls(
    skopeo: Skopeo, gateway: Gateway, front: Nginx, pki: Pki, testbed: Testbed, tmp_path, key, mode, ref, route
):
    before = len(access_lines(gateway))
    dest = tmp_path / "copy"
    source = "docker://" + ref.format(p=front.https_port)
    skopeo("copy", "--all", "--src-cert-dir", str(pki.ca_dir), source, f"dir:{dest}")
    verify_dir_copy(dest, testbed.images[key])

    # The gateway routed every request the way the name says, and each carries the id nginx logged.
    lines = new_access_lines(gateway, before)
    assert lines
    assert {line["route"] for line in lines if "route" in line} == {route}
    ids = {line["request_id"] for line in lines}
    assert all(HEX32.match(i) for i in ids)
    assert ids <= nginx_request_ids(front)


def test_skopeo_refuses_an_untrusted_certificate(skopeo: Skopeo, front: Nginx):
    """Verification is real: without the test CA the same pull fails on the certificate."""
    with pytest.raises(AssertionError) as info:
        skopeo("inspect", f"docker://ghcr.gw.test:{front.https_port}/org/app:v1")
    assert "certificate" in str(info.value).lower()


# --- containerd: a hosts.toml mirror with a CA, routed by ns= --------------------------------


@pytest.fixture
def clean_containerd(containerd: Containerd) -> Iterator[Containerd]:
    yield containerd
    containerd.remove_all()


@pytest.mark.parametrize(
    ("ref", "key"),
    [("docker.io/library/alpine:3.20", "alpine"), ("ghcr.io/org/app:v1", "app")],
    ids=["docker.io", "ghcr.io"],
)
def test_containerd_mirror_through_tls(
    clean_containerd: Containerd, gateway: Gateway, front: Nginx, pki: Pki, testbed: Testbed, tmp_path, ref, key
):
    registry = ref.split("/", 1)[0]
    hosts = tmp_path / "certs.d"
    (hosts / registry).mkdir(parents=True)
    # ctr runs outside the hosts namespace: the mirror is the IP, which the certificate names too.
    (hosts / registry / "hosts.toml").write_text(
        f'server = "http://{CLOSED}"\n\n'
        f'[host."https://127.0.0.1:{front.https_port}"]\n'
        f'  capabilities = ["pull", "resolve"]\n'
        f'  ca = "{pki.ca_cert}"\n'
    )
    before = len(access_lines(gateway))
    clean_containerd.pull(ref, hosts)
    image = testbed.images[key]
    assert clean_containerd.image_digest(ref) == image.digest
    content = clean_containerd.ctr("content", "ls", "-q").stdout.split()
    for layer in image.layers.get("linux/amd64", []):
        assert layer in content

    # containerd's ?ns=<registry> passed through nginx untouched and chose the route.
    lines = new_access_lines(gateway, before)
    assert {(line.get("route"), line.get("repository")) for line in lines} == {(registry, image.repo)}
    assert {line["request_id"] for line in lines} <= nginx_request_ids(front)


# --- plain HTTP requests through TLS ----------------------------------------------------------


def first_layer(image) -> tuple[str, int]:
    layer = image.layers["linux/amd64"][0]
    return layer, image.blobs[layer]


def test_range_request_through_tls(front: Nginx, pki: Pki, testbed: Testbed):
    image = testbed.images["app"]
    digest, size = first_layer(image)
    url = f"https://127.0.0.1:{front.https_port}/v2/ghcr.io/{image.repo}/blobs/{digest}"
    with tls_client(pki, follow_redirects=False) as client:
        whole = client.get(url)
        assert whole.status_code == 200
        assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == digest
        assert len(whole.content) == size

        part = client.get(url, headers={"Range": "bytes=100-1123"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 100-1123/{size}"
        assert part.content == whole.content[100:1124]

        # The same by host name (Host header; no SNI for an IP address, and this is nginx's only site).
        hosted = client.get(
            f"https://127.0.0.1:{front.https_port}/v2/{image.repo}/blobs/{digest}",
            headers={"Host": f"ghcr.gw.test:{front.https_port}", "Range": f"bytes={size - 10}-"},
        )
        assert hosted.status_code == 206
        assert hosted.content == whole.content[-10:]


def test_big_blob_streams_through_intact(front: Nginx, pki: Pki, testbed: Testbed):
    """256 MiB through TLS and nginx: every byte arrives, and nginx spills nothing to disk meanwhile."""
    image = testbed.images["bigimage"]
    digest, size = max(image.blobs.items(), key=lambda item: item[1])
    url = f"https://127.0.0.1:{front.https_port}/v2/{image.repo}/blobs/{digest}"
    h = hashlib.sha256()
    received = 0
    with tls_client(pki, follow_redirects=False) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == size
        for chunk in response.iter_bytes(1 << 20):
            h.update(chunk)
            received += len(chunk)
            if received == len(chunk):
                time.sleep(0.5)  # a slow client at first: a buffering proxy would now spill to disk
    assert received == size
    assert "sha256:" + h.hexdigest() == digest
    # nginx warns "an upstream response is buffered to a temporary file" whenever it spills
    # (the file itself is unlinked at once, so the warning is the trace it leaves).
    assert "temporary file" not in front.error_log.read_text(errors="replace")


def test_http_redirects_to_https(front: Nginx):
    response = httpx.get(
        f"http://127.0.0.1:{front.http_port}/v2/org/app/manifests/v1", headers={"Host": "ghcr.gw.test"}
    )
    assert response.status_code == 301
    assert response.headers["location"] == "https://ghcr.gw.test/v2/org/app/manifests/v1"


def test_metrics_stay_inside(front: Nginx, pki: Pki, gateway: Gateway):
    with tls_client(pki) as client:
        assert client.get(f"https://127.0.0.1:{front.https_port}/metrics").status_code == 404
        # ... while the registry API and health answer through the front.
        # The session's routes make 127.0.0.1 a shared host with a passthrough route: its ping asks
        # for a login (docs/security.md); either way the answer is the gateway's.
        ping = client.get(f"https://127.0.0.1:{front.https_port}/v2/")
        assert ping.status_code == 401
        assert ping.headers["docker-distribution-api-version"] == "registry/2.0"
        assert ping.headers["www-authenticate"].startswith("Bearer realm=")
        assert client.get(f"https://127.0.0.1:{front.https_port}/healthz").status_code == 200
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200


def test_push_bodies_stop_at_nginx(front: Nginx, pki: Pki):
    with tls_client(pki) as client:
        big = client.post(f"https://127.0.0.1:{front.https_port}/v2/org/app/blobs/uploads/", content=b"x" * (2 << 20))
        assert big.status_code == 413
        small = client.post(f"https://127.0.0.1:{front.https_port}/v2/org/app/blobs/uploads/", content=b"x")
        assert small.status_code == 405  # the gateway's answer: read-only
        assert small.json()["errors"][0]["code"] == "UNSUPPORTED"


# --- what nginx sends upstream: an echo server in the gateway's place ------------------------


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []

    def do_GET(self) -> None:
        record = {
            "path": self.path,
            "version": self.request_version,
            "peer_port": self.client_address[1],
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        type(self).seen.append(record)
        if self.path == "/v2/trickle":
            # One small chunk, then silence: an unbuffered proxy passes the chunk on at once.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nfirst\r\n")
            self.wfile.flush()
            time.sleep(2)
            self.wfile.write(b"4\r\nrest\r\n0\r\n\r\n")
            return
        body = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def echo_front(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    require("nginx")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with run_nginx(tmp_path_factory.mktemp("nginx-echo"), upstream_port=int(port), pki=pki) as nginx:
            yield nginx
    finally:
        server.shutdown()
        server.server_close()


def test_nginx_sends_the_gateway_what_it_needs(echo_front: Nginx, pki: Pki):
    port = echo_front.https_port
    with tls_client(pki) as client:
        first = client.get(
            f"https://127.0.0.1:{port}/v2/org/app/manifests/v1?ns=ghcr.io",
            headers={"Host": f"ghcr.gw.test:{port}", "X-Forwarded-For": "203.0.113.9"},
        ).json()
        second = client.get(
            f"https://127.0.0.1:{port}/v2/", headers={"Host": "gw.test", "X-Request-Id": "client-chosen.id-1"}
        ).json()

    headers = first["headers"]
    assert first["path"] == "/v2/org/app/manifests/v1?ns=ghcr.io"  # path and query untouched
    assert first["version"] == "HTTP/1.1"
    assert "connection" not in headers  # keep-alive to the upstream, no "close"
    assert headers["host"] == "ghcr.gw.test"  # the name the client used, for host routing
    assert headers["x-forwarded-host"] == f"ghcr.gw.test:{port}"
    assert headers["x-forwarded-proto"] == "https"
    # nginx appends its peer; the gateway takes the right-most untrusted hop.
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert HEX32.match(headers["x-request-id"])

    assert second["headers"]["host"] == "gw.test"
    assert second["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert second["headers"]["x-request-id"] == "client-chosen.id-1"  # a client's own id is kept
    # Both requests went over one upstream connection (the keepalive pool).
    assert first["peer_port"] == second["peer_port"]

    logged = [json.loads(line) for line in echo_front.access_lines()]
    assert {entry["request_id"] for entry in logged} >= {headers["x-request-id"], "client-chosen.id-1"}


def test_responses_are_not_buffered(echo_front: Nginx, pki: Pki):
    """A chunk reaches the client while the upstream is still silent (proxy_buffering off)."""
    with tls_client(pki) as client, client.stream("GET", f"https://127.0.0.1:{echo_front.https_port}/v2/trickle") as r:
        start = time.monotonic()
        chunks = r.iter_raw()
        first = next(chunks)
        assert first == b"first"
        assert time.monotonic() - start < 1.5  # the upstream sends the rest only after 2 s
        assert b"".join(chunks) == b"rest"


def test_nothing_goes_upstream_for_metrics_or_big_bodies(echo_front: Nginx, pki: Pki):
    before = len(_Echo.seen)
    with tls_client(pki) as client:
        assert client.get(f"https://127.0.0.1:{echo_front.https_port}/metrics").status_code == 404
        url = f"https://127.0.0.1:{echo_front.https_port}/v2/x/blobs/uploads/"
        assert client.post(url, content=b"x" * (2 << 20)).status_code == 413
    assert len(_Echo.seen) == before


def test_http2_with_host_routing(front: Nginx, echo_front: Nginx, pki: Pki, testbed: Testbed):
    """Over HTTP/2 the name arrives as :authority; nginx turns it into Host for the gateway."""
    image = testbed.images["app"]
    with tls_client(pki, http2=True) as client:
        response = client.get(
            f"https://127.0.0.1:{front.https_port}/v2/{image.repo}/manifests/{image.tag}",
            headers={"Host": f"ghcr.gw.test:{front.https_port}", "Accept": ", ".join(ALL_MANIFEST_TYPES)},
        )
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        assert response.headers["docker-content-digest"] == image.digest

        echoed = client.get(
            f"https://127.0.0.1:{echo_front.https_port}/v2/", headers={"Host": f"quay.gw.test:{echo_front.https_port}"}
        )
        assert echoed.http_version == "HTTP/2"
        headers = echoed.json()["headers"]
        assert headers["host"] == "quay.gw.test"
        assert headers["x-forwarded-host"] == f"quay.gw.test:{echo_front.https_port}"
