"""Prometheus metrics, and the ``/metrics`` exposition.

Everything a request did is counted once, when it ends, from its access record
(``observe``); nothing is counted per body chunk, so the streaming loop stays lean.

With several workers every process keeps its own values; prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``__main__`` when
``--workers`` > 1) shares them through files so that ``/metrics``, whichever
worker answers it, adds them all up. The in-flight gauge uses ``livesum`` so that
a dead worker's streams stop counting. The upstream budget gauges use ``mostrecent``: the
last answer any worker saw is the upstream's current word.
"""

from __future__ import annotations

import asyncio
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.observe.log import RequestRecord

NO_ROUTE = "-"

REQUESTS = Counter(
    "registry_gateway_requests",
    "Client requests answered, by route, endpoint kind, method and status.",
    ["route", "kind", "method", "status"],
)
RESPONSE_BYTES = Counter(
    "registry_gateway_response_bytes",
    "Body bytes sent to clients, by route and endpoint kind.",
    ["route", "kind"],
)
REQUEST_SECONDS = Histogram(
    "registry_gateway_request_duration_seconds",
    "Time to answer a client request completely (a whole blob for blob pulls).",
    ["route", "kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
UPSTREAM_SECONDS = Histogram(
    "registry_gateway_upstream_response_seconds",
    "Time until the upstream's response headers arrived, token requests and redirects included.",
    ["route", "kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKEN_FETCHES = Counter(
    "registry_gateway_token_fetches",
    "Token requests sent to upstream token endpoints, by result (ok, error).",
    ["result"],
)
TOKEN_CACHE_HITS = Counter("registry_gateway_token_cache_hits", "Upstream tokens served from the cache.")
STREAMS_IN_FLIGHT = Gauge(
    "registry_gateway_streams_in_flight",
    "Response bodies being streamed to clients right now.",
    ["route"],
    multiprocess_mode="livesum",
)
UPSTREAM_ERRORS = Counter(
    "registry_gateway_upstream_errors",
    "Upstream failures by route and reason: connect, timeout, protocol, policy, redirects, token, broken_stream, "
    "status_5xx.",
    ["route", "reason"],
)
REDIRECTS = Counter(
    "registry_gateway_redirects",
    "Upstream redirects, by route and what was done with them (followed, passed).",
    ["route", "mode"],
)


BLOB_CHECKS = Counter(
    "registry_gateway_blob_checks",
    "Whole blob bodies (and manifests by digest: mismatch) by what their digest check found: ok, mismatch, "
    "unknown_algorithm (relayed unchecked), "
    "off (verify_blobs = false), incomplete (the transfer ended before the last byte).",
    ["route", "result"],
)
BLOB_RESUMES = Counter(
    "registry_gateway_blob_resumes",
    "Broken blob bodies asked for again from where they broke (Range), by route.",
    ["route"],
)
UPSTREAM_PASSED_OVER = Counter(
    "registry_gateway_upstream_passed_over",
    "Upstreams (and mirrors) passed over for a blob because its bodies from them kept breaking (or a "
    "resume was answered with other bytes than asked): the rest was asked of the next one, by route and "
    "upstream.",
    ["route", "upstream"],
)
DIGEST_MISMATCHES = Counter(
    "registry_gateway_digest_mismatch",
    "Blob bodies whose bytes did not hash to their digest, by route and upstream (the client's transfer was aborted).",
    ["route", "upstream"],
)
MANIFEST_CACHE = Counter(
    "registry_gateway_manifest_cache",
    "Manifest requests answered from the cache (hit), from the upstream (miss), or from the cache because "
    "the upstream failed (stale), by route.",
    ["route", "result"],
)
# The upstream's pull budget, from Docker Hub's ratelimit-limit / ratelimit-remaining headers
# ("Docker Hub pull usage and limits"; budget.py), per route and credential identity.
BUDGET_LIMIT = Gauge(
    "registry_gateway_upstream_budget_limit",
    "Pulls the upstream allows per window (ratelimit-limit), by route and credential.",
    ["route", "credential"],
    multiprocess_mode="mostrecent",
)
BUDGET_REMAINING = Gauge(
    "registry_gateway_upstream_budget_remaining",
    "Pulls left in the upstream's current window (ratelimit-remaining), by route and credential.",
    ["route", "credential"],
    multiprocess_mode="mostrecent",
)
BUDGET_WINDOW = Gauge(
    "registry_gateway_upstream_budget_window_seconds",
    "The upstream's rate-limit window (w= of ratelimit-limit / -remaining), by route and credential.",
    ["route", "credential"],
    multiprocess_mode="mostrecent",
)
UPSTREAM_RATE_LIMITED = Counter(
    "registry_gateway_upstream_rate_limited",
    "429 Too Many Requests answers from upstreams, by route and credential.",
    ["route", "credential"],
)
MANIFEST_STALE = Counter(
    "registry_gateway_manifest_stale",
    "Manifest answers served stale from the cache because the upstream failed, by route and reason "
    "(rate_limited, status_5xx, unreachable).",
    ["route", "reason"],
)

# Shared blob fetches (``herd.py``): one upstream body fed to every concurrent pull of a blob.
SHARED_REQUESTS = Counter(
    "registry_gateway_shared_fetch_requests",
    "Blob GETs by their part in a shared fetch: led (opened it), joined (read another's), detached "
    "(fell a window behind, or the shared body broke, and went on alone), merged (its fetch, opened for "
    "clients that came late, caught up with an older one and it read on from that), bypassed (the windows' "
    "memory cap was reached: relayed alone), by route.",
    ["route", "role"],
)
SHARED_MERGES = Counter(
    "registry_gateway_shared_fetch_merges",
    "Younger shared fetches of a blob (for clients that came late) that caught up with an older one and "
    "handed their readers over, closing their upstream body early, by route.",
    ["route"],
)
SHARED_WAIT_SECONDS = Counter(
    "registry_gateway_shared_fetch_wait_seconds",
    "Seconds shared fetches read nothing while they waited for latecomers (holding their first window "
    "for clients that kept coming, or while a younger fetch caught up), by route: what one upstream fetch "
    "for a staggered rollout cost its early clients.",
    ["route"],
)
SHARED_FETCHES = Gauge(
    "registry_gateway_shared_fetches_in_flight",
    "Shared upstream blob bodies being read right now, by route.",
    ["route"],
    multiprocess_mode="livesum",
)
SHARED_WINDOW_BYTES = Gauge(
    "registry_gateway_shared_window_bytes",
    "Bytes held in the windows of all shared fetches right now.",
    multiprocess_mode="livesum",
)
SHARED_WINDOW_BUDGET = Gauge(
    "registry_gateway_shared_window_budget_bytes",
    "Bytes the windows of shared fetches may hold in all (each worker's budget, summed): sized from the "
    "container's memory limit unless GATEWAY_SHARED_MEMORY_BYTES is set.",
    multiprocess_mode="livesum",
)
ASYNCIO_TASKS = Gauge(
    "registry_gateway_asyncio_tasks",
    "asyncio tasks alive in the gateway's event loops (each worker's, summed). Every request and every shared "
    "fetch runs in tasks: a count that stays up after the load went is a leak.",
    multiprocess_mode="livesum",
)
BLOB_BODY_BYTES = Counter(
    "registry_gateway_blob_body_bytes",
    "Blob body bytes by side: read from upstreams (upstream) and sent to clients (client), by route; "
    "the difference is the egress that shared fetches saved.",
    ["route", "side"],
)


def observe(record: RequestRecord, seconds: float) -> None:
    """Count one finished request."""
    route = record.route or NO_ROUTE
    kind = record.kind or "other"
    REQUESTS.labels(route, kind, record.method, str(record.status)).inc()
    if record.bytes:
        RESPONSE_BYTES.labels(route, kind).inc(record.bytes)
    if record.route is not None:
        REQUEST_SECONDS.labels(route, kind).observe(seconds)
    if record.upstream_seconds is not None:
        UPSTREAM_SECONDS.labels(route, kind).observe(record.upstream_seconds)
    if record.redirect is not None:
        REDIRECTS.labels(route, record.redirect).inc()
    if record.cache is not None:
        MANIFEST_CACHE.labels(route, record.cache).inc()
    if record.resumes:
        BLOB_RESUMES.labels(route).inc(record.resumes)
    if record.verified is not None:
        BLOB_CHECKS.labels(route, record.verified).inc()
        if record.verified == "mismatch":
            DIGEST_MISMATCHES.labels(route, record.upstream or "-").inc()
    if record.share is not None:
        SHARED_REQUESTS.labels(route, record.share).inc()


def upstream_error(route: str, reason: str) -> None:
    """Count one upstream failure; ``reason`` is its class (``upstream_errors.py`` names most of them)."""
    UPSTREAM_ERRORS.labels(route, reason).inc()


def budget(route: str, credential: str, limit: int | None, remaining: int | None, window: int | None) -> None:
    """Set the budget gauges of one route and credential to what the upstream last said."""
    for gauge, value in ((BUDGET_LIMIT, limit), (BUDGET_REMAINING, remaining), (BUDGET_WINDOW, window)):
        if value is not None:
            gauge.labels(route, credential).set(value)


def upstream_rate_limited(route: str, credential: str) -> None:
    UPSTREAM_RATE_LIMITED.labels(route, credential).inc()


def blob_bytes(route: str, side: str, count: int) -> None:
    if count:
        BLOB_BODY_BYTES.labels(route, side).inc(count)


def manifest_stale(route: str, reason: str) -> None:
    MANIFEST_STALE.labels(route, reason).inc()


def count_tasks() -> None:
    """Set this worker's task gauge to the tasks of its running loop, now."""
    ASYNCIO_TASKS.set(len(asyncio.all_tasks()))


async def sample_tasks(every: float) -> None:
    """Keep this worker's task count fresh: with several workers, the one answering /metrics cannot
    count the others' tasks, so each sets its own (multiprocess mode sums them)."""
    while True:
        count_tasks()
        await asyncio.sleep(every)


def exposition() -> tuple[bytes, str]:
    """The metrics text, from every worker when running in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus-client is untyped here
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
