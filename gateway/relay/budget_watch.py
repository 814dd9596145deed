"""Reading the upstream's pull budget from its answers (Docker Hub's rate-limit headers) into the
route's budget store, and warning once it runs low (``routing/budget.py`` decides when)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from gateway.observe import metrics
from gateway.relay.exchange import Exchange
from gateway.routing import budget
from gateway.routing.policy import origin_of
from gateway.upstream.client import Opened, UpstreamClient

logger = logging.getLogger("gateway.proxy")


class BudgetWatch:
    """The one place the upstream's pull budget is read from an answer's headers.

    429s are counted where they happen, also those the pool or failover absorbs
    (``Authorizer.note_rate_limited``, called by the upstream client)."""

    def __init__(self, clients: Mapping[str, UpstreamClient], budgets: budget.BudgetStore) -> None:
        # The authorizers say whose account a request spent when the upstream client did not.
        self._clients = clients
        # The upstreams' pull budgets, per route and credential (``budget.py``).
        self.budgets = budgets

    def see(self, ex: Exchange, opened: Opened) -> None:
        """Record what ``opened``'s headers say of its credential's budget, if they say anything."""
        headers = opened.response.headers
        limit = headers.get(budget.LIMIT_HEADER)
        if limit is None:
            return
        route = ex.route_name
        credential = opened.credential or self._clients[route].authorizer.identity_for(ex.login, origin_of(opened.url))
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
