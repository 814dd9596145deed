"""What this process saw lately, for the status page: recent errors and upstream latencies.

An access-log observer (like ``metrics.observe``) keeps, per (route, upstream), the last few
hundred upstream response times (for a p99 without Prometheus) and the last error, and a ring of
the last errors of all routes. Bounded: a fixed number of samples per key, a fixed number of
keys (least recently seen go), a fixed ring.

Nothing secret is kept: names, statuses, error codes, the repository. The path and query string
are not (a query may carry a token); the client address only when ``keep_clients`` is set (the
operator's ``GATEWAY_STATUS_SHOW_CLIENTS``).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.observe.log import RequestRecord

NO_UPSTREAM = "-"


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """One request that failed, as the status page shows it."""

    at: float
    route: str
    upstream: str
    kind: str
    method: str
    status: int
    error: str | None
    repository: str | None
    client: str | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds"),
            "route": self.route,
            "upstream": self.upstream,
            "kind": self.kind,
            "method": self.method,
            "status": self.status,
            "error": self.error,
            "repository": self.repository,
        }
        if self.client is not None:
            data["client"] = self.client
        return data


@dataclass(slots=True)
class UpstreamSeen:
    """Latencies, counts and the last error of one (route, upstream)."""

    samples: deque[float]
    requests: int = 0
    errors: int = 0
    last_error: ErrorEvent | None = field(default=None)

    def p99(self) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def is_error(record: RequestRecord) -> bool:
    """A request worth an operator's look: any 4xx but the login challenge, any 5xx, or a stream
    that ended badly after its status went out."""
    if record.status >= 400:
        return record.status != 401
    return record.error is not None and record.status >= 200


class Recent:
    """The recent errors (a ring) and, per (route, upstream), latencies and the last error."""

    def __init__(
        self,
        *,
        errors: int = 50,
        samples: int = 256,
        keys: int = 256,
        keep_clients: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.errors: deque[ErrorEvent] = deque(maxlen=errors)
        self._samples = samples
        self._keys = keys
        self.keep_clients = keep_clients
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str], UpstreamSeen] = OrderedDict()

    def _entry(self, route: str, upstream: str) -> UpstreamSeen:
        key = (route, upstream)
        seen = self._seen.pop(key, None) or UpstreamSeen(deque(maxlen=self._samples))
        self._seen[key] = seen
        while len(self._seen) > self._keys:
            self._seen.popitem(last=False)
        return seen

    def observe(self, record: RequestRecord, seconds: float) -> None:
        """Take one finished request (the access-log observer's signature)."""
        if record.route is None:
            return  # not a registry request of a route: nothing an upstream did
        seen = self._entry(record.route, record.upstream or NO_UPSTREAM)
        seen.requests += 1
        if record.upstream_seconds is not None:
            seen.samples.append(record.upstream_seconds)
        if not is_error(record):
            return
        event = ErrorEvent(
            at=self._clock(),
            route=record.route,
            upstream=record.upstream or NO_UPSTREAM,
            kind=record.kind or "other",
            method=record.method,
            status=record.status,
            error=record.error,
            repository=record.repository,
            client=record.client if self.keep_clients else None,
        )
        seen.errors += 1
        seen.last_error = event
        self.errors.append(event)

    def upstream(self, route: str, upstream: str) -> UpstreamSeen | None:
        return self._seen.get((route, upstream))

    def recent_errors(self) -> list[dict[str, Any]]:
        """The errors kept, newest first."""
        return [e.as_json() for e in reversed(self.errors)]
