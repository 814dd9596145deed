"""Manifest GETs and HEADs: answered from the cache while fresh, one upstream request per key at a
time, read whole and checked, and the last good answer served stale when the upstream fails.

A manifest whose upstream answers 429 or 5xx, or cannot be reached, is served from the cache's
last good answer while it may be (``_serve_stale``, ``manifest_cache.py``), with ``Warning: 110``.
HEAD stays HEAD upstream: Docker Hub counts a manifest GET against the pull limit and a HEAD not
(docker docs, "Docker Hub pull usage"), and clients HEAD first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence

import httpx

from gateway.http.asgi import API_VERSION_HEADER, send_body
from gateway.http.errors import UNAVAILABLE, RegistryError
from gateway.http.util import entity_tag_matches, read_capped, response_headers
from gateway.net.upstream_errors import BODY, upstream_errors
from gateway.observe import metrics
from gateway.relay import answers, integrity
from gateway.relay.exchange import Exchange
from gateway.relay.manifest_cache import CacheKey, Entry, ManifestCache, normalise_accept
from gateway.relay.opening import Opener, owned
from gateway.relay.streaming import send_stream
from gateway.routing.request_rules import NOT_MODIFIED_HEADERS, entity_tag_of
from gateway.upstream.client import UpstreamClient

logger = logging.getLogger("gateway.proxy")

# distribution refuses to store manifests over 4 MiB (registry/handlers/manifests.go,
# maxManifestBodySize); a bigger one from an upstream is broken or hostile.
MAX_MANIFEST_BYTES = 4 << 20
# RFC 7234 5.5.1 (obsoleted by RFC 9111, still read by people and some tools): a stale answer.
STALE_WARNING = (b"warning", b'110 - "Response is Stale"')


class ManifestRelay:
    """Serves manifest requests; owns the cache's use (fresh, held, stale), never the cache's rules."""

    def __init__(self, clients: Mapping[str, UpstreamClient], cache: ManifestCache | None, opener: Opener) -> None:
        self._clients = clients
        self._cache = cache
        self._opener = opener

    async def serve(self, ex: Exchange, query: str) -> None:
        """A manifest GET or HEAD: from the cache when the route shares answers, else from the upstream."""
        cache = self._cache
        if cache is None or not self._clients[ex.route_name].authorizer.shares_answers:
            await self._from_upstream(ex, query)
            return
        # Every Accept header counts: Docker sends one per media type, and a client that
        # accepts only a single manifest type gets another answer (a list converted to
        # one manifest) that must never be served to one that accepts lists.
        accept = b", ".join(v for k, v in ex.scope["headers"] if k == b"accept").decode("latin-1")
        key: CacheKey = (ex.route_name, ex.target.upstream_name, ex.api.reference, normalise_accept(accept))
        if await self._from_cache(ex, cache, key):
            return
        async with cache.flight(key) as leader:
            if not leader and await self._from_cache(ex, cache, key):
                return  # another request fetched it meanwhile
            ex.record.cache = "miss"
            ex.cache_key = key
            await self._from_upstream(ex, query)

    async def _from_cache(self, ex: Exchange, cache: ManifestCache, key: CacheKey) -> bool:
        entry = cache.get(key, head=ex.head)
        if entry is not None:
            ex.record.cache = "hit"
            await self._send_entry(ex, entry)
            return True
        entry = cache.held(key, head=ex.head)  # the upstream failed a moment ago: not asked again
        if entry is None:
            return False
        await self._send_stale(ex, entry, entry.held_reason)
        return True

    async def _send_entry(self, ex: Exchange, entry: Entry, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        conditions = [v.decode("latin-1") for k, v in ex.scope["headers"] if k == b"if-none-match"]
        if conditions and entity_tag_matches(conditions, entity_tag_of(entry.headers)):
            # What the upstream answers a matching If-None-Match: 304, the validators, no body.
            validators = [(k, v) for k, v in entry.headers if k in NOT_MODIFIED_HEADERS]
            headers = [*validators, *extra, API_VERSION_HEADER]
            await ex.send({"type": "http.response.start", "status": 304, "headers": headers})
            await ex.send({"type": "http.response.body", "body": b""})
            return
        headers = [*entry.headers, *extra, API_VERSION_HEADER]
        if entry.body is None:  # known from a HEAD: its own Content-Length stands
            await ex.send({"type": "http.response.start", "status": 200, "headers": headers})
            await ex.send({"type": "http.response.body", "body": b""})
            return
        ex.record.bytes = 0 if ex.head else len(entry.body)
        await send_body(ex.send, 200, headers, entry.body, head=ex.head)

    async def _serve_stale(self, ex: Exchange, reason: str, status: int) -> bool:
        """The upstream failed a cached manifest (429, 5xx, unreachable): its last good answer, if kept."""
        key = ex.cache_key
        if key is None or self._cache is None:
            return False
        entry = self._cache.stale(key, head=ex.head)
        if entry is None:
            return False
        self._cache.hold(key, reason)
        fields = {
            "event": "manifest_stale",
            "request_id": ex.record.request_id,
            "route": ex.route_name,
            "repository": key[1],
            "reference": key[2],
            "reason": reason,
            "upstream_status": status,
        }
        logger.warning("the upstream failed; serving the last good manifest answer", extra={"fields": fields})
        await self._send_stale(ex, entry, reason)
        return True

    async def _send_stale(self, ex: Exchange, entry: Entry, reason: str) -> None:
        ex.record.cache = "stale"
        metrics.manifest_stale(ex.route_name, reason)
        await self._send_entry(ex, entry, [STALE_WARNING])

    async def _from_upstream(self, ex: Exchange, query: str) -> None:
        try:
            opened = await self._opener.open(ex, query)
        except RegistryError as exc:
            # Unreachable (a timeout is a 504 too), rate limited, or failing: a kept answer serves.
            failed = exc.status == 429 or exc.status >= 500
            reason = "rate_limited" if exc.status == 429 else "unreachable"
            if failed and await self._serve_stale(ex, reason, exc.status):
                return
            raise
        async with owned(ex, opened):
            if await answers.login_refused(ex, opened):
                return
            resp = opened.response
            status = resp.status_code
            failed = ex.cache_key is not None and (status == 429 or status >= 500)
            if failed and await self._serve_stale(ex, "rate_limited" if status == 429 else "status_5xx", status):
                if status >= 500:
                    metrics.upstream_error(ex.route_name, "status_5xx")  # as relay_error would
                return
            if ex.cache_key is not None and (status != 200 or "no-store" in resp.headers.get("cache-control", "")):
                ex.cache_key = None
            if await answers.passed_on(ex, opened):
                return
            if not ex.head and status == 200:
                await self._relay_manifest(ex, resp)
                return
            # A HEAD (or an odd 2xx): its headers now, its (empty) body as it comes.
            headers = response_headers(resp.headers)
            if ex.cache_key is not None and self._cache is not None:
                self._cache.put(ex.cache_key, headers, None)  # a manifest HEAD: headers only
            await send_stream(ex, status, headers, resp.aiter_raw())

    async def _relay_manifest(self, ex: Exchange, resp: httpx.Response) -> None:
        try:
            with upstream_errors(BODY, f"upstream {ex.route_name}", "a manifest"):
                async with asyncio.timeout_at(ex.deadline):
                    body = await read_capped(resp, MAX_MANIFEST_BYTES, raw=True)
        except RegistryError as exc:
            if exc.reason == "timeout":
                metrics.upstream_error(ex.route_name, "timeout")
            raise
        if body is None:
            raise RegistryError(
                502, UNAVAILABLE, f"upstream {ex.route_name} sent a manifest larger than {MAX_MANIFEST_BYTES} bytes"
            )
        integrity.check_manifest(ex, self._clients[ex.route_name], body, resp)
        headers = response_headers(resp.headers)
        if "docker-content-digest" not in resp.headers and "content-encoding" not in resp.headers:
            # The spec requires Docker-Content-Digest on manifest answers; some upstreams
            # omit it. The digest is over the exact bytes, which we hold.
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            headers.append((b"docker-content-digest", digest.encode()))
        if ex.cache_key is not None and self._cache is not None:
            self._cache.put(ex.cache_key, [(k, v) for k, v in headers if k != b"content-length"], body)
        headers.append(API_VERSION_HEADER)
        ex.record.bytes = len(body)
        await send_body(ex.send, 200, headers, body)
