"""Tracing end to end: a real gateway process exports OTLP/HTTP to a receiver this test runs."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.e2e.conftest import gateway_routes
from tests.support import run_gateway
from tests.testbed.bed import Testbed

pytestmark = pytest.mark.e2e

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every ExportTraceServiceRequest POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.requests.append(request)
                    receiver.content_types.append(self.headers.get("content-type", ""))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[str, str, str]]:
        """(service.name, span name, trace id) of every span received."""
        out: list[tuple[str, str, str]] = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope_spans in resource_spans.scope_spans:
                    out.extend((service, span.name, span.trace_id.hex()) for span in scope_spans.spans)
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.thread.start()
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_a_pull_is_exported_over_otlp_http(testbed: Testbed, receiver: Receiver, tmp_path: Path):
    env = {
        "E2E_GHCR_USER": testbed.credentials.username,
        "E2E_GHCR_PASS": testbed.credentials.password,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    image = testbed.images["busybox"]
    with run_gateway(gateway_routes(testbed), tmp_path, env=env) as gateway:
        resp = httpx.get(
            f"{gateway.url}/v2/busybox/manifests/1.36",
            headers={
                "accept": "application/vnd.docker.distribution.manifest.list.v2+json",
                "traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01",
            },
        )
        assert resp.headers["docker-content-digest"] == image.digest
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(name == "GET manifest" for _, name, _ in receiver.spans()):
            time.sleep(0.1)
    spans = receiver.spans()
    assert ("gateway-under-test", "GET manifest", TRACE_ID) in spans, spans
    ours = {name for service, name, trace in spans if trace == TRACE_ID}
    assert {"GET manifest", "upstream request", "upstream token"} <= ours
    assert all(ct == "application/x-protobuf" for ct in receiver.content_types)
