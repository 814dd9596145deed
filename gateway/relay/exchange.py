"""One client request on its way through the relay: its parts, its route, its deadline."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth.authorizer import Login
from gateway.blobs.herd import SharedFetch
from gateway.http.asgi import Receive, Scope, Send
from gateway.observe.log import RequestRecord
from gateway.relay.manifest_cache import CacheKey
from gateway.routing.reference import ApiPath, Kind, is_digest
from gateway.routing.routes import Target, Upstream


@dataclass(slots=True)
class Exchange:
    """One client request on its way through the relay, once its route is known."""

    scope: Scope
    receive: Receive
    send: Send
    record: RequestRecord
    api: ApiPath
    target: Target
    head: bool
    # What authorizes the request upstream (the route's authorizer admitted it).
    login: Login
    # Whole-answer deadline (loop time): set when the request goes upstream.
    deadline: float = 0.0
    # Where a cacheable manifest answer goes; None once it proves not cacheable.
    cache_key: CacheKey | None = None
    # The upstream that answered, once one did.
    upstream: Upstream | None = None
    # A blob GET that opens a shared fetch (``herd.py``): others wait for its answer.
    lead: SharedFetch | None = None
    # Whether the upstream response now belongs to a shared fetch (which closes it), not to us.
    handed_over: bool = False

    @property
    def route_name(self) -> str:
        return self.target.route.name

    @property
    def content_addressed(self) -> bool:
        """A blob, or a manifest by digest: the bytes are named by their hash (and checked against it)."""
        return self.api.kind is Kind.BLOB or (self.api.kind is Kind.MANIFEST and is_digest(self.api.reference))

    @property
    def upstream_path(self) -> str:
        return f"/v2/{self.target.upstream_name}/{self.api.tail()}"
