"""Tracing: spans per request, upstream hop, token fetch and body, in the SDK's in-memory exporter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import create_app
from gateway.observe import tracing
from gateway.routing.routes_file import parse_routes
from gateway.settings import Settings
from tests.support import ROOT
from tests.unit.conftest import in_process_client
from tests.unit.fake_registry import BLOB, BLOB_DIGEST, REGISTRY, FakeRegistry

ROUTES = [{"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    yield memory
    tracing.shutdown()


def traced_client(fake: FakeRegistry, exporter: InMemorySpanExporter) -> httpx.AsyncClient:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    table = parse_routes({"route": ROUTES}, "routes.toml", {})
    app = create_app(
        Settings(manifest_cache_bytes=0), table=table, transport=httpx.MockTransport(fake), tracer_provider=provider
    )
    return in_process_client(app)


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_manifest_pull_is_a_server_span_with_its_hops_and_token(fake, exporter):
    async with traced_client(fake, exporter) as client:
        resp = await client.get("/v2/alpine/manifests/latest", headers={"traceparent": PARENT})
    assert resp.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.name == "GET manifest"
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the client's trace, joined
    assert server.parent is not None
    assert server.parent.is_remote
    assert server.attributes is not None
    assert server.attributes["registry.route"] == "docker.io"
    assert server.attributes["registry.repository"] == "library/alpine"
    assert server.attributes["http.response.status_code"] == 200
    hops = [s for s in children(spans, server) if s.name == "upstream request"]
    # The first try is challenged (401), the token fetched, the retry answered (200).
    assert [h.attributes["http.response.status_code"] for h in hops if h.attributes] == [401, 200]
    (token,) = [s for s in spans if s.name == "upstream token"]
    assert token.parent is not None
    assert token.parent.span_id == server.context.span_id
    assert token.attributes is not None
    assert token.attributes["registry.token.scopes"] == "repository:library/alpine:pull"
    assert all(s.context.trace_id == server.context.trace_id for s in spans)


async def test_a_blob_pull_shows_the_redirect_hop_and_the_body(fake, exporter):
    async with traced_client(fake, exporter) as client:
        await client.get("/v2/alpine/manifests/latest")  # a token is known from now on
        exporter.clear()
        resp = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert resp.content == BLOB
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    hops = [s for s in children(spans, server) if s.name == "upstream request"]
    assert [(h.attributes or {}).get("http.response.status_code") for h in hops] == [307, 200]
    cdn_url = str((hops[1].attributes or {})["url.full"])
    assert cdn_url.startswith("https://cdn.test/")
    assert "?" not in cdn_url
    (body,) = [s for s in children(spans, server) if s.name == "body"]
    assert body.attributes is not None
    assert (body.attributes["registry.body.bytes"], body.attributes["registry.body.end"]) == (len(BLOB), "complete")
    assert "registry.body.resumes" not in body.attributes  # none happened


async def test_an_upstream_failure_marks_the_hop_and_the_request(fake, exporter):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    fake.override = refuse
    async with traced_client(fake, exporter) as client:
        resp = await client.get("/v2/alpine/manifests/latest")
    assert resp.status_code == 502
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert not server.status.is_ok
    (hop,) = [s for s in spans if s.name == "upstream request"]
    assert not hop.status.is_ok
    assert any(event.name == "exception" for event in hop.events)


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, False),
    ],
)
def test_tracing_is_on_only_when_an_exporter_is_named(environ, wanted):
    assert tracing.requested(environ) is wanted


def test_safe_url_never_shows_a_query_or_userinfo():
    assert tracing.safe_url("https://u:p@cdn.test:8443/blobs/x?X-Amz-Signature=s#f") == "https://cdn.test:8443/blobs/x"


def _run_app(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


APP = """
    import asyncio, sys
    {prelude}
    import httpx
    from gateway.app import create_app
    from gateway.routing.routes_file import parse_routes
    from gateway.settings import Settings
    table = parse_routes({{"route": [{{"name": "d", "upstream": "https://r.test", "default": True}}]}}, "r", {{}})
    app = create_app(Settings(), table=table, transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    async def ping():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            return (await c.get("/v2/")).status_code
    print(asyncio.run(ping()), any(m.startswith("opentelemetry") for m in sys.modules))
"""


def test_without_an_exporter_nothing_of_opentelemetry_is_imported():
    done = _run_app(APP.format(prelude=""), {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "False"]


def test_without_the_extra_tracing_asked_for_is_a_warning_not_a_failure():
    # The extra "missing": every opentelemetry import fails, as on an install without [otel].
    blocker = """
    import importlib.abc
    class NoOtel(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.startswith("opentelemetry"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, NoOtel())
    import logging; logging.basicConfig(level=logging.WARNING)
    """
    done = _run_app(
        APP.format(prelude=textwrap.indent(textwrap.dedent(blocker), "    ")), {"OTEL_TRACES_EXPORTER": "otlp"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "False"]
    assert "the 'otel' extra is not installed" in done.stderr
