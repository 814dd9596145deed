"""Mirrors for bytes, the registry for names (issue 10): proven with the real test bed and real clients.

A route's ``mirrors`` entry is a ``FaultFront`` before the very registry the route names as its
``upstream``: it holds the same content, so it is an honest mirror, and it counts what it is asked.
For Docker Hub the mirror's blob redirects are pointed at a second front before the CDN, which
counts (and can corrupt) the blob bytes the mirror serves; the upstream's own redirects go to the
CDN directly, so every byte that crosses the CDN front came through the mirror.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from tests.e2e.clients import Containerd, Skopeo, verify_dir_copy
from tests.e2e.test_integrity import PLATFORM, blob_gets, log_events, metric
from tests.support import Gateway, free_port, run_gateway, wait_for
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront, FrontRequest
from tests.testbed.images import Image
from tests.testbed.tokens import PRIVATE_USER, TokenServer

pytestmark = pytest.mark.e2e

DIGEST = r"sha256:[0-9a-f]{64}"
# What a mirror may ever be asked: content named by its digest, and nothing else.
BY_DIGEST = re.compile(rf"/v2/(?P<repo>.+)/(?P<kind>blobs|manifests)/(?P<digest>{DIGEST})")

StartGateway = Callable[..., Gateway]


@dataclass(frozen=True)
class HubMirror:
    mirror: FaultFront  # before the hub registry: the route's mirror
    cdn: FaultFront  # before the CDN: where the mirror's blob redirects lead


@pytest.fixture
def fronts() -> Iterator[Callable[..., FaultFront]]:
    with ExitStack() as stack:

        def make(target: str, rewrite_location: tuple[str, str] | None = None) -> FaultFront:
            return stack.enter_context(FaultFront(target, rewrite_location=rewrite_location))

        yield make


@pytest.fixture
def hub_mirror(testbed: Testbed, fronts: Callable[..., FaultFront]) -> HubMirror:
    cdn = fronts(testbed.cdn_url)
    return HubMirror(fronts(testbed.hub.registry_url, rewrite_location=(testbed.cdn_url, cdn.url)), cdn)


@pytest.fixture
def start_gateway(testbed: Testbed, tmp_path: Path) -> Iterator[StartGateway]:
    with ExitStack() as stack:

        def start(route: str, upstream: str, mirrors: list[str], *, credentials: bool = False) -> Gateway:
            listed = ", ".join(f'"{m}"' for m in mirrors)
            routes = (
                f'[[route]]\nname = "{route}"\nupstream = "{upstream}"\nmirrors = [{listed}]\n'
                "allow_private_addresses = true\ndefault = true\n"
            )
            env: dict[str, str] = {}
            if route == "docker.io":
                routes += "library = true\n"
            if credentials:
                routes += 'username_env = "E2E_GHCR_USER"\npassword_env = "E2E_GHCR_PASS"\n'
                env = {"E2E_GHCR_USER": testbed.credentials.username, "E2E_GHCR_PASS": testbed.credentials.password}
            return stack.enter_context(run_gateway(routes, tmp_path / f"gateway-{route}", env=env))

        yield start


# ---------------------------------------------------------------------- reading what happened
def by_digest(requests: list[FrontRequest], kind: str, statuses: tuple[int, ...]) -> set[str]:
    """The digests of the ``kind`` ("blobs", "manifests") requests answered with ``statuses``."""
    return {
        match["digest"]
        for r in requests
        if (match := BY_DIGEST.fullmatch(r.target)) and match["kind"] == kind and r.status in statuses
    }


def accesses(gw: Gateway) -> list[dict]:
    return [a for a in log_events(gw, "access") if a["path"].startswith("/v2/") and a["path"] != "/v2/"]


def client_asked(gw: Gateway, kind: str) -> set[str]:
    """The digests the client asked the gateway for: blobs, or manifests by digest."""
    return {m["digest"] for a in accesses(gw) if (m := BY_DIGEST.fullmatch(a["path"])) and m["kind"] == kind}


def names(gw: Gateway) -> list[dict]:
    """The client's requests that name no digest: manifests by tag, tag lists."""
    return [a for a in accesses(gw) if BY_DIGEST.fullmatch(a["path"]) is None]


def skopeo_copy(skopeo: Skopeo, gw: Gateway, image: Image, dest: Path, *extra: str) -> None:
    verify_dir_copy(skopeo.copy_all(f"127.0.0.1:{gw.port}/{image.repo}:{image.tag}", dest, *extra), image)


# ---------------------------------------------------------------------- bytes from the mirror, names from the registry
@pytest.mark.parametrize("client", ["skopeo", "containerd"])
def test_content_by_digest_from_the_mirror_tags_from_the_registry(
    request: pytest.FixtureRequest,
    testbed: Testbed,
    hub_mirror: HubMirror,
    start_gateway: StartGateway,
    tmp_path: Path,
    client: str,
) -> None:
    image = testbed.images["alpine"]  # an OCI index of two platforms, tags 3.20 and latest
    mirror, cdn = hub_mirror.mirror, hub_mirror.cdn
    gw = start_gateway("docker.io", testbed.hub.url, [mirror.url])

    if client == "skopeo":
        skopeo: Skopeo = request.getfixturevalue("skopeo")
        skopeo_copy(skopeo, gw, image, tmp_path / "copy")
        listed = skopeo("list-tags", "--tls-verify=false", f"docker://127.0.0.1:{gw.port}/{image.repo}")
        assert {"3.20", "latest"} <= set(json.loads(listed.stdout)["Tags"])
        expected_blobs = set(image.blobs)
        expected_manifests = set(image.manifests) - {image.digest}  # the children; the index came by tag
    else:
        containerd: Containerd = request.getfixturevalue("containerd")
        containerd.remove_all()
        ref = f"docker.io/{image.repo}:{image.tag}"
        try:
            containerd.pull(ref, containerd.hosts_dir({"docker.io": gw.url}))
            assert containerd.image_digest(ref) == image.digest
            assert set(image.layers[PLATFORM]) <= set(containerd.ctr("content", "ls", "-q").stdout.split())
        finally:
            containerd.remove_all()
        # ctr pulls the machine's platform: its config and layers.
        child = json.loads(image.manifests[image.platform_digest(PLATFORM)][1])
        expected_blobs = {child["config"]["digest"], *image.layers[PLATFORM]}
        expected_manifests = {image.digest, image.platform_digest(PLATFORM)}  # ctr HEADs the tag, GETs by digest

    assert wait_for(lambda: client_asked(gw, "blobs") == expected_blobs)
    client_manifests = client_asked(gw, "manifests")
    assert client_manifests == expected_manifests

    # The mirror was asked for content named by a digest, and for nothing else (no tag, no tag list).
    seen = mirror.requests
    assert seen
    stray = [r.target for r in seen if BY_DIGEST.fullmatch(r.target) is None]
    assert stray == []
    # Every blob through the mirror: its redirect, then its bytes, whole, through the CDN front.
    assert by_digest(seen, "blobs", (307,)) == expected_blobs
    for digest in expected_blobs:
        assert [(r.status, r.body_bytes) for r in cdn.requests_for(digest)] == [(200, image.blobs[digest])]
    # Every manifest the client asked for by digest came from the mirror.
    assert by_digest(seen, "manifests", (200,)) == client_manifests

    # The names came from the registry: the tag's manifest (HEAD or GET), the tag list.
    named = names(gw)
    assert any(f"/manifests/{image.tag}" in a["path"] for a in named)
    if client == "skopeo":
        assert any(a["path"].endswith("/tags/list") for a in named)
    assert {a["upstream"] for a in named} == {testbed.hub.url}
    digest_lines = [a for a in accesses(gw) if BY_DIGEST.fullmatch(a["path"]) and a.get("upstream")]
    assert {a["upstream"] for a in digest_lines} == {mirror.url}
    for digest in expected_blobs:
        assert [(g["status"], g["verified"]) for g in blob_gets(gw, digest)] == [(200, "ok")]


def test_credentials_never_reach_the_mirror(
    testbed: Testbed,
    fronts: Callable[..., FaultFront],
    start_gateway: StartGateway,
    skopeo: Skopeo,
    token_stats: TokenServer,
    tmp_path: Path,
) -> None:
    """ghcr with the route's credentials: the mirror gets anonymous tokens only, so it serves the public
    image and refuses the private one, which the registry then serves with the credentials."""
    public, private = testbed.images["app"], testbed.images["secret-app"]
    mirror = fronts(testbed.ghcr.registry_url)
    gw = start_gateway("ghcr.io", testbed.ghcr.registry_url, [mirror.url], credentials=True)

    skopeo_copy(skopeo, gw, public, tmp_path / "public")
    skopeo_copy(skopeo, gw, private, tmp_path / "private")

    seen = mirror.requests
    assert [r.target for r in seen if BY_DIGEST.fullmatch(r.target) is None] == []
    # The public image's content all came from the mirror ...
    assert by_digest(seen, "blobs", (200,)) == set(public.blobs)
    assert by_digest(seen, "manifests", (200,)) == set(public.manifests) - {public.digest}
    # ... the private image's never did: the mirror was asked anonymously and refused.
    private_asked = [r for r in seen if f"/v2/{private.repo}/" in r.target]
    assert private_asked
    assert {r.status for r in private_asked} == {401}
    assert wait_for(lambda: all(blob_gets(gw, d) for d in private.blobs))
    for digest in private.blobs:
        assert [(g["upstream"], g["verified"]) for g in blob_gets(gw, digest)] == [(testbed.ghcr.registry_url, "ok")]

    # No request the mirror saw carried credentials, or a token bought with them.
    authorizations = [r.authorization for r in seen if r.authorization is not None]
    assert authorizations  # the mirror's challenges were answered, with tokens
    assert all(a.startswith("Bearer ") for a in authorizations)
    subjects = {jwt.decode(a[7:], options={"verify_signature": False})["sub"] for a in authorizations}
    assert subjects == {""}
    # The credentials were used, for the registry: the private image's token was bought with them.
    assert any(r.account == PRIVATE_USER and any(private.repo in s for s in r.scopes) for r in token_stats.requests)


# ---------------------------------------------------------------------- a mirror that lies, a mirror that is gone
def test_mirror_serving_a_wrong_byte_is_passed_over(
    testbed: Testbed,
    hub_mirror: HubMirror,
    start_gateway: StartGateway,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    image = testbed.images["alpine"]
    layer = image.layers[PLATFORM][0]
    size = image.blobs[layer]
    mirror, cdn = hub_mirror.mirror, hub_mirror.cdn
    cdn.fault(layer, "flip", at=size // 2, times=None)  # the mirror's copy of one layer is wrong, always
    gw = start_gateway("docker.io", testbed.hub.url, [mirror.url])

    # The layer is held whole until checked: none of the mirror's wrong bytes reached skopeo, and
    # the gateway asked the registry for it itself. One copy, intact.
    skopeo_copy(skopeo, gw, image, tmp_path / "first")  # every blob checked by digest

    assert wait_for(lambda: len(blob_gets(gw, layer)) == 1)
    [line] = blob_gets(gw, layer)
    assert (line["upstream"], line["verified"], line["bytes"], line["share"]) == (
        testbed.hub.url,
        "ok",
        size,
        "detached",
    )
    # The mirror was asked for the layer once (its redirect), its bytes crossed once, all of them, one flipped.
    assert [r.status for r in mirror.requests if layer in r.target] == [307]
    assert [(r.status, r.fault, r.body_bytes) for r in cdn.requests_for(layer)] == [(200, "flip", size)]
    [mismatch] = log_events(gw, "digest_mismatch")
    assert (mismatch["digest"], mismatch["upstream"]) == (layer, mirror.url)
    assert metric(gw, "registry_gateway_digest_mismatch_total", upstream=mirror.url) == 1
    # The other blobs still came from the mirror.
    assert by_digest(mirror.requests, "blobs", (307,)) == set(image.blobs)


def test_dead_mirror_pulls_come_from_the_registry(
    testbed: Testbed, start_gateway: StartGateway, skopeo: Skopeo, tmp_path: Path
) -> None:
    image = testbed.images["alpine"]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = start_gateway("docker.io", testbed.hub.url, [dead])

    skopeo_copy(skopeo, gw, image, tmp_path / "copy")

    assert wait_for(lambda: client_asked(gw, "blobs") == set(image.blobs))
    for digest in image.blobs:
        assert [(g["upstream"], g["verified"]) for g in blob_gets(gw, digest)] == [(testbed.hub.url, "ok")]
    served = {a["upstream"] for a in accesses(gw) if a.get("upstream")}
    assert served == {testbed.hub.url}
