"""dockerd pulls Docker Hub images through the gateway configured as its registry mirror."""

from __future__ import annotations

import json

import pytest

from tests.e2e.clients import Dockerd
from tests.support import Gateway
from tests.testbed.bed import Testbed


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("alpine:3.20", "alpine"),
        ("busybox:1.36", "busybox"),
        ("someorg/tool:1.0", "tool"),
        ("library/alpine", "alpine"),
    ],
)
def test_registry_mirror_pull(dockerd: Dockerd, gateway: Gateway, testbed: Testbed, ref, key):
    dockerd.docker("pull", ref)
    image = testbed.images[key]
    name = ref.split(":")[0].removeprefix("library/")
    assert f"{name}@{image.digest}" in dockerd.repo_digests(ref if ":" in ref else f"{ref}:latest")
    # It came through the gateway (dockerd falls back to Docker Hub, through a closed proxy, otherwise).
    lines = [json.loads(line) for line in gateway.log_lines() if '"event":"access"' in line]
    assert any(r.get("repository") == image.repo and r.get("kind") == "blob" for r in lines)
    dockerd.docker("image", "rm", ref)


def test_direct_pull_by_host_name(dockerd: Dockerd, gateway: Gateway, testbed: Testbed):
    """`docker pull ghcr.example.com/org/app` style: the gateway's host name is the registry."""
    ref = f"ghcr.gw.test:{gateway.port}/org/app:v1"
    dockerd.docker("pull", ref)
    assert f"ghcr.gw.test:{gateway.port}/org/app@{testbed.images['app'].digest}" in dockerd.repo_digests(ref)
    dockerd.docker("image", "rm", ref)
