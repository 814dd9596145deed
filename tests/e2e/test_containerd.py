"""containerd (ctr) pulls through the gateway as a hosts.toml mirror: by ns= and by override_path."""

from __future__ import annotations

import json

import pytest

from tests.e2e.clients import Containerd
from tests.support import Gateway
from tests.testbed.bed import Testbed


@pytest.fixture
def clean(containerd: Containerd):
    yield containerd
    containerd.remove_all()


def access_lines(gateway: Gateway) -> list[dict]:
    return [json.loads(line) for line in gateway.log_lines() if '"event":"access"' in line]


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("docker.io/library/alpine:3.20", "alpine"),
        ("docker.io/library/busybox:1.36", "busybox"),
        ("docker.io/someorg/tool:1.0", "tool"),
        ("ghcr.io/org/app:v1", "app"),
        ("ghcr.io/private/secret-app:v1", "secret-app"),
        ("quay.io/coreos/etcd:v3.5", "etcd"),
    ],
)
def test_mirror_with_ns(clean: Containerd, gateway: Gateway, testbed: Testbed, ref, key):
    """The mirror is the bare gateway; containerd adds ?ns=<registry> and the gateway routes on it."""
    registry = ref.split("/", 1)[0]
    hosts = clean.hosts_dir({registry: gateway.url})
    seen_before = len(access_lines(gateway))
    clean.pull(ref, hosts)
    assert clean.image_digest(ref) == testbed.images[key].digest
    # containerd verified every blob's digest while writing it; the platform's layers are all there.
    content = clean.ctr("content", "ls", "-q").stdout.split()
    image = testbed.images[key]
    for layer in image.layers.get("linux/amd64", []):
        assert layer in content
    requests = access_lines(gateway)[seen_before:]
    assert requests
    assert {(r["route"], r["repository"]) for r in requests} == {(registry, image.repo)}


@pytest.mark.parametrize(
    ("ref", "key", "mirror"),
    [
        ("quay.io/coreos/etcd:v3.5", "etcd", "{gw}/v2/quay.io"),
        ("ghcr.io/org/app:v1", "app", "{gw}/v2/ghcr.io"),
        ("docker.io/library/alpine:3.20", "alpine", "{gw}/v2/docker.io"),
    ],
)
def test_mirror_with_override_path(clean: Containerd, gateway: Gateway, testbed: Testbed, ref, key, mirror):
    registry = ref.split("/", 1)[0]
    hosts = clean.hosts_dir({registry: mirror.format(gw=gateway.url)})
    clean.pull(ref, hosts)
    assert clean.image_digest(ref) == testbed.images[key].digest


def test_all_platforms(clean: Containerd, gateway: Gateway, testbed: Testbed):
    hosts = clean.hosts_dir({"ghcr.io": gateway.url})
    clean.pull("ghcr.io/org/app:v1", hosts, "--all-platforms")
    content = set(clean.ctr("content", "ls", "-q").stdout.split())
    image = testbed.images["app"]
    assert set(image.blobs) | set(image.manifests) <= content
