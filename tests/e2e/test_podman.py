"""podman pulls through the gateway as a registries.conf mirror, including a mirror location with a path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.clients import CLOSED, Podman
from tests.support import Gateway
from tests.testbed.bed import Testbed


@pytest.fixture
def registries_conf(tmp_path: Path, gateway: Gateway) -> Path:
    p = gateway.port
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f"""
[[registry]]
prefix = "docker.io"
location = "{CLOSED}"
[[registry.mirror]]
location = "127.0.0.1:{p}"
insecure = true

[[registry]]
prefix = "quay.io"
location = "{CLOSED}"
[[registry.mirror]]
location = "gw.test:{p}/quay.io"
insecure = true

[[registry]]
prefix = "ghcr.io"
location = "{CLOSED}"
[[registry.mirror]]
location = "ghcr.gw.test:{p}"
insecure = true
"""
    )
    return conf


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("docker.io/library/alpine:3.20", "alpine"),
        ("docker.io/library/busybox:1.36", "busybox"),
        ("quay.io/coreos/etcd:v3.5", "etcd"),
        ("ghcr.io/org/app:v1", "app"),
    ],
)
def test_mirror_pull(podman: Podman, registries_conf: Path, testbed: Testbed, ref, key):
    podman("pull", ref, registries_conf=registries_conf)
    assert podman.digest(ref, registries_conf) == testbed.images[key].digest
    podman("rmi", ref, registries_conf=registries_conf)
