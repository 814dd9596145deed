"""The circuit breaker, on an injected clock."""

from __future__ import annotations

from gateway.net.breaker import Breaker
from tests.unit.conftest import Clock


def test_breaker_half_opens_after_the_cooldown():
    clock = Clock()
    breaker = Breaker(threshold=2, cooldown=10, clock=clock)
    breaker.failure("a")
    assert breaker.available("a")
    breaker.failure("a")
    assert not breaker.available("a")
    assert breaker.retry_after(["a"]) == 10
    clock.now = 10
    assert breaker.available("a")  # half-open: one try
    breaker.failure("a")
    assert not breaker.available("a")  # failed again: rests again
    clock.now = 20
    breaker.success("a")
    breaker.failure("a")
    assert breaker.available("a")  # a success reset the count
