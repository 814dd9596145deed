"""The upstream pull budget: Docker Hub's rate-limit headers, read and kept per route and credential.

Docker's docs ("Docker Hub pull usage and limits", https://docs.docker.com/docker-hub/usage/pulls/)
say a pull is a manifest GET (a HEAD is not counted), and that answers carry the budget::

    ratelimit-limit: 100;w=21600          pulls allowed per window; w= is the window in seconds
    ratelimit-remaining: 76;w=21600       pulls left in the current window
    docker-ratelimit-source: 192.0.2.1    whose count it is: the client address, or the account

They come on GETs, HEADs and ``429 TOOMANYREQUESTS`` alike (a HEAD is how Docker tells people to
check their budget without spending it). This module owns, purely (no I/O, an injectable clock):

- ``parse_quota``: one ``N;w=SECONDS`` value (the IETF RateLimit drafts' syntax, which Docker
  Hub uses); a list takes its first item, anything malformed is None;
- ``BudgetStore``: the latest values per (route, credential), bounded, and the warning
  thresholds: ``observe`` says which threshold the remaining budget just went below, once per
  crossing (it re-arms when the budget refills), never per request;
- ``credential`` names: what the route's authorizer used, as ``Credentials.identity`` says it
  (``user:bob``), or ``anonymous``; on ``auth = "passthrough"`` routes the clients' own logins are
  used, which the gateway does not know by name: ``client``, and no threshold warnings there
  (the figures belong to whichever client asked last). Never a secret.

The relay reads the headers at one place (``BudgetWatch.see``, ``relay/budget_watch.py``), only
when an answer carries them or is a 429, so a request without them costs a header look-up.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ANONYMOUS = "anonymous"  # no credential (authorizer.py names who spent a budget)
CLIENT = "client"  # passthrough routes: the client's own login, whoever it is

LIMIT_HEADER = "ratelimit-limit"
REMAINING_HEADER = "ratelimit-remaining"
SOURCE_HEADER = "docker-ratelimit-source"

DEFAULT_WARN_AT = (0.5, 0.2, 0.05)
_MAX_SOURCE = 128


@dataclass(frozen=True, slots=True)
class Quota:
    """One ``N;w=SECONDS`` value: a count and, when given, the window it applies to."""

    value: int
    window: int | None = None


def parse_quota(text: str | None) -> Quota | None:
    """``"100;w=21600"`` is ``Quota(100, 21600)``; ``"100"`` has no window; malformed text is None."""
    if not text:
        return None
    first = text.split(",", 1)[0]
    number, *params = (part.strip() for part in first.split(";"))
    if not number.isdigit() or len(number) > 12:
        return None
    window: int | None = None
    for param in params:
        name, sep, value = param.partition("=")
        if sep and name.strip().lower() == "w":
            value = value.strip().strip('"')
            window = int(value) if value.isdigit() and len(value) <= 12 else None
    return Quota(int(number), window)


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``"0.5,0.2,0.05"``: fractions of the limit, highest first; empty turns warnings off.

    Raises ValueError for anything but numbers in (0, 1].
    """
    values: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        value = float(part)
        if not 0 < value <= 1:
            raise ValueError(f"{part} is not a fraction of the limit in (0, 1]")
        values.append(value)
    return tuple(sorted(set(values), reverse=True))


def retry_after_seconds(text: str | None) -> int | None:
    """A ``Retry-After`` in seconds (its HTTP-date form is not used by registries): None otherwise."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 12 else None


@dataclass(slots=True)
class Budget:
    """What the upstream last said of one (route, credential)'s budget."""

    route: str
    credential: str
    limit: int | None = None
    remaining: int | None = None
    window: int | None = None
    source: str | None = None
    upstream: str | None = None
    updated: float = 0.0  # wall-clock time of the last answer with the headers
    rate_limited: int = 0  # 429s seen from the upstream for this credential
    retry_after: int | None = None  # of the last 429
    level: int = field(default=0, repr=False)  # how many thresholds the remaining budget is at or below

    @property
    def fraction(self) -> float | None:
        if self.limit is None or self.remaining is None or self.limit <= 0:
            return None
        return self.remaining / self.limit

    def as_json(self, now: float) -> dict[str, Any]:
        updated = datetime.fromtimestamp(self.updated, UTC).isoformat(timespec="seconds") if self.updated else None
        return {
            "route": self.route,
            "credential": self.credential,
            "limit": self.limit,
            "remaining": self.remaining,
            "window_seconds": self.window,
            "source": self.source,
            "upstream": self.upstream,
            "updated": updated,
            "age_seconds": round(now - self.updated, 3) if self.updated else None,
            "rate_limited": self.rate_limited,
            "retry_after": self.retry_after,
        }


@dataclass(frozen=True, slots=True)
class Crossing:
    """The remaining budget went at or below ``threshold`` (a fraction of the limit) with this answer."""

    budget: Budget
    threshold: float


class BudgetStore:
    """The latest budget per (route, credential), at most ``max_entries`` of them (least recently seen go)."""

    def __init__(
        self,
        warn_at: Iterable[float] = DEFAULT_WARN_AT,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = 1024,
    ) -> None:
        self.warn_at = tuple(sorted(set(warn_at), reverse=True))
        self._clock = clock
        self._max_entries = max_entries
        self._budgets: OrderedDict[tuple[str, str], Budget] = OrderedDict()

    def __len__(self) -> int:
        return len(self._budgets)

    def get(self, route: str, credential: str) -> Budget | None:
        return self._budgets.get((route, credential))

    def _entry(self, route: str, credential: str) -> Budget:
        key = (route, credential)
        budget = self._budgets.pop(key, None) or Budget(route, credential)
        self._budgets[key] = budget
        while len(self._budgets) > self._max_entries:
            self._budgets.popitem(last=False)
        return budget

    def observe(
        self,
        route: str,
        credential: str,
        *,
        limit: str | None,
        remaining: str | None,
        source: str | None = None,
        upstream: str | None = None,
    ) -> tuple[Budget, Crossing | None] | None:
        """Record an answer's header values; None when it carried no budget at all.

        The crossing, if any, is the lowest threshold the remaining budget just reached: reported
        once, until the budget rises above it again (a new window).
        """
        parsed_limit, parsed_remaining = parse_quota(limit), parse_quota(remaining)
        if parsed_limit is None and parsed_remaining is None:
            return None
        budget = self._entry(route, credential)
        if parsed_limit is not None:
            budget.limit = parsed_limit.value
        if parsed_remaining is not None:
            budget.remaining = parsed_remaining.value
        windows = [q.window for q in (parsed_remaining, parsed_limit) if q is not None and q.window is not None]
        if windows:
            budget.window = windows[0]
        if source:
            budget.source = source.strip()[:_MAX_SOURCE]
        if upstream is not None:
            budget.upstream = upstream
        budget.updated = self._clock()
        return budget, self._crossing(budget)

    def rate_limited(self, route: str, credential: str, retry_after: str | None) -> Budget:
        """Count a 429 from the upstream for this credential."""
        budget = self._entry(route, credential)
        budget.rate_limited += 1
        budget.retry_after = retry_after_seconds(retry_after)
        return budget

    def _crossing(self, budget: Budget) -> Crossing | None:
        fraction = budget.fraction
        if fraction is None:
            return None
        below = [t for t in self.warn_at if fraction <= t]
        level, before = len(below), budget.level
        budget.level = level  # a refill re-arms the thresholds it rose above
        if level <= before or budget.credential == CLIENT:
            return None
        return Crossing(budget, below[-1])

    def snapshot(self) -> list[dict[str, Any]]:
        """Every budget known, as JSON, by route and credential."""
        now = self._clock()
        return [self._budgets[key].as_json(now) for key in sorted(self._budgets)]
