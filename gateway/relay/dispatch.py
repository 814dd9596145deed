"""The relay's ASGI entry: one client request under ``/v2/`` checked, routed and handed to its job.

Order of work for a request (each step can end it with a registry error):

1. the raw path is checked (no percent-encoding, no dot segments), then parsed
   into endpoint + name + reference (``routing/reference.py``);
2. only GET and HEAD are served; writes get 405 UNSUPPORTED; ``/v2/`` is the ping;
3. the route and the upstream repository are resolved (``routing/routes.py``), and the
   login admitted (on a shared host, only the gateway's grants count);
4. the job for the endpoint takes it: ``manifests.py`` (cache, stale answers), ``blobs.py``
   (streamed, shared, checked), ``listings.py`` (tag lists, referrers). Each sends it
   upstream through ``opening.py`` (allow-listed headers, deadline, budget) and answers:
   errors and redirects by ``answers.py``, bodies by ``streaming.py``.

Nothing below calls back into this class: each job got what it needs when it was built.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from gateway.auth.grants import Grants
from gateway.blobs import herd
from gateway.http.asgi import API_VERSION_HEADER, Receive, Scope, Send, send_json
from gateway.http.errors import LoginRequired, RegistryError
from gateway.observe.log import RequestRecord, record_of
from gateway.relay import answers
from gateway.relay.blobs import BlobRelay
from gateway.relay.budget_watch import BudgetWatch
from gateway.relay.exchange import Exchange
from gateway.relay.join_permits import JoinPermits
from gateway.relay.listings import ListRelay
from gateway.relay.manifest_cache import ManifestCache
from gateway.relay.manifests import ManifestRelay
from gateway.relay.opening import Opener
from gateway.routing import budget
from gateway.routing.reference import Kind
from gateway.routing.request_rules import Incoming, admissible, read_request
from gateway.routing.routes import RequestFacts, RouteTable, Target
from gateway.upstream.client import UpstreamClient

logger = logging.getLogger("gateway.proxy")


class Relay:
    """The ASGI app for everything under ``/v2``: the registry API, relayed."""

    def __init__(
        self,
        table: RouteTable,
        clients: Mapping[str, UpstreamClient],
        cache: ManifestCache | None = None,
        *,
        blob_resumes: int = 0,
        resume_same_upstream: int = 1,
        budgets: budget.BudgetStore | None = None,
        board: herd.Board | None = None,
        grants: Grants | None = None,
    ) -> None:
        self._table = table
        # The gateway's own tokens on hosts several routes share (``grants.py``).
        self._grants = grants
        self._clients = clients
        # The upstreams' pull budgets, per route and credential (``budget.py``).
        watch = BudgetWatch(clients, budgets if budgets is not None else budget.BudgetStore())
        opener = Opener(clients, watch)
        self._manifests = ManifestRelay(clients, cache, opener)
        self._blobs = BlobRelay(
            clients,
            opener,
            blob_resumes=blob_resumes,
            resume_same_upstream=resume_same_upstream,
            board=board,
            permits=JoinPermits(clients),
        )
        self._listings = ListRelay(opener)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = record_of(scope)
        try:
            await self._handle(scope, receive, send, record)
        except RegistryError as exc:
            await answers.send_refusal(scope, send, record, exc)
        except Exception:
            # A bug, not bad input: logged with its traceback, answered as registry JSON
            # (or, mid-stream, by aborting the connection) instead of uvicorn's text/plain 500.
            logger.exception(
                "internal error", extra={"fields": {"event": "internal_error", "request_id": record.request_id}}
            )
            if record.status:
                raise
            await answers.send_internal_error(scope, send, record)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        # The scope is read here once; everything below works on the parsed request.
        incoming = read_request(scope)
        api = incoming.api
        record.kind = api.kind.value
        query, ns = admissible(incoming)
        if api.kind is Kind.PING:
            await self._ping(incoming, send, record)
            return
        target = self._table.resolve(RequestFacts(incoming.host, api.name, ns))
        route = target.route
        record.route = route.name
        record.repository = target.upstream_name
        authorizer = self._clients[route.name].authorizer
        authorization = incoming.authorization
        if self._shared_host(incoming.host):
            authorization = self._shared_host_login(authorization, target)
        login = authorizer.admit(authorization, target.client_path_name)
        ex = Exchange(scope, receive, send, record, api, target, head=incoming.head, login=login)
        if api.kind is Kind.MANIFEST:
            await self._manifests.serve(ex, query)
        elif api.kind is Kind.BLOB:
            await self._blobs.serve(ex, query)
        else:
            await self._listings.serve(ex, query)

    def _shared_host(self, host: str | None) -> bool:
        """Whether the request's host is one no host pattern claims while a passthrough route is reachable on it."""
        return self._grants is not None and self._table.is_shared_host(host)

    def _shared_host_login(self, authorization: str | None, target: Target) -> str | None:
        """On a shared host, only the gateway's grants (``grants.py``) count, and only for their routes.

        A passthrough route gets the upstream token inside the grant; a grant for another route,
        an expired or forged one, or any other token gets a fresh challenge. Other routes use the
        gateway's credentials and need no login; a grant for another route is refused there too."""
        assert self._grants is not None
        route = target.route
        grant = self._grants.read(authorization)
        if route.auth.uses_client_logins:
            if grant is not None and route.name in grant.routes and grant.upstream_token:
                return f"Bearer {grant.upstream_token}"
            raise LoginRequired(route.name, target.client_path_name)
        if (grant is not None and route.name not in grant.routes) or (
            grant is None and self._grants.looks_like_grant(authorization)
        ):
            raise LoginRequired(route.name, target.client_path_name)
        return authorization

    async def _ping(self, incoming: Incoming, send: Send, record: RequestRecord) -> None:
        """``/v2/``: 200, unless the host's route passes logins through and the client has none (yet)."""
        head = incoming.head
        if self._shared_host(incoming.host):
            assert self._grants is not None
            # Docker, containerd and containers/image decide from this answer whether to log in.
            if self._grants.read(incoming.authorization) is None:
                raise LoginRequired(self._table.ping_service, None)
            await send_json(send, 200, {}, [API_VERSION_HEADER], head=head)
            return
        route = self._table.route_for_ping(incoming.host)
        if route is not None:
            client = self._clients[route.name]
            try:
                login = client.authorizer.admit(incoming.authorization, None)
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
