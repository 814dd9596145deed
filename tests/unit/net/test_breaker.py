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


def test_state_says_closed_open_and_half_open():
    now = [0.0]
    breaker = Breaker(2, 10.0, clock=lambda: now[0])
    assert breaker.state("u") == ("closed", 0)
    breaker.failure("u")
    assert breaker.state("u") == ("closed", 1)
    breaker.failure("u")
    assert breaker.state("u") == ("open", 2)
    now[0] = 11.0
    assert breaker.state("u") == ("half-open", 2)
    breaker.success("u")
    assert breaker.state("u") == ("closed", 0)
