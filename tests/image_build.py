"""Build deploy/container/Containerfile with podman and run the image, in storage of the test's own.

Used by tests/e2e/test_image.py. Nothing here touches the machine's container storage: every podman
call gets its own ``--root``, ``--runroot`` and ``--tmpdir`` under a temporary directory, its own
storage.conf and an empty registries.conf (no image can be pulled, none is looked up anywhere).

- The base image is made here, not pulled: ``mmdebstrap`` of Debian 12 with python3, python3-venv,
  python-is-python3 and passwd, from the Debian mirror apt is configured with, then ``podman
  import``. It stands in for ``python:3.11-slim`` through the Containerfile's ``PYTHON_IMAGE``.
- The build: ``podman build --isolation chroot --network host --format docker`` (podman's default
  OCI format drops ``HEALTHCHECK``), with the machine's CA bundle mounted read-only where Debian's
  OpenSSL and pip read it, so the build's ``pip install`` reaches the package index.
- The run: ``podman run`` with runc, host networking (the test bed lives on 127.0.0.1), a read-only
  root, a tmpfs on /tmp, no capabilities, no-new-privileges, and ``--ulimit`` set to the limits the
  test itself runs with (``host_ulimits``): podman's defaults (nofile 1048576, nproc 4194304) are
  above them, and where CAP_SYS_RESOURCE is not in the bounding set runc cannot raise a limit and
  refuses to start the container ("error setting rlimit type 7: operation not permitted").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support import ROOT

CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd")
# Where Debian's OpenSSL, and the certifi Debian patches into pip, read the trusted CAs.
CA_IN_BUILD = "/etc/ssl/certs/ca-certificates.crt"
TOOLS = ("mmdebstrap", "podman", "runc", "skopeo", "unshare")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _check(argv: list[str], proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


# --- the base image -----------------------------------------------------------------------------


def _apt_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every ``deb`` source apt is configured with, one-line and deb822 files."""
    found: list[tuple[str, list[str]]] = []
    apt = Path("/etc/apt")
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # options: [arch=amd64 ...]
            if len(words) >= 3 and words[0] == "deb":
                found.append((words[1], [words[2]]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    found.append((uri, fields.get("suites", "").split()))
    return found


def debian_mirror() -> str:
    """The Debian mirror apt uses for bookworm itself (``IMAGE_TEST_DEBIAN_MIRROR`` overrides it)."""
    if mirror := os.environ.get("IMAGE_TEST_DEBIAN_MIRROR"):
        return mirror
    for uri, suites in _apt_sources():
        if SUITE in suites and "security" not in uri:
            return uri
    raise AssertionError(
        f"no Debian {SUITE} mirror in /etc/apt/sources.list*: set IMAGE_TEST_DEBIAN_MIRROR to one "
        "(mmdebstrap makes the test's base image from it)"
    )


def make_base_rootfs(tarball: Path) -> float:
    """Debian 12 with Python as a root filesystem tarball; returns the seconds it took."""
    argv = [
        "mmdebstrap",
        "--variant=essential",
        f"--include={','.join(BASE_PACKAGES)}",
        SUITE,
        str(tarball),
        debian_mirror(),
    ]
    started = time.monotonic()
    _check(argv, subprocess.run(argv, capture_output=True, text=True, timeout=600))
    return time.monotonic() - started


def ca_bundle() -> Path:
    """The machine's CA bundle: the one its TLS clients (pip, requests, OpenSSL) are told to use."""
    for variable in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        value = os.environ.get(variable)
        if value and Path(value).is_file():
            return Path(value)
    default = Path(CA_IN_BUILD)
    if default.is_file():
        return default
    raise AssertionError(f"no CA bundle: set SSL_CERT_FILE, or install ca-certificates ({CA_IN_BUILD})")


def _limit(value: int) -> str:
    return "-1" if value == resource.RLIM_INFINITY else str(value)


def host_ulimits() -> list[str]:
    """``--ulimit`` options for limits runc can set here (what ``--ulimit host`` means to say).

    The limits this process has; for nproc at most the kernel's pid_max, because rootful podman
    lowers its own RLIMIT_NPROC to that at start-up, and its children (conmon, runc) inherit it.
    """
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    options: list[str] = []
    for name, which, cap in (("nofile", resource.RLIMIT_NOFILE, None), ("nproc", resource.RLIMIT_NPROC, pid_max)):
        soft, hard = resource.getrlimit(which)
        if cap is not None:
            hard = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
            soft = hard if soft == resource.RLIM_INFINITY else min(soft, hard)
        options += ["--ulimit", f"{name}={_limit(soft)}:{_limit(hard)}"]
    return options


# --- podman in storage of its own ---------------------------------------------------------------


@dataclass
class Podman:
    """podman with its own storage, state and configuration under ``workdir``."""

    workdir: Path

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.graph = self.workdir / "graph"
        self.run_root = self.workdir / "run"
        self.tmp = self.workdir / "tmp"
        self.storage_conf = self.workdir / "storage.conf"
        self.storage_conf.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.graph}"\nrunroot = "{self.run_root}"\n'
        )
        self.registries_conf = self.workdir / "registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        runc = shutil.which("runc")
        assert runc is not None, "runc is not installed"
        self.runtime = runc

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.graph),
            "--runroot",
            str(self.run_root),
            "--tmpdir",
            str(self.tmp),
            "--storage-driver",
            "overlay",
            "--runtime",
            self.runtime,
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
        }

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.argv(*args)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env())
        return _check(argv, proc) if check else proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env()
        )

    def inspect(self, what: str, name: str) -> dict[str, Any]:
        (data,) = json.loads(self(what, "inspect", name).stdout)
        assert isinstance(data, dict)
        return data

    def mounts(self) -> list[str]:
        """Mount points under the working directory (overlay layers a crash left behind)."""
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(str(self.workdir)):
                points.append(point)
        return points

    def cleanup(self) -> None:
        """Every container and image gone, no mount left, the directory removed."""
        if self.graph.exists():
            self("rm", "--all", "--force", "--time", "0", check=False)
            self("rmi", "--all", "--force", check=False)
        for point in reversed(self.mounts()):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Build:
    image: str
    base: str
    seconds: float
    size: int
    base_size: int
    log: str


def build_image(podman: Podman, base_tarball: Path, tag: str) -> Build:
    """``podman import`` the base, then build the Containerfile on it as the repository documents."""
    base = f"localhost/registry-gateway-test-base:{SUITE}"
    podman("import", str(base_tarball), base, timeout=300)
    argv = [
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--format",
        "docker",
        "--pull=never",
        "--volume",
        f"{ca_bundle()}:{CA_IN_BUILD}:ro",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "--file",
        str(CONTAINERFILE),
        "--tag",
        tag,
        str(ROOT),
    ]
    started = time.monotonic()
    proc = podman(*argv, timeout=900)
    seconds = time.monotonic() - started
    return Build(
        image=tag,
        base=base,
        seconds=seconds,
        size=int(podman.inspect("image", tag)["Size"]),
        base_size=int(podman.inspect("image", base)["Size"]),
        log=proc.stdout + proc.stderr,
    )


# --- the container ------------------------------------------------------------------------------


@dataclass
class Container:
    podman: Podman
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        state = self.podman.inspect("container", self.name)["State"]
        assert isinstance(state, dict)
        return state

    def logs(self) -> str:
        proc = self.podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        options = [item for key, value in (env or {}).items() for item in ("--env", f"{key}={value}")]
        return self.podman("exec", *options, self.name, *argv, check=False, timeout=60)

    def wait_until_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not self.state().get("Running") or time.monotonic() > deadline:
                raise AssertionError(f"the container did not become ready; its log:\n{self.logs()[-4000:]}")
            time.sleep(0.1)


@contextlib.contextmanager
def run_container(
    podman: Podman, image: str, *, port: int, routes: Path, env: dict[str, str], log_dir: Path
) -> Iterator[Container]:
    """The image as compose.yaml runs it (read-only, /tmp a tmpfs, no capabilities), on host networking."""
    name = f"registry-gateway-test-{port}"
    environment = {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), **env}
    argv = [
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp:size=64m,mode=1777",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        *host_ulimits(),
        # No systemd here to drive podman's healthcheck timer; the test runs the check itself.
        "--health-interval",
        "disable",
        "--volume",
        f"{routes}:/etc/registry-gateway/routes.toml:ro",
        *[item for key, value in environment.items() for item in ("--env", f"{key}={value}")],
        image,
    ]
    podman(*argv, timeout=120)
    container = Container(podman=podman, name=name, port=port)
    try:
        container.wait_until_ready()
        yield container
    finally:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.log").write_text(container.logs())
        podman("rm", "--force", "--time", "0", name, check=False)
