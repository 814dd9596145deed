"""The status page's memory of recent errors and upstream latencies."""

from __future__ import annotations

from gateway.observe.log import RequestRecord
from gateway.observe.recent import Recent, is_error


def record(
    status: int, *, route: str | None = "docker.io", seconds: float | None = 0.1, **fields: object
) -> RequestRecord:
    rec = RequestRecord(request_id="r", client="192.0.2.7", method="GET", path="/v2/x/manifests/1?token=secret")
    rec.route, rec.status, rec.upstream_seconds, rec.upstream = route, status, seconds, "https://up.test"
    rec.kind, rec.repository = "manifest", "library/x"
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


def test_errors_are_failures_but_not_login_challenges():
    assert is_error(record(404))
    assert is_error(record(502))
    assert is_error(record(429))
    assert not is_error(record(401))
    assert not is_error(record(200))
    assert is_error(record(200, error="broken_stream"))  # the body broke after the status went out


def test_keeps_the_last_errors_newest_first_and_bounded():
    recent = Recent(errors=3, clock=lambda: 1_700_000_000.0)
    for status in (200, 500, 404, 502, 503, 401):
        recent.observe(record(status), 0.2)
    errors = recent.recent_errors()
    assert [e["status"] for e in errors] == [503, 502, 404]
    seen = recent.upstream("docker.io", "https://up.test")
    assert seen is not None
    assert seen.requests == 6
    assert seen.errors == 4
    assert seen.last_error is not None
    assert seen.last_error.status == 503


def test_never_keeps_the_path_query_or_client_unless_allowed():
    hidden, shown = Recent(), Recent(keep_clients=True)
    for recent in (hidden, shown):
        recent.observe(record(500), 0.1)
    assert "client" not in hidden.recent_errors()[0]
    assert "secret" not in repr(hidden.recent_errors())
    assert "secret" not in repr(shown.recent_errors())
    assert shown.recent_errors()[0]["client"] == "192.0.2.7"


def test_p99_of_the_upstream_times_kept():
    recent = Recent(samples=100)
    for i in range(1, 201):
        recent.observe(record(200, seconds=i / 1000), 0.0)
    seen = recent.upstream("docker.io", "https://up.test")
    assert seen is not None
    assert len(seen.samples) == 100
    assert seen.p99() == 0.2  # the last 100 samples are 0.101 .. 0.200


def test_requests_without_a_route_are_not_kept():
    recent = Recent()
    recent.observe(record(404, route=None), 0.0)
    assert recent.recent_errors() == []
