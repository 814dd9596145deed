"""End-to-end fixtures: the test bed's real registries, the gateway as a real process, real clients."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.clients import Containerd, Dockerd, Podman, Skopeo, start_containerd, start_dockerd, write_hosts_file
from tests.e2e.guides import adapt, example
from tests.support import Gateway, run_gateway
from tests.testbed.bed import Testbed


def gateway_routes(testbed: Testbed) -> str:
    """The gateway's routes.toml for the test bed: the real registry names, mapped to the bed."""
    return f"""
[[route]]
name = "docker.io"
upstream = "{testbed.hub.url}"
allow_private_addresses = true  # the bed lives on 127.0.0.1
hosts = ["docker.*"]
default = true
library = true

[[route]]
name = "ghcr.io"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
hosts = ["ghcr.*"]
username_env = "E2E_GHCR_USER"
password_env = "E2E_GHCR_PASS"

[[route]]
name = "quay.io"
upstream = "{testbed.quay.url}"
allow_private_addresses = true
hosts = ["quay.*"]

# The ghcr-like registry again, without credentials: private images stay private.
[[route]]
name = "anon-ghcr.test"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
hosts = ["anon.*"]

# The ghcr-like registry once more, passing the clients' own logins through.
[[route]]
name = "login-ghcr.test"
upstream = "{testbed.ghcr.url}"
hosts = ["login.*"]
auth = "passthrough"
allow_private_addresses = true

# Docker-Hub-like, but handing blob redirects to the client.
[[route]]
name = "pass-hub.test"
upstream = "{testbed.hub.url}"
allow_private_addresses = true  # the bed lives on 127.0.0.1
hosts = ["pass.*"]
library = true
blob_redirect = "pass"
"""


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/test installs them)")


@pytest.fixture(scope="session")
def gateway(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {"E2E_GHCR_USER": testbed.credentials.username, "E2E_GHCR_PASS": testbed.credentials.password}
    with run_gateway(gateway_routes(testbed), tmp_path_factory.mktemp("gateway"), env=env) as gw:
        yield gw


@pytest.fixture(scope="session")
def hosts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hosts_file(tmp_path_factory.mktemp("hosts") / "hosts")


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory: pytest.TempPathFactory, hosts_file: Path) -> Skopeo:
    require("skopeo", "unshare")
    return Skopeo(tmp_path_factory.mktemp("skopeo"), hosts_file)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    require("containerd", "ctr")
    with start_containerd(tmp_path_factory.mktemp("containerd")) as c:
        yield c


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory, hosts_file: Path, gateway: Gateway) -> Iterator[Dockerd]:
    require("dockerd", "docker", "unshare")
    # The guide's daemon.json, pointed at the test gateway (tests/e2e/test_client_guides.py).
    documented = json.loads(example("docker-daemon-json"))
    config = {
        "registry-mirrors": [adapt(m, gateway.port) for m in documented["registry-mirrors"]],
        # Plain HTTP to anything on loopback: the session gateway and the ones tests start.
        "insecure-registries": ["127.0.0.0/8"],
    }
    with start_dockerd(tmp_path_factory.mktemp("dockerd"), hosts_file, config) as d:
        yield d


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory, hosts_file: Path) -> Podman:
    require("podman", "unshare")
    return Podman(tmp_path_factory.mktemp("podman"), hosts_file)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
