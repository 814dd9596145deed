"""The real gateway process in front of a hostile upstream (``server.py``): what does the client see?

Every case is one request through the gateway to one misbehaviour. For each: the status, a
registry error document for every error, never a 500 the upstream did not send, never a hang
(each answer within the configured timeout plus a margin), and a blob the upstream breaks is an
aborted transfer, never a clean end. Afterwards the gateway is healthy, logged no unhandled
exception, kept no connection to the upstream open, its peak memory stayed flat, and nothing was
ever sent to a realm or redirect target its policy refuses.

The cases are independent (each challenge behaviour has a route of its own, because a route
remembers the last challenge of its upstream), so they all run at once: the suite takes as long
as the slowest case, not the sum of them.

A behaviour the gateway gets wrong can be marked ``xfail=`` on its case (strict, with the cause);
every problem this corpus found has been fixed, so none is marked today.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hostile.server import (
    BLOB,
    CHALLENGES,
    MANIFEST,
    SECOND_ADDRESS,
    THIRTY_GB,
    TOKEN_KINDS,
    HostileServer,
    deflate_bomb,
    gzip_bomb,
    nested_gzip_bomb,
)
from tests.registry_json import check_registry_errors
from tests.support import Gateway, run_gateway

TOKEN_TIMEOUT = 2.0
MANIFEST_TIMEOUT = 3.0
BLOB_IDLE_TIMEOUT = 3.0
MARGIN = 1.5  # what "bounded by the configured timeout" allows on top, on a loaded 2-core machine
FAST = 3.0  # an answer that involves no timeout at all (the cases run all at once)
GRACE = 2.0  # the test client waits this long past a case's bound before calling it a hang
MEMORY_SLACK = 64 << 20  # the gateway's peak RSS may grow this much over the whole suite

GATEWAY_ENV = {
    "GATEWAY_CONNECT_TIMEOUT": "2",
    "GATEWAY_TOKEN_TIMEOUT": str(TOKEN_TIMEOUT),
    "GATEWAY_MANIFEST_TIMEOUT": str(MANIFEST_TIMEOUT),
    "GATEWAY_BLOB_IDLE_TIMEOUT": str(BLOB_IDLE_TIMEOUT),
    # Most cases are upstream failures: a breaker that opened would turn the rest into 503s.
    "GATEWAY_BREAKER_FAILURES": "1000000",
}

# Challenges whose realm is refused by address: on routes without allow_private_addresses.
STRICT_CHALLENGES = {
    "ch-second-address-realm",
    "ch-metadata-realm",
    "ch-localhost-realm",
    "ch-userinfo-realm",
    "ch-mapped-realm",
    "ch-decimal-realm",
    "ch-hostname-realm",
}
# Realms that are malformed URLs (a broken IPv6 literal, an invalid IDNA label). They once
# crashed the request; they still run on a gateway of their own, so that a regression there
# cannot take the other cases down with it.
MALFORMED_URL_CHALLENGES = {"ch-bad-ipv6-realm", "ch-bad-idna-realm"}

DIGEST = "sha256:" + "a" * 64


def _hostname_is_local() -> bool:
    """Whether this machine's name resolves to loopback or private addresses only (it usually does)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    return bool(addresses) and all(a.is_loopback or a.is_private for a in addresses)


# The cases that send the gateway to this machine's name: they prove a refusal at resolve time.
NEEDS_LOCAL_HOSTNAME = pytest.mark.skipif(not _hostname_is_local(), reason="the host name does not resolve locally")


def route_toml(name: str, upstream: str, *, private: bool, default: bool = False, extra: str = "") -> str:
    # The hostile server's blobs carry made-up digests: its cases are about framing, time bounds
    # and aborts, so the digest check is off here (tests/unit/blobs/test_digest.py has its own).
    lines = ["[[route]]", f'name = "{name}"', f'upstream = "{upstream}"', "verify_blobs = false"]
    if default:
        lines.append("default = true")
    if private:
        lines.append("allow_private_addresses = true")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def main_routes(server: HostileServer) -> str:
    up = server.origin
    parts = [
        route_toml("hostile.test", up, private=True, default=True),
        route_toml("strict.test", up, private=False),
        route_toml("pass.test", up, private=True, extra='blob_redirect = "pass"'),
        route_toml("realm-move.test", up, private=True),
    ]
    for name in sorted(set(CHALLENGES) - MALFORMED_URL_CHALLENGES):
        parts.append(route_toml(f"{name}.test", up, private=name not in STRICT_CHALLENGES))
    for kind in TOKEN_KINDS:
        parts.append(route_toml(f"tok-{kind}.test", up, private=True))
    return "\n".join(parts)


def crash_routes(server: HostileServer) -> str:
    up = server.origin
    parts = [
        route_toml("crash.test", up, private=True, default=True),
        route_toml("crash-pass.test", up, private=True, extra='blob_redirect = "pass"'),
    ]
    parts.extend(route_toml(f"{name}.test", up, private=True) for name in sorted(MALFORMED_URL_CHALLENGES))
    return "\n".join(parts)


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@dataclass
class Running:
    gateway: Gateway
    baseline_hwm: int

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    # Built before any request, so that no case waits for a bomb to be assembled.
    gzip_bomb(1 << 30)
    deflate_bomb(1 << 30)
    nested_gzip_bomb(4 << 30)
    with HostileServer() as s:
        yield s


@pytest.fixture(scope="module")
def gateway(server: HostileServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with run_gateway(main_routes(server), tmp_path_factory.mktemp("hostile"), env=GATEWAY_ENV) as gw:
        httpx.get(f"{gw.url}/v2/", timeout=5)
        yield Running(gw, vm_hwm(gw.proc.pid))


@pytest.fixture(scope="module")
def crash_gateway(server: HostileServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(crash_routes(server), tmp_path_factory.mktemp("crash"), env=GATEWAY_ENV) as gw:
        yield gw


# --- the client's view ---------------------------------------------------------------------

ABORTED = {"RemoteProtocolError", "ReadError"}  # how httpx reports a body cut short
BODY_CAP = 8 << 20


@dataclass
class Answer:
    status: int | None
    headers: httpx.Headers
    body: bytes
    elapsed: float
    first_byte: float | None  # seconds until the first body byte, if any came
    error: str | None  # the exception that ended the transfer, or "still streaming"

    def describe(self) -> str:
        return (
            f"status={self.status} error={self.error} elapsed={self.elapsed:.2f}s "
            f"first_byte={self.first_byte} body={self.body[:300]!r}"
        )


def fetch(client: httpx.Client, url: str, *, method: str = "GET", patience: float) -> Answer:
    """One request, read to the end (or to ``patience`` seconds), noting how it ended."""
    start = time.monotonic()
    status: int | None = None
    headers = httpx.Headers()
    body = bytearray()
    first: float | None = None
    error: str | None = None
    try:
        with client.stream(method, url, timeout=patience) as resp:
            status, headers = resp.status_code, resp.headers
            for chunk in resp.iter_raw():
                if first is None and chunk:
                    first = time.monotonic() - start
                if len(body) < BODY_CAP:
                    body += chunk
                if time.monotonic() - start > patience:
                    error = "still streaming"
                    break
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    return Answer(status, headers, bytes(body), time.monotonic() - start, first, error)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    # One client for every case: building one per request costs an SSL context each (tens of
    # milliseconds under the GIL), which would count against the cases' time bounds.
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    with httpx.Client(limits=limits) as c:
        yield c


def registry_errors(answer: Answer) -> list[dict[str, object]]:
    return check_registry_errors(answer.headers.get("content-type"), answer.body, answer.describe())


# --- the cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    status: int
    code: str | None = None  # the registry error code, for errors
    says: str = ""  # part of the error message
    seconds: float = FAST  # the whole answer within this
    aborted: bool = False  # a body the upstream breaks: the client must see the transfer cut
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    xfail: str | None = None
    marks: tuple[pytest.MarkDecorator, ...] = ()


def on(route: str | None, repository: str, tail: str) -> str:
    """A client path: through a route's prefix, or the default route (None)."""
    return f"/v2/{route}/{repository}/{tail}" if route else f"/v2/{repository}/{tail}"


def challenge(name: str, status: int, code: str | None, says: str = "", **kw: Any) -> Case:
    return Case(f"challenge:{name}", on(f"{name}.test", name, "manifests/v1"), status, code, says, **kw)


def token(kind: str, status: int, code: str | None, says: str = "", **kw: Any) -> Case:
    name = f"tok-{kind}"
    return Case(f"token:{kind}", on(f"{name}.test", name, "manifests/v1"), status, code, says, **kw)


def redirect(name: str, status: int, code: str | None, says: str = "", *, route: str | None = None, **kw: Any) -> Case:
    label = f"redirect:{name}" + (f" via {route}" if route else "")
    return Case(label, on(route, name, f"blobs/{DIGEST}"), status, code, says, **kw)


def manifest(name: str, status: int, code: str | None, says: str = "", **kw: Any) -> Case:
    return Case(f"manifest:{name}", on(None, name, "manifests/latest"), status, code, says, **kw)


def blob(name: str, status: int, code: str | None = None, says: str = "", **kw: Any) -> Case:
    return Case(f"blob:{name}", on(None, name, f"blobs/{DIGEST}"), status, code, says, **kw)


TOKEN_BOUND = TOKEN_TIMEOUT + MARGIN
MANIFEST_BOUND = MANIFEST_TIMEOUT + MARGIN
IDLE_BOUND = BLOB_IDLE_TIMEOUT + MARGIN

REFUSED = "to a refused address"
ROUTE_REFUSED = "upstream strict.test"

CASES: list[Case] = [
    # Malformed WWW-Authenticate: nothing to answer, so the upstream's 401 goes to the client
    # (without the upstream's WWW-Authenticate).
    challenge("ch-garbage", 401, "UNAUTHORIZED", "hostile upstream wants a token"),
    challenge("ch-unterminated", 401, "UNAUTHORIZED"),
    challenge("ch-no-realm", 401, "UNAUTHORIZED"),
    challenge("ch-empty-realm", 401, "UNAUTHORIZED"),
    challenge("ch-token68", 401, "UNAUTHORIZED"),
    challenge("ch-basic", 401, "UNAUTHORIZED"),
    # Realms that are no http(s) URL: refused even where private addresses are allowed.
    challenge("ch-obs-text-realm", 502, "UNAVAILABLE", "sent its token realm to a refused address: no host"),
    challenge(
        "ch-file-realm", 502, "UNAVAILABLE", "upstream ch-file-realm.test sent its token realm to a refused address"
    ),
    challenge("ch-ftp-realm", 502, "UNAVAILABLE", "ftp:// is not allowed"),
    challenge("ch-relative-realm", 502, "UNAVAILABLE", "no host"),
    # Realms on other, private hosts, on routes that do not allow private addresses.
    challenge("ch-second-address-realm", 502, "UNAVAILABLE", "127.0.0.2 is not a public address"),
    challenge("ch-metadata-realm", 502, "UNAVAILABLE", "169.254.169.254 is not a public address"),
    challenge("ch-localhost-realm", 502, "UNAVAILABLE", "localhost is a local name"),
    challenge("ch-userinfo-realm", 502, "UNAVAILABLE", "127.0.0.2 is not a public address"),
    challenge("ch-mapped-realm", 502, "UNAVAILABLE", "is not a public address"),
    # Host names and numeric forms pass the URL check and are refused when resolved.
    # Names that resolve to this machine: refused when resolved, saying so.
    challenge("ch-decimal-realm", 502, "UNAVAILABLE", "address policy"),
    challenge("ch-hostname-realm", 502, "UNAVAILABLE", "address policy", marks=(NEEDS_LOCAL_HOSTNAME,)),
    # The same second address where the route allows private addresses: used.
    challenge("ch-second-address-allowed", 200, None, body=MANIFEST),
    # Token endpoints.
    token("ok", 200, None, body=MANIFEST),
    token("huge-cl", 502, "UNAVAILABLE", "sent an oversized answer"),
    token("huge-close", 502, "UNAVAILABLE", "sent an oversized answer"),
    token("huge-chunked", 502, "UNAVAILABLE", "sent an oversized answer"),
    token("gzip-bomb", 502, "UNAVAILABLE", "sent an oversized answer"),
    token("bad-json", 502, "UNAVAILABLE", "invalid JSON"),
    token("no-token", 502, "UNAVAILABLE", "without a token"),
    token("number-token", 502, "UNAVAILABLE", "without a token"),
    token("array", 502, "UNAVAILABLE", "not an object"),
    token("trickle", 504, "UNAVAILABLE", "did not answer within 2 s", seconds=TOKEN_BOUND),
    token("slow-headers", 504, "UNAVAILABLE", "did not answer within 2 s", seconds=TOKEN_BOUND),
    token("stall", 504, "UNAVAILABLE", "did not answer within 2 s", seconds=TOKEN_BOUND),
    token("status-500", 502, "UNAVAILABLE", "answered 500"),
    token("status-401", 401, "UNAUTHORIZED", "authentication required"),
    token("status-429", 429, "TOOMANYREQUESTS", "rate limiting", headers={"retry-after": "120"}),
    token("redirect", 502, "UNAVAILABLE", "answered 307"),
    token("reset", 502, "UNAVAILABLE", "is unreachable"),
    token("empty-close", 502, "UNAVAILABLE", "is unreachable"),
    # Redirects.
    redirect("redir-self", 502, "UNAVAILABLE", "upstream hostile.test redirected more than 5 times"),
    redirect("redir-ping", 502, "UNAVAILABLE", "redirected more than 5 times"),
    redirect("redir-chain-5", 200, None, body=BLOB),
    redirect("redir-chain-6", 502, "UNAVAILABLE", "redirected more than 5 times"),
    redirect("redir-no-location", 502, "UNAVAILABLE", "answered 307 without Location"),
    redirect("redir-bad-port", 502, "UNAVAILABLE", "invalid port"),
    redirect("redir-file", 502, "UNAVAILABLE", "upstream hostile.test redirected to a refused address"),
    # httpx turns a Location it cannot parse into a protocol error.
    redirect("redir-bad-ipv6", 502, "UNAVAILABLE", "redirected to a refused address"),
    redirect("redir-bad-ipv6", 502, "UNAVAILABLE", "redirected to an invalid URL", route="pass.test"),
    # blob_redirect = "pass": the client gets the redirect, made absolute.
    redirect("redir-chain-5", 307, None, route="pass.test", headers={"location": "{origin}/hops/4/chain"}),
    redirect("redir-metadata", 502, "UNAVAILABLE", f"{ROUTE_REFUSED} redirected {REFUSED}", route="strict.test"),
    redirect("redir-second-address", 502, "UNAVAILABLE", f"{ROUTE_REFUSED} redirected {REFUSED}", route="strict.test"),
    redirect("redir-scheme-relative", 502, "UNAVAILABLE", f"{ROUTE_REFUSED} redirected {REFUSED}", route="strict.test"),
    redirect("redir-userinfo", 502, "UNAVAILABLE", f"{ROUTE_REFUSED} redirected {REFUSED}", route="strict.test"),
    redirect("redir-mapped", 502, "UNAVAILABLE", f"{ROUTE_REFUSED} redirected {REFUSED}", route="strict.test"),
    redirect(
        "redir-decimal",
        502,
        "UNAVAILABLE",
        f"{ROUTE_REFUSED}: refused by the gateway's address policy",
        route="strict.test",
    ),
    redirect(
        "redir-hex",
        502,
        "UNAVAILABLE",
        f"{ROUTE_REFUSED}: refused by the gateway's address policy",
        route="strict.test",
    ),
    redirect(
        "redir-hostname",
        502,
        "UNAVAILABLE",
        f"{ROUTE_REFUSED}: refused by the gateway's address policy",
        route="strict.test",
        marks=(NEEDS_LOCAL_HOSTNAME,),
    ),
    # Manifests.
    manifest("manifest-ok", 200, None, body=MANIFEST),
    manifest("manifest-5mib", 502, "UNAVAILABLE", "sent a manifest larger than 4194304 bytes"),
    manifest("manifest-5mib-chunked", 502, "UNAVAILABLE", "sent a manifest larger than 4194304 bytes"),
    manifest("manifest-trickle", 504, "UNAVAILABLE", "too slow sending a manifest", seconds=MANIFEST_BOUND),
    manifest("manifest-short-close", 502, "UNAVAILABLE", "broke while sending a manifest"),
    manifest("manifest-short-stall", 504, "UNAVAILABLE", "too slow sending a manifest", seconds=MANIFEST_BOUND),
    # Content-Length: 20 and more bytes after them: HTTP says the answer is the first 20.
    manifest("manifest-long-body", 200, None, body=MANIFEST[:20]),
    manifest("manifest-headers-trickle", 504, "UNAVAILABLE", "did not answer within 3 s", seconds=MANIFEST_BOUND),
    # A gzip-encoded manifest is relayed as sent: the gateway does not inflate it.
    manifest("manifest-gzip-bomb", 200, None, body=gzip_bomb(1 << 30), headers={"content-encoding": "gzip"}),
    manifest("headers-huge", 502, "UNAVAILABLE", "broke the exchange"),
    manifest("status-garbage", 502, "UNAVAILABLE", "broke the exchange"),
    manifest("not-http", 502, "UNAVAILABLE", "broke the exchange"),
    manifest("empty-close", 502, "UNAVAILABLE", "broke the exchange"),
    manifest("reset-before-answer", 502, "UNAVAILABLE", "broke the exchange"),
    manifest(
        "manifest-two-phase",
        504,
        "UNAVAILABLE",
        seconds=MANIFEST_BOUND,
    ),
    # A tag list is an answer like a manifest: held to GATEWAY_MANIFEST_TIMEOUT as a whole, then cut.
    Case(
        "tags:tags-trickle",
        on(None, "tags-trickle", "tags/list"),
        200,
        seconds=MANIFEST_BOUND,
        aborted=True,
    ),
    # Error answers: re-encoded as registry JSON, never inflated, never read past 64 KiB.
    manifest("err-html-404", 404, "MANIFEST_UNKNOWN", "upstream hostile.test answered 404 Not Found"),
    manifest("err-bad-json-500", 500, "UNKNOWN", "upstream hostile.test answered 500"),
    manifest("err-registry-404", 404, "MANIFEST_UNKNOWN", "hostile: no such manifest"),
    manifest("err-gzip-bomb-404", 404, "MANIFEST_UNKNOWN", "upstream hostile.test answered 404"),
    manifest("err-deflate-bomb-404", 404, "MANIFEST_UNKNOWN", "upstream hostile.test answered 404"),
    manifest("err-gzip-nested-500", 500, "UNKNOWN", "upstream hostile.test answered 500"),
    manifest("err-huge-404", 404, "MANIFEST_UNKNOWN", "upstream hostile.test answered 404"),
    manifest("err-huge-close-500", 500, "UNKNOWN", "upstream hostile.test answered 500"),
    manifest("err-stall-404", 404, "MANIFEST_UNKNOWN", "answered 404", seconds=IDLE_BOUND),
    manifest(
        "err-trickle-404",
        404,
        "MANIFEST_UNKNOWN",
        "answered 404",
        seconds=MANIFEST_BOUND,
    ),
    # Blobs: streamed as they come; a body the upstream breaks is a cut transfer for the client.
    blob("blob-ok", 200, body=BLOB),
    blob("blob-30g-stall", 200, aborted=True, seconds=IDLE_BOUND, headers={"content-length": str(THIRTY_GB)}),
    blob("blob-30g-close", 200, aborted=True, headers={"content-length": str(THIRTY_GB)}),
    blob("blob-reset", 200, aborted=True),
    blob("blob-chunked-close", 200, aborted=True),
    blob("blob-bad-length", 502, "UNAVAILABLE", "broke the exchange"),
    blob("blob-two-lengths", 502, "UNAVAILABLE", "broke the exchange"),
]

UPSTREAM_500 = {c.path for c in CASES if c.status == 500}


def params(cases: list[Case]) -> list[object]:
    return [
        pytest.param(
            c, id=c.id, marks=[*c.marks, *([pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])]
        )
        for c in cases
    ]


@pytest.fixture(scope="module")
def answers(gateway: Running, client: httpx.Client) -> dict[str, Answer]:
    """Every case at once; each test then judges its own answer."""
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {c.id: pool.submit(fetch, client, gateway.url + c.path, patience=c.seconds + GRACE) for c in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", params(CASES))
def test_what_the_client_sees(case: Case, answers: dict[str, Answer], server: HostileServer) -> None:
    answer = answers[case.id]
    if case.aborted:
        assert answer.error in ABORTED, f"not an aborted transfer: {answer.describe()}"
        assert answer.first_byte is not None, f"nothing was streamed before the end: {answer.describe()}"
        # Streamed as it came, not held until the upstream gave up.
        assert answer.first_byte < FAST, answer.describe()
        if "content-length" in answer.headers:
            assert len(answer.body) < int(answer.headers["content-length"])
    else:
        assert answer.error is None, f"the transfer did not end cleanly: {answer.describe()}"
    assert answer.status == case.status, answer.describe()
    assert answer.elapsed <= case.seconds, f"took {answer.elapsed:.2f}s, allowed {case.seconds}s"
    for name, value in case.headers.items():
        assert answer.headers.get(name) == server.template(value), answer.describe()
    assert "www-authenticate" not in answer.headers  # it would name the upstream's realm
    if case.status >= 400:
        (error,) = registry_errors(answer)
        assert error["code"] == case.code, answer.describe()
        assert case.says in str(error["message"]), answer.describe()
    if case.body is not None:
        assert answer.body == case.body, answer.describe()


def test_refused_realms_and_redirect_targets_are_never_contacted(
    answers: dict[str, Answer], server: HostileServer
) -> None:
    assert [s.target for s in server.seen if "refused" in s.target] == []
    # The second address is reached only where a route allows it (which proves it listens).
    second = [s for s in server.seen if s.local == SECOND_ADDRESS]
    assert [s.target.split("?")[0] for s in second] == ["/token/ok"]
    assert server.connections[SECOND_ADDRESS] == 1


def test_memory_stays_flat_through_bombs_and_huge_bodies(answers: dict[str, Answer], gateway: Running) -> None:
    peak = vm_hwm(gateway.gateway.proc.pid)
    grown = peak - gateway.baseline_hwm
    print(f"\ngateway peak RSS: {gateway.baseline_hwm >> 20} MiB before the cases, {peak >> 20} MiB after")
    assert grown <= MEMORY_SLACK, f"peak RSS grew by {grown >> 20} MiB"


def test_the_bombs_are_real() -> None:
    """The corpus is what it claims: valid streams that inflate to the stated sizes."""
    import gzip
    import zlib

    size = 3 << 20
    assert gzip.decompress(gzip_bomb(size)) == bytes(size)
    assert zlib.decompress(deflate_bomb(size)) == bytes(size)
    assert gzip.decompress(gzip.decompress(nested_gzip_bomb(size))) == bytes(size)
    assert len(gzip_bomb(1 << 30)) < (1100 << 10)  # 1 GiB from about 1 MB
    assert len(nested_gzip_bomb(4 << 30)) < (100 << 10)  # 4 GiB from about 10 KB


def test_a_moved_token_realm_is_learnt_again(gateway: Running, server: HostileServer) -> None:
    base = f"{gateway.url}/v2/realm-move.test/realm-move"
    assert httpx.get(f"{base}/manifests/v1", timeout=10).status_code == 200
    server.realm_moved = True
    try:
        statuses = [httpx.get(f"{base}/sub/manifests/v{i}", timeout=10).status_code for i in range(3)]
    finally:
        server.realm_moved = False
    assert statuses[-1] == 200, f"after the realm moved: {statuses}"


CRASHES = [
    ("redirect-to-bad-idna", "/v2/redir-bad-idna/blobs/" + DIGEST),
    ("passed-redirect-to-bad-idna", "/v2/crash-pass.test/redir-bad-idna/blobs/" + DIGEST),
    ("realm-bad-ipv6", "/v2/ch-bad-ipv6-realm.test/ch-bad-ipv6-realm/manifests/v1"),
    ("realm-bad-idna", "/v2/ch-bad-idna-realm.test/ch-bad-idna-realm/manifests/v1"),
]


def test_a_malformed_tags_link_is_dropped(crash_gateway: Gateway, client: httpx.Client) -> None:
    """The tag list itself is fine; a next link the gateway cannot rewrite is left out, not a crash."""
    answer = fetch(client, crash_gateway.url + "/v2/tags-bad-link/tags/list", patience=FAST + GRACE)
    assert answer.error is None, answer.describe()
    assert answer.status == 200, answer.describe()
    assert "link" not in answer.headers


@pytest.mark.parametrize(("label", "path"), CRASHES, ids=[c[0] for c in CRASHES])
def test_malformed_upstream_urls_are_a_502(label: str, path: str, crash_gateway: Gateway, client: httpx.Client) -> None:
    answer = fetch(client, crash_gateway.url + path, patience=FAST + GRACE)
    assert httpx.get(f"{crash_gateway.url}/healthz", timeout=5).status_code == 200
    assert answer.error is None, answer.describe()
    assert answer.status == 502, answer.describe()
    (error,) = registry_errors(answer)
    assert error["code"] == "UNAVAILABLE"


def test_afterwards_the_gateway_is_healthy_and_left_nothing_behind(
    answers: dict[str, Answer], gateway: Running, server: HostileServer
) -> None:
    assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{gateway.url}/v2/manifest-ok/manifests/latest", timeout=5).status_code == 200
    # Stalled upstream connections are closed by the gateway's timeouts, not left open.
    deadline = time.monotonic() + 10
    while server.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_connections == 0
    assert server.errors == []
    text = gateway.gateway.log.read_text(errors="replace")
    assert "Traceback" not in text
    assert "Exception in ASGI application" not in text
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("event") == "access" and record.get("status") == 500:
            assert record.get("path") in UPSTREAM_500, line  # only where the upstream itself said 500
