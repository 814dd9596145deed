"""The circuit breaker: an upstream that keeps failing rests for a while.

Pure, with an injectable clock. ``upstream.py`` counts a connection error, a timeout or a
502/503/504 as a failure and skips a resting upstream when the route has another.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    """Consecutive failures per upstream; after ``threshold`` the upstream rests ``cooldown`` s.

    After the rest it is tried again (half-open): one success closes it, one more failure
    sends it back to rest. The clock is injectable for tests.
    """

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def available(self, key: str) -> bool:
        return self._clock() >= self._open_until.get(key, 0.0)

    def retry_after(self, keys: list[str]) -> float:
        now = self._clock()
        return max(0.0, min(self._open_until.get(k, 0.0) for k in keys) - now)

    def success(self, key: str) -> None:
        self._failures.pop(key, None)
        self._open_until.pop(key, None)

    def failure(self, key: str) -> None:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        if count >= self.threshold:
            self._open_until[key] = self._clock() + self.cooldown

    def state(self, key: str) -> tuple[str, int]:
        """``closed``, ``open`` (resting) or ``half-open`` (rested, on trial), and the consecutive failures."""
        failures = self._failures.get(key, 0)
        if key not in self._open_until:
            return "closed", failures
        return ("open" if not self.available(key) else "half-open"), failures
