"""Which passthrough clients may read a shared blob fetch's bytes: those the upstream accepted for
that repository with their own token (one HEAD, remembered for a minute)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping

from gateway.blobs import herd
from gateway.http.errors import RegistryError
from gateway.http.util import REDIRECT_STATUSES
from gateway.relay.exchange import Exchange
from gateway.routing.request_rules import upstream_headers
from gateway.upstream.client import UpstreamClient

# How long a passthrough client's proven access to a repository lets it join shared fetches
# of that repository's blobs without asking the upstream again.
JOIN_PERMIT_SECONDS = 60.0
_MAX_PERMITS = 4096


class JoinPermits:
    """Proven access per (token hash, route, repository), least recently proven dropped first."""

    def __init__(self, clients: Mapping[str, UpstreamClient]) -> None:
        self._clients = clients
        # Passthrough clients that proved access to a repository: (token hash, route, repo) -> until.
        self._permits: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    async def may_join(self, ex: Exchange) -> bool:
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
        client = self._clients[ex.route_name]
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
