"""The relay: one client request under ``/v2/`` in, one upstream exchange, one answer out.

Order of work for a request (each step can end it with a registry error):

1. the raw path is checked (no percent-encoding, no dot segments), then parsed
   into endpoint + name + reference (``reference.py``);
2. only GET and HEAD are served; writes get 405 UNSUPPORTED;
3. the route and the upstream repository are resolved (``routes.py``);
4. the request goes upstream with an allow-list of headers (``upstream.py`` does
   auth and redirects);
5. the answer comes back: errors re-encoded as registry JSON unless they already
   are, manifests read whole (they are small, capped, and their digest is
   checked), everything else streamed as it arrives.

HEAD stays HEAD upstream: Docker Hub counts a manifest GET against the pull limit
and a HEAD not (docker docs, "Docker Hub pull usage"), and clients HEAD first.

Every upstream answer that carries Docker Hub's rate-limit headers (or is a 429) updates
the route's budget at one place, ``_see_budget`` (``budget.py``). A manifest whose upstream
answers 429 or 5xx, or cannot be reached, is served from the cache's last good answer while
it may be (``_serve_stale``, ``manifest_cache.py``), with ``Warning: 110``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from urllib.parse import urljoin

import httpx

from gateway.auth.grants import Grants
from gateway.blobs import herd
from gateway.blobs.digest import DigestMismatch, Verdict, verified
from gateway.blobs.resume import Segment, single_range
from gateway.http.asgi import (
    API_VERSION_HEADER,
    JSON_CONTENT_TYPE,
    Headers,
    Receive,
    Scope,
    Send,
    StreamEnd,
    header_value,
    send_body,
    send_error,
    send_json,
    stream_body,
)
from gateway.http.errors import (
    UNAVAILABLE,
    UNKNOWN,
    LoginRequired,
    RegistryError,
    code_for_status,
    error_body,
    is_registry_error_body,
    unsupported_method,
)
from gateway.http.util import (
    ERROR_RESPONSE_HEADERS,
    REDIRECT_STATUSES,
    entity_tag_matches,
    read_capped,
    response_headers,
    rewrite_next_link,
    split_links,
)
from gateway.net.upstream_errors import BODY, upstream_errors
from gateway.observe import metrics, tracing
from gateway.observe.log import RequestRecord, record_of
from gateway.relay import integrity
from gateway.relay.exchange import Exchange
from gateway.relay.manifest_cache import CacheKey, Entry, ManifestCache, normalise_accept
from gateway.routing import budget
from gateway.routing.policy import origin_of
from gateway.routing.reference import Kind, check_raw_path, check_reference, is_digest, parse_api_path
from gateway.routing.request_rules import (
    NOT_MODIFIED_HEADERS,
    check_request_headers,
    entity_tag_of,
    renamed_tag_list_start,
    upstream_headers,
    upstream_query,
)
from gateway.routing.routes import RequestFacts, RouteTable, Target
from gateway.upstream import passthrough
from gateway.upstream.client import Opened, UpstreamClient

logger = logging.getLogger("gateway.proxy")

# What ends a body mid-stream as a broken upstream (the client's connection is aborted).
_STREAM_ERRORS = (httpx.HTTPError, DigestMismatch, herd.FetchBroken)
# How long a passthrough client's proven access to a repository lets it join shared fetches
# of that repository's blobs without asking the upstream again.
JOIN_PERMIT_SECONDS = 60.0
_MAX_PERMITS = 4096

# distribution refuses to store manifests over 4 MiB (registry/handlers/manifests.go,
# maxManifestBodySize); a bigger one from an upstream is broken or hostile.
MAX_MANIFEST_BYTES = 4 << 20
# Error bodies are a few hundred bytes; anything past this is replaced by our own message.
MAX_ERROR_BODY = 64 << 10
# RFC 7234 5.5.1 (obsoleted by RFC 9111, still read by people and some tools): a stale answer.
STALE_WARNING = (b"warning", b'110 - "Response is Stale"')


class Relay:
    """The ASGI app for everything under ``/v2``: the registry API, relayed."""

    def __init__(
        self,
        table: RouteTable,
        clients: Mapping[str, UpstreamClient],
        cache: ManifestCache | None = None,
        *,
        blob_resumes: int = 0,
        budgets: budget.BudgetStore | None = None,
        board: herd.Board | None = None,
        grants: Grants | None = None,
    ) -> None:
        self.table = table
        # The gateway's own tokens on hosts several routes share (``grants.py``).
        self.grants = grants
        self.clients = clients
        self.cache = cache
        # The upstreams' pull budgets, per route and credential (``budget.py``).
        self.budgets = budgets if budgets is not None else budget.BudgetStore()
        # How many times one blob body that breaks is asked for again from where it broke.
        self.blob_resumes = blob_resumes
        # Shared blob fetches (``herd.py``); None or disabled: every GET relayed alone.
        self.board = board if board is not None and board.enabled else None
        # Each shared fetch's own exchange (the leader's request, with a record of its own).
        self._producers: weakref.WeakKeyDictionary[herd.SharedFetch, Exchange] = weakref.WeakKeyDictionary()
        # Passthrough clients that proved access to a repository: (token hash, route, repo) -> until.
        self._permits: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = record_of(scope)
        head = scope["method"] == "HEAD"
        try:
            await self._handle(scope, receive, send, record)
        except RegistryError as exc:
            record.error = exc.code
            if isinstance(exc, LoginRequired):
                name, value = passthrough.challenge_header(scope, exc.service, exc.repository)
                exc.headers[name.decode()] = value.decode()
            await send_error(send, exc, head=head)
        except Exception:
            # A bug, not bad input: logged with its traceback, answered as registry JSON
            # (or, mid-stream, by aborting the connection) instead of uvicorn's text/plain 500.
            logger.exception(
                "internal error", extra={"fields": {"event": "internal_error", "request_id": record.request_id}}
            )
            if record.status:
                raise
            record.error = UNKNOWN
            internal = RegistryError(500, UNKNOWN, "internal error in the gateway", {"request_id": record.request_id})
            await send_error(send, internal, head=head)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        method = scope["method"]
        check_request_headers(scope)
        check_raw_path(scope.get("raw_path") or scope["path"].encode())
        api = parse_api_path(scope["path"])
        record.kind = api.kind.value
        if api.kind is Kind.PING:
            if method not in ("GET", "HEAD"):
                raise unsupported_method(method)
            await self._ping(scope, send, record)
            return
        if method not in ("GET", "HEAD") or api.kind is Kind.UPLOAD:
            raise unsupported_method(method)
        check_reference(api)
        query, ns = upstream_query(api.kind, scope.get("query_string", b""))
        target = self.table.resolve(RequestFacts(header_value(scope, b"host"), api.name, ns))
        route = target.route
        record.route = route.name
        record.repository = target.upstream_name
        authorizer = self.clients[route.name].authorizer
        authorization = header_value(scope, b"authorization")
        if self._shared_host(scope):
            authorization = self._shared_host_login(authorization, target)
        login = authorizer.admit(authorization, target.client_path_name)
        ex = Exchange(scope, receive, send, record, api, target, head=method == "HEAD", login=login)
        if api.kind is Kind.MANIFEST and self.cache is not None and authorizer.shares_answers:
            # Every Accept header counts: Docker sends one per media type, and a client that
            # accepts only a single manifest type gets another answer (a list converted to
            # one manifest) that must never be served to one that accepts lists.
            accept = b", ".join(v for k, v in scope["headers"] if k == b"accept").decode("latin-1")
            key: CacheKey = (route.name, target.upstream_name, api.reference, normalise_accept(accept))
            if await self._from_cache(ex, key):
                return
            async with self.cache.flight(key) as leader:
                if not leader and await self._from_cache(ex, key):
                    return  # another request fetched it meanwhile
                record.cache = "miss"
                ex.cache_key = key
                await self._from_upstream(ex, query)
        elif self.board is not None and self._shareable(ex):
            await self._shared(ex, query)
        else:
            await self._from_upstream(ex, query)

    async def _from_cache(self, ex: Exchange, key: CacheKey) -> bool:
        assert self.cache is not None
        entry = self.cache.get(key, head=ex.head)
        if entry is not None:
            ex.record.cache = "hit"
            await self._send_entry(ex, entry)
            return True
        entry = self.cache.held(key, head=ex.head)  # the upstream failed a moment ago: not asked again
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
        if key is None or self.cache is None:
            return False
        entry = self.cache.stale(key, head=ex.head)
        if entry is None:
            return False
        self.cache.hold(key, reason)
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

    def _see_budget(self, ex: Exchange, opened: Opened) -> None:
        """The one place the upstream's pull budget is read from an answer's headers (Docker Hub's).

        429s are counted where they happen, also those the pool or failover absorbs
        (``Authorizer.note_rate_limited``, called by the upstream client)."""
        resp = opened.response
        headers = resp.headers
        limit = headers.get(budget.LIMIT_HEADER)
        if limit is None:
            return
        route = ex.route_name
        credential = opened.credential or self.clients[route].authorizer.identity_for(ex.login, origin_of(opened.url))
        seen = self.budgets.observe(
            route,
            credential,
            limit=limit,
            remaining=headers.get(budget.REMAINING_HEADER),
            source=headers.get(budget.SOURCE_HEADER),
            upstream=opened.upstream.url,
        )
        if seen is None:
            return
        current, crossing = seen
        metrics.budget(route, credential, current.limit, current.remaining, current.window)
        if crossing is not None:
            fields = {
                "event": "budget_low",
                "route": route,
                "credential": credential,
                "remaining": current.remaining,
                "limit": current.limit,
                "window_seconds": current.window,
                "threshold": crossing.threshold,
                "source": current.source,
                "upstream": current.upstream,
            }
            logger.warning("the upstream's pull budget is running low", extra={"fields": fields})

    async def _from_upstream(self, ex: Exchange, query: str) -> None:
        route = ex.target.route
        client = self.clients[route.name]
        started = time.perf_counter()
        # One deadline for the whole answer of manifests, tags, referrers and errors; for
        # blobs it bounds the time to the headers (tokens, redirects and failover included).
        ex.deadline = asyncio.get_running_loop().time() + client.timeouts.manifest
        try:
            async with asyncio.timeout_at(ex.deadline):
                opened = await client.open(
                    ex.scope["method"],
                    ex.upstream_path,
                    query=query,
                    headers=upstream_headers(ex.scope),
                    repository=ex.target.upstream_name,
                    follow_redirects=not (ex.api.kind is Kind.BLOB and route.blob_redirect == "pass"),
                    login=ex.login,
                    avoid=ex.api.reference if ex.content_addressed else None,
                    content_addressed=ex.content_addressed,
                )
        except TimeoutError:
            metrics.upstream_error(route.name, "timeout")
            if await self._serve_stale(ex, "unreachable", 504):
                return
            raise RegistryError(
                504, UNAVAILABLE, f"upstream {route.name} did not answer within {client.timeouts.manifest:g} s"
            ) from None
        except RegistryError as exc:
            failed = exc.status == 429 or exc.status >= 500
            reason = "rate_limited" if exc.status == 429 else "unreachable"
            if failed and await self._serve_stale(ex, reason, exc.status):
                return
            raise
        ex.upstream = opened.upstream
        ex.record.upstream = opened.upstream.url
        ex.record.upstream_seconds = round(time.perf_counter() - started, 6)
        if opened.redirects:
            ex.record.redirect = "followed"
        try:
            self._see_budget(ex, opened)
            if ex.login.from_client and opened.response.status_code == 401:
                # The upstream refused the client's own token: it must log in again, at our realm.
                challenge = passthrough.challenge_header(ex.scope, route.name, ex.target.client_path_name)
                await self._relay_error(ex, opened.response, extra=[challenge])
            else:
                await self._answer(ex, opened)
        finally:
            if not ex.handed_over:
                await opened.response.aclose()

    def _shared_host(self, scope: Scope) -> bool:
        """Whether the request's host is one no host pattern claims while a passthrough route is reachable on it."""
        return self.grants is not None and self.table.is_shared_host(header_value(scope, b"host"))

    def _shared_host_login(self, authorization: str | None, target: Target) -> str | None:
        """On a shared host, only the gateway's grants (``grants.py``) count, and only for their routes.

        A passthrough route gets the upstream token inside the grant; a grant for another route,
        an expired or forged one, or any other token gets a fresh challenge. Other routes use the
        gateway's credentials and need no login; a grant for another route is refused there too."""
        assert self.grants is not None
        route = target.route
        grant = self.grants.read(authorization)
        if route.auth.uses_client_logins:
            if grant is not None and route.name in grant.routes and grant.upstream_token:
                return f"Bearer {grant.upstream_token}"
            raise LoginRequired(route.name, target.client_path_name)
        if (grant is not None and route.name not in grant.routes) or (
            grant is None and self.grants.looks_like_grant(authorization)
        ):
            raise LoginRequired(route.name, target.client_path_name)
        return authorization

    async def _ping(self, scope: Scope, send: Send, record: RequestRecord) -> None:
        """``/v2/``: 200, unless the host's route passes logins through and the client has none (yet)."""
        head = scope["method"] == "HEAD"
        if self._shared_host(scope):
            assert self.grants is not None
            # Docker, containerd and containers/image decide from this answer whether to log in.
            if self.grants.read(header_value(scope, b"authorization")) is None:
                raise LoginRequired(self.table.ping_service, None)
            await send_json(send, 200, {}, [API_VERSION_HEADER], head=head)
            return
        route = self.table.route_for_ping(header_value(scope, b"host"))
        if route is not None:
            client = self.clients[route.name]
            try:
                login = client.authorizer.admit(header_value(scope, b"authorization"), None)
            except LoginRequired:
                record.route = route.name
                raise
            if login.from_client:
                record.route = route.name
                # Check the client's token where it is valid: Docker's login ends with this request.
                async with asyncio.timeout(client.timeouts.manifest):
                    opened = await client.open(
                        "GET", "/v2/", headers={"accept": "application/json"}, repository="", login=login
                    )
                await opened.response.aclose()
                if opened.response.status_code == 401:
                    raise LoginRequired(route.name, None)
        await send_json(send, 200, {}, [API_VERSION_HEADER], head=head)

    async def _answer(self, ex: Exchange, opened: Opened) -> None:
        resp = opened.response
        status = resp.status_code
        failed = ex.cache_key is not None and (status == 429 or status >= 500)
        if failed and await self._serve_stale(ex, "rate_limited" if status == 429 else "status_5xx", status):
            if status >= 500:
                metrics.upstream_error(ex.route_name, "status_5xx")  # as _relay_error would
            return
        if ex.cache_key is not None and (status != 200 or "no-store" in resp.headers.get("cache-control", "")):
            ex.cache_key = None
        if status in REDIRECT_STATUSES:
            await self._pass_redirect(ex, opened)
        elif status >= 400:
            await self._relay_error(ex, resp)
        elif ex.api.kind is Kind.MANIFEST and not ex.head and status == 200:
            await self._relay_manifest(ex, resp)
        else:
            await self._relay_stream(ex, resp)

    async def _relay_stream(self, ex: Exchange, resp: httpx.Response) -> None:
        """Blobs, tag lists, referrers, and HEAD answers: headers now, the body as it arrives."""
        headers = response_headers(resp.headers)
        if ex.cache_key is not None and self.cache is not None:
            self.cache.put(ex.cache_key, headers, None)  # a manifest HEAD: headers only
        body = resp.aiter_raw()
        if ex.api.kind is Kind.TAGS:
            headers.extend(self._links(resp, ex.target))
            if resp.status_code == 200 and not ex.head and "content-encoding" not in resp.headers:
                body = await self._renamed_tag_list(ex, headers, body)
        verdict: Verdict | None = None
        if ex.lead is not None:
            reader = self._lead(ex, resp, headers)
            if reader is not None:
                await self._send_shared(ex, ex.lead, reader, headers, 200)
                return
            ex.lead.abandon()
        if ex.api.kind is Kind.BLOB and not ex.head:
            body = integrity.resumable_body(ex, self.clients[ex.route_name], resp, body, self.blob_resumes)
            if resp.status_code == 200:
                body, verdict = integrity.checked_body(ex, body)
        await self._send_stream(ex, resp.status_code, headers, body, verdict)

    async def _send_stream(
        self, ex: Exchange, status: int, headers: Headers, body: AsyncIterator[bytes], verdict: Verdict | None
    ) -> None:
        headers.append(API_VERSION_HEADER)
        await ex.send({"type": "http.response.start", "status": status, "headers": headers})
        if ex.head or status in (204, 304):
            await ex.send({"type": "http.response.body", "body": b""})
            return
        in_flight = metrics.STREAMS_IN_FLIGHT.labels(ex.route_name)
        in_flight.inc()
        # Blobs may take as long as they keep flowing; tag lists and referrers are
        # answers like manifests, held to the deadline as a whole.
        limit = None if ex.api.kind is Kind.BLOB else ex.deadline
        with tracing.span("body", client=False) as current:
            try:
                async with asyncio.timeout_at(limit):
                    end, sent = await stream_body(ex.send, ex.receive, body, upstream_errors=_STREAM_ERRORS)
            except TimeoutError:
                end, sent = StreamEnd.UPSTREAM_BROKE, 0
                metrics.upstream_error(ex.route_name, "timeout")
            finally:
                in_flight.dec()
            tracing.set_attributes(
                current,
                {
                    "registry.body.bytes": sent,
                    "registry.body.end": end.value,
                    "registry.body.resumes": ex.record.resumes,
                },
            )
        ex.record.bytes = sent
        if ex.api.kind is Kind.BLOB:
            metrics.blob_bytes(ex.route_name, "client", sent)
            if ex.record.share is None or ex.record.share == "bypassed":
                metrics.blob_bytes(ex.route_name, "upstream", sent)
        if verdict is not None:
            integrity.judge(ex, self.clients[ex.route_name], verdict)
        if end is not StreamEnd.COMPLETE and ex.record.verified != "mismatch":
            ex.record.error = end.value
            if end is StreamEnd.UPSTREAM_BROKE:
                metrics.upstream_error(ex.route_name, "broken_stream")
                fields = {"event": "upstream_broke", "request_id": ex.record.request_id, "route": ex.route_name}
                logger.warning("upstream broke mid-body; aborting the client connection", extra={"fields": fields})

    # -- shared blob fetches (herd.py) ----------------------------------------------------

    @staticmethod
    def _shareable(ex: Exchange) -> bool:
        """A blob GET by digest, whole or one range, with no condition that makes its answer its own."""
        if ex.head or ex.api.kind is not Kind.BLOB or not is_digest(ex.api.reference):
            return False
        own = (b"if-none-match", b"if-match", b"if-modified-since", b"if-unmodified-since", b"if-range")
        return not any(k in own for k, _ in ex.scope["headers"])

    async def _shared_range(self, ex: Exchange, query: str, value: str) -> None:
        """A client's range inside a shared fetch's window is served from it; anything else goes upstream."""
        assert self.board is not None
        fetch = self.board.current((ex.route_name, ex.target.upstream_name, ex.api.reference))
        wanted = single_range(value, fetch.total) if fetch is not None and fetch.ready.is_set() else None
        # Asked twice: the passthrough check may wait, and the window move on meanwhile.
        if (
            fetch is None
            or wanted is None
            or not fetch.holds(wanted[0])
            or not await self._may_join(ex)
            or not fetch.holds(wanted[0])
        ):
            await self._from_upstream(ex, query)
            return
        first, last = wanted
        reader = fetch.join(first, last + 1)
        ex.record.share = "joined"
        headers = [(k, v) for k, v in fetch.headers if k != b"content-length"]
        headers.append((b"content-range", f"bytes {first}-{last}/{fetch.total}".encode()))
        headers.append((b"content-length", str(last - first + 1).encode()))
        await self._send_shared(ex, fetch, reader, headers, 206)

    async def _shared(self, ex: Exchange, query: str) -> None:
        """Join the blob's shared fetch when it still holds the first byte, else open one for others."""
        assert self.board is not None
        ranges = [v for k, v in ex.scope["headers"] if k == b"range"]
        if ranges:
            await self._shared_range(ex, query, ranges[0].decode("latin-1") if len(ranges) == 1 else "")
            return
        key: herd.Key = (ex.route_name, ex.target.upstream_name, ex.api.reference)
        client = self.clients[ex.route_name]
        fetch = self.board.current(key)
        if fetch is not None and not fetch.ready.is_set():
            try:
                async with asyncio.timeout(client.timeouts.manifest):
                    await fetch.ready.wait()  # its leader is opening it: its answer decides
            except TimeoutError:
                pass
            fetch = self.board.current(key)
        if fetch is not None and fetch.holds(0):
            if not await self._may_join(ex):
                await self._from_upstream(ex, query)  # its own answer: the upstream's refusal
                return
            if fetch.holds(0):
                reader = fetch.join(0, fetch.total)
                ex.record.share = "joined"
                await self._send_shared(ex, fetch, reader, list(fetch.headers), 200)
                return
        ex.lead = self.board.lead(key)
        try:
            await self._from_upstream(ex, query)
        finally:
            ex.lead.abandon()  # unless its answer was shared: then nothing to do

    async def _may_join(self, ex: Exchange) -> bool:
        """Whether this client may read a shared fetch's bytes: on passthrough routes, only once
        the upstream accepted the client's own token for this repository (a HEAD, remembered)."""
        authorization = ex.login.client_authorization
        if authorization is None:
            return True  # the gateway's own credentials: its access checks admitted the client
        key = herd.permit_key(authorization, ex.route_name, ex.target.upstream_name)
        now = time.monotonic()
        until = self._permits.get(key)
        if until is not None and until > now:
            return True
        client = self.clients[ex.route_name]
        try:
            async with asyncio.timeout(client.timeouts.manifest):
                opened = await client.open(
                    "HEAD",
                    ex.upstream_path,
                    headers=upstream_headers(ex.scope),
                    repository=ex.target.upstream_name,
                    follow_redirects=False,
                    login=ex.login,
                )
        except (TimeoutError, RegistryError):
            return False
        await opened.response.aclose()
        # A 200, or a redirect to where the bytes are: the registry authorized this token.
        if opened.response.status_code != 200 and opened.response.status_code not in REDIRECT_STATUSES:
            return False
        self._permits[key] = now + JOIN_PERMIT_SECONDS
        self._permits.move_to_end(key)
        while len(self._permits) > _MAX_PERMITS:
            self._permits.popitem(last=False)
        return True

    def _lead(self, ex: Exchange, resp: httpx.Response, headers: Headers) -> herd.Reader | None:
        """Hand a whole blob answer to the shared fetch ``ex.lead``; its first reader, or None (relayed alone)."""
        fetch = ex.lead
        assert fetch is not None
        assert self.board is not None
        length = resp.headers.get("content-length", "")
        if resp.status_code != 200 or not length.isdigit() or int(length) == 0 or "content-encoding" in resp.headers:
            return None
        total = int(length)
        if not self.board.has_room(total):
            ex.record.share = "bypassed"
            return None
        client = self.clients[ex.route_name]
        # The fetch's own exchange: its resumes and upstream are its own, not the first client's.
        producer = dataclasses.replace(ex, record=dataclasses.replace(ex.record), lead=None)
        body: AsyncIterator[bytes] = resp.aiter_raw()
        passthrough_login = ex.login.from_client
        if not passthrough_login:
            # The gateway's credentials: the fetch asks for the rest itself when its body breaks.
            # A passthrough fetch holds the leader's token only: its readers go on alone instead.
            body = integrity.resumable_body(producer, client, resp, body, self.blob_resumes)
        algorithm = integrity.algorithm_for(ex)
        self._producers[fetch] = producer
        route = ex.route_name
        metrics.SHARED_FETCHES.labels(route).inc()

        def ended(done: herd.SharedFetch) -> None:
            metrics.SHARED_FETCHES.labels(route).dec()
            metrics.blob_bytes(route, "upstream", done.produced)
            done.resumes = producer.record.resumes or 0
            if isinstance(done.error, DigestMismatch):
                integrity.mismatched(
                    producer, client, done.error.actual, "a shared blob's bytes did not match its digest; aborted"
                )

        reader = fetch.start(
            headers,
            total,
            body,
            digest=ex.api.reference,
            algorithm=algorithm,
            detach_on_break=passthrough_login,
            on_end=ended,
            close=resp.aclose,
        )
        ex.handed_over = True
        ex.record.share = "led"
        return reader

    async def _send_shared(
        self, ex: Exchange, fetch: herd.SharedFetch, reader: herd.Reader, headers: Headers, status: int
    ) -> None:
        """One reader of a shared fetch: the window's bytes, then its own request if it is detached."""
        client = self.clients[ex.route_name]
        producer = self._producers.get(fetch)
        if producer is not None:
            ex.upstream = producer.upstream
            ex.record.upstream = producer.record.upstream
        whole = reader.position == 0 and reader.end == fetch.total
        algorithm = integrity.algorithm_for(ex) if whole else None
        verdict = Verdict() if algorithm is not None else None

        async def own(resume: herd.Resume) -> AsyncIterator[bytes]:
            ex.record.share = "detached"
            fields = {
                "event": "shared_fetch_detached",
                "request_id": ex.record.request_id,
                "route": ex.route_name,
                "digest": ex.api.reference,
                "offset": resume.position,
                "reason": resume.reason,
            }
            logger.info("a reader left a shared fetch; going on alone", extra={"fields": fields})
            segment = Segment(resume.position, reader.end - 1, fetch.total)
            body = integrity.rest_of(ex, client, segment, self.blob_resumes)
            if algorithm is not None and resume.hasher is not None:
                for piece in resume.prefix:
                    await resume.hasher.feed(piece)
                resume.prefix.clear()
                body = verified(body, ex.api.reference, algorithm, verdict, hasher=resume.hasher)
            got = 0
            try:
                async for chunk in body:
                    got += len(chunk)
                    yield chunk
            finally:
                metrics.blob_bytes(ex.route_name, "upstream", got)

        first = fetch
        await self._send_stream(ex, status, headers, fetch.read(reader, own), None)
        fetch = reader.fetch  # the fetch it ended on: another, if its own merged into an older one
        if fetch is not first and ex.record.share in ("led", "joined"):
            ex.record.share = "merged"
        if ex.record.share != "detached":
            ex.record.resumes = fetch.resumes or ex.record.resumes
            if verdict is not None and fetch.actual is not None and ex.record.bytes == fetch.total:
                verdict.actual = fetch.actual
            if isinstance(fetch.error, DigestMismatch):
                ex.record.verified = "mismatch"
                ex.record.error = "digest_mismatch"
                return
        if verdict is not None:
            integrity.judge(ex, client, verdict)

    async def _renamed_tag_list(
        self, ex: Exchange, headers: Headers, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """The tag list's body with ``name`` as the client asked for it; ``headers``' Content-Length follows."""
        upstream_name, client_name = ex.target.upstream_name, ex.target.client_path_name
        if upstream_name == client_name:
            return body
        start = b""
        renamed: bytes | None = None
        try:
            with upstream_errors(BODY, f"upstream {ex.route_name}", "a tag list"):
                async with asyncio.timeout_at(ex.deadline):
                    async for chunk in body:
                        start += chunk
                        renamed = renamed_tag_list_start(start, upstream_name, client_name, complete=False)
                        if renamed is not None:
                            break
        except RegistryError as exc:
            if exc.reason == "timeout":
                metrics.upstream_error(ex.route_name, "timeout")
            raise
        if renamed is None:
            renamed = renamed_tag_list_start(start, upstream_name, client_name, complete=True)
            assert renamed is not None
        for index, (name, value) in enumerate(headers):
            if name == b"content-length" and value.isdigit():
                headers[index] = (name, str(int(value) + len(renamed) - len(start)).encode())

        async def joined() -> AsyncIterator[bytes]:
            yield renamed
            async for chunk in body:
                yield chunk

        return joined()

    @staticmethod
    def _links(resp: httpx.Response, target: Target) -> Headers:
        out: Headers = []
        for link in split_links(resp.headers.get_list("link")):
            rewritten = rewrite_next_link(link, target.client_path_name)
            if rewritten is not None:
                out.append((b"link", rewritten.encode()))
        return out

    async def _pass_redirect(self, ex: Exchange, opened: Opened) -> None:
        """blob_redirect = "pass": the client fetches the blob from where the upstream points."""
        location = opened.response.headers.get("location")
        if not location:
            raise RegistryError(
                502, UNAVAILABLE, f"upstream {ex.route_name} answered {opened.response.status_code} without Location"
            )
        ex.record.redirect = "passed"
        try:
            # Made absolute: a relative Location is relative to the upstream, not to us.
            absolute = urljoin(opened.url, location)
            # A host name a client could not even decode (bad IDNA) is refused here.
            _ = httpx.URL(absolute).host
        except (ValueError, httpx.InvalidURL):
            absolute = ""
        if not absolute.startswith(("https://", "http://")) or not absolute.isascii():
            raise RegistryError(502, UNAVAILABLE, f"upstream {ex.route_name} redirected to an invalid URL")
        headers: Headers = [(b"location", absolute.encode()), API_VERSION_HEADER]
        await send_body(ex.send, opened.response.status_code, headers, b"")

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
        integrity.check_manifest(ex, self.clients[ex.route_name], body, resp)
        headers = response_headers(resp.headers)
        if "docker-content-digest" not in resp.headers and "content-encoding" not in resp.headers:
            # The spec requires Docker-Content-Digest on manifest answers; some upstreams
            # omit it. The digest is over the exact bytes, which we hold.
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            headers.append((b"docker-content-digest", digest.encode()))
        if ex.cache_key is not None and self.cache is not None:
            self.cache.put(ex.cache_key, [(k, v) for k, v in headers if k != b"content-length"], body)
        headers.append(API_VERSION_HEADER)
        ex.record.bytes = len(body)
        await send_body(ex.send, 200, headers, body)

    async def _relay_error(
        self, ex: Exchange, resp: httpx.Response, *, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Upstream errors keep their status; a registry JSON body passes as is, anything else is wrapped."""
        status = resp.status_code
        if status >= 500:
            metrics.upstream_error(ex.route_name, "status_5xx")
        body: bytes | None = None
        if not ex.head:
            try:
                with upstream_errors(BODY, f"upstream {ex.route_name}", "an error"):
                    async with asyncio.timeout_at(ex.deadline):
                        body = await read_capped(resp, MAX_ERROR_BODY)
            except RegistryError:
                body = None  # replaced by the gateway's own message below
        headers = response_headers(resp.headers, ERROR_RESPONSE_HEADERS)
        if status == 416 and "content-range" in resp.headers:
            headers.append((b"content-range", resp.headers["content-range"].encode()))
        headers.extend([API_VERSION_HEADER, JSON_CONTENT_TYPE, *extra])
        if body is None or not is_registry_error_body(body):
            code = code_for_status(status, ex.api.kind.value)
            body = error_body(code, f"upstream {ex.route_name} answered {status} {resp.reason_phrase}".strip())
            ex.record.error = code
        else:
            ex.record.error = "upstream"
        await send_body(ex.send, status, headers, body, head=ex.head)
