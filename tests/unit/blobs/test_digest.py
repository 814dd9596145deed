"""Blob bodies checked while they stream: the hasher, the held-back last chunk, and the relay's answer."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.blobs import digest as digest_module, fetch
from gateway.blobs.digest import HASH_BATCH, DigestMismatch, StreamHasher, Verdict, algorithm_of, verified
from gateway.http.util import Chunk
from gateway.relay import integrity
from gateway.settings import Settings
from tests.unit.conftest import asgi_get, in_process_app
from tests.unit.fake_registry import BLOB, BLOB_DIGEST, REGISTRY, FakeRegistry, response

MIRROR = "https://mirror.test"


async def pieces(chunks: list[bytes], log: list[str] | None = None) -> AsyncIterator[bytes]:
    for index, chunk in enumerate(chunks):
        if log is not None:
            log.append(f"produced {index}")
        yield chunk


async def collect(body: AsyncIterator[Chunk]) -> bytes:
    return b"".join([chunk async for chunk in body])


@pytest.mark.parametrize(
    ("digest", "algorithm"),
    [("sha256:" + "a" * 64, "sha256"), ("sha512:" + "a" * 128, "sha512"), ("blake3:" + "a" * 64, None), ("x", None)],
)
def test_algorithms(digest, algorithm):
    assert algorithm_of(digest) == algorithm


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 3 * HASH_BATCH // 2), min_size=0, max_size=8),
    algorithm=st.sampled_from(["sha256", "sha512"]),
)
def test_the_running_hash_is_the_hash_of_everything_fed(sizes, algorithm):
    data = [bytes([i % 251]) * size for i, size in enumerate(sizes)]

    async def run() -> str:
        hasher = StreamHasher(algorithm)
        for chunk in data:
            await hasher.feed(chunk)
        return await hasher.hexdigest()

    assert asyncio.run(run()) == f"{algorithm}:{hashlib.new(algorithm, b''.join(data)).hexdigest()}"


async def test_batches_shrink_while_many_streams_hash_and_grow_back_after():
    # Memory per checked stream is two batches: with many streams at once, smaller ones (#22: 16
    # checked streams under 100 MiB); a lone stream keeps the batch that costs fewer hand-overs.
    kib = b"x" * 1024
    crowd = [StreamHasher("sha256") for _ in range(digest_module.CROWD)]
    for hasher in crowd:
        await hasher.feed(kib)
    assert digest_module.batch_bytes(len(digest_module._hashing)) == digest_module.CROWDED_BATCH
    jobs = []
    for _ in range(digest_module.CROWDED_BATCH // len(kib)):
        await crowd[0].feed(kib)
        jobs.append(crowd[0]._job is not None)
    assert jobs.index(True) == digest_module.CROWDED_BATCH // len(kib) - 2  # handed over at 512 KiB
    for hasher in crowd[1:]:
        await hasher.hexdigest()
    await crowd[0].aclose()
    assert len(digest_module._hashing) == 0
    assert digest_module.batch_bytes(1) == HASH_BATCH


def test_a_stream_fills_two_batches_before_it_waits_for_the_hash_one_in_a_crowd():
    crowd = digest_module.CROWD
    assert not digest_module.hash_lags(2 * HASH_BATCH - 1, 1)
    assert digest_module.hash_lags(2 * HASH_BATCH, 1)
    assert not digest_module.hash_lags(2 * HASH_BATCH - 1, crowd - 1)
    assert not digest_module.hash_lags(digest_module.CROWDED_BATCH - 1, crowd)
    assert digest_module.hash_lags(digest_module.CROWDED_BATCH, crowd)
    assert digest_module.hash_lags(digest_module.CROWDED_BATCH, 16)


async def test_the_last_chunk_waits_for_the_digest():
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    digest = "sha256:" + hashlib.sha256(b"".join(chunks)).hexdigest()
    log: list[str] = []
    verdict = Verdict()
    async for chunk in verified(pieces(chunks, log), digest, "sha256", verdict):
        log.append(f"sent {bytes(chunk[:1]).decode()}")
    # Each chunk goes out once the next one has come; the last once the digest matched.
    assert log == ["produced 0", "produced 1", "sent a", "produced 2", "sent b", "sent c"]
    assert verdict.actual == digest


async def test_a_wrong_byte_never_reaches_the_end():
    chunks = [BLOB[:1000], BLOB[1000:2000], BLOB[2000:]]
    flipped = [chunks[0], bytes([chunks[1][0] ^ 1]) + chunks[1][1:], chunks[2]]
    sent: list[Chunk] = []
    verdict = Verdict()

    async def relay() -> None:
        async for chunk in verified(pieces(flipped), BLOB_DIGEST, "sha256", verdict):
            sent.append(chunk)

    with pytest.raises(DigestMismatch) as info:
        await relay()
    assert sum(map(len, sent)) < len(BLOB)  # the last chunk was held back
    assert info.value.expected == BLOB_DIGEST
    assert verdict.actual == info.value.actual != BLOB_DIGEST


async def test_an_empty_body_is_checked_too():
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    assert await collect(verified(pieces([]), empty, "sha256")) == b""
    with pytest.raises(DigestMismatch):
        await collect(verified(pieces([]), BLOB_DIGEST, "sha256"))


# --- through the relay ---------------------------------------------------------------------------


def flipping_mirror(fake: FakeRegistry) -> None:
    """mirror.test serves the blob with one byte flipped (and its manifests as the registry does)."""

    def override(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "mirror.test" and "/blobs/" in request.url.path:
            wrong = BLOB[:100] + bytes([BLOB[100] ^ 0xFF]) + BLOB[101:]
            return response(200, wrong, {"content-length": str(len(wrong))})
        return None

    fake.override = override


def mirror_first(**extra: object) -> list[dict[str, object]]:
    return [{"name": "docker.io", "upstream": [MIRROR, REGISTRY], "default": True, "library": True, **extra}]


def sample(metrics: bytes, series: str) -> float:
    for line in metrics.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


class Chunked(httpx.AsyncByteStream):
    """A body in chunks as a socket gives them: the relay sends the first before the last came."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
            await asyncio.sleep(0)


def flipping_mirror_in_chunks(fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """mirror.test serves the blob in 64 KiB chunks, a byte of the last one flipped. The blob (256 KiB)
    is under ``HELD_WHOLE``: the threshold goes to 0 here, as for a blob bigger than it."""
    monkeypatch.setattr(fetch, "HELD_WHOLE", 0)  # where the shared fetch reads it
    monkeypatch.setattr(integrity, "HELD_WHOLE", 0)  # where a blob relayed alone is checked

    def override(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "mirror.test" and "/blobs/" in request.url.path:
            wrong = BLOB[:-100] + bytes([BLOB[-100] ^ 0xFF]) + BLOB[-99:]
            chunks = [wrong[i : i + 65536] for i in range(0, len(wrong), 65536)]
            return httpx.Response(200, headers={"content-length": str(len(wrong))}, stream=Chunked(chunks))
        return None

    fake.override = override


@pytest.mark.parametrize("sharing", [True, False])
async def test_a_mismatch_before_any_byte_was_sent_is_asked_of_the_next_upstream(fake, sharing):
    # The blob comes in one piece: held whole until checked, so the client has none of the wrong bytes.
    flipping_mirror(fake)
    app = in_process_app(
        fake, mirror_first(), Settings(manifest_cache_bytes=0, shared_window_bytes=(128 << 20) if sharing else 0)
    )
    _, before, _ = await asgi_get(app, "/metrics")
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (status, complete) == (200, True)
    assert body == BLOB  # the registry's, asked for all of it
    blob_requests = [(r.url.host, r.headers.get("range")) for r in fake.requests if "/blobs/" in r.url.path]
    assert ("mirror.test", None) in blob_requests
    assert blob_requests[-1][1] == f"bytes=0-{len(BLOB) - 1}"
    _, metrics, _ = await asgi_get(app, "/metrics")
    mismatches = 'registry_gateway_digest_mismatch_total{route="docker.io",upstream="https://mirror.test"}'
    checks = 'registry_gateway_blob_checks_total{result="ok",route="docker.io"}'
    assert sample(metrics, mismatches) - sample(before, mismatches) == 1
    assert sample(metrics, checks) - sample(before, checks) == 1


@pytest.mark.parametrize("sharing", [True, False])
async def test_a_mismatch_after_bytes_were_sent_aborts_and_the_retry_goes_to_the_next_upstream(
    fake, sharing, monkeypatch
):
    flipping_mirror_in_chunks(fake, monkeypatch)
    app = in_process_app(
        fake, mirror_first(), Settings(manifest_cache_bytes=0, shared_window_bytes=(128 << 20) if sharing else 0)
    )
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert status == 200
    assert not complete  # aborted: never a clean end of wrong bytes
    assert 0 < len(body) < len(BLOB)
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (status, complete) == (200, True)
    assert body == BLOB  # the registry, not the mirror that served it wrong
    mirror_blobs = [r for r in fake.requests if r.url.host == "mirror.test" and "/blobs/" in r.url.path]
    assert len(mirror_blobs) == 1


async def test_a_mismatch_is_counted_and_logged(fake, caplog, monkeypatch):
    flipping_mirror_in_chunks(fake, monkeypatch)
    app = in_process_app(fake, mirror_first())
    with caplog.at_level("WARNING", logger="gateway.integrity"):
        await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    (record,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "digest_mismatch"]
    fields = record.fields
    assert (fields["digest"], fields["upstream"]) == (BLOB_DIGEST, MIRROR)
    assert fields["actual"].startswith("sha256:")
    _, metrics, _ = await asgi_get(app, "/metrics")
    assert b'registry_gateway_digest_mismatch_total{route="docker.io",upstream="https://mirror.test"}' in metrics
    assert b'registry_gateway_blob_checks_total{result="mismatch",route="docker.io"}' in metrics


async def test_verify_blobs_off_relays_what_comes(fake):
    flipping_mirror(fake)
    app = in_process_app(fake, mirror_first(verify_blobs=False))
    status, body, complete = await asgi_get(app, f"/v2/alpine/blobs/{BLOB_DIGEST}")
    assert (status, complete) == (200, True)
    assert body != BLOB
    assert len(body) == len(BLOB)


async def test_ranges_and_heads_are_relayed_unchecked(fake):
    app = in_process_app(fake, mirror_first(), Settings(manifest_cache_bytes=0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.test") as client:
        part = await client.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", headers={"range": "bytes=10-19"})
        assert (part.status_code, part.content) == (206, BLOB[10:20])
        head = await client.head(f"/v2/alpine/blobs/{BLOB_DIGEST}")
        assert head.status_code == 200
