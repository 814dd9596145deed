"""The container image, built from deploy/container/Containerfile and run as a container.

The base image is Debian 12 with Python made by mmdebstrap (nothing can be pulled here), passed as
``PYTHON_IMAGE``; everything after the FROM lines is the production Containerfile unchanged. The
image then runs under podman and runc as compose.yaml runs it: its own USER, ENTRYPOINT, ENV and
WORKDIR, a read-only root filesystem, /tmp a tmpfs, no capabilities. Proven against it:

- its config: user 10001:10001, the HEALTHCHECK kept (``--format docker``), port, stop signal;
- skopeo pulls every kind of test bed image through it, byte for byte, by digest;
- the image's own HEALTHCHECK passes (``podman healthcheck run``) and fails on a dead port;
- ``podman stop`` (the image's STOPSIGNAL, SIGTERM) mid-way through the 256 MiB blob: no new
  connections, the pull in flight completes intact, the container exits by itself in time.

tests/image_build.py holds the build and run helpers, and says why each podman option is there.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import __version__
from tests.e2e.clients import Skopeo, verify_dir_copy
from tests.e2e.conftest import gateway_routes
from tests.image_build import (
    Build,
    Container,
    Podman,
    build_image,
    host_ulimits,
    make_base_rootfs,
    missing_tools,
    run_container,
)
from tests.support import free_port
from tests.testbed.bed import Testbed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tools() -> None:
    """The tools CI installs; missing ones fail the test (never a silent skip)."""
    if missing := missing_tools():
        pytest.fail(f"not installed: {', '.join(missing)} (scripts/install installs them)", pytrace=False)


@pytest.fixture(scope="session")
def base_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Debian 12 with Python, as a tarball: made once per pytest session, removed at its end."""
    if missing := missing_tools():
        pytest.fail(f"not installed: {', '.join(missing)} (scripts/install installs them)", pytrace=False)
    tarball = tmp_path_factory.mktemp("image-base") / "bookworm-python.tar"
    seconds = make_base_rootfs(tarball)
    print(f"base root filesystem: {tarball.stat().st_size / 1e6:.0f} MB in {seconds:.1f} s")
    yield tarball
    tarball.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def podman_store(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    podman = Podman(tmp_path_factory.mktemp("image-podman"))
    try:
        yield podman
    finally:
        podman.cleanup()
        assert not podman.mounts(), "mounts left behind"


@pytest.fixture(scope="module")
def built(podman_store: Podman, base_rootfs: Path) -> Build:
    build = build_image(podman_store, base_rootfs, "localhost/registry-gateway:test")
    print(
        f"image {build.image}: {build.size / 1e6:.1f} MB ({(build.size - build.base_size) / 1e6:.1f} MB over the "
        f"{build.base_size / 1e6:.1f} MB base), built in {build.seconds:.1f} s"
    )
    return build


@pytest.fixture(scope="module")
def routes_file(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image-routes") / "routes.toml"
    path.write_text(gateway_routes(testbed))
    return path


def container_env(testbed: Testbed) -> dict[str, str]:
    return {
        "E2E_GHCR_USER": testbed.credentials.username,
        "E2E_GHCR_PASS": testbed.credentials.password,
        "GATEWAY_SHUTDOWN_TIMEOUT": "30",
    }


@pytest.fixture(scope="module")
def container(
    podman_store: Podman, built: Build, routes_file: Path, testbed: Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    with run_container(
        podman_store,
        built.image,
        port=free_port(),
        routes=routes_file,
        env=container_env(testbed),
        log_dir=tmp_path_factory.mktemp("image-logs"),
    ) as c:
        yield c


@pytest.fixture(scope="module")
def image_skopeo(tools: None, tmp_path_factory: pytest.TempPathFactory, hosts_file: Path) -> Skopeo:
    return Skopeo(tmp_path_factory.mktemp("image-skopeo"), hosts_file)


def test_image_size_and_build_time(built: Build):
    """The figures docs/deploy.md quotes; the gateway's layers stay small next to the base."""
    assert built.size - built.base_size < 80e6, f"the gateway adds {(built.size - built.base_size) / 1e6:.0f} MB"
    assert built.seconds < 300
    assert "registry-gateway " + __version__ in built.log  # the build stage's own --version check


def test_image_config(podman_store: Podman, built: Build):
    data = podman_store.inspect("image", built.image)
    config = data["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["registry-gateway"]
    assert config["WorkingDir"] == "/tmp"
    assert "5000/tcp" in config["ExposedPorts"]
    assert config["StopSignal"] == "SIGTERM"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["GATEWAY_ROUTES"] == "/etc/registry-gateway/routes.toml"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/registry-gateway/bin:")
    # The OCI format has no HEALTHCHECK: without --format docker, podman drops it.
    check = data["Healthcheck"]
    assert check["Test"][:2] == ["CMD", "python"]
    assert "/healthz" in check["Test"][-1]
    assert check["Interval"] == 30 * 10**9


def test_entrypoint_runs_the_installed_gateway(podman_store: Podman, built: Build):
    argv = ["run", "--rm", "--network", "none", "--read-only", *host_ulimits(), built.image, "--version"]
    out = podman_store(*argv, timeout=120).stdout
    assert out.strip() == f"registry-gateway {__version__}"


def test_container_runs_unprivileged_on_a_read_only_root(container: Container):
    pid = container.state()["Pid"]
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["Uid"].split() == ["10001"] * 4
    assert status["Gid"].split() == ["10001"] * 4
    assert int(status["CapEff"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"/registry-gateway") for part in cmdline[:2]), cmdline
    write = "import sys; open(sys.argv[1], 'w').write('x')"
    assert container.exec("python", "-c", write, "/tmp/ok").returncode == 0
    denied = container.exec("python", "-c", write, "/opt/registry-gateway/x")
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr


CASES = [
    ("alpine", "127.0.0.1:{p}/alpine:3.20"),
    ("busybox", "docker.gw.test:{p}/library/busybox:1.36"),
    ("app", "gw.test:{p}/ghcr.io/org/app:v1"),
    ("secret-app", "ghcr.gw.test:{p}/private/secret-app:v1"),
    ("etcd", "quay.gw.test:{p}/coreos/etcd:v3.5"),
    ("bigimage", "127.0.0.1:{p}/bigimage:1.0"),
]


@pytest.mark.parametrize(("key", "ref"), CASES, ids=[key for key, _ in CASES])
def test_skopeo_pulls_through_the_container(
    image_skopeo: Skopeo, container: Container, testbed: Testbed, tmp_path: Path, key: str, ref: str
):
    dest = image_skopeo.copy_all(ref.format(p=container.port), tmp_path / "copy")
    verify_dir_copy(dest, testbed.images[key])


def test_healthcheck_passes_and_fails(podman_store: Podman, container: Container):
    """The image's own HEALTHCHECK, run by podman inside the container; the same command on a dead port fails."""
    proc = podman_store("healthcheck", "run", container.name, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = container.state()
    health = state.get("Health") or state["Healthcheck"]  # podman 4.3 says Healthcheck, later ones Health
    assert health["Status"] == "healthy", health
    assert health["Log"][-1]["ExitCode"] == 0
    test = podman_store.inspect("image", podman_store.inspect("container", container.name)["Image"])["Healthcheck"]
    argv = test["Test"][1:]
    dead = container.exec(*argv, env={"GATEWAY_PORT": str(free_port())})
    assert dead.returncode != 0
    assert "Connection refused" in dead.stderr


def test_stop_mid_pull_lets_the_pull_finish(
    podman_store: Podman, built: Build, routes_file: Path, testbed: Testbed, tmp_path: Path
):
    digest, size = max(testbed.images["bigimage"].blobs.items(), key=lambda item: item[1])
    assert size >= 256 << 20
    with run_container(
        podman_store, built.image, port=free_port(), routes=routes_file, env=container_env(testbed), log_dir=tmp_path
    ) as c:
        h = hashlib.sha256()
        received = 0
        with (
            httpx.Client(timeout=60) as client,
            client.stream("GET", f"{c.url}/v2/bigimage/blobs/{digest}") as resp,
        ):
            assert resp.status_code == 200
            chunks = resp.iter_raw(1 << 16)
            first = next(chunks)
            h.update(first)
            received += len(first)
            # The client pauses: the blob is still being sent when the stop signal arrives.
            stopper = podman_store.popen("stop", "--time", "60", c.name)
            deadline = time.monotonic() + 15
            while True:
                try:
                    httpx.get(f"{c.url}/healthz", timeout=1)
                except httpx.TransportError:
                    # Shutdown has begun: no new connection is served (refused, or reset when it
                    # raced the listener's close).
                    break
                assert time.monotonic() < deadline, "the gateway still accepts connections after SIGTERM"
                time.sleep(0.1)
            assert stopper.poll() is None, "the container stopped while a pull was in flight"
            for chunk in chunks:
                h.update(chunk)
                received += len(chunk)
        assert received == size
        assert "sha256:" + h.hexdigest() == digest
        _, err = stopper.communicate(timeout=60)
        assert stopper.returncode == 0, err
        state = c.state()
        # Exited by itself after the drain (uvicorn re-raises SIGTERM: 143), not killed after the timeout (137).
        assert state["ExitCode"] in (0, 143), state
        logs = c.logs()
    assert f'"path":"/v2/bigimage/blobs/{digest}"' in logs
    assert f'"bytes":{size}' in logs
