"""Broken blob bodies resumed: the range arithmetic, the loop, and the relay over a fake that breaks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.blobs.resume import Breaks, NotTheRest, Segment, continues, parse_content_range, resumable, segment_of
from gateway.settings import Settings
from tests.unit.conftest import asgi_get, in_process_app
from tests.unit.fake_registry import BLOB, BLOB_DIGEST, REGISTRY, FakeRegistry, response

MIRROR = "https://mirror.test"


@pytest.mark.parametrize(
    ("value", "segment"),
    [
        ("bytes 0-9/10", Segment(0, 9, 10)),
        ("bytes 5-9/*", Segment(5, 9, None)),
        ("bytes  5-9/10", Segment(5, 9, 10)),
        ("bytes 9-5/10", None),  # last before first
        ("bytes 0-10/10", None),  # past the end
        ("bytes */10", None),  # an unsatisfied range: nothing to continue
        ("items 0-9/10", None),
        ("bytes 0-9", None),
        ("bytes -1-9/10", None),
    ],
)
def test_content_range(value, segment):
    assert parse_content_range(value) == segment


def test_what_can_be_resumed():
    assert segment_of(200, httpx.Headers({"content-length": "10"})) == Segment(0, 9, 10)
    assert segment_of(200, httpx.Headers({})) is None  # no length: where would the rest end?
    assert segment_of(200, httpx.Headers({"content-length": "0"})) is None
    assert segment_of(206, httpx.Headers({"content-range": "bytes 2-5/10"})) == Segment(2, 5, 10)
    assert segment_of(206, httpx.Headers({})) is None
    assert Segment(2, 5, 10).rest_from(3) == "bytes=5-5"


@pytest.mark.parametrize(
    ("status", "content_range", "ok"),
    [
        (206, "bytes 4-9/10", True),
        (206, "bytes 4-9/*", True),
        (200, None, False),  # the whole blob again: not a continuation
        (206, "bytes 3-9/10", False),
        (206, "bytes 4-8/10", False),
        (206, "bytes 4-9/11", False),  # another blob's length
    ],
)
def test_a_resume_must_be_exactly_the_rest(status, content_range, ok):
    headers = httpx.Headers({"content-range": content_range} if content_range else {})
    assert continues(Segment(0, 9, 10), 4, status, headers) is ok


async def breaking(data: bytes, at: int) -> AsyncIterator[bytes]:
    yield data[:at]
    raise httpx.ReadError("reset")


async def test_the_loop_continues_from_each_break_and_stops_after_the_last_resume():
    data = bytes(range(100))
    offsets: list[int] = []

    async def reopen(sent: int) -> AsyncIterator[bytes]:
        offsets.append(sent)
        rest = data[sent:]
        return breaking(rest, 10) if sent < 50 else _whole(rest)

    out = b"".join([c async for c in resumable(breaking(data, 10), Segment(0, 99, 100), reopen, max_resumes=5)])
    assert out == data
    assert offsets == [10, 20, 30, 40, 50]
    offsets.clear()
    with pytest.raises(httpx.ReadError):
        async for _ in resumable(breaking(data, 10), Segment(0, 99, 100), reopen, max_resumes=2):
            pass
    assert offsets == [10, 20]


async def _whole(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_refused_resume_ends_with_the_original_break():
    async def reopen(sent: int) -> AsyncIterator[bytes]:
        raise RuntimeError("206 expected")

    with pytest.raises(httpx.ReadError) as info:
        async for _ in resumable(breaking(b"x" * 10, 5), Segment(0, 9, 10), reopen, max_resumes=3):
            pass
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_an_answer_that_is_not_the_rest_is_a_break_and_asked_again():
    data = bytes(range(100))
    told: list[tuple[int, str, bool]] = []
    answers = iter(["refused", "refused", "rest"])

    async def reopen(sent: int) -> AsyncIterator[bytes]:
        if next(answers) == "refused":
            raise NotTheRest("a 200")
        return _whole(data[sent:])

    def on_break(sent: int, error: BaseException, resumed: bool) -> None:
        told.append((sent, type(error).__name__, resumed))

    got = resumable(breaking(data, 10), Segment(0, 99, 100), reopen, max_resumes=3, on_break=on_break)
    assert b"".join([c async for c in got]) == data
    assert told == [(10, "ReadError", True), (10, "NotTheRest", True), (10, "NotTheRest", True)]
    told.clear()
    answers = iter(["refused"] * 5)
    with pytest.raises(httpx.ReadError):  # the first failure, not the refusals after it
        async for _ in resumable(breaking(data, 10), Segment(0, 99, 100), reopen, max_resumes=2, on_break=on_break):
            pass
    assert told == [(10, "ReadError", True), (10, "NotTheRest", True), (10, "NotTheRest", False)]


def test_a_source_is_asked_once_more_then_passed_over_until_every_one_failed():
    sources = ("https://mirror", "https://a", "https://b")
    breaks = Breaks(same_source=1)
    assert breaks.broke("https://a") is False  # asked once more
    assert breaks.excluded(sources) == frozenset()
    assert breaks.broke("https://a") is True  # broke again: passed over
    assert breaks.excluded(sources) == {"https://a"}
    assert breaks.broke("https://a") is False  # already passed over: said once
    assert breaks.broke("https://b") is False
    assert breaks.broke("https://b") is True
    assert breaks.broke("https://mirror") is False
    assert breaks.broke("https://mirror") is True
    assert breaks.excluded(sources) == frozenset()  # every one failed: each may be asked again
    assert breaks.passed_over == ["https://a", "https://b", "https://mirror"]
    assert Breaks(same_source=0).broke("https://a") is True  # the next source at the first break


# --- through the relay -------------------------------------------------------------------------


class BreakingStream(httpx.AsyncByteStream):
    def __init__(self, data: bytes, at: int) -> None:
        self.data, self.at = data, at

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: self.at]
        raise httpx.ReadError("connection reset by peer")


def break_first_whole_pull(fake: FakeRegistry, host: str, at: int, times: int = 1) -> list[httpx.Request]:
    """The first ``times`` whole (non-Range) blob GETs to ``host`` break after ``at`` bytes."""
    broken: list[httpx.Request] = []

    def override(request: httpx.Request) -> httpx.Response | None:
        whole = "/blobs/" in request.url.path and "range" not in request.headers
        # Registries answer only once the token is there (the fake challenges the first try).
        authorized = host == "cdn.test" or "authorization" in request.headers
        if request.url.host == host and whole and authorized and len(broken) < times:
            broken.append(request)
            return httpx.Response(200, headers={"content-length": str(len(BLOB))}, stream=BreakingStream(BLOB, at))
        return None

    fake.override = override
    return broken


ROUTE = [{"name": "docker.io", "upstream": REGISTRY, "default": True, "library": True}]


async def test_a_reset_mid_blob_is_resumed_without_a_seam(fake):
    fake.redirect_blobs = False
    broken = break_first_whole_pull(fake, "registry.test", at=100_000)
    app = in_process_app(fake, ROUTE)
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (status, complete) == (200, True)
    assert body == BLOB  # byte for byte, and the digest check spanned the resume
    assert len(broken) == 1
    resumes = [r for r in fake.seen(REGISTRY) if "/blobs/" in r.url.path and "range" in r.headers]
    assert [r.headers["range"] for r in resumes] == [f"bytes=100000-{len(BLOB) - 1}"]
    _, metrics, _ = await asgi_get(app, "/metrics")
    assert b'registry_gateway_blob_resumes_total{route="docker.io"}' in metrics


async def test_a_resume_goes_through_the_redirect_again(fake):
    # The CDN breaks the first transfer: the rest is asked of the registry, which redirects anew.
    break_first_whole_pull(fake, "cdn.test", at=50_000)
    app = in_process_app(fake, ROUTE)
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (status, body, complete) == (200, BLOB, True)
    registry_blob_gets = [r for r in fake.seen(REGISTRY) if "/blobs/" in r.url.path and "authorization" in r.headers]
    assert len(registry_blob_gets) == 2  # the pull, then the resume: a fresh redirect each
    cdn_ranges = [r.headers.get("range") for r in fake.seen("https://cdn.test")]
    assert cdn_ranges == [None, f"bytes=50000-{len(BLOB) - 1}"]


async def test_a_client_range_resumes_from_its_own_offset(fake):
    fake.redirect_blobs = False

    def override(request: httpx.Request) -> httpx.Response | None:
        if request.headers.get("range") == "bytes=1000-199999" and "authorization" in request.headers:
            part = BLOB[1000:200_000]
            headers = {"content-range": f"bytes 1000-199999/{len(BLOB)}", "content-length": str(len(part))}
            return httpx.Response(206, headers=headers, stream=BreakingStream(part, 5000))
        return None

    fake.override = override
    app = in_process_app(fake, ROUTE)
    scope_headers = {"range": "bytes=1000-199999"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.test") as client:
        resp = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", headers=scope_headers)
    assert resp.status_code == 206
    assert resp.content == BLOB[1000:200_000]
    assert [r.headers.get("range") for r in fake.seen(REGISTRY) if "authorization" in r.headers] == [
        "bytes=1000-199999",
        "bytes=6000-199999",
    ]


async def test_when_every_resume_breaks_the_client_is_aborted(fake):
    fake.redirect_blobs = False

    def override(request: httpx.Request) -> httpx.Response | None:
        if "/blobs/" in request.url.path and "authorization" in request.headers:
            if "range" in request.headers:
                start = int(request.headers["range"][6:].split("-")[0])
                part = BLOB[start:]
                headers = {"content-range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"}
                return httpx.Response(206, headers=headers, stream=BreakingStream(part, 1000))
            return httpx.Response(200, headers={"content-length": str(len(BLOB))}, stream=BreakingStream(BLOB, 1000))
        return None

    fake.override = override
    app = in_process_app(fake, ROUTE, Settings(manifest_cache_bytes=0, blob_resumes=2))
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (status, complete) == (200, False)  # aborted: never a clean short body
    assert body == BLOB[: len(body)]
    assert len(body) < 3000  # three pieces came; the digest check held back the last
    assert len([r for r in fake.seen(REGISTRY) if "/blobs/" in r.url.path and "authorization" in r.headers]) == 3


async def test_a_200_to_a_resume_is_not_spliced_in(fake):
    fake.redirect_blobs = False
    break_first_whole_pull(fake, "registry.test", at=10_000)

    def ignore_ranges(request: httpx.Request) -> httpx.Response | None:
        if "/blobs/" in request.url.path and "range" in request.headers and "authorization" in request.headers:
            return response(200, BLOB, {"content-length": str(len(BLOB))})  # ignores Range
        return first(request)

    first = fake.override
    assert first is not None
    fake.override = ignore_ranges
    app = in_process_app(fake, ROUTE)
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (status, complete) == (200, False)
    assert body == BLOB[: len(body)]  # what came before the break, nothing of the 200 spliced in
    assert len(body) <= 10_000
