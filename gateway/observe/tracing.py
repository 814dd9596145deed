"""Optional OpenTelemetry tracing: where the time of a slow pull went.

With the extra installed (``pip install 'registry-gateway[otel]'``) and an exporter named by
the standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
or ``OTEL_TRACES_EXPORTER=otlp|console``), every client request is a server span, with
child spans for each upstream hop (redirects included), each token fetch and the body
stream. A client's W3C ``traceparent`` is honoured, so the gateway's spans join the
client's trace. Everything else follows the OpenTelemetry SDK's own variables
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``, ``OTEL_SDK_DISABLED``).

Without the extra, or without an exporter configured, nothing of OpenTelemetry is
imported and ``span`` costs one check: the hot path does not pay for tracing it does not do.

Span attributes never carry a secret: URLs lose their query (CDN URLs are signed) and no
header value is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gateway import __version__
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.observe.log import record_of

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger("gateway.tracing")

AttributeValue = str | int | float | bool
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def requested(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (an exporter is named, and the SDK is not disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(environ: Mapping[str, str] | None = None, provider: TracerProvider | None = None) -> bool:
    """Turn tracing on for this process when asked; True when it is on.

    ``provider`` is a ready TracerProvider (tests pass one with an in-memory exporter);
    otherwise one is built from the environment. Called once per worker by ``create_app``.
    """
    global _tracer, _provider
    _tracer = None
    if provider is None:
        env = os.environ if environ is None else environ
        if not requested(env):
            return False
        try:
            provider = _provider_from(env)
        except ImportError as exc:
            logger.warning(
                "OTEL_* asks for traces, but the 'otel' extra is not installed: tracing stays off",
                extra={"fields": {"event": "tracing_unavailable", "missing": exc.name}},
            )
            return False
    _provider = provider
    _tracer = provider.get_tracer("registry-gateway", __version__)
    return True


def _provider_from(environ: Mapping[str, str]) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_* as the SDK reads them
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is the default name.
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "registry-gateway")})
    provider = TracerProvider(resource=resource)  # the sampler follows OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def shutdown() -> None:
    """Flush what is buffered (lifespan end) and turn tracing off."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def safe_url(url: str) -> str:
    """A URL as spans may show it: scheme, host, port and path; never the query (signed CDN URLs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def span(
    name: str, attributes: Callable[[], Mapping[str, AttributeValue]] | None = None, *, client: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one; a shared no-op (yielding None) when tracing is off.

    ``attributes`` is called only when tracing is on, so the request path builds nothing for
    spans nobody records. An exception that leaves the block marks the span as an error.
    """
    tracer = _tracer
    if tracer is None:
        return _OFF
    from opentelemetry.trace import SpanKind

    kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
    return tracer.start_as_current_span(name, kind=kind, attributes=dict(attributes() if attributes else {}))


def set_attributes(current: Span | None, attributes: Mapping[str, AttributeValue | None]) -> None:
    if current is not None:
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


class TracingMiddleware:
    """A server span per HTTP request, joined to the client's trace by its ``traceparent``.

    Installed by ``create_app`` only when tracing is on. It sits inside the access-log
    middleware, so the span closes with what the request record says it did.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = _tracer
        if scope["type"] != "http" or tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"}
        carrier.update({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k == b"tracestate"})
        method = scope["method"]
        attributes: dict[str, AttributeValue] = {"http.request.method": method, "url.path": scope["path"][:512]}
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracer.start_as_current_span(
            method, context=extract(carrier), kind=SpanKind.SERVER, attributes=attributes
        ) as current:
            try:
                await self.app(scope, receive, send_status)
            finally:
                record = record_of(scope)
                if record.kind:
                    current.update_name(f"{method} {record.kind}")
                set_attributes(
                    current,
                    {
                        "http.response.status_code": status or None,
                        "registry.route": record.route,
                        "registry.repository": record.repository,
                        "registry.kind": record.kind,
                        "registry.upstream": record.upstream,
                        "registry.cache": record.cache,
                        "registry.error": record.error,
                        "registry.response_bytes": record.bytes,
                    },
                )
                if status >= 500:
                    current.set_status(Status(StatusCode.ERROR))
