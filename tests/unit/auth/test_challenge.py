import pytest
from hypothesis import given, strategies as st

from gateway.auth.challenge import Challenge, parse_challenges, parse_www_authenticate, pick_challenge

HUB = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"'


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            HUB,
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull",
                    },
                )
            ],
        ),
        # Any parameter order; the scheme is case-insensitive.
        (
            'BEARER scope="s",service="svc",realm="r"',
            [Challenge("bearer", {"scope": "s", "service": "svc", "realm": "r"})],
        ),
        # No service or scope (Artifact Registry sends a realm only).
        (
            'Bearer realm="https://us-docker.pkg.dev/v2/token"',
            [Challenge("bearer", {"realm": "https://us-docker.pkg.dev/v2/token"})],
        ),
        # Two challenges on one line (Quay).
        (
            'Basic realm="quay.io", Bearer realm="https://quay.io/v2/auth",service="quay.io"',
            [
                Challenge("basic", {"realm": "quay.io"}),
                Challenge("bearer", {"realm": "https://quay.io/v2/auth", "service": "quay.io"}),
            ],
        ),
        # Quoted commas and escapes; whitespace around "=".
        (
            'Bearer realm = "a,b", scope="repository:x:pull,push", service="q\\"s"',
            [Challenge("bearer", {"realm": "a,b", "scope": "repository:x:pull,push", "service": 'q"s'})],
        ),
        # Unquoted token values; parameter names are case-insensitive; first occurrence wins.
        (
            "Bearer Realm=https://r/token, service=svc, realm=other",
            [Challenge("bearer", {"realm": "https://r/token", "service": "svc"})],
        ),
        # token68 and a bare scheme.
        (
            "Negotiate YWJj==, Bearer realm=r",
            [Challenge("negotiate", {}, "YWJj=="), Challenge("bearer", {"realm": "r"})],
        ),
        ("Basic", [Challenge("basic", {})]),
        # Extra commas are allowed by the list syntax.
        (",, Bearer realm=r,, service=s ,", [Challenge("bearer", {"realm": "r", "service": "s"})]),
        # Malformed input keeps what parsed cleanly and never raises.
        ('Bearer realm="unterminated', []),
        ("", []),
        ("=", []),
        ('Bearer realm="ok", =broken', [Challenge("bearer", {"realm": "ok"})]),
    ],
)
def test_parse(header, expected):
    assert parse_www_authenticate(header) == expected


def test_several_headers_and_picking():
    challenges = parse_challenges(['Basic realm="x"', 'Bearer realm="https://r"'])
    assert pick_challenge(challenges) == Challenge("bearer", {"realm": "https://r"})
    assert pick_challenge(parse_challenges(['Basic realm="x"'])) == Challenge("basic", {"realm": "x"})
    assert pick_challenge(parse_challenges(["Bearer service=s"])) is None  # Bearer without a realm is useless
    assert pick_challenge([]) is None


def test_oversized_header_is_ignored():
    assert parse_www_authenticate("Bearer realm=" + "a" * 10_000) == []


@given(st.text(max_size=400))
def test_never_raises(text):
    for c in parse_www_authenticate(text):
        assert c.scheme == c.scheme.lower()
        assert all(k == k.lower() for k in c.params)
