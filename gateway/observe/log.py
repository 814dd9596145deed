"""Structured logging: one JSON object per line, and one access line per request.

Nothing secret is ever put into a record: the relay stores names, statuses and
counts, never header values. As a second line of defence the formatter masks
anything that looks like a credential (``Bearer ...``, ``Basic ...``, a JWT, a
``token=`` or ``password=`` pair) in every message it writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send

access_logger = logging.getLogger("gateway.access")
_PID = os.getpid()
logger = logging.getLogger("gateway")

_SECRET_PATTERNS = [
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"),  # JWTs
    re.compile(r"(?i)\b(token|access_token|password|passwd|secret)=([^&\s\"']+)"),
]


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) + " " if m.lastindex else "") + "[REDACTED]", text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        else:
            doc["message"] = record.getMessage()
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, separators=(",", ":"), default=str))


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes lines batched per event-loop iteration.

    Under load many requests finish in one iteration of the loop; one write for all of
    their lines instead of one write (and one flush) per line saved a tenth of the CPU of
    a manifest request. With no loop running, or little traffic, a line is written at
    the end of the current iteration: no delay anyone can see.
    """

    def __init__(self, stream: typing.TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a flush is already scheduled
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_lines()
            return
        loop.call_soon(self.flush_lines)

    def flush_lines(self) -> None:
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self.flush_lines()
        super().close()


_lines: JsonLinesHandler | None = None


def configure_logging(level: str = "info") -> None:
    global _lines
    handler = _lines = JsonLinesHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers go through the same JSON handler; its access log is
    # replaced by ours, which knows the route and the upstream.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request URL at INFO; the access line already says what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass(slots=True)
class RequestRecord:
    """What one request did; filled in by the relay, counted by ``metrics.observe``, logged by AccessLogMiddleware.

    Only the fields named in ``ACCESS_LOG_FIELDS`` reach the access log: a field added
    here for a metric stays out of the log until it is named there on purpose.
    """

    request_id: str
    client: str | None
    method: str
    path: str
    query: str | None = None
    route: str | None = None
    upstream: str | None = None
    repository: str | None = None
    kind: str | None = None
    status: int = 0
    bytes: int = 0
    redirect: str | None = None  # "followed" / "passed"
    cache: str | None = None  # manifests: "hit" or "miss"
    user: str | None = None  # who, when the gateway authenticates its clients
    error: str | None = None  # registry error code, or how a stream ended badly
    upstream_seconds: float | None = None
    verified: str | None = None  # blobs: "ok", "mismatch", "unknown_algorithm", "off"
    resumes: int | None = None  # blobs: how many times a broken body was asked for again
    share: str | None = None  # blob GETs: "led", "joined", "merged", "detached" or "bypassed" (herd.py)


# What an access line holds, in this order. Nothing secret: names, statuses, counts.
ACCESS_LOG_FIELDS = (
    "request_id",
    "client",
    "method",
    "path",
    "query",
    "route",
    "upstream",
    "repository",
    "kind",
    "status",
    "bytes",
    "redirect",
    "cache",
    "user",
    "error",
    "upstream_seconds",
    "verified",
    "resumes",
    "share",
)

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


def request_id_from(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            candidate: str = value.decode("latin-1")
            # Echoed back and logged: only accept a harmless, short token.
            if _REQUEST_ID_RE.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class AccessLogMiddleware:
    """Times each HTTP request, echoes its request id, and writes one JSON access line."""

    def __init__(self, app: ASGIApp, observers: Sequence[Callable[[RequestRecord, float], None]] = ()) -> None:
        self.app = app
        self.observers = tuple(observers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        client = scope.get("client")
        record = RequestRecord(
            request_id=request_id_from(scope),
            client=client[0] if client else None,
            method=scope["method"],
            path=scope["path"][:512],
            query=scope.get("query_string", b"").decode("latin-1")[:256] or None,
        )
        scope["gateway.record"] = record
        request_id_header = (b"x-request-id", record.request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), request_id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            for observe in self.observers:
                observe(record, seconds)
            if access_logger.isEnabledFor(logging.INFO):
                write_access_line(record, seconds)


def write_access_line(record: RequestRecord, seconds: float) -> None:
    fields: dict[str, Any] = {"event": "access", "duration_ms": round(seconds * 1000, 3)}
    for name in ACCESS_LOG_FIELDS:
        value = getattr(record, name)
        if value is not None:
            fields[name] = value
    if record.query is not None:
        fields["query"] = redact(record.query)  # the one field a client may put a secret in
    if _lines is None:
        access_logger.info("access", extra={"fields": fields})
        return
    # The fast path: the same JSON as JsonFormatter, without a LogRecord or a regex pass over
    # values the gateway wrote itself (names, numbers, codes).
    doc = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": "info",
        "logger": "gateway.access",
        "pid": _PID,
        **fields,
    }
    _lines.write_line(json.dumps(doc, separators=(",", ":"), default=str))


def record_of(scope: Scope) -> RequestRecord:
    """The request's record; a throwaway one when the app runs without the middleware (unit tests)."""
    record = scope.get("gateway.record")
    if record is None:
        client = scope.get("client")
        record = RequestRecord(
            request_id=uuid.uuid4().hex,
            client=client[0] if client else None,
            method=scope["method"],
            path=scope["path"],
        )
        scope["gateway.record"] = record
    assert isinstance(record, RequestRecord)
    return record
